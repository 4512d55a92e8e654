"""Thread semantics: what a caller may send to a thread, checked before LangGraph writes it.

- A new message on a thread that waits for a human (an approval, "did this happen?") would
  make LangGraph start a new run and silently drop the pending tool calls: it is refused.
- `None` or `Command(...)` continues a thread; on a thread that does not exist it would start a
  run with no user message: it is refused.
- A run needs at least one message: empty input and an empty message list are refused.

Each refusal is a `keel.errors.UserError` raised by `invoke`/`stream` (and their async twins)
before anything is written, so the thread stays as it was.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any, TypeVar

from langchain_core.runnables import RunnableConfig
from langgraph.graph.state import CompiledStateGraph
from langgraph.types import Command, StateSnapshot

from keel._node import inside_task
from keel.errors import UserError

__all__ = ["ThreadGuardedGraph", "guarded", "refusal"]


def refusal(input: Any, config: RunnableConfig | None, state: StateSnapshot | None) -> str | None:
    """Why `input` may not be sent to the thread whose current state is `state` (or `None`).

    `state` is `None` when there is no thread (no checkpointer or no `thread_id`); a thread
    without a checkpoint has a state whose `config` carries no `checkpoint_id`.
    """
    thread = ((config or {}).get("configurable") or {}).get("thread_id")
    saved = (state.config.get("configurable") or {}) if state is not None else {}
    exists = bool(saved.get("checkpoint_id"))
    if input is None or isinstance(input, Command):
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
    if not isinstance(input, Mapping) or not input.get("messages"):
        return (
            f"A run needs at least one message, got {input!r}: invoke the agent with "
            "{'messages': [('user', '...')]}."
        )
    if exists and state is not None and state.interrupts:
        return _waiting(thread, state)
    return None


def _waiting(thread: Any, state: StateSnapshot) -> str:
    calls = [
        f"{r['action_request']['action']}({r.get('tool_call_id', '')})"
        for i in state.interrupts
        for r in (i.value if isinstance(i.value, list) else [])
        if isinstance(r, Mapping) and isinstance(r.get("action_request"), Mapping)
    ]
    what = ", ".join(calls) or "a human's answer"
    return (
        f"Thread {thread!r} waits for a human's answer about {what}; a new message would drop "
        "the pending call. Answer it first with Command(resume={'type': 'approve'}) (or "
        "'reject', 'edit', 'respond'), then send the message."
    )


class ThreadGuardedGraph(CompiledStateGraph[Any, Any, Any, Any]):
    """A compiled graph that refuses input which would lose work or start a run from nothing."""

    def _state(self, config: RunnableConfig | None) -> StateSnapshot | None:
        if not ((config or {}).get("configurable") or {}).get("thread_id"):
            return None
        try:
            return self.get_state(config or {})
        except ValueError:  # no checkpointer
            return None

    async def _astate(self, config: RunnableConfig | None) -> StateSnapshot | None:
        if not ((config or {}).get("configurable") or {}).get("thread_id"):
            return None
        try:
            return await self.aget_state(config or {})
        except ValueError:
            return None

    def stream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[Any]:
        """LangGraph's `stream`, after checking what is sent (see `refusal`)."""
        if not inside_task(config):
            problem = refusal(input, config, self._state(config))
            if problem is not None:
                raise UserError(problem)
        return super().stream(input, config, **kwargs)

    async def astream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        """LangGraph's `astream`, after checking what is sent (see `refusal`)."""
        if not inside_task(config):
            problem = refusal(input, config, await self._astate(config))
            if problem is not None:
                raise UserError(problem)
        async for chunk in super().astream(input, config, **kwargs):
            yield chunk


G = TypeVar("G", bound=CompiledStateGraph[Any, Any, Any, Any])


def guarded(graph: G) -> G:
    """`graph` as a `ThreadGuardedGraph` (same nodes, channels and config)."""
    attrs = {k: v for k, v in graph.__dict__.items() if k != "__orig_class__"}
    return ThreadGuardedGraph(**attrs)  # type: ignore[return-value]
