"""Circuit breakers per model and per tool, their state shared by every process via the ledger.

closed → open after `failure_threshold` failures within `window_seconds` (a window opened by
the first failure) → half-open once `cooldown_seconds` have passed (the next `before` lets
calls through again) → closed after `success_threshold` successes; a failure while half-open
opens it again. While open, `before` raises `CircuitOpen` at once: the caller fails fast and
moves to its fallback.

The pieces, from pure to I/O:

- `next_state(state, event, now, policy)`: every transition, a pure function;
- `breaker_flow`: the ledger transaction around it (`keel_breakers`, the row locked only when
  the state changes, so the common path — a closed breaker — writes nothing);
- `CircuitBreaker.before` / `record` (and `abefore` / `arecord`): thin drivers. Both return
  the `BreakerTransition` they caused, or `None`, for the audit log.

!!! note
    Half-open lets every call through (no single trial call): the first failure reopens it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeVar

from keel._drive import Steps, adrive, both, drive
from keel.db.audit import AuditRecord, insert_flow
from keel.db.ledger import Flow, Ledger, read_ahead
from keel.errors import CircuitOpen, KeelError, UserError
from keel.pricing import finite_number, is_count
from keel.redact import sanitized_logger

log = sanitized_logger("keel.guards")

__all__ = [
    "BreakerEvent",
    "BreakerGate",
    "BreakerPolicy",
    "BreakerState",
    "breaker_record",
    "BreakerTransition",
    "CircuitBreaker",
    "CircuitOpen",
    "State",
    "breaker_flow",
    "is_outage",
    "next_state",
]

T = TypeVar("T")

State = Literal["closed", "open", "half_open"]
"""A breaker's state."""
BreakerEvent = Literal["before", "success", "failure"]
"""What happened: a call is about to start, or one finished well or badly."""


@dataclass(frozen=True, kw_only=True, slots=True)
class BreakerPolicy:
    """When a circuit breaker opens, how long it stays open, and what closes it again.

    Example:
        ```python
        BreakerPolicy(failure_threshold=5, window_seconds=60, cooldown_seconds=30)
        ```
    """

    failure_threshold: int = 5
    """Failures within `window_seconds` that open the breaker."""
    window_seconds: float = 60.0
    """The window failures are counted in, starting at the first failure."""
    cooldown_seconds: float = 30.0
    """Seconds an open breaker fails fast before it lets calls through again (half-open)."""
    success_threshold: int = 2
    """Successes in a row, while half-open, that close the breaker."""

    def __post_init__(self) -> None:
        for name in ("failure_threshold", "success_threshold"):
            value = getattr(self, name)
            if not is_count(value) or value < 1:
                raise UserError(
                    f"BreakerPolicy.{name} must be a whole number, 1 or more (e.g. {name}=5); "
                    f"got {value!r}."
                )
        for name in ("window_seconds", "cooldown_seconds"):
            value = getattr(self, name)
            if (number := finite_number(value)) is None or number <= 0:
                raise UserError(
                    f"BreakerPolicy.{name} must be a finite number of seconds greater than 0 "
                    f"(e.g. {name}=30); got {value!r}."
                )


@dataclass(frozen=True, slots=True)
class BreakerState:
    """One breaker's row."""

    state: State = "closed"
    """closed (calls run), open (calls fail fast) or half_open (calls run on trial)."""
    failures: int = 0
    """Failures counted in the current window (closed), or that opened it (open)."""
    successes: int = 0
    """Successes while half-open."""
    opened_at: float | None = None
    """Unix time the breaker last opened."""
    window_start: float | None = None
    """Unix time of the first failure of the current window (closed)."""

    def retry_at(self, policy: BreakerPolicy) -> float | None:
        """When an open breaker half-opens; `None` unless open."""
        if self.state != "open" or self.opened_at is None:
            return None
        return self.opened_at + policy.cooldown_seconds


_CLOSED = BreakerState()


def next_state(
    state: BreakerState, event: BreakerEvent, now: float, policy: BreakerPolicy
) -> BreakerState:
    """The breaker's state after `event` at `now` (the same object when nothing changes).

    After `before`, the call may run unless the result is open.
    """
    if state.state == "closed":
        if event != "failure":
            return state
        fresh = state.window_start is None or now - state.window_start >= policy.window_seconds
        failures = 1 if fresh else state.failures + 1
        start = now if fresh else state.window_start
        if failures >= policy.failure_threshold:
            return BreakerState("open", failures, 0, opened_at=now, window_start=start)
        return replace(state, failures=failures, window_start=start)
    if state.state == "open":
        retry_at = state.retry_at(policy)
        if event == "before" and (retry_at is None or now >= retry_at):
            return BreakerState("half_open", 0, 0, opened_at=state.opened_at)
        return state  # still cooling down; results of calls started before it opened are stale
    if event == "failure":
        return BreakerState("open", state.failures + 1, 0, opened_at=now)
    if event == "success":
        if state.successes + 1 >= policy.success_threshold:
            return _CLOSED
        return replace(state, successes=state.successes + 1)
    return state


