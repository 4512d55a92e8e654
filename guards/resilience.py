"""The rate limits and circuit breakers of a `Policy`, around one model or tool call.

- `ModelGuard`: before a model call, the model's breaker (`model:<name>`, fails fast with
  `CircuitOpen`) and then the RPM / TPM buckets (wait, or `RateLimited`); after it, the breaker
  records the result and the TPM estimate is settled with the real usage.
- `ToolGuard`: the tool's breaker (`tool:<name>`): while open, the tool is not run and the model
  is told what is missing (`refusal`); each run's result is recorded.

Both are thin drivers over `CircuitBreaker` and `RateLimiter` (whose decisions are pure), built
from a policy with `from_policy(policy, ledger)`, which returns `None` when nothing applies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

from keel._drive import Op, Steps, adrive, both, drive
from keel.db.ledger import Flow, Ledger
from keel.errors import RateLimited
from keel.guards.breaker import (
    BreakerGate,
    BreakerTransition,
    CircuitBreaker,
    CircuitOpen,
    _logged,
    is_outage,
)
from keel.guards.policy import Policy
from keel.guards.ratelimit import Permit, RateLimiter

__all__ = ["ModelGuard", "ToolGuard"]

T = TypeVar("T")


class ModelGuard:
    """A model call's breaker and rate limits: `before` it (may raise), `after` it."""

    def __init__(self, limiter: RateLimiter | None, breaker: CircuitBreaker | None) -> None:
        self.limiter = limiter
        """The RPM / TPM limits, or `None`."""
        self.breaker = breaker
        """The per-model breaker, or `None`."""

    @classmethod
    def from_policy(cls, policy: Policy, ledger: Ledger) -> ModelGuard | None:
        """The guard for `policy`'s rate limits and model breaker; `None` when it has neither."""
        limiter = RateLimiter(ledger, policy.rate_limits) if policy.rate_limits else None
        breaker = CircuitBreaker(ledger, policy.model_breaker) if policy.model_breaker else None
        return None if limiter is None and breaker is None else cls(limiter, breaker)

    def before(self, model: str, tenant: str, tokens: int) -> Permit | None:
        """Let a call to `model` through, or raise.

        Raises:
            CircuitOpen: the model's breaker is open.
            RateLimited: a bucket has no room within its limit's `max_wait`.
        """
        if self.breaker is not None:
            _logged(self.breaker.before(f"model:{model}"))
        return self.limiter.acquire(model, tenant, tokens) if self.limiter else None

    def admitting(
        self, model: str, tenant: str, tokens: int, first: Flow[T], go_on: Callable[[T], bool]
    ) -> Steps[tuple[T, Permit | RateLimited | None]]:
        """`before` as `keel._drive` steps, with `first` in the rate limits' first transaction.

        One transaction: the breaker's row is read with `first`'s first statements
        (`CircuitBreaker.admitting`; open, `CircuitOpen` is raised and `first` rolled back),
        then `first` (a call's spend reservation) and, when `go_on(its result)`, the first try
        at the rate buckets; past a limit's `max_wait` the `RateLimited` is returned for the
        caller to undo `first`.

        Raises:
            CircuitOpen: the model's breaker is open.
        """
        if self.breaker is None:
            assert self.limiter is not None  # a guard has a limiter, a breaker or both
            return (yield from self.limiter.acquiring_after(first, go_on, model, tenant, tokens))
        ledger = self.breaker.ledger
        # an open breaker raises, rolling back its transaction: records deferred earlier in
        # this node (a failed call's rate refund) commit first, on their own
        yield Op(ledger.flush, ledger.aflush)
        checked = self.breaker.admitting(f"model:{model}", first)
        if self.limiter is not None:
            (transition, head), permit = yield from self.limiter.acquiring_after(
                checked, lambda h: go_on(h[1]), model, tenant, tokens
            )
        else:
            (transition, head), permit = (yield both(ledger.run, ledger.arun, checked)), None
        _logged(transition)
        return head, permit

    async def abefore(self, model: str, tenant: str, tokens: int) -> Permit | None:
        """Let a call to `model` through, or raise (async); see `before`."""
        if self.breaker is not None:
            _logged(await self.breaker.abefore(f"model:{model}"))
        return await self.limiter.aacquire(model, tenant, tokens) if self.limiter else None

    def after(
        self, model: str, permit: Permit | None, error: BaseException | None, used: int
    ) -> BreakerTransition | None:
        """Record the call's result (`error` is `None` on success) and its `used` tokens.

        Returns the breaker transition the result caused (e.g. closed → open), if any.
        """
        return drive(self._after(model, permit, error, used))

    async def aafter(
        self, model: str, permit: Permit | None, error: BaseException | None, used: int
    ) -> BreakerTransition | None:
        """Record the call's result and its `used` tokens (async); see `after`."""
        return await adrive(self._after(model, permit, error, used))

    def _after(
        self, model: str, permit: Permit | None, error: BaseException | None, used: int
    ) -> Steps[BreakerTransition | None]:
        """`after` as `keel._drive` steps."""
        transition = None
        if self.breaker is not None:
            ok = error is None or not is_outage(error)
            breaker = self.breaker
            transition = _logged(
                (yield both(breaker.record, breaker.arecord, f"model:{model}", ok))
            )
        if self.limiter is not None and permit is not None:
            yield both(self.limiter.settle, self.limiter.asettle, permit, used)
        return transition


