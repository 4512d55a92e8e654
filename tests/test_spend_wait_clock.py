"""Every model call's wait for a period budget's room ends at the run's `wall_seconds` limit.

A call held back only by other calls' reservations in flight waits for them to settle
(`PeriodBudget.wait_for_reservations`, 30 s by default). The agent's own turns stopped that
wait at the run's wall-clock limit; the planner's, the judge's, the supervisor router's and the
injection detector's calls did not: a run of `Budget(wall_seconds=1)` sat out the whole wait,
then ended. Now each of them stops waiting at the run's deadline, and the run ends as
`budget_exceeded` with why, not with an exception. Real SQLite and PostgreSQL; keel's scripted
models are the only doubles.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from langchain_core.messages import AIMessage, BaseMessage

from keel import Ledger, Price, PriceTable, RunContext, build_agent
from keel.evals import ScriptedChatModel
from keel.graphs import FINISH, build_supervisor
from keel.guards import Budget, InputGuardPolicy, ModelDetector, PeriodBudget, Policy, Rule
from keel.guards.spend import Reservation, reserve_flow

ALICE = RunContext(user_id="alice", tenant_id="acme")
WAIT = 10.0
"""The period budgets' wait: the run's one-second limit must end it long before."""
LIMIT = 1.0
"""Seconds of the runs' `wall_seconds` limit."""
SLACK = 4.0
"""What a run may take past its limit on a loaded machine (far below `WAIT`)."""
PRICES = PriceTable(
    {
        "agent-model": Price(input_per_mtok=1.0, output_per_mtok=1.0),
        # a judge's call (its prompt, the verdict schema, the answer's reserve: about 1,000
        # tokens) reserves about $0.4: it fits the $1 budget, not with the $0.9 held elsewhere
        "judge-model": Price(input_per_mtok=400.0, output_per_mtok=400.0),
    }
)
BUDGET = PeriodBudget(usd=1.0, reserve_output_tokens=32, wait_for_reservations=WAIT)


def _crowd(ledger: Ledger, usd: float) -> None:
    """A call of another run in flight, holding `usd` of the budget for the whole test."""
    held = ledger.run(reserve_flow([BUDGET], ALICE, usd, 10, time.time()))
    assert isinstance(held, Reservation)


def _policy(**more: Any) -> Policy:
    return Policy(
        rules=(Rule(action="allow"),),
        period_budgets=(BUDGET,),
        loop=None,
        budget=Budget(wall_seconds=LIMIT),
        **more,
    )


def _model(name: str, **more: Any) -> ScriptedChatModel:
    return ScriptedChatModel(model_name=name, **more)


def _planner(ledger: Ledger) -> Any:
    _crowd(ledger, 0.9999)  # no call fits: the plan, the run's first call, waits
    plan = {"Plan": {"steps": ["answer"]}}
    model = _model("agent-model", script=[AIMessage("done")], structured=plan)
    return build_agent(model, plan=True, policy=_policy(), ledger=ledger, prices=PRICES)


def _judge(ledger: Ledger) -> Any:
    _crowd(ledger, 0.9)  # the agent's cheap turn fits; the dear judge's call waits
    judge = _model("judge-model", structured={"JudgeVerdict": {"passed": True, "reason": "ok"}})
    model = _model("agent-model", script=[AIMessage("done")])
    return build_agent(model, judge=judge, policy=_policy(), ledger=ledger, prices=PRICES)


def _router(ledger: Ledger) -> Any:
    _crowd(ledger, 0.9999)  # the route, the run's first call, waits
    worker = build_agent(_model("agent-model", script=["done"]), name="w")
    router = _model("agent-model", structured={"Route": {"agent": FINISH, "task": "t"}})
    return build_supervisor(
        {"w": worker}, router, policy=_policy(name="sup"), ledger=ledger, prices=PRICES
    )


def _detector(ledger: Ledger) -> Any:
    _crowd(ledger, 0.9999)  # the detector's look at the user's message, the first call, waits
    verdict = {"InjectionVerdict": {"injection": False, "reason": "plain"}}
    detector = ModelDetector(model=_model("judge-model", structured=verdict))
    guard = InputGuardPolicy(detector=detector)
    model = _model("agent-model", script=[AIMessage("done")])
    return build_agent(model, policy=_policy(input_guard=guard), ledger=ledger, prices=PRICES)


def _supervised(ledger: Ledger) -> Any:
    """An agent's planner under a supervisor: the supervisor's wall_seconds holds it."""
    _crowd(ledger, 0.9)  # the cheap route fits; the agent's dear plan waits
    plan = {"Plan": {"steps": ["answer"]}}
    model = _model("judge-model", script=[AIMessage("done")], structured=plan)
    own = Policy(rules=(Rule(action="allow"),), period_budgets=(BUDGET,), loop=None)
    worker = build_agent(model, plan=True, policy=own, ledger=ledger, prices=PRICES, name="w")

    def route(messages: list[BaseMessage]) -> dict[str, str]:  # to the agent, then finish
        answered = any(isinstance(m, AIMessage) and m.name == "w" for m in messages)
        return {"agent": FINISH if answered else "w", "task": "t"}

    return build_supervisor(
        {"w": worker},
        _model("agent-model", structured={"Route": route}),
        policy=_policy(name="sup"),
        ledger=ledger,
        prices=PRICES,
    )


BUILDERS = {
    "planner": _planner,
    "judge": _judge,
    "router": _router,
    "detector": _detector,
    "supervised planner": _supervised,
}


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
@pytest.mark.parametrize("path", list(BUILDERS))
async def test_a_crowded_call_waits_no_longer_than_the_runs_wall_seconds(
    db_url: str, path: str, mode: str
) -> None:
    ledger = Ledger(db_url)
    graph = BUILDERS[path](ledger)
    task = {"messages": [("user", "What is the weather?")]}
    config = {"configurable": {"thread_id": f"{path}-{mode}"}}
    started = time.monotonic()
    if mode == "invoke":
        result = await asyncio.to_thread(graph.invoke, task, config, context=ALICE)
    else:
        result = await graph.ainvoke(task, config, context=ALICE)
    took = time.monotonic() - started
    await ledger.aclose()
    detail = result["outcome"]["detail"]
    assert result["outcome"]["terminated_reason"] == "budget_exceeded", result["outcome"]
    assert "(until the run's wall_seconds limit)" in detail
    assert detail.startswith("Exceeded the user monthly usd budget of 1 (spent=")
    assert LIMIT * 0.5 <= took < LIMIT + SLACK, took  # not the period budget's 10 s wait
