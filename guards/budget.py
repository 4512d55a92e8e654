"""Run budgets: one pure decision over the run's usage, used before model calls and tools.

`check_budget(budget, usage, ...)` returns a `BudgetVerdict`: within budget, near it (soft
threshold: a warning), or over it (the run stops as `budget_exceeded` with the limit and the
numbers). The node-side adapters (`budget_check`, `tool_budget_check`) are thin.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, ToolMessage

from keel.errors import UserError
from keel.guards.policy import Budget
from keel.pricing import PriceTable, token_count, unpriced
from keel.redact import sanitized_logger
from keel.state import Usage, add_usage, task_start

log = sanitized_logger("keel.guards")

__all__ = [
    "BudgetVerdict",
    "OuterBudget",
    "check_budget",
    "holding_outer",
    "outer_budgets",
    "outer_exceeded",
    "run_messages",
    "usage_from_messages",
    "usage_of",
    "wall_deadline",
]

RAN = frozenset({"success", "timeout", "error"})
"""keel tool statuses of calls that ran (the others never did: denied, rejected, …)."""


@dataclass(frozen=True, slots=True)
class BudgetVerdict:
    """The budget's answer for the next step."""

    exceeded: str | None = None
    """Why the run must stop (`Exceeded the usd limit of 0.5 (usd=0.51)`), or None."""
    warnings: tuple[str, ...] = field(default=())
    """Limits past the soft threshold (`usd at 84% of 0.5`)."""


def _spent(usage: Mapping[str, Any], started_at: float | None, now: float) -> dict[str, float]:
    spent = {
        k: float(usage.get(k, 0) or 0)
        for k in ("steps", "model_calls", "tool_calls", "input_tokens", "output_tokens", "usd")
    }
    spent["wall_seconds"] = now - started_at if started_at is not None else 0.0
    return spent


def check_budget(
    budget: Budget,
    usage: Mapping[str, Any],
    *,
    started_at: float | None = None,
    now: float | None = None,
    planned_tool_calls: int = 0,
) -> BudgetVerdict:
    """Decide whether the run may take its next step.

    A limit is exceeded when the amount spent has reached it (for tool calls: when the calls
    about to run would pass it). Exact message: `Exceeded the <limit> limit of <L> (<limit>=<v>)`.
    """
    spent = _spent(usage, started_at, time.time() if now is None else now)
    warnings = []
    for name, limit in budget.limits().items():
        value = spent[name] + (planned_tool_calls if name == "tool_calls" else 0)
        over = value > limit if name == "tool_calls" else value >= limit
        if over:
            shown = _fmt(value)
            return BudgetVerdict(
                exceeded=f"Exceeded the {name} limit of {_fmt(limit)} ({name}={shown})"
            )
        if value >= budget.soft_ratio * limit:
            warnings.append(f"{name} at {value / limit:.0%} of {_fmt(limit)}")
    return BudgetVerdict(warnings=tuple(warnings))


@dataclass(frozen=True, slots=True)
class OuterBudget:
    """A run budget held by the run that called this one (a supervisor's, over its agent).

    `spent`: what the outer run had spent when it handed over; `started_at`: its clock.
    """

    budget: Budget
    spent: Mapping[str, Any]
    started_at: float | None
    holder: str

    def counting(self, usage: Mapping[str, Any]) -> Usage:
        """What counts against this budget once the inner run has spent `usage`."""
        return add_usage(dict(self.spent), dict(usage))  # type: ignore[arg-type]


_OUTER: ContextVar[tuple[OuterBudget, ...]] = ContextVar("keel_outer_budgets", default=())
"""The outer runs' budgets in force in this context (set by code, never by a caller)."""


@contextmanager
def holding_outer(outer: OuterBudget) -> Iterator[None]:
    """Hold the runs started inside (a supervisor's agent) to `outer` as well as their own."""
    token = _OUTER.set((*_OUTER.get(), outer))
    try:
        yield
    finally:
        _OUTER.reset(token)


def outer_budgets() -> tuple[OuterBudget, ...]:
    """The outer runs' budgets this run is held to (innermost last); none for a run of its own."""
    return _OUTER.get()


def wall_deadline(budget: Budget | None, started_at: float | None) -> float | None:
    """When (`time.time()`) the run's `wall_seconds` limit, or an outer run's, is reached.

    `None` without one. A wait inside a step (a model call's wait for period-budget room) stops
    there, so the run ends no later than its limit says.
    """
    held = [(budget, started_at), *((o.budget, o.started_at) for o in outer_budgets())]
    ends = [
        start + b.wall_seconds
        for b, start in held
        if b is not None and b.wall_seconds is not None and start is not None
    ]
    return min(ends, default=None)


def outer_exceeded(usage: Mapping[str, Any], *, planned_tool_calls: int = 0) -> str | None:
    """Why an outer run's budget stops this run, which has spent `usage`, or None.

    Each outer budget counts what its run spent before it handed over plus `usage`.
    """
    for outer in outer_budgets():
        total = outer.counting(usage)
        verdict = check_budget(
            outer.budget, total, started_at=outer.started_at, planned_tool_calls=planned_tool_calls
        )
        if verdict.exceeded is not None:
            return f"{verdict.exceeded}: the run budget of {outer.holder}"
    return None


