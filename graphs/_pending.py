"""The calls a run drops while they wait for a human: each answered `not_run`, and audited.

A new message sent with `keel_pending="not_run"` (`drops_pending`, `closed`) and a
`Command(update=...)` that writes a later AI turn (`turned_past`, `closed_update`) leave the
calls that wait without an answer; keel answers each `not_run` before the caller's messages.
A new message on a thread whose last run stopped mid-step (cancelled, a `KeyboardInterrupt`,
a killed process, a storage failure) finds that run's calls without an answer, and nothing
waits: keel answers each before the caller's messages as the ledger knows it (`left_behind`,
`closed_left`): its recorded result, `not_run` when it may have started ("outcome unknown"),
else `not_run`.
`Dropped` is what the run writes once it starts: the `not_run` audit records
(`not_run_records`) and, for the run the new message ends, its end (`abandoned`,
`stopped/cancelled`).
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import ToolCall, ToolMessage, convert_to_messages
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import ensure_config
from langgraph.graph.message import REMOVE_ALL_MESSAGES, add_messages
from langgraph.types import Command, StateSnapshot

from keel import outcome
from keel.db.audit import AuditRecord
from keel.db.idempotency import CallRecord
from keel.errors import UserError
from keel.graphs._admitted import run_context
from keel.graphs._protected import messages_of
from keel.graphs._storage import Recorder
from keel.history import pending_tool_calls
from keel.nodes._once import recorded, tool_message
from keel.state import task_start
from keel.tools._args import ToolLookup, read_call
from keel.tools._duplicates import duplicate_answer
from keel.versions import AgentVersion

__all__ = [
    "stopped_ended",
    "PENDING_KEY",
    "ToolLookup",
    "Dropped",
    "abandoned",
    "answers_inside",
    "closed",
    "closed_left",
    "closed_update",
    "drops_pending",
    "left_behind",
    "left_answers",
    "left_ended",
    "left_inside",
    "calls_inside",
    "inside_ended",
    "not_run_records",
    "step_results",
    "refuse_turned_past",
    "removed_by",
    "removed_of_waiting_run",
    "shape",
    "turned_past",
]

PENDING_KEY = "keel_pending"
"""`configurable` key: `"not_run"` answers a waiting thread's pending calls instead of refusing."""


def drops_pending(input: Any, config: RunnableConfig | None, state: StateSnapshot | None) -> bool:
    """Whether the caller asked to answer a waiting thread's pending calls `not_run`."""
    asked = ((config or {}).get("configurable") or {}).get(PENDING_KEY) == "not_run"
    waiting = state is not None and bool(state.interrupts)
    return asked and waiting and isinstance(input, Mapping) and bool(input.get("messages"))


@dataclass(frozen=True, slots=True)
class Dropped:
    """What a run that drops a waiting thread's pending calls writes once it starts."""

    records: list[AuditRecord] = field(default_factory=list)
    """The `not_run` audit records of the pending calls."""
    ended: dict[str, Any] | None = None
    """The state the run that waited ends with (`stopped/cancelled`), for its run record."""
    first_end: bool = False
    """Record `ended` only where the run recorded no end of its own (a run found stopped)."""
    inside: list[tuple[Recorder, dict[str, Any]]] = field(default_factory=list)
    """The ends of its subgraphs' runs (a supervisor's agents), each by its own recorder."""
    run_id: str | None = None
    """The id of the run `ended` ends, as the thread's latest checkpoint names it."""


_DROPPED = "Not run: a new message arrived while this call waited for a human, and the caller "
_DROPPED += "asked to drop the pending call (keel_pending='not_run')."


def closed(input: Mapping[str, Any], state: StateSnapshot) -> tuple[dict[str, Any], list[Any]]:
    """`input` with a `not_run` answer for each pending call before its messages."""
    _, calls = pending_tool_calls(state.values.get("messages") or [])
    closing = [tool_message(c, _DROPPED, "not_run") for c in calls]
    return _before(input, closing), closing


def waiting_inside(state: StateSnapshot | None) -> list[tuple[str, StateSnapshot]]:
    """The conversations of a waiting thread's subgraphs that wait for a human, by node.

    `state`: the thread's state read with `subgraphs=True`. A supervisor waits while its agent
    does: the calls that wait are in the agent's conversation, not the supervisor's messages.
    """
    out: list[tuple[str, StateSnapshot]] = []
    for task in state.tasks if state is not None else ():
        inner = task.state
        if isinstance(inner, StateSnapshot) and inner.interrupts:
            out.append((task.name, inner))
            out += waiting_inside(inner)
    return out


