"""A thread's state read or updated while the checkpointer's database fails.

README: "`get_state`, `get_state_history`, `update_state` and `bulk_update_state` (and their async
forms) raise `keel.StorageError` when the checkpointer's database fails". Real parts: an SQLite
checkpointer in a file (an async one for the async entries); the faults are injected on its own
connection: `PRAGMA query_only = ON` (a disk that stopped taking writes) and its `checkpoints`
table renamed away (a database that no longer reads), each undone afterwards to check that
nothing was written.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from keel import Persistence, RunContext, StorageError, UserError, build_agent
from keel.evals import ScriptedChatModel
from keel.graphs import FINISH, Route, build_supervisor

CTX = RunContext(user_id="u1", tenant_id="acme")
CONFIG: Any = {"configurable": {"thread_id": "t1"}}
README = Path(__file__).resolve().parents[1] / "README.md"
UPDATE = {"messages": [("user", "an edit")]}
READS = ["get_state", "aget_state", "get_state_history", "aget_state_history"]
UPDATES = ["update_state", "aupdate_state", "bulk_update_state", "abulk_update_state"]


def _router(messages: Any) -> Route:
    last = messages[-1]
    return Route(agent=FINISH if last.type == "ai" else "helper", task=last.text)


def _graph(kind: str, saver: Any) -> Any:
    if kind == "agent":
        return build_agent(ScriptedChatModel(script=["hello"]), [], checkpointer=saver)
    helper = build_agent(ScriptedChatModel(script=["hello"]), [])
    return build_supervisor({"helper": helper}, _router, checkpointer=saver)


async def _listed(states: Any) -> list[Any]:
    return [s async for s in states]


@dataclass
class Thread:
    """The graph on an SQLite checkpointer (async for an async entry), thread `t1` run once."""

    graph: Any
    saver: Any
    loop: asyncio.AbstractEventLoop
    sync: bool

    def sql(self, statement: str) -> None:
        if self.sync:
            self.saver.conn.execute(statement)
        else:
            self.loop.run_until_complete(self.saver.conn.execute(statement))

    @contextlib.contextmanager
    def faulty(self, fault: str, undo: str) -> Iterator[None]:
        """The fault `fault` (a statement) on the saver's connection, undone by `undo`."""
        self.sql(fault)
        try:
            yield
        finally:
            self.sql(undo)

    def unreadable(self) -> contextlib.AbstractContextManager[None]:
        """Its `checkpoints` table renamed away: every read fails."""
        renamed = "ALTER TABLE checkpoints RENAME TO checkpoints_away"
        return self.faulty(renamed, "ALTER TABLE checkpoints_away RENAME TO checkpoints")

    def read_only(self) -> contextlib.AbstractContextManager[None]:
        """Its connection takes no writes (`query_only`): every write fails."""
        return self.faulty("PRAGMA query_only = ON", "PRAGMA query_only = OFF")

    def read(self, entry: str, context: Any = None) -> Any:
        graph, run = self.graph, self.loop.run_until_complete
        if entry == "get_state":
            return graph.get_state(CONFIG, context=context)
        if entry == "aget_state":
            return run(graph.aget_state(CONFIG, context=context))
        if entry == "get_state_history":
            return list(graph.get_state_history(CONFIG, context=context))
        return run(_listed(graph.aget_state_history(CONFIG, context=context)))

    def update(self, entry: str, values: Any = UPDATE) -> Any:
        graph, run = self.graph, self.loop.run_until_complete
        if entry == "update_state":
            return graph.update_state(CONFIG, values)
        if entry == "aupdate_state":
            return run(graph.aupdate_state(CONFIG, values))
        steps = [[(values, None)]]
        if entry == "bulk_update_state":
            return graph.bulk_update_state(CONFIG, steps)
        return run(graph.abulk_update_state(CONFIG, steps))

    def saved(self) -> tuple[int, Any]:
        """How many checkpoints the thread has, and its latest state's values."""
        prefix = "" if self.sync else "a"
        history = self.read(f"{prefix}get_state_history")
        return len(history), self.read(f"{prefix}get_state").values


@contextlib.contextmanager
def _thread(where: Path | str, kind: str, entry: str) -> Iterator[Thread]:
    """`where`: a folder for an SQLite file, or a PostgreSQL URL."""
    loop = asyncio.new_event_loop()
    persistence = Persistence(where if isinstance(where, str) else f"sqlite:///{where}/k.db")
    sync = not entry.startswith("a")
    with contextlib.ExitStack() as stack:
        stack.callback(loop.close)
        if sync:
            saver = stack.enter_context(persistence.checkpointer())
        else:
            saving = persistence.acheckpointer()
            saver = loop.run_until_complete(saving.__aenter__())
            stack.callback(lambda: loop.run_until_complete(saving.__aexit__(None, None, None)))
        thread = Thread(_graph(kind, saver), saver, loop, sync)
        first = {"messages": [("user", "hi")]}
        if sync:
            thread.graph.invoke(first, CONFIG, context=CTX)
        else:
            loop.run_until_complete(thread.graph.ainvoke(first, CONFIG, context=CTX))
        yield thread