@dataclass(frozen=True, slots=True)
class BreakerTransition:
    """A breaker changed state: a record for the audit log."""

    key: str
    """The breaker, e.g. `model:gpt-4o` or `tool:lookup_order`."""
    before: State
    """The state it left."""
    after: State
    """The state it entered."""
    at: float
    """Unix time of the change."""
    reason: str
    """Why, in words: `5 failures within 60 s`."""


def _reason(old: BreakerState, new: BreakerState, policy: BreakerPolicy) -> str:
    if new.state == "open" and old.state == "half_open":
        return "a call failed while half-open"
    if new.state == "open":
        return f"{new.failures} failures within {policy.window_seconds:g} s"
    if new.state == "half_open":
        return f"cool-down of {policy.cooldown_seconds:g} s over"
    return f"{policy.success_threshold} successes while half-open"


_NOT_OUTAGES = (ValueError, TypeError, LookupError, AttributeError, AssertionError)


def is_outage(exc: BaseException) -> bool:
    """Whether a failed call counts against its breaker: timeouts, connection errors, 5xx.

    Client errors (HTTP 4xx, including 429: the provider is up and asks to slow down), keel's
    own errors and programming errors (`ValueError`, `TypeError`, `LookupError`, …: a bad
    request or a bad answer, not a provider down) do not; other exceptions (an SDK's
    connection error) do.
    """
    if isinstance(exc, (KeelError, *_NOT_OUTAGES)):
        return False
    status = getattr(exc, "status_code", None)
    if status is None:
        status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(status, int):
        return status >= 500 or status == 408
    return True


# -- the ledger flow ---------------------------------------------------------------------------

_COLUMNS = "state, failures, successes, opened_at, window_start"


def _row(rows: list[tuple[Any, ...]]) -> BreakerState:
    if not rows:
        return _CLOSED
    ((state, failures, successes, opened_at, window_start),) = rows
    return BreakerState(
        state,
        int(failures),
        int(successes),
        None if opened_at is None else float(opened_at),
        None if window_start is None else float(window_start),
    )


def _kept(
    old: BreakerState, event: BreakerEvent, now: float, policy: BreakerPolicy
) -> tuple[BreakerState, BreakerState] | None:
    """`(old, old)` when `event` at `now` leaves a breaker in state `old` as it is, else `None`."""
    return (old, old) if next_state(old, event, now, policy) == old else None


def breaker_flow(
    key: str, event: BreakerEvent, now: float, policy: BreakerPolicy
) -> Flow[tuple[BreakerState, BreakerState]]:
    """Apply `event` to the breaker `key`: `(state before, state after)`.

    The row is read without a lock; only when the state would change is it locked (created if
    new), the transition recomputed on the locked row, and written.
    """
    if (kept := _kept(_row((yield _select(key))), event, now, policy)) is not None:
        return kept
    select, params = _select(key)
    rows = yield select + " {for_update}", params
    if not rows:
        yield "INSERT INTO keel_breakers (key) VALUES (?) ON CONFLICT DO NOTHING", (key,)
        rows = yield select + " {for_update}", params
    old = _row(rows)
    new = next_state(old, event, now, policy)
    if new != old:
        yield (
            "UPDATE keel_breakers SET state = ?, failures = ?, successes = ?, opened_at = ?, "
            "window_start = ? WHERE key = ?",
            (new.state, new.failures, new.successes, new.opened_at, new.window_start, key),
        )
    return old, new


# -- the breaker: one decision, two thin drivers -----------------------------------------------


