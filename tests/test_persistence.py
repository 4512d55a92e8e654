"""`keel.db.persistence` on real SQLite and real PostgreSQL (the `db_url` fixture runs both)."""

from __future__ import annotations

import asyncio
import operator
import re
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import Annotated, Any, Literal, TypedDict

import psycopg
import pytest
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.postgres import PostgresSaver
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, interrupt

from keel.db.persistence import Persistence, ThreadSummary, default_db_url
from keel.errors import SetupError, UserError

Mode = Literal["sync", "async"]
MODES: list[Mode] = ["sync", "async"]
UNREACHABLE = "postgresql://postgres:hunter2@127.0.0.1:1/test"


class State(TypedDict, total=False):
    n: Annotated[list[int], operator.add]
    answer: str


def _count(state: State) -> State:
    return {"n": [len(state.get("n", []))]}


def _ask(state: State) -> State:
    return {"answer": interrupt("approve?")}


def _graph(*, ask: bool) -> StateGraph[State]:
    builder = StateGraph(State)
    builder.add_node("count", _count)
    builder.add_edge(START, "count")
    if ask:
        builder.add_node("ask", _ask)
        builder.add_edge("count", "ask")
        builder.add_edge("ask", END)
    else:
        builder.add_edge("count", END)
    return builder


async def _run(url: str, mode: Mode, graph_input: Any, thread: str, *, ask: bool) -> Any:
    """Invoke a graph on one thread through a NEW Persistence (a new connection or pool)."""
    config: Any = {"configurable": {"thread_id": thread}}
    if mode == "sync":
        with Persistence(url).checkpointer() as saver:
            return _graph(ask=ask).compile(checkpointer=saver).invoke(graph_input, config)
    async with Persistence(url).acheckpointer() as asaver:
        return await _graph(ask=ask).compile(checkpointer=asaver).ainvoke(graph_input, config)


async def _raises_setup_error(call: Any) -> SetupError:
    """Call a sync or async entry point (checkpointer or not); return the SetupError it raised."""
    with pytest.raises(SetupError) as info:
        result = call()
        if hasattr(result, "__aenter__"):
            async with result:
                pass
        elif hasattr(result, "__enter__"):
            with result:
                pass
        elif asyncio.iscoroutine(result):
            await result
    assert not isinstance(info.value.__cause__, psycopg.errors.UndefinedTable)
    return info.value


# -- URLs and arguments ---------------------------------------------------------------------


def test_url_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = Persistence("sqlite:///data/keel.db")
    assert (relative.url, relative.backend) == ("sqlite:///data/keel.db", "sqlite")
    relative.setup()  # relative to the cwd, parent folder created
    assert (tmp_path / "data" / "keel.db").is_file()
    assert Persistence(f"sqlite:///{tmp_path}/abs.db").backend == "sqlite"
    memory = Persistence("sqlite:///:memory:")
    assert memory.list_threads() == []
    memory.check()  # each connection gets a new, empty database: nothing to set up beforehand
    assert Persistence("postgres://u@h:5432/db").url == "postgresql://u@h:5432/db"
    assert Persistence("postgresql://u@h/db").backend == "postgres"


def test_default_url_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEEL_DB_URL", raising=False)
    assert default_db_url() == Persistence().url == "sqlite:///.keel/keel.db"
    monkeypatch.setenv("KEEL_DB_URL", "postgres://app@db/prod")
    assert Persistence().url == "postgresql://app@db/prod"


@pytest.mark.parametrize(
    "url",
    [
        "mysql://root:hunter2@db/app",
        "postgresql+psycopg://app:hunter2@db/app",
        "sqlite://relative.db",
        "sqlite:///",
        "sqlite:///x.db?mode=ro",
        "http://example.com",
        "keel.db",
        "",
        42,
    ],
)
def test_bad_urls_name_the_accepted_forms(url: Any) -> None:
    with pytest.raises(UserError, match=re.escape("Accepted forms: sqlite:///relative/path.db")):
        Persistence(url)