def _fmt(value: float) -> str:
    return f"{value:g}" if float(value).is_integer() else f"{value:.6g}"


def usage_of(
    response: AIMessage,
    table: PriceTable,
    default_name: str,
    input_estimate: int = 0,
    *,
    usd_limit: str | None = None,
) -> Usage:
    """One model call's usage: tokens and dollars from its `usage_metadata`.

    A response without `usage_metadata` (a provider that does not report it) is counted as
    estimated, so token and dollar budgets still bite: `input_estimate` input tokens (the
    caller's estimate of the request) and about one output token per 4 characters of the
    answer and its tool calls. keel warns once per model. So is a count that is not a count
    (negative, `None`, missing, text that is not digits): it never lowers the spend.

    The call is priced by the name the provider reported (`response_metadata["model_name"]`),
    else, when the table does not know that name (a dated or routed name), by `default_name`,
    the model keel called. With `usd_limit` (what dollar limit is in force, for the message),
    a call neither name prices raises `UserError`: it cannot count as $0 against that limit.
    """
    metadata = response.response_metadata
    reported = str(metadata.get("model_name") or "") or None
    name = reported or default_name
    price_name = next(
        (
            n
            for n in (reported, metadata.get("keel_priced_as"), default_name)
            if isinstance(n, str) and n and table.price_of(n) is not None
        ),
        None,
    )
    if price_name is None and usd_limit is not None:
        raise UserError(unpriced(default_name, usd_limit, reported=reported))
    given: object = response.usage_metadata
    meta: Mapping[str, Any] | None = given if isinstance(given, Mapping) else None
    tokens_in = token_count(meta.get("input_tokens")) if meta else None
    tokens_out = token_count(meta.get("output_tokens")) if meta else None
    if tokens_in is None or tokens_out is None:
        guess = _estimated(response, name, input_estimate, reported=bool(given))
        tokens_in = guess["input_tokens"] if tokens_in is None else tokens_in
        tokens_out = guess["output_tokens"] if tokens_out is None else tokens_out
    counted = {"input_tokens": tokens_in, "output_tokens": tokens_out}
    return {
        "input_tokens": tokens_in,
        "output_tokens": tokens_out,
        "usd": table.cost(price_name or name, counted),
        "model_calls": 1,
        "steps": 1,
    }


def _estimated(
    response: AIMessage, name: str, input_estimate: int, *, reported: bool = False
) -> dict[str, int]:
    if (name, reported) not in _UNREPORTED:
        _UNREPORTED.add((name, reported))
        if reported:
            log.warning(
                "model %r reported usage_metadata keel cannot count (a token count that is "
                "negative, missing, None or not a number): keel counts an estimate (about 4 "
                "characters a token) against budgets in its place.",
                name,
            )
        else:
            log.warning(
                "model %r reported no usage_metadata: keel counts an estimate (about 4 "
                "characters a token) against budgets, and a period budget's reservation, the "
                "most a call can cost, in its place. Turn usage reporting on in the model's "
                "client (e.g. stream_usage=True) for exact counts.",
                name,
            )
    calls = sum(len(str(tc.get("args"))) + len(tc["name"]) for tc in response.tool_calls)
    output = (len(response.text) + calls) // 4 + 1
    return {"input_tokens": input_estimate, "output_tokens": output}


_UNREPORTED: set[tuple[str, bool]] = set()
"""Models keel has warned about for reporting no usage, or unusable usage (once each per
process)."""


def run_messages(messages: Sequence[BaseMessage]) -> Sequence[BaseMessage]:
    """The current run's messages: from the user message that started it (`task_start`) on.

    All of them without one. A run budget counts these; earlier runs on the thread have their own.
    """
    return messages[max(task_start(messages), 0) :]


def usage_from_messages(
    messages: Sequence[BaseMessage],
    table: PriceTable,
    default_name: str = "unknown",
    *,
    usd_limit: str | None = None,
) -> Usage:
    """A conversation's usage, read back from its messages (for agents without keel's state).

    Each AI message counts as a model call with its `usage_metadata` (priced as `usage_of`
    does: by its reported model name, else `default_name`; with `usd_limit`, a message neither
    prices raises `UserError`); each tool message of a call that ran counts as a tool call,
    and each round of tool results as a step.
    """
    total: Usage = {}
    after_ai = False
    for m in messages:
        if isinstance(m, AIMessage):
            total = add_usage(total, usage_of(m, table, default_name, usd_limit=usd_limit))
            after_ai = True
        elif (
            isinstance(m, ToolMessage) and m.response_metadata.get("keel_status", "success") in RAN
        ):
            total = add_usage(total, {"tool_calls": 1, "steps": 1 if after_ai else 0})
            after_ai = False
    return total
