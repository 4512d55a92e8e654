"""Runs of one user against a period budget, one after another or 12 at once, for the attacks
on the reservation (`test_attack_spend_estimate`, `test_attack_spend_bounds`)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from keel import RunContext


def runs(agent: Any, text: str, context: RunContext, n: int = 4) -> list[str]:
    """How `n` runs one after another, each sent `text`, ended: the first two completed, and
    one at least was refused by the budget."""
    ended = [agent.invoke({"messages": [("user", text)]}, context=context) for _ in range(n)]
    reasons = [r["outcome"]["terminated_reason"] for r in ended]
    assert reasons[:2] == ["completed", "completed"] and "budget_exceeded" in reasons, reasons
    return reasons


async def concurrent_runs(
    agent: Any, text: str, context: RunContext, spent: Callable[[], float]
) -> float:
    """12 runs at once, each sent `text`: each ends with an outcome and some are refused; the
    ledger saw every call once. Returns what the period spent (`spent()`)."""
    results = await asyncio.gather(
        *(
            agent.ainvoke({"messages": [("user", f"{i} {text}")]}, context=context)
            for i in range(12)
        )
    )
    reasons = Counter(r["outcome"]["terminated_reason"] for r in results)
    assert set(reasons) <= {"completed", "budget_exceeded"} and reasons["budget_exceeded"] > 0
    total = spent()
    assert total == pytest.approx(sum(r["usage"].get("usd", 0.0) for r in results))
    return total