def test_passwords_never_appear_in_messages_or_repr() -> None:
    with pytest.raises(UserError) as info:
        Persistence("mysql://root:hunter2@db/app")
    assert "mysql://root:***@db/app" in str(info.value) and "hunter2" not in str(info.value)
    assert "hunter2" not in repr(Persistence("postgresql://h/db?password=hunter2"))
    assert repr(Persistence(UNREACHABLE)) == (
        "Persistence('postgresql://postgres:***@127.0.0.1:1/test', setup=True)"
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pool_min_size": -1}, "pool_min_size=...) must be an integer >= 0, got -1"),
        ({"pool_max_size": 0}, "pool_max_size=...) must be an integer >= 1, got 0"),
        ({"pool_max_size": True}, "pool_max_size=...) must be an integer >= 1, got True"),
        ({"pool_min_size": 5, "pool_max_size": 2}, "pool_min_size=5) exceeds pool_max_size=2"),
        ({"prepare_threshold": -1}, "prepare_threshold=...) must be None"),
        ({"pool_timeout": 0}, "pool_timeout=...) must be a positive number of seconds, got 0"),
        ({"max_idle": -1.0}, "max_idle=...) must be a positive number"),
        ({"max_lifetime": "1h"}, "max_lifetime=...) must be a positive number"),
        ({"setup": "yes"}, "setup=...) must be True or False, got 'yes'"),
    ],
)
def test_bad_arguments_name_the_field(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        Persistence("sqlite:///:memory:", **kwargs)


@pytest.mark.parametrize("limit", [0, -3, 2.5, True])
def test_list_threads_rejects_a_bad_limit(limit: Any) -> None:
    with pytest.raises(UserError, match=r"limit=\.\.\.\) must be an integer >= 1"):
        Persistence("sqlite:///:memory:").list_threads(limit=limit)


def test_list_threads_on_a_foreign_checkpointer_is_a_user_error_not_a_type_error() -> None:
    """A careless subclass hands list_threads a saver keel cannot read: say what to do."""
    from collections.abc import Iterator
    from contextlib import contextmanager

    from langgraph.checkpoint.memory import InMemorySaver

    class Mine(Persistence):
        @contextmanager
        def checkpointer(self) -> Iterator[Any]:
            yield InMemorySaver()

    with pytest.raises(UserError, match="got a InMemorySaver: do not override"):
        Mine("sqlite:///:memory:").list_threads()


# -- checkpointers on both backends ---------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_state_persists_across_checkpointers(db_url: str, mode: Mode) -> None:
    assert await _run(db_url, mode, {"n": []}, "t1", ask=False) == {"n": [0]}
    assert await _run(db_url, mode, {"n": []}, "t1", ask=False) == {"n": [0, 1]}
    assert await _run(db_url, mode, {"n": []}, "other", ask=False) == {"n": [0]}


@pytest.mark.parametrize("mode", MODES)
async def test_interrupt_resumes_from_a_new_persistence(db_url: str, mode: Mode) -> None:
    paused = await _run(db_url, mode, {"n": []}, "t1", ask=True)
    assert [i.value for i in paused["__interrupt__"]] == ["approve?"]
    [row] = Persistence(db_url).list_threads()
    assert (row.thread_id, row.next, row.values) == ("t1", ("ask",), {"n": [0]})
    final = await _run(db_url, mode, Command(resume="yes"), "t1", ask=True)
    assert final == {"n": [0], "answer": "yes"}
    [row] = Persistence(db_url).list_threads()
    assert (row.next, row.values) == ((), {"n": [0], "answer": "yes"})


async def test_no_saver_copies_a_thread_so_a_copy_cannot_run_a_call_twice(db_url: str) -> None:
    """Pinned: LangGraph's `copy_thread` / `acopy_thread` is not implemented by keel's savers
    (nor LangGraph's `InMemorySaver`). The ledger keeps a call at most once per thread; a copy,
    the same calls under another thread id, could run each again (served, `threads.copy` is
    refused for that reason). A LangGraph that implements it fails this test: keel's
    at-most-once must then learn to tell a copy (README, "Durable side effects")."""
    await _run(db_url, "sync", {"n": []}, "t1", ask=True)
    with Persistence(db_url).checkpointer() as saver, pytest.raises(NotImplementedError):
        saver.copy_thread("t1", "t2")
    async with Persistence(db_url).acheckpointer() as asaver:
        with pytest.raises(NotImplementedError):
            await asaver.acopy_thread("t1", "t2")
    with pytest.raises(NotImplementedError):
        InMemorySaver().copy_thread("t1", "t2")
    assert [row.thread_id for row in Persistence(db_url).list_threads()] == ["t1"]


async def test_list_threads_newest_first_with_values(db_url: str) -> None:
    assert Persistence(db_url).list_threads() == []
    for thread in ["a", "b", "c", "a"]:
        await _run(db_url, "sync", {"n": []}, thread, ask=False)
    rows = Persistence(db_url).list_threads()
    assert [(r.thread_id, r.values["n"], r.next) for r in rows] == [
        ("a", [0, 1], ()),
        ("c", [0], ()),
        ("b", [0], ()),
    ]
    assert all(isinstance(r, ThreadSummary) and r.updated_at and r.checkpoint_id for r in rows)
    assert rows[0].updated_at > rows[1].updated_at > rows[2].updated_at  # type: ignore[operator]
    assert [r.thread_id for r in Persistence(db_url).list_threads(limit=2)] == ["a", "c"]


@pytest.mark.parametrize("mode", MODES)
async def test_check_before_and_after_setup(db_url: str, mode: Mode) -> None:
    persistence = Persistence(db_url)
    check, setup = (
        (persistence.check, persistence.setup)
        if mode == "sync"
        else (persistence.acheck, persistence.asetup)
    )
    error = await _raises_setup_error(check)
    assert "Run `keel db setup --db" in str(error) or "run `keel db setup`" in str(error)
    for _ in range(2):  # idempotent
        await _raises_nothing(setup())
    await _raises_nothing(check())


@pytest.mark.parametrize("mode", MODES)
async def test_check_of_a_sqlite_file_without_checkpoint_tables_says_run_setup(
    tmp_path: Path, mode: Mode
) -> None:
    """The file opens, but `check` / `acheck` find no checkpoint tables in it: the fix."""
    path = tmp_path / "other.db"
    with closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE notes (body TEXT)")
    persistence = Persistence(f"sqlite:///{path}")
    check = persistence.check if mode == "sync" else persistence.acheck
    error = await _raises_setup_error(check)
    assert 'has no LangGraph checkpoint tables (relation "checkpoints" does not exist)' in str(
        error
    )
    assert f"Run `keel db setup --db sqlite:///{path}` once" in str(error)


async def _raises_nothing(result: Any) -> None:
    if asyncio.iscoroutine(result):
        await result


# -- PostgreSQL: setup once, setup=False, unreachable, dropped connections -------------------


@pytest.mark.postgres
async def test_setup_runs_once_per_url(
    fresh_postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def spy(cls: Any) -> Any:
        original = cls.setup

        def setup(self: Any) -> Any:
            calls.append(cls.__name__)
            return original(self)

        return setup

    monkeypatch.setattr(PostgresSaver, "setup", spy(PostgresSaver))
    monkeypatch.setattr(AsyncPostgresSaver, "setup", spy(AsyncPostgresSaver))
    for mode in MODES * 2:
        await _run(fresh_postgres_url, mode, {"n": []}, "t", ask=False)
    assert calls == ["PostgresSaver"]
    Persistence(fresh_postgres_url).setup()  # an explicit setup always runs
    await Persistence(fresh_postgres_url).asetup()
    assert calls == ["PostgresSaver", "PostgresSaver", "AsyncPostgresSaver"]


@pytest.mark.postgres
async def test_concurrent_first_setups_do_not_collide(fresh_postgres_url: str) -> None:
    # Several replicas starting at once all run LangGraph's migrations; keel retries the races
    # (duplicate pg_type rows, duplicate checkpoint_migrations versions) instead of failing.
    setups = [Persistence(fresh_postgres_url).asetup() for _ in range(6)]
    setups += [asyncio.to_thread(Persistence(fresh_postgres_url).setup) for _ in range(6)]
    assert await asyncio.gather(*setups) == [None] * 12
    await Persistence(fresh_postgres_url, setup=False).acheck()


@pytest.mark.postgres
async def test_setup_false_on_an_empty_database_says_run_setup(fresh_postgres_url: str) -> None:
    persistence = Persistence(fresh_postgres_url, setup=False)
    expected = (
        f"PostgreSQL at {fresh_postgres_url} has no LangGraph checkpoint tables "
        '(relation "checkpoints" does not exist). '
        f"Run `keel db setup --db {fresh_postgres_url}` once, "
        "or create Persistence(url, setup=True)."
    )
    for call in (persistence.checkpointer, persistence.acheckpointer, persistence.check):
        assert str(await _raises_setup_error(call)) == expected

    Persistence(fresh_postgres_url).setup()
    persistence.check()
    assert await _run_setup_false(fresh_postgres_url) == {"n": [0]}


async def _run_setup_false(url: str) -> Any:
    async with Persistence(url, setup=False).acheckpointer() as saver:
        graph = _graph(ask=False).compile(checkpointer=saver)
        return await graph.ainvoke({"n": []}, {"configurable": {"thread_id": "t"}})


@pytest.mark.postgres
async def test_setup_false_when_migrations_are_behind(fresh_postgres_url: str) -> None:
    Persistence(fresh_postgres_url).setup()
    latest = len(PostgresSaver.MIGRATIONS) - 1
    with psycopg.connect(fresh_postgres_url, autocommit=True) as conn:
        conn.execute("DELETE FROM checkpoint_migrations WHERE v = %s", (latest,))
    error = await _raises_setup_error(Persistence(fresh_postgres_url, setup=False).acheck)
    assert f"at migration {latest - 1}, but this langgraph-checkpoint version needs " in str(error)
    assert f"migration {latest}. Run `keel db setup --db" in str(error)
    Persistence(fresh_postgres_url).setup()  # migrates forward
    await Persistence(fresh_postgres_url, setup=False).acheck()


@pytest.mark.parametrize(
    "entry", ["checkpointer", "acheckpointer", "check", "acheck", "setup", "asetup"]
)
async def test_unreachable_postgres_fails_fast(entry: str) -> None:
    started = time.monotonic()
    error = await _raises_setup_error(getattr(Persistence(UNREACHABLE), entry))
    assert time.monotonic() - started < 3
    message = str(error)
    assert message.startswith(
        "cannot reach PostgreSQL at postgresql://postgres:***@127.0.0.1:1/test"
    )
    assert "Connection refused" in message and "hunter2" not in message
    assert message.endswith("Is the server running? Check the URL / KEEL_DB_URL.")


@pytest.mark.postgres
def test_missing_database_says_so(postgres_url: str) -> None:
    from urllib.parse import urlsplit

    url = urlsplit(postgres_url)._replace(path="/keel_no_such_db").geturl()
    expected = 'database "keel_no_such_db" does not exist. Create the database'
    with pytest.raises(SetupError, match=re.escape(expected)):
        Persistence(url).check()


@pytest.mark.postgres
def test_pool_replaces_a_dropped_connection(fresh_postgres_url: str, postgres_url: str) -> None:
    config: Any = {"configurable": {"thread_id": "t"}}
    dbname = fresh_postgres_url.rsplit("/", 1)[1]
    with Persistence(fresh_postgres_url).checkpointer() as saver:
        graph = _graph(ask=False).compile(checkpointer=saver)
        graph.invoke({"n": []}, config)
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (dbname,),
            )
        assert graph.invoke({"n": []}, config) == {"n": [0, 1]}


@pytest.mark.postgres
@pytest.mark.parametrize(("threshold", "prepared"), [(None, False), (0, True)])
def test_prepare_threshold_none_reaches_the_pool_for_pgbouncer(
    fresh_postgres_url: str, threshold: int | None, prepared: bool
) -> None:
    # README: "a settable `prepare_threshold` (`None` for PgBouncer)": with None, no server-side
    # prepared statement may exist on a pooled connection (PgBouncer would hand it to another)
    persistence = Persistence(fresh_postgres_url, prepare_threshold=threshold)
    with persistence.checkpointer() as saver:
        pool: Any = saver.conn  # type: ignore[attr-defined]
        with pool.connection() as conn:
            assert conn.autocommit  # README: the pool's connections are in autocommit
            for _ in range(3):
                conn.execute("SELECT %s::int + 1", (1,))
            (row,) = conn.execute("SELECT count(*) AS n FROM pg_prepared_statements").fetchall()
    assert (row["n"] > 0) is prepared


def test_a_sqlite_url_under_the_home_folder_is_one_file_for_saver_and_ledger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `keel threads --db=sqlite:///~/agent.db`: the shell leaves `~` in one word alone; keel made
    # a folder named `~` in the current folder (and the ledger read the path relative to it).
    from keel.db.ledger import Ledger
    from keel.db.runs import RunLog

    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    url = "sqlite:///~/agent.db"
    persistence = Persistence(url)
    assert persistence.sqlite_path == home / "agent.db"
    asyncio.run(_run(url, "sync", {"n": []}, "t", ask=False))
    ledger = Ledger(url)
    ledger.setup()
    assert RunLog(ledger).query() == []
    ledger.close()
    assert not (work / "~").exists()
    tables = sqlite3.connect(home / "agent.db").execute("SELECT name FROM sqlite_master")
    names = {row[0] for row in tables}
    assert {"checkpoints", "keel_runs"} <= names
