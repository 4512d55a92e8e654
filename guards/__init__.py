"""keel.guards: policy, budgets, permission matrix, rate limits, breakers, loop and content guards.

- `Policy` (with `Budget`, `Rule`, `LoopPolicy`): everything a run is held to, from Python or a
  TOML / YAML file; `build_agent(policy=...)` applies it.
- `AgentGuards`: what a policy fans out into (gate, budgets, loop guard, meter, model and tool
  guards, standing approvals, grants, policy identity), built once per agent by
  `AgentGuards.from_policy(policy, ledger, ...)`; the nodes receive it whole.
- `PermissionMatrix`: ordered `(role, tool glob, resource glob) → allow | deny | ask` rules,
  default deny; a `Gate`.
- `PeriodBudget`, `SpendMeter`: per-user / per-tenant budgets per day or month, reserved
  atomically in the ledger before each model call and settled after it.
- `check_budget` and `detect_loop`: the pure decisions behind the run budget and the loop guard.
- `check_input` / `check_output` (`InputGuardPolicy`, `OutputGuardPolicy` → `ContentVerdict`):
  the content guards, set on `Policy.input_guard` / `Policy.output_guard`; `screen_inputs`,
  `screen_tool_result`, `screen_answer` apply them to messages (the guard nodes in
  `keel.nodes` and the middleware share them); `find_pii`, `redact`, `sanitize`: the one PII
  sanitizer for answers, logs and audit.
- `InjectionDetector`: what decides an injection — `HeuristicDetector` (default),
  `ModelDetector` (a chat model's `InjectionVerdict`) or your own callable; `acheck_input`
  runs an async detector.
- `Gate`, `GateDecision`, `approval_gate`: the seam where allow / ask / deny is decided per call.
- `RateLimit`, `RateLimiter` → `RateLimited`: RPM / TPM token buckets per model and per tenant,
  shared across processes through the ledger.
- `BreakerPolicy`, `CircuitBreaker` → `CircuitOpen`, `BreakerTransition`: circuit breakers per
  model and per tool, shared through the ledger.
- `AdmissionPolicy` (`Policy.admission`), `Admission` → `Lease`: caps on the runs a tenant and
  each user have running and queued, kept as leases in the ledger; over them a run ends as
  `stopped` / `overloaded` with a retry-after. `WaitingRoom`: a cap on the runs one process
  has waiting in those queues, over every tenant (the server config's `queued_per_process`).
- `GuardedModel` (with `ModelCallGuards`, `ModelTimeoutPolicy` → `ModelAnswer`): the one path
  every model call keel makes goes through (agent turns, plans, the judge, the router): run
  budget, period budget reservation with the answer capped at its reserve, breaker and rate
  limits, a per-attempt deadline, usage accounting, retries and fallbacks.
- `ModelGuard`, `ToolGuard`: a policy's rate limits and breakers around one model or tool call
  (what `build_agent(policy=..., ledger=..., fallback_models=[...])` runs inside its nodes);
  `after_failure`: the fallback decision by error type. `build_agent(downgrade_model=...)`
  switches to a cheaper model past the run budget's soft threshold (off by default).
- Standing approvals (`keel.guards.standing`): a resume `{"type": "approve", "always": {...}}`
  allows later calls of the tool in the thread (or, `"scope": "user"`, the user's threads, kept
  in the ledger) until it expires.
- `BudgetMiddleware`, `PermissionMiddleware`, `RateLimitMiddleware`, `CircuitBreakerMiddleware`,
  `LoopGuardMiddleware`, `InputGuardMiddleware`, `OutputGuardMiddleware` (+ `outcome_of`): the
  same guards as LangChain `AgentMiddleware` for
  `langchain.agents.create_agent`.

Checks that only allow or stop run inside the node they guard, so they add no superstep.
"""

from keel.guards.admission import Admission, AdmissionPolicy, Lease, WaitingRoom
from keel.guards.agent_guards import AgentGuards
from keel.guards.breaker import BreakerPolicy, BreakerTransition, CircuitBreaker, CircuitOpen
from keel.guards.budget import BudgetVerdict, check_budget, usage_from_messages
from keel.guards.content import (
    ContentFinding,
    ContentVerdict,
    InputGuardPolicy,
    OutputGuardPolicy,
    acheck_input,
    check_input,
    check_output,
)
from keel.guards.content_middleware import InputGuardMiddleware, OutputGuardMiddleware
from keel.guards.fallback import after_failure
from keel.guards.gate import Gate, GateDecision, approval_gate
from keel.guards.injection import HeuristicDetector, InjectionDetector
from keel.guards.injection_model import InjectionVerdict, ModelDetector
from keel.guards.loop import detect_loop
from keel.guards.middleware import (
    BudgetMiddleware,
    CircuitBreakerMiddleware,
    LoopGuardMiddleware,
    PermissionMiddleware,
    RateLimitMiddleware,
    outcome_of,
)
from keel.guards.model_call import GuardedModel, ModelAnswer, ModelCallGuards, ModelTimeoutPolicy
from keel.guards.permissions import PermissionMatrix
from keel.guards.policy import Budget, LoopPolicy, Policy, Rule
from keel.guards.ratelimit import RateLimit, RateLimited, RateLimiter
from keel.guards.resilience import ModelGuard, ToolGuard
from keel.guards.screening import screen_answer, screen_inputs, screen_tool_result
from keel.guards.spend import PeriodBudget, SpendMeter
from keel.redact import PiiMatch, find_pii, redact, sanitize

__all__ = [
    "Admission",
    "AdmissionPolicy",
    "AgentGuards",
    "BreakerPolicy",
    "BreakerTransition",
    "Budget",
    "BudgetMiddleware",
    "BudgetVerdict",
    "CircuitBreaker",
    "CircuitBreakerMiddleware",
    "CircuitOpen",
    "ContentFinding",
    "ContentVerdict",
    "Gate",
    "GateDecision",
    "HeuristicDetector",
    "InjectionDetector",
    "InjectionVerdict",
    "InputGuardMiddleware",
    "InputGuardPolicy",
    "Lease",
    "LoopGuardMiddleware",
    "LoopPolicy",
    "ModelDetector",
    "ModelGuard",
    "OutputGuardMiddleware",
    "GuardedModel",
    "ModelAnswer",
    "ModelCallGuards",
    "ModelTimeoutPolicy",
    "OutputGuardPolicy",
    "PeriodBudget",
    "PermissionMatrix",
    "PermissionMiddleware",
    "PiiMatch",
    "Policy",
    "RateLimit",
    "RateLimitMiddleware",
    "RateLimited",
    "RateLimiter",
    "Rule",
    "SpendMeter",
    "ToolGuard",
    "WaitingRoom",
    "acheck_input",
    "after_failure",
    "approval_gate",
    "check_budget",
    "check_input",
    "check_output",
    "detect_loop",
    "find_pii",
    "outcome_of",
    "redact",
    "sanitize",
    "screen_answer",
    "screen_inputs",
    "screen_tool_result",
    "usage_from_messages",
]
