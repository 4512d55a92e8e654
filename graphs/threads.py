"""Thread semantics: what a caller may send to a thread, checked before LangGraph writes it.

- A new message on a thread that waits for a human (an approval, "did this happen?") would
  make LangGraph start a new run and silently drop the pending tool calls: it is refused. With
  `config={"configurable": {"keel_pending": "not_run"}}` the caller asks for the other way:
  each pending call is answered `not_run` (and audited, with a ledger), then the message runs.
  The run that waited ends there: its run record becomes `stopped/cancelled`. These records are
  written once the input passed every check (and, with admission control, once the run was
  admitted): a refused run answered nothing, and its calls still wait.
- A `Command(update=...)` that writes a turn after the AI message whose calls wait for a human
  (an AI message of the caller's) leaves those calls without an answer: each is answered
  `not_run` before the update's messages (and audited, with a ledger), as above.
- A new message on a thread whose last run stopped mid-step (its task cancelled, a
  `KeyboardInterrupt`, its process killed, its checkpointer failed) finds that run's tool calls
  without an answer, and nothing waits for a human: each is answered before the message (the
  result its step saved or the ledger recorded, "outcome unknown" when the ledger says it
  started, else `not_run`; never run now), and audited, so the thread's history stays one a
  provider takes; a run that left no record of its end (a killed process) is recorded
  `stopped/cancelled`. So is one that left no call unanswered in the thread's messages while a
  node was still to run (a supervisor killed while its agent ran: `stopped_ended`).
- `None` or `Command(...)` continues a thread; on a thread that does not exist it would start a
  run with no user message: it is refused.
- A run needs at least one message: empty input, an empty message list and a `Command` with
  neither resume nor update are refused.
- A run's input sends messages and removes none: a `RemoveMessage` (LangGraph's way to delete
  a message, or the whole history with `REMOVE_ALL_MESSAGES`), in its messages or in a
  `Command(update=...)`, is refused. Editing a thread's history is a state update's
  (`update_state`); while the thread waits for a human, not of the run that waits.

Each refusal is a `keel.errors.UserError` raised by `invoke`/`stream` (and their async twins)
before anything is written, so the thread stays as it was.

With admission control (`keel.guards.admission`), each run (a new message or a resume) holds a
lease in the ledger while it streams; a refused run yields only its `overloaded` outcome
(`keel.graphs._admitted`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping, Sequence
from functools import partial
from typing import Any, TypeVar

from langchain_core.messages import BaseMessage, convert_to_messages
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import ensure_config
from langgraph.checkpoint.base import BaseCheckpointSaver, CheckpointTuple
from langgraph.graph.state import CompiledStateGraph
from langgraph.types import Command, StateSnapshot, StateUpdate

from keel._drive import Op, Steps, adrive, both, drive
from keel._node import inside_task, interrupt_pending, saver_in
from keel.db.audit import AuditLog, AuditRecord, insert_flow
from keel.db.idempotency import CallRecord, records_flow
from keel.db.ledger import Flow, refused_for_good
from keel.db.runs import RunLog, RunRecord
from keel.errors import StorageError, UserError
from keel.graphs._admitted import refused_chunks, refused_records, run_context
from keel.graphs._breakpoint import at_breakpoint
from keel.graphs._one_run import OneRunPerThread, ThreadLeases, running_here
from keel.graphs._owner import owned, owner_of, readable, stamped, unseen, users_seen
from keel.graphs._paused import refuse_update, reported
from keel.graphs._pending import (
    PENDING_KEY,
    Dropped,
    ToolLookup,
    abandoned,
    answers_inside,
    calls_inside,
    closed,
    closed_left,
    closed_update,
    dropped_inside,
    drops_pending,
    inside_ended,
    left_behind,
    left_ended,
    left_inside,
    not_run_records,
    refuse_turned_past,
    removed_by,
    removed_of_waiting_run,
    shape,
    step_results,
    stopped_ended,
    turned_past,
    waiting_inside,
)
from keel.graphs._protected import ProtectedGraph, written
from keel.graphs._state_storage import (
    IN_DOUBT,
    READ,
    UNWRITTEN,
    ahistory_kept,
    history_kept,
    read_kept,
    state_error,
)
from keel.graphs._storage import (
    AUPDATE,
    DATABASE_ERRORS,
    Recorder,
    RunEnd,
    StreamEnding,
    log,
    refuse_sync_saver,
    storage_failure,
)
from keel.guards.admission import Admission, Lease, overloaded
from keel.guards.content import OutputGuardPolicy
from keel.history import pending_tool_calls
from keel.state import Outcome, RunContext, task_start
from keel.versions import AgentVersion

__all__ = [
    "PENDING_KEY",
    "KeelGraph",
    "ThreadGuardedGraph",
    "admitted",
    "guarded",
    "input_refusal",
    "refusal",
]


T = TypeVar("T")

REMOVAL = (
    "The run's input removes messages (a RemoveMessage, in its messages or in a "
    "Command(update=...)): a run sends messages, and a removal "
    "would delete the thread's record as the run starts (a pending tool call, a call already "
    "answered, the turns the audit log points to). To edit a thread's history, use "
    "update_state (a state update may remove messages)."
)
"""Why a run's input may not remove messages (a served client gets it with a 422)."""


