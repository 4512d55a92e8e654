"""keel.graphs: ready graphs built from keel's nodes.

- `build_agent`: plan → call_model ⇄ execute_tools → verify, with human review and `respond`.
"""

from keel.graphs.agent import (
    build_agent,
    route_after_model,
    route_after_review,
    route_after_tools,
)

__all__ = ["build_agent", "route_after_model", "route_after_review", "route_after_tools"]
