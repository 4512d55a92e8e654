"""Per-user and per-tenant budgets per period (day / calendar month), kept in the ledger.

Before each model call keel *reserves* an estimate (the messages' tokens at their bound, a token
per UTF-8 byte, and the bound tools' schemas, plus a reserve for the answer, priced by the price
table) against every period budget of the run's user and tenant, in one transaction that locks
the budget rows; after the call it *settles*: the reservation is replaced by what the call
really cost (`usage_metadata`). The answer is capped at the reserve
(`keel.guards.model_call.capped`), so a call cannot cost more than it reserved, and concurrent
runs of one user never spend more than the budget, whatever the interleaving. A process that
dies between the two leaves a reservation behind. One that names its run (the run holds its
thread's lease in the same ledger: `keel.guards.holders`) is charged at its amount, as a timed-out
call is (the provider may have billed it), and stops holding room as soon as a crowded call sees
that lease expired or its holder gone (`RoomWait`, `charge_flow`): its row then counts as spent,
whatever its expiry; if the run was alive after all, its settle deletes it and records what the
call cost. A run without a lease names its process (`keel.guards.holders.unleased`), charged so
once that process is seen gone from this host. Any other expires after `reservation_ttl`.

A call that would fit what the period has spent, but not with what other calls hold in flight
(a reservation bounds a call's cost and settles far lower), waits instead of being refused:
it asks the ledger again, in a new locked transaction each time, until it fits, the budget is
spent (refused then), `wait_for_reservations` seconds have passed, or the run's `wall_seconds` limit
is reached (`RoomWait`): every model call of a run passes that deadline (`GuardedModel.deadline`).
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any, Literal

from langchain_core.messages import BaseMessage
from langchain_core.utils.function_calling import convert_to_openai_tool

from keel._drive import Op, Steps, both, sleep
from keel.approvals import json_text
from keel.db.ledger import Flow, Ledger, returning, together
from keel.errors import UserError
from keel.guards import holders
from keel.pricing import PriceTable, finite_number, is_count, unpriced
from keel.redact import sanitized_logger
from keel.state import RunContext

__all__ = [
    "Crowded",
    "PeriodBudget",
    "Reservation",
    "RoomWait",
    "SpendMeter",
    "estimate_schema_tokens",
    "estimate_tokens",
    "schema_sizes",
    "input_token_bound",
    "token_sizes",
]


@dataclass(frozen=True, kw_only=True, slots=True)
class PeriodBudget:
    """A budget per user or per tenant per period, shared by all their runs."""

    scope: Literal["user", "tenant"] = "user"
    """Whose spend: the run's user (within its tenant), or the whole tenant."""
    period: Literal["day", "month"] = "month"
    """The period the budget renews: UTC calendar day or calendar month."""
    usd: float | None = None
    """US dollars per period; `None` disables it."""
    tokens: int | None = None
    """Tokens (input + output) per period; `None` disables it."""
    reserve_output_tokens: int = 1024
    """Output tokens reserved for each call's answer until its real usage is known. It is also
    the most each answer may be long: keel caps the model's output at it (`max_tokens`), so it
    is 1 or more."""
    reservation_ttl: float = 900.0
    """Seconds a reservation holds if its run never settles it (the process died). One that
    names its run (by the run's thread lease) is charged at its amount and stops holding room
    sooner: once a call it crowds sees that lease expired or its process gone (`RoomWait`); so
    is one of a run without a lease once its process is seen gone from this host."""
    wait_for_reservations: float = 30.0
    """Seconds a call waits, at most, while it fits what the period has spent but not with what
    other calls hold in flight: their reservations settle at what the calls really cost, far
    less. It asks the ledger again (50 ms, then twice as long each time up to 0.5 s, and at once
    when a call of this process settles) until it fits, the budget is spent (refused then), or
    this much time has passed. 0 refuses it at once."""

    def __post_init__(self) -> None:
        if self.scope not in ("user", "tenant"):
            raise UserError(f"PeriodBudget.scope must be 'user' or 'tenant', got {self.scope!r}.")
        if self.period not in ("day", "month"):
            raise UserError(f"PeriodBudget.period must be 'day' or 'month', got {self.period!r}.")
        if self.usd is None and self.tokens is None:
            raise UserError("PeriodBudget needs a limit: set usd=… and/or tokens=….")
        usd, tokens, reserve = self.usd, self.tokens, self.reserve_output_tokens
        if usd is not None and ((number := finite_number(usd)) is None or number <= 0):
            raise UserError(
                f"PeriodBudget.usd must be a finite number greater than 0 (e.g. usd=50), "
                f"or None; got {usd!r}."
            )
        if tokens is not None and (not is_count(tokens) or tokens <= 0):
            raise UserError(
                f"PeriodBudget.tokens is a count: a whole number greater than 0 "
                f"(e.g. tokens=1_000_000), or None; got {tokens!r}."
            )
        if not is_count(reserve) or reserve <= 0:
            # 0 would cap every answer at nothing: max_tokens=0, refused by OpenAI and Anthropic
            raise UserError(
                f"PeriodBudget.reserve_output_tokens is a count: a whole number greater than 0 "
                f"(e.g. 1024), the longest answer a call may give; got {reserve!r}."
            )
        if (ttl := finite_number(self.reservation_ttl)) is None or ttl <= 0:
            raise UserError(
                f"PeriodBudget.reservation_ttl must be a finite number of seconds greater than 0 "
                f"(e.g. 900); got {self.reservation_ttl!r}."
            )
        wait = self.wait_for_reservations
        if (seconds := finite_number(wait)) is None or seconds < 0:
            raise UserError(
                f"PeriodBudget.wait_for_reservations must be a finite number of seconds, 0 or "
                f"more (e.g. 30; 0 refuses at once); got {wait!r}."
            )

    def key(self, context: RunContext, now: float) -> tuple[str, str]:
        """The ledger row of this budget for `context` at `now`: `(scope key, period)`."""
        when = datetime.fromtimestamp(now, UTC)
        period = when.strftime("%Y-%m-%d" if self.period == "day" else "%Y-%m")
        who = f"user:{context.key()}" if self.scope == "user" else f"tenant:{context.tenant_id}"
        return who, period

    def label(self) -> str:
        """`user monthly` / `tenant daily`."""
        return f"{self.scope} {'daily' if self.period == 'day' else 'monthly'}"


