"""Run budgets: one pure decision over the run's usage, used before model calls and tools.

`check_budget(budget, usage, ...)` returns a `BudgetVerdict`: within budget, near it (soft
threshold: a warning), or over it (the run stops as `budget_exceeded` with the limit and the
numbers). The node-side adapters (`budget_check`, `tool_budget_check`) are thin.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from keel.guards.policy import Budget

__all__ = ["BudgetVerdict", "check_budget"]


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


def _fmt(value: float) -> str:
    return f"{value:g}" if float(value).is_integer() else f"{value:.6g}"
