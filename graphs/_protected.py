"""Keel's graphs refuse, at every entry point, what only keel may write.

LangGraph drops input keys outside a graph's `input_schema` without a word, and writes
`update_state` and `Command(update=...)` values to any channel. A keel graph instead refuses
them with a `UserError` that names the keys: `invoke`/`stream` input, `Command(update=...)`,
`update_state` and `bulk_update_state` (sync and async) may set only the input schema's keys
(`keel.state.AgentInput`: messages), as the graph's own nodes (`as_node`; a `__copy__`'s
listed updates are checked as any). None may write LangGraph's own channels
(`__pregel_tasks`, `branch:to:<node>`, ...) or name the node to run next
(`Command(goto=...)`): either started a node past the guards before it, a `Send` with
state of the caller's making. A `Command(resume=...)` on a thread where nothing waits
for a human is refused too: LangGraph would keep it and hand it to the next `interrupt()`, so
a grant sent ahead would approve a call no human saw.

A run whose checkpointer fails ends with `outcome = error / storage` instead of a raw database
error (see `keel.graphs._storage`).

Each message a caller writes (a run's input, an AI or system message a state update writes) is
marked unread (`SENT_KEY`), so the input guard checks all of them, not only those after the
last AI message (`ProtectedGraph._marked`).

What it cannot stop: a Python caller with the checkpointer in hand can write any checkpoint.
Approval grants hold even then (they are sealed, see `keel.approvals.Grants`); usage, outcome
and the rest are only as trustworthy as the code that can write the database.
"""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping, Sequence
from functools import partial
from typing import Any, cast

from langchain_core.messages import (
    BaseMessage,
    HumanMessage,
    RemoveMessage,
    ToolMessage,
    convert_to_messages,
)
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import ensure_config
from langgraph.constants import END
from langgraph.graph.state import CompiledStateGraph
from langgraph.types import Command, GraphOutput, StateUpdate

from keel._drive import Op, Steps, adrive, drive
from keel._node import saved_thread
from keel.errors import StorageError, UserError
from keel.graphs._answers import AnswerStream
from keel.graphs._chunks import ChunkShape
from keel.graphs._paused import PausedChunks
from keel.graphs._storage import (
    AUPDATE,
    RunEnd,
    StreamEnding,
    at_top,
    refuse_sync_saver,
    storage_error,
    storage_failure,
    storage_outcome,
)
from keel.guards.content import OutputGuardPolicy
from keel.guards.screening import mark_sent
from keel.state import VERIFICATION_KEY, storable_ids

__all__ = ["ProtectedGraph", "langgraphs_channel", "messages_of", "protected"]