@dataclass(frozen=True, slots=True)
class Reservation:
    """What a model call holds against its period budgets until it settles."""

    rows: tuple[tuple[str, str, str], ...]
    """`(reservation id, scope key, period)` per budget."""
    usd: float
    tokens: int


class Crowded(str):
    """Why a call may not run *yet*: it fits what its period has spent, not with what it holds.

    Other calls' reservations in flight hold the room; they settle at what the calls cost, far
    less, so the call may wait (`wait` seconds at most: the least `wait_for_reservations` of
    the budgets that held it back) and ask again. A `str`, so a caller that does not wait
    refuses it.
    """

    wait: float
    keys: tuple[tuple[str, str], ...]
    """The budget rows `(scope key, period)` whose reservations in flight held it back."""

    def __new__(  # noqa: D102
        cls, why: str, wait: float, keys: tuple[tuple[str, str], ...] = ()
    ) -> Crowded:
        crowded = super().__new__(cls, why)
        crowded.wait, crowded.keys = wait, keys
        return crowded


MEDIA_TOKENS = 4096
"""The least input tokens a reservation holds for an image, audio or file block: a block that
names its media by URL or id is a few characters, but a provider bills the image (OpenAI's
gpt-4o up to 1,445 tokens an image, its gpt-4.1-nano 3,779, Anthropic's about 1,600)."""
MEDIA = frozenset(
    (
        "image",
        "image_url",
        "input_image",
        "audio",
        "input_audio",
        "file",
        "input_file",
        "document",
        "video",
    )
)
"""Content block types that carry media, as LangChain, OpenAI and Anthropic name them."""


def estimate_tokens(messages: Sequence[BaseMessage]) -> int:
    """A generous estimate of a request's input tokens: about 4 characters a token."""
    return _sizes(messages, estimate=True, bound=False)[0]