def dropped_inside(
    inside: Sequence[tuple[str, StateSnapshot]],
) -> list[tuple[str, StateSnapshot, list[ToolMessage]]]:
    """Each waiting conversation `inside` (`waiting_inside`) with `not_run` answers to its calls.

    They answer nothing in any history (no later run continues that conversation): they are
    what the audit log and the agent's run record say became of the calls.
    """
    out = []
    for name, inner in inside:
        _, calls = pending_tool_calls(inner.values.get("messages") or [])
        out.append((name, inner, [tool_message(c, _DROPPED, "not_run") for c in calls]))
    return out


def _before(input: Mapping[str, Any], closing: list[ToolMessage]) -> dict[str, Any]:
    """`input` with `closing` before its messages."""
    sent = input["messages"]
    sent = list(sent) if isinstance(sent, list | tuple) else [sent]
    return {**input, "messages": [*closing, *sent]}


_STOPPED = "the run that asked for it stopped before the call finished (cancelled, interrupted, "
_STOPPED += "or its process ended), and a new message arrived"
LEFT_NOT_RUN = f"Not run: {_STOPPED}; keel does not run it now."
"""The answer to a left-behind call that never started (or, without a ledger, may have)."""
LEFT_UNKNOWN = (
    f"Outcome unknown: this call started, but {_STOPPED}, so it may or may not have happened; "
    "keel does not run it again. Check whether it happened before asking for it again."
)
"""The answer to a left-behind call the ledger found `started` and never finished."""


def left_behind(input: Any, state: StateSnapshot | None) -> list[ToolCall]:
    """The calls a new message finds without an answer on a thread where nothing waits.

    The run that asked for them stopped between the model's turn and their results (its task
    cancelled, a `KeyboardInterrupt`, its process killed, its checkpointer failed). A call
    the input answers itself (a client's `ToolMessage`) is not left behind.
    """
    if state is None or state.interrupts or not isinstance(input, Mapping):
        return []
    if not input.get("messages"):
        return []
    _, calls = pending_tool_calls(state.values.get("messages") or [])
    sent = input["messages"]
    try:
        sent = convert_to_messages(sent if isinstance(sent, list) else [sent])
    except Exception:  # `refusal` says what is wrong with them
        return []
    answered = {m.tool_call_id for m in sent if isinstance(m, ToolMessage)}
    return [c for c in calls if c.get("id") not in answered]


def step_results(state: StateSnapshot) -> dict[str, ToolMessage]:
    """The results the checkpoint's pending step saved, by call id (see `closed_left`)."""
    out: dict[str, ToolMessage] = {}
    for task in state.tasks:
        written = task.result.get("messages") if isinstance(task.result, Mapping) else None
        for m in messages_of(written) or []:
            if isinstance(m, ToolMessage):
                out.setdefault(m.tool_call_id, m)
    return out


def closed_left(
    input: Mapping[str, Any],
    calls: list[ToolCall],
    found: Mapping[str, CallRecord] | None,
    saved: Mapping[str, ToolMessage],
    tools: ToolLookup | None = None,
) -> tuple[dict[str, Any], list[ToolMessage]]:
    """`input` with an answer for each left-behind call before its messages.

    `saved`: results the stopped run's last step saved although the checkpoint after it was
    not (LangGraph drops them from a new message's run); a call that has one gets it. `found`:
    the ledger's records of the calls, by id (`None`: the ledger could not be read, so any of
    them may have started). A call recorded `completed` or `failed` gets its recorded result;
    one found `started` an "outcome unknown" answer; the rest `not_run` (a repeat of a claimed
    call of its turn: that call's answer, see `left_answers`, whose `tools` this is).
    """
    closing = left_answers(calls, found, saved, tools)
    return _before(input, closing), closing


def left_answers(
    calls: list[ToolCall],
    found: Mapping[str, CallRecord] | None,
    saved: Mapping[str, ToolMessage],
    tools: ToolLookup | None = None,
) -> list[ToolMessage]:
    """An answer for each left-behind call, as the ledger knows it (see `closed_left`).

    A call the ledger never claimed that repeats a claimed call of its turn (same tool, same
    arguments as the tool reads them: `tools`, as `keel.tools._duplicates` reads them) was
    its duplicate: it gets that call's answer. Without `tools` (or for a tool it does not
    know) arguments are compared as spelled.
    """
    closing: list[ToolMessage] = []
    claimed: dict[tuple[str, str], ToolMessage] = {}
    for c in calls:
        record = None if found is None else found.get(c.get("id") or "")
        key = read_call(c["name"], c.get("args") or {}, tools)
        if (result := saved.get(c.get("id") or "")) is not None:
            answer = result
        elif record is not None and record.state in ("completed", "failed") and record.result:
            answer = recorded(c, record.result)
        elif found is None or (record is not None and record.state == "started"):
            answer = tool_message(c, LEFT_UNKNOWN, "not_run")
        elif key in claimed:
            answer = duplicate_answer(c, claimed[key])
        else:
            answer = tool_message(c, LEFT_NOT_RUN, "not_run")
        if record is not None:
            claimed.setdefault(key, answer)
        closing.append(answer)
    return closing


