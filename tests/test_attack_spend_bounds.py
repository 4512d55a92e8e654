"""Attacks on what a period budget's reservation leaves out: tool schemas, unreported usage,
and a provider that ignores the output cap.

The scripted provider here bills as a byte-level tokenizer bills at most: a token per UTF-8
byte of every message and of the bound tools' JSON (`convert_to_openai_tool`, what it is sent).
Real SQLite and PostgreSQL ledgers; 12 concurrent runs on PostgreSQL against a $1 budget.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.utils.function_calling import convert_to_openai_tool

from keel import Ledger, Price, PriceTable, RunContext, build_agent, tool
from keel.evals import ScriptedChatModel
from keel.guards import PeriodBudget, Policy, SpendMeter

ALICE = RunContext(user_id="alice", tenant_id="acme")
PRICES = PriceTable({"scripted": Price(input_per_mtok=10.0, output_per_mtok=10.0)})
"""$0.40 for 40,000 tokens."""
SKUS = [f"{n:08d}" for n in range(4_400)]


def _find_sku(sku: str) -> str:
    return sku


_find_sku.__doc__ = "Find a product by its SKU, one of: " + " ".join(SKUS)
find_sku = tool(name="find_sku")(_find_sku)
SCHEMA_BYTES = len(json.dumps([convert_to_openai_tool(find_sku)]))
"""What the tool's schema is billed at most (about 40,000 tokens: $0.40)."""


def _bytes(messages: Sequence[BaseMessage]) -> int:
    return sum(len(str(m.content).encode("utf-8", "surrogatepass")) for m in messages)


def _billed(messages: Sequence[BaseMessage], *, tools: bool = True) -> AIMessage:
    size = _bytes(messages) + (SCHEMA_BYTES if tools else 0)
    return AIMessage(
        content="ok",
        usage_metadata={"input_tokens": size, "output_tokens": 1, "total_tokens": size + 1},
    )


def _agent(ledger: Ledger, budget: PeriodBudget, model: ScriptedChatModel, tools: Any) -> Any:
    policy = Policy(period_budgets=(budget,), loop=None)
    return build_agent(model, tools, policy=policy, ledger=ledger, prices=PRICES)


def _spent(ledger: Ledger, budget: PeriodBudget) -> float:
    return SpendMeter(ledger, [budget], PRICES).spent(budget, ALICE)[0]


def test_the_tool_is_as_large_as_the_attack_needs() -> None:
    assert 35_000 < SCHEMA_BYTES < 45_000


# -- 1. the bound tools' schemas ------------------------------------------------------------


def test_sequential_runs_with_a_large_tool_schema_stop_at_the_monthly_budget(
    db_url: str,
) -> None:
    """The schema (billed $0.40 a call) was reserved at 4 characters a token ($0.10): the
    third run went past the budget."""
    ledger = Ledger(db_url)
    budget = PeriodBudget(usd=1.00, reserve_output_tokens=64)
    agent = _agent(ledger, budget, ScriptedChatModel(script=[_billed]), [find_sku])
    reasons = [
        agent.invoke({"messages": [("user", "hi")]}, context=ALICE)["outcome"]["terminated_reason"]
        for _ in range(4)
    ]
    assert _spent(ledger, budget) <= 1.00, reasons
    assert reasons[:2] == ["completed", "completed"] and "budget_exceeded" in reasons
    ledger.close()


@pytest.mark.postgres
async def test_concurrent_runs_with_a_large_tool_schema_never_overspend(
    fresh_postgres_url: str,
) -> None:
    ledger = Ledger(fresh_postgres_url, pool_max_size=10)
    budget = PeriodBudget(usd=1.00, reserve_output_tokens=64)
    agent = _agent(ledger, budget, ScriptedChatModel(script=[_billed]), [find_sku])
    results = await asyncio.gather(
        *(agent.ainvoke({"messages": [("user", f"hi {i}")]}, context=ALICE) for i in range(12))
    )
    reasons = Counter(r["outcome"]["terminated_reason"] for r in results)
    assert set(reasons) <= {"completed", "budget_exceeded"} and reasons["budget_exceeded"] > 0
    spent = _spent(ledger, budget)
    assert spent == pytest.approx(sum(r["usage"].get("usd", 0.0) for r in results))
    assert spent <= 1.00
    await ledger.aclose()
