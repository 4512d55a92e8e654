"""Whose memory: namespaces built from the run's `RunContext`, never from model or tool input."""

from __future__ import annotations

from typing import Any

from langgraph.runtime import Runtime
from langgraph.store.base import BaseStore

from keel.errors import UserError
from keel.state import RunContext

__all__ = ["identity_of", "label", "store_of", "user_namespace"]

_NO_IDENTITY = (
    "keel memory needs the run's identity and fails closed without it: invoke the graph with "
    "context=RunContext(user_id=..., tenant_id=...) (or serve it behind auth that sets them)."
)


def label(text: str) -> str:
    """One namespace label from any string: LangGraph forbids '.', so it is percent-escaped."""
    return text.replace("%", "%25").replace(".", "%2E")


def identity_of(context: object) -> RunContext:
    """The `RunContext` of a run; refuses a missing or anonymous identity."""
    if isinstance(context, dict):
        context = RunContext(**context)
    if not isinstance(context, RunContext) or context.user_id == "anonymous":
        raise UserError(_NO_IDENTITY)
    return context


def user_namespace(context: object, kind: str = "memories") -> tuple[str, str, str]:
    """`(kind, tenant, user)`: one user's memories. Labels match whole, so `acme` ≠ `acme-corp`.

    Args:
        context: The run's `RunContext` (from `runtime.context`).
        kind: What the namespace holds, e.g. `"memories"` or `"lessons"`.
    """
    ctx = identity_of(context)
    if not kind or "." in kind:
        raise UserError(f"Memory kind must be a non-empty label without '.', got {kind!r}.")
    return (kind, label(ctx.tenant_id), label(ctx.user_id))


def store_of(runtime: Runtime[Any] | None, store: BaseStore | None) -> BaseStore:
    """The store given to the factory, else the graph's (`compile(store=...)`)."""
    found = store if store is not None else getattr(runtime, "store", None)
    if found is None:
        raise UserError(
            "keel memory needs a LangGraph store: compile the graph with store=ChromaStore(...) "
            "(build_agent(store=...)) or pass store= to the memory node or tools."
        )
    return found
