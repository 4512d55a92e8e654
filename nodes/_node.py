"""Helpers shared by the node factories: one node from a sync and an async function."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from langgraph._internal._runnable import RunnableCallable
from langgraph.runtime import Runtime

from keel.identity import context_from_user, server_user
from keel.state import AgentState, RunContext

__all__ = ["context_of", "make_node"]

_DEFAULT_CONTEXT = RunContext()


def make_node(
    name: str,
    func: Callable[..., Any],
    afunc: Callable[..., Awaitable[Any]],
) -> RunnableCallable:
    """A LangGraph node that runs `func` under `invoke` and `afunc` under `ainvoke`.

    LangGraph's `RunnableCallable` is what `StateGraph.add_node` wraps plain functions in, so a
    keel node costs no more than a hand-written function node.
    """
    return RunnableCallable(func, afunc, name=name, trace=False)


def context_of(runtime: Runtime[RunContext] | None) -> RunContext:
    """The run's `RunContext`; the anonymous default when the caller passed none.

    Under LangGraph server with auth, the identity is the authenticated user's (see
    `keel.identity`): whatever `context` the client sent is ignored.
    """
    user = server_user(runtime)
    if user is not None:
        return context_from_user(user)
    ctx = runtime.context if runtime is not None else None
    if ctx is None:
        return _DEFAULT_CONTEXT
    if isinstance(ctx, RunContext):
        return ctx
    if isinstance(ctx, dict):  # type: ignore[unreachable]  # e.g. from the LangGraph server
        return RunContext(**ctx)
    raise TypeError(
        f"keel nodes need context=RunContext(...), got {type(ctx).__name__}. "
        "Pass context=RunContext(user_id=..., tenant_id=..., roles=(...)) to invoke."
    )


def last_ai_index(state: AgentState) -> int:
    """Index of the last AI message in the state's messages, or -1."""
    messages = state.get("messages") or []
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].type == "ai":
            return i
    return -1
