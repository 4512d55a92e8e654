"""keel.guards: policy, budgets, permission matrix, rate limits, breakers, loop and content guards.

- `Policy` (with `Budget`, `Rule`, `LoopPolicy`): everything a run is held to, from Python or a
  TOML / YAML file; `build_agent(policy=...)` applies it.
- `PermissionMatrix`: ordered `(role, tool glob, resource glob) → allow | deny | ask` rules,
  default deny; a `Gate`.
- `PeriodBudget`, `SpendMeter`: per-user / per-tenant budgets per day or month, reserved
  atomically in the ledger before each model call and settled after it.
- `check_budget` and `detect_loop`: the pure decisions behind the run budget and the loop guard.
- `check_input` / `check_output` (`InputGuardPolicy`, `OutputGuardPolicy` → `ContentVerdict`):
  the content guards; `find_pii`, `redact`, `sanitize`: the one PII sanitizer for answers,
  logs and audit.
- `Gate`, `GateDecision`, `approval_gate`: the seam where allow / ask / deny is decided per call.
- `RateLimit`, `RateLimiter` → `RateLimited`: RPM / TPM token buckets per model and per tenant,
  shared across processes through the ledger.
- `BreakerPolicy`, `CircuitBreaker` → `CircuitOpen`, `BreakerTransition`: circuit breakers per
  model and per tool, shared through the ledger.

Checks that only allow or stop run inside the node they guard, so they add no superstep.
"""

from keel.guards.breaker import BreakerPolicy, BreakerTransition, CircuitBreaker, CircuitOpen
from keel.guards.budget import BudgetVerdict, check_budget
from keel.guards.content import (
    ContentFinding,
    ContentVerdict,
    InputGuardPolicy,
    OutputGuardPolicy,
    check_input,
    check_output,
)
from keel.guards.gate import Gate, GateDecision, approval_gate
from keel.guards.loop import detect_loop
from keel.guards.permissions import PermissionMatrix
from keel.guards.pii import PiiMatch, find_pii, redact, sanitize
from keel.guards.policy import Budget, LoopPolicy, Policy, Rule
from keel.guards.ratelimit import RateLimit, RateLimited, RateLimiter
from keel.guards.spend import PeriodBudget, SpendMeter

__all__ = [
    "BreakerPolicy",
    "BreakerTransition",
    "Budget",
    "BudgetVerdict",
    "CircuitBreaker",
    "CircuitOpen",
    "ContentFinding",
    "ContentVerdict",
    "Gate",
    "GateDecision",
    "InputGuardPolicy",
    "LoopPolicy",
    "OutputGuardPolicy",
    "PeriodBudget",
    "PermissionMatrix",
    "PiiMatch",
    "Policy",
    "RateLimit",
    "RateLimited",
    "RateLimiter",
    "Rule",
    "SpendMeter",
    "approval_gate",
    "check_budget",
    "check_input",
    "check_output",
    "detect_loop",
    "find_pii",
    "redact",
    "sanitize",
]
