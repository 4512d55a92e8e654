"""The arguments a tool declares for LangGraph's `ToolNode` to inject, never for the model.

`InjectedState` (the whole state, or one field of it: `InjectedState("messages")`),
`InjectedStore` (the run's store), `ToolRuntime` (state, store, context, config, tool-call id,
stream writer) and `InjectedToolCallId` (LangChain fills it itself). `injections(tool)` reads
them once from the tool's signature and schema, as `ToolNode` does
(`langgraph.prebuilt.tool_node._get_all_injected_args`), with public types only.

An injected argument is never a model argument: a call whose arguments name one is refused
(`spoofed`), so what the model sent is what keel records, audits, binds approvals to and keys
side effects by, and what keel injects cannot be overridden.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Annotated, Any, Union, get_args, get_origin, get_type_hints

from langchain_core.tools import BaseTool, InjectedToolArg, InjectedToolCallId
from langchain_core.tools.base import get_all_basemodel_annotations
from langgraph.prebuilt import InjectedState, InjectedStore, ToolRuntime
from pydantic import BaseModel

__all__ = ["Injections", "injections", "spoofed"]


@dataclass(frozen=True, slots=True)
class Injections:
    """What one tool asks to be injected, by parameter name."""

    state: dict[str, str | None] = field(default_factory=dict)
    """`InjectedState` parameters: the state field each takes, `None` for the whole state."""
    optional: frozenset[str] = frozenset()
    """`InjectedState(field)` parameters with a default: left out when the field is absent."""
    store: str | None = None
    """The `InjectedStore` parameter."""
    runtime: str | None = None
    """The `ToolRuntime` parameter."""
    keys: frozenset[str] = frozenset()
    """Every parameter the model may not set (the above, `InjectedToolCallId`, any other
    `InjectedToolArg`)."""
    unfilled: tuple[str, ...] = ()
    """Required injected parameters keel cannot fill (a custom `InjectedToolArg`)."""

    def __bool__(self) -> bool:
        return bool(self.state or self.store or self.runtime)


_SEEN: dict[int, tuple[BaseTool, Injections]] = {}
"""`injections` by tool identity (tools are unhashable), the tool kept so its id stays its own."""
_SEEN_MAX = 4096


def injections(tool: BaseTool) -> Injections:
    """The injected parameters of `tool` (`Injections()` for a tool without any); cached."""
    seen = _SEEN.get(id(tool))
    if seen is not None and seen[0] is tool:
        return seen[1]
    if len(_SEEN) >= _SEEN_MAX:
        _SEEN.clear()
    found = _read(tool)
    _SEEN[id(tool)] = (tool, found)
    return found


def _read(tool: BaseTool) -> Injections:
    schema = tool.get_input_schema()
    fields = _fields(schema)
    notes = {**_hints(tool), **_annotations(schema)}
    state: dict[str, str | None] = {}
    optional: set[str] = set()
    store = runtime = None
    keys = set(fields) - set(_fields(tool.tool_call_schema))
    for name, note in notes.items():
        if (found := _found(note, InjectedState)) is not None:
            state[name] = found.field if isinstance(found, InjectedState) else None
            if name in fields and not fields[name].is_required():
                optional.add(name)
        elif _found(note, InjectedStore) is not None:
            store = name
        elif _found(note, ToolRuntime) is not None:
            runtime = name
        if _found(note, InjectedToolArg) is not None or _found(note, ToolRuntime) is not None:
            keys.add(name)
    filled = {*state, store, runtime}
    unfilled = tuple(
        name
        for name in sorted(keys)
        if name not in filled
        and name in fields
        and fields[name].is_required()
        and _found(notes.get(name), InjectedToolCallId) is None
    )
    return Injections(state, frozenset(optional), store, runtime, frozenset(keys), unfilled)


def spoofed(found: Injections, args: dict[str, Any]) -> list[str]:
    """The arguments of a call that name a parameter only keel fills (sorted)."""
    return sorted(k for k in args if k in found.keys)


def _found(note: Any, kind: type) -> Any:
    """The `kind` marker in an annotation, or None.

    In `Annotated` metadata, a union's member, a generic's origin, or the type itself.
    """
    if isinstance(note, kind) or (isinstance(note, type) and issubclass(note, kind)):
        return note
    origin = get_origin(note)
    if isinstance(origin, type) and issubclass(origin, kind):
        return note
    if origin is Annotated or origin is Union or origin is types.UnionType:
        for arg in get_args(note):
            if (found := _found(arg, kind)) is not None:
                return found
    return None


def _fields(schema: Any) -> dict[str, Any]:
    """A pydantic (v2) schema's fields by name; none for anything else (a JSON schema)."""
    return (
        dict(schema.model_fields)
        if isinstance(schema, type) and issubclass(schema, BaseModel)
        else {}
    )


def _annotations(schema: Any) -> dict[str, Any]:
    if not (isinstance(schema, type) and issubclass(schema, BaseModel)):
        return {}
    return dict(get_all_basemodel_annotations(schema))


def _hints(tool: BaseTool) -> dict[str, Any]:
    """The annotations of the tool's function (a `StructuredTool`'s), extras kept."""
    func = getattr(tool, "func", None) or getattr(tool, "coroutine", None)
    if func is None:
        return {}
    try:
        return get_type_hints(func, include_extras=True)
    except Exception:  # an unresolvable forward reference: the schema still has them
        return {}
