"""A period budget's reservation that a crashed process left behind stops holding room at once.

A model call reserves its most cost before it runs and settles after. A process SIGKILLed
between the two left its reservation for `reservation_ttl` (15 minutes): every call of the
period that it crowded waited `wait_for_reservations` (30 s) and was then refused. Now a
reservation names its run by the run's thread lease (`keel_thread_leases`, renewed while the run
lives); a crowded call that sees that lease expired, or its holder's process gone (this host),
charges the reservation at its amount, as a timed-out call is (the provider may have billed
it), and asks again at once: it fits, or is refused now for what was spent. If the run was alive
after all (a lease its process could not renew in time), its settle counts the difference.

Real SQLite and PostgreSQL, real OS processes (forked with keel imported, `tests/forking.py`)
SIGKILLed mid-call; keel's scripted model is the only double.
"""

from __future__ import annotations

import asyncio
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import eventually
from forking import Forked, ForkServer

from keel import Ledger, Price, PriceTable, RunContext, build_agent
from keel.db.ledger import Flow
from keel.evals import ScriptedChatModel
from keel.guards import PeriodBudget, Policy, Rule, holders
from keel.guards.spend import (
    Reservation,
    charge_flow,
    dead_flow,
    reserve_flow,
    settle_flow,
    spent_flow,
)

ALICE = RunContext(user_id="alice", tenant_id="acme")
WAIT = 10.0
"""The budget's wait for reservations: a run that waits it out took far longer than the fix."""
BUDGET = PeriodBudget(usd=1.0, reserve_output_tokens=600, wait_for_reservations=WAIT)
"""A call reserves about $0.65 (its 600-token answer's reserve at $1000 per 1M tokens): two do
not fit at once, one fits the budget."""
PRICES = PriceTable({"scripted": Price(input_per_mtok=1000.0, output_per_mtok=1000.0)})
ELSEWHERE = "other-host/pid:[4026531836]/4242/run"
"""A holder on another host: whether its process lives cannot be told from here."""

_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from keel import Ledger, Persistence, Price, PriceTable, RunContext
    from keel.evals import ScriptedChatModel
    from keel.graphs import build_agent
    from keel.graphs._one_run import ThreadLeases
    from keel.guards import PeriodBudget, Policy, Rule, holders

    url, lease_s, mode = sys.argv[1:]
    ledger = Ledger(url)
    ledger.setup()
    budget = PeriodBudget(usd=1.0, reserve_output_tokens=600, wait_for_reservations=10.0)
    policy = Policy(rules=(Rule(action="allow"),), period_budgets=(budget,), loop=None)
    prices = PriceTable({"scripted": Price(input_per_mtok=1000.0, output_per_mtok=1000.0)})
    model = ScriptedChatModel(script=["never"], latency=600)  # the call it is killed in
    task = {"messages": [("user", "Slow?")]}
    config = {"configurable": {"thread_id": "crashed"}}
    alice = RunContext(user_id="alice", tenant_id="acme")

    def agent_on(saver):
        agent = build_agent(model, policy=policy, ledger=ledger, prices=prices, checkpointer=saver)
        agent.keel_thread_leases = ThreadLeases(ledger, lease_s=float(lease_s))
        print("READY", flush=True)
        return agent

    async def main():
        async with Persistence(url).acheckpointer() as saver:
            await agent_on(saver).ainvoke(task, config, context=alice)

    if mode == "invoke":
        with Persistence(url).checkpointer() as saver:
            agent_on(saver).invoke(task, config, context=alice)
    elif mode == "no lease":  # no checkpointer: the run takes no thread lease
        agent_on(None).invoke(task, context=alice)
    else:
        asyncio.run(main())
    """
)


def _rows(sql: str, *params: Any) -> Flow[list[tuple[Any, ...]]]:
    rows = yield sql, params
    return [tuple(r) for r in rows]


def _reservations(ledger: Ledger) -> list[tuple[Any, ...]]:
    return ledger.run(_rows("SELECT usd, holder, charged FROM keel_reservations"))


def _spent(ledger: Ledger) -> float:
    return ledger.run(spent_flow(BUDGET, ALICE, time.time()))[0]


@pytest.fixture
def killed() -> Iterator[list[Forked]]:
    started: list[Forked] = []
    yield started
    for proc in started:
        proc.kill()
        proc.wait()


def _crashed_mid_call(
    forks: ForkServer, folder: Path, url: str, lease_s: float, mode: str
) -> Forked:
    """A process whose run holds its thread's lease and a reservation, SIGKILLed in its call."""
    proc = forks.start_code(_SCRIPT, url, str(lease_s), mode, cwd=folder)
    proc.wait_for_line("READY")
    ledger = Ledger(url)
    eventually(lambda: _reservations(ledger) != [], "the process's reservation")
    ledger.close()
    proc.kill()
    assert proc.wait() == -9
    return proc


