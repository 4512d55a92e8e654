"""Cancellation and teardown, as a careless app or failing infrastructure does them.

An app cancels runs (a timeout, a client gone), and under anyio's cancel scopes (FastAPI,
Starlette) a cancelled task is cancelled again at every await until it leaves the scope; it
closes its ledger and checkpointer while other threads may still use them; it runs each request
on a thread or an `asyncio.run` of its own. Invariants: the process never crashes (cases that
could die of a segmentation fault run in a process of their own, forked with keel imported, so
a regression is a failed test); no side-effecting call runs twice; the thread can go on in a
fresh agent; the cancelled run has one run record, `stopped/cancelled`; what it held (its
thread's lease, its admission slot, its connections) is given back, not kept until a lease
expires or the process ends.

Real parts: SQLite files and PostgreSQL; the model is keel's `ScriptedChatModel`.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
from forking import ForkServer
from test_ledger_close import _run
from test_storage_faults import InFlightKiller

from keel import Ledger, Persistence, RunContext, RunLog, build_agent, tool
from keel.evals import ScriptedChatModel, call
from keel.guards import AdmissionPolicy, Policy, Rule

CTX = RunContext(user_id="u1", tenant_id="acme")
FIRST = {"messages": [("user", "refund order A1")]}
NEXT = {"messages": [("user", "and order B2?")]}


# -- 1. the sync SQLite checkpointer closed while another thread runs a statement on it -------


def test_closing_the_sync_checkpointer_waits_for_another_threads_statement(
    tmp_path: Path, forks: ForkServer
) -> None:
    """A web server's request thread reads the thread (keel's `list_threads` uses the saver's
    cursor the same way) while the app shuts down and leaves `Persistence.checkpointer()`:
    the close freed the running statement under that thread and the process died (SIGSEGV).
    Now the close waits for it; the saver refuses further use with an error."""
    out = _run(  # (its prelude opens a ledger on the file, and defines `path` and `SLOW`)
        forks,
        tmp_path,
        """
        from keel import Persistence
        got, started = {}, threading.Event()
        with Persistence(f"sqlite:///{path}").checkpointer() as saver:
            def read():
                with saver.cursor(transaction=False) as cur:
                    started.set()
                    got["count"] = cur.execute(SLOW).fetchone()[0]
            reader = threading.Thread(target=read)
            reader.start()
            started.wait()
            time.sleep(0.2)  # inside the slow statement
        reader.join()
        try:
            saver.get_tuple({"configurable": {"thread_id": "t1"}})
        except sqlite3.ProgrammingError as exc:
            got["after"] = str(exc)
        print(got)
        """,
    )
    assert out.strip() == "{'count': 2000000, 'after': 'Cannot operate on a closed database.'}"


def test_an_app_that_times_out_sync_runs_in_threads_and_closes_under_them_survives(
    tmp_path: Path, forks: ForkServer
) -> None:
    """The careless app: `asyncio.wait_for(asyncio.to_thread(agent.invoke, ...), timeout)`,
    then it closes its checkpointer and ledger while the timed-out run goes on in its thread.
    Before the checkpointer's close waited for the running statement this died of a
    segmentation fault within a few runs; now each run ends with an outcome (`storage` once
    its storage is closed under it)."""
    out = _run(  # (its prelude defines `path`)
        forks,
        tmp_path,
        """
        from keel import Ledger, Persistence, RunContext, build_agent, tool
        from keel.evals import ScriptedChatModel, call
        url, started, ended = f"sqlite:///{path}", [], []

        @tool(risk="write", name="refund")
        def refund(order_id: str) -> str:
            \"\"\"Refund an order.\"\"\"
            return f"refunded {order_id}"

        def invoke(agent, thread):
            started.append(thread)  # one the timeout cancelled before a thread took it never ran
            config = {"configurable": {"thread_id": thread}}
            context = RunContext(user_id="u1", tenant_id="acme")
            try:
                result = agent.invoke({"messages": [("user", "go")]}, config, context=context)
            except Exception as exc:
                ended.append(f"raised {exc!r}")
            else:
                ended.append(result["outcome"]["terminated_reason"])

        async def one(i):
            script = [call("refund", order_id="A1"), call("refund", order_id="B2"), "Done."]
            model = ScriptedChatModel(script=script, fresh_ids=True, latency=0.002)
            ledger = Ledger(url)
            with Persistence(url).checkpointer() as saver:
                agent = build_agent(model, [refund], ledger=ledger, checkpointer=saver)
                running = asyncio.to_thread(invoke, agent, f"t{i}")
                try:
                    await asyncio.wait_for(running, 0.002 * (i + 1))
                except TimeoutError:
                    pass
            ledger.close()  # the run may still go on in its thread

        async def main():
            for i in range(20):
                await one(i)

        asyncio.run(main())  # (waits for the threads' runs)
        print(len(started), len(ended), sorted(set(ended)))
        """,
    )
    started, count, reasons = out.strip().split(" ", 2)
    assert int(started) >= 10 and count == started  # every run that started ended
    assert set(eval(reasons)) <= {"completed", "storage"}, reasons


# -- 2. a run cancelled again and again (anyio's cancel scopes) -------------------------------


def _refund_tool(ran: list[str], started: asyncio.Event) -> Any:
    @tool(risk="write", name="refund")
    async def refund(order_id: str) -> str:
        """Refund an order."""
        ran.append(order_id)
        started.set()
        await asyncio.sleep(30)  # cut off by the caller
        return f"refunded {order_id}"

    return refund


def _held_leases(url: str) -> list[tuple[Any, ...]]:
    """The rows of the thread leases and the admission leases still in the ledger."""
    sql = ["SELECT thread_id FROM keel_thread_leases", "SELECT state FROM keel_admission_leases"]
    if url.startswith("sqlite"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
            return [row for each in sql for row in db.execute(each).fetchall()]
    with psycopg.connect(url) as pg:
        return [row for each in sql for row in pg.execute(each).fetchall()]


async def _cancel_when(scope: anyio.CancelScope, started: asyncio.Event) -> None:
    await started.wait()
    scope.cancel()


async def test_a_run_cancelled_again_and_again_gives_back_what_it_held(db_url: str) -> None:
    """Under an anyio cancel scope every await of the cancelled run's teardown was cancelled
    again: the thread's lease and the admission slot were never released (the next run on the
    thread waited 30 s for the lease to expire; the tenant, capped at one run, was refused for
    the admission lease's 300 s), on PostgreSQL the cancelled run's record could be lost, and a
    release left running in the background reopened the closed ledger's pool. Now the run gives
    them back before it ends; a fresh agent goes on with the thread at once."""
    ran: list[str] = []
    started = asyncio.Event()
    policy = Policy(
        name="capped",
        rules=(Rule(tool="refund", action="allow"),),
        admission=AdmissionPolicy(tenant_running=1),
    )
    config = {"configurable": {"thread_id": "t1"}}
    model = ScriptedChatModel(
        script=[call("refund", order_id="A1"), "B2 ships tomorrow."], fresh_ids=True
    )
    ledger = Ledger(db_url)
    async with Persistence(db_url).acheckpointer() as saver:
        agent = build_agent(
            model, [_refund_tool(ran, started)], policy=policy, ledger=ledger, checkpointer=saver
        )
        with anyio.CancelScope() as scope:
            canceller = asyncio.create_task(_cancel_when(scope, started))
            await agent.ainvoke(FIRST, config, context=CTX)
        await canceller
    assert scope.cancelled_caught
    recorded = [(r.status, r.terminated_reason) for r in await RunLog(ledger).aquery()]
    await ledger.aclose()
    assert recorded == [("stopped", "cancelled")]
    assert _held_leases(db_url) == []  # nothing waits for a lease to expire
    fresh = Ledger(db_url)
    try:
        async with Persistence(db_url).acheckpointer() as saver:
            refund = _refund_tool(ran, asyncio.Event())
            agent = build_agent(model, [refund], policy=policy, ledger=fresh, checkpointer=saver)
            done = await agent.ainvoke(NEXT, config, context=CTX)
        assert done["outcome"]["terminated_reason"] == "completed"
        assert ran == ["A1"]
        runs = [(r.status, r.terminated_reason) for r in RunLog(fresh).query()]
        assert runs == [("stopped", "cancelled"), ("success", "completed")]
    finally:
        await fresh.aclose()


# -- 3. a run per thread or per event loop: connections of ended threads ---------------------


def _open_connections(db: Path) -> int:
    """How many connections of this process are open on the SQLite file `db`.

    Each one in WAL mode holds a descriptor of the file's WAL (SQLite may keep the main file's
    descriptor of a closed connection open a while, so those are not counted).
    """
    count = 0
    for fd in Path("/proc/self/fd").iterdir():
        try:
            count += str(fd.readlink()) == f"{db}-wal"
        except OSError:  # closed meanwhile (the listing's own descriptor)
            continue
    return count


def _cancelled_in_its_own_loop(url: str, ledger: Ledger, thread: str) -> None:
    """A run cancelled mid-tool, as a script that runs each request with `asyncio.run` does."""

    async def main() -> None:
        started = asyncio.Event()
        model = ScriptedChatModel(script=[call("refund", order_id="A1")], fresh_ids=True)
        async with Persistence(url).acheckpointer() as saver:
            refund = _refund_tool([], started)
            agent = build_agent(model, [refund], ledger=ledger, checkpointer=saver)
            run = asyncio.create_task(agent.ainvoke(FIRST, {"configurable": {"thread_id": thread}}))
            await started.wait()
            run.cancel()
            with pytest.raises(asyncio.CancelledError):
                await run

    asyncio.run(main())


def _on_its_own_thread(url: str, ledger: Ledger, thread: str) -> None:
    """A run on a thread of its own, as a threaded web server runs each request."""
    model = ScriptedChatModel(script=[call("lookup", order_id="A1"), "Shipped."])

    @tool(risk="write")
    def lookup(order_id: str) -> str:
        """Look an order up."""
        return f"{order_id} shipped"

    with Persistence(url).checkpointer() as saver:
        agent = build_agent(model, [lookup], ledger=ledger, checkpointer=saver)
        config = {"configurable": {"thread_id": thread}}
        worker = threading.Thread(target=agent.invoke, args=(FIRST, config))
        worker.start()
        worker.join()


@pytest.mark.parametrize("run", [_cancelled_in_its_own_loop, _on_its_own_thread])
def test_runs_on_threads_that_end_leave_no_ledger_connection_open(tmp_path: Path, run: Any) -> None:
    """The ledger kept a SQLite connection per thread that ever ran a transaction, until
    `close()`: the worker threads of each `asyncio.run`, or each request's thread, left theirs
    open (file descriptors each), so a long-lived process ran out of descriptors. Now a
    thread's connection goes once the thread has ended."""
    db = tmp_path / "keel.db"
    url = f"sqlite:///{db}"
    ledger = Ledger(url)

    def open_after_the_next_request() -> int:
        """The connections open once a request reads the run log on a thread of its own."""
        reader = threading.Thread(target=RunLog(ledger).query)
        reader.start()
        reader.join()
        return _open_connections(db)

    try:
        for i in range(2):
            run(url, ledger, f"warm-{i}")
        connections, threads = open_after_the_next_request(), threading.active_count()
        for i in range(6):
            run(url, ledger, f"t{i}")
        assert open_after_the_next_request() <= connections
        assert threading.active_count() <= threads
    finally:
        ledger.close()
    assert _open_connections(db) == 0


