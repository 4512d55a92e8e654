"""A thread that waits for a human inside a subgraph: what its state says, what it refuses.

A supervisor's agent pauses for a human by raising `GraphInterrupt` inside the supervisor's
node, and LangGraph writes nothing of a node that raises: the supervisor's saved `outcome`
stays what its router wrote (None) while it waits. An agent's says `interrupted /
awaiting_approval` and what it waits for. keel reports the supervisor's as that: the waiting
agent's own outcome, in the state `get_state` returns and in the `values` chunk that ends the
run which paused (the state `invoke` returns). The checkpoint itself keeps what the router
wrote (`get_state_history` shows it so).

A state update of such a thread (`update_state` / `bulk_update_state`, as any node or none)
is refused (`refuse_update`): it writes a new checkpoint whose tasks are new ones, and the
waiting agent's conversation, kept under its task, is left behind with its pending calls
never answered nor audited (and its run record `interrupted` for good). So is one of the
waiting conversation itself (at its `checkpoint_ns`): ended (`__end__`, `respond`) or moved
past its calls (a later AI turn), it is never continued, and its calls were lost the same way.
An agent's own pending calls are in its thread's messages, where its next message finds them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

from langchain_core.runnables import RunnableConfig
from langgraph.types import StateSnapshot

from keel import outcome
from keel._drive import Op, Steps, adrive, drive
from keel.errors import UserError
from keel.graphs._chunks import ChunkShape
from keel.graphs._storage import log
from keel.state import Outcome

__all__ = ["PausedChunks", "refuse_update", "reported", "unreported", "waiting_outcome"]

_INTERRUPT = "__interrupt__"

Read = Callable[[RunnableConfig], Op]
"""The step that reads a thread's state with its subgraphs (`get_state(subgraphs=True)`)."""


def waiting_outcome(state: StateSnapshot) -> Outcome:
    """The outcome of the conversation `state` (read with subgraphs) waits in, innermost first.

    A waiting subgraph whose state says nothing (not a keel agent) is reported as waiting for a
    human too.
    """
    return _inside(state) or outcome.interrupted(
        f"awaiting a human's answer in {', '.join(t.name for t in state.tasks) or 'a subgraph'}"
    )


def _inside(state: StateSnapshot) -> Outcome | None:
    for task in state.tasks:
        inner = task.state
        if not isinstance(inner, StateSnapshot):
            continue
        own = inner.values.get("outcome")
        found = _inside(inner) or (own if isinstance(own, Mapping) else None)
        if found is not None and found.get("status") == "interrupted":
            return found  # type: ignore[return-value]
    return None


def unreported(state: StateSnapshot, config: RunnableConfig | None) -> bool:
    """Whether `state`, a top-level state, waits for a human while its outcome says nothing."""
    ns = ((config or {}).get("configurable") or {}).get("checkpoint_ns")
    said = state.values.get("outcome", False)  # a graph without keel's outcome has no key
    return not ns and bool(state.interrupts) and said is None


def reported(
    config: RunnableConfig, subgraphs: bool, read: Callable[[bool], Op]
) -> Steps[StateSnapshot]:
    """The thread's state (`read(subgraphs)`), its outcome the waiting agent's when it has none."""
    state: StateSnapshot = yield read(subgraphs)
    if not unreported(state, config):
        return state
    inside = state if subgraphs else (yield read(True))
    return state._replace(values={**state.values, "outcome": waiting_outcome(inside)})


def refuse_update(config: RunnableConfig, state: StateSnapshot) -> None:
    """Refuse a state update while a subgraph of the thread `state` waits for a human.

    `state`: the thread's top level, read with subgraphs. Refused whether `config` addresses
    the thread or that conversation (its `checkpoint_ns`), which no later run continues once an
    update ended it or moved it on.
    """
    waiting = [t.name for t in state.tasks if isinstance(t.state, StateSnapshot) and t.interrupts]
    if not waiting:
        return
    thread = ((config or {}).get("configurable") or {}).get("thread_id")
    names = ", ".join(repr(n) for n in waiting)
    inside = ((config or {}).get("configurable") or {}).get("checkpoint_ns")
    what = "the agent's conversation" if inside else "the thread"
    raise UserError(
        f"Thread {thread!r} waits for a human's answer in its agent {names}: a state update "
        f"of {what} would leave the calls it waits on with no answer and no audit record. "
        "Answer them first with Command(resume=...) (a reviewer's 'edit' changes a call), or "
        "send a new message with config={'configurable': {'keel_pending': 'not_run'}} to drop "
        "them (audited not_run)."
    )


class PausedChunks:
    """A run's chunks, the `values` chunk that ends a paused run with the waiting outcome."""

    def __init__(self, shape: ChunkShape, config: RunnableConfig | None, read: Read | None) -> None:
        self.shape = shape
        conf = {k: v for k, v in ((config or {}).get("configurable") or {}).items()}
        conf.pop("checkpoint_id", None)  # the thread as the run left it
        self.config: RunnableConfig = {"configurable": {**conf, "checkpoint_ns": ""}}
        self.read = read
        """None: the run keeps no thread (no checkpointer) to read what it waits for from."""

    def _waits(self, chunk: Any) -> dict[str, Any] | None:
        """`chunk`'s state if it ends a run that waits with no outcome, else None."""
        parts = self.shape.parts(chunk)
        if parts is None or parts[1] != "values" or parts[0]:
            return None
        payload = parts[2]
        if not isinstance(payload, dict) or payload.get("outcome", False) is not None:
            return None
        waits = _INTERRUPT in payload or (self.shape.v2 and bool(chunk.get("interrupts")))
        return payload if waits else None

    def _filled(self, chunk: Any, payload: dict[str, Any]) -> Steps[Any]:
        found = outcome.interrupted("awaiting a human's answer")
        try:
            if self.read is not None:
                found = waiting_outcome((yield self.read(self.config)))
        except Exception as exc:  # the chunk still says the run waits
            log.warning("keel could not read what a paused run waits for: %r", exc)
        return self.shape.make((), "values", {**payload, "outcome": found}, chunk)

    def guard(self, chunks: Iterator[Any]) -> Iterator[Any]:
        """`chunks`, a paused run's last `values` chunk with its outcome."""
        for chunk in chunks:
            payload = self._waits(chunk)
            yield chunk if payload is None else drive(self._filled(chunk, payload))

    async def aguard(self, chunks: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """`guard` for an async stream."""
        async for chunk in chunks:
            payload = self._waits(chunk)
            yield chunk if payload is None else await adrive(self._filled(chunk, payload))