class ProtectedGraph(CompiledStateGraph[Any, Any, Any, Any]):
    """A compiled keel graph whose entry points refuse keys outside its input schema."""

    keel_output_guard: OutputGuardPolicy | None = None
    """The output guard the graph's answers pass: a `messages` stream sends them once checked."""

    def _answers(self, kwargs: dict[str, Any]) -> AnswerStream | None:
        shape = ChunkShape(self.stream_mode, kwargs)
        if self.keel_output_guard is None or not {"messages", "values", "updates"} & {*shape.modes}:
            return None
        return AnswerStream(self.keel_output_guard, shape)

    def _protected(self, keys: Sequence[str]) -> list[str]:
        allowed = self.builder.schemas[self.builder.input_schema]
        return sorted({k for k in keys if k in self.builder.channels and k not in allowed})

    def _scheduling(self, keys: Sequence[str]) -> list[str]:
        """The keys of `keys` that name LangGraph's own channels (`_refuse`)."""
        own = {*self.builder.channels, *self.builder.managed}
        return sorted({k for k in keys if langgraphs_channel(k) or k in self.channels} - own)

    def _refuse(self, keys: Sequence[str], where: str) -> None:
        """Refuse keys only keel writes, and LangGraph's own channels.

        LangGraph's channels (`__pregel_tasks`, `branch:to:<node>`, `__pregel_resume`, ...)
        schedule the graph: a `Send` written to `__pregel_tasks` ran the node it names with
        whatever state it carried (`call_model` with no usage, past the run budget and the
        input guard), `branch:to:<node>` started a node past the guards before it.
        """
        if internal := self._scheduling(keys):
            raise UserError(
                f"{where} sets {', '.join(repr(k) for k in internal)}: LangGraph writes "
                f"{'it' if len(internal) == 1 else 'them'} itself to start the graph's nodes, "
                "and a caller's write would start one past the guards that run before it, with "
                "state the caller made up. Send messages as input, and answer a waiting review "
                "with Command(resume=...)."
            )
        bad = self._protected(keys)
        if bad:
            allowed = ", ".join(repr(k) for k in self.builder.schemas[self.builder.input_schema])
            names = ", ".join(repr(k) for k in bad)
            raise UserError(
                f"{where} sets {names}: only keel writes {'it' if len(bad) == 1 else 'them'} "
                f"(keel's record of the run). A caller may send {allowed}."
            )

    def _check_input(self, input: Any) -> bool:
        """Refuse protected keys; whether the input resumes (and needs a waiting thread)."""
        if isinstance(input, dict):
            self._refuse(list(input), "The graph's input")
        if isinstance(input, Command):
            _refuse_goto(input, "as input")
            self._refuse([k for k, _ in input._update_as_tuples()], "Command(update=...)")
            self._refuse_unread(input._update_as_tuples(), "Command(update=...)")
            return input.resume is not None and self.checkpointer not in (None, False)
        return False

    def _refuse_unread(self, updates: Sequence[tuple[str, Any]], where: str) -> None:
        """Refuse a state update writing a user message or tool result the input guard never reads.

        The guard reads what a run's input sends (and what follows the last AI message): a
        message written by a state update beside a made-up AI turn would sit in the history
        unchecked. A graph without an input guard has nothing to bypass.
        """
        if "input_guard" not in self.nodes:
            return
        for key, value in updates:
            sent = messages_of(value) if key == "messages" and value else None
            if sent is None:
                continue
            unread = sorted({type(m).__name__ for m in sent if isinstance(m, _READ_KINDS)})
            if unread:
                raise UserError(
                    f"{where} writes a {' and a '.join(unread)} to the messages, which the input "
                    "guard would never read (it reads what a run's input sends). Send user "
                    'messages as input ({"messages": [...]}) and answer a waiting review with '
                    "Command(resume=...); a state update may write AI messages or remove messages."
                )

    def _check_waiting(self, snapshot_interrupts: Sequence[Any], config: Any) -> None:
        if not snapshot_interrupts:
            thread = ((config or {}).get("configurable") or {}).get("thread_id")
            raise UserError(
                f"Command(resume=...) answers a pending interrupt, and nothing on thread "
                f"{thread!r} is waiting for a human. Send the task as input instead; keel asks "
                "for the approvals it needs."
            )

    def stream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[Any]:
        """LangGraph's `stream`, after refusing protected keys and resumes nothing waits for."""
        storable_ids(config)  # whatever the checkpointer, before anything is read or written
        if self._check_input(input) and config is not None:
            self._check_waiting(self._read(config).run().interrupts, config)
        return self._stream_checked(input, config, kwargs)

    def _stream_checked(
        self, input: Any, config: RunnableConfig | None, kwargs: dict[str, Any]
    ) -> Iterator[Any]:
        """`stream` for input that passed the checks (`ThreadGuardedGraph` checks it itself)."""
        if not at_top(config):
            return super().stream(input, config, **kwargs)
        end = self._run_end(config, kwargs)
        ending = StreamEnding(self.stream_mode, kwargs, end, continues=input is None)
        chunks = super().stream(self._marked(_as_callers(input)), config, **ending.kwargs)
        chunks = self._paused(config, kwargs).guard(ending.guard(chunks))
        answers = self._answers(kwargs)
        return chunks if answers is None else answers.guard(chunks)

    async def astream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        """LangGraph's `astream`, after refusing protected keys and resumes nothing waits for."""
        storable_ids(config)
        refuse_sync_saver(self.checkpointer, config)
        if self._check_input(input) and config is not None:
            self._check_waiting((await self._read(config).arun()).interrupts, config)
        async with contextlib.aclosing(self._astream_checked(input, config, kwargs)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def _astream_checked(
        self, input: Any, config: RunnableConfig | None, kwargs: dict[str, Any]
    ) -> AsyncGenerator[Any, None]:
        """`astream` for input that passed the checks (see `_stream_checked`)."""
        if not at_top(config):
            chunks = super().astream(input, config, **kwargs)
        else:
            end = self._run_end(config, kwargs)
            ending = StreamEnding(self.stream_mode, kwargs, end, continues=input is None)
            chunks = super().astream(self._marked(_as_callers(input)), config, **ending.kwargs)
            chunks = self._paused(config, kwargs).aguard(ending.aguard(chunks))
            answers = self._answers(kwargs)
            chunks = chunks if answers is None else answers.aguard(chunks)
        async for chunk in chunks:
            yield chunk

    def _paused(self, config: RunnableConfig | None, kwargs: dict[str, Any]) -> PausedChunks:
        """What a run that pauses inside a subgraph reports as its outcome (`graphs._paused`)."""

        def read(at: RunnableConfig) -> Op:
            return self._read(at, subgraphs=True)

        kept = self.checkpointer not in (None, False) or saved_thread(ensure_config(config))
        shape = ChunkShape(self.stream_mode, kwargs)
        return PausedChunks(shape, config, read if kept else None)

    def _read(self, config: RunnableConfig, *, subgraphs: bool = False) -> Op:
        """The step that reads the thread's state as a run does (its database errors raw)."""
        return Op(
            partial(self.get_state, config, subgraphs=subgraphs),
            partial(self.aget_state, config, subgraphs=subgraphs),
        )

    def _run_end(self, config: RunnableConfig | None, kwargs: dict[str, Any]) -> RunEnd | None:
        """Where a run that ends on a storage failure is recorded: nowhere here.

        `ThreadGuardedGraph` records it with the agent's observer.
        """
        return None

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        """LangGraph's `invoke`; a storage failure before the run started ends it too."""
        return drive(self._invoked(input, config, kwargs))

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        """LangGraph's `ainvoke`; a storage failure before the run started ends it too."""
        return await adrive(self._invoked(input, config, kwargs))

    def _invoked(
        self, input: Any, config: RunnableConfig | None, kwargs: dict[str, Any]
    ) -> Steps[Any]:
        """`invoke` / `ainvoke` once: LangGraph's, the outcome of a storage failure (`_ended`)."""
        run = partial(super().invoke, input, config, **kwargs)
        try:
            return (yield Op(run, partial(super().ainvoke, input, config, **kwargs)))
        except Exception as exc:
            if not storage_failure(exc):
                raise
            if (end := self._run_end_before(exc, config, kwargs)) is not None:
                yield end.recording({"outcome": storage_outcome(exc)})
            return _ended(exc, config, kwargs)

    def _run_end_before(
        self, exc: BaseException, config: RunnableConfig | None, kwargs: dict[str, Any]
    ) -> RunEnd | None:
        """Where a run that failed before its stream began is recorded (`_run_end`).

        A stream that began records its own end (`StreamEnding`), and then raises a
        `StorageError` carrying the outcome: that one is not recorded twice.
        """
        if isinstance(exc, StorageError) and exc.outcome is not None:
            return None
        return self._run_end(config, kwargs) if at_top(config) else None

    def _check_updates(
        self, config: RunnableConfig | None, given: Sequence[Sequence[StateUpdate]]
    ) -> list[list[StateUpdate]]:
        """`given` as `StateUpdate`s, once each passed keel's checks (else a `UserError`)."""
        _check_shape(given)
        supersteps = [[StateUpdate(*update) for update in step] for step in given]
        if not supersteps or any(not step for step in supersteps):  # LangGraph: a ValueError
            raise UserError(
                f"bulk_update_state needs at least one superstep, each with at least one update, "
                f"got {list(supersteps)!r}: pass [[StateUpdate(values, as_node)], ...], or call "
                "update_state(config, values) for one update."
            )
        if not ((config or {}).get("configurable") or {}).get("checkpoint_ns"):
            for step in supersteps:  # (a subgraph's update is checked by its own graph)
                for update in step:
                    self._check_node(update, len(step))
                    items = copied(update)
                    for item in items:
                        self._check_node(item, len(items), copy=True)
        for step in written(supersteps):
            for update in step:
                values: Any = update[0]
                if isinstance(values, dict):
                    self._refuse(list(values), "update_state")
                    self._refuse_unread(list(values.items()), "update_state")
                elif isinstance(values, Command):
                    _refuse_goto(values, "in update_state")
                    self._refuse([k for k, _ in values._update_as_tuples()], "update_state")
                    self._refuse_unread(values._update_as_tuples(), "update_state")
        return supersteps

    def _check_node(self, update: StateUpdate, updates: int, *, copy: bool = False) -> None:
        """Refuse an `as_node` LangGraph would refuse, before anything is read or written.

        LangGraph raised `InvalidUpdateError("Node nope does not exist")`, and in a
        `bulk_update_state` only once the supersteps before it were written. `copy`: an update
        a `__copy__` lists (`copied`), which names a node (or None, alone).
        """
        values, as_node = update[0], cast("Any", update[1])  # a client's: any type
        if isinstance(as_node, str) and as_node in self.nodes:
            return
        alone = updates == 1
        if as_node is None and alone:
            return
        nodes = ", ".join(repr(n) for n in self.nodes)
        if copy:
            if as_node is not None:
                raise UserError(
                    f"update_state(as_node={COPY!r}) lists an update as {as_node!r}, which is "
                    f"no node of this graph: each (values, as_node) it lists names one of "
                    f"{nodes} (or None, alone)."
                )
        elif alone and (as_node in (INPUT, COPY) or (as_node == END and values is None)):
            return
        if as_node is None:
            why = (
                f"is None in a superstep of {updates} updates: each must name the node it "
                "writes as (LangGraph infers it only for an update alone in its superstep)"
            )
        elif as_node in (END, INPUT, COPY) and not alone:
            why = f"may only be alone in its superstep, which has {updates} updates"
        elif not isinstance(as_node, str):
            why = f"is a {type(as_node).__name__}, not the name of a node"
        elif as_node == END:
            why = f"ends the thread's pending tasks and takes values None, got {values!r}"
        else:
            why = "names no node of this graph"
        raise UserError(
            f"update_state's as_node={as_node!r} {why}. Name one of the graph's nodes ({nodes}); "
            f"alone in its superstep, {END!r} with values None (to end the pending tasks), "
            f"{INPUT!r} (to write the values as a run's input) or {COPY!r} (to fork the "
            "checkpoint), or None (the node that wrote last)."
        )

    def _marked(self, values: Any) -> Any:
        """`values` a caller writes with its messages marked unread (`SENT_KEY`).

        That is a run's input, a state update or a `Command`'s update. The input guard reads
        every message a caller writes, wherever it lands: a client may send AI turns of its own,
        and the guard would otherwise read only what follows the last one. The mark is saved
        with the message, so a run resumed after a crash before `input_guard` read it still has
        it read; `input_guard` removes it. A graph without an input guard marks nothing.
        """
        if "input_guard" not in self.nodes:
            return values
        if isinstance(values, Mapping) and values.get("messages"):
            return {**values, "messages": _unread(values["messages"])}
        if isinstance(values, Command) and values.update is not None:
            update = [
                (k, _unread(v) if k == "messages" else v) for k, v in values._update_as_tuples()
            ]
            return dataclasses.replace(values, update=update)
        return values

    def _checked_updates(
        self, config: RunnableConfig, supersteps: Sequence[Sequence[StateUpdate]]
    ) -> list[list[StateUpdate]]:
        checked = self._check_updates(config, supersteps)
        return [[self._marked_update(update) for update in step] for step in checked]

    def _marked_update(self, update: StateUpdate) -> StateUpdate:
        """`update` with its messages marked unread (`_marked`), a `__copy__`'s listed ones too."""
        items = copied(update)
        if items:
            listed: Any = [(self._marked(values), as_node) for values, as_node, *_ in items]
            return StateUpdate(listed, *update[1:])
        return StateUpdate(self._marked(update[0]), *update[1:])

    def bulk_update_state(
        self, config: RunnableConfig, supersteps: Sequence[Sequence[StateUpdate]]
    ) -> RunnableConfig:
        """LangGraph's `bulk_update_state` (and `update_state`), refusing protected keys."""
        return super().bulk_update_state(config, self._checked_updates(config, supersteps))

    async def abulk_update_state(
        self, config: RunnableConfig, supersteps: Sequence[Sequence[StateUpdate]]
    ) -> RunnableConfig:
        """LangGraph's `abulk_update_state` (and `aupdate_state`), refusing protected keys."""
        refuse_sync_saver(self.checkpointer, config, AUPDATE, "update_state")
        return await super().abulk_update_state(config, self._checked_updates(config, supersteps))


INPUT = "__input__"
"""`update_state(as_node=INPUT)`: LangGraph writes the values as a run's input."""
COPY = "__copy__"
"""`update_state(as_node=COPY)`: LangGraph forks the checkpoint (and applies listed updates)."""

_READ_KINDS = (HumanMessage, ToolMessage)
"""The messages the input guard reads: user messages and tool results."""

_INTERNAL = ("__", "branch:")
"""How LangGraph's own channel names begin (`TASKS`, `RESUME`, `branch:to:<node>`, ...)."""


def langgraphs_channel(key: object) -> bool:
    """Whether `key` is named as LangGraph names its own channels (`__pregel_tasks`, ...)."""
    return isinstance(key, str) and key.startswith(_INTERNAL)


def _refuse_goto(command: Command[Any], where: str) -> None:
    """Refuse a caller's `Command` that names the node to run next (`goto`).

    It would start the run at that node, past the guards that run first; a `Send` would
    also hand the node state of the caller's making.
    """
    if command.goto:
        raise UserError(
            f"Command(goto={command.goto!r}) {where} is refused: it would start the run at "
            "the node it names, past the guards that run first (the input guard "
            "would never read the messages it sends). Send the message as input "
            '({"messages": [...]}), or answer a waiting review with Command(resume=...).'
        )


def _check_shape(supersteps: Any) -> None:
    """Refuse `supersteps` that are no list of lists of updates (LangGraph's bare errors).

    An update is a `StateUpdate` or a tuple of its fields: (values, as_node, task_id), the
    last two optional. A dict in its place raised `KeyError: 0`, a 1-tuple an `IndexError`.
    """

    def sequence(value: Any) -> bool:
        return isinstance(value, Sequence) and not isinstance(value, str | bytes)

    for step in supersteps if sequence(supersteps) else [supersteps]:
        updates = step if sequence(step) else [step]
        for update in updates:
            if not sequence(update) or not 1 <= len(update) <= 3 or not sequence(supersteps):
                raise UserError(
                    f"bulk_update_state takes a list of supersteps, each a list of "
                    f"StateUpdate(values, as_node), got {update!r} where an update goes: pass "
                    "[[StateUpdate({'messages': [...]}, 'call_model')]], or call "
                    "update_state(config, values, as_node=...) for one update."
                )


def copied(update: StateUpdate) -> list[StateUpdate]:
    """The updates an `update_state(values, as_node="__copy__")` lists ([] for another).

    LangGraph forks the checkpoint and applies each `(values, as_node)` of a list `values` as
    one superstep: those are what it writes, and what keel checks. An item that is no such
    pair is refused (LangGraph: `InvalidUpdateError`).
    """
    values: Any = update[0]  # LangGraph types it a dict; a `__copy__` takes a list
    if update[1] != COPY or not isinstance(values, list):
        return []
    items = []
    for item in values:
        if isinstance(item, str | bytes) or not isinstance(item, Sequence) or len(item) < 2:
            raise UserError(
                f"update_state(as_node={COPY!r}) lists {item!r}: each update it lists is a "
                "(values, as_node) pair, as in [({'messages': [...]}, 'call_model')]."
            )
        items.append(StateUpdate(item[0], item[1]))
    return items


def written(supersteps: Sequence[Sequence[StateUpdate]]) -> list[list[StateUpdate]]:
    """`supersteps` as LangGraph writes them: a `__copy__`'s listed updates in its place."""
    return [[u for update in step for u in (copied(update) or [update])] for step in supersteps]


def messages_of(value: Any) -> list[BaseMessage] | None:
    """`value` (a message, or a list of them, in any form LangChain reads) as messages.

    `None` when it is not messages: LangGraph's `add_messages` then says what is wrong.
    """
    try:
        return convert_to_messages(value if isinstance(value, list | tuple) else [value])
    except Exception:
        return None


def _unread(value: Any) -> Any:
    """The messages of `value` marked unread (`SENT_KEY`); `value` when it is not messages."""
    messages = messages_of(value)
    if messages is None:
        return value
    return [m if isinstance(m, RemoveMessage) else mark_sent(m) for m in messages]


def _as_callers(input: Any) -> Any:
    """A run's `input` with each message it sends as a caller's (`_as_sent`)."""
    if not isinstance(input, Mapping) or not input.get("messages"):
        return input
    messages = messages_of(input["messages"])
    if messages is None:
        return input
    return {**input, "messages": [_as_sent(m) for m in messages]}


def _as_sent(message: BaseMessage) -> BaseMessage:
    """A caller's message with an id, without keel's mark of its own in-run messages.

    A caller's message always starts a task (`keel.state.starts_task`): sent with the mark
    (`VERIFICATION_KEY`), it would be folded into the thread's previous run and overwrite that
    run's record. Its id is given here, not by LangGraph's `add_messages` as the input is
    applied: a run resumed after its checkpointer failed may apply the saved input again, and
    the run's record is keyed on that id (it got a second record under the new one).
    """
    update: dict[str, Any] = {} if message.id else {"id": str(uuid.uuid4())}
    if VERIFICATION_KEY in message.additional_kwargs:
        kept = {k: v for k, v in message.additional_kwargs.items() if k != VERIFICATION_KEY}
        update["additional_kwargs"] = kept
    return message.model_copy(update=update) if update else message


def _ended(exc: BaseException, config: RunnableConfig | None, kwargs: dict[str, Any]) -> Any:
    """What `invoke` returns when storage failed before its stream yielded: the outcome."""
    if not at_top(config) or kwargs.get("stream_mode", "values") != "values":
        if isinstance(exc, StorageError) and exc.outcome is not None:
            raise exc
        raise storage_error(exc) from exc
    state = {"outcome": storage_outcome(exc)}
    return GraphOutput(value=state) if kwargs.get("version") == "v2" else state


def protected(graph: CompiledStateGraph[Any, Any, Any, Any]) -> Any:
    """`graph` as a `ProtectedGraph` (the same object; its copies stay protected)."""
    graph.__class__ = ProtectedGraph
    return graph