def refusal(input: Any, config: RunnableConfig | None, state: StateSnapshot | None) -> str | None:
    """Why `input` may not be sent to the thread whose current state is `state` (or `None`).

    `state` is `None` when there is no thread (no checkpointer or no `thread_id`); a thread
    without a checkpoint has a state whose `config` carries no `checkpoint_id`.
    """
    thread = ((config or {}).get("configurable") or {}).get("thread_id")
    saved = (state.config.get("configurable") or {}) if state is not None else {}
    exists = bool(saved.get("checkpoint_id"))
    if (problem := input_refusal(input)) is not None:
        return problem
    if input is None or isinstance(input, Command):
        if isinstance(input, Command) and (changed := removed_of_waiting_run(input, state)):
            return (
                f"The run's Command(update=...) overwrites {', '.join(map(repr, changed))}, of "
                f"the run that thread {thread!r} waits in for a human's answer, with a "
                "different message: the calls the human was asked about would be swapped for "
                "others and left with no answer nor audit record. Answer them first with "
                "Command(resume=...); send new messages without ids (or with new ones)."
            )
        if exists:
            return None
        if thread is None or state is None:
            return (
                "invoke(None) or Command(...) continues a thread, and this run has none: pass "
                "config={'configurable': {'thread_id': ...}} with a checkpointer, or start a "
                "run with {'messages': [('user', '...')]}."
            )
        return (
            f"Thread {thread!r} does not exist (it has no checkpoint), so there is nothing to "
            "resume. Start it with {'messages': [('user', '...')]}, or check the thread_id."
        )
    messages = _readable(input["messages"])
    assert not isinstance(messages, str)  # `input_refusal` read them
    if exists and state is not None and state.interrupts:
        return _waiting(thread, state)
    if exists and state is not None and (replaced := _replaced(messages, state)):
        return (
            f"The run's input sends a message with the id {replaced!r} of a different message "
            f"already in thread {thread!r}: LangGraph would overwrite that message in place "
            "(and the run it started would lose its record). Send new messages without ids "
            "(or with new ones); to edit the history, use update_state."
        )
    if exists and state is not None and (run_id := _reentered(messages, config, state)):
        return (
            f"This run's run_id {run_id!r} is the id of the run that last wrote thread "
            f"{thread!r}: LangGraph takes the call for that run's re-entry (a retried or "
            "reconnected run) and drops the messages it sends, so this message would be lost "
            "and that run's answer returned. Give each run its own run_id (or none)."
        )
    return None


def input_refusal(input: Any) -> str | None:
    """Why `input` may be sent to no thread at all (whatever the thread's state), or None.

    The part of `refusal` that needs no thread: a `Command` that removes messages or says
    nothing; input that is not `None` and not a `Command` but sends no message, messages
    LangChain cannot read, a removal, or only blank text. keel's served auth asks it before
    the server creates a run (a 422, nothing written), as the graph asks it as the run starts.
    """
    if isinstance(input, Command) and removed_by(input):
        return REMOVAL
    if isinstance(input, Command) and input.resume is None and not input._update_as_tuples():
        # LangGraph 1.2 fails on it with a bare UnboundLocalError (`resume_is_map`)
        return (
            f"{input!r} says nothing: it has no resume and no update. Continue a paused "
            "thread with invoke(None, config), answer a waiting review with "
            "Command(resume={'type': 'approve'}) (or 'reject', ...), or send "
            "{'messages': [('user', '...')]}."
        )
    if input is None or isinstance(input, Command):
        return None
    if not isinstance(input, Mapping) or not input.get("messages"):
        return (
            f"A run needs at least one message, got {input!r}: invoke the agent with "
            "{'messages': [('user', '...')]}."
        )
    messages = _readable(input["messages"])
    if isinstance(messages, str):
        return messages
    if any(m.type == "remove" for m in messages):
        return REMOVAL
    if _blank(messages):
        return (
            "The run's messages say nothing (empty or only whitespace): the model would be "
            "asked about nothing. Send {'messages': [('user', '...')]} with the task's text."
        )
    return None


def _reentered(
    messages: list[BaseMessage], config: RunnableConfig | None, state: StateSnapshot
) -> str | None:
    """The run id of a run that new `messages` would re-enter (their input dropped), if any.

    That is a call under the run id the thread's latest checkpoint was written with, sending
    messages its task does not hold: a retry of that run (a server's next attempt, the same
    input) is let through, as LangGraph reads it as one.
    """
    given = (config or {}).get("configurable") or {}
    run_id = given.get("run_id") or ((config or {}).get("metadata") or {}).get("run_id")
    if run_id is None or str(run_id) != _run_of(state):
        return None
    saved = state.values.get("messages") or []
    held = [shape(m) for m in saved[max(task_start(saved), 0) :]]
    return None if all(shape(m) in held for m in messages) else str(run_id)


def _replaced(messages: list[BaseMessage], state: StateSnapshot) -> str | None:
    """The id of a saved message that `messages` would overwrite with a different one, if any.

    Resending a message as it is saved (a client that sends the whole conversation) changes
    nothing and is let through.
    """
    saved = {m.id: m for m in state.values.get("messages") or [] if m.id}
    if not saved:
        return None
    for m in messages:
        old = saved.get(m.id) if m.id else None
        if old is not None and shape(m) != shape(old):
            return str(m.id)
    return None


def _without_resent(input: Any, state: StateSnapshot | None) -> Any:
    """`input` without the messages it resends exactly as the thread has them saved.

    A client that keeps the conversation itself sends it all again with each new message.
    Those copies change nothing, but the run would mark them as the caller's and the input
    guard would read them again: a flagged one audited on every run, a detector asked about
    the whole history each time. Only what is new is sent on (all of it, when nothing is).
    """
    if state is None or not isinstance(input, Mapping):
        return input
    saved = {m.id: m for m in state.values.get("messages") or [] if m.id}
    messages = _readable(input.get("messages"))
    if not saved or isinstance(messages, str):
        return input
    new = [m for m in messages if not (m.id in saved and shape(m) == shape(saved[m.id]))]
    return {**input, "messages": new} if new and len(new) < len(messages) else input