class ToolGuard:
    """A tool's circuit breaker: `check` before running it, `record` its result.

    The one rule for what a tool call counts (`counts`), for `build_agent`'s tool node and
    `CircuitBreakerMiddleware` alike: each hands `record` the call's keel status
    (`keel_status`), and the guard decides. The breaker is shared by every thread through the
    ledger, so only a call the tool ran counts: one refused, rejected, answered by a human, or
    never run (arguments that did not fit, no such tool, a twin of another call) counts for
    nothing, or a model told by an injection to make such calls again and again would make the
    tool unavailable to every other user.
    """

    SUCCEEDED = frozenset({"success", "blocked"})
    """Statuses of a call the tool ran and answered (`blocked`: the input guard withheld what it
    answered; the tool did not fail)."""
    FAILED = frozenset({"error", "timeout"})
    """Statuses of a call the tool ran that failed. Every other status counts for nothing."""

    def __init__(self, breaker: CircuitBreaker) -> None:
        self.breaker = breaker
        """The per-tool breaker."""

    @classmethod
    def from_policy(cls, policy: Policy, ledger: Ledger) -> ToolGuard | None:
        """The guard for `policy.tool_breaker`; `None` when the policy has none."""
        if policy.tool_breaker is None:
            return None
        return cls(CircuitBreaker(ledger, policy.tool_breaker))

    @classmethod
    def counts(cls, status: object) -> bool | None:
        """How a call that ended with keel status `status` counts.

        A success (`True`), a failure (`False`) or not at all (`None`: the tool never ran, or
        a status keel does not know, which must not open a breaker shared by every user).
        """
        if status in cls.SUCCEEDED:
            return True
        return False if status in cls.FAILED else None

    @classmethod
    def deciding(cls, statuses: Iterable[object]) -> object:
        """Of the statuses of one call's answers (a `Command` can write several), the one to count.

        The first failure, else the first success, else the first status; `success` when there
        is none (the tool ran and answered with no message).
        """
        found = list(statuses)
        for wanted in (False, True):
            counted = next((s for s in found if cls.counts(s) is wanted), None)
            if counted is not None:
                return counted
        return found[0] if found else "success"

    def check(self, tool: str) -> str | None:
        """`None` when `tool` may run, else what the model is told instead of its result."""
        return drive(self._check(tool))

    async def acheck(self, tool: str) -> str | None:
        """`None` when `tool` may run, else what the model is told (async); see `check`."""
        return await adrive(self._check(tool))

    def _check(self, tool: str) -> Steps[str | None]:
        """`check` as `keel._drive` steps."""
        try:
            _logged((yield both(self.breaker.before, self.breaker.abefore, f"tool:{tool}")))
        except CircuitOpen as exc:
            return refusal(tool, exc)
        return None

    def gate(self, tool: str) -> BreakerGate:
        """`check` as the gate of `tool`'s idempotency claim (`keel.db.idempotency.ClaimGate`).

        The breaker's row is read with the claim, and an open breaker refuses the claim.
        """
        return self.breaker.gate(f"tool:{tool}", lambda exc: refusal(tool, exc))

    def record(self, tool: str, status: object) -> None:
        """Record a call of `tool` that ended with keel status `status`, as `counts` says."""
        ok = self.counts(status)
        if ok is not None:
            _logged(self.breaker.record(f"tool:{tool}", ok))

    async def arecord(self, tool: str, status: object) -> None:
        """Record a call of `tool` that ended with `status` (async); see `record`."""
        ok = self.counts(status)
        if ok is not None:
            _logged(await self.breaker.arecord(f"tool:{tool}", ok))


def refusal(tool: str, exc: CircuitOpen) -> str:
    """What the model reads when `tool`'s breaker is open: what is missing and what to do."""
    return (
        f"Error: {tool} is unavailable (it failed repeatedly; circuit breaker {exc.key!r} is "
        f"open for another {exc.retry_after:.0f} s) and was not run. Continue without its "
        "result, and tell the user what you could not look up or do."
    )
