"""RPM and TPM token buckets per model and per tenant, shared by every process via the ledger.

Each limit is a token bucket that holds up to `rpm` requests (or `tpm` tokens) and refills at
that many per minute. A call takes 1 from every RPM bucket that applies to it and its estimated
tokens from every TPM bucket, all or nothing, in one transaction that locks the bucket rows
(`keel_rate_buckets`), so processes sharing one database share one bucket.

The pieces, from pure to I/O:

- `take_tokens(wants, now)`: the bucket math, a pure function → `Admit` or `Wait(seconds)`;
- `acquire_flow` / `settle_flow`: the ledger transactions around it;
- `RateLimiter.acquire` / `aacquire`: thin drivers that sleep on `Wait` (`time.sleep` /
  `asyncio.sleep`) and retry, up to the limit's `max_wait`, then raise `RateLimited`.

TPM counts the *estimate* when the call is admitted; `RateLimiter.settle(permit, used)` corrects
it with the real usage afterwards (a refund, or a debt the next calls wait for).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import lru_cache
from itertools import chain
from typing import Literal, TypeVar

from keel._drive import Steps, adrive, both, drive, sleep
from keel.db.ledger import Flow, Ledger
from keel.errors import RateLimited, UserError

T = TypeVar("T")

__all__ = [
    "Admit",
    "Bucket",
    "Permit",
    "RateLimit",
    "RateLimited",
    "RateLimiter",
    "Wait",
    "acquire_flow",
    "settle_flow",
    "take_tokens",
]

_SLACK = 0.001
"""Seconds added to each computed wait, so float rounding never leaves a bucket a hair short."""


# -- config ------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class RateLimit:
    """Requests and tokens per minute, per model or per tenant, shared across processes.

    Example:
        ```python
        RateLimit(rpm=500, tpm=200_000)  # each model: 500 requests, 200k tokens a minute
        RateLimit(rpm=60, scope="tenant", max_wait=0)  # each tenant: 60 a minute, never wait
        RateLimit(tpm=30_000, model="gpt-4o*")  # only models matching the glob
        ```
    """

    rpm: int | None = None
    """Requests per minute; `None` disables it."""
    tpm: int | None = None
    """Tokens per minute (the call's estimate, corrected by `RateLimiter.settle`); `None`
    disables it."""
    scope: Literal["model", "tenant"] = "model"
    """One bucket per model name, or one per tenant (`RunContext.tenant_id`) across its models."""
    model: str = "*"
    """The model names (a glob) this limit applies to."""
    max_wait: float = 10.0
    """Seconds a call may wait for room before it fails with `RateLimited`; 0 fails at once."""

    def __post_init__(self) -> None:
        if self.rpm is None and self.tpm is None:
            raise UserError("RateLimit needs a limit: set rpm=… and/or tpm=….")
        for name in ("rpm", "tpm"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value <= 0
            ):
                raise UserError(
                    f"RateLimit.{name} must be a whole number greater than 0, or None to "
                    f"disable it; got {value!r}."
                )
        if self.scope not in ("model", "tenant"):
            raise UserError(f"RateLimit.scope must be 'model' or 'tenant', got {self.scope!r}.")
        if not isinstance(self.model, str) or not self.model:
            raise UserError(
                f"RateLimit.model must be a non-empty glob ('*' for any), got {self.model!r}."
            )
        wait = self.max_wait
        if isinstance(wait, bool) or not isinstance(wait, int | float) or not 0 <= wait < 3600:
            raise UserError(f"RateLimit.max_wait must be between 0 and 3600 seconds, got {wait!r}.")

    def applies_to(self, model: str) -> bool:
        """Whether calls to `model` count against this limit."""
        return fnmatchcase(model, self.model)

    def bucket_keys(self, model: str, tenant: str) -> list[tuple[str, int, str]]:
        """`(bucket key, limit, kind)` per bucket a call to `model` by `tenant` takes from.

        Keys read `rpm:model:gpt-4o` or `tpm:tenant:acme` (`…|glob` when `model` is not `*`,
        so limits with different globs never share a bucket).
        """
        who = f"model:{model}" if self.scope == "model" else f"tenant:{tenant}"
        if self.model != "*":
            who = f"{who}|{self.model}"
        pairs = (("rpm", self.rpm), ("tpm", self.tpm))
        return [(f"{kind}:{who}", limit, kind) for kind, limit in pairs if limit is not None]


# -- the bucket math (pure) --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Bucket:
    """One bucket's row: `tokens` left at `updated_at`, refilling `limit` per minute."""

    key: str
    """The bucket, e.g. `tpm:model:gpt-4o`."""
    limit: int
    """Capacity, and refill per minute."""
    tokens: float
    """Room left at `updated_at` (negative: a debt from usage above the estimate)."""
    updated_at: float
    """Unix time of `tokens`."""

    def at(self, now: float) -> Bucket:
        """The bucket refilled up to `now` (a clock behind `updated_at` refills nothing)."""
        elapsed = max(0.0, now - self.updated_at)
        tokens = min(float(self.limit), self.tokens + elapsed * self.limit / 60.0)
        return Bucket(self.key, self.limit, tokens, max(now, self.updated_at))


@dataclass(frozen=True, slots=True)
class Admit:
    """Every bucket had room: their new rows, with the call's share taken."""

    buckets: tuple[Bucket, ...]


@dataclass(frozen=True, slots=True)
class Wait:
    """Some bucket is short: the longest wait until all have room, and that bucket."""

    seconds: float
    key: str
    limit: int


def take_tokens(wants: Sequence[tuple[Bucket, float]], now: float) -> Admit | Wait:
    """Take `amount` from each `(bucket, amount)` at `now`, all or nothing.

    An amount above a bucket's whole limit is capped at the limit (the call waits for a full
    bucket and empties it), so no call can wait forever.
    """
    filled = [(bucket.at(now), min(float(amount), float(bucket.limit))) for bucket, amount in wants]
    short = [
        ((amount - bucket.tokens) * 60.0 / bucket.limit, bucket)
        for bucket, amount in filled
        if bucket.tokens < amount
    ]
    if short:
        seconds, bucket = max(short, key=lambda s: s[0])
        return Wait(seconds, bucket.key, bucket.limit)
    return Admit(
        tuple([Bucket(b.key, b.limit, b.tokens - amount, b.updated_at) for b, amount in filled])
    )


# -- the ledger flows --------------------------------------------------------------------------


_LOCK = (
    "INSERT INTO keel_rate_buckets (key, tokens, updated_at) VALUES {rows} "
    "ON CONFLICT (key) DO UPDATE SET tokens = keel_rate_buckets.tokens "
    "RETURNING key, tokens, updated_at"
)
"""Lock every bucket (creating a new one full, at `now`), in key order: their rows."""
_WRITE = (
    "UPDATE keel_rate_buckets SET tokens = v.column2, updated_at = v.column3 "
    "FROM (VALUES {rows}) AS v WHERE keel_rate_buckets.key = v.column1"
)
"""Write every bucket's `(key, tokens, updated_at)`."""


def _per_bucket(
    sql: str, rows: Sequence[tuple[str, float, float]]
) -> tuple[str, tuple[str | float, ...]]:
    """`sql` for `rows` (one `(?, ?, ?)` each), with their values as its parameters."""
    return _for(sql, len(rows)), tuple(chain.from_iterable(rows))


@lru_cache(maxsize=32)
def _for(sql: str, rows: int) -> str:
    return sql.replace("{rows}", ", ".join(["(?, ?, ?)"] * rows))


def acquire_flow(wants: Sequence[tuple[str, int, float]], now: float) -> Flow[Admit | Wait]:
    """Take `amount` from each `(key, limit, amount)` bucket, or say how long to wait.

    Two statements whatever the number of buckets: one locks them all (an upsert, which
    creates a new bucket full and locks the rows in key order, so concurrent acquisitions
    cannot deadlock), one writes what an admitted call took.
    """
    wants = sorted(wants)
    full = [(key, float(limit), now) for key, limit, _ in wants]
    rows = (yield _per_bucket(_LOCK, full)) if wants else []
    found = {key: (float(tokens), float(updated_at)) for key, tokens, updated_at in rows}
    buckets = [(Bucket(key, limit, *found[key]), amount) for key, limit, amount in wants]
    decision = take_tokens(buckets, now)
    if isinstance(decision, Admit) and decision.buckets:
        yield _per_bucket(_WRITE, [(b.key, b.tokens, b.updated_at) for b in decision.buckets])
    return decision


_REFUND = (
    "INSERT INTO keel_rate_buckets (key, tokens, updated_at) VALUES (?, ?, ?) "
    "ON CONFLICT (key) DO UPDATE SET tokens = {least}(?, {least}(?, keel_rate_buckets.tokens "
    "+ {greatest}(0, ? - keel_rate_buckets.updated_at) * ? / 60.0) + ?), "
    "updated_at = {greatest}(?, keel_rate_buckets.updated_at)"
)
"""`Bucket.at(now)` plus `amount`, capped at the limit, in one statement that reads nothing back
(a row that is gone is created full first): on PostgreSQL it waits for no round trip."""


def settle_flow(refunds: Sequence[tuple[str, int, float]], now: float) -> Flow[None]:
    """Give `amount` back to each `(key, limit, amount)` bucket (negative: take more)."""
    for key, limit, amount in sorted(refunds):
        full = float(limit)
        yield _REFUND, (key, min(full, full + amount), now, full, full, now, full, amount, now)


# -- the limiter: one decision engine, two thin drivers ----------------------------------------


@dataclass(frozen=True, slots=True)
class Permit:
    """An admitted call: what it took, so `RateLimiter.settle` can correct the TPM estimate."""

    tpm: tuple[tuple[str, int, float], ...]
    """`(bucket key, limit, tokens taken)` per TPM bucket the estimate was taken from."""
    tokens: int
    """The call's token estimate."""
    waited: float
    """Seconds the call waited for room."""


@dataclass(slots=True)
class _Acquisition:
    """The decisions of one `acquire`: what to take, and after each `Wait`, sleep or give up."""

    wants: list[tuple[str, int, float]]
    max_wait: dict[str, float]
    tokens: int
    clock: Callable[[], float]
    started: float

    def flow(self) -> Flow[Admit | Wait]:
        return acquire_flow(self.wants, self.clock())

    def next(self, decision: Admit | Wait) -> Permit | float:
        """The permit, or the seconds to sleep before trying again; raises past `max_wait`."""
        waited = self.clock() - self.started
        if isinstance(decision, Admit):
            tpm = tuple(
                (b.key, b.limit, min(float(self.tokens), float(b.limit)))
                for b in decision.buckets
                if b.key.startswith("tpm:")
            )
            return Permit(tpm, self.tokens, waited)
        if waited + decision.seconds > self.max_wait[decision.key]:
            raise RateLimited(decision.key, decision.limit, decision.seconds, waited=waited)
        return decision.seconds + _SLACK


class RateLimiter:
    """Holds model calls to RPM / TPM limits shared by every process on the same ledger.

    Call `acquire` (or `await aacquire`) right before each model request; it returns at once
    when there is room, sleeps while a bucket refills (up to the limit's `max_wait`), or raises
    `RateLimited`. After the request, `settle` the permit with the real token usage.

    Example:
        ```python
        limiter = RateLimiter(ledger, [RateLimit(rpm=500, tpm=200_000)])
        permit = limiter.acquire("gpt-4o", tenant="acme", tokens=1_200)
        ...  # the request
        limiter.settle(permit, used=980)
        ```
    """

    def __init__(
        self,
        ledger: Ledger,
        limits: Sequence[RateLimit],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(ledger, Ledger):
            raise UserError(f"RateLimiter needs a keel.Ledger, got {type(ledger).__name__}.")
        self.ledger = ledger
        self.limits = tuple(limits)
        for i, limit in enumerate(self.limits):
            if not isinstance(limit, RateLimit):
                raise UserError(
                    f"RateLimiter limits[{i}] must be a RateLimit(rpm=..., tpm=...), got {limit!r}."
                )
        scopes = [(limit.scope, limit.model) for limit in self.limits]
        if len(set(scopes)) != len(scopes):
            raise UserError(
                "RateLimiter has two limits with the same scope and model glob; they would "
                "share buckets. Merge them into one RateLimit(rpm=..., tpm=...)."
            )
        self._clock = clock

    def _start(self, model: str, tenant: str, tokens: int) -> _Acquisition:
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise UserError(f"RateLimiter tokens must be an int ≥ 0, got {tokens!r}.")
        wants: list[tuple[str, int, float]] = []
        max_wait: dict[str, float] = {}
        for limit in self.limits:
            if limit.applies_to(model):
                for key, cap, kind in limit.bucket_keys(model, tenant):
                    wants.append((key, cap, 1.0 if kind == "rpm" else float(tokens)))
                    max_wait[key] = float(limit.max_wait)
        return _Acquisition(wants, max_wait, tokens, self._clock, self._clock())

    def acquire(self, model: str, tenant: str = "default", tokens: int = 0) -> Permit:
        """Take room for one request of about `tokens` tokens to `model` for `tenant`.

        Raises:
            RateLimited: some bucket has no room within its limit's `max_wait`.
        """
        return drive(self.acquiring(model, tenant, tokens))

    async def aacquire(self, model: str, tenant: str = "default", tokens: int = 0) -> Permit:
        """Take room for one request to `model` for `tenant` (async); see `acquire`."""
        return await adrive(self.acquiring(model, tenant, tokens))

    def acquiring(self, model: str, tenant: str, tokens: int) -> Steps[Permit]:
        """`acquire` as `keel._drive` steps: take room in the ledger, or wait and try again."""
        attempt = self._start(model, tenant, tokens)
        if not attempt.wants:
            return Permit((), tokens, 0.0)
        taken = yield both(self.ledger.run, self.ledger.arun, attempt.flow())
        return (yield from self._admitted(attempt, taken))

    def acquiring_after(
        self, first: Flow[T], go_on: Callable[[T], bool], model: str, tenant: str, tokens: int
    ) -> Steps[tuple[T, Permit | RateLimited | None]]:
        """`first`, then `acquiring`'s first try, in one transaction (one commit, not two).

        `first` is what the caller writes just before (a call's spend reservation). When
        `go_on(its result)` is false nothing is taken (`None`). A bucket without room waits and
        tries again alone, as `acquiring` does; past its `max_wait` the `RateLimited` is
        returned, not raised: `first` committed, and the caller undoes it.
        """
        attempt = self._start(model, tenant, tokens)

        def opening() -> Flow[tuple[T, Admit | Wait | None]]:
            head = yield from first
            if not go_on(head) or not attempt.wants:
                return head, None
            return head, (yield from attempt.flow())

        head, taken = yield both(self.ledger.run, self.ledger.arun, opening())
        if not go_on(head):
            return head, None
        if taken is None:
            return head, Permit((), tokens, 0.0)
        try:
            return head, (yield from self._admitted(attempt, taken))
        except RateLimited as refused:
            return head, refused

    def _admitted(self, attempt: _Acquisition, taken: Admit | Wait) -> Steps[Permit]:
        """After a try that `taken` answered: the permit, or sleep and try again (may raise)."""
        while True:
            step = attempt.next(taken)
            if isinstance(step, Permit):
                return step
            yield sleep(step)
            taken = yield both(self.ledger.run, self.ledger.arun, attempt.flow())

    def _refunds(self, permit: Permit, used: int) -> list[tuple[str, int, float]]:
        if isinstance(used, bool) or not isinstance(used, int) or used < 0:
            raise UserError(f"RateLimiter.settle(used=...) must be an int ≥ 0, got {used!r}.")
        return [(key, limit, taken - used) for key, limit, taken in permit.tpm if taken != used]

    def settle(self, permit: Permit, used: int) -> None:
        """Correct the TPM buckets from the estimate to the `used` tokens (0: the call failed).

        Inside a `Ledger.batch()` scope (a keel node) it commits with the scope's next write.
        """
        refunds = self._refunds(permit, used)
        if refunds:
            self.ledger.defer(settle_flow(refunds, self._clock()))

    async def asettle(self, permit: Permit, used: int) -> None:
        """Correct the TPM buckets from the estimate to the `used` tokens (async)."""
        refunds = self._refunds(permit, used)
        if refunds:
            await self.ledger.adefer(settle_flow(refunds, self._clock()))