def _readable(messages: Any) -> list[BaseMessage] | str:
    """`messages` as LangGraph's `add_messages` reads them, or why it cannot read them."""
    try:
        return convert_to_messages(messages if isinstance(messages, list) else [messages])
    except Exception as exc:  # langchain-core raises NotImplementedError, ValueError, ...
        return (
            f"The run's messages could not be read ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0]}): send {{'messages': [('user', '...')]}}, a list of "
            "(role, text) pairs, message dicts or LangChain messages."
        )


def _blank(messages: list[BaseMessage]) -> bool:
    """Whether every message of `messages` is empty: no text but whitespace, nothing else."""
    for m in messages:
        if m.text.strip() or getattr(m, "tool_calls", None):
            return False
        if isinstance(m.content, list) and any(
            not isinstance(b, str) and not (isinstance(b, dict) and b.get("type") == "text")
            for b in m.content
        ):
            return False  # an image, a file: something to read
    return True


def _waiting(thread: Any, state: StateSnapshot) -> str:
    calls = [
        f"{r['action_request']['action']}({r.get('tool_call_id', '')})"
        for i in state.interrupts
        for r in (i.value if isinstance(i.value, list) else [])
        if isinstance(r, Mapping) and isinstance(r.get("action_request"), Mapping)
    ]
    if not calls:  # `verify` asks about the run's answer, which failed verification
        return (
            f"Thread {thread!r} waits for a human's answer about its last answer, which failed "
            "verification. Answer it first with Command(resume={'type': 'approve'}) (or "
            "'reject', 'respond'), then send the message (or pass "
            "config={'configurable': {'keel_pending': 'not_run'}} to end that run as cancelled)."
        )
    return (
        f"Thread {thread!r} waits for a human's answer about {', '.join(calls)}; a new message "
        "would drop the pending call. Answer it first with Command(resume={'type': 'approve'}) "
        "(or 'reject', 'edit', 'respond'), then send the message (or pass "
        "config={'configurable': {'keel_pending': 'not_run'}} to drop the pending calls)."
    )


def _records(config: RunnableConfig | None, calls: list[Any]) -> Flow[dict[str, CallRecord]]:
    """The ledger flow reading `calls`' records in the thread `config` names."""
    thread = str(((config or {}).get("configurable") or {})["thread_id"])
    return records_flow(thread, [c["id"] for c in calls if c.get("id")])


def _latest(config: RunnableConfig | None) -> RunnableConfig:
    """The address of the thread's latest checkpoint (what `get_state` reads)."""
    thread = ((config or {}).get("configurable") or {})["thread_id"]
    return {"configurable": {"thread_id": thread, "checkpoint_ns": ""}}


def _top(config: RunnableConfig) -> RunnableConfig:
    """The address of the thread's top level that `config` updates.

    That is `config` itself, or the latest top-level checkpoint when `config` addresses a
    subgraph's conversation (its `checkpoint_ns`).
    """
    conf = config.get("configurable") or {}
    if not conf.get("checkpoint_ns"):
        return config
    kept = {k: v for k, v in conf.items() if not k.startswith("checkpoint_")}
    return {**config, "configurable": {**kept, "checkpoint_ns": ""}}


def _continues(input: Any) -> bool:
    """Whether `input` continues the thread's run (`None`, a `Command`), not a new message."""
    return input is None or isinstance(input, Command)


def _run_of(state: StateSnapshot | None) -> str | None:
    """The run id the thread's latest checkpoint was written under (the run that wrote it)."""
    found = ((state.metadata if state is not None else None) or {}).get("run_id")
    return None if found is None else str(found)


def _light(saved: CheckpointTuple | None) -> StateSnapshot | None:
    """What `refusal` needs of a thread that does not wait for a human, read cheaply.

    A thread with a pending interrupt (or none saved) gets `None`: read the whole state then, as
    `refusal` and `closed` need its interrupts and messages; so does one whose last run left
    tool calls without an answer (`left_ended` records that run from its state), or a node to
    run next (`stopped_ended`). Building
    LangGraph's snapshot on every run start would cost each run a full deserialization of the
    thread.
    """
    if saved is None or interrupt_pending(saved):
        return None
    if any(k.startswith("branch:to:") for k in saved.checkpoint["channel_values"]):
        return None  # a node was to run next: the last run stopped mid-step (`stopped_ended`)
    messages = saved.checkpoint["channel_values"].get("messages") or []
    if pending_tool_calls(messages)[1]:
        return None
    values = {"messages": messages}  # already read with the checkpoint: for `_replaced`
    return StateSnapshot(
        values, (), saved.config, saved.metadata, None, saved.parent_config, (), ()
    )


def _write_failed(config: RunnableConfig, exc: Exception) -> Exception:
    """A state update's database error, as the write failed (`_update`): it may be written."""
    if not isinstance(exc, DATABASE_ERRORS):
        return exc
    error = state_error(exc, config, "update the state", IN_DOUBT)
    error.__cause__ = exc
    return error


def _ends(answered: Dropped, end: RunEnd | None) -> list[tuple[RunEnd, dict[str, Any], bool]]:
    """The run ends `answered` records: (recorder, state, `first_end`), the waited run first."""
    if answered.ended is None or end is None:
        return []
    end = end.earlier(answered.run_id)
    inside = [(RunEnd(r, end.config, end.context), ended, True) for r, ended in answered.inside]
    return [(end, answered.ended, answered.first_end), *inside]


