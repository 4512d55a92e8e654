"""keel.guards: policy, budgets, permission matrix, rate limits, breakers, loop and content guards.

- `Policy` (with `Budget`, `Rule`, `LoopPolicy`): everything a run is held to, from Python or a
  TOML / YAML file; `build_agent(policy=...)` applies it.
- `PermissionMatrix`: ordered `(role, tool glob, resource glob) → allow | deny | ask` rules,
  default deny; a `Gate`.
- `check_budget` and `detect_loop`: the pure decisions behind the run budget and the loop guard.
- `Gate`, `GateDecision`, `approval_gate`: the seam where allow / ask / deny is decided per call.

Checks that only allow or stop run inside the node they guard, so they add no superstep.
"""

from keel.guards.budget import BudgetVerdict, check_budget
from keel.guards.gate import Gate, GateDecision, approval_gate
from keel.guards.loop import detect_loop
from keel.guards.permissions import PermissionMatrix
from keel.guards.policy import Budget, LoopPolicy, Policy, Rule

__all__ = [
    "Budget",
    "BudgetVerdict",
    "Gate",
    "GateDecision",
    "LoopPolicy",
    "PermissionMatrix",
    "Policy",
    "Rule",
    "approval_gate",
    "check_budget",
    "detect_loop",
]
