"""Storage that fails mid-run, on a real PostgreSQL (and Chroma): connections killed with
`pg_terminate_backend` while a run is in flight, all of a pool's connections killed at once,
a memory store whose collection is gone.

Retried where it is safe (the ledger replays a transaction that surely did not commit on a
fresh connection; the sync checkpointer retries reads and idempotent upserts), and otherwise
one typed error: `keel.StorageError` (category `storage`, `in_doubt` when a commit may have
happened).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from langchain_core.messages import ToolMessage
from test_checkpoint_postgres import _connections, _terminate_all

from keel import (
    AuditLog,
    Ledger,
    Persistence,
    RunContext,
    RunLog,
    StorageError,
    build_agent,
    tool,
)
from keel.db.idempotency import claim_flow, finish_flow
from keel.db.ledger import Flow, durable
from keel.evals import ScriptedChatModel, call
from keel.guards import BreakerPolicy, Budget, PeriodBudget, Policy, RateLimit, Rule
from keel.guards.standing import StandingStore
from keel.memory import ChromaStore, user_namespace

CTX = RunContext(user_id="u1", tenant_id="acme")
POLICY = Policy(
    name="kills",
    budget=Budget(model_calls=50, tool_calls=50, usd=100),
    period_budgets=(PeriodBudget(scope="user", period="month", usd=100),),
    rules=(Rule(tool="*", action="allow"),),
    rate_limits=(RateLimit(rpm=10_000, tpm=10_000_000),),
    model_breaker=BreakerPolicy(failure_threshold=3, cooldown_seconds=30),
    tool_breaker=BreakerPolicy(failure_threshold=3, cooldown_seconds=30),
)


class InFlightKiller:
    """Kills a connection *inside* a transaction: `arm(table)` locks the table from an admin
    connection; the next statement that touches it waits on the lock, and a thread terminates
    that waiting backend, then releases the lock. Deterministic, and never an idle connection
    (those the pool's health check replaces before use)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.killed: list[str] = []
        self._threads: list[threading.Thread] = []

    def arm(self, table: str, *, mode: str = "ACCESS EXCLUSIVE", **kwargs: Any) -> None:
        """Lock `table` in `mode` until the statement waiting on it was killed."""
        self.hold(f"LOCK TABLE {table} IN {mode} MODE", table, **kwargs)

    def hold(self, lock_sql: str, label: str, *, times: int = 1, then: str | None = None) -> None:
        """Take a lock with `lock_sql` in a transaction; kill `times` backends that wait on it,
        one after the other; then run `then` and commit (or roll back), releasing it."""
        admin = psycopg.connect(self.url)
        admin.execute(lock_sql)  # held until the transaction ends
        args = (admin, label, times, then)
        thread = threading.Thread(target=self._kill_waiters, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _kill_waiters(
        self, admin: psycopg.Connection[Any], label: str, times: int, then: str | None
    ) -> None:
        waiting = (
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid() AND pid <> ALL(%s)"
        )
        gate: list[tuple[psycopg.Connection[Any], threading.Thread]] = []
        with psycopg.connect(self.url, autocommit=True) as killer:
            deadline, killed = time.monotonic() + 20, set()
            while time.monotonic() < deadline and len(killed) < times:
                ours = [conn.info.backend_pid for conn, _ in gate]
                pids = {row[0] for row in killer.execute(waiting, (ours,)).fetchall()} - killed
                if pids and then is not None and not gate:
                    gate.append(self._queue_behind(admin, killer, label))
                    continue  # the waiter's replay now reads only after `then` commits
                for pid in list(pids)[: times - len(killed)]:
                    killer.execute("SELECT pg_terminate_backend(%s)", (pid,))
                    killed.add(pid)
                    self.killed.append(label)
                time.sleep(0.01)
        if then is not None:
            admin.execute(then)
            admin.commit()
        admin.rollback()
        admin.close()
        for conn, locker in gate:
            locker.join(timeout=10)
            conn.close()

    def _queue_behind(
        self, admin: psycopg.Connection[Any], killer: psycopg.Connection[Any], table: str
    ) -> tuple[psycopg.Connection[Any], threading.Thread]:
        """Queue an ACCESS EXCLUSIVE lock on `table` behind `admin`'s, from a connection of
        its own: PostgreSQL queues any later request behind it, so the killed transaction's
        replay reads the table only after `admin` committed `then` (no race with the replay)."""
        gate = psycopg.connect(self.url)
        ready = threading.Event()

        def lock() -> None:
            ready.set()
            gate.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            gate.rollback()

        locker = threading.Thread(target=lock, daemon=True)
        locker.start()
        ready.wait()
        pid, deadline = gate.info.backend_pid, time.monotonic() + 10
        probe = "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s"
        while time.monotonic() < deadline:
            row = killer.execute(probe, (pid,)).fetchone()
            if row is not None and row[0] == "Lock":
                break
            time.sleep(0.005)
        return gate, locker

    def join(self) -> None:
        for thread in self._threads:
            thread.join(timeout=30)


def _agent(url: str, saver: Any, ledger: Ledger, killed: list[int], kills: int = 3) -> Any:
    @tool(risk="write")
    def kill_connections(text: str) -> str:
        """Terminate every connection to the database (the tool runs mid-run)."""
        killed.append(_terminate_all(url))
        return f"killed {text}"

    script: list[Any] = [call("kill_connections", text=f"k{i}") for i in range(kills)]
    model = ScriptedChatModel(script=[*script, "done"])
    return build_agent(model, [kill_connections], policy=POLICY, ledger=ledger, checkpointer=saver)


def _texts(messages: Any) -> list[str]:
    return [str(m.content) for m in messages if isinstance(m, ToolMessage)]


@pytest.mark.postgres
def test_sync_run_survives_killed_connections(fresh_postgres_url: str) -> None:
    killed: list[int] = []
    ledger = Ledger(fresh_postgres_url)
    with Persistence(fresh_postgres_url).checkpointer() as saver:
        agent = _agent(fresh_postgres_url, saver, ledger, killed)
        config: Any = {"configurable": {"thread_id": "t"}}
        result = agent.invoke({"messages": [("user", "go")]}, config, context=CTX)
        assert result["outcome"]["terminated_reason"] == "completed", result["outcome"]
        assert len(killed) == 3 and all(n >= 1 for n in killed)
        assert _texts(agent.get_state(config).values["messages"]) == [
            "killed k0", "killed k1", "killed k2"
        ]  # fmt: skip
    ledger.close()


@pytest.mark.postgres
async def test_async_run_survives_killed_connections(fresh_postgres_url: str) -> None:
    killed: list[int] = []
    ledger = Ledger(fresh_postgres_url)
    async with Persistence(fresh_postgres_url).acheckpointer() as saver:
        agent = _agent(fresh_postgres_url, saver, ledger, killed)
        config: Any = {"configurable": {"thread_id": "t"}}
        result = await agent.ainvoke({"messages": [("user", "go")]}, config, context=CTX)
        assert result["outcome"]["terminated_reason"] == "completed", result["outcome"]
        assert len(killed) == 3 and all(n >= 1 for n in killed)
        state = await agent.aget_state(config)
        assert _texts(state.values["messages"]) == ["killed k0", "killed k1", "killed k2"]
    await ledger.aclose()


IN_FLIGHT = (  # (table locked, what waits on it): one kill per tool step
    "keel_tool_calls",  # the idempotency ledger's finish, right after the effect
    "checkpoint_writes",  # the tools node's writes
    "keel_spend",  # the period budget's reserve before the next model call
    "keel_rate_buckets",  # the rate limiter's bucket
    "keel_breakers",  # the model breaker's read
    "checkpoints",  # the next checkpoint
)


def _killing_agent(killer: InFlightKiller, saver: Any, ledger: Ledger, world: list[str]) -> Any:
    @tool(risk="write")
    def charge(step: int) -> str:
        """Charge the customer once, then lock a ledger table so the next write is killed."""
        world.append(f"charged {step}")
        killer.arm(IN_FLIGHT[step])
        return f"charged {step}"

    script: list[Any] = [call("charge", step=i) for i in range(len(IN_FLIGHT))]
    model = ScriptedChatModel(script=[*script, "done"])
    return build_agent(model, [charge], policy=POLICY, ledger=ledger, checkpointer=saver)


@pytest.mark.postgres
def test_sync_run_survives_connections_killed_inside_transactions(fresh_postgres_url: str) -> None:
    killer, world = InFlightKiller(fresh_postgres_url), []
    ledger = Ledger(fresh_postgres_url)
    with Persistence(fresh_postgres_url).checkpointer() as saver:
        agent = _killing_agent(killer, saver, ledger, world)
        config: Any = {"configurable": {"thread_id": "t"}}
        result = agent.invoke({"messages": [("user", "go")]}, config, context=CTX)
        killer.join()
        assert result["outcome"]["terminated_reason"] == "completed", result["outcome"]
        assert killer.killed == list(IN_FLIGHT)
        assert world == [f"charged {i}" for i in range(len(IN_FLIGHT))]  # each effect once
    ledger.close()


@pytest.mark.postgres
async def test_async_run_survives_connections_killed_inside_transactions(
    fresh_postgres_url: str,
) -> None:
    killer, world = InFlightKiller(fresh_postgres_url), []
    ledger = Ledger(fresh_postgres_url)
    async with Persistence(fresh_postgres_url).acheckpointer() as saver:
        agent = _killing_agent(killer, saver, ledger, world)
        config: Any = {"configurable": {"thread_id": "t"}}
        result = await agent.ainvoke({"messages": [("user", "go")]}, config, context=CTX)
        killer.join()
        assert result["outcome"]["terminated_reason"] == "completed", result["outcome"]
        assert killer.killed == list(IN_FLIGHT)
        assert world == [f"charged {i}" for i in range(len(IN_FLIGHT))]
    await ledger.aclose()


# -- the ledger alone: replay, in doubt, give up ---------------------------------------------

KEY = "user:u1"


def bump() -> Flow[float]:
    """Add 1 to u1's spend: read, then write (a flow as keel's own are written)."""
    rows = yield "SELECT spent_usd FROM keel_spend WHERE scope_key = ? AND period = 'p'", (KEY,)
    if rows:
        yield (
            "UPDATE keel_spend SET spent_usd = ? WHERE scope_key = ? AND period = 'p'",
            (
                rows[0][0] + 1,
                KEY,
            ),
        )
        return float(rows[0][0] + 1)
    yield "INSERT INTO keel_spend (scope_key, period, spent_usd) VALUES (?, 'p', 1)", (KEY,)
    return 1.0


def spent(url: str) -> list[Any]:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT spent_usd FROM keel_spend").fetchall()


@pytest.fixture
async def pg_ledger(fresh_postgres_url: str) -> AsyncIterator[Ledger]:
    ledger = Ledger(fresh_postgres_url)
    ledger.setup()
    yield ledger
    await ledger.aclose()


@pytest.mark.postgres
@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_transaction_killed_before_commit_is_replayed_once(
    pg_ledger: Ledger, mode: str
) -> None:
    killer = InFlightKiller(pg_ledger.url)
    assert pg_ledger.run(bump()) == 1.0
    killer.arm("keel_spend", mode="EXCLUSIVE")  # reads pass, the UPDATE waits and is killed
    result = pg_ledger.run(bump()) if mode == "sync" else await pg_ledger.arun(bump())
    killer.join()
    assert killer.killed == ["keel_spend"]
    assert result == 2.0 and spent(pg_ledger.url) == [(2.0,)]  # replayed, applied once


@pytest.mark.postgres
@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_replay_that_reads_other_rows_raises_storage_error(
    pg_ledger: Ledger, mode: str
) -> None:
    killer = InFlightKiller(pg_ledger.url)
    pg_ledger.run(bump())
    other = "UPDATE keel_spend SET spent_usd = 10"  # another process wrote meanwhile
    killer.arm("keel_spend", mode="EXCLUSIVE", then=other)
    with pytest.raises(StorageError, match="read other rows") as caught:
        pg_ledger.run(bump()) if mode == "sync" else await pg_ledger.arun(bump())
    killer.join()
    assert not caught.value.in_doubt and caught.value.category == "storage"
    assert spent(pg_ledger.url) == [(10.0,)]  # the other write stands; ours was not applied


@pytest.mark.postgres
@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_connection_killed_every_time_gives_up_with_storage_error(
    pg_ledger: Ledger, mode: str
) -> None:
    killer = InFlightKiller(pg_ledger.url)
    pg_ledger.run(bump())
    killer.arm("keel_spend", mode="EXCLUSIVE", times=3)
    with pytest.raises(StorageError, match="lost the connection 3 times") as caught:
        pg_ledger.run(bump()) if mode == "sync" else await pg_ledger.arun(bump())
    killer.join()
    assert not caught.value.in_doubt and killer.killed == ["keel_spend"] * 3
    assert spent(pg_ledger.url) == [(1.0,)]
    assert pg_ledger.run(bump()) == 2.0  # the ledger works again


WAIT_AT_COMMIT = (
    """CREATE FUNCTION wait_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN PERFORM pg_advisory_xact_lock_shared(4242); RETURN NULL; END $$""",
    """CREATE CONSTRAINT TRIGGER at_commit AFTER INSERT OR UPDATE ON keel_spend
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION wait_at_commit()""",
)


@pytest.mark.postgres
@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_connection_killed_while_committing_is_in_doubt(
    pg_ledger: Ledger, mode: str
) -> None:
    """A deferred trigger makes `COMMIT` wait on a lock, so the kill lands inside it: keel cannot
    know whether the write was applied, so it does not retry and says so."""
    with psycopg.connect(pg_ledger.url, autocommit=True) as admin:
        for statement in WAIT_AT_COMMIT:
            admin.execute(statement)
    killer = InFlightKiller(pg_ledger.url)
    killer.hold("SELECT pg_advisory_xact_lock(4242)", "commit")
    with pytest.raises(StorageError, match="while committing") as caught:
        pg_ledger.run(bump()) if mode == "sync" else await pg_ledger.arun(bump())
    killer.join()
    assert caught.value.in_doubt and killer.killed == ["commit"]
    assert spent(pg_ledger.url) == []  # not applied (here); keel could not know that


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_sqlite_failure_is_a_storage_error(tmp_path: Path, mode: str) -> None:
    (tmp_path / "keel.db").write_bytes(b"not a database" * 100)  # the file is broken
    ledger = Ledger(f"sqlite:///{tmp_path}/keel.db")
    with pytest.raises(StorageError, match="not a database") as caught:
        ledger.run(bump()) if mode == "sync" else await ledger.arun(bump())
    assert caught.value.category == "storage"
    (tmp_path / "keel.db").unlink()  # repaired: the same ledger works again
    assert ledger.run(bump()) == 1.0
    ledger.close()


# -- the ledger's pools recover at once after their connections die ----------------------------


def _burst(ledger: Ledger, n: int) -> None:
    """`n` transactions at once, so the pool grows to `n` connections."""
    threads = [threading.Thread(target=ledger.run, args=(_sleepy(),)) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _steps(ledger: Ledger) -> dict[str, Any]:
    """Every kind of ledger step a guarded run takes, each a callable."""
    standing = StandingStore(ledger)
    return {
        "standing approvals": lambda: standing.load(CTX),
        "spend": lambda: ledger.run(bump()),
        "audit": lambda: AuditLog(ledger).query(user="u1"),
        "runs": lambda: RunLog(ledger).query(),
    }


@pytest.mark.postgres
def test_ledger_steps_take_under_2_s_after_every_connection_died(fresh_postgres_url: str) -> None:
    ledger = Ledger(fresh_postgres_url, pool_max_size=8)
    ledger.setup()
    timings: dict[str, float] = {}
    for round_ in range(3):
        for _ in range(20):  # a burst of runs grows the pool to 8 connections (in the background)
            _burst(ledger, 8)
            if _connections(fresh_postgres_url) >= 8:
                break
        assert _terminate_all(fresh_postgres_url) >= 8
        for name, step in _steps(ledger).items():
            started = time.monotonic()
            step()
            timings[f"{round_}:{name}"] = time.monotonic() - started
    ledger.close()
    print("ledger steps after kills (s):", {k: round(v, 3) for k, v in timings.items()})
    assert max(timings.values()) < 2.0, timings


@pytest.mark.postgres
async def test_async_ledger_steps_take_under_2_s_after_every_connection_died(
    fresh_postgres_url: str,
) -> None:
    ledger = Ledger(fresh_postgres_url, pool_max_size=8)
    await ledger.asetup()
    standing = StandingStore(ledger)
    timings: list[float] = []
    for _ in range(3):
        for _ in range(20):  # a pool grows in the background: on a loaded machine, burst again
            await asyncio.gather(*(ledger.arun(_sleepy()) for _ in range(8)))
            if _connections(fresh_postgres_url) >= 8:
                break
        assert _terminate_all(fresh_postgres_url) >= 8
        for step in (standing.aload(CTX), ledger.arun(bump()), RunLog(ledger).aquery()):
            started = time.monotonic()
            await step
            timings.append(time.monotonic() - started)
    await ledger.aclose()
    print("async ledger steps after kills (s):", [round(t, 3) for t in timings])
    assert max(timings) < 2.0, timings


def _sleepy() -> Flow[None]:
    yield "SELECT pg_sleep(0.2)", ()


# -- a memory store that fails: the run goes on, warned -----------------------------------------


def _broken_store(path: Path) -> ChromaStore:
    """A real ChromaStore with a memory in it, whose database file is then emptied under it."""
    store = ChromaStore(path=path, index={"dims": 2, "embed": _embed, "fields": ["text"]})
    store.put(user_namespace(CTX), "pref", {"text": "likes tea"})
    with (path / "chroma.sqlite3").open("r+b") as file:
        file.truncate(0)
    with pytest.raises(Exception, match="no such table"):  # the store itself is broken
        store.search(user_namespace(CTX), query="tea")
    return store


def _embed(texts: list[str]) -> list[list[float]]:
    return [[t.count("tea") + 0.05, t.count("dog") + 0.05] for t in texts]


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_failing_memory_store_degrades_with_a_warning(
    tmp_path: Path, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = _broken_store(tmp_path / "chroma")
    ledger = Ledger(f"sqlite:///{tmp_path}/keel.db")
    model = ScriptedChatModel(script=["Tea, I guess."])
    agent = build_agent(model, [], store=store, memory=True, ledger=ledger)
    config: Any = {"configurable": {"thread_id": "m"}}
    task: Any = {"messages": [("user", "what do I like? tea?")]}
    with caplog.at_level("WARNING", logger="keel.memory"):
        if mode == "sync":
            result = agent.invoke(task, config, context=CTX)
        else:
            result = await agent.ainvoke(task, config, context=CTX)
    assert result["outcome"]["terminated_reason"] == "completed"
    assert [w.split(" (")[0] for w in result["warnings"]] == [
        "memory: recall failed, no memories used",
        "memory: reflect failed, the lesson was not stored",
    ]
    assert "no such table" in result["warnings"][0]
    assert "the store failed" in caplog.text
    (record,) = RunLog(ledger).query()
    assert record.status == "success" and "degraded: memory: recall failed" in record.detail
    ledger.close()


# -- which ledger writes wait for the disk (PostgreSQL) -----------------------------------------


def _recording(flow: Flow[Any], seen: list[str]) -> Flow[Any]:
    try:
        step = next(flow)
        while True:
            seen.append(step[0])
            step = flow.send((yield step))
    except StopIteration as done:
        return done.value


@pytest.mark.postgres
def test_only_claims_and_standing_approvals_commit_synchronously(pg_ledger: Ledger) -> None:
    """A claim is on disk before its tool runs; a result, spend or audit row need not be (a
    lost result leaves the call `started`: "did this happen?", never a second run)."""
    claims: list[str] = []
    others: list[str] = []
    key = ("t", "c1", "charge", "digest")
    pg_ledger.run(_recording(claim_flow(*key), claims))
    pg_ledger.run(_recording(claim_flow(*key, rerun_unknown=True), claims))
    pg_ledger.run(_recording(finish_flow("t", "c1", "completed", {"content": "ok"}), others))
    pg_ledger.run(_recording(bump(), others))
    # insert; then insert (conflict), select, re-claim
    assert [durable(sql) for sql in claims] == [True, True, False, True]
    assert not any(durable(sql) for sql in others)
    assert pg_ledger.run(_show_after(None)) == "off"  # the ledger's sessions
    claim = claim_flow("t", "c2", "charge", "digest")
    assert pg_ledger.run(_show_after(claim)) == "on"  # inside a claim's transaction


def _show_after(flow: Flow[Any] | None) -> Flow[str]:
    if flow is not None:
        yield from flow
    rows = yield "SHOW synchronous_commit", ()
    return str(rows[0][0])
