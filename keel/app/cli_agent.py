"""`keel run --agent module:attr`: the user's own graph, with keel's persistence; thread origins.

`--agent` names a compiled graph, a `StateGraph`, or a function that returns either (called
with `checkpointer=` when it takes that argument, else with none). The graph runs on keel's
checkpointer (`--db`), so its threads are listed by `keel threads` and resumed by
`keel run --thread ID`. Each thread records what made it (`keel_agent`, `keel_model` in its
checkpoint metadata), so a resume rebuilds the same agent without being told again.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph import StateGraph
from langgraph.pregel import Pregel

from keel.errors import UserError

__all__ = ["load_agent", "thread_origin"]

_FORMAT = "--agent must read 'package.module:attribute' (e.g. 'myapp.agent:graph')"


def load_agent(ref: str, checkpointer: BaseCheckpointSaver[Any]) -> Pregel[Any, Any, Any, Any]:
    """The graph `ref` names, running on `checkpointer`.

    Raises:
        UserError: `ref` is malformed, its module or attribute is missing, or it is not a graph.
    """
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr or ":" in attr:
        raise UserError(f"{_FORMAT}, got {ref!r}.")
    value = getattr(_module(module_name, ref), attr, _MISSING)
    if value is _MISSING:
        raise UserError(
            f"--agent {ref!r}: module {module_name!r} has no attribute {attr!r}. Name the "
            "variable that holds your compiled graph, or a function that builds it."
        )
    if not isinstance(value, Pregel | StateGraph) and callable(value):
        value = _call_factory(value, ref, checkpointer)
    if isinstance(value, StateGraph):
        return value.compile(checkpointer=checkpointer)
    if isinstance(value, Pregel):
        return value.copy(update={"checkpointer": checkpointer})
    raise UserError(
        f"--agent {ref!r} is {type(value).__name__}, not a LangGraph graph: name a compiled "
        "graph (builder.compile()), a StateGraph, or a function that returns one."
    )


_MISSING = object()


def _module(name: str, ref: str) -> Any:
    # like `langgraph dev` and uvicorn: the user's own modules are found from where keel runs
    # (appended: a folder named like an installed package must not shadow it)
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(f"{exc.name}.")):
            raise UserError(
                f"--agent {ref!r}: there is no module {name!r} (from {cwd}). Run keel from the "
                "folder that holds it, or install its package."
            ) from exc
        raise UserError(f"--agent {ref!r}: importing {name!r} failed: {exc}.") from exc
    except Exception as exc:
        raise UserError(
            f"--agent {ref!r}: importing {name!r} raised {type(exc).__name__}: {exc}."
        ) from exc


def _call_factory(factory: Any, ref: str, checkpointer: BaseCheckpointSaver[Any]) -> Any:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    try:
        if "checkpointer" in params:
            return factory(checkpointer=checkpointer)
        return factory()
    except TypeError as exc:
        raise UserError(
            f"--agent {ref!r} is a function keel cannot call ({exc}): it must take no "
            "arguments, or only checkpointer=, and return a graph."
        ) from exc
    except Exception as exc:
        raise UserError(
            f"--agent {ref!r}: building the graph raised {type(exc).__name__}: {exc}."
        ) from exc


async def thread_origin(
    saver: BaseCheckpointSaver[Any], thread: str, *, must_exist: bool = True
) -> dict[str, str]:
    """What made `thread` (`keel_agent`, `keel_model`), from its latest checkpoint's metadata.

    A thread that is not there has none (a new task starts it) unless it `must_exist`.

    Raises:
        UserError: the database has no such thread, and it `must_exist` (a resume).
    """
    found = await saver.aget_tuple({"configurable": {"thread_id": thread}})
    if found is None and not must_exist:
        return {}
    if found is None:
        raise UserError(
            f"There is no thread {thread!r} in this database; `keel threads` lists the "
            "threads (pass the same --db the thread was made with)."
        )
    meta: dict[str, Any] = dict(found.metadata or {})
    return {k: str(meta[k]) for k in ("keel_agent", "keel_model") if meta.get(k)}