@pytest.mark.parametrize(
    ("where", "mode"),
    [
        ("this host", "invoke"),
        ("this host", "ainvoke"),
        ("another host", "invoke"),
        ("this host", "no lease"),
    ],
)
async def test_a_killed_processs_reservation_is_charged_not_waited_out(
    db_url: str, forks: ForkServer, tmp_path: Path, killed: list[Forked], where: str, mode: str
) -> None:
    """The run the crash left crowds the next one: it is refused at once for what the dead call
    may have cost (charged at its reservation), not after 10 s of waiting. On this host the
    dead process is seen at once (its PID is gone); on another, once its lease expires. A run
    without a thread lease (`no lease`: no checkpointer) named nothing and held its room for
    `reservation_ttl` (15 min): it names its process, seen gone at once too."""
    lease_s = 600.0 if where == "this host" else 1.5
    killed.append(_crashed_mid_call(forks, tmp_path, db_url, lease_s, mode))
    ledger = Ledger(db_url)
    ((usd, holder, charged),) = _reservations(ledger)
    assert holder is not None and holder.count("/") == 3 and charged == 0  # names its run
    assert holders.is_unleased(holder) == (mode == "no lease")
    if where == "another host":
        for table in ("keel_thread_leases", "keel_reservations"):
            ledger.run(_rows(f"UPDATE {table} SET holder = ? WHERE holder = ?", ELSEWHERE, holder))
    policy = Policy(rules=(Rule(action="allow"),), period_budgets=(BUDGET,), loop=None)
    model = ScriptedChatModel(script=["hi"])
    agent = build_agent(model, policy=policy, ledger=ledger, prices=PRICES)
    task = {"messages": [("user", "Hello?")]}
    started = time.monotonic()
    if mode == "invoke":
        result = await asyncio.to_thread(agent.invoke, task, context=ALICE)
    else:
        result = await agent.ainvoke(task, context=ALICE)
    took = time.monotonic() - started
    detail = result["outcome"]["detail"]
    assert result["outcome"]["terminated_reason"] == "budget_exceeded", result["outcome"]
    assert detail.startswith(f"Exceeded the user monthly usd budget of 1 (spent={usd:.6g}, ")
    assert "waited" not in detail  # refused for what was spent, not after the wait
    assert took < (0 if where == "this host" else lease_s) + 4.0, took
    assert _spent(ledger) == pytest.approx(usd)  # the dead call, at its reservation
    assert [r[2] for r in _reservations(ledger)] == [1]  # charged: it holds no room
    await ledger.aclose()


def _reserved(ledger: Ledger, holder: str | None, usd: float = 0.6) -> Reservation:
    held = ledger.run(reserve_flow([BUDGET], ALICE, usd, 600, time.time(), holder))
    assert isinstance(held, Reservation)
    return held


def _dead(ledger: Ledger) -> list[str]:
    return ledger.run(dead_flow([BUDGET.key(ALICE, time.time())], time.time()))


def _lease(ledger: Ledger, holder: str, expires_in: float) -> None:
    ledger.run(
        _rows(
            "INSERT INTO keel_thread_leases (thread_id, checkpoint_ns, holder, expires_at) "
            "VALUES (?, '', ?, ?)",
            holder,
            holder,
            time.time() + expires_in,
        )
    )


def test_which_reservations_look_dead(db_url: str, forks: ForkServer) -> None:
    """Dead: its run's lease expired, or is gone (released without a settle: the run ended,
    its ledger failing as it settled). Alive: its lease unexpired on another host. Unknown (no
    holder: written before runs without a lease named their process): it holds until
    `reservation_ttl`. A run without a lease names its process: dead once that process is gone
    (a real one, ended), or its PID is another process's (this one's, started later); alive
    while it runs; unknown on another host."""
    ledger = Ledger(db_url)
    ledger.setup()
    expired, released, live = (f"{ELSEWHERE}-{n}" for n in ("expired", "released", "live"))
    _lease(ledger, expired, -1.0)
    _lease(ledger, live, 60.0)
    ended = forks.start_code(
        "from keel.guards import holders; print(holders.unleased(), flush=True)"
    )
    assert ended.finish() == 0
    gone = ended.output()[0].strip()
    this = holders.unleased()
    reused = this.rpartition("@")[0] + "@1"  # this PID, but a process that started at tick 1
    elsewhere = f"{ELSEWHERE.rpartition('/')[0]}/process@1"
    unleased = [gone, this, reused, elsewhere]
    assert all(map(holders.is_unleased, unleased))
    held = (expired, released, live, None, *unleased)
    rows = {h: _reserved(ledger, h, 0.01).rows[0][0] for h in held}
    assert sorted(_dead(ledger)) == sorted(rows[h] for h in (expired, released, gone, reused))
    ledger.close()