def _written(
    answered: Dropped, ends: list[tuple[RunEnd, dict[str, Any], bool]], *, report: bool = True
) -> Flow[list[Any]]:
    """The `not_run` audit records of `answered`, then the run ends `ends` records, in one flow.

    `report`: each run end's record looks for the thread's orphans (`RunEnd.flow`).
    """
    flows: list[Flow[Any]] = [insert_flow(answered.records)] if answered.records else []
    for run_end, ended, first_end in ends:
        if (flow := run_end.flow(ended, first_end=first_end, report=report)) is not None:
            flows.append(flow)
    return _each(flows)


def _each(flows: list[Flow[Any]]) -> Flow[list[Any]]:
    """`flows` one after the other, in one transaction: their results."""
    results = []
    for flow in flows:
        results.append((yield from flow))
    return results


def _as_started(state: StateSnapshot, saved: CheckpointTuple | None) -> StateSnapshot:
    """`state` with the messages a new message's run starts from: its checkpoint's own.

    `get_state` adds the writes of the checkpoint's pending step: a tool step that finished
    while the checkpoint after it was never saved (its process killed between the two, a
    failed save). LangGraph's run for a new message drops that step, its results included;
    they stay in `state.tasks` (`step_results`). A thread that waits for a human, or that a
    resume continues (its writes applied), is read as `get_state` reads it.
    """
    if saved is None or state.interrupts:
        return state
    messages = saved.checkpoint["channel_values"].get("messages") or []
    return state._replace(values={**state.values, "messages": messages})


