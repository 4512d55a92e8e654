"""Stored threads: a thread's checkpoints and ledger records, read from SQLite or PostgreSQL.

`aload_thread(thread_id, db=URL)` reads every checkpoint of a thread (newest last) with the
checkpointer of keel's `Persistence`, and, from the ledger on the same database, who the thread
ran for (audit and run records) and the recorded results of its side-effecting calls
(idempotency records). Replay, capture and shadow runs start from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.runnables import RunnableConfig

from keel.app.cli_observe import existing_db
from keel.db.audit import AuditLog
from keel.db.idempotency import CallRecord, records_flow
from keel.db.ledger import Ledger
from keel.db.persistence import Persistence
from keel.db.runs import RunLog
from keel.errors import UserError
from keel.state import RunContext

__all__ = ["Checkpoint", "StoredThread", "aload_thread", "start_messages"]


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """One checkpoint of a stored thread."""

    id: str
    """LangGraph's checkpoint id."""
    step: int
    """LangGraph's step number (`-1` for the input checkpoint)."""
    messages: tuple[BaseMessage, ...]
    """The conversation at this checkpoint."""


@dataclass(frozen=True, kw_only=True, slots=True)
class StoredThread:
    """A stored thread: its checkpoints, final state and what the ledger knows of it."""

    thread_id: str
    """The thread's id."""
    checkpoints: tuple[Checkpoint, ...]
    """Every checkpoint, oldest first."""
    values: dict[str, Any]
    """The latest checkpoint's state (`messages`, `outcome`, `usage`, ...)."""
    identity: RunContext
    """Who the thread ran for (user and tenant from the ledger; roles are not recorded)."""
    graph: str | None = None
    """The graph's name, from the thread's run records."""
    calls: dict[str, CallRecord] = field(default_factory=dict)
    """The ledger's records of the thread's side-effecting calls, by tool-call id."""

    @property
    def messages(self) -> list[BaseMessage]:
        """The final conversation."""
        return list(self.values.get("messages") or [])

    @property
    def outcome(self) -> dict[str, Any]:
        """The final outcome (`status`, `terminated_reason`, `detail`)."""
        return dict(self.values.get("outcome") or {})

    def checkpoint(self, at: str | int | None) -> Checkpoint | None:
        """The checkpoint with id `at`, or at step `at` (an int or digits); `None` for `None`.

        Raises:
            UserError: the thread has no such checkpoint.
        """
        if at is None:
            return None
        if isinstance(at, int) or (isinstance(at, str) and at.lstrip("-").isdigit()):
            found = [c for c in self.checkpoints if c.step == int(at)]
        else:
            found = [c for c in self.checkpoints if c.id == at]
        if not found:
            steps = [c.step for c in self.checkpoints]
            raise UserError(
                f"Thread {self.thread_id!r} has no checkpoint {at!r}; give a checkpoint id or a "
                f"step between {min(steps)} and {max(steps)}."
            )
        return found[-1]


def start_messages(messages: Sequence[BaseMessage]) -> list[BaseMessage]:
    """`messages` cut back to the last complete turn: no AI tool call left without its result.

    A replay starts from here: the graph's next step is a model call.
    """
    answered = {m.tool_call_id for m in messages if isinstance(m, ToolMessage)}
    out = list(messages)
    while out:
        last = out[-1]
        if isinstance(last, AIMessage) and any(tc["id"] not in answered for tc in last.tool_calls):
            out.pop()
        elif isinstance(last, AIMessage) and not last.tool_calls and len(out) > 1:
            out.pop()  # a final answer: the model answers it again
        else:
            break
    while out and isinstance(out[-1], ToolMessage) and not _has_call(out, out[-1]):
        out.pop()
    return out


def _has_call(messages: Sequence[BaseMessage], result: ToolMessage) -> bool:
    return any(
        isinstance(m, AIMessage) and any(tc["id"] == result.tool_call_id for tc in m.tool_calls)
        for m in messages
    )


async def aload_thread(thread_id: str, *, db: str | None = None) -> StoredThread:
    """Read thread `thread_id` from the database `db` (default: `KEEL_DB_URL` or `.keel/`).

    Raises:
        UserError: no database at `db` (a SQLite file that is not there: opening it would
            leave an empty one at a mistyped path), no such thread, or the thread is not a keel
            agent's (no `messages`).
        SetupError: the database is unreachable.
    """
    persistence = Persistence(existing_db(db))
    config: RunnableConfig = {"configurable": {"thread_id": thread_id}}
    tuples = []
    async with persistence.acheckpointer() as saver:
        async for saved in saver.alist(config):
            tuples.append(saved)
    if not tuples:
        raise UserError(
            f"No thread {thread_id!r} in {persistence.safe_url}. List the stored threads with "
            "`keel threads --db URL` and give one of their ids."
        )
    tuples.reverse()
    checkpoints = tuple(
        Checkpoint(
            id=str(t.config["configurable"]["checkpoint_id"]),
            step=int((t.metadata or {}).get("step", -1)),
            messages=tuple(t.checkpoint["channel_values"].get("messages") or ()),
        )
        for t in tuples
    )
    values = dict(tuples[-1].checkpoint["channel_values"])
    messages = values.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, BaseMessage) for m in messages):
        channels = sorted(k for k in values if not k.startswith("branch:"))
        raise UserError(
            f"Thread {thread_id!r} was not written by a keel agent (or any message graph): its "
            f"state has no `messages` list (channels: {channels}). Replay and capture need a "
            "thread of a graph over keel's AgentState."
        )
    if not any(isinstance(m, HumanMessage) for m in messages):
        raise UserError(f"Thread {thread_id!r} has no user message to start a replay from.")
    since = _unix(tuples[0].checkpoint.get("ts"))
    identity, graph, calls = await _ledger_facts(persistence.url, thread_id, messages, since)
    return StoredThread(
        thread_id=thread_id,
        checkpoints=checkpoints,
        values=values,
        identity=identity,
        graph=graph,
        calls=calls,
    )


def _unix(ts: object) -> float | None:
    try:
        return datetime.fromisoformat(str(ts)).timestamp() - 1.0
    except ValueError:
        return None


async def _ledger_facts(
    url: str, thread_id: str, messages: Sequence[BaseMessage], since: float | None
) -> tuple[RunContext, str | None, dict[str, CallRecord]]:
    ledger = Ledger(url)
    try:
        audit = await AuditLog(ledger).aquery(thread=thread_id, limit=50)
        # run records ended after the thread began (not the whole table)
        runs = [r for r in await RunLog(ledger).aquery(since=since) if r.thread_id == thread_id]
        ids = [tc["id"] for m in messages if isinstance(m, AIMessage) for tc in m.tool_calls]
        calls = await ledger.arun(records_flow(thread_id, [i for i in ids if i]))
    finally:
        await ledger.aclose()
    people = [(r.user_id, r.tenant_id) for r in audit] + [(r.user_id, r.tenant_id) for r in runs]
    user = next((u for u, _ in people if u), None)
    tenant = next((t for _, t in people if t), None)
    identity = RunContext(user_id=user or "replay-user", tenant_id=tenant or "default")
    graph = next((r.graph for r in runs if r.graph), None)
    return identity, graph, calls