@pytest.mark.parametrize("cost", [0.05, None], ids=["settled", "released"])
def test_a_run_alive_after_all_settles_the_difference(db_url: str, cost: float | None) -> None:
    """A run whose lease expired while it lived (its process stalled past the lease) is charged
    its reservation by a crowded call; its settle then counts what the call cost less that, so
    the period counts the call once, at its cost (a failed call released: nothing)."""
    ledger = Ledger(db_url)
    ledger.setup()
    _lease(ledger, ELSEWHERE, -1.0)
    held = _reserved(ledger, ELSEWHERE)
    (rid,) = _dead(ledger)
    assert ledger.run(charge_flow(rid)) is True
    assert ledger.run(charge_flow(rid)) is False  # charged once
    assert _spent(ledger) == pytest.approx(0.6)
    assert _dead(ledger) == []  # charged: no longer held, nor looked at
    crowded = ledger.run(reserve_flow([BUDGET], ALICE, 0.5, 10, time.time()))
    assert "spent=0.6, reserved=0," in crowded  # refused for what is spent, at once
    ledger.run(settle_flow(held, cost, 60 if cost else None))
    assert _spent(ledger) == pytest.approx(cost or 0.0)
    assert _reservations(ledger) == []
    ledger.close()


def test_settles_racing_the_charges_of_their_reservations_count_each_call_once(
    db_url: str,
) -> None:
    """Calls of runs that look dead but live settle while crowded calls charge them, in every
    interleaving: each call counts once, at its cost, and no transaction fails."""
    ledger = Ledger(db_url)
    ledger.setup()
    _lease(ledger, ELSEWHERE, -1.0)
    held = [_reserved(ledger, ELSEWHERE, 0.02) for _ in range(24)]
    costs = [0.001 * (i + 1) for i in range(len(held))]
    gate = threading.Barrier(2 * len(held))

    def settle(i: int) -> None:
        gate.wait()
        ledger.run(settle_flow(held[i], costs[i], 10))

    def charge(i: int) -> None:
        ((rid, _, _),) = held[i].rows
        gate.wait()
        ledger.run(charge_flow(rid))

    with ThreadPoolExecutor(2 * len(held)) as pool:
        done = [pool.submit(f, i) for i in range(len(held)) for f in (settle, charge)]
        for future in done:
            future.result(timeout=60)  # a deadlock raises here
    assert _spent(ledger) == pytest.approx(sum(costs))
    assert _reservations(ledger) == []
    ledger.close()


def test_a_ledger_that_fails_to_tell_dead_runs_leaves_the_wait_as_it_was(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Looking for dead runs' reservations is a shortcut: a ledger that fails at it (here its
    lease table is gone) is logged, and the crowded call waits and is refused as before, the
    run ending with its outcome, not an exception."""
    ledger = Ledger(db_url)
    ledger.setup()
    _lease(ledger, ELSEWHERE, -1.0)
    _reserved(ledger, ELSEWHERE, 0.6)
    ledger.run(_rows("DROP TABLE keel_thread_leases"))
    short = PeriodBudget(usd=1.0, reserve_output_tokens=600, wait_for_reservations=0.3)
    policy = Policy(rules=(Rule(action="allow"),), period_budgets=(short,), loop=None)
    agent = build_agent(
        ScriptedChatModel(script=["hi"]), policy=policy, ledger=ledger, prices=PRICES
    )
    result = agent.invoke({"messages": [("user", "Hello?")]}, context=ALICE)
    assert result["outcome"]["terminated_reason"] == "budget_exceeded", result["outcome"]
    assert "waited 0.3" in result["outcome"]["detail"]
    assert "could not look for reservations of dead runs" in caplog.text
    assert [r[2] for r in _reservations(ledger)] == [0]  # not charged
    ledger.close()