class ThreadGuardedGraph(ProtectedGraph):
    """A compiled graph that refuses input which would lose work or start a run from nothing.

    It is a `ProtectedGraph` too: what only keel may write is refused at every entry point.
    """

    keel_audit: AuditLog | None = None
    """Where `not_run` answers to pending calls are audited (the agent's ledger)."""
    keel_admission: Admission | None = None
    """Admission control: each run holds a lease while it streams (None: no caps)."""
    keel_version: AgentVersion | None = None
    """The agent version a refused run is recorded under (`keel report --by version`)."""
    keel_recorder: Recorder | None = None
    """Where a run that ends on a storage failure writes its run record (the agent's observer)."""
    keel_thread_leases: ThreadLeases | None = None
    """One run per thread across the processes sharing the agent's ledger (`graphs._one_run`)."""
    keel_agents: Mapping[str, Recorder] | None = None
    """A supervisor's agents' recorders, by node: their runs found stopped are recorded so."""
    keel_tools: ToolLookup | None = None
    """The graph's tools by name (a supervisor's: its agents'), to read a left-behind call's
    arguments as its tool does (`left_answers`)."""
    keel_agent_tools: Mapping[str, ToolLookup] | None = None
    """A supervisor's agents' tools, by node: a call an agent left is read with its own agent's
    tool of that name (`answers_inside`), not another agent's namesake."""

    def copy(self, update: dict[str, Any] | None = None) -> ThreadGuardedGraph:
        """A copy (as `with_config` makes), keeping the audit log and admission control."""
        attrs = {k: v for k, v in self.__dict__.items() if k not in _NOT_INIT}
        out = type(self)(**{**attrs, **(update or {})})
        out.keel_audit = self.keel_audit
        out.keel_admission = self.keel_admission
        out.keel_output_guard = self.keel_output_guard
        out.keel_version = self.keel_version
        out.keel_recorder = self.keel_recorder
        out.keel_thread_leases = self.keel_thread_leases
        out.keel_agents = self.keel_agents
        out.keel_tools = self.keel_tools
        out.keel_agent_tools = self.keel_agent_tools
        return out

    def _run_end(self, config: RunnableConfig | None, kwargs: dict[str, Any]) -> RunEnd | None:
        if self.keel_recorder is None:
            return None
        context = run_context(config, kwargs.get("context"))
        config = ensure_config(config)
        conf = config.get("configurable") or {}
        kept = self.checkpointer not in (None, False) or saver_in(conf) is not None
        thread = conf.get("thread_id")
        return RunEnd(self.keel_recorder, config, context, str(thread) if kept and thread else None)

    def _checked(
        self,
        input: Any,
        config: RunnableConfig | None,
        state: StateSnapshot | None,
        kwargs: Any,
        found: Mapping[str, CallRecord] | None = None,
        inside: list[tuple[str, StateSnapshot]] | None = None,
    ) -> tuple[Any, Dropped, bool]:
        """`input` as it will run, the records its run writes first, and whether it resumes.

        A resume's caller checks that something waits, at the checkpoint its config names.
        Raises `UserError` for input keel refuses (`refusal`, protected keys); the records are
        for the caller to write once the run starts (`_answer`), so a refused run writes none.
        `found`: the ledger's records of the calls a stopped run left behind (`_found`);
        `inside`: the conversations its subgraphs left mid-step (`_inside`).
        """
        answered = Dropped()
        if drops_pending(input, config, state):
            assert state is not None
            input, closing = closed(input, state)
            _, calls = pending_tool_calls(state.values.get("messages") or [])
            # a supervisor's agent waited: its calls are in its own conversation
            waiting, agents = dropped_inside(inside or []), self.keel_agents or {}
            within = [m for _, _, answers in waiting for m in answers]
            dropped = [*calls, *calls_inside(inside or [])]
            records = self._not_run([*closing, *within], config, kwargs, dropped)
            ends = [(agents[n], abandoned(s, answers)) for n, s, answers in waiting if n in agents]
            gone = abandoned(state, closing, within)
            answered = Dropped(records, gone, inside=ends, run_id=_run_of(state))
            state = None  # nothing waits any more
        problem = refusal(input, config, state)
        if problem is not None:
            raise UserError(problem)
        if left := left_behind(input, state):
            assert state is not None
            saved = step_results(state)
            input, closing = closed_left(input, left, found, saved, self.keel_tools)
            records = self._not_run(closing, config, kwargs, left)
            stopped = left_ended(state, closing)
            answered = Dropped(records, stopped, first_end=True, run_id=_run_of(state))
        elif (ended := stopped_ended(input, state)) is not None:
            calls = calls_inside(inside or [])
            by_agent = self.keel_agent_tools or {}
            closing = answers_inside(inside or [], found, by_agent, self.keel_tools)
            records = self._not_run(closing, config, kwargs, calls)
            agents = self.keel_agents or {}
            ends = [(agents[n], inside_ended(s, closing)) for n, s in inside or [] if n in agents]
            run_id = _run_of(state)
            answered = Dropped(records, ended, first_end=True, inside=ends, run_id=run_id)
        input = _without_resent(input, state)
        # protected keys and unread messages, before any record (the stream does not re-check)
        resumes = self._check_input(input) and config is not None
        if left := turned_past(input, state):
            input, closing = closed_update(input, left)
            answered = Dropped(self._not_run(closing, config, kwargs, left))
        return input, answered, resumes

    def _inside(
        self, input: Any, config: RunnableConfig | None, state: StateSnapshot | None
    ) -> Steps[list[tuple[str, StateSnapshot]]]:
        """The conversations a run stopped in a subgraph (a supervisor's agent) left mid-step.

        Read only for a run found stopped with a node to run (`stopped_ended`): see `left_inside`;
        or, for a new message that drops the pending calls, those waiting in a subgraph
        (`waiting_inside`).
        """
        if drops_pending(input, config, state):
            return waiting_inside((yield self._read(config or {}, subgraphs=True)))
        if stopped_ended(input, state) is None:
            return []
        return left_inside((yield self._read(config or {}, subgraphs=True)))

    def _found(
        self,
        input: Any,
        config: RunnableConfig | None,
        state: StateSnapshot | None,
        inside: list[tuple[str, StateSnapshot]] | None = None,
    ) -> Steps[Mapping[str, CallRecord] | None]:
        """The ledger's records of the calls a stopped run left behind (see `left_behind`).

        In the thread's messages, else in its subgraphs' conversations (`inside`). Without a
        ledger there are none; `None` when the ledger could not be read.
        """
        calls = left_behind(input, state) or calls_inside(inside or [])
        if not calls or self.keel_audit is None:
            return {}
        ledger = self.keel_audit.ledger
        try:
            found: Mapping[str, CallRecord] = yield both(
                ledger.run, ledger.arun, _records(config, calls)
            )
        except StorageError as exc:
            log.warning("keel could not read the ledger about calls a run left: %s", exc)
            return None
        return found

    def _not_run(
        self, closing: list[Any], config: RunnableConfig | None, kwargs: Any, calls: list[Any]
    ) -> list[AuditRecord]:
        """The `not_run` audit records of `closing`, for the run's user, as its other records."""
        context, recorder, version = kwargs.get("context"), self.keel_recorder, self.keel_version
        return not_run_records(closing, config, context, recorder, version, calls)

    def _answer(self, answered: Dropped, end: RunEnd | None) -> Steps[None]:
        """Audit the calls this run answers `not_run`; record the end of the run that waited.

        See `_checked`. The audit records and the run records kept in the audit's ledger are
        written in one transaction: a failure writes none of them (the run then ends on it
        before it starts, `_not_started`, and the calls still wait), so no audit says `not_run`
        of a call whose run's record still says it waits. A record kept elsewhere (an agent of
        a supervisor on a ledger of its own) is written on its own afterwards. A transaction
        the ledger refuses for good is tried once more with the records looking for no orphaned
        calls (`RunEnd.flow(report=False)`): a report refused for good failed every message on
        the thread; a later run end reports them.
        """
        audit, ends = self.keel_audit, _ends(answered, end)
        if audit is None:
            for run_end, ended, first_end in ends:
                yield run_end.recording(ended, first_end=first_end)
            return
        ledger = audit.ledger
        here = [e for e in ends if e[0].recorder.ledger is ledger]
        apart = [e for e in ends if e[0].recorder.ledger is not ledger]
        if answered.records or here:
            try:
                reports: list[Any] = yield both(ledger.run, ledger.arun, _written(answered, here))
            except Exception as exc:
                if not refused_for_good(exc) or not here:
                    raise
                log.error(  # else every message on the thread would fail on it
                    "keel could not report orphaned calls with the record of a run found "
                    "stopped (or write what went with it): the ledger refuses it for good (%r); "
                    "it is written again without the report, and a later run end of the thread "
                    "reports them",
                    exc,
                )
                written = _written(answered, here, report=False)
                reports = yield both(ledger.run, ledger.arun, written)
            for report in reports:
                if callable(report):
                    report()
        for run_end, ended, first_end in apart:
            yield run_end.recording(ended, first_end=first_end)

    def _refused(
        self, config: RunnableConfig | None, context: RunContext, lease: Lease, result: Outcome
    ) -> tuple[AuditRecord, RunRecord]:
        """The records of a run admission control refused.

        With the agent's observer, they name the policy as the run's other records do.
        """
        recorder = self.keel_recorder
        policy = None if recorder is None else recorder.who(ensure_config(config), context).policy
        return refused_records(config, context, lease, result, self.name, self.keel_version, policy)

    def _leased(
        self, config: RunnableConfig | None, kwargs: Any
    ) -> Steps[tuple[Lease, Outcome | None]]:
        """The run's lease from admission control, and its outcome if refused (`overloaded`).

        A refused run's audit and run records are written here (see `_refused`).
        """
        gate = self.keel_admission
        assert gate is not None
        context = run_context(config, kwargs.get("context"))
        lease: Lease = yield both(gate.acquire, gate.aacquire, context)
        if lease.refused is None:
            return lease, None
        result = overloaded(gate.policy, lease.refused)
        audit, record = self._refused(config, context, lease, result)
        audits = AuditLog(gate.ledger)
        yield both(audits.write, audits.awrite, [audit])
        runs = RunLog(gate.ledger)
        yield both(runs.write, runs.awrite, record)
        return lease, result

    def _admitted(
        self, input: Any, config: RunnableConfig | None, kwargs: Any, answered: Dropped
    ) -> Iterator[Any]:
        """LangGraph's `stream` under a lease (renewed while it runs, released at the end)."""
        gate = self.keel_admission
        assert gate is not None
        leased, ending = drive(self._started(self._leased(config, kwargs), config, kwargs))
        if leased is None:
            yield from ending
            return
        lease, refused = leased
        if refused is not None:
            yield from refused_chunks(refused, kwargs, self.stream_mode)
            return
        with gate.holding(lease):
            answer = self._answer(answered, self._run_end(config, kwargs))
            _, ending = drive(self._started(answer, config, kwargs))
            yield from ending or self._stream_checked(input, config, kwargs)

    async def _aadmitted(
        self, input: Any, config: RunnableConfig | None, kwargs: Any, answered: Dropped
    ) -> AsyncGenerator[Any, None]:
        """LangGraph's `astream` under a lease (see `_admitted`)."""
        gate = self.keel_admission
        assert gate is not None
        leased, ending = await adrive(self._started(self._leased(config, kwargs), config, kwargs))
        lease, refused = leased if leased is not None else (None, None)
        if lease is None or refused is not None:
            for part in (
                ending if refused is None else refused_chunks(refused, kwargs, self.stream_mode)
            ):
                yield part
            return
        chunks = self._astream_checked(input, config, kwargs)
        async with gate.aholding(lease), contextlib.aclosing(chunks):
            answer = self._answer(answered, self._run_end(config, kwargs))
            _, ending = await adrive(self._started(answer, config, kwargs))
            for part in ending:
                yield part
            if ending:
                return
            async for chunk in chunks:
                yield chunk

    def _read(self, config: RunnableConfig, *, subgraphs: bool = False) -> Op:
        """The step that reads the thread's state as `get_state` (its database errors raw).

        A run tells a storage failure by the driver's error (`graphs._storage`).
        """
        steps = partial(reported, config, subgraphs, partial(self._saved, config))
        return Op(lambda: drive(steps()), lambda: adrive(steps()))

    def _state(self, config: RunnableConfig | None) -> Steps[StateSnapshot | None]:
        """The thread's state as a new run finds it (`_light`, `_as_started`); None: no thread."""
        if not ((config or {}).get("configurable") or {}).get("thread_id"):
            return None
        saver, saved = self.checkpointer, None
        if isinstance(saver, BaseCheckpointSaver):
            saved = yield both(saver.get_tuple, saver.aget_tuple, _latest(config))
            light = _light(saved)
            if light is not None:
                return light
        try:
            return _as_started((yield self._read(config or {})), saved)
        except ValueError:  # no checkpointer
            return None

    def _seen(
        self, config: RunnableConfig | None, state: StateSnapshot | None
    ) -> Steps[Sequence[tuple[str, str]]]:
        """Whom the ledger has seen an unstamped thread run for (`users_seen`); [] to go by.

        Asked only with a ledger and a checkpointer (the graph's, or the one a server runs it
        with): without one, a `thread_id` names no thread and each run starts from nothing. A
        ledger that cannot be read says nothing (`unseen`, logged).
        """
        conf = (config or {}).get("configurable") or {}
        kept = self.checkpointer not in (None, False) or saver_in(conf) is not None
        flow = users_seen(config, state) if kept else None
        if self.keel_audit is None or flow is None:
            return []
        ledger = self.keel_audit.ledger
        try:
            seen: Sequence[tuple[str, str]] = yield both(ledger.run, ledger.arun, flow)
        except StorageError as exc:
            return unseen(config, exc)
        return seen

    def _owner(self, config: RunnableConfig | None) -> Steps[str | None]:
        """The owner stamped on the thread's latest checkpoint (`owner_of`), read for itself.

        Only the checkpoint's metadata is needed: a saver's tuple, not LangGraph's snapshot
        (which `_state` builds for a thread that waits for a human).
        """
        saver, thread = (
            self.checkpointer,
            ((config or {}).get("configurable") or {}).get("thread_id"),
        )
        if not isinstance(saver, BaseCheckpointSaver) or not thread:
            return owner_of((yield from self._state(config)))
        return owner_of((yield both(saver.get_tuple, saver.aget_tuple, _latest(config))))

    def _read_by(self, config: RunnableConfig, context: Any) -> Steps[None]:
        """Refuse a read for `context` (if given) of a thread another user owns (`readable`)."""
        if context is not None:
            readable(config, (yield from self._owner(config)), run_context(config, context))

    def _updated(
        self, config: RunnableConfig, supersteps: Sequence[Sequence[StateUpdate]]
    ) -> Steps[RunnableConfig]:
        """A state update's config, with the thread's owner (`stamped`), once it may be written.

        A thread whose subgraph (a supervisor's agent) waits for a human refuses it
        (`graphs._paused.refuse_update`; a graph without subgraphs has none to wait in), and a
        waiting thread refuses a turn written after the calls it waits on (`refuse_turned_past`).
        """
        owner = yield from self._owner(config)
        nested = next(self.get_subgraphs(), None) is not None
        state = yield self._read(_top(config), subgraphs=nested)
        if nested:
            refuse_update(config, state)
        refuse_turned_past(config, state, written(supersteps))
        return stamped(config, owner)

    def bulk_update_state(
        self, config: RunnableConfig, supersteps: Sequence[Sequence[StateUpdate]]
    ) -> RunnableConfig:
        """LangGraph's `bulk_update_state` (and `update_state`), keeping the thread's owner.

        Refused while a subgraph of the thread waits for a human (`_updated`).
        """
        return drive(self._update(config, supersteps))

    async def abulk_update_state(
        self, config: RunnableConfig, supersteps: Sequence[Sequence[StateUpdate]]
    ) -> RunnableConfig:
        """LangGraph's `abulk_update_state` (and `aupdate_state`), as `bulk_update_state`."""
        refuse_sync_saver(self.checkpointer, config, AUPDATE, "update_state")
        return await adrive(self._update(config, supersteps))

    def _update(
        self, config: RunnableConfig, supersteps: Sequence[Sequence[StateUpdate]]
    ) -> Steps[RunnableConfig]:
        """A state update; a database error raised as `keel.StorageError` (`_state_storage`).

        One before the write (reading the thread) wrote nothing; one during it may have.
        """
        supersteps = self._check_updates(config, supersteps)  # keel's keys first: it names them
        updated = yield from read_kept(
            self._updated(config, supersteps), config, "update the state", UNWRITTEN
        )
        written = yield Op(
            partial(super().bulk_update_state, updated, supersteps),
            partial(super().abulk_update_state, updated, supersteps),
            on_error=partial(_write_failed, config),
        )
        return written  # type: ignore[no-any-return]

    def get_state(
        self, config: RunnableConfig, *, subgraphs: bool = False, context: Any = None
    ) -> StateSnapshot:
        """LangGraph's `get_state`; with `context`, only for the thread's owner (or reviewer).

        `context` is the `RunContext` (or its dict) of the user the state is read for, as a
        run's: a thread another user owns is a `UserError` (see `keel.graphs._owner`). A thread
        that waits for a human in a subgraph (a supervisor's agent) has the waiting agent's
        outcome (`keel.graphs._paused`).
        """
        return drive(self._got(config, subgraphs, context))

    async def aget_state(
        self, config: RunnableConfig, *, subgraphs: bool = False, context: Any = None
    ) -> StateSnapshot:
        """LangGraph's `aget_state`; with `context`, only for the owner (see `get_state`)."""
        refuse_sync_saver(self.checkpointer, config, "aget_state", "get_state")
        return await adrive(self._got(config, subgraphs, context))

    def _got(self, config: RunnableConfig, subgraphs: bool, context: Any) -> Steps[StateSnapshot]:
        """`get_state`'s steps; a database error raised as `keel.StorageError`."""
        return read_kept(self._got_raw(config, subgraphs, context), config, "read the state", READ)

    def _got_raw(
        self, config: RunnableConfig, subgraphs: bool, context: Any
    ) -> Steps[StateSnapshot]:
        yield from self._read_by(config, context)
        state = yield from reported(config, subgraphs, partial(self._saved, config))
        leases = self.keel_thread_leases
        ledger = None if leases is None else leases.ledger
        return (yield from at_breakpoint(ledger, self._running_here, config, state))

    def _running_here(self, config: RunnableConfig) -> bool:
        """Whether a run of this process holds the thread (`graphs._one_run`)."""
        return isinstance(self, OneRunPerThread) and running_here(self.checkpointer, config)

    def _saved(self, config: RunnableConfig, subgraphs: bool) -> Op:
        """LangGraph's read of the thread's state (the checkpoint as saved)."""
        return Op(
            partial(super().get_state, config, subgraphs=subgraphs),
            partial(super().aget_state, config, subgraphs=subgraphs),
        )

    def get_state_history(
        self, config: RunnableConfig, *, context: Any = None, **kwargs: Any
    ) -> Iterator[StateSnapshot]:
        """LangGraph's `get_state_history`; with `context`, only for the thread's owner.

        The owner is the one stamped on the thread's latest checkpoint (see `get_state`); the
        check runs when this is called, before any state is read.
        """
        drive(read_kept(self._read_by(config, context), config, "read the state history", READ))
        return history_kept(super().get_state_history(config, **kwargs), config)

    async def aget_state_history(
        self, config: RunnableConfig, *, context: Any = None, **kwargs: Any
    ) -> AsyncIterator[StateSnapshot]:
        """LangGraph's `aget_state_history`; with `context`, only for the thread's owner."""
        refuse_sync_saver(self.checkpointer, config, "aget_state_history", "get_state_history")
        await adrive(
            read_kept(self._read_by(config, context), config, "read the state history", READ)
        )
        async for state in ahistory_kept(super().aget_state_history(config, **kwargs), config):
            yield state

    def _starting(
        self, input: Any, config: RunnableConfig | None, kwargs: Any
    ) -> Steps[tuple[Any, RunnableConfig | None, Dropped]]:
        """What `stream` and `astream` do before the run: read the thread, check what is sent.

        Returns the input as it runs, its config (with the thread's owner, `owned`) and what
        its run answers first (`_checked`). Without admission control those answers are written
        here (`_answer`); with it, once the run is admitted (`_admitted`).
        """
        state = yield from self._state(config)
        seen = yield from self._seen(config, state)
        context = run_context(config, kwargs.get("context"))
        config = owned(input, config, state, context, seen)
        if self.keel_recorder is not None:  # what the run it continues lost with a checkpoint
            resumed = state.values if state is not None and _continues(input) else None
            config = yield from self.keel_recorder.resuming(resumed, config, context)
        inside = yield from self._inside(input, config, state)
        found = yield from self._found(input, config, state, inside)
        input, answered, resumes = self._checked(input, config, state, kwargs, found, inside)
        if resumes:
            self._check_waiting((yield self._read(config or {})).interrupts, config)
        if self.keel_admission is None:
            yield from self._answer(answered, self._run_end(config, kwargs))
        return input, config, answered

    def _started(
        self, steps: Steps[T], config: RunnableConfig | None, kwargs: dict[str, Any]
    ) -> Steps[tuple[T | None, list[Any]]]:
        """What `steps` (a run's start) return, and no chunk.

        If storage failed in them: nothing, and the run's one chunk (`_not_started`, which
        raises anything else).
        """
        try:
            return (yield from steps), []
        except Exception as exc:
            return None, [(yield from self._not_started(exc, config, kwargs))]

    def _not_started(
        self, exc: Exception, config: RunnableConfig | None, kwargs: dict[str, Any]
    ) -> Steps[Any]:
        """The one chunk of a run whose storage failed before it began, or raise.

        That is a failure as `_starting` reads the thread or writes what the run answers first
        (the `not_run` audit records, the end of the run that waited): the run ends as `error /
        storage` as one whose checkpointer failed mid-run does (`StreamEnding.failed`), and
        nothing of it was written. Anything else raises as it is.
        """
        if not storage_failure(exc):
            raise exc
        end = self._run_end(config, kwargs)
        ending = StreamEnding(self.stream_mode, kwargs, end, started=False)
        return (yield from ending.failed(exc))

    def stream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[Any]:
        """LangGraph's `stream`, after checking what is sent (see `refusal`)."""
        if not inside_task(config):
            started, ending = drive(
                self._started(self._starting(input, config, kwargs), config, kwargs)
            )
            if started is None:
                return iter(ending)
            input, config, answered = started
            if self.keel_admission is not None:
                return self._admitted(input, config, kwargs, answered)
            return self._stream_checked(input, config, kwargs)
        return super().stream(input, config, **kwargs)

    async def astream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        """LangGraph's `astream`, after checking what is sent (see `refusal`)."""
        refuse_sync_saver(self.checkpointer, config)
        if not inside_task(config):
            starting = self._started(self._starting(input, config, kwargs), config, kwargs)
            started, ending = await adrive(starting)
            if started is None:
                for part in ending:
                    yield part
                return
            input, config, answered = started
            if self.keel_admission is not None:
                # closed with the caller's stream (a client gone): the lease comes back now
                parts = self._aadmitted(input, config, kwargs, answered)
                async with contextlib.aclosing(parts):
                    async for part in parts:
                        yield part
                return
            chunks: AsyncIterator[Any] = self._astream_checked(input, config, kwargs)
        else:
            chunks = super().astream(input, config, **kwargs)
        async for chunk in chunks:
            yield chunk


