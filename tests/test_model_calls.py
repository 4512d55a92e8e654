"""Every model call keel makes is counted and guarded: the agent's turns, the planner, the
`verify` judge and the supervisor's router all go through `keel.guards.GuardedModel`.

Each test gives the extra model (judge, planner, router) a price of its own and a scripted
answer that reports `usage_metadata`, then checks its tokens and dollars in the run's `usage`
and in the period budget kept in a real ledger, and that budgets and breakers hold it back.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage

from keel import Ledger, Price, PriceTable, RunContext, build_agent, tool
from keel.evals import ScriptedChatModel, call
from keel.graphs import FINISH, build_supervisor
from keel.guards import (
    BreakerPolicy,
    Budget,
    CircuitBreaker,
    GuardedModel,
    ModelCallGuards,
    PeriodBudget,
    Policy,
    Rule,
    SpendMeter,
)
from keel.guards.spend import estimate_tokens

ALICE = RunContext(user_id="alice", tenant_id="acme")
ALLOW = (Rule(action="allow"),)
# Only the extra model costs money, so the run's dollars are exactly its dollars.
PRICES = PriceTable(
    {
        "scripted": Price(input_per_mtok=0.0, output_per_mtok=0.0),
        "judge-model": Price(input_per_mtok=1000.0, output_per_mtok=2000.0),
        "router-model": Price(input_per_mtok=1000.0, output_per_mtok=2000.0),
        "planner-model": Price(input_per_mtok=1000.0, output_per_mtok=2000.0),
    }
)
MONTHLY = PeriodBudget(usd=100.0, reserve_output_tokens=256)


def _judge(passed: bool = True) -> ScriptedChatModel:
    verdict = {"passed": passed, "reason": "right" if passed else "wrong"}
    return ScriptedChatModel(model_name="judge-model", structured={"JudgeVerdict": verdict})


def _cost(model: ScriptedChatModel, table: PriceTable = PRICES) -> tuple[int, float]:
    """Tokens and dollars of every call `model` answered, from the usage it reported."""
    tokens, usd = 0, 0.0
    for answer in model.answers:
        meta = answer.usage_metadata
        assert meta is not None
        tokens += meta["input_tokens"] + meta["output_tokens"]
        usd += table.cost(model.model_name, meta)
    return tokens, usd


async def _run(agent: Any, mode: str, text: str = "What is the capital of France?") -> Any:
    state = {"messages": [("user", text)]}
    if mode == "ainvoke":
        return await agent.ainvoke(state, context=ALICE)
    return agent.invoke(state, context=ALICE)


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
async def test_the_judges_tokens_and_dollars_are_in_usage_and_the_period_budget(
    tmp_path: Path, mode: str
) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path}/k.db")
    judge = _judge()
    policy = Policy(rules=ALLOW, period_budgets=(MONTHLY,))
    agent = build_agent(
        ScriptedChatModel(script=["Paris."]),
        judge=judge,
        policy=policy,
        ledger=ledger,
        prices=PRICES,
    )
    final = await _run(agent, mode)
    assert final["outcome"]["terminated_reason"] == "completed"
    assert len(judge.calls) == 1
    tokens, usd = _cost(judge)
    assert usd > 0
    usage = final["usage"]
    assert usage["model_calls"] == 2  # the agent's answer and the judge's verdict
    assert usage["usd"] == pytest.approx(usd)
    assert usage["input_tokens"] + usage["output_tokens"] > tokens  # the agent's tokens too
    spent_usd, _ = SpendMeter(ledger, [MONTHLY], PRICES).spent(MONTHLY, ALICE)
    assert spent_usd == pytest.approx(usd)  # the judge's call was reserved and settled
    ledger.close()


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
async def test_the_planners_tokens_and_dollars_are_counted(tmp_path: Path, mode: str) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path}/k.db")
    model = ScriptedChatModel(
        model_name="planner-model", script=["Paris."], structured={"Plan": {"steps": ["answer"]}}
    )
    policy = Policy(rules=ALLOW, period_budgets=(MONTHLY,))
    agent = build_agent(model, plan=True, policy=policy, ledger=ledger, prices=PRICES)
    final = await _run(agent, mode)
    assert final["outcome"]["terminated_reason"] == "completed"
    assert final["usage"]["model_calls"] == 2
    assert final["usage"]["steps"] == 1  # planning is not a step of the agent's loop
    _, usd = _cost(model)
    assert final["usage"]["usd"] == pytest.approx(usd)
    spent_usd, _ = SpendMeter(ledger, [MONTHLY], PRICES).spent(MONTHLY, ALICE)
    assert spent_usd == pytest.approx(usd)
    ledger.close()


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
async def test_the_routers_tokens_and_dollars_are_counted(tmp_path: Path, mode: str) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path}/k.db")

    def route(messages: Sequence[BaseMessage]) -> dict[str, str]:
        done = any(isinstance(m, AIMessage) and m.name == "a" for m in messages)
        return {"agent": FINISH if done else "a", "task": "answer"}

    router = ScriptedChatModel(model_name="router-model", structured={"Route": route})
    sup = build_supervisor(
        {"a": build_agent(ScriptedChatModel(script=["Paris."]), prices=PRICES)},
        router,
        policy=Policy(rules=ALLOW, period_budgets=(MONTHLY,)),
        ledger=ledger,
        prices=PRICES,
    )
    final = await _run(sup, mode)
    assert final["outcome"]["terminated_reason"] == "completed"
    assert len(router.calls) == 2
    _, usd = _cost(router)
    assert usd > 0
    assert final["usage"]["model_calls"] == 3  # two routing decisions and the agent's answer
    assert final["usage"]["usd"] == pytest.approx(usd)
    spent_usd, _ = SpendMeter(ledger, [MONTHLY], PRICES).spent(MONTHLY, ALICE)
    assert spent_usd == pytest.approx(usd)
    ledger.close()


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
async def test_a_run_budget_of_n_model_calls_stops_the_judge_that_would_be_call_n_plus_1(
    mode: str,
) -> None:
    judge = _judge()
    policy = Policy(rules=ALLOW, budget=Budget(model_calls=1))
    agent = build_agent(ScriptedChatModel(script=["Paris."]), judge=judge, policy=policy)
    final = await _run(agent, mode)
    assert judge.calls == [], "the judge would have been the second model call"
    assert final["outcome"]["terminated_reason"] == "budget_exceeded"
    assert final["outcome"]["detail"] == "Exceeded the model_calls limit of 1 (model_calls=1)"
    assert final["usage"]["model_calls"] == 1


def test_a_period_budget_refuses_the_judge_and_the_router(tmp_path: Path) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path}/k.db")
    tiny = PeriodBudget(usd=0.01, reserve_output_tokens=64)  # less than one judge call
    judge = _judge()
    agent = build_agent(
        ScriptedChatModel(script=["Paris."]),
        judge=judge,
        policy=Policy(rules=ALLOW, period_budgets=(tiny,)),
        ledger=ledger,
        prices=PRICES,
    )
    final = agent.invoke({"messages": [("user", "capital of France?")]}, context=ALICE)
    assert judge.calls == []
    assert final["outcome"]["terminated_reason"] == "budget_exceeded"
    assert final["outcome"]["detail"].startswith("Exceeded the user monthly usd budget of 0.01")
    router = ScriptedChatModel(model_name="router-model", structured={"Route": {"agent": "a"}})
    sup = build_supervisor(
        {"a": build_agent(ScriptedChatModel(script=["Paris."]))},
        router,
        policy=Policy(rules=ALLOW, period_budgets=(tiny,)),
        ledger=ledger,
        prices=PRICES,
    )
    final = sup.invoke({"messages": [("user", "capital of France?")]}, context=ALICE)
    assert router.calls == []
    assert final["outcome"]["terminated_reason"] == "budget_exceeded"
    ledger.close()


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
async def test_an_open_breaker_on_the_judges_model_is_respected(tmp_path: Path, mode: str) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path}/k.db")
    breaker = BreakerPolicy(failure_threshold=1, cooldown_seconds=600)
    CircuitBreaker(ledger, breaker).record("model:judge-model", ok=False)  # the judge is down
    judge = _judge()
    agent = build_agent(
        ScriptedChatModel(script=["Paris."]),
        judge=judge,
        max_revisions=0,
        policy=Policy(rules=ALLOW, model_breaker=breaker),
        ledger=ledger,
    )
    final = await _run(agent, mode)
    assert judge.calls == [], "an open breaker fails fast: the judge is not called"
    (verdict,) = final["verdicts"]
    assert verdict["passed"] is False
    assert verdict["reason"].startswith("the judge failed: CircuitOpen: ")
    assert final["outcome"]["terminated_reason"] == "verification_failed"
    assert final["usage"]["model_calls"] == 1
    ledger.close()


# -- item 5: a long answer cannot overspend a period budget --------------------------------------

RACE_PRICES = PriceTable({"scripted": Price(input_per_mtok=1000.0, output_per_mtok=1000.0)})
LONG_ANSWER = "All of it, in detail. " * 400  # about 2,200 tokens, $2.20 uncapped


@tool
def search_catalogue(query: str, region: str = "eu", limit: int = 10) -> str:
    """Search the product catalogue.

    The query may name products, brands, categories, colours, sizes or price ranges; the region
    decides which warehouses and prices apply (eu, us, uk, apac); the limit caps the results.
    Results are ranked by relevance, then stock, then price, and each names its warehouse.
    """
    return f"{limit} results for {query} in {region}"


def _long_answers(ledger: Ledger, budget: PeriodBudget) -> Any:
    model = ScriptedChatModel(
        script=[call("search_catalogue", query="boots"), LONG_ANSWER], bill_tool_schemas=True
    )
    policy = Policy(rules=ALLOW, period_budgets=(budget,), loop=None)
    return build_agent(model, [search_catalogue], policy=policy, ledger=ledger, prices=RACE_PRICES)


def test_a_long_answer_is_capped_at_the_reserve(tmp_path: Path) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path}/k.db")
    budget = PeriodBudget(usd=100.0, reserve_output_tokens=64)
    final = _long_answers(ledger, budget).invoke(
        {"messages": [("user", "tell me all")]}, context=ALICE
    )
    answer = final["messages"][-1]
    assert answer.response_metadata["finish_reason"] == "length"
    assert answer.usage_metadata["output_tokens"] == 64
    assert len(answer.text) < len(LONG_ANSWER)
    ledger.close()


def test_the_estimate_covers_the_bound_tools_schemas_and_the_capped_answer(
    tmp_path: Path,
) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path}/k.db")
    meter = SpendMeter(ledger, [PeriodBudget(usd=100.0, reserve_output_tokens=64)], RACE_PRICES)
    model = ScriptedChatModel(script=[LONG_ANSWER], bill_tool_schemas=True)
    guarded = GuardedModel(
        [model], tools=[search_catalogue], guards=ModelCallGuards(meter=meter, prices=RACE_PRICES)
    )
    asked = [HumanMessage("tell me all")]
    got = guarded.invoke(asked, None, ALICE)
    billed = got.usage["input_tokens"] + got.usage["output_tokens"]
    assert got.usage["input_tokens"] > estimate_tokens(asked), "the schemas are billed as input"
    usd, tokens = meter._estimate(asked, "scripted", guarded.schema_bound)
    assert billed <= tokens and got.usage["usd"] <= usd  # reserved covers what was billed
    ledger.close()


@pytest.mark.postgres
async def test_fifty_concurrent_runs_with_long_answers_never_overspend(
    fresh_postgres_url: str,
) -> None:
    ledger = Ledger(fresh_postgres_url, pool_max_size=10)
    budget = PeriodBudget(usd=1.00, reserve_output_tokens=64)
    agent = _long_answers(ledger, budget)
    results = await asyncio.gather(
        *(agent.ainvoke({"messages": [("user", f"task {i}")]}, context=ALICE) for i in range(50))
    )
    reasons = Counter(r["outcome"]["terminated_reason"] for r in results)
    assert set(reasons) <= {"completed", "budget_exceeded"}
    assert reasons["budget_exceeded"] > 0, "the budget must have bitten"
    spent_usd, _ = SpendMeter(ledger, [budget], RACE_PRICES).spent(budget, ALICE)
    run_usd = sum(r["usage"].get("usd", 0.0) for r in results)
    assert spent_usd == pytest.approx(run_usd)  # the ledger saw every call, once
    assert spent_usd <= 1.00
    await ledger.aclose()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"policy": "strict"},
            "build_supervisor(policy=...) must be a keel.guards.Policy (e.g. "
            "Policy.from_file('policy.toml')), got str.",
        ),
        (
            {"policy": Policy(rules=ALLOW), "ledger": "sqlite:///k.db"},
            "build_supervisor(ledger=...) must be a keel.Ledger (e.g. Ledger(url)), got str.",
        ),
        (
            {"policy": Policy(name="p", rules=ALLOW, period_budgets=(MONTHLY,))},
            "Policy 'p@1' has period_budgets, which are kept in the ledger: pass "
            "build_supervisor(..., ledger=keel.Ledger(url)) with the URL of your database.",
        ),
    ],
)
def test_a_supervisors_bad_policy_or_ledger_says_what_to_fix(
    kwargs: dict[str, Any], message: str
) -> None:
    from keel import UserError

    agents = {"a": build_agent(ScriptedChatModel(script=["hi"]))}
    with pytest.raises(UserError) as caught:
        build_supervisor(agents, ScriptedChatModel(), **kwargs)
    assert str(caught.value) == message
