"""The values `execute_tools` injects into a tool call, as LangGraph's `ToolNode` does.

`InjectedState` gets the node's state (or one field of it), `InjectedStore` the run's store,
`ToolRuntime` a `langgraph.prebuilt.ToolRuntime` (state, resolved `RunContext`, config, store,
stream writer, tool-call id, the agent's tools). They are added to the model's arguments only
when the tool is invoked: the call keel records, audits, gates, binds approvals to and keys
side effects by holds the model's arguments alone (a call naming an injected parameter is
refused before: `keel.tools._injected.spoofed`).

The state a tool gets is a deep copy: a tool that changes it in place changes nothing of the
run (keel's records, the thread's history).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from langchain_core.messages import ToolCall
from langchain_core.runnables import RunnableConfig
from langgraph.prebuilt import ToolRuntime
from langgraph.runtime import Runtime

from keel._node import context_of
from keel.tools.registry import RegisteredTool, ToolRegistry

__all__ = ["injected_args", "with_injected"]


def injected_args(
    entry: RegisteredTool,
    call: ToolCall,
    state: Mapping[str, Any],
    config: RunnableConfig,
    runtime: Runtime[Any] | None,
    tools: ToolRegistry,
) -> dict[str, Any] | str:
    """What keel injects into `call` of `entry` (`{}`: nothing), or why it cannot.

    Why it cannot is the error the call is answered with; the tool does not run.
    """
    found = entry.injected
    if not found:
        return {}
    view = copy.deepcopy(dict(state)) if found.state or found.runtime else {}
    out: dict[str, Any] = {}
    for param, key in found.state.items():
        if key is None:
            out[param] = view
        elif key in view:
            out[param] = view[key]
        elif param not in found.optional:
            return (
                f"Error: {entry.name} takes the state's {key!r} (InjectedState({key!r})), which "
                "this run's state does not hold yet; it was not run."
            )
    store = getattr(runtime, "store", None)
    if found.store is not None:
        if store is None:
            return (
                f"Error: {entry.name} needs a store (InjectedStore) and this agent has none; it "
                "was not run. Build the agent with a store: build_agent(store=...) (e.g. "
                "keel.memory.ChromaStore), or serve it (LangGraph server gives its store)."
            )
        out[found.store] = store
    if found.runtime is not None:
        out[found.runtime] = ToolRuntime(
            state=view,
            context=context_of(runtime),
            config=config,
            stream_writer=getattr(runtime, "stream_writer", _no_stream),
            tool_call_id=call.get("id"),
            store=store,
            tools=tools.tools,
            execution_info=getattr(runtime, "execution_info", None),
            server_info=getattr(runtime, "server_info", None),
        )
    return out


def with_injected(call: ToolCall, injected: Mapping[str, Any]) -> ToolCall:
    """`call` as the tool is invoked with: the model's arguments and the injected ones."""
    if not injected:
        return call
    return {**call, "args": {**call["args"], **injected}}


def _no_stream(chunk: Any) -> None:
    """The stream writer outside a graph run: writes nothing."""