class KeelGraph(OneRunPerThread, ThreadGuardedGraph):
    """A keel agent's compiled graph: one run at a time per thread, each checked against it.

    `OneRunPerThread` (`graphs._one_run`) takes the thread, then `ThreadGuardedGraph` reads it.
    """


G = TypeVar("G", bound=CompiledStateGraph[Any, Any, Any, Any])


_NOT_INIT = (
    "__orig_class__",
    "keel_audit",
    "keel_admission",
    "keel_output_guard",
    "keel_version",
    "keel_recorder",
    "keel_thread_leases",
    "keel_agents",
    "keel_tools",
    "keel_agent_tools",
)


def guarded(
    graph: G,
    audit: AuditLog | None = None,
    admission: Admission | None = None,
    output_guard: OutputGuardPolicy | None = None,
    version: AgentVersion | None = None,
    recorder: Recorder | None = None,
    thread_leases: ThreadLeases | None = None,
    agents: Mapping[str, Recorder] | None = None,
    tools: ToolLookup | None = None,
    agent_tools: Mapping[str, ToolLookup] | None = None,
) -> G:
    """`graph` as a `ThreadGuardedGraph` (same nodes, channels and config).

    With `output_guard`, a `messages` stream sends answers once that guard checked them;
    `version` is the agent version its refused (overloaded) runs are recorded under;
    `recorder` writes the run record of a run that ends on a storage failure;
    `thread_leases` (the agent's ledger) keeps one run per thread across processes;
    `agents` (a supervisor's) records its agents' runs a new message finds stopped, by node;
    `tools` reads the arguments of the calls a stopped run left as their tools do, and
    `agent_tools` (a supervisor's) those its agents left, by node, as each agent's tools do.
    """
    attrs = {k: v for k, v in graph.__dict__.items() if k not in _NOT_INIT}
    out = KeelGraph(**attrs)
    out.keel_audit = audit
    out.keel_admission = admission
    out.keel_output_guard = output_guard
    out.keel_version = version
    out.keel_recorder = recorder
    out.keel_thread_leases = thread_leases
    out.keel_agents = agents
    out.keel_tools = tools
    out.keel_agent_tools = agent_tools
    return out  # type: ignore[return-value]


def admitted(graph: Any, admission: Admission | None) -> Any:
    """`graph` (a keel agent or supervisor) with its runs under `admission` (None: no caps)."""
    if not isinstance(graph, ThreadGuardedGraph):
        raise UserError(
            f"Admission control wraps keel's graphs (build_agent, build_supervisor), got "
            f"{type(graph).__name__}."
        )
    out = graph.copy()
    out.keel_admission = admission
    return out
