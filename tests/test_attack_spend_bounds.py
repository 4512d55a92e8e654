"""Attacks on what a period budget's reservation leaves out: tool schemas, unreported usage,
and a provider that ignores the output cap.

The scripted provider here bills as a byte-level tokenizer bills at most: a token per UTF-8
byte of every message and of the bound tools' JSON (`convert_to_openai_tool`, what it is sent).
Real SQLite and PostgreSQL ledgers; 12 concurrent runs on PostgreSQL against a $1 budget.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import pytest
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.utils.function_calling import convert_to_openai_tool
from spend_runs import concurrent_runs, runs

from keel import Ledger, Price, PriceTable, RunContext, RunLog, build_agent, tool
from keel.evals import ScriptedChatModel, call
from keel.guards import PeriodBudget, Policy, Rule, SpendMeter
from keel.guards.spend import input_token_bound

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
    reasons = runs(agent, "hi", ALICE)
    assert _spent(ledger, budget) <= 1.00, reasons
    ledger.close()


@pytest.mark.postgres
async def test_concurrent_runs_with_a_large_tool_schema_never_overspend(
    fresh_postgres_url: str,
) -> None:
    ledger = Ledger(fresh_postgres_url, pool_max_size=10)
    budget = PeriodBudget(usd=1.00, reserve_output_tokens=64)
    agent = _agent(ledger, budget, ScriptedChatModel(script=[_billed]), [find_sku])
    assert await concurrent_runs(agent, "hi", ALICE, lambda: _spent(ledger, budget)) <= 1.00
    await ledger.aclose()


# -- 2. a model that reports no usage ------------------------------------------------------

DIGITS = "".join(str(n % 7) for n in range(40_000))
"""A user's message a byte-level tokenizer bills as 40,000 tokens ($0.40); 4 characters a
token estimates it at 10,000 ($0.10)."""


def _unreported(messages: Sequence[BaseMessage]) -> AIMessage:
    return AIMessage(content="ok")


def _billed_usd(model: ScriptedChatModel) -> float:
    """What the provider billed for every call it answered: a token per byte, one out."""
    return sum(
        PRICES.cost("scripted", {"input_tokens": _bytes(asked), "output_tokens": 1})
        for asked in model.calls
    )


def test_sequential_runs_without_usage_stop_at_the_monthly_budget(db_url: str) -> None:
    """Counted at the estimate ($0.10 of each $0.40 call), every run went by: $1.60 billed."""
    ledger = Ledger(db_url)
    budget = PeriodBudget(usd=1.00, reserve_output_tokens=64)
    model = ScriptedChatModel(script=[_unreported], report_usage=False)
    reasons = runs(_agent(ledger, budget, model, []), DIGITS, ALICE)
    assert _billed_usd(model) <= _spent(ledger, budget) <= 1.00, reasons
    ledger.close()


def test_a_run_without_usage_says_it_was_counted_at_its_reservation(db_url: str) -> None:
    ledger = Ledger(db_url)
    budget = PeriodBudget(usd=1.00, reserve_output_tokens=64)
    model = ScriptedChatModel(script=[_unreported], report_usage=False)
    result = _agent(ledger, budget, model, []).invoke({"messages": [("user", "hi")]}, context=ALICE)
    said = (
        "scripted reported no token usage: its calls count at their period budget "
        "reservations, the most they can cost"
    )
    assert result["warnings"] == [said]
    assert said in RunLog(ledger).query()[0].detail  # the run record: "(degraded: ...)"
    assert result["usage"]["usd"] == pytest.approx(_spent(ledger, budget))
    ledger.close()


@pytest.mark.postgres
async def test_concurrent_runs_without_usage_never_overspend(fresh_postgres_url: str) -> None:
    ledger = Ledger(fresh_postgres_url, pool_max_size=10)
    budget = PeriodBudget(usd=1.00, reserve_output_tokens=64)
    model = ScriptedChatModel(script=[_unreported], report_usage=False)
    spent = await concurrent_runs(
        _agent(ledger, budget, model, []), DIGITS, ALICE, lambda: _spent(ledger, budget)
    )
    assert _billed_usd(model) <= spent <= 1.00
    await ledger.aclose()


# -- 3. a provider that ignores the output cap ---------------------------------------------

LONG = 40_000
"""Output tokens each answer bills ($0.40), where the cap it was sent is 64."""


def _long(messages: Sequence[BaseMessage]) -> AIMessage:
    answer = call("echo", x=1) if len(messages) < 3 else AIMessage(content="done")
    answer.usage_metadata = {"input_tokens": 1, "output_tokens": LONG, "total_tokens": LONG + 1}
    return answer


@tool
def echo(x: int) -> str:
    """Echo x."""
    return str(x)


def _uncapped(ledger: Ledger, budget: PeriodBudget) -> Any:
    model = ScriptedChatModel(script=[_long, _long], ignores_max_tokens=True)
    policy = Policy(rules=(Rule(action="allow"),), period_budgets=(budget,), loop=None)
    return build_agent(model, [echo], policy=policy, ledger=ledger, prices=PRICES)


def test_a_provider_past_the_cap_is_reserved_what_it_billed_then_runs_stop(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The first call reserves about $0.01 and bills $0.40; later calls of the model reserve
    the 40,000 output tokens it billed, so the third ($0.80 spent) is refused, not run: the
    period stays within its budget (reserving 64 tokens, the third call took it to $1.20). A
    refused run ends with an outcome, no exception."""
    ledger = Ledger(db_url)
    budget = PeriodBudget(usd=1.00, reserve_output_tokens=64)
    agent = _uncapped(ledger, budget)
    ended = [agent.invoke({"messages": [("user", "go")]}, context=ALICE) for _ in range(3)]
    assert [r["outcome"]["terminated_reason"] for r in ended] == [
        "completed",
        "budget_exceeded",
        "budget_exceeded",
    ]
    assert [r["usage"].get("model_calls", 0) for r in ended] == [2, 0, 0]
    assert ended[0]["warnings"] == [
        "scripted answered past reserve_output_tokens=64: a period budget can be exceeded by "
        "what its calls bill past their reservations"
    ]
    assert _spent(ledger, budget) == pytest.approx(0.8, abs=0.001)
    warned = [r.getMessage() for r in caplog.records if "past the 64" in r.getMessage()]
    assert warned == [
        "scripted answered 40000 output tokens, past the 64 its period budget reserved (its "
        "output cap is ignored or missing): a period can be exceeded by what calls under way "
        "bill past their reservations"
    ]
    ledger.close()


