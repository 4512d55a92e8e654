"""Admission control: caps on running and queued runs per tenant and per user, in the ledger.

Each test runs on SQLite and on PostgreSQL (`ledger` fixture). The runs are real agent runs
(scripted model); an admitted run holds its slot inside a tool that waits for the test's signal,
so what is running at once is decided by the test, not by timing.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import psycopg
import pytest
from conftest import Clock
from forking import ForkServer
from langgraph.checkpoint.memory import InMemorySaver

from keel import Ledger, RunContext, UserError, build_agent, tool
from keel.app.report import build_report, render_text
from keel.db.audit import AuditLog
from keel.db.runs import RunLog
from keel.evals import ScriptedChatModel, call
from keel.graphs.agent import Agent
from keel.guards import Admission, AdmissionPolicy, Lease, Policy, Rule, WaitingRoom
from keel.guards import admission as admission_module

TASK = {"messages": [("user", "go")]}


class Gate:
    """A tool that holds its run until the test opens it; counts the runs inside."""

    def __init__(self) -> None:
        self.inside = 0
        self.open = asyncio.Event()

    def tool(self) -> Any:
        @tool
        async def hold() -> str:
            """Hold the run until the test lets it go."""
            self.inside += 1
            await self.open.wait()
            return "held"

        return hold


def agent_for(ledger: Ledger, admission: AdmissionPolicy, gate: Gate) -> Agent:
    return build_agent(
        ScriptedChatModel(script=[call("hold"), "done"]),
        [gate.tool()],
        policy=Policy(rules=(Rule(action="allow", tool="hold"),), admission=admission),
        ledger=ledger,
        checkpointer=InMemorySaver(),
    )


def run(agent: Agent, i: int, user: str | None = None) -> Awaitable[dict[str, Any]]:
    return agent.ainvoke(
        TASK,
        {"configurable": {"thread_id": f"t{i}"}},
        context=RunContext(user_id=user or f"u{i}", tenant_id="acme"),
    )


async def until(check: Callable[[], bool], what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def reasons(results: list[dict[str, Any]]) -> Counter[str]:
    return Counter(r["outcome"]["terminated_reason"] for r in results)


class Renewals:
    """The leases' expiries as a test polls them: renewals seen (each moves them), and whether
    real time has passed the last of the first expiries seen (a slot held after that is held by
    renewals only). What a "longer than its lease" test waits for, instead of a fixed sleep."""

    def __init__(self, first: list[float]) -> None:
        self.seen = [first]

    def enough(self, now: list[float], renewals: int = 3) -> bool:
        """Whether `renewals` renewals were seen (`now`: the expiries read now) and the first
        expiries have passed."""
        if now != self.seen[-1]:
            self.seen.append(now)
        return len(self.seen) > renewals and time.time() > max(self.seen[0])


async def test_fifty_simultaneous_runs_against_a_cap_of_five(ledger: Ledger) -> None:
    gate = Gate()
    agent = agent_for(ledger, AdmissionPolicy(tenant_running=5, retry_after_s=7), gate)
    tasks = [asyncio.create_task(run(agent, i)) for i in range(50)]
    await until(lambda: sum(t.done() for t in tasks) == 45 and gate.inside == 5, "45 refusals")
    admission = Admission(ledger, AdmissionPolicy(tenant_running=5))
    assert await admission.aheld("acme") == {"running": 5, "queued": 0}
    gate.open.set()
    results = list(await asyncio.gather(*tasks))

    assert reasons(results) == {"completed": 5, "overloaded": 45}
    refused = [r for r in results if r["outcome"]["terminated_reason"] == "overloaded"]
    assert all(r["outcome"]["status"] == "stopped" for r in refused)
    assert {r["outcome"]["detail"][-15:] for r in refused} == {"retry after 7 s"}
    assert "tenant 'acme' has 5 run(s) running and 0 queued" in refused[0]["outcome"]["detail"]
    # nothing lost: every run has an outcome, every slot came back
    assert await admission.aheld("acme") == {"running": 0, "queued": 0}
    # a refused run wrote nothing to its thread
    done = {i for i, t in enumerate(tasks) if t.result()["outcome"]["status"] == "success"}
    untouched = next(i for i in range(50) if i not in done)
    state = await agent.aget_state({"configurable": {"thread_id": f"t{untouched}"}})
    assert state.values == {}
    # audited and recorded (keel report counts the run records)
    records = await RunLog(ledger).aquery(tenant="acme")
    assert Counter(r.terminated_reason for r in records) == {"completed": 5, "overloaded": 45}
    report = build_report(records)
    assert report.error_categories == {"overloaded": 45}
    assert "overloaded" in render_text(report)
    audit = [r for r in await AuditLog(ledger).aquery(limit=1000) if r.kind == "admission"]
    assert len(audit) == 45
    assert {(r.decision, r.tenant_id) for r in audit} == {("overloaded", "acme")}


@dataclass
class OneQueued:
    """A tenant capped at one running and one queued run, with both slots taken."""

    gate: Gate
    agent: Any
    admission: Admission
    first: asyncio.Task[dict[str, Any]]
    queued: asyncio.Task[dict[str, Any]]


async def one_running_one_queued(ledger: Ledger) -> OneQueued:
    gate = Gate()
    policy = AdmissionPolicy(tenant_running=1, tenant_queued=1, queue_timeout_s=60)
    agent = agent_for(ledger, policy, gate)
    admission = Admission(ledger, policy)
    first = asyncio.create_task(run(agent, 0))
    await until(lambda: gate.inside == 1, "the first run to hold its slot")
    queued = asyncio.create_task(run(agent, 1))
    await until(lambda: _held(admission) == {"running": 1, "queued": 1}, "the queued run")
    return OneQueued(gate, agent, admission, first, queued)


async def test_the_queue_waits_for_a_slot_and_its_cap_refuses_at_once(ledger: Ledger) -> None:
    taken = await one_running_one_queued(ledger)
    gate, agent, admission = taken.gate, taken.agent, taken.admission
    first, queued = taken.first, taken.queued
    refused = await run(agent, 2)  # the queue is full: refused at once
    assert refused["outcome"]["terminated_reason"] == "overloaded"
    assert not queued.done()
    gate.open.set()
    results = [await first, await queued]
    assert reasons(results) == {"completed": 2}
    assert await admission.aheld("acme") == {"running": 0, "queued": 0}


async def test_a_queued_run_that_waits_too_long_is_refused(ledger: Ledger) -> None:
    gate = Gate()
    policy = AdmissionPolicy(tenant_running=1, tenant_queued=5, queue_timeout_s=0.3)
    agent = agent_for(ledger, policy, gate)
    first = asyncio.create_task(run(agent, 0))
    await until(lambda: gate.inside == 1, "the first run to hold its slot")
    late = await run(agent, 1)
    assert late["outcome"]["terminated_reason"] == "overloaded"
    assert "came free within 0.3 s in the queue" in late["outcome"]["detail"]
    gate.open.set()
    assert (await first)["outcome"]["terminated_reason"] == "completed"
    assert await Admission(ledger, policy).aheld("acme") == {"running": 0, "queued": 0}


async def test_the_user_cap_holds_while_the_tenant_has_room(ledger: Ledger) -> None:
    gate = Gate()
    agent = agent_for(ledger, AdmissionPolicy(tenant_running=10, user_running=1), gate)
    first = asyncio.create_task(run(agent, 0, user="ann"))
    await until(lambda: gate.inside == 1, "ann's first run")
    again = await run(agent, 1, user="ann")
    assert again["outcome"]["terminated_reason"] == "overloaded"
    assert "user 'ann' of tenant 'acme'" in again["outcome"]["detail"]
    other = asyncio.create_task(run(agent, 2, user="ben"))
    await until(lambda: gate.inside == 2, "ben's run")
    gate.open.set()
    assert reasons([await first, await other]) == {"completed": 2}


async def test_a_run_longer_than_its_lease_keeps_its_slot(ledger: Ledger) -> None:
    """The lease is renewed while the run goes on, so a slow run is not overtaken."""
    gate = Gate()
    policy = AdmissionPolicy(tenant_running=1, lease_s=0.3)
    agent = agent_for(ledger, policy, gate)
    first = asyncio.create_task(run(agent, 0))
    await until(lambda: gate.inside == 1, "the first run")
    await _arenewed(ledger)  # past its first expiry, renewed three times
    assert (await run(agent, 1))["outcome"]["terminated_reason"] == "overloaded"
    gate.open.set()
    assert (await first)["outcome"]["terminated_reason"] == "completed"


CRASH = """
import os, signal, sys
from keel import Ledger, RunContext
from keel.guards import Admission, AdmissionPolicy
admission = Admission(Ledger(sys.argv[1]), AdmissionPolicy(tenant_running=1, lease_s=3.0))
lease = admission.acquire(RunContext(user_id="crash", tenant_id="acme"))
assert lease.refused is None, lease.refused
print("leased", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


async def test_a_crashed_runs_lease_expires(
    ledger: Ledger, forks: ForkServer, clock: Clock
) -> None:
    """A process killed while it holds a slot: refused until its lease expires, then admitted.

    The killed process is forked with keel imported (`tests/forking.py`); the next runs' leases
    are dated by a fabricated clock, set just before and just after the dead run's expiry (its
    3 s are not waited out)."""
    child = forks.start_code(CRASH, ledger.url)
    assert child.wait() == -9 and child.lines() == ["leased"], child.output()
    (expires,) = await _aexpiries(ledger)  # the dead run's lease: 3 s from when it took it
    admission = Admission(ledger, AdmissionPolicy(tenant_running=1, lease_s=60), clock=clock)
    nxt = RunContext(user_id="next", tenant_id="acme")
    clock.now = expires - 0.001
    assert (await admission.aacquire(nxt)).refused is not None  # another process's: it holds
    assert await admission.aheld("acme") == {"running": 1, "queued": 0}
    clock.now = expires + 0.001
    assert await admission.aheld("acme") == {"running": 0, "queued": 0}
    lease = await admission.aacquire(nxt)
    assert lease.refused is None, lease.refused
    await admission.arelease(lease)
    assert await admission.aheld("acme") == {"running": 0, "queued": 0}


def test_the_sync_api_takes_and_gives_back_slots(db_url: str) -> None:
    ledger = Ledger(db_url)
    try:
        agent = build_agent(
            ScriptedChatModel(script=["done"]),
            policy=Policy(admission=AdmissionPolicy(tenant_running=1)),
            ledger=ledger,
            checkpointer=InMemorySaver(),
        )
        admission = Admission(ledger, AdmissionPolicy(tenant_running=1))
        lease = admission.acquire(RunContext(user_id="x", tenant_id="acme"))
        refused = agent.invoke(
            TASK,
            {"configurable": {"thread_id": "s1"}},
            context=RunContext(user_id="y", tenant_id="acme"),
        )
        assert refused["outcome"]["terminated_reason"] == "overloaded"
        admission.release(lease)
        result = agent.invoke(
            TASK,
            {"configurable": {"thread_id": "s2"}},
            context=RunContext(user_id="y", tenant_id="acme"),
        )
        assert result["outcome"]["terminated_reason"] == "completed"
        assert admission.held("acme") == {"running": 0, "queued": 0}
    finally:
        ledger.close()


# -- a refused run answers no pending call (README: "No silently lost work") -------------------

ACME = RunContext(user_id="y", tenant_id="acme")
WAITS: Any = {"configurable": {"thread_id": "w1"}}
DROPPING: Any = {"configurable": {"thread_id": "w1", "keel_pending": "not_run"}}
NEVER_MIND = {"messages": [("user", "never mind")]}


def waiting_agent(ledger: Ledger) -> Agent:
    """An agent capped at one running run for the tenant, whose first run waits for approval."""

    @tool(risk="destructive")
    def refund(order_id: str) -> str:
        """Refund an order (needs a human's approval)."""
        return f"refunded {order_id}"

    return build_agent(
        ScriptedChatModel(script=[call("refund", order_id="A1"), "Nothing was refunded."]),
        [refund],
        policy=Policy(
            rules=(Rule(action="ask", tool="refund"),), admission=AdmissionPolicy(tenant_running=1)
        ),
        ledger=ledger,
        checkpointer=InMemorySaver(),
    )


def not_run(records: list[Any]) -> list[tuple[str | None, str]]:
    return [(r.tool, r.decision) for r in records if r.kind == "tool" and r.status == "not_run"]


def test_an_overloaded_run_answers_no_pending_call_not_run(db_url: str) -> None:
    """`keel_pending='not_run'` on a refused (overloaded) run: the thread still waits, so the
    audit log may not say its call was answered; admitted later, the answer is audited once."""
    ledger = Ledger(db_url)
    try:
        agent = waiting_agent(ledger)
        paused = agent.invoke({"messages": [("user", "refund A1")]}, WAITS, context=ACME)
        assert paused["outcome"]["terminated_reason"] == "awaiting_approval"
        admission = Admission(ledger, AdmissionPolicy(tenant_running=1))
        lease = admission.acquire(RunContext(user_id="x", tenant_id="acme"))
        refused = agent.invoke(NEVER_MIND, DROPPING, context=ACME)
        assert refused["outcome"]["terminated_reason"] == "overloaded"
        assert agent.get_state(WAITS).interrupts, "the call still waits for the human"
        assert not_run(AuditLog(ledger).query(thread="w1")) == []
        admission.release(lease)
        done = agent.invoke(NEVER_MIND, DROPPING, context=ACME)
        assert done["outcome"]["terminated_reason"] == "completed"
        assert not_run(AuditLog(ledger).query(thread="w1")) == [("refund", "not_run")]
    finally:
        ledger.close()


async def test_an_overloaded_async_run_answers_no_pending_call_not_run(ledger: Ledger) -> None:
    agent = waiting_agent(ledger)
    await agent.ainvoke({"messages": [("user", "refund A1")]}, WAITS, context=ACME)
    admission = Admission(ledger, AdmissionPolicy(tenant_running=1))
    lease = await admission.aacquire(RunContext(user_id="x", tenant_id="acme"))
    refused = await agent.ainvoke(NEVER_MIND, DROPPING, context=ACME)
    assert refused["outcome"]["terminated_reason"] == "overloaded"
    assert (await agent.aget_state(WAITS)).interrupts
    assert not_run(await AuditLog(ledger).aquery(thread="w1")) == []
    await admission.arelease(lease)
    done = await agent.ainvoke(NEVER_MIND, DROPPING, context=ACME)
    assert done["outcome"]["terminated_reason"] == "completed"
    assert not_run(await AuditLog(ledger).aquery(thread="w1")) == [("refund", "not_run")]


@pytest.mark.parametrize("driver", ["invoke", "ainvoke"])
async def test_a_refused_run_is_audited_and_recorded_under_invoke_and_ainvoke(
    ledger: Ledger, driver: str
) -> None:
    """A run admission control refuses writes its `overloaded` audit record and run record,
    sent with `invoke` as with `ainvoke`."""
    agent = agent_for(ledger, AdmissionPolicy(tenant_running=1), Gate())
    admission = Admission(ledger, AdmissionPolicy(tenant_running=1))
    lease = await admission.aacquire(RunContext(user_id="x", tenant_id="acme"))
    config: Any = {"configurable": {"thread_id": "r1"}}
    if driver == "invoke":
        refused = await asyncio.to_thread(agent.invoke, TASK, config, context=ACME)
    else:
        refused = await agent.ainvoke(TASK, config, context=ACME)
    await admission.arelease(lease)
    assert refused["outcome"]["terminated_reason"] == "overloaded"
    (record,) = await RunLog(ledger).aquery(tenant="acme")
    assert (record.terminated_reason, record.user_id, record.thread_id) == ("overloaded", "y", "r1")
    audit = [r for r in await AuditLog(ledger).aquery(limit=100) if r.kind == "admission"]
    assert [(r.decision, r.user_id, r.thread_id) for r in audit] == [("overloaded", "y", "r1")]


def test_bad_admission_settings_are_named() -> None:
    with pytest.raises(UserError, match="tenant_running must be a whole number, 1 or more"):
        AdmissionPolicy(tenant_running=0)
    with pytest.raises(UserError, match="user_queued must be a whole number, 0 or more"):
        AdmissionPolicy(user_queued=-1)
    with pytest.raises(
        UserError, match="lease_s must be a finite number of seconds greater than 0"
    ):
        AdmissionPolicy(lease_s=0)
    policy = Policy.from_dict({"admission": {"tenant_running": 5, "user_running": 2}})
    assert policy.admission == AdmissionPolicy(tenant_running=5, user_running=2)
    with pytest.raises(UserError, match="Unknown field"):
        Policy.from_dict({"admission": {"running": 5}})
    with pytest.raises(UserError, match="admission, which are kept in the ledger"):
        build_agent(ScriptedChatModel(script=["hi"]), policy=policy)
    with pytest.raises(UserError, match=r"Admission\(clock=...\) must be a function"):
        Admission(Ledger("sqlite:///unused.db"), AdmissionPolicy(), clock=1000.0)  # type: ignore[arg-type]


def test_leases_are_taken_renewed_and_expire_by_the_admissions_clock(
    db_url: str, clock: Clock
) -> None:
    """`Admission(clock=...)`: a lease is dated by it (taken, renewed by the beat) and expires
    by it, whatever the real time."""
    ledger = Ledger(db_url)
    admission = Admission(ledger, AdmissionPolicy(tenant_running=1, lease_s=0.3), clock=clock)
    acme = RunContext(user_id="u", tenant_id="acme")
    try:
        lease = admission.acquire(acme)
        assert lease.refused is None and _expiries(ledger) == [1000.3]
        clock.now = 1000.29
        assert admission.held("acme") == {"running": 1, "queued": 0}
        clock.now = 1000.3
        assert admission.held("acme") == {"running": 0, "queued": 0}  # expired, by the clock
        clock.now = 2000.0
        with admission.holding(lease):
            _eventually(lambda: _expiries(ledger) == [2000.3], "a renewal dated by the clock")
            assert admission.held("acme") == {"running": 1, "queued": 0}
        assert admission.held("acme") == {"running": 0, "queued": 0}
    finally:
        ledger.close()


def _held(admission: Admission) -> dict[str, int]:
    return admission.held("acme")


async def test_a_refused_run_streams_its_outcome_in_each_stream_mode(ledger: Ledger) -> None:
    """What the LangGraph server reads (values, updates; with subgraphs) carries the outcome."""
    caps = AdmissionPolicy(tenant_running=1)
    agent = build_agent(
        ScriptedChatModel(script=["done"]), policy=Policy(admission=caps), ledger=ledger
    )
    acme = RunContext(user_id="u", tenant_id="acme")
    busy = await Admission(ledger, caps).aacquire(acme)

    async def streamed(**kwargs: Any) -> list[Any]:
        return [chunk async for chunk in agent.astream(TASK, context=acme, **kwargs)]

    (values,) = await streamed(stream_mode="values")
    assert values["outcome"]["terminated_reason"] == "overloaded"
    update = {"admission": {"outcome": values["outcome"]}}
    assert await streamed() == await streamed(stream_mode="updates") == [update]
    both = await streamed(stream_mode=["updates", "values", "messages"], subgraphs=True)
    assert [(ns, mode) for ns, mode, _ in both] == [((), "updates"), ((), "values")]
    (part,) = await streamed(stream_mode=["values"], version="v2")
    assert (part["type"], part["data"]) == ("values", values)
    await Admission(ledger, caps).arelease(busy)
    assert (await agent.ainvoke(TASK, context=acme))["outcome"]["terminated_reason"] == "completed"


def test_a_sync_run_longer_than_its_lease_keeps_its_slot(db_url: str) -> None:
    """`invoke` renews from a heartbeat thread, which closes its SQLite connection after."""
    ledger = Ledger(db_url)
    go = threading.Event()

    @tool
    def hold() -> str:
        """Hold the run until the test lets it go."""
        go.wait(30)
        return "held"

    caps = AdmissionPolicy(tenant_running=1, lease_s=0.3)
    agent = build_agent(
        ScriptedChatModel(script=[call("hold"), "done"]),
        [hold],
        policy=Policy(rules=(Rule(action="allow", tool="hold"),), admission=caps),
        ledger=ledger,
    )
    admission = Admission(ledger, caps)
    acme = RunContext(user_id="u", tenant_id="acme")
    results: list[dict[str, Any]] = []
    runner = threading.Thread(target=lambda: results.append(agent.invoke(TASK, context=acme)))
    try:
        runner.start()
        deadline = time.monotonic() + 30
        while admission.held("acme")["running"] != 1:
            assert time.monotonic() < deadline, "the run never took its slot"
            time.sleep(0.02)
        connections = len(ledger._sqlite_dbs)
        renewals = Renewals(_expiries(ledger))  # past its first expiry, renewed three times
        _eventually(lambda: renewals.enough(_expiries(ledger)), "three renewals")
        assert admission.acquire(acme).refused is not None
        go.set()
        runner.join(30)
        assert results[0]["outcome"]["terminated_reason"] == "completed"
        assert admission.held("acme") == {"running": 0, "queued": 0}
        assert len(ledger._sqlite_dbs) <= connections  # the heartbeat's connection was closed
    finally:
        go.set()
        ledger.close()


def _renewers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "keel-admission-lease" and t.is_alive()]


