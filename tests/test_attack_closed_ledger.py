"""Attack: an app closes its ledger while runs still hold what they must give back.

An app that makes a ledger per request closes it when the request is done, and a client that
goes away leaves its stream unread: the stream is closed (or garbage-collected) after the
ledger. Its teardown (the admission slot and the thread's lease given back, the run recorded)
then met the closed ledger, and reopened it: a PostgreSQL pool (or SQLite connections) per
request, never closed. Invariants: a closed ledger opens nothing again and says why
(`StorageError`); the late teardown raises nothing and leaks no connection; the slot it could
not give back does not hold the tenant's one slot, since its run is over (`keel.guards.holders`).

Real parts: SQLite files and PostgreSQL (connections counted in `pg_stat_activity`, or as the
file's WAL descriptors this process holds); the model is keel's `ScriptedChatModel`.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
from langgraph.checkpoint.memory import InMemorySaver
from test_attack_cancellation import _held_leases, _open_connections

from keel import Ledger, RunContext, RunLog, StorageError, build_agent, tool
from keel.evals import ScriptedChatModel, call
from keel.guards import AdmissionPolicy, Policy, Rule

CTX = RunContext(user_id="u1", tenant_id="acme")
TASK = {"messages": [("user", "look order A1 up")]}
CLOSED = "was closed .* does not reopen"


def _open(url: str) -> int:
    """Connections open on the ledger's database: PostgreSQL backends, or SQLite WAL handles."""
    if url.startswith("sqlite"):
        return _open_connections(Path(url.removeprefix("sqlite:///")))
    name = urlsplit(url).path.lstrip("/")
    # the counting connections are named and left out: a backend leaves pg_stat_activity a
    # moment after its client closed, so the last count's own could still be listed
    with psycopg.connect(url, autocommit=True, application_name=_COUNTING) as admin:
        row = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND application_name <> %s",
            (name, _COUNTING),
        ).fetchone()
    assert row is not None
    return int(row[0])


_COUNTING = "keel-test-counting-backends"