@pytest.mark.postgres
async def test_concurrent_runs_past_the_cap_overspend_by_the_calls_in_flight(
    fresh_postgres_url: str,
) -> None:
    """README's bound: the budget, plus what each call under way at the limit bills past its
    reservation (here 12 calls of $0.40: $4.80 at most); then every call is refused."""
    ledger = Ledger(fresh_postgres_url, pool_max_size=10)
    budget = PeriodBudget(usd=1.00, reserve_output_tokens=64)
    agent = _uncapped(ledger, budget)
    spent = await concurrent_runs(agent, "go", ALICE, lambda: _spent(ledger, budget))
    assert 1.00 < spent <= 1.00 + 12 * 0.40 + 0.001
    late = await agent.ainvoke({"messages": [("user", "more")]}, context=ALICE)
    assert late["outcome"]["terminated_reason"] == "budget_exceeded"
    assert late["usage"].get("model_calls", 0) == 0
    await ledger.aclose()


# -- 4. images ------------------------------------------------------------------------------

IMAGE_TOKENS = 1_445
"""What OpenAI bills an image at most on gpt-4o (high detail: 85 + 170 a tile, 8 tiles)."""
PHOTOS = [
    {"type": "text", "text": "Which of these is damaged?"},
    *({"type": "image_url", "image_url": {"url": f"https://shop.test/{i}.jpg"}} for i in range(10)),
]
"""Ten images by URL: a few characters each, billed $0.0145 each ($0.1445 a call)."""


def _sees_images(messages: Sequence[BaseMessage]) -> AIMessage:
    images = sum(
        isinstance(b, dict) and b.get("type") == "image_url"
        for m in messages
        if isinstance(m.content, list)
        for b in m.content
    )
    size = sum(len(m.text.encode("utf-8")) for m in messages) + IMAGE_TOKENS * images
    return AIMessage(
        content="ok",
        usage_metadata={"input_tokens": size, "output_tokens": 1, "total_tokens": size + 1},
    )


def _photos(ledger: Ledger, budget: PeriodBudget) -> Any:
    return _agent(ledger, budget, ScriptedChatModel(script=[_sees_images]), [])


def test_sequential_runs_with_images_by_url_stop_at_the_monthly_budget(db_url: str) -> None:
    """Ten images by URL were reserved at 4 characters a token (about 100 tokens): the
    seventh run took the period to $1.01."""
    ledger = Ledger(db_url)
    budget = PeriodBudget(usd=1.00, reserve_output_tokens=64)
    agent = _photos(ledger, budget)
    ended = [agent.invoke({"messages": [("user", PHOTOS)]}, context=ALICE) for _ in range(8)]
    reasons = [r["outcome"]["terminated_reason"] for r in ended]
    assert _spent(ledger, budget) <= 1.00, reasons
    assert reasons[:5] == ["completed"] * 5 and reasons[-1] == "budget_exceeded", reasons
    ledger.close()


@pytest.mark.postgres
async def test_concurrent_runs_with_images_by_url_never_overspend(
    fresh_postgres_url: str,
) -> None:
    ledger = Ledger(fresh_postgres_url, pool_max_size=10)
    budget = PeriodBudget(usd=1.00, reserve_output_tokens=64)
    results = await asyncio.gather(
        *(
            _photos(ledger, budget).ainvoke({"messages": [("user", PHOTOS)]}, context=ALICE)
            for _ in range(12)
        )
    )
    assert _spent(ledger, budget) <= 1.00
    assert {r["outcome"]["terminated_reason"] for r in results} == {"completed", "budget_exceeded"}
    await ledger.aclose()


def test_an_image_by_url_reserves_4096_tokens_and_base64_its_data_at_4_characters() -> None:
    """README: over-reserved, on the safe side (a small budget may refuse a base64 image)."""
    by_url = HumanMessage(content=PHOTOS[:2])
    data = "A" * 400_000  # 300 KB, base64
    inline = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}
    assert 4096 < input_token_bound([by_url]) < 4096 + 100
    assert 100_000 < input_token_bound([HumanMessage(content=[inline])]) < 100_100
