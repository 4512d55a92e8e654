"""A run whose checkpointer's database fails mid-run ends with `outcome = error / storage`.

The faults are real: a PostgreSQL backend terminated (twice, so the checkpointer's one retry on a
fresh connection fails too) while it waits on a lock, an SQLite connection switched to read-only,
an SQLite file locked by another connection, a connection closed under the saver. `invoke` /
`ainvoke` return the latest state with that outcome; a stream without `"values"` raises
`keel.StorageError` carrying it. Once the database is back the thread resumes and completes.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from langchain_core.messages import AIMessage
from langgraph.types import StateUpdate
from test_storage_faults import InFlightKiller

from keel import Ledger, Persistence, RunContext, StorageError, build_agent, tool
from keel.db.runs import RunLog
from keel.errors import UserError, _one_line
from keel.evals import ScriptedChatModel, call
from keel.guards import Policy, Rule

CTX = RunContext(user_id="u1", tenant_id="acme")
ALLOW = Policy(name="storage", rules=(Rule(tool="*", action="allow"),))


def _agent(saver: Any, fault: Callable[[], Any], ledger: Ledger | None = None) -> Any:
    """An agent whose tool breaks the storage once (the fault), then answers."""
    done: list[bool] = []

    @tool
    def lookup(order_id: str) -> str:
        """Look up an order (and, the first time, break the database)."""
        if not done:
            done.append(True)
            fault()
        return f"order {order_id}: delivered"

    model = ScriptedChatModel(script=[call("lookup", order_id="A1"), "It was delivered."])
    return build_agent(model, [lookup], policy=ALLOW, checkpointer=saver, ledger=ledger)


def _assert_storage(result: Any) -> None:
    ended = result["outcome"]
    assert ended["status"] == "error" and ended["terminated_reason"] == "storage", ended
    assert "not saved" in ended["detail"] and "resume" in ended["detail"]


def test_sqlite_turned_read_only_mid_run_ends_with_a_storage_outcome(tmp_path: Path) -> None:
    with Persistence(f"sqlite:///{tmp_path}/k.db").checkpointer() as saver:
        agent = _agent(saver, lambda: saver.conn.execute("PRAGMA query_only = ON"))
        config: Any = {"configurable": {"thread_id": "ro"}}
        result = agent.invoke({"messages": [("user", "where is A1?")]}, config, context=CTX)
        _assert_storage(result)
        assert "readonly" in result["outcome"]["detail"]
        assert result["messages"][0].content == "where is A1?"  # the latest state it reached
        saver.conn.execute("PRAGMA query_only = OFF")  # the database is back: resume
        done = agent.invoke(None, config, context=CTX)
        assert done["outcome"]["terminated_reason"] == "completed", done["outcome"]
        assert done["messages"][-1].content == "It was delivered."


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_run_that_ends_on_storage_still_writes_its_run_record(
    tmp_path: Path, mode: str
) -> None:
    """The checkpointer's database fails mid-run; the ledger (its own file here) still takes
    writes: the run has a run record saying `storage`, as every run has one. Its graph never
    reached the route that records a finished run."""
    ledger = Ledger(f"sqlite:///{tmp_path}/ledger.db")
    config: Any = {"configurable": {"thread_id": "recorded"}}
    if mode == "sync":
        with Persistence(f"sqlite:///{tmp_path}/k.db").checkpointer() as saver:
            flip = lambda: saver.conn.execute("PRAGMA query_only = ON")  # noqa: E731
            agent = _agent(saver, flip, ledger)
            _assert_storage(agent.invoke({"messages": [("user", "go")]}, config, context=CTX))
        records = RunLog(ledger).query()
    else:
        async with Persistence(f"sqlite:///{tmp_path}/k.db").acheckpointer() as asaver:
            loop = asyncio.get_running_loop()

            def read_only() -> None:
                asyncio.run_coroutine_threadsafe(
                    asaver.conn.execute("PRAGMA query_only = ON"), loop
                ).result(timeout=10)

            agent = _agent(asaver, read_only, ledger)
            _assert_storage(
                await agent.ainvoke({"messages": [("user", "go")]}, config, context=CTX)
            )
        records = await RunLog(ledger).aquery()
    assert [(r.thread_id, r.terminated_reason, r.user_id) for r in records] == [
        ("recorded", "storage", "u1")
    ]
    assert "readonly" in records[0].detail and records[0].graph == "keel_agent"
    await ledger.aclose()


def test_a_run_whose_thread_cannot_be_read_still_writes_its_run_record(tmp_path: Path) -> None:
    """The checkpointer's connection is gone before the run can read its thread: the run ends
    before its stream begins, with the `storage` outcome and a run record saying so."""
    ledger = Ledger(f"sqlite:///{tmp_path}/ledger.db")
    with Persistence(f"sqlite:///{tmp_path}/k.db").checkpointer() as saver:
        agent = _agent(saver, lambda: None, ledger)
        config: Any = {"configurable": {"thread_id": "gone"}}
        first = agent.invoke({"messages": [("user", "go")]}, config, context=CTX)
        assert first["outcome"]["terminated_reason"] == "completed"
        saver.conn.close()  # type: ignore[attr-defined]
        result = agent.invoke({"messages": [("user", "again")]}, config, context=CTX)
    assert result["outcome"]["terminated_reason"] == "storage", result["outcome"]
    assert "closed database" in result["outcome"]["detail"]
    records = RunLog(ledger).query()
    assert [(r.thread_id, r.terminated_reason) for r in records] == [
        ("gone", "completed"),
        ("gone", "storage"),
    ]
    ledger.close()


async def test_a_closed_async_sqlite_connection_ends_with_a_storage_outcome(
    tmp_path: Path,
) -> None:
    """aiosqlite raises a bare `ValueError` on a closed connection; keel's async saver raises
    what the sync one does, so the run ends as `storage` (with its run record), not in a
    traceback."""
    ledger = Ledger(f"sqlite:///{tmp_path}/ledger.db")
    async with Persistence(f"sqlite:///{tmp_path}/k.db").acheckpointer() as saver:
        agent = _agent(saver, lambda: None, ledger)
        config: Any = {"configurable": {"thread_id": "agone"}}
        first = await agent.ainvoke({"messages": [("user", "go")]}, config, context=CTX)
        assert first["outcome"]["terminated_reason"] == "completed"
        await saver.conn.close()  # type: ignore[attr-defined]
        result = await agent.ainvoke({"messages": [("user", "again")]}, config, context=CTX)
    assert result["outcome"]["terminated_reason"] == "storage", result["outcome"]
    assert "closed database" in result["outcome"]["detail"]
    records = await RunLog(ledger).aquery()
    assert [r.terminated_reason for r in records] == ["completed", "storage"]
    await ledger.aclose()


def test_sqlite_locked_by_another_connection_ends_with_a_storage_outcome(tmp_path: Path) -> None:
    path = tmp_path / "k.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)

    def lock() -> None:
        saver.conn.execute("PRAGMA busy_timeout = 50")
        other.execute("BEGIN EXCLUSIVE")

    with Persistence(f"sqlite:///{path}").checkpointer() as saver:
        agent = _agent(saver, lock)
        config: Any = {"configurable": {"thread_id": "locked"}}
        result = agent.invoke({"messages": [("user", "where is A1?")]}, config, context=CTX)
        _assert_storage(result)
        assert "locked" in result["outcome"]["detail"]
        other.execute("COMMIT")
        done = agent.invoke(None, config, context=CTX)
        assert done["outcome"]["terminated_reason"] == "completed", done["outcome"]
    other.close()


async def test_async_sqlite_read_only_ends_with_a_storage_outcome(tmp_path: Path) -> None:
    async with Persistence(f"sqlite:///{tmp_path}/k.db").acheckpointer() as saver:
        loop = asyncio.get_running_loop()

        def read_only() -> None:  # the tool runs in a worker thread; aiosqlite's loop is ours
            asyncio.run_coroutine_threadsafe(
                saver.conn.execute("PRAGMA query_only = ON"), loop
            ).result(timeout=10)

        agent = _agent(saver, read_only)
        config: Any = {"configurable": {"thread_id": "aro"}}
        result = await agent.ainvoke({"messages": [("user", "where is A1?")]}, config, context=CTX)
        _assert_storage(result)
        await saver.conn.execute("PRAGMA query_only = OFF")
        done = await agent.ainvoke(None, config, context=CTX)
        assert done["outcome"]["terminated_reason"] == "completed", done["outcome"]


def test_a_stream_without_values_raises_storage_error_carrying_the_outcome(
    tmp_path: Path,
) -> None:
    with Persistence(f"sqlite:///{tmp_path}/k.db").checkpointer() as saver:
        agent = _agent(saver, lambda: saver.conn.execute("PRAGMA query_only = ON"))
        config: Any = {"configurable": {"thread_id": "updates"}}
        seen: list[Any] = []
        with pytest.raises(StorageError) as caught:
            for chunk in agent.stream(
                {"messages": [("user", "go")]}, config, context=CTX, stream_mode="updates"
            ):
                seen.append(chunk)
        assert seen, "the run streamed its first steps before the fault"
        assert caught.value.outcome is not None
        assert caught.value.outcome["terminated_reason"] == "storage"
        assert isinstance(caught.value.__cause__, sqlite3.OperationalError)


def test_a_values_stream_ends_with_a_chunk_carrying_the_outcome(tmp_path: Path) -> None:
    with Persistence(f"sqlite:///{tmp_path}/k.db").checkpointer() as saver:
        agent = _agent(saver, lambda: saver.conn.execute("PRAGMA query_only = ON"))
        config: Any = {"configurable": {"thread_id": "values"}}
        chunks = list(
            agent.stream(
                {"messages": [("user", "go")]}, config, context=CTX,
                stream_mode=["updates", "values"],
            )
        )  # fmt: skip
        mode, last = chunks[-1]
        assert mode == "values"
        _assert_storage(last)


def test_storage_gone_before_the_run_starts_still_ends_with_an_outcome(tmp_path: Path) -> None:
    with Persistence(f"sqlite:///{tmp_path}/k.db").checkpointer() as saver:
        agent = _agent(saver, lambda: None)
        saver.conn.close()  # the thread's first read fails
        result = agent.invoke(
            {"messages": [("user", "go")]}, {"configurable": {"thread_id": "x"}}, context=CTX
        )
        ended = result["outcome"]
        assert (ended["status"], ended["terminated_reason"]) == ("error", "storage"), ended
        # nothing was saved, not even the message: `invoke(None)` would find no thread to resume
        assert "Nothing of this run was written" in ended["detail"], ended
        assert "send its input again" in ended["detail"], ended
        assert set(result) == {"outcome"}  # no state was read, none is made up


class KillUntilDone:
    """Locks LangGraph's `checkpoints` table and terminates every backend that waits on it
    (the checkpointer's writes, and each of its retries on a fresh connection) until `stop()`:
    the database is reachable, but no checkpoint write gets through."""

    def __init__(self, url: str) -> None:
        self.url, self.killed = url, 0
        self._stop, self._locked = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._locked.wait(timeout=10)

    def _run(self) -> None:
        waiting = (
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
        )
        with psycopg.connect(self.url) as admin, psycopg.connect(self.url, autocommit=True) as k:
            admin.execute("LOCK TABLE checkpoints IN ACCESS EXCLUSIVE MODE")
            self._locked.set()
            deadline = time.monotonic() + 30
            while not self._stop.is_set() and time.monotonic() < deadline:
                for (pid,) in k.execute(waiting).fetchall():
                    k.execute("SELECT pg_terminate_backend(%s)", (pid,))
                    self.killed += 1
                time.sleep(0.01)
            admin.rollback()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


@pytest.mark.postgres
def test_postgres_connections_killed_twice_end_with_a_storage_outcome(
    fresh_postgres_url: str,
) -> None:
    killer = InFlightKiller(fresh_postgres_url)
    with Persistence(fresh_postgres_url).checkpointer() as saver:
        agent = _agent(saver, lambda: killer.arm("checkpoints", times=2))
        config: Any = {"configurable": {"thread_id": "pg"}}
        result = agent.invoke({"messages": [("user", "where is A1?")]}, config, context=CTX)
        killer.join()
        _assert_storage(result)
        assert killer.killed == ["checkpoints", "checkpoints"]  # the write and its one retry
        assert "lost its PostgreSQL connection twice" in result["outcome"]["detail"]
        done = agent.invoke(None, config, context=CTX)
        assert done["outcome"]["terminated_reason"] == "completed", done["outcome"]


@pytest.mark.postgres
async def test_async_postgres_connections_killed_end_with_a_storage_outcome(
    fresh_postgres_url: str,
) -> None:
    killer = KillUntilDone(fresh_postgres_url)
    async with Persistence(fresh_postgres_url).acheckpointer() as saver:
        agent = _agent(saver, killer.start)
        config: Any = {"configurable": {"thread_id": "apg"}}
        result = await agent.ainvoke({"messages": [("user", "where is A1?")]}, config, context=CTX)
        await asyncio.to_thread(killer.stop)
        _assert_storage(result)
        assert killer.killed >= 2  # the group commit and its retry on a fresh connection
        done = await agent.ainvoke(None, config, context=CTX)
        assert done["outcome"]["terminated_reason"] == "completed", done["outcome"]


def _database_url(database: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A SQLite file in `tmp_path`, or a fresh PostgreSQL database."""
    if database == "sqlite":
        return f"sqlite:///{tmp_path / 'sync.db'}"
    return str(request.getfixturevalue("fresh_postgres_url"))


@pytest.mark.parametrize(
    "database", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
async def test_an_async_run_on_a_sync_checkpointer_is_refused_before_it_starts(
    database: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """LangGraph's sync savers raise `NotImplementedError` under `ainvoke`: not a storage failure.

    The run was ending as `error / storage` ("...once the checkpointer is fixed"), as if the
    database had failed; it is a `UserError` naming `acheckpointer()`, and nothing is written.
    """
    url = _database_url(database, tmp_path, request)
    with Persistence(url).checkpointer() as saver:
        agent = _agent(saver, lambda: None)
        config: Any = {"configurable": {"thread_id": "sync"}}
        sent = {"messages": [("user", "where is A1?")]}
        with pytest.raises(UserError, match=r"acheckpointer\(\) as saver"):
            await agent.ainvoke(sent, config, context=CTX)
        with pytest.raises(UserError, match="sync only"):
            async for _ in agent.astream(sent, config, context=CTX):
                pass
        assert agent.get_state(config).values == {}  # refused before anything was written
        done = agent.invoke(sent, config, context=CTX)  # the sync entry points still run
        assert done["outcome"]["terminated_reason"] == "completed", done["outcome"]


@pytest.mark.parametrize(
    "database", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
async def test_each_async_state_call_on_a_sync_checkpointer_is_refused_naming_acheckpointer(
    database: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """`aget_state`, `aget_state_history`, `aupdate_state` (and `abulk_update_state`) raised
    LangGraph's bare `NotImplementedError` ("Consider using AsyncSqliteSaver"): a `UserError`
    naming the call and keel's `acheckpointer()`, as `ainvoke`'s; the update writes nothing."""
    url = _database_url(database, tmp_path, request)
    with Persistence(url).checkpointer() as saver:
        agent = _agent(saver, lambda: None)
        config: Any = {"configurable": {"thread_id": "sync"}}
        agent.invoke({"messages": [("user", "where is A1?")]}, config, context=CTX)
        before = agent.get_state(config)
        note = {"messages": [AIMessage("A note.")]}

        async def history() -> list[Any]:
            return [s async for s in agent.aget_state_history(config)]

        calls: dict[str, Callable[[], Awaitable[Any]]] = {
            "aget_state": lambda: agent.aget_state(config, subgraphs=True),
            "aget_state_history": history,
            "aupdate_state": lambda: agent.aupdate_state(config, note),
            "abulk_update_state": lambda: agent.abulk_update_state(
                config, [[StateUpdate(note, None)]]
            ),
        }
        for name, call in calls.items():
            with pytest.raises(UserError, match=r"acheckpointer\(\) as saver") as refused:
                await call()
            assert name.removeprefix("abulk_") in str(refused.value), refused.value
            assert "sync only" in str(refused.value)
        after = agent.get_state(config)
        assert after.config == before.config and after.values == before.values  # nothing written


@pytest.mark.parametrize(
    ("exc", "line"),
    [
        (  # libpq's connect failure: its own hint goes, the caller says keel's
            psycopg.OperationalError(
                'connection failed: connection to server at "127.0.0.1", port 1 failed: '
                "Connection refused\n\tIs the server running on that host and accepting TCP/IP "
                "connections?"
            ),
            'connection failed: connection to server at "127.0.0.1", port 1 failed: '
            "Connection refused",
        ),
        (
            psycopg.OperationalError("server closed the connection\n\tunexpectedly."),
            "server closed the connection unexpectedly",
        ),
        (StorageError("the ledger failed.", fix="Resume the run."), "the ledger failed"),
        (TimeoutError(), "TimeoutError"),
    ],
)
def test_every_error_set_in_a_message_is_clipped_the_same_one_line_way(
    exc: BaseException, line: str
) -> None:
    """One clipper for the checkpointer, the ledger, `Persistence` and run outcomes: the
    ledger's kept libpq's hint and the period ("...accepting TCP/IP connections?. Nothing was
    written"), the checkpointer's gave "" for an error without text."""
    assert _one_line(exc) == line
