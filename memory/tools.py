"""Memory tools for the model: `remember`, `recall_memories`, `forget`, scoped to the caller.

The namespace comes from the run's `RunContext` (LangGraph runtime), never from the tool's
arguments: a model cannot read or write another user's memories by naming them.
"""

from __future__ import annotations

import hashlib
import json

from langgraph.runtime import get_runtime
from langgraph.store.base import BaseStore

from keel._node import context_of
from keel.memory.scope import store_of, user_namespace
from keel.state import RunContext
from keel.tools.registry import KeelTool, tool

__all__ = ["memory_tools"]


def memory_tools(store: BaseStore | None = None, *, kind: str = "memories") -> list[KeelTool]:
    """The three memory tools, bound to `store` (default: the graph's store).

    Args:
        store: The store; the graph's own (`compile(store=...)`) when omitted.
        kind: The namespace kind: the caller's memories live in `(kind, tenant, user)`.
    """

    def scope() -> tuple[BaseStore, tuple[str, ...]]:
        runtime = get_runtime(RunContext)
        return store_of(runtime, store), user_namespace(context_of(runtime), kind)

    @tool(name="remember", risk="write", side_effects=False)
    def remember(text: str) -> str:
        """Save a fact about the user for later conversations (one short sentence)."""
        fact = text.strip()
        if not fact:  # an empty memory would be recalled as a blank line, forever
            return (
                "Nothing remembered: text is empty. Call remember again with the fact itself "
                "as one short sentence, e.g. text='The user prefers tea.'."
            )
        st, ns = scope()
        key = hashlib.sha256(fact.encode()).hexdigest()[:16]  # same fact, same key
        st.put(ns, key, {"text": fact})
        return f"Remembered (id {key})."

    @tool(name="recall_memories", risk="read")
    def recall_memories(query: str, limit: int = 5) -> str:
        """Search what you remember about the user; returns ids, texts and relevance scores."""
        st, ns = scope()
        found = st.search(ns, query=query, limit=max(1, min(int(limit), 20)))
        if not found:
            return "No memories match."
        rows = [{"id": i.key, "text": i.value.get("text"), "score": i.score} for i in found]
        return json.dumps(rows, ensure_ascii=False)

    @tool(name="forget", risk="write", side_effects=False)
    def forget(memory_id: str) -> str:
        """Forget one memory by the id `recall_memories` returned."""
        st, ns = scope()
        if st.get(ns, memory_id) is None:
            return f"No memory with id {memory_id!r}; call recall_memories to find ids."
        st.delete(ns, memory_id)
        return f"Forgot {memory_id}."

    return [remember, recall_memories, forget]