def left_inside(state: StateSnapshot | None) -> list[tuple[str, StateSnapshot]]:
    """The conversations a stopped run's subgraphs left mid-step, by the node that ran each.

    `state`: the thread's state read with `subgraphs=True`. A supervisor stopped while its agent
    ran (`stopped_ended`) holds no unanswered call in its own messages; the agent's calls are in
    the agent's conversation (its checkpoint namespace), which no later run continues: a new
    message hands the agent a new one. Their results, saved or not, are in that state's values.
    """
    out: list[tuple[str, StateSnapshot]] = []
    for task in state.tasks if state is not None else ():
        inner = task.state
        if isinstance(inner, StateSnapshot) and not inner.interrupts and inner.next:
            out.append((task.name, inner))
            out += left_inside(inner)
    return out


def answers_inside(
    inside: Sequence[tuple[str, StateSnapshot]],
    found: Mapping[str, CallRecord] | None,
    tools: Mapping[str, ToolLookup],
    default: ToolLookup | None = None,
) -> list[ToolMessage]:
    """An answer for each call the conversations `inside` (`left_inside`) left (`left_answers`).

    Each conversation's calls are read with the tools of the agent that made them (`tools`, by
    node; `default` for a node it does not name): a supervisor's agents may each have a tool of
    one name that reads arguments its own way, and a call repeats another of its turn as its
    own agent reads them.
    """
    out: list[ToolMessage] = []
    for name, state in inside:
        _, calls = pending_tool_calls(state.values.get("messages") or [])
        out += left_answers(calls, found, {}, tools.get(name, default))
    return out


def calls_inside(inside: Sequence[tuple[str, StateSnapshot]]) -> list[ToolCall]:
    """The calls the conversations `inside` (`left_inside`) left without an answer."""
    return [c for _, s in inside for c in pending_tool_calls(s.values.get("messages") or [])[1]]


def inside_ended(state: StateSnapshot, closing: list[ToolMessage]) -> dict[str, Any]:
    """The state a subgraph's run (a supervisor's agent) stopped mid-step ends with.

    `closing`: the answers to its calls (`left_answers`); without any, it stopped elsewhere.
    """
    ids = {c.get("id") for c in pending_tool_calls(state.values.get("messages") or [])[1]}
    names = ", ".join(sorted({str(m.name) for m in closing if m.tool_call_id in ids}))
    if not names:
        return _stopped(state)
    return {
        **state.values,
        "outcome": outcome.cancelled(
            f"stopped before the run ended (its process ended, or it was cancelled), with its "
            f"calls to {names} unanswered; the supervisor thread's next message audited them "
            "(not_run, as the ledger knows them), and keel ran none of them again"
        ),
    }


def turned_past(input: Any, state: StateSnapshot | None) -> list[ToolCall]:
    """The pending calls a `Command(update=...)` leaves behind: it writes a later AI turn.

    The thread's messages are updated as LangGraph will (`add_messages`, on copies): when the
    AI message whose calls wait is still there but no longer the last AI message, its calls
    would never be answered.
    """
    if not isinstance(input, Command) or state is None or not state.interrupts:
        return []
    messages = state.values.get("messages") or []
    index, calls = pending_tool_calls(messages)
    after: Any = list(messages)
    try:
        for key, value in input._update_as_tuples():
            sent = messages_of(value) if key == "messages" else None
            if sent is not None:
                copies: list[Any] = [m.model_copy() for m in sent]  # add_messages sets ids
                after = add_messages(after, copies)
    except Exception:  # LangGraph says what is wrong with the update
        return []
    asked = messages[index].id if calls else None
    last, _ = pending_tool_calls(after)
    stays = asked is not None and any(m.id == asked for m in after)
    return calls if stays and after[last].id != asked else []


