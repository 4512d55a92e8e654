"""keel.guards: policy, budgets, permission matrix, rate limits, breakers, loop and content guards.

Today it holds the seams the guards plug into: the tool `Gate` (allow / ask / deny per call,
given to `build_agent(gate=...)`) and `BeforeModel` checks (given to
`build_agent(before_model=[...])`), which run inside `call_model` and add no superstep.
"""

from keel.guards.gate import Gate, GateDecision, approval_gate

__all__ = ["Gate", "GateDecision", "approval_gate"]
