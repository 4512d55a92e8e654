"""keel.graphs: ready graphs built from keel's nodes.

- `build_agent`: plan → call_model ⇄ execute_tools → verify, with human review and `respond`.
- `build_supervisor`: routes a task to focused agents (each a `build_agent`) and passes their
  results back, with every sub-agent's guards, budget and approvals in force.
"""

from keel.graphs.agent import (
    build_agent,
    route_after_model,
    route_after_review,
    route_after_tools,
)
from keel.graphs.supervisor import FINISH, Route, build_supervisor

__all__ = [
    "FINISH",
    "Route",
    "build_agent",
    "build_supervisor",
    "route_after_model",
    "route_after_review",
    "route_after_tools",
]