def _assert_storage_error(
    raised: pytest.ExceptionInfo[StorageError],
    *phrases: str,
    driver: type[Exception] = sqlite3.OperationalError,
) -> None:
    text = str(raised.value)
    assert "'t1'" in text and "the checkpointer's database failed" in text, text
    assert driver.__name__ in text and "\n" not in text, text
    for phrase in phrases:
        assert phrase in text, text
    assert isinstance(raised.value.__cause__, driver), raised.value.__cause__


@pytest.mark.parametrize("kind", ["agent", "supervisor"])
@pytest.mark.parametrize("entry", READS)
def test_a_read_of_a_database_that_fails_raises_storage_error(
    tmp_path: Path, entry: str, kind: str
) -> None:
    with _thread(tmp_path, kind, entry) as thread:
        before = thread.saved()
        with thread.unreadable(), pytest.raises(StorageError) as raised:
            thread.read(entry)
        _assert_storage_error(raised, "could not read the state", "Nothing was changed")
        with thread.unreadable(), pytest.raises(StorageError) as raised:
            thread.read(entry, context=CTX)  # the owner check reads too
        _assert_storage_error(raised, "could not read the state", "Nothing was changed")
        assert thread.saved() == before


@pytest.mark.parametrize("kind", ["agent", "supervisor"])
@pytest.mark.parametrize("entry", UPDATES)
def test_an_update_the_database_refuses_to_write_raises_storage_error(
    tmp_path: Path, entry: str, kind: str
) -> None:
    """The thread reads, the write fails: the error says the update may not be written, and
    here (SQLite rolled it back) nothing was."""
    with _thread(tmp_path, kind, entry) as thread:
        before = thread.saved()
        with thread.read_only(), pytest.raises(StorageError) as raised:
            thread.update(entry)
        _assert_storage_error(raised, "could not update the state", "may not have been written")
        assert thread.saved() == before
        thread.update(entry)  # back: the update is written
        assert thread.saved()[0] == before[0] + 1


@pytest.mark.parametrize("entry", UPDATES)
def test_an_update_of_a_thread_that_cannot_be_read_wrote_nothing(
    tmp_path: Path, entry: str
) -> None:
    with _thread(tmp_path, "agent", entry) as thread:
        before = thread.saved()
        with thread.unreadable(), pytest.raises(StorageError) as raised:
            thread.update(entry)
        _assert_storage_error(raised, "could not update the state", "Nothing was written")
        assert thread.saved() == before


@pytest.mark.parametrize("entry", ["get_state", "aget_state", "update_state", "aupdate_state"])
def test_a_postgres_checkpointer_that_cannot_be_read_raises_storage_error(
    fresh_postgres_url: str, entry: str
) -> None:
    """The same on PostgreSQL, its `checkpoints` table renamed away by an admin connection."""
    with _thread(fresh_postgres_url, "agent", entry) as thread:
        before = thread.saved()
        with psycopg.connect(fresh_postgres_url, autocommit=True) as admin:
            admin.execute("ALTER TABLE checkpoints RENAME TO checkpoints_away")
            try:
                with pytest.raises(StorageError) as raised:
                    thread.update(entry) if "update" in entry else thread.read(entry)
            finally:
                admin.execute("ALTER TABLE checkpoints_away RENAME TO checkpoints")
        then = "Nothing was written" if "update" in entry else "Nothing was changed"
        _assert_storage_error(raised, then, driver=psycopg.errors.UndefinedTable)
        assert thread.saved() == before


@pytest.mark.parametrize("entry", ["update_state", "aupdate_state"])
def test_keels_refusals_are_not_taken_for_storage_errors(tmp_path: Path, entry: str) -> None:
    """An update of a protected key (the database down) and another user's read are refused
    as they were."""
    with _thread(tmp_path, "agent", entry) as thread:
        with thread.unreadable(), pytest.raises(UserError) as refused:
            thread.update(entry, {"outcome": {"status": "ok"}})
        assert not isinstance(refused.value, StorageError)
        other = RunContext(user_id="u2", tenant_id="acme")
        with pytest.raises(UserError) as read:
            thread.read(entry.replace("update", "get"), context=other)
        assert not isinstance(read.value, StorageError)


def test_readme_says_state_reads_and_updates_raise_storage_error() -> None:
    text = " ".join(README.read_text().split())
    assert re.search(
        r"`get_state`, `get_state_history`, `update_state` and `bulk_update_state` \(and their "
        r"async forms\) raise `keel\.StorageError` when the checkpointer's database fails",
        text,
    )