def input_token_bound(messages: Sequence[BaseMessage]) -> int:
    """The most input tokens a request's messages can be billed: one per UTF-8 byte of text.

    A byte-level tokenizer (OpenAI's, Llama's, Qwen's) never makes more tokens than its text
    has bytes, while 4 characters a token (`estimate_tokens`) is an average that a user's text
    beats by about 4x (one token per digit or emoji). A reservation holds this bound, so a call
    cannot cost more input than it reserved. Content blocks that are not text (an image) count
    as `estimate_tokens` counts them, and each media block (`MEDIA`) at least `MEDIA_TOKENS`;
    tool-call arguments as the JSON a provider is sent.
    """
    return _sizes(messages, estimate=False, bound=True)[1]


def token_sizes(messages: Sequence[BaseMessage]) -> tuple[int, int]:
    """`(estimate_tokens(messages), input_token_bound(messages))`, the messages walked once.

    For a call that both passes rate limits (the estimate) and reserves (the bound).
    """
    return _sizes(messages, estimate=True, bound=True)


def _sizes(messages: Sequence[BaseMessage], *, estimate: bool, bound: bool) -> tuple[int, int]:
    """The one walk of `estimate_tokens` and `input_token_bound`, each skipping the other's work.

    On every model call's path: a plain loop, no generator per message.
    """
    chars = size = 0
    for m in messages:
        content = m.content
        shown = len(str(content))
        chars += shown
        if bound:
            text = m.text
            size += len(text.encode("utf-8", "surrogatepass"))
            if not isinstance(content, str):  # an image block: as the estimate counts it,
                media = sum(isinstance(b, dict) and b.get("type") in MEDIA for b in content)
                size += max(max(shown - len(text), 0) // 4, MEDIA_TOKENS * media)  # or more
        for tc in getattr(m, "tool_calls", ()):
            args, name = tc.get("args"), tc["name"]
            if estimate:
                chars += len(str(args)) + len(name)
            if bound:  # the JSON a provider is sent
                size += len(json_text(args))
                size += len(name.encode("utf-8", "surrogatepass"))
    n = len(messages)  # each message's framing: 16 characters (4 tokens) + 4 tokens; 20 bytes
    return (chars + 16 * n) // 4 + 4 * n + 16, size + 20 * n + 16


TOOLS_PROMPT_TOKENS = 600
"""Input tokens a provider adds to a request with tools, beyond their JSON: the tool-use system
prompt (Anthropic documents up to 530 tokens for it)."""


def estimate_schema_tokens(schemas: Sequence[Any]) -> int:
    """A generous estimate of the tokens bound tools or a structured-output schema add.

    Providers send each tool's JSON schema with every request and bill it as input.
    """
    return schema_sizes(schemas)[0]


def schema_sizes(schemas: Sequence[Any]) -> tuple[int, int]:
    """`(estimate, bound)` of the input tokens bound tools or a structured-output schema add.

    The estimate (about 4 characters a token) is what rate limits count; the bound, what a
    reservation holds: a token per byte of the JSON a provider is sent (ASCII-escaped, so at
    least its UTF-8 bytes), 20 a schema for its framing, and `TOOLS_PROMPT_TOKENS`. Serialised
    once per tool set (a `GuardedModel` keeps both), not on every call.
    """
    if not schemas:
        return 0, 0
    text = json.dumps([convert_to_openai_tool(s) for s in schemas], default=str)
    n = len(schemas)
    return len(text) // 4 + 8 * n, len(text) + 20 * n + TOOLS_PROMPT_TOKENS


def reserve_flow(
    budgets: Sequence[PeriodBudget],
    context: RunContext,
    usd: float,
    tokens: int,
    now: float,
    holder: str | None = None,
) -> Flow[Reservation | str]:
    """Check every budget and, if all allow it, reserve `usd` / `tokens` against each.

    Returns the `Reservation`, or why the call may not run: a `Crowded` reason when it would fit
    once other calls' reservations settle (and its budgets wait for that), a plain `str` when
    the budget is spent. Rows are locked in key order, so concurrent reservations cannot
    deadlock; nothing is reserved unless every budget has room. `holder`: the run that holds
    the reservation, by its thread lease (`keel.guards.holders.of_thread`) or its process.
    """
    keyed = sorted(((b.key(context, now), b) for b in budgets), key=lambda kb: kb[0])
    crowded: list[tuple[str, float, tuple[str, str]]] = []
    for (scope_key, period), budget in keyed:
        spend, held = yield from together(
            (  # the row, created if new, locked; then what is held against it
                "INSERT INTO keel_spend (scope_key, period) VALUES (?, ?) "
                "ON CONFLICT (scope_key, period) DO UPDATE SET spent_usd = keel_spend.spent_usd "
                "RETURNING spent_usd, spent_tokens",
                (scope_key, period),
            ),
            _reserved(scope_key, period, now),
        )
        ((spent_usd, spent_tokens),) = spend
        (held_usd, held_tokens), (charged_usd, charged_tokens) = _sums(held)
        spent_usd, spent_tokens = spent_usd + charged_usd, spent_tokens + charged_tokens
        for unit, limit, spent, others, this in (
            ("usd", budget.usd, spent_usd, held_usd, usd),
            ("tokens", budget.tokens, spent_tokens, held_tokens, tokens),
        ):
            if limit is None or spent + others + this <= limit:
                continue
            shown = f"{limit:g}" if unit == "usd" else str(limit)
            numbers = (
                f"(spent={spent:.6g}, reserved={others:.6g}, this call≈{this:.6g})"
                if unit == "usd"
                else f"(spent={spent}, reserved={others}, this call≈{this})"
            )
            why = f"Exceeded the {budget.label()} {unit} budget of {shown} {numbers}"
            if spent + this > limit:  # spent: no reservation settling makes room
                return why
            crowded.append((why, budget.wait_for_reservations, (scope_key, period)))
    if crowded:  # it fits what is spent: room comes as the calls in flight settle
        why, wait, _ = min(crowded, key=lambda c: c[1])
        return Crowded(why, wait, tuple(c[2] for c in crowded)) if wait > 0 else why
    rows = []
    for (scope_key, period), budget in keyed:
        rid = uuid.uuid4().hex
        yield (
            "INSERT INTO keel_reservations "
            "(id, scope_key, period, usd, tokens, expires_at, holder) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (rid, scope_key, period, usd, tokens, now + budget.reservation_ttl, holder),
        )
        rows.append((rid, scope_key, period))
    return Reservation(tuple(rows), usd, tokens)


def settle_flow(reservation: Reservation, usd: float | None, tokens: int | None) -> Flow[None]:
    """Replace a reservation by what the call cost; `None` releases it (the call failed).

    A reservation charged meanwhile (`charge_flow`: its run looked dead) counted as spent at its
    amount while its row lasted: deleting it takes that back, so the period counts the call
    once, at what it cost.
    """
    for rid, scope_key, period in sorted(reservation.rows, key=lambda r: (r[1], r[2])):
        yield "DELETE FROM keel_reservations WHERE id = ?", (rid,)
        if usd is None:
            continue
        # Settle even when the reservation expired meanwhile (no row deleted): the call happened.
        yield (
            "UPDATE keel_spend SET spent_usd = spent_usd + ?, spent_tokens = spent_tokens + ? "
            "WHERE scope_key = ? AND period = ?",
            (usd, tokens or 0, scope_key, period),
        )


def dead_flow(keys: Sequence[tuple[str, str]], now: float) -> Flow[list[str]]:
    """The ids of the reservations against `keys` whose runs look dead (`held_flow`, `dead_of`).

    Reads `/proc` as it tells: on an event loop, run `held_flow` and `dead_of` apart (`RoomWait`).
    """
    return dead_of((yield from held_flow(keys, now)))


def held_flow(keys: Sequence[tuple[str, str]], now: float) -> Flow[list[tuple[str, str, bool]]]:
    """The uncharged reservations against `keys` in flight that name their run (`holder`).

    Each as `(id, holder, leased)`: `leased` says whether a lease of that holder in
    `keel_thread_leases` is unexpired (for `dead_of`).
    """
    held: list[tuple[str, str, bool]] = []
    for scope_key, period in keys:
        rows = yield (
            "SELECT r.id, r.holder, EXISTS (SELECT 1 FROM keel_thread_leases l "
            "WHERE l.holder = r.holder AND l.expires_at > ?) FROM keel_reservations r "
            "WHERE r.scope_key = ? AND r.period = ? AND r.expires_at > ? AND r.charged = 0 "
            "AND r.holder IS NOT NULL",
            (now, scope_key, period, now),
        )
        held += [(str(r[0]), str(r[1]), bool(r[2])) for r in rows]
    return held


def dead_of(held: Sequence[tuple[str, str, bool]]) -> list[str]:
    """The ids of the reservations of `held_flow` whose runs look dead.

    A run that held its thread's lease: no lease of it is unexpired (its process died, or it
    ended without settling: a ledger that failed), or its holder is gone
    (`keel.guards.holders.gone`: a process of this host that is no more). A run without a lease
    (`keel.guards.holders.unleased`): its process is gone from this host, or its PID taken by a
    later process (`keel.guards.holders.dead`); elsewhere that cannot be told. One that names
    no run holds until it expires. Reads `/proc`: not on an event loop.
    """
    return [
        rid
        for rid, holder, leased in held
        if (
            holders.dead(holder)
            if holders.is_unleased(holder)
            else not leased or holders.gone(holder)
        )
    ]


def charge_flow(rid: str) -> Flow[bool]:
    """Charge a dead run's reservation at its amount: it no longer holds room, it is spent.

    As a timed-out call is charged (the provider may have billed it): the row stays, counted as
    spent (`reserve_flow`, `spent_flow`) whatever its expiry, until its run settles it (if the
    run was alive after all: `settle_flow`). Whether it was charged now (not settled or charged
    meanwhile).
    """
    rows = yield (
        "UPDATE keel_reservations SET charged = 1 WHERE id = ? AND charged = 0 RETURNING id",
        (rid,),
    )
    return bool(rows)


def spent_flow(budget: PeriodBudget, context: RunContext, now: float) -> Flow[tuple[float, int]]:
    """What the budget's row has spent so far: `(usd, tokens)`, its charged reservations too."""
    scope_key, period = budget.key(context, now)
    rows, held = yield from together(
        (
            "SELECT spent_usd, spent_tokens FROM keel_spend WHERE scope_key = ? AND period = ?",
            (scope_key, period),
        ),
        _reserved(scope_key, period, now),
    )
    usd, tokens = (float(rows[0][0]), int(rows[0][1])) if rows else (0.0, 0)
    _, (charged_usd, charged_tokens) = _sums(held)
    return usd + charged_usd, tokens + charged_tokens


def _reserved(scope_key: str, period: str, now: float) -> tuple[str, tuple[Any, ...]]:
    """The statement summing a budget row's reservations, per `charged` (read with `_sums`).

    Those in flight (unexpired, not charged) hold room; charged ones (`charge_flow`: their run
    looked dead) count as spent, however old, until their run settles them.
    """
    return (
        "SELECT charged, COALESCE(SUM(usd), 0), COALESCE(SUM(tokens), 0) FROM keel_reservations "
        "WHERE scope_key = ? AND period = ? AND (expires_at > ? OR charged = 1) "
        "GROUP BY charged",
        (scope_key, period, now),
    )


def _sums(rows: Sequence[Sequence[Any]]) -> tuple[tuple[float, int], tuple[float, int]]:
    """`(usd, tokens)` held in flight, and charged, from the rows of `_reserved`."""
    sums = {bool(c): (float(u), int(t)) for c, u, t in rows}
    return sums.get(False, (0.0, 0)), sums.get(True, (0.0, 0))


class SpendMeter:
    """Reserves and settles model calls against period budgets (used inside `call_model`)."""

    def __init__(
        self, ledger: Ledger, budgets: Sequence[PeriodBudget], prices: PriceTable | None = None
    ) -> None:
        if not isinstance(ledger, Ledger):
            raise UserError(f"SpendMeter needs a keel.Ledger, got {type(ledger).__name__}.")
        self.ledger = ledger
        self.budgets = tuple(budgets)
        self.prices = prices or PriceTable()
        self.output_reserve = max(b.reserve_output_tokens for b in self.budgets)
        """Output tokens reserved per call, and the cap on each answer (`max_tokens`)."""
        usd = [f"the {b.label()} usd budget of {b.usd:g}" for b in self.budgets if b.usd]
        self.usd_limit = " and ".join(usd) or None
        """The dollar limits of these budgets, in words (`None` without one)."""

    def unpriced(self, model_name: str) -> str | None:
        """Why calls of `model_name` may not be reserved: a dollar budget and no price for it.

        A model the price table does not know would reserve, and settle, $0.
        """
        if self.usd_limit is None or self.prices.price_of(model_name) is not None:
            return None
        return unpriced(model_name, self.usd_limit)

    def _estimate(
        self, messages: Sequence[BaseMessage], model_name: str, schema_tokens: int = 0
    ) -> tuple[float, int]:
        return self._cost(input_token_bound(messages) + schema_tokens, model_name)

    def _cost(
        self, input_tokens: int, model_name: str, output_tokens: int | None = None
    ) -> tuple[float, int]:
        output = max(self.output_reserve, output_tokens or 0)
        usage = {"input_tokens": input_tokens, "output_tokens": output}
        return self.prices.cost(model_name, usage), input_tokens + output

    def reserving(
        self,
        messages: Sequence[BaseMessage],
        context: RunContext,
        model_name: str,
        *,
        schema_tokens: int = 0,
        output_tokens: int | None = None,
        holder: str | None = None,
    ) -> Op:
        """Reserve the call's estimate, or say why it may not run, as a `keel._drive` step.

        The step's result is a `Reservation`, or the reason (a `str`) the call may not run.
        `schema_tokens`: what the bound tools' schemas add at most (`schema_sizes`' bound);
        `output_tokens`: the answer's reserve when above `output_reserve` (a model known to
        answer past it); `holder`: the run that holds it (`reserve_flow`).
        """

        def flow() -> Flow[Reservation | str]:
            return self.reserve(
                messages,
                context,
                model_name,
                schema_tokens=schema_tokens,
                output_tokens=output_tokens,
                holder=holder,
            )

        return Op(lambda: self.ledger.run(flow()), lambda: self.ledger.arun(flow()))

    def reserve(
        self,
        messages: Sequence[BaseMessage],
        context: RunContext,
        model_name: str,
        *,
        schema_tokens: int = 0,
        output_tokens: int | None = None,
        holder: str | None = None,
    ) -> Flow[Reservation | str]:
        """The ledger flow `reserving` runs: a `Reservation`, or why the call may not run.

        For a caller that commits it with more (a `ModelGuard`'s first try at the rate limits).
        """
        tokens = input_token_bound(messages) + schema_tokens
        return self.reserve_input(
            tokens, context, model_name, output_tokens=output_tokens, holder=holder
        )

    def reserve_input(
        self,
        input_tokens: int,
        context: RunContext,
        model_name: str,
        *,
        output_tokens: int | None = None,
        holder: str | None = None,
    ) -> Flow[Reservation | str]:
        """`reserve` for a caller that has estimated the input tokens (messages and schemas).

        Under a dollar budget, a model the price table does not know is refused (the reason,
        not a reservation): its calls cannot be held to the budget.
        """
        refused = self.unpriced(model_name)
        if refused is not None:
            return returning(refused)
        usd, tokens = self._cost(input_tokens, model_name, output_tokens)
        return reserve_flow(self.budgets, context, usd, tokens, time.time(), holder)

    def settle(self, reservation: Reservation, usd: float | None, tokens: int | None) -> None:
        """Record the call's real cost (or release the reservation with `usd=None`).

        It commits now (a failure ends the run as a storage error, the call counted), with the
        records deferred before it (the call's rate refund and breaker success).
        """
        try:
            self.ledger.run(settle_flow(reservation, usd, tokens))
        finally:
            _settled(self.ledger)

    async def asettle(
        self, reservation: Reservation, usd: float | None, tokens: int | None
    ) -> None:
        """Record the call's real cost (or release the reservation with `usd=None`), async."""
        try:
            await self.ledger.arun(settle_flow(reservation, usd, tokens))
        finally:
            _settled(self.ledger)

    def spent(self, budget: PeriodBudget, context: RunContext) -> tuple[float, int]:
        """`(usd, tokens)` spent in the current period of `budget` for `context`."""
        return self.ledger.run(spent_flow(budget, context, time.time()))


log = sanitized_logger(__name__)

_POLL_S = 0.05
"""Seconds a crowded call waits before it first asks the ledger again (as admission's queue)."""
_POLL_MAX_S = 0.5
"""The longest wait between two asks (the wait doubles from `_POLL_S`): room a call of another
process makes is seen within this much; room one of this process makes, at once."""
_TICK_S = 0.01
"""How often a crowded call looks, in memory, whether a call of this process settled."""
_REAP_S = 1.0
"""How often, at most, a crowded call looks for reservations of dead runs (`dead_flow`)."""

_SETTLES: weakref.WeakKeyDictionary[Ledger, int] = weakref.WeakKeyDictionary()
_SETTLES_LOCK = threading.Lock()


def _settled(ledger: Ledger) -> None:
    """Count a settle (or release) in `ledger`: this process's crowded calls ask at once."""
    with _SETTLES_LOCK:
        _SETTLES[ledger] = _SETTLES.get(ledger, 0) + 1


class RoomWait:
    """One model call's wait for room in its period budgets (`wait_for_reservations`).

    The caller tries to reserve; while the answer is `Crowded` it yields from `waiting`, which
    sleeps until it is time to ask again (`None`), or says why the call is refused: the wait
    is over. Nothing is held while it waits, and each ask is a new locked transaction, so the
    budget holds whatever the interleaving. `until`: a wall-clock time (`time.time()`) the
    wait must not pass, the run's own `wall_seconds` limit.

    Before it sleeps (at most every `_REAP_S`) it charges the reservations that held it back
    whose runs look dead (`dead_flow`, `charge_flow`), and asks again at once if it did: a
    crashed run's reservation then counts as spent, so the call fits or is refused now instead
    of waiting out the wait and the reservation's `reservation_ttl`.
    """

    def __init__(self, ledger: Ledger, until: float | None = None) -> None:
        self.ledger = ledger
        self.started = time.monotonic()
        self.cutoff = (
            self.started + max(until - time.time(), 0.0) if until is not None else math.inf
        )
        """The run's deadline on the monotonic clock (`inf`: none)."""
        self.interval = _POLL_S
        self.seen = _SETTLES.get(ledger, 0)
        self.reaped_at = -math.inf

    def waiting(self, crowded: Crowded) -> Steps[str | None]:
        """Sleep until the next ask (`None`), or the refusal once the wait is over."""
        now = time.monotonic()
        deadline = min(self.started + crowded.wait, self.cutoff)
        if now >= deadline:
            return self._refusal(crowded, now)
        if now - self.reaped_at >= _REAP_S:
            self.reaped_at = now
            if (yield from self._reaped(crowded.keys)):
                return None  # a dead run's reservation is spent now: ask again at once
        ask_at = now + self.interval
        while now < deadline and now < ask_at and _SETTLES.get(self.ledger, 0) == self.seen:
            yield sleep(min(_TICK_S, deadline - now, ask_at - now))
            now = time.monotonic()
        self.seen = _SETTLES.get(self.ledger, 0)
        self.interval = min(self.interval * 2, _POLL_MAX_S)
        return None

    def _reaped(self, keys: Sequence[tuple[str, str]]) -> Steps[int]:
        """Charge the dead runs' reservations against `keys`; how many.

        A ledger that fails here is logged: the call waits on, as it did before.
        """
        ledger, charged = self.ledger, 0
        try:
            held = yield both(ledger.run, ledger.arun, held_flow(keys, time.time()))
            dead = yield Op(partial(dead_of, held), partial(asyncio.to_thread, dead_of, held))
            for row in dead:  # each in a transaction of its own
                charged += yield both(ledger.run, ledger.arun, charge_flow(row))
        except Exception as exc:
            log.warning("keel could not look for reservations of dead runs: %r", exc)
        if charged:
            log.warning(
                "charged %d period budget reservation(s) of runs that look dead (their thread "
                "lease expired, or their process is gone) at their amounts",
                charged,
            )
        return charged

    def _refusal(self, crowded: Crowded, now: float) -> str:
        waited = now - self.started
        if self.cutoff < self.started + crowded.wait:
            until = "until the run's wall_seconds limit"
        else:
            until = f"wait_for_reservations={crowded.wait:g} s"
        return (
            f"{crowded}: the call fits what was spent, not with what other calls hold in flight; "
            f"it waited {waited:.3g} s ({until}) for their reservations to settle. Raise the "
            "budget, lower reserve_output_tokens (every call in flight holds its answer's "
            "reserve), or raise wait_for_reservations"
        )