def removed_by(command: Command[Any]) -> set[str]:
    """The ids of the messages `command`'s update removes (`REMOVE_ALL_MESSAGES`: all)."""
    removed: set[str] = set()
    try:
        for key, value in command._update_as_tuples():
            sent = messages_of(value) if key == "messages" else None
            removed |= {str(m.id) for m in sent or [] if m.type == "remove"}
    except Exception:  # LangGraph says what is wrong with the update
        return set()
    return removed


def shape(message: Any) -> tuple[Any, ...]:
    """What a message says: its kind, its content and the calls it makes or answers."""
    calls = [(c["name"], c["args"], c["id"]) for c in getattr(message, "tool_calls", None) or []]
    return (message.type, message.content, calls, getattr(message, "tool_call_id", None))


def overwritten_by(command: Command[Any], saved: Sequence[Any]) -> set[str]:
    """The ids of the `saved` messages `command`'s update writes a different message over.

    `add_messages` replaces a message by id, whatever the new one's kind: an AI turn written
    under the id of the turn whose calls wait swapped those calls for others, and the human
    asked again approved what they had not seen (a plain resume).
    """
    by_id = {str(m.id): m for m in saved if m.id}
    written: set[str] = set()
    try:
        for key, value in command._update_as_tuples():
            sent = messages_of(value) if key == "messages" else None
            for m in sent or []:
                old = by_id.get(str(m.id)) if m.id and m.type != "remove" else None
                if old is not None and shape(m) != shape(old):
                    written.add(str(m.id))
    except Exception:  # LangGraph says what is wrong with the update
        return set()
    return written


def removed_of_waiting_run(command: Command[Any], state: StateSnapshot | None) -> list[str]:
    """The messages of the run `state` waits in (its task's, `task_start` on) `command` removes.

    Or overwrites with a different message (`overwritten_by`). The run's record is keyed by
    its first message: without it the run's end is recorded under another key, and the record
    that waited stays `interrupted` for good; without its AI turn, the calls that wait are never
    answered nor audited.
    """
    if state is None or not state.interrupts:
        return []
    messages = state.values.get("messages") or []
    run = messages[max(task_start(messages), 0) :]
    removed = removed_by(command) | overwritten_by(command, run)
    own = [str(m.id) for m in run if m.id]
    return own if REMOVE_ALL_MESSAGES in removed else [i for i in own if i in removed]


def refuse_turned_past(config: RunnableConfig, state: StateSnapshot, supersteps: Any) -> None:
    """Refuse a state update (`update_state`) that writes a turn after the calls `state` waits on.

    As a run's input, `Command(update=...)` answers those calls `not_run` (audited) before its
    turn (`closed_update`); a state update is no run, and left them with no answer and no record
    for good (the next message finds no pending call: the last AI message has none). So is one
    that removes a message of the run that waits (`removed_of_waiting_run`); a run's input may
    remove none (`graphs.threads.refusal`). `config` addressing a subgraph's conversation is
    `refuse_update`'s (`graphs._paused`).
    """
    conf = (config or {}).get("configurable") or {}
    if conf.get("checkpoint_ns"):
        return
    thread = conf.get("thread_id")
    for step in supersteps:
        for update in step:
            values = update[0]
            command = Command(update=values) if isinstance(values, Mapping) else values
            if not isinstance(command, Command):
                continue
            if left := turned_past(command, state):
                names = ", ".join(f"{c['name']}({c.get('id')})" for c in left)
                raise UserError(
                    f"This state update writes a turn after {names}, which thread "
                    f"{thread!r} waits for a human's answer about: the call "
                    "would be left with no answer and no audit record. Answer it first with "
                    "Command(resume=...), or send the update as a run's input "
                    "(invoke(Command(update=...))), which answers it not_run (audited)."
                )
            if removed := removed_of_waiting_run(command, state):
                raise UserError(
                    f"This state update removes (or overwrites) {', '.join(map(repr, removed))}, "
                    "of the run "
                    f"that thread {thread!r} waits in for a human's answer: the run would be "
                    "recorded twice (its record is keyed by its first message, and the one "
                    "that waits would stay 'interrupted'), or its waiting calls left with no "
                    "answer and no audit record. Answer them first with Command(resume=...), "
                    "or drop them with a new message (config={'configurable': "
                    "{'keel_pending': 'not_run'}}), then edit the history."
                )


def closed_update(command: Command[Any], calls: list[ToolCall]) -> tuple[Command[Any], list[Any]]:
    """`command` with a `not_run` answer for each call it leaves behind, before its update."""
    text = "Not run: a state update (Command(update=...)) wrote a later turn while this call "
    text += "waited for a human."
    closing: list[ToolMessage] = [tool_message(c, text, "not_run") for c in calls]
    update = [("messages", closing), *command._update_as_tuples()]
    return dataclasses.replace(command, update=update), closing


