"""Strict checkpoints: keel's state round-trips; unknown types and oversized checkpoints don't pass.

Every test runs on SQLite and PostgreSQL, through the sync and the async saver
`keel.Persistence` builds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langgraph.graph import END, START, StateGraph

from keel import AgentState, Persistence
from keel.db.checkpoint import (
    CheckpointPolicy,
    CheckpointSizeWarning,
    CheckpointTooLarge,
    UnserializableState,
)
from keel.db.checkpoint.strict import find_unserializable
from keel.errors import UserError


@dataclass
class Order:
    """A user class that is not plain data."""

    id: str


FULL_STATE: dict[str, Any] = {
    "messages": [
        SystemMessage(content="be brief", id="m0"),
        HumanMessage(content=[{"type": "text", "text": "refund A1"}], id="m1"),
        AIMessage(
            content="",
            id="m2",
            tool_calls=[{"name": "refund", "args": {"order_id": "A1", "amount": 9.5}, "id": "c1"}],
            usage_metadata={"input_tokens": 10, "output_tokens": 3, "total_tokens": 13},
            response_metadata={"model_name": "scripted"},
        ),
        ToolMessage(
            content="refunded",
            tool_call_id="c1",
            name="refund",
            id="m3",
            status="success",
            response_metadata={"keel_status": "success", "keel_ledger": "recorded"},
        ),
        AIMessage(content="Done.", id="m4"),
    ],
    "plan": [{"id": 1, "description": "refund", "status": "done"}],
    "usage": {"input_tokens": 10, "output_tokens": 3, "usd": 0.001, "model_calls": 1},
    "approvals": {
        "abc/c1": {
            "digest": "abc",
            "tool": "refund",
            "tool_call_id": "c1",
            "decision": "approved",
            "reviewer": "ana",
        }
    },
    "verdicts": [{"passed": True, "reason": "ok", "source": "rules"}],
    "revisions": 1,
    "outcome": {"status": "success", "terminated_reason": "completed", "detail": "done"},
    "clock": {"started_at": 1700000000.5},
    "budget_warnings": ["usd at 80%"],
}


def graph(update: dict[str, Any], saver: Any) -> Any:
    builder = StateGraph(AgentState)
    builder.add_node("write", lambda state: update)
    builder.add_edge(START, "write")
    builder.add_edge("write", END)
    return builder.compile(checkpointer=saver)


def config(thread: str = "t1") -> Any:
    return {"configurable": {"thread_id": thread}}


def test_every_keel_state_type_round_trips(db_url: str) -> None:
    with Persistence(db_url).checkpointer() as saver:
        graph(FULL_STATE, saver).invoke({"messages": []}, config())
    with Persistence(db_url).checkpointer() as saver:  # a new connection reads it back
        values = graph(FULL_STATE, saver).get_state(config()).values
    assert values == FULL_STATE


async def test_every_keel_state_type_round_trips_async(db_url: str) -> None:
    async with Persistence(db_url).acheckpointer() as saver:
        await graph(FULL_STATE, saver).ainvoke({"messages": []}, config())
    async with Persistence(db_url).acheckpointer() as saver:
        values = (await graph(FULL_STATE, saver).aget_state(config())).values
    assert values == FULL_STATE


BAD = {"messages": [AIMessage(content="x", id="m1", additional_kwargs={"order": Order("A1")})]}
BAD_MESSAGE = (
    "Cannot checkpoint state: messages[0].additional_kwargs['order'] is a "
    "test_checkpoint_strict.Order, which would not load back from the database. Store plain "
    "data there (dicts, lists, strings, numbers), or allow the class: "
    "Persistence(url, checkpoints=CheckpointPolicy(allow=(Order,)))."
)


def test_an_unknown_type_fails_naming_its_path(db_url: str) -> None:
    with (
        Persistence(db_url).checkpointer() as saver,
        pytest.raises(UnserializableState, match=re.escape(BAD_MESSAGE)) as caught,
    ):
        graph(BAD, saver).invoke({"messages": []}, config())
    assert caught.value.path == "messages[0].additional_kwargs['order']"


@dataclass
class Box:
    """An allowed dataclass that holds a value."""

    inside: Any


def test_the_path_names_each_step_down_to_the_unknown_value() -> None:
    allowed = CheckpointPolicy(allow=(Box,)).allowed()
    nested = {"a": [1, ("x", Box(inside={"k": Order("A1")}))]}
    found = find_unserializable(nested, allowed, "state")
    assert found == ("state['a'][1][1].inside['k']", "test_checkpoint_strict.Order")
    assert find_unserializable(Order("A1"), allowed) == (
        "the value",
        "test_checkpoint_strict.Order",
    )
    assert find_unserializable(nested["a"][:1], allowed, "state") is None


async def test_an_unknown_type_fails_naming_its_path_async(db_url: str) -> None:
    async with Persistence(db_url).acheckpointer() as saver:
        with pytest.raises(UnserializableState, match=re.escape(BAD_MESSAGE)):
            await graph(BAD, saver).ainvoke({"messages": []}, config())


def test_an_allowed_class_round_trips_without_warnings(db_url: str) -> None:
    persistence = Persistence(db_url, checkpoints=CheckpointPolicy(allow=(Order,)))
    with persistence.checkpointer() as saver:
        graph({"plan": [Order("A1")]}, saver).invoke({"messages": []}, config())
    with persistence.checkpointer() as saver:  # filterwarnings=error: no "unregistered type"
        values = graph({}, saver).get_state(config()).values
    assert values["plan"] == [Order("A1")]


def test_a_class_inside_a_message_is_refused_even_when_allowed(db_url: str) -> None:
    """Pins LangGraph: a message is stored as its `model_dump()`, so a dataclass in
    `additional_kwargs` would come back as a plain dict; keel refuses it up front."""
    persistence = Persistence(db_url, checkpoints=CheckpointPolicy(allow=(Order,)))
    with (
        persistence.checkpointer() as saver,
        pytest.raises(UnserializableState, match=re.escape(BAD_MESSAGE)),
    ):
        graph(BAD, saver).invoke({"messages": []}, config())
    persistence = Persistence(db_url, checkpoints=CheckpointPolicy(strict=False))
    with persistence.checkpointer() as saver:
        graph(BAD, saver).invoke({"messages": []}, config())
        [message] = graph(BAD, saver).get_state(config()).values["messages"]
    assert message.additional_kwargs == {"order": {"id": "A1"}}


BIG = {"messages": [AIMessage(content="x" * 50_000, id="big")]}


def test_an_oversized_checkpoint_warns(db_url: str) -> None:
    persistence = Persistence(db_url, checkpoints=CheckpointPolicy(max_bytes=20_000))
    with persistence.checkpointer() as saver:
        agent = graph(BIG, saver)
        with pytest.warns(
            CheckpointSizeWarning, match=r"A checkpoint of thread 't1' is 5\d,\d{3} "
        ):
            agent.invoke({"messages": []}, config())
        assert agent.get_state(config()).values["messages"][0].id == "big"  # saved


async def test_an_oversized_checkpoint_is_refused(db_url: str) -> None:
    policy = CheckpointPolicy(max_bytes=20_000, on_oversize="refuse")
    async with Persistence(db_url, checkpoints=policy).acheckpointer() as saver:
        agent = graph(BIG, saver)
        with pytest.raises(CheckpointTooLarge) as caught:
            await agent.ainvoke({"messages": []}, config())
        assert caught.value.limit == 20_000 and caught.value.size > 20_000
        assert str(caught.value).startswith("A checkpoint of thread 't1' is ")
        assert "over the limit of 20,000 (CheckpointPolicy.max_bytes), and was refused." in str(
            caught.value
        )
        history = [s async for s in agent.aget_state_history(config())]
        assert all("big" not in [m.id for m in s.values.get("messages", [])] for s in history)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_bytes": 0}, "CheckpointPolicy.max_bytes must be 1 or more (bytes) or None, got 0."),
        (
            {"on_oversize": "drop"},
            "CheckpointPolicy.on_oversize must be 'warn' or 'refuse', got 'drop'.",
        ),
        (
            {"allow": ("Order",)},
            "CheckpointPolicy.allow must be a tuple of classes, got ('Order',).",
        ),
    ],
)
def test_policy_validation(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        CheckpointPolicy(**kwargs)


def test_persistence_rejects_a_bad_policy() -> None:
    with pytest.raises(UserError, match=r"must be a keel\.db\.checkpoint\.CheckpointPolicy, got"):
        Persistence("sqlite:///:memory:", checkpoints={"max_bytes": 1})  # type: ignore[arg-type]


# -- a task's writes that fail halfway ---------------------------------------------------------

BOOM = (
    "CREATE TRIGGER IF NOT EXISTS boom BEFORE INSERT ON writes WHEN NEW.channel = 'boom' "
    "BEGIN SELECT RAISE(ABORT, 'disk full'); END"
)
"""The second write of a task fails (as a full disk or a read-only file would), the first not."""


def _half() -> list[tuple[str, Any]]:
    return [("messages", "first"), ("boom", "second")]


def _stored(path: Any) -> list[str]:
    import sqlite3

    with sqlite3.connect(path) as db:
        return [row[0] for row in db.execute("SELECT channel FROM writes ORDER BY idx")]


def _task_config() -> Any:
    return {"configurable": {"thread_id": "t", "checkpoint_ns": "", "checkpoint_id": "c1"}}


def test_langgraph_pin_sqlite_saver_commits_a_task_s_writes_that_failed_halfway(
    tmp_path: Any,
) -> None:
    """Pinned LangGraph behaviour: `SqliteSaver.cursor` commits in a `finally`, so the first
    row of a `put_writes` that raised is stored. A resumed run then takes the task as done with
    half its writes (here: its messages without its route to the next node)."""
    import sqlite3

    from langgraph.checkpoint.sqlite import SqliteSaver

    conn = sqlite3.connect(tmp_path / "lg.db", check_same_thread=False)
    saver = SqliteSaver(conn)
    saver.setup()
    conn.execute(BOOM)
    with pytest.raises(sqlite3.IntegrityError, match="disk full"):
        saver.put_writes(_task_config(), _half(), "task1")
    assert _stored(tmp_path / "lg.db") == ["messages"]
    conn.close()


def test_a_task_s_writes_that_fail_halfway_leave_nothing(tmp_path: Any) -> None:
    import sqlite3

    with Persistence(f"sqlite:///{tmp_path}/k.db").checkpointer() as saver:
        saver.conn.execute(BOOM)  # type: ignore[attr-defined]
        with pytest.raises(sqlite3.IntegrityError, match="disk full"):
            saver.put_writes(_task_config(), _half(), "task1")
        saver.put_writes(_task_config(), [("messages", "later")], "task2")  # commits
    assert _stored(tmp_path / "k.db") == ["messages"]  # task2's only: task1 left nothing
    with sqlite3.connect(tmp_path / "k.db") as db:
        assert db.execute("SELECT task_id FROM writes").fetchall() == [("task2",)]


async def test_langgraph_pin_async_sqlite_saver_s_next_commit_keeps_a_failed_write(
    tmp_path: Any,
) -> None:
    """Pinned: `AsyncSqliteSaver.aput_writes` does not commit a failed write, but leaves its
    first rows in an open transaction that the saver's next commit makes durable."""
    import sqlite3

    import aiosqlite
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    async with aiosqlite.connect(tmp_path / "lg.db") as conn:
        saver = AsyncSqliteSaver(conn)
        await saver.setup()
        await conn.execute(BOOM)
        with pytest.raises(sqlite3.IntegrityError, match="disk full"):
            await saver.aput_writes(_task_config(), _half(), "task1")
        await saver.aput_writes(_task_config(), [("messages", "later")], "task2")
    with sqlite3.connect(tmp_path / "lg.db") as db:
        tasks = [row[0] for row in db.execute("SELECT task_id FROM writes ORDER BY task_id")]
    assert tasks == ["task1", "task2"]


async def test_a_task_s_writes_that_fail_halfway_leave_nothing_async(tmp_path: Any) -> None:
    import sqlite3

    async with Persistence(f"sqlite:///{tmp_path}/k.db").acheckpointer() as saver:
        await saver.conn.execute(BOOM)  # type: ignore[attr-defined]
        with pytest.raises(sqlite3.IntegrityError, match="disk full"):
            await saver.aput_writes(_task_config(), _half(), "task1")
        await saver.aput_writes(_task_config(), [("messages", "later")], "task2")
    with sqlite3.connect(tmp_path / "k.db") as db:
        assert db.execute("SELECT task_id FROM writes").fetchall() == [("task2",)]