# -- 4. a lease this process left behind --------------------------------------------------------


@pytest.mark.postgres
async def test_a_lease_a_run_of_this_process_left_behind_does_not_hold_its_thread(
    fresh_postgres_url: str,
) -> None:
    """A run whose lease release failed (here the database kills the release in each of its
    three attempts; Ctrl-C as a run ends does the same) left its lease in the ledger: the next
    run on the thread in the same process waited for it to expire (30 s), as for a live run
    of another process. Nothing of this process holds it any more, so it is taken over at
    once, as a dead process's is."""
    url = fresh_postgres_url
    killer = InFlightKiller(url)

    @tool(name="lookup")
    async def lookup(order_id: str) -> str:
        """Look an order up."""
        killer.arm("keel_thread_leases", times=3)  # the run's release, in each attempt
        return f"{order_id} shipped"

    model = ScriptedChatModel(script=[call("lookup", order_id="A1"), "Shipped.", "B2 too."])
    config = {"configurable": {"thread_id": "t1"}}
    ledger = Ledger(url)
    async with Persistence(url).acheckpointer() as saver:
        agent = build_agent(model, [lookup], ledger=ledger, checkpointer=saver)
        first = await agent.ainvoke(FIRST, config, context=CTX)
        await asyncio.to_thread(killer.join)
        assert first["outcome"]["terminated_reason"] == "completed"
        assert _held_leases(url) == [("t1",)]  # left behind
        fresh = Ledger(url)
        agent = build_agent(model, [lookup], ledger=fresh, checkpointer=saver)
        # (a lease left behind would hold the thread for its 30 s)
        done = await asyncio.wait_for(agent.ainvoke(NEXT, config, context=CTX), timeout=20)
    assert done["outcome"]["terminated_reason"] == "completed"
    assert _held_leases(url) == []
    await ledger.aclose()
    await fresh.aclose()


