"""Which checkpoints a saver has written or read, and a wait for one of them.

A side-effecting tool call waits until the checkpoint holding its request is saved
(`keel.nodes` `wait_saved`). Under `durability="async"` LangGraph saves that checkpoint on a
background thread while the tools step starts; polling the database for it costs a read (and a
sleep) per tool step. keel's savers note every checkpoint they save or load here instead, so the
wait ends the moment the background save returns, without a query.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Collection, Mapping
from typing import Any

from langchain_core.runnables import RunnableConfig

__all__ = ["Key", "SaveWatch", "checkpoint_key", "request_key"]

Key = tuple[str, str, str]
_KEEP = 4096
"""Checkpoint keys remembered per saver (the newest; a wait for an older one polls)."""


def checkpoint_key(config: RunnableConfig) -> Key | None:
    """`(thread_id, checkpoint_ns, checkpoint_id)` of a config naming one checkpoint."""
    conf = config.get("configurable") or {}
    checkpoint_id = conf.get("checkpoint_id")
    if not checkpoint_id:
        return None
    return str(conf.get("thread_id", "")), str(conf.get("checkpoint_ns") or ""), checkpoint_id


def request_key(config: RunnableConfig, message: Any) -> Key | None:
    """The key of a model message that requests tool calls: its id and the calls' digest.

    A saved checkpoint whose newest message is this request holds the request durably; the
    digest keeps a request edited in place under the same id (a human's edit) from counting.
    """
    calls = getattr(message, "tool_calls", None)
    message_id = getattr(message, "id", None)
    if not calls or not message_id:
        return None
    shape = [(c.get("id"), c.get("name"), c.get("args")) for c in calls]
    try:
        text = json.dumps(shape, sort_keys=True, default=repr)
    except (TypeError, ValueError):
        return None
    digest = hashlib.sha256(text.encode()).hexdigest()[:32]
    conf = config.get("configurable") or {}
    thread, ns = str(conf.get("thread_id", "")), str(conf.get("checkpoint_ns") or "")
    return thread, ns, f"request:{message_id}:{digest}"


def newest_message(values: Mapping[str, Any]) -> Any:
    """The newest message in a checkpoint's channel values (`None` without messages)."""
    messages = values.get("messages")
    return messages[-1] if isinstance(messages, list) and messages else None


class SaveWatch:
    """The checkpoints one saver object saved or loaded, newest last; thread-safe."""

    def __init__(self) -> None:
        self._seen: OrderedDict[Key, None] = OrderedDict()
        self._changed = threading.Condition()
        self._waiters: dict[Key, list[asyncio.Future[None]]] = {}

    def saved(self, key: Key | None) -> None:
        """Note that the checkpoint `key` is in the database; wake whoever waits for it."""
        if key is None:
            return
        with self._changed:
            self._seen[key] = None
            if len(self._seen) > _KEEP:
                self._seen.popitem(last=False)
            futures = self._waiters.pop(key, [])
            self._changed.notify_all()
        for future in futures:
            future.get_loop().call_soon_threadsafe(_settle, future)

    def wait(self, keys: Collection[Key], timeout: float) -> bool:
        """Whether one of `keys` is (or within `timeout` seconds becomes) known as saved."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._seen.keys().isdisjoint(keys), timeout)

    async def await_(self, keys: Collection[Key], within: float) -> bool:
        """`wait` under `ainvoke` (`within`: the timeout in seconds)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        with self._changed:
            if not self._seen.keys().isdisjoint(keys):  # one of `keys` is saved
                return True
            for key in keys:
                self._waiters.setdefault(key, []).append(future)
        try:
            async with asyncio.timeout(within):
                await future
            return True
        except TimeoutError:
            return False
        finally:
            with self._changed:
                for key in keys:
                    left = [f for f in self._waiters.get(key, []) if f is not future]
                    if left:
                        self._waiters[key] = left
                    else:
                        self._waiters.pop(key, None)


def _settle(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_result(None)