def abandoned(
    state: StateSnapshot, closing: list[Any], inside: Sequence[ToolMessage] = ()
) -> dict[str, Any]:
    """The state the run that waited ends with: its calls answered `not_run`, `cancelled`.

    `inside`: the answers to the calls its subgraphs (a supervisor's agent) waited on.
    """
    names = ", ".join(sorted({str(m.name) for m in [*closing, *inside]})) or "its answer"
    return {
        **state.values,
        "messages": [*(state.values.get("messages") or []), *closing],
        "outcome": outcome.cancelled(
            f"cancelled while it waited for a human about {names}: a new message arrived and "
            "the caller dropped the pending calls (keel_pending='not_run')"
        ),
    }


def left_ended(state: StateSnapshot, closing: list[ToolMessage]) -> dict[str, Any]:
    """The state a run that left calls behind ends with, for a run record it may not have.

    A run cancelled, or stopped by `KeyboardInterrupt`, recorded its end; a killed process did
    not, and without this its run would have no record at all.
    """
    names = ", ".join(sorted({str(m.name) for m in closing}))
    return {
        **state.values,
        "messages": [*(state.values.get("messages") or []), *closing],
        "outcome": outcome.cancelled(
            f"stopped before the run ended (its process ended, or it was cancelled), with its "
            f"calls to {names} unanswered; the thread's next message answered them, and keel "
            "ran none of them again"
        ),
    }


def stopped_ended(input: Any, state: StateSnapshot | None) -> dict[str, Any] | None:
    """The state a run a new message finds stopped mid-step ends with (None: none was).

    That run left no tool call unanswered in the thread's messages (`left_behind` handles
    those): a supervisor stopped while its agent ran, whose calls are the agent's. A run
    cancelled, or stopped by `KeyboardInterrupt`, recorded its end; a killed process did not.
    """
    if state is None or state.interrupts or not state.next or not isinstance(input, Mapping):
        return None
    if not input.get("messages"):
        return None
    return _stopped(state)


def _stopped(state: StateSnapshot) -> dict[str, Any]:
    return {
        **state.values,
        "outcome": outcome.cancelled(
            f"stopped before the run ended (its process ended, or it was cancelled) in "
            f"{', '.join(state.next)}; the thread's next message found it so"
        ),
    }


def not_run_records(
    closing: list[Any],
    config: RunnableConfig | None,
    context: Any,
    recorder: Recorder | None,
    version: AgentVersion | None,
    calls: Sequence[ToolCall] = (),
) -> list[AuditRecord]:
    """The `not_run` audit records of the pending calls `closing` answers, for the run's user.

    Each record's `status` is its answer's `keel_status`: `not_run`, or, for a left-behind call
    the ledger had a result for, that result's.

    With the agent's observer (`recorder`), they carry the run, policy and agent version as
    its other records do; each its tool's version, and the arguments of its call in `calls`
    (which refund was dropped), as every other tool record does.
    """
    args = {c.get("id"): c.get("args") for c in calls}
    thread = ((config or {}).get("configurable") or {}).get("thread_id")
    who = run_context(config, context)  # the server's user, a RunContext or a plain dict
    fields: dict[str, Any] = {"user_id": who.user_id, "tenant_id": who.tenant_id}
    if recorder is not None:
        fields = recorder.who(ensure_config(config), who).fields()
    tools = version.tool_versions if version is not None else {}
    return [
        AuditRecord(
            kind="tool",
            decision="not_run",
            status=str(m.response_metadata.get("keel_status") or "not_run"),
            tool=m.name,
            args=args.get(m.tool_call_id),
            result=str(m.content),
            tool_call_id=m.tool_call_id,
            tool_version=tools.get(m.name),
            id=_not_run_id(thread, m.tool_call_id),
            **{**fields, "thread_id": str(thread)},
        )
        for m in closing
    ]


def _not_run_id(thread: Any, tool_call_id: str) -> str:
    """The id of the `not_run` audit record of a call: one per call, however often written.

    A run that answered its thread's calls `not_run` and then failed to start (its
    checkpointer down as it saved its input) left them unanswered: the next message answers
    them again, and their records are not stored twice (`insert_flow` skips a stored id).
    """
    return uuid.uuid5(uuid.NAMESPACE_URL, f"keel:not_run:{thread}:{tool_call_id}").hex
