"""A call held back only by other calls' reservations in flight waits for them to settle.

A reservation bounds a call's cost (a token per byte it sends, plus the answer's cap) and settles
far lower, so under a tight period budget concurrent runs were refused for what others held
while little was spent. `PeriodBudget.wait_for_reservations`: such a call waits (asking the
ledger again, each time in a new locked transaction) until it fits, the budget is spent, or the
wait is over. Real SQLite and PostgreSQL; keel's scripted model is the only double.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from langchain_core.messages import AIMessage
from langchain_core.messages.ai import UsageMetadata

from keel import Ledger, Price, PriceTable, RunContext, UserError, build_agent
from keel.db.ledger import Flow
from keel.evals import ScriptedChatModel, call
from keel.guards import (
    BreakerPolicy,
    Budget,
    PeriodBudget,
    Policy,
    RateLimit,
    Rule,
    SpendMeter,
    spend,
)
from keel.guards.spend import (
    Crowded,
    Reservation,
    RoomWait,
    reserve_flow,
    settle_flow,
    spent_flow,
)
from keel.tools import tool

ALICE = RunContext(user_id="alice", tenant_id="acme")
# $1000 per 1M tokens: a call reserves about $0.9 (its tool schema's bound is most of it) and
# costs about $0.03
PRICES = PriceTable({"scripted": Price(input_per_mtok=1000.0, output_per_mtok=1000.0)})
RUNS = 8


@tool
def echo(x: int) -> str:
    """Echo x."""
    return f"echo {x}"


def _agent(
    ledger: Ledger,
    budget: PeriodBudget,
    run_budget: Budget | None = None,
    *,
    dear: bool = False,
    guarded: bool = False,
) -> Any:
    """An agent of two calls a run; `dear`: each bills $0.63, near what it reserves (~$0.9).

    `guarded`: with a rate limit and a breaker, whose first try shares the reservation's
    transaction (`ModelGuard.admitting`): the other path a reservation takes.
    """
    script: list[Any] = [call("echo", x=1), AIMessage("done")]
    if dear:
        usage = UsageMetadata(input_tokens=600, output_tokens=30, total_tokens=630)
        script = [m.model_copy(update={"usage_metadata": usage}) for m in script]
    model = ScriptedChatModel(script=script, latency=0.05, fresh_ids=True)
    policy = Policy(
        rules=(Rule(action="allow"),),
        period_budgets=(budget,),
        loop=None,
        budget=run_budget,
        rate_limits=(RateLimit(rpm=10_000),) if guarded else (),
        model_breaker=BreakerPolicy() if guarded else None,
    )
    return build_agent(model, [echo], policy=policy, ledger=ledger, prices=PRICES)


def _reservations() -> Flow[list[tuple[Any, ...]]]:
    rows = yield "SELECT id, usd FROM keel_reservations", ()
    return list(rows)


def _stuck(ledger: Ledger, budget: PeriodBudget, usd: float) -> Reservation:
    """A reservation of a call in flight elsewhere that does not settle during the test."""
    held = ledger.run(reserve_flow([budget], ALICE, usd, 100, time.time()))
    assert isinstance(held, Reservation)
    return held


def _task(i: int) -> dict[str, Any]:
    return {"messages": [("user", f"task {i}")]}


def _config(i: int) -> dict[str, Any]:
    return {"configurable": {"thread_id": f"t-{i}-{time.monotonic_ns()}"}}


# -- the flow ---------------------------------------------------------------------------------


def test_a_call_that_fits_what_is_spent_is_crowded_not_refused(db_url: str) -> None:
    ledger, budget, now = Ledger(db_url), PeriodBudget(usd=1.0), time.time()
    held = _stuck(ledger, budget, 0.5)
    crowded = ledger.run(reserve_flow([budget], ALICE, 0.75, 750, now))
    assert isinstance(crowded, Crowded) and crowded.wait == 30.0
    assert crowded == (
        "Exceeded the user monthly usd budget of 1 (spent=0, reserved=0.5, this call≈0.75)"
    )
    assert ledger.run(_reservations()) == [(held.rows[0][0], 0.5)]  # nothing held meanwhile
    ledger.run(settle_flow(held, 0.4, 400))
    # spent: no settling makes room, so a plain refusal (no wait)
    spent = ledger.run(reserve_flow([budget], ALICE, 0.75, 750, now))
    assert (
        spent == "Exceeded the user monthly usd budget of 1 (spent=0.4, reserved=0, this call≈0.75)"
    )
    assert not isinstance(spent, Crowded)
    ledger.close()


def test_a_spent_budget_wins_over_a_crowded_one_and_wait_zero_refuses(db_url: str) -> None:
    ledger = Ledger(db_url)
    tenant = PeriodBudget(scope="tenant", usd=1.0, wait_for_reservations=5)
    user = PeriodBudget(scope="user", tokens=1000)
    now = time.time()
    assert isinstance(ledger.run(reserve_flow([tenant], ALICE, 0.5, 10, now)), Reservation)
    spent = ledger.run(reserve_flow([tenant, user], ALICE, 0.25, 1001, now))
    assert not isinstance(spent, Crowded) and "tokens budget of 1000" in spent
    crowded = ledger.run(reserve_flow([tenant, user], ALICE, 0.75, 10, now))
    assert isinstance(crowded, Crowded) and crowded.wait == 5
    no_wait = PeriodBudget(scope="tenant", usd=1.0, wait_for_reservations=0)
    refused = ledger.run(reserve_flow([no_wait], ALICE, 0.75, 10, now))
    assert isinstance(refused, str) and not isinstance(refused, Crowded)
    ledger.close()


@pytest.mark.parametrize("value", [-1, float("nan"), float("inf"), True, "30"])
def test_wait_for_reservations_is_validated(value: Any) -> None:
    with pytest.raises(UserError, match="wait_for_reservations must be a finite number"):
        PeriodBudget(usd=1, wait_for_reservations=value)


# -- concurrent runs --------------------------------------------------------------------------


def _outcomes(results: list[dict[str, Any]]) -> Counter[str]:
    return Counter(r["outcome"]["terminated_reason"] for r in results)


def _spent(ledger: Ledger, budget: PeriodBudget) -> float:
    return SpendMeter(ledger, [budget], PRICES).spent(budget, ALICE)[0]


def _threads(agent: Any, n: int = RUNS) -> list[dict[str, Any]]:
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda i: agent.invoke(_task(i), _config(i), context=ALICE), range(n)))


async def _tasks(agent: Any, n: int = RUNS) -> list[dict[str, Any]]:
    return list(
        await asyncio.gather(
            *(agent.ainvoke(_task(i), _config(i), context=ALICE) for i in range(n))
        )
    )


@pytest.mark.parametrize("how", ["threads", "tasks", "guarded threads", "guarded tasks"])
async def test_concurrent_runs_wait_for_reservations_and_all_complete(
    db_url: str, how: str
) -> None:
    """Two calls' reservations fill the $2 budget; eight runs of two calls spend about $0.5."""
    ledger = Ledger(db_url)
    budget = PeriodBudget(usd=2.0, reserve_output_tokens=32)
    agent = _agent(ledger, budget, guarded=how.startswith("guarded"))
    if how.endswith("threads"):
        results = await asyncio.to_thread(_threads, agent)
    else:
        results = await _tasks(agent)
    assert _outcomes(results) == {"completed": RUNS}, [r["outcome"] for r in results]
    spent = _spent(ledger, budget)
    assert spent == pytest.approx(sum(r["usage"]["usd"] for r in results))
    assert 0 < spent <= budget.usd
    assert ledger.run(_reservations()) == []
    await ledger.aclose()


