"""One run at a time per thread, within a process: a second run waits for the first to end.

LangGraph does not stop two runs on one thread: both start from the same checkpoint, and the
one that saves last makes the thread's history, so the other run's messages (its question,
its tool results, its answer) vanish from the thread while its caller was told it succeeded
(`tests/test_attack_concurrent_runs.py` pins this). A user who sends twice before the first
answer, or a web app that runs each request as it comes, does that. keel's graphs take the
thread first: the second run starts when the first has ended (answered, stopped or paused for
a human), reads the state the first one left, and is checked against it.

A run that could only wait for itself is a `UserError` instead: one a node or tool starts on
its own run's thread (with a config of its own; with the one it got, it is part of that run),
or one started in the task or OS thread that is still reading that thread's stream.

The lock lives in this process. LangGraph's server orders runs on a thread itself
(`multitask_strategy`); several processes of your own that share a thread need their own
routing (one thread, one process).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import var_child_runnable_config

from keel._node import NS_SEP, inside_task, saver_in
from keel.errors import UserError

__all__ = ["OneRunPerThread"]

_HELD: dict[tuple[Any, ...], object] = {}
"""The threads with a run in this process, and who runs it (a task, or an OS thread)."""
_GUARD = threading.Lock()
_FIRST_WAIT, _MOST_WAIT = 0.002, 0.05
"""Seconds between looks at a busy thread: doubling from the first to the most."""


class OneRunPerThread:
    """A compiled graph's `stream` / `astream` (and so `invoke` / `ainvoke`), one per thread.

    A mixin for `CompiledStateGraph` subclasses: put it first, so the thread is taken before
    anything reads its state.
    """

    checkpointer: Any

    def stream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        key = _key(self.checkpointer, config)
        if key is None:
            return super().stream(input, config, **kwargs)  # type: ignore[misc]
        return self._one_stream(key, input, config, kwargs)

    def _one_stream(
        self, key: tuple[Any, ...], input: Any, config: RunnableConfig | None, kwargs: Any
    ) -> Iterator[Any]:
        with _taken(key):
            yield from super().stream(input, config, **kwargs)  # type: ignore[misc]

    async def astream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        key = _key(self.checkpointer, config)
        async with contextlib.AsyncExitStack() as stack:
            if key is not None:
                await stack.enter_async_context(_ataken(key))
            # closed with this stream (a client gone): what the run holds comes back now
            chunks = super().astream(input, config, **kwargs)  # type: ignore[misc]
            async for chunk in await stack.enter_async_context(contextlib.aclosing(chunks)):
                yield chunk


def _key(checkpointer: Any, config: RunnableConfig | None) -> tuple[Any, ...] | None:
    """Which thread a run writes, or `None` for a run that keeps no thread.

    A run inside another one (a subgraph, an agent a tool calls with its config) is part of
    the run that holds the thread. A run that a node or tool of a run on the same thread
    starts on its own would wait for the run that waits for it: that is a `UserError`.
    """
    if inside_task(config):
        return None
    conf = (config or {}).get("configurable") or {}
    key = _thread_of(checkpointer, conf, str(conf.get("checkpoint_ns") or ""))
    parent = _parent()  # a task's namespace is its graph's, then its own `node:task_id`
    if key is not None and key == _thread_of(None, parent, _graph_ns(parent)):
        raise UserError(
            f"A node or tool of a run on thread {key[1]!r} started another run on that thread "
            "(it would wait for the run that waits for it): give it its own thread_id, or "
            "pass it the config the node or tool got, so it runs as part of that run."
        )
    return key


def _thread_of(checkpointer: Any, conf: Mapping[str, Any], ns: str) -> tuple[Any, ...] | None:
    thread = conf.get("thread_id")
    saver = checkpointer if checkpointer not in (None, True, False) else None
    saver = saver if saver is not None else saver_in(conf)
    if thread is None or saver is None:
        return None
    return (id(saver), str(thread), ns)


def _graph_ns(task: Mapping[str, Any]) -> str:
    return str(task.get("checkpoint_ns") or "").rpartition(NS_SEP)[0]


def _parent() -> Mapping[str, Any]:
    """The configurable of the node or tool this code runs in, if any."""
    parent = var_child_runnable_config.get()
    return (parent or {}).get("configurable") or {} if inside_task(parent) else {}


def _owner() -> object:
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no running loop
        task = None
    return task if task is not None else threading.current_thread()


def _take(key: tuple[Any, ...], owner: object) -> bool:
    """Take the thread for `owner`; `False` while another run has it."""
    with _GUARD:
        held = _HELD.get(key)
        if held is None:
            _HELD[key] = owner
            return True
    if held is owner:  # waiting would never end: the run that has it can only go on here
        raise UserError(
            f"A run on thread {key[1]!r} is still going where this one starts (its stream is "
            "being read, or was left unfinished): finish or close that stream first, or give "
            "this run another thread_id."
        )
    return False


def _give_back(key: tuple[Any, ...], owner: object) -> None:
    with _GUARD:
        if _HELD.get(key) is owner:
            del _HELD[key]


def _waits() -> Iterator[float]:
    wait = _FIRST_WAIT
    while True:
        yield wait
        wait = min(wait * 2, _MOST_WAIT)


@contextlib.contextmanager
def _taken(key: tuple[Any, ...]) -> Iterator[None]:
    owner = _owner()
    for wait in _waits():
        if _take(key, owner):
            break
        time.sleep(wait)
    try:
        yield
    finally:
        _give_back(key, owner)


@contextlib.asynccontextmanager
async def _ataken(key: tuple[Any, ...]) -> AsyncIterator[None]:
    owner = _owner()
    for wait in _waits():
        if _take(key, owner):
            break
        await asyncio.sleep(wait)
    try:
        yield
    finally:
        _give_back(key, owner)