def _left_open(url: str, within: float = 3.0) -> int:
    """`_open`, once what was closed has had `within` seconds to go: a connection keel still
    holds stays counted, a backend the server is still tearing down does not (one whose client
    gave up mid-connect can finish its start-up, and show up, after it)."""
    deadline = time.monotonic() + within
    while (count := _open(url)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return count


def _ping() -> Iterator[tuple[str, tuple[Any, ...]]]:
    rows = yield "SELECT 1", ()
    return rows


async def test_a_closed_ledger_refuses_every_transaction_and_opens_nothing(db_url: str) -> None:
    """`close()` / `aclose()` used to be undone by the next transaction, which opened a new
    pool (or connection) nobody would close. Now every way in raises `StorageError` saying
    the ledger was closed, and nothing is opened."""
    ledger = Ledger(db_url)
    RunLog(ledger).query()  # the sync pool (or this thread's connection)
    await RunLog(ledger).aquery()  # the async pool (or a worker thread's connection)
    assert _open(db_url) > 0 and not ledger.closed
    await ledger.aclose()
    assert ledger.closed and _left_open(db_url) == 0
    with pytest.raises(StorageError, match=CLOSED):
        ledger.run(_ping())
    with pytest.raises(StorageError, match=CLOSED):
        await ledger.arun(_ping())
    with pytest.raises(StorageError, match=CLOSED):
        ledger.read(_ping())
    with pytest.raises(StorageError, match=CLOSED):
        await ledger.aread(_ping())
    with pytest.raises(StorageError, match=CLOSED):
        await RunLog(ledger).aquery()
    ledger.close()  # closing again is harmless
    await ledger.aclose()

    unused = Ledger(db_url)  # closed before its first use: not even set up
    unused.close()  # (the sync close closes the async half too)
    with pytest.raises(StorageError, match=CLOSED):
        await unused.arun(_ping())
    with pytest.raises(StorageError, match=CLOSED):
        unused.setup()
    assert _left_open(db_url) == 0


def _agent(ledger: Ledger) -> Any:
    @tool(name="lookup")
    def lookup(order_id: str) -> str:
        """Look an order up."""
        return f"{order_id} shipped"

    return build_agent(
        ScriptedChatModel(script=[call("lookup", order_id="A1"), "Shipped."], fresh_ids=True),
        [lookup],
        policy=Policy(
            rules=(Rule(tool="lookup", action="allow"),),
            admission=AdmissionPolicy(tenant_running=1),  # one run of acme at a time
        ),
        ledger=ledger,
        checkpointer=InMemorySaver(),
    )


@pytest.mark.parametrize("late", ["closed", "collected", "sync"])
async def test_a_stream_ended_after_its_ledger_was_closed_leaks_nothing_and_raises_nothing(
    db_url: str, late: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A client gone mid-run: the app closes the request's ledger, then the stream is closed
    (or collected, or it was a sync stream). Its teardown gives back the admission slot and
    the thread's lease: that reopened the closed ledger's pool, one per request. Now the
    teardown is refused, logged, and leaks nothing; no error escapes. The slot and lease it
    could not give back belong to a run of this process that has ended: the tenant's next run
    (capped at one), on a new ledger, is admitted at once and takes the thread over, instead of
    being refused for the admission lease's 300 s."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    ledger = Ledger(db_url)
    agent = _agent(ledger)
    config = {"configurable": {"thread_id": "t1"}}
    if late == "sync":
        sync_stream = agent.stream(TASK, config, context=CTX)
        next(sync_stream)  # the run holds its slot and its thread
        ledger.close()
        assert _left_open(db_url) == 0
        sync_stream.close()
    else:
        stream = agent.astream(TASK, config, context=CTX)
        await anext(stream)  # the run holds its slot and its thread
        await ledger.aclose()
        assert _left_open(db_url) == 0
        if late == "closed":
            await stream.aclose()
        else:
            del stream
            gc.collect()  # asyncio closes a collected generator in a task of its own
        for _ in range(20):
            await asyncio.sleep(0.01)
    assert errors == []
    assert _left_open(db_url) == 0  # nothing reopened
    assert "could not release admission lease" in caplog.text
    assert sorted(map(str, _held_leases(db_url))) == ["('running',)", "('t1',)"]  # left behind

    fresh = Ledger(db_url)
    try:
        again = _agent(fresh)
        done = await asyncio.wait_for(again.ainvoke(TASK, config, context=CTX), timeout=20)
        assert done["outcome"]["terminated_reason"] == "completed", done["outcome"]
        assert _held_leases(db_url) == []
    finally:
        await fresh.aclose()


async def test_a_run_keeps_its_outcome_when_its_ledger_is_closed_under_it(db_url: str) -> None:
    """The app closes the ledger while a run is inside a tool: the run still answers with its
    own outcome (what it could not give back or record is logged), and opens nothing again. A
    run started on the closed ledger ends as `error/storage`, its detail saying the ledger was
    closed, instead of reopening it."""
    ledger = Ledger(db_url)

    @tool
    async def shut() -> str:
        """Close the ledger under the run."""
        await ledger.aclose()
        return "closed"

    agent = build_agent(
        ScriptedChatModel(script=[call("shut"), "Done."], fresh_ids=True),
        [shut],
        policy=Policy(
            rules=(Rule(tool="shut", action="allow"),),
            admission=AdmissionPolicy(tenant_running=1),
        ),
        ledger=ledger,
        checkpointer=InMemorySaver(),
    )
    first = await agent.ainvoke(TASK, {"configurable": {"thread_id": "t1"}}, context=CTX)
    assert first["outcome"]["terminated_reason"] == "completed", first["outcome"]
    assert _left_open(db_url) == 0
    later = agent.invoke(TASK, {"configurable": {"thread_id": "t2"}}, context=CTX)
    assert (later["outcome"]["status"], later["outcome"]["terminated_reason"]) == (
        "error",
        "storage",
    )
    assert "was closed" in later["outcome"]["detail"]
    assert _left_open(db_url) == 0