def test_a_run_whose_lease_renewal_cannot_start_gives_its_admission_slot_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Infrastructure fault, injected: the process cannot start the thread that renews the
    run's admission lease (its thread limit, "can't start new thread"; Ctrl-C while that thread
    starts does the same). The run took its slot first and never gave it back: the tenant,
    capped at one run, was refused until the lease expired (300 s). Now the slot goes back as
    the run fails."""
    start = threading.Thread.start

    def no_renewal(self: threading.Thread) -> None:
        if self.name == "keel-admission-lease":
            raise RuntimeError("can't start new thread")
        start(self)

    monkeypatch.setattr(threading.Thread, "start", no_renewal)
    url = f"sqlite:///{tmp_path}/keel.db"
    policy = Policy(name="capped", admission=AdmissionPolicy(tenant_running=1))
    ledger = Ledger(url)
    try:
        with Persistence(url).checkpointer() as saver:
            model = ScriptedChatModel(script=["Hello."])
            agent = build_agent(model, [], policy=policy, ledger=ledger, checkpointer=saver)
            with pytest.raises(RuntimeError, match="can't start new thread"):
                agent.invoke(FIRST, {"configurable": {"thread_id": "t1"}}, context=CTX)
        assert _held_leases(url) == []
    finally:
        ledger.close()