@pytest.mark.parametrize("how", ["threads", "tasks"])
async def test_without_the_wait_runs_are_refused_for_what_others_hold(
    db_url: str, how: str
) -> None:
    ledger = Ledger(db_url)
    budget = PeriodBudget(usd=2.0, reserve_output_tokens=32, wait_for_reservations=0)
    agent = _agent(ledger, budget)
    results = await asyncio.to_thread(_threads, agent) if how == "threads" else await _tasks(agent)
    refused = [r["outcome"]["detail"] for r in results if r["outcome"]["status"] == "stopped"]
    assert refused, "the reservations must collide"
    assert all("reserved=0," not in why and "waited" not in why for why in refused)
    assert _spent(ledger, budget) <= budget.usd / 2  # refused while little was spent
    await ledger.aclose()


@pytest.mark.parametrize("how", ["threads", "tasks"])
async def test_waiting_runs_never_overspend_a_budget_they_exhaust(db_url: str, how: str) -> None:
    """Twelve runs want about $15 of a $3 budget, each call billing near its reservation: the
    waits re-check in the locked transaction, so the budget is never passed, and the runs it
    cannot fit are refused once it is spent, not after the wait."""
    ledger = Ledger(db_url)
    budget = PeriodBudget(usd=3.0, reserve_output_tokens=32)
    agent = _agent(ledger, budget, dear=True)
    n = 12
    started = time.monotonic()
    if how == "threads":
        results = await asyncio.to_thread(_threads, agent, n)
    else:
        results = await _tasks(agent, n)
    outcomes = _outcomes(results)
    assert set(outcomes) <= {"completed", "budget_exceeded"} and outcomes["budget_exceeded"]
    refused = [r["outcome"]["detail"] for r in results if r["outcome"]["status"] == "stopped"]
    assert not any("waited" in why for why in refused)  # refused for what was spent
    spent = _spent(ledger, budget)
    assert spent == pytest.approx(sum(r["usage"].get("usd", 0.0) for r in results))
    assert budget.usd - 1.0 < spent <= budget.usd  # spent up to where no call fits
    assert time.monotonic() - started < budget.wait_for_reservations
    assert ledger.run(_reservations()) == []
    await ledger.aclose()


