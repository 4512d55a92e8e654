"""`AgentGuards`: everything a policy fans out into, built once per agent.

A `Policy` handed to `build_agent` becomes a permission gate, a run budget, a loop guard, a
period-budget meter, model and tool guards (rate limits and breakers), standing approvals and a
policy identity bound into approval digests. `AgentGuards.from_policy(policy, ledger, ...)`
builds them once, in one frozen object, and every node (`call_model`, `tool_gate`,
`execute_tools`, `human_review`, `plan`, `verify`) receives it whole:

```python
from keel.graphs import build_agent
from keel.guards import AgentGuards, Budget, Policy, Rule

guards = AgentGuards.from_policy(
    Policy(name="shop", budget=Budget(usd=1.0), rules=[Rule(tool="*", action="allow")]), None
)
assert guards.gated and guards.budget is not None and guards.policy_version == "1"
```

The node factories still take the single guards as keywords (`execute_tools(tools,
gate=..., grants=...)`): those make an `AgentGuards` with `AgentGuards.of(**options)`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any, TypedDict

from langgraph.types import RetryPolicy

from keel._node import policy_id
from keel.approvals import Grants
from keel.db.ledger import Ledger
from keel.errors import UserError
from keel.guards.content import InputGuardPolicy, OutputGuardPolicy
from keel.guards.gate import Gate, approval_gate
from keel.guards.model_call import DEFAULT_MODEL_RETRY, ModelCallGuards, ModelTimeoutPolicy
from keel.guards.permissions import PermissionMatrix
from keel.guards.policy import Budget, LoopPolicy, Policy
from keel.guards.resilience import ModelGuard, ToolGuard
from keel.guards.spend import SpendMeter
from keel.guards.standing import StandingStore, allowing
from keel.pricing import PriceTable
from keel.state import Approval, RunContext

__all__ = ["AgentGuards", "GuardOptions", "model_guards"]


class GuardOptions(TypedDict, total=False):
    """The single guards a node factory still takes as keywords (see `AgentGuards.of`)."""

    gate: Gate | None
    policy_version: str
    policy_name: str | None
    grants: Grants | None
    budget: Budget | None
    loop: LoopPolicy | None
    meter: SpendMeter | None
    guard: ModelGuard | None
    prices: PriceTable | None
    retry: RetryPolicy
    timeout: float | timedelta | ModelTimeoutPolicy | None
    standing: StandingStore | None
    tool_guard: ToolGuard | None
    ledger: Ledger | None
    input_guard: InputGuardPolicy | None


_MODEL_FIELDS = ("budget", "meter", "guard", "prices", "retry")


@dataclass(frozen=True, kw_only=True, slots=True)
class AgentGuards:
    """What an agent's nodes are held to, made once from the policy, the ledger and prices."""

    model: ModelCallGuards = field(default_factory=ModelCallGuards)
    """Every model call's guards: run budget, period budgets, rate limits and breaker, retries
    and deadline, prices."""
    gate: Gate = approval_gate
    """Decides allow / ask / deny per tool call."""
    gated: bool = False
    """A `tool_gate` node decides where tool calls go (a policy or a caller's gate); without
    one, `call_model` flags the calls that need a human."""
    loop: LoopPolicy | None = None
    """The loop guard (`stop` in `tool_gate`, `wrap_up` in `call_model`)."""
    tool_guard: ToolGuard | None = None
    """The per-tool circuit breaker."""
    ledger: Ledger | None = None
    """The idempotency ledger side-effecting calls go through."""
    standing: StandingStore | None = None
    """User-scoped standing approvals, kept in the ledger."""
    grants: Grants = field(default_factory=Grants.from_secret)
    """Seals and verifies approvals in state."""
    policy_name: str | None = None
    """The policy's name bound into approval digests (default: `RunContext.policy`)."""
    policy_version: str = "1"
    """The policy's version bound into approval digests."""
    input_guard: InputGuardPolicy | None = None
    """The input guard applied to user messages and tool results."""
    output_guard: OutputGuardPolicy | None = None
    """The output guard applied to the final answer."""

    @property
    def budget(self) -> Budget | None:
        """The run budget."""
        return self.model.budget

    @property
    def policy_label(self) -> str:
        """`name@version` for traces (`default` without a policy name)."""
        return f"{self.policy_name or 'default'}@{self.policy_version}"

    def policy_id(self, context: RunContext) -> str:
        """The policy identity bound into approval digests for this run (`name@version`)."""
        return policy_id(context, self.policy_version, self.policy_name)

    def trusted(
        self, thread: str, context: RunContext, *approvals: Mapping[str, Approval] | None
    ) -> dict[str, Approval]:
        """The approvals in state whose seal verifies for this thread and user."""
        merged: dict[str, Approval] = {}
        for found in approvals:
            merged.update(found or {})
        return self.grants.for_run(thread, context).trusted(merged)

    def deciding(self, approvals: Mapping[str, Approval], context: RunContext) -> Gate:
        """The gate, with standing approvals turning `ask` into `allow`."""
        return allowing(self.gate, approvals, self.policy_id(context))

    @classmethod
    def from_policy(
        cls,
        policy: Policy | None,
        ledger: Ledger | None,
        *,
        prices: PriceTable | None = None,
        gate: Gate | None = None,
        retry: RetryPolicy = DEFAULT_MODEL_RETRY,
        timeout: float | timedelta | ModelTimeoutPolicy | None = None,
        approval_secret: str | bytes | None = None,
        policy_version: str = "1",
        tools: Sequence[str] = (),
        caller: str = "build_agent",
    ) -> AgentGuards:
        """The guards of `policy` (or of none), kept in `ledger`, for an agent with `tools`.

        Raises:
            UserError: An argument of the wrong type, a policy whose state lives in the ledger
                and no ledger, or a rule naming a tool the agent does not have.
        """
        _check(caller, prices=prices, policy_version=policy_version, gate=gate)
        model = ModelCallGuards.from_policy(
            policy, ledger, prices=prices, retry=retry, timeout=timeout, caller=caller
        )
        keeper = ledger if isinstance(ledger, Ledger) else None
        grants = Grants.from_secret(approval_secret)
        standing = StandingStore(keeper, grants) if keeper is not None else None
        if policy is None:
            return cls(
                model=model,
                gate=gate or approval_gate,
                gated=gate is not None,
                ledger=keeper,
                standing=standing,
                grants=grants,
                policy_version=policy_version,
            )
        matrix = PermissionMatrix.from_policy(policy)
        matrix.check_tools(tools, policy=f"Policy {policy.identity!r}")
        return cls(
            model=model,
            gate=gate or matrix,
            gated=True,
            loop=policy.loop,
            tool_guard=ToolGuard.from_policy(policy, keeper) if keeper is not None else None,
            ledger=keeper,
            standing=standing,
            grants=grants,
            policy_name=policy.name,
            policy_version=policy.version,
            input_guard=policy.input_guard,
            output_guard=policy.output_guard,
        )

    @classmethod
    def of(cls, base: AgentGuards | None = None, **options: Any) -> AgentGuards:
        """`base` (default: no guards) with single guards replaced (`GuardOptions`).

        `gate=None` means a `tool_gate` node decides (as `call_model(gate=None)` always did).
        """
        unknown = set(options) - set(GuardOptions.__annotations__)
        if unknown:
            raise UserError(
                f"Unknown guard option(s) {sorted(unknown)}: use "
                f"{sorted(GuardOptions.__annotations__)}, or pass "
                "guards=AgentGuards.from_policy(policy, ledger)."
            )
        guards = base or cls()
        if not options:
            return guards
        model = {k: options.pop(k) for k in _MODEL_FIELDS if k in options}
        if "timeout" in options:
            model["timeout"] = ModelTimeoutPolicy.coerce(options.pop("timeout"))
        if model:
            guards = replace(guards, model=replace(guards.model, **model))
        if "gate" in options:
            gate = options.pop("gate")
            guards = replace(guards, gate=gate or approval_gate, gated=gate is None)
        if options.get("grants", True) is None:
            options["grants"] = Grants.from_secret()
        return replace(guards, **options) if options else guards


def model_guards(guards: AgentGuards | ModelCallGuards | None) -> ModelCallGuards | None:
    """The model-call guards of `guards` (an agent's, or a model call's already)."""
    return guards.model if isinstance(guards, AgentGuards) else guards


def _check(caller: str, *, prices: object, policy_version: object, gate: object) -> None:
    """Reject arguments of the wrong type while the developer is there.

    (`model_retry` is checked by `ModelCallGuards.from_policy`.)
    """
    if prices is not None and not isinstance(prices, PriceTable):
        raise UserError(
            f"{caller}(prices=...) must be a keel.PriceTable (e.g. PriceTable({{'my-model': "
            f"Price(input_per_mtok=..., output_per_mtok=...)}})), got {type(prices).__name__}."
        )
    if not isinstance(policy_version, str) or not policy_version:
        raise UserError(
            f"{caller}(policy_version=...) must be a non-empty string, got {policy_version!r}."
        )
    if gate is not None and not callable(gate):
        raise UserError(
            f"{caller}(gate=...) must be a Gate: a function (tool, args, context) -> "
            f"GateDecision, got {gate!r}."
        )
