"""Working memory: a thread's key-value scratch space, each key with its own TTL.

Nodes and tools of one thread share it through the graph's store:

```python
wm = WorkingMemory.current()          # inside a node or tool
wm.set("draft", {"subject": "…"}, ttl=30)
```
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from langgraph.config import get_config, get_store
from langgraph.store.base import BaseStore

from keel.errors import UserError
from keel.memory.scope import label

__all__ = ["WorkingMemory"]


class WorkingMemory:
    """Per-thread scratch space on a LangGraph store; keys expire after their TTL (minutes).

    Expiry is checked on every read, so it holds on any store; stores with TTL support
    (`ChromaStore`) also delete expired keys.

    Args:
        store: The graph's store.
        thread_id: The thread the scratch space belongs to.
        default_ttl: Minutes a key lives when `set` gets no `ttl`; `None` keeps it.
        clock: Seconds since the epoch, now (default `time.time`): what TTLs are measured by.
    """

    def __init__(
        self,
        store: BaseStore,
        thread_id: str,
        *,
        default_ttl: float | None = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(thread_id, str) or not thread_id:
            raise UserError(f"WorkingMemory needs a thread_id, got {thread_id!r}.")
        if default_ttl is not None and not default_ttl > 0:
            raise UserError(
                f"WorkingMemory(default_ttl=...) must be minutes > 0 or None, got {default_ttl!r}."
            )
        self.store = store
        self.namespace = ("working", label(thread_id))
        self.default_ttl = default_ttl
        self.clock = clock

    @classmethod
    def current(cls, *, default_ttl: float | None = 60.0) -> WorkingMemory:
        """The running thread's working memory (call inside a node or a tool)."""
        thread_id = get_config().get("configurable", {}).get("thread_id")
        if not thread_id:
            raise UserError(
                "Working memory belongs to a thread: invoke the graph with "
                "config={'configurable': {'thread_id': ...}}."
            )
        return cls(get_store(), str(thread_id), default_ttl=default_ttl)

    def _value(self, value: Any, ttl: float | None) -> tuple[dict[str, Any], float | None]:
        ttl = self.default_ttl if ttl is None else ttl
        if ttl is not None and not ttl > 0:
            raise UserError(f"WorkingMemory.set(ttl=...) must be minutes > 0, got {ttl!r}.")
        expires = None if ttl is None else self.clock() + ttl * 60.0
        return {"value": value, "expires_at": expires}, ttl

    def _ttl_arg(self, ttl: float | None) -> dict[str, Any]:
        return {"ttl": ttl} if self.store.supports_ttl else {}

    def _read(self, raw: Any, default: Any) -> Any:
        if raw is None:
            return default
        expires = raw.value.get("expires_at")
        return default if expires is not None and expires <= self.clock() else raw.value["value"]

    def get(self, key: str, default: Any = None) -> Any:
        """The value of `key`, or `default` when missing or expired."""
        return self._read(self.store.get(self.namespace, key, refresh_ttl=False), default)

    def set(self, key: str, value: Any, *, ttl: float | None = None) -> None:
        """Set `key` (JSON-able `value`) for `ttl` minutes (default: `default_ttl`)."""
        stored, minutes = self._value(value, ttl)
        self.store.put(self.namespace, key, stored, index=False, **self._ttl_arg(minutes))

    def delete(self, key: str) -> None:
        """Remove `key`."""
        self.store.delete(self.namespace, key)

    def items(self) -> dict[str, Any]:
        """Every live key and value."""
        found = self.store.search(self.namespace, limit=1000, refresh_ttl=False)
        missing = object()
        out = {i.key: self._read(i, missing) for i in found}
        return {k: v for k, v in out.items() if v is not missing}

    async def aget(self, key: str, default: Any = None) -> Any:
        """Async `get`."""
        return self._read(await self.store.aget(self.namespace, key, refresh_ttl=False), default)

    async def aset(self, key: str, value: Any, *, ttl: float | None = None) -> None:
        """Async `set`."""
        stored, minutes = self._value(value, ttl)
        await self.store.aput(self.namespace, key, stored, index=False, **self._ttl_arg(minutes))

    async def adelete(self, key: str) -> None:
        """Async `delete`."""
        await self.store.adelete(self.namespace, key)