# -- how a wait ends --------------------------------------------------------------------------


def test_a_spent_budget_is_refused_at_once_not_after_the_wait(db_url: str) -> None:
    ledger = Ledger(db_url)
    budget = PeriodBudget(usd=1.0, reserve_output_tokens=32, wait_for_reservations=30)
    ledger.run(settle_flow(_stuck(ledger, budget, 0.5), 0.5, 100))  # $0.5 spent
    started = time.monotonic()
    result = _agent(ledger, budget).invoke(_task(0), _config(0), context=ALICE)
    assert time.monotonic() - started < 5
    assert result["outcome"]["terminated_reason"] == "budget_exceeded"
    assert result["outcome"]["detail"].startswith(
        "Exceeded the user monthly usd budget of 1 (spent=0.5, reserved=0,"
    )
    assert "waited" not in result["outcome"]["detail"]
    ledger.close()


async def test_a_wait_that_times_out_says_why_and_how_to_fix_it(db_url: str) -> None:
    ledger = Ledger(db_url)
    budget = PeriodBudget(usd=1.0, reserve_output_tokens=32, wait_for_reservations=0.3)
    _stuck(ledger, budget, 0.5)
    agent = _agent(ledger, budget)
    for run in (
        lambda: asyncio.to_thread(agent.invoke, _task(0), _config(0), context=ALICE),
        lambda: agent.ainvoke(_task(1), _config(1), context=ALICE),
    ):
        started = time.monotonic()
        result = await run()
        assert 0.3 <= time.monotonic() - started < 5
        detail = result["outcome"]["detail"]
        assert result["outcome"]["terminated_reason"] == "budget_exceeded"
        assert detail.startswith("Exceeded the user monthly usd budget of 1 (spent=0, reserved=0.5")
        assert "waited 0.3" in detail and "(wait_for_reservations=0.3 s)" in detail
        assert "Raise the budget, lower reserve_output_tokens" in detail
        assert "raise wait_for_reservations" in detail
        assert result["usage"].get("model_calls", 0) == 0
    await ledger.aclose()


def test_the_wait_ends_at_the_runs_wall_seconds_limit(db_url: str) -> None:
    ledger = Ledger(db_url)
    budget = PeriodBudget(usd=1.0, reserve_output_tokens=32, wait_for_reservations=30)
    _stuck(ledger, budget, 0.5)
    agent = _agent(ledger, budget, run_budget=Budget(wall_seconds=0.5))
    started = time.monotonic()
    result = agent.invoke(_task(0), _config(0), context=ALICE)
    assert time.monotonic() - started < 5
    assert result["outcome"]["terminated_reason"] == "budget_exceeded"
    assert "(until the run's wall_seconds limit)" in result["outcome"]["detail"]
    ledger.close()