def _expiries(ledger: Ledger) -> list[float]:
    def flow() -> Any:
        rows = yield "SELECT expires_at FROM keel_admission_leases", ()
        return sorted(float(r[0]) for r in rows)

    return list(ledger.run(flow()))


def _eventually(check: Callable[[], bool], what: str, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_sync_runs_share_one_renewing_thread(db_url: str) -> None:
    """Eight sync runs at once: one thread renews all their leases together; it ends with them."""
    ledger = Ledger(db_url)
    caps = AdmissionPolicy(tenant_running=8, lease_s=0.3)
    admission = Admission(ledger, caps)
    go, inside = threading.Event(), threading.Semaphore(0)

    def one_run(i: int) -> None:
        lease = admission.acquire(RunContext(user_id=f"u{i}", tenant_id="acme"))
        assert lease.refused is None, lease.refused
        with admission.holding(lease):
            inside.release()
            go.wait(30)

    runs = [threading.Thread(target=one_run, args=(i,)) for i in range(8)]
    try:
        for r in runs:
            r.start()
        for _ in runs:
            assert inside.acquire(timeout=30), "a run never took its slot"
        renewals = Renewals(_expiries(ledger))  # only renewals keep the slots after this
        _eventually(lambda: renewals.enough(_expiries(ledger)), "three renewals")
        assert admission.held("acme") == {"running": 8, "queued": 0}
        assert len(_renewers()) == 1
        # renewed in one statement a beat: every lease carries the same expiry
        _eventually(lambda: len(set(_expiries(ledger))) == 1, "one expiry for all eight")
    finally:
        go.set()
        for r in runs:
            r.join(30)
    assert admission.held("acme") == {"running": 0, "queued": 0}
    assert _renewers() == []  # the last run out waited for it to end
    ledger.close()


def test_a_failed_renewal_beat_is_skipped_and_the_next_renews(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The ledger fails for a beat (its table is gone): a warning, then the leases renew again."""
    ledger = Ledger(db_url)
    admission = Admission(ledger, AdmissionPolicy(tenant_running=2, lease_s=1.5))
    lease = admission.acquire(RunContext(user_id="u", tenant_id="acme"))

    def rename(old: str, new: str) -> Any:
        yield f"ALTER TABLE {old} RENAME TO {new}", ()

    with admission.holding(lease):
        ledger.run(rename("keel_admission_leases", "keel_admission_leases_away"))
        _eventually(lambda: "could not renew 1 admission leases" in caplog.text, "a failed beat")
        ledger.run(rename("keel_admission_leases_away", "keel_admission_leases"))
        back = time.time()
        _eventually(lambda: _expiries(ledger)[0] >= back + 1.5, "a renewal after the outage")
        assert len(_renewers()) == 1
    assert admission.held("acme") == {"running": 0, "queued": 0}
    ledger.close()


def test_runs_starting_and_ending_around_each_other_all_end(db_url: str) -> None:
    """Runs start and end around each other (the renewing thread stopped and started again and
    again): every `holding` exits, and every lease is given back. (Whether the last run out
    can wait on a run that starts meanwhile is pinned without timing below.)"""
    ledger = Ledger(db_url)
    admission = Admission(ledger, AdmissionPolicy(tenant_running=100, lease_s=0.6))
    ended: list[int] = []

    def runs(user: int) -> None:
        for _ in range(25):
            lease = admission.acquire(RunContext(user_id=f"u{user}", tenant_id="acme"))
            with admission.holding(lease):
                time.sleep(0.005 * (user % 3))  # (the churn's shape, not a synchronisation)
        ended.append(user)

    threads = [threading.Thread(target=runs, args=(u,)) for u in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(ended) == list(range(6))
    assert admission.held("acme") == {"running": 0, "queued": 0}
    _eventually(lambda: not _renewers(), "the renewing thread to end with the last run")
    ledger.close()


@pytest.mark.postgres
def test_the_last_run_out_never_waits_for_a_run_that_starts_meanwhile(
    fresh_postgres_url: str,
) -> None:
    """The last run out stops the renewing thread and waits for it. A run that starts in that
    moment gets a thread of its own: the wait never lasts as long as that run (the thread
    woke to a non-empty set and renewed on). Without timing: the thread's renewal is held on
    a row lock while run A ends and run B starts; B stays inside until A's `holding` exits."""
    ledger = Ledger(fresh_postgres_url)
    admission = Admission(ledger, AdmissionPolicy(tenant_running=10, lease_s=3))
    a, b = (admission.acquire(RunContext(user_id=u, tenant_id="acme")) for u in ("a", "b"))
    inside, a_may_end, a_ended, b_may_end = (threading.Event() for _ in range(4))

    def run(lease: Lease, may_end: threading.Event, ended: threading.Event) -> None:
        with admission.holding(lease):
            inside.set()
            may_end.wait(120)
        ended.set()

    renewal_waits = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND "
        "wait_event_type = 'Lock' AND position('UPDATE keel_admission_leases' in query) > 0"
    )
    with (
        psycopg.connect(fresh_postgres_url) as blocker,
        psycopg.connect(fresh_postgres_url, autocommit=True) as watcher,
    ):
        run_a = threading.Thread(target=run, args=(a, a_may_end, a_ended))
        run_a.start()
        _eventually(inside.is_set, "run A inside")
        blocker.execute("SELECT 1 FROM keel_admission_leases WHERE id = %s FOR UPDATE", (a.id,))
        _eventually(
            lambda: watcher.execute(renewal_waits).fetchone() == (1,), "A's renewal to wait"
        )
        a_may_end.set()  # A is the last run out: it stops the thread, waits for its renewal
        _eventually(lambda: a.id not in admission._renewer._held, "A to stop renewing")
        inside.clear()
        run_b = threading.Thread(target=run, args=(b, b_may_end, threading.Event()))
        run_b.start()
        _eventually(inside.is_set, "run B inside")
        blocker.rollback()  # the renewal goes through
        try:
            _eventually(a_ended.is_set, "run A's end while run B runs", seconds=30)
        finally:
            b_may_end.set()
            run_a.join(60)
            run_b.join(60)
    assert admission.held("acme") == {"running": 0, "queued": 0}
    ledger.close()


# -- the process's waiting room: queued runs of every tenant together ---------------------------


def ctx(tenant: str, user: str) -> RunContext:
    return RunContext(user_id=user, tenant_id=tenant)


async def test_queued_runs_of_every_tenant_share_the_processs_waiting_room(ledger: Ledger) -> None:
    """One tenant's queue may not fill the process: the next tenant's run is refused at once."""
    room = WaitingRoom(1)
    policy = AdmissionPolicy(tenant_running=1, tenant_queued=5, queue_timeout_s=60)
    acme, globex = (Admission(ledger, policy, waiting_room=room) for _ in range(2))
    acme_running = await acme.aacquire(ctx("acme", "a1"))
    globex_running = await globex.aacquire(ctx("globex", "g1"))
    assert acme_running.refused is None and globex_running.refused is None
    acme_waiting = asyncio.create_task(acme.aacquire(ctx("acme", "a2")))
    await until(lambda: room.waiting == 1, "acme's second run to wait")

    start = time.monotonic()
    refused = await globex.aacquire(ctx("globex", "g2"))  # globex's own queue has room
    assert time.monotonic() - start < 10  # at once, not after the queue's timeout
    assert refused.refused is not None and "queued_per_process" in refused.refused
    assert "1 run(s) waiting" in refused.refused
    assert await globex.aheld("globex") == {"running": 1, "queued": 0}  # its row is gone

    await acme.arelease(acme_running)
    admitted = await acme_waiting
    assert admitted.refused is None and room.waiting == 0  # a run let in leaves the room
    globex_waiting = asyncio.create_task(globex.aacquire(ctx("globex", "g2")))
    await until(lambda: room.waiting == 1, "globex's run to wait, now there is room")
    await globex.arelease(globex_running)
    assert (await globex_waiting).refused is None
    for admission, lease in ((acme, admitted), (globex, await globex_waiting)):
        await admission.arelease(lease)
    assert room.waiting == 0
    assert await acme.aheld("acme") == {"running": 0, "queued": 0}


async def test_a_run_that_leaves_the_queue_gives_its_place_back(ledger: Ledger) -> None:
    """Timed out or cancelled while waiting: the room's place is free for the next run."""
    room = WaitingRoom(1)
    policy = AdmissionPolicy(tenant_running=1, tenant_queued=5, queue_timeout_s=0.3)
    admission = Admission(ledger, policy, waiting_room=room)
    running = await admission.aacquire(ctx("acme", "a1"))
    timed_out = await admission.aacquire(ctx("acme", "a2"))
    assert timed_out.refused is not None and "came free within 0.3 s" in timed_out.refused
    assert room.waiting == 0
    slow = Admission(ledger, replace(policy, queue_timeout_s=60), waiting_room=room)
    waiting = asyncio.create_task(slow.aacquire(ctx("acme", "a3")))
    await until(lambda: room.waiting == 1, "the run to wait")
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert room.waiting == 0
    assert await admission.aheld("acme") == {"running": 1, "queued": 0}
    await admission.arelease(running)


def test_a_sync_run_waits_in_the_same_room(db_url: str) -> None:
    """Under `invoke`: a room of 0 refuses to queue at once; a waiting thread holds its place."""
    ledger = Ledger(db_url)
    try:
        policy = AdmissionPolicy(tenant_running=1, tenant_queued=5, queue_timeout_s=60)
        closed = Admission(ledger, policy, waiting_room=WaitingRoom(0))
        running = closed.acquire(ctx("acme", "a1"))
        start = time.monotonic()
        refused = closed.acquire(ctx("acme", "a2"))
        assert refused.refused is not None and "queued_per_process" in refused.refused
        assert time.monotonic() - start < 10
        assert closed.held("acme") == {"running": 1, "queued": 0}

        room = WaitingRoom(1)
        admission = Admission(ledger, policy, waiting_room=room)
        got: list[Lease] = []
        waiter = threading.Thread(target=lambda: got.append(admission.acquire(ctx("acme", "a3"))))
        waiter.start()
        deadline = time.monotonic() + 30
        while room.waiting == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert room.waiting == 1
        assert admission.acquire(ctx("acme", "a4")).refused is not None  # the room is full
        closed.release(running)
        waiter.join(30)
        assert got and got[0].refused is None and room.waiting == 0
        admission.release(got[0])
    finally:
        ledger.close()


def test_a_waiting_room_is_checked(tmp_path: Any) -> None:
    with pytest.raises(UserError, match=r"WaitingRoom\(limit=...\) must be 0 or more, got -1"):
        WaitingRoom(-1)
    with pytest.raises(UserError, match="must be 0 or more, got True"):
        WaitingRoom(True)
    with pytest.raises(UserError, match=r"waiting_room=\.\.\.\) must be a WaitingRoom, got int"):
        Admission(Ledger(f"sqlite:///{tmp_path}/x.db"), AdmissionPolicy(), waiting_room=3)  # type: ignore[arg-type]
    room = WaitingRoom(1)
    assert room.enter() and not room.enter()
    room.leave()
    with pytest.raises(RuntimeError, match="without a matching enter"):
        room.leave()


# -- how a queued run asks for its slot ----------------------------------------------------------


@pytest.fixture
def asks(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """When each queued run asked the ledger again for its slot (`time.monotonic()`)."""
    asked: list[float] = []
    promote = admission_module._promote_flow

    def counted(*args: Any) -> Any:
        asked.append(time.monotonic())
        return promote(*args)

    monkeypatch.setattr(admission_module, "_promote_flow", counted)
    return asked


async def test_a_queued_run_asks_the_ledger_less_and_less_often(
    ledger: Ledger, asks: list[float]
) -> None:
    """Each ask locks the tenant's rows: a run that waits 2 s asks a handful of times, not 40."""
    policy = AdmissionPolicy(tenant_running=1, tenant_queued=1, queue_timeout_s=2.0)
    admission = Admission(ledger, policy)
    running = await admission.aacquire(ctx("acme", "a1"))
    late = await admission.aacquire(ctx("acme", "a2"))
    assert late.refused is not None and "within 2 s in the queue" in late.refused
    # the wait between asks doubles from 0.05 s up to 0.5 s: each gap is at least its wait (a
    # loaded machine only makes it longer), so 2 s hold at most 6 asks (at 20 a second: 40)
    gaps = [b - a for a, b in itertools.pairwise(asks)]
    waits = [min(0.05 * 2 ** (i + 1), 0.5) for i in range(len(gaps))]
    assert all(gap >= wait for gap, wait in zip(gaps, waits, strict=True)), (gaps, waits)
    assert 2 <= len(asks) <= 6, asks
    await admission.arelease(running)


async def test_a_slot_freed_in_this_process_is_taken_at_once(
    ledger: Ledger, asks: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Long after the asks have slowed down, a release here wakes the queued run at once."""
    # the queued run's next ask of its own is an hour away: only the release can wake it
    monkeypatch.setattr(admission_module, "_POLL_S", 3600.0)
    monkeypatch.setattr(admission_module, "_POLL_MAX_S", 3600.0)
    policy = AdmissionPolicy(tenant_running=1, tenant_queued=1, queue_timeout_s=7200)
    running = await Admission(ledger, policy).aacquire(ctx("acme", "a1"))
    room = WaitingRoom(1)
    waiting = asyncio.create_task(
        Admission(ledger, policy, waiting_room=room).aacquire(ctx("acme", "a2"))
    )
    # seated: on this loop, the queued run is then in its wait (it reads the frees before it
    # yields), so a release from now on is one it sees
    await until(lambda: room.waiting == 1, "the second run to wait in the queue")
    assert not waiting.done() and asks == []
    await Admission(ledger, policy).arelease(running)  # another Admission, the same ledger
    admitted = await asyncio.wait_for(waiting, 60)  # (a guard: its own ask is an hour away)
    assert admitted.refused is None
    assert len(asks) == 1  # woken by the release: one ask, not its schedule
    await Admission(ledger, policy).arelease(admitted)


# -- async runs: one renewing task per event loop ------------------------------------------------


def _renewing_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "keel-admission-lease"]


async def _aexpiries(ledger: Ledger) -> list[float]:
    def flow() -> Any:
        rows = yield "SELECT expires_at FROM keel_admission_leases", ()
        return sorted(float(r[0]) for r in rows)

    return list(await ledger.arun(flow()))


async def _arenewed(ledger: Ledger) -> None:
    """Until the leases were renewed three times, past their first expiry (`Renewals`)."""
    renewals, deadline = Renewals(await _aexpiries(ledger)), time.monotonic() + 30
    while not renewals.enough(await _aexpiries(ledger)):
        assert time.monotonic() < deadline, f"the leases were not renewed: {renewals.seen}"
        await asyncio.sleep(0.02)


async def test_async_runs_share_one_renewing_task(ledger: Ledger) -> None:
    """Eight async runs at once: one task renews all their leases together; it ends with them."""
    gate = Gate()
    agent = agent_for(ledger, AdmissionPolicy(tenant_running=8, lease_s=0.3), gate)
    runs = [asyncio.create_task(run(agent, i)) for i in range(8)]
    await until(lambda: gate.inside == 8, "eight runs to hold their slots")
    await _arenewed(ledger)  # only renewals keep the slots after this
    admission = Admission(ledger, AdmissionPolicy(tenant_running=8))
    assert await admission.aheld("acme") == {"running": 8, "queued": 0}
    assert len(_renewing_tasks()) == 1
    deadline = time.monotonic() + 10  # renewed in one statement a beat: one expiry for all
    while len(set(await _aexpiries(ledger))) != 1:
        assert time.monotonic() < deadline, "the leases never shared one expiry"
        await asyncio.sleep(0.02)
    gate.open.set()
    assert reasons(list(await asyncio.gather(*runs))) == {"completed": 8}
    assert _renewing_tasks() == []  # the last run out stopped it
    assert await admission.aheld("acme") == {"running": 0, "queued": 0}


async def test_a_failed_async_renewal_beat_is_logged_and_the_next_renews(
    ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    """Under `ainvoke` too: the ledger fails for a beat, a warning, then the leases renew."""
    admission = Admission(ledger, AdmissionPolicy(tenant_running=2, lease_s=1.5))
    lease = await admission.aacquire(RunContext(user_id="u", tenant_id="acme"))

    def rename(old: str, new: str) -> Any:
        yield f"ALTER TABLE {old} RENAME TO {new}", ()

    async with admission.aholding(lease):
        await ledger.arun(rename("keel_admission_leases", "keel_admission_leases_away"))
        await until(lambda: "could not renew 1 admission leases" in caplog.text, "a failed beat")
        await ledger.arun(rename("keel_admission_leases_away", "keel_admission_leases"))
        back = time.time()
        deadline = time.monotonic() + 10
        while (await _aexpiries(ledger))[0] < back + 1.5:
            assert time.monotonic() < deadline, "no renewal after the outage"
            await asyncio.sleep(0.02)
        assert len(_renewing_tasks()) == 1
    assert await admission.aheld("acme") == {"running": 0, "queued": 0}
    assert _renewing_tasks() == []


async def test_a_run_cancelled_while_it_holds_its_lease_still_ends_cancelled(
    ledger: Ledger,
) -> None:
    """The last run out waits for the renewing task; a cancellation of that run is not lost."""
    admission = Admission(ledger, AdmissionPolicy(tenant_running=2, lease_s=30))
    entered = asyncio.Event()

    async def hold() -> None:
        lease = await admission.aacquire(RunContext(user_id="u", tenant_id="acme"))
        async with admission.aholding(lease):
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(hold())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
    assert _renewing_tasks() == []
    assert await admission.aheld("acme") == {"running": 0, "queued": 0}