class CircuitBreaker:
    """Circuit breakers by key (`model:<name>`, `tool:<name>`), shared through the ledger.

    Call `before(key)` right before a call (it raises `CircuitOpen` while the breaker is open)
    and `record(key, ok)` after it. Both return the `BreakerTransition` they caused, or `None`.

    Example:
        ```python
        breaker = CircuitBreaker(ledger, BreakerPolicy(failure_threshold=3))
        breaker.before("model:gpt-4o")  # raises CircuitOpen while open
        try:
            answer = model.invoke(messages)
        except Exception as exc:
            breaker.record("model:gpt-4o", ok=not is_outage(exc))
            raise
        breaker.record("model:gpt-4o", ok=True)
        ```
    """

    def __init__(
        self,
        ledger: Ledger,
        policy: BreakerPolicy | None = None,
        *,
        audit: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(ledger, Ledger):
            raise UserError(f"CircuitBreaker needs a keel.Ledger, got {type(ledger).__name__}.")
        if policy is not None and not isinstance(policy, BreakerPolicy):
            raise UserError(f"CircuitBreaker policy must be a BreakerPolicy(...), got {policy!r}.")
        self.ledger = ledger
        self.policy = policy or BreakerPolicy()
        self.audit = audit
        """Write each transition to the ledger's audit log, in the same transaction."""
        self._clock = clock
        self._closed_at: dict[str, float] = {}
        """When this breaker last let a call through a closed `key` (see `_idle_success`)."""

    def _flow(
        self, key: str, event: BreakerEvent, now: float
    ) -> Flow[tuple[BreakerState, BreakerState]]:
        change = yield from breaker_flow(key, event, now, self.policy)
        transition = self._transition(key, now, change)
        if self.audit and transition is not None:
            yield from insert_flow([breaker_record(transition)])
        return change

    def _unchanged(
        self, key: str, event: BreakerEvent, now: float
    ) -> Flow[tuple[BreakerState, BreakerState] | None]:
        """`(state, state)` when `event` leaves the breaker as it is (a plain read), else `None`.

        The common case, a closed breaker letting a call through, then costs one `SELECT` and
        no transaction; a change is made by `_flow`, on the locked row.
        """
        return _kept((yield from _read_flow(key)), event, now, self.policy)

    def _start(self, key: str) -> float:
        if not isinstance(key, str) or not key:
            raise UserError(f"A circuit breaker key must be a non-empty string, got {key!r}.")
        return self._clock()

    def _transition(
        self, key: str, now: float, change: tuple[BreakerState, BreakerState]
    ) -> BreakerTransition | None:
        old, new = change
        if new.state == old.state:
            return None
        return BreakerTransition(key, old.state, new.state, now, _reason(old, new, self.policy))

    def _allowed(
        self, key: str, now: float, change: tuple[BreakerState, BreakerState]
    ) -> BreakerTransition | None:
        retry_at = change[1].retry_at(self.policy)
        if retry_at is not None:  # still open after `before`: refused
            raise CircuitOpen(key, retry_at, retry_after=max(0.0, retry_at - now))
        if change[1].state == "closed":
            self._closed_at[key] = now
        return self._transition(key, now, change)

    def _idle_success(self, key: str, now: float) -> bool:
        """Whether a success of `key` at `now` certainly changes nothing, so is not written.

        A success changes a breaker only while it is half-open (a closed one counts failures
        in a window, an open one ignores results), and a breaker `before` saw closed at `t`
        can be half-open again only after it opened (at `t` or later) and cooled down: not
        before `t + cooldown_seconds`. Within that time no row is read or written; the common
        case, a healthy model or tool, then costs no statement after the call.
        """
        seen = self._closed_at.get(key)
        return seen is not None and seen <= now < seen + self.policy.cooldown_seconds

    def admitting(self, key: str, then: Flow[T]) -> Flow[tuple[BreakerTransition | None, T]]:
        """`before(key)` and `then` as one flow (one transaction; no round trip of its own).

        The breaker's row is read with `then`'s first statements; while it is closed `then`
        goes on. Open and still cooling down, `CircuitOpen` is raised, which rolls back what
        `then` wrote. A change (half-open) is made on the locked row first.

        Raises:
            CircuitOpen: the breaker is open and still cooling down.
        """
        now = self._start(key)
        rows, rest = yield from read_ahead(_select(key), then)
        transition = yield from self._admit(key, now, rows)
        return transition, (yield from rest)

    def _admit(
        self, key: str, now: float, rows: list[tuple[Any, ...]]
    ) -> Flow[BreakerTransition | None]:
        """`before(key)` on the row `rows` read: a change (half-open) made on the locked row.

        Raises:
            CircuitOpen: the breaker is open and still cooling down (nothing was written).
        """
        change = _kept(_row(rows), "before", now, self.policy)
        if change is None:
            change = yield from self._flow(key, "before", now)
        return self._allowed(key, now, change)

    def gate(self, key: str, refusal: Callable[[CircuitOpen], str]) -> BreakerGate:
        """`before(key)` as a claim's gate (`keel.db.idempotency.ClaimGate`).

        The breaker's row is read with the claim's first statement and checked only for a call
        that would run; open, the claim is refused with `refusal(exc)`.
        """
        self._start(key)  # a bad key is refused now, not inside the claim
        return BreakerGate(self, key, refusal)

    def before(self, key: str) -> BreakerTransition | None:
        """Let a call through, or raise `CircuitOpen` while the breaker is open.

        Raises:
            CircuitOpen: the breaker is open and still cooling down.
        """
        return drive(self._before(key))

    async def abefore(self, key: str) -> BreakerTransition | None:
        """Let a call through, or raise `CircuitOpen` while the breaker is open (async).

        Raises:
            CircuitOpen: the breaker is open and still cooling down.
        """
        return await adrive(self._before(key))

    def _before(self, key: str) -> Steps[BreakerTransition | None]:
        """`before` as `keel._drive` steps: a plain read, then a transaction only if needed."""
        now = self._start(key)
        ledger = self.ledger
        change = yield both(ledger.read, ledger.aread, self._unchanged(key, "before", now))
        if change is None:
            change = yield both(ledger.run, ledger.arun, self._flow(key, "before", now))
        return self._allowed(key, now, change)

    def record(self, key: str, ok: bool) -> BreakerTransition | None:
        """Record a call's result; returns the transition it caused, if any.

        Inside a `Ledger.batch()` scope (a keel node) a success commits with the scope's next
        write and returns `None` (a success never opens a breaker; a transition it causes, to
        closed, is audited and logged when it commits).
        """
        return drive(self._record(key, ok))

    async def arecord(self, key: str, ok: bool) -> BreakerTransition | None:
        """Record a call's result; returns the transition it caused, if any (async)."""
        return await adrive(self._record(key, ok))

    def _record(self, key: str, ok: bool) -> Steps[BreakerTransition | None]:
        """`record` as `keel._drive` steps."""
        now = self._start(key)
        event = _event(ok)
        ledger = self.ledger
        if ok and self._idle_success(key, now):
            return None
        if ok and ledger.batching:
            yield both(ledger.defer, ledger.adefer, self._deferred(key, now))
            return None
        change = yield both(ledger.run, ledger.arun, self._flow(key, event, now))
        return self._transition(key, now, change)

    def _deferred(self, key: str, now: float) -> Flow[None]:
        change = yield from self._flow(key, "success", now)
        _logged(self._transition(key, now, change))

    def state(self, key: str) -> BreakerState:
        """The breaker's current row (closed when it has none)."""
        return self.ledger.run(_read_flow(key))

    async def astate(self, key: str) -> BreakerState:
        """The breaker's current row (closed when it has none), async."""
        return await self.ledger.arun(_read_flow(key))


def _select(key: str) -> tuple[str, tuple[Any, ...]]:
    return f"SELECT {_COLUMNS} FROM keel_breakers WHERE key = ?", (key,)


@dataclass(frozen=True, slots=True)
class BreakerGate:
    """A breaker's `before` for a claim (`CircuitBreaker.gate`): read, then decided."""

    breaker: CircuitBreaker
    key: str
    refusal: Callable[[CircuitOpen], str]

    @property
    def read(self) -> tuple[str, tuple[Any, ...]]:
        """The breaker's row."""
        return _select(self.key)

    def decide(self, rows: list[tuple[Any, ...]]) -> Flow[str | None]:
        """`None` to let the call through (logging a transition), else the refusal.

        Decided at the time it runs (a claim made again after a slow `reconcile` sees the
        breaker as it is then).
        """
        try:
            transition = yield from self.breaker._admit(self.key, self.breaker._clock(), rows)
        except CircuitOpen as exc:  # raised before anything was written
            return self.refusal(exc)
        _logged(transition)
        return None


def _logged(transition: BreakerTransition | None) -> BreakerTransition | None:
    """`transition`, logged as a warning when there is one."""
    if transition is not None:
        log.warning(
            "circuit breaker %s: %s → %s (%s)",
            transition.key,
            transition.before,
            transition.after,
            transition.reason,
        )
    return transition


def _event(ok: bool) -> BreakerEvent:
    if not isinstance(ok, bool):
        raise UserError(f"CircuitBreaker.record(ok=...) must be True or False, got {ok!r}.")
    return "success" if ok else "failure"


def _read_flow(key: str) -> Flow[BreakerState]:
    return _row((yield _select(key)))


def breaker_record(transition: BreakerTransition) -> AuditRecord:
    """The audit record of a circuit breaker's transition (`tool` holds the breaker key)."""
    return AuditRecord(
        kind="breaker",
        decision=transition.after,
        tool=transition.key,
        result=f"{transition.before} -> {transition.after}: {transition.reason}",
        at=transition.at,
    )