@pytest.mark.parametrize("where", ["elsewhere", "here"])
async def test_a_settle_lets_the_waiting_call_run(
    db_url: str, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A settle of another process is seen at the waiting call's next poll; one of this
    process on the async path (`SpendMeter.asettle`, what a run under `ainvoke` settles with)
    wakes it at once. `here` sets the poll to 6 s: a run woken by its poll would go on about
    6 s after it started waiting, one woken by the settle goes on within a fraction of that."""
    poll = 6.0
    if where == "here":
        monkeypatch.setattr(spend, "_POLL_S", poll)
        monkeypatch.setattr(spend, "_POLL_MAX_S", poll)
    ledger = Ledger(db_url)
    budget = PeriodBudget(usd=1.0, reserve_output_tokens=32)
    stuck = _stuck(ledger, budget, 0.5)
    task = asyncio.ensure_future(
        _agent(ledger, budget).ainvoke(_task(0), _config(0), context=ALICE)
    )
    await asyncio.sleep(0.3)
    assert not task.done()  # waiting for the room $0.5 holds
    settled = time.monotonic()
    if where == "here":
        await SpendMeter(ledger, [budget], PRICES).asettle(stuck, 0.01, 10)
    else:
        await ledger.arun(settle_flow(stuck, 0.01, 10))  # another process's call settles
    result = await asyncio.wait_for(task, poll * 2)
    woke = time.monotonic() - settled
    assert result["outcome"]["terminated_reason"] == "completed"
    if where == "here":
        assert woke < poll / 3, f"the waiting run went on {woke:.2f} s after the settle"
    await ledger.aclose()


@pytest.mark.parametrize("guarded", [False, True], ids=["plain", "guarded"])
async def test_a_cancelled_waiter_holds_no_reservation(db_url: str, guarded: bool) -> None:
    ledger = Ledger(db_url)
    budget = PeriodBudget(usd=1.0, reserve_output_tokens=32)
    stuck = _stuck(ledger, budget, 0.5)
    task = asyncio.ensure_future(
        _agent(ledger, budget, guarded=guarded).ainvoke(_task(0), _config(0), context=ALICE)
    )
    await asyncio.sleep(0.3)
    assert not task.done()  # waiting
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await ledger.arun(_reservations()) == [(stuck.rows[0][0], 0.5)]
    await ledger.aclose()


def test_a_settle_in_this_process_ends_the_pause_at_once(db_url: str) -> None:
    """A waiting call asks again as soon as a call of its process settles, not at its next
    poll (driven step by step: no sleep runs, so no clock decides it)."""
    ledger = Ledger(db_url)
    budget = PeriodBudget(usd=1.0)
    meter = SpendMeter(ledger, [budget], PRICES)
    held = _stuck(ledger, budget, 0.5)
    crowded = ledger.run(reserve_flow([budget], ALICE, 0.75, 750, time.time()))
    assert isinstance(crowded, Crowded)
    wait = RoomWait(ledger)
    wait.interval = 60.0  # the next poll is a minute away
    pause = wait.waiting(crowded)
    next(pause)  # a first tick of the pause (not slept)
    pause.send(None)  # another: nothing settled yet
    meter.settle(held, 0.01, 10)
    with pytest.raises(StopIteration) as asked:
        pause.send(None)
    assert asked.value.value is None  # ask the ledger now
    ledger.close()


@pytest.mark.parametrize("guarded", [False, True], ids=["plain", "guarded"])
async def test_a_run_cancelled_during_its_model_call_gives_the_room_back(
    db_url: str, guarded: bool
) -> None:
    """A run cancelled while its model answers (a served client gone, a run interrupted)
    left its reservation for `reservation_ttl`, 15 minutes: every other call of the period
    waited for it, then was refused. It is charged as reserved (the provider may have billed
    the request, as with a timeout) and the reservation is gone at once."""
    ledger = Ledger(db_url)
    budget = PeriodBudget(usd=1.0, reserve_output_tokens=32)
    model = ScriptedChatModel(script=[AIMessage("done")], latency=30.0, fresh_ids=True)
    policy = Policy(
        rules=(Rule(action="allow"),),
        period_budgets=(budget,),
        loop=None,
        rate_limits=(RateLimit(rpm=10_000),) if guarded else (),
        model_breaker=BreakerPolicy() if guarded else None,
    )
    agent = build_agent(model, [echo], policy=policy, ledger=ledger, prices=PRICES)
    task = asyncio.ensure_future(agent.ainvoke(_task(0), _config(0), context=ALICE))
    for _ in range(500):  # until the call holds its reservation and waits for the model
        if held := await ledger.arun(_reservations()):
            break
        await asyncio.sleep(0.01)
    ((_, usd),) = held
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await ledger.arun(_reservations()) == []
    spent, _ = await ledger.arun(spent_flow(budget, ALICE, time.time()))
    assert spent == pytest.approx(usd)
    await ledger.aclose()
