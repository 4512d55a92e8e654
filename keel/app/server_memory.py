"""A served tenant's long-term memory on a Chroma server, opened on first use.

The server calls graph factories on its event loop, where `langgraph dev` refuses blocking
calls; opening a `ChromaStore` (an HTTP heartbeat, its catalog collection, the embedding model)
blocks. `ChromaServerStore` therefore opens it on the first store operation: in a worker thread
for `abatch`, directly for `batch` (which keel's sync tools call from a worker thread already).
A Chroma server that is down fails that operation (recall and reflect go on without memory,
warned); the next operation tries again. `close()` / `aclose()` (the server's shutdown, see
`keel.app.server.aclose_served`) give the client back; the store then refuses operations.
"""

from __future__ import annotations

import asyncio
import importlib
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from langgraph.store.base import BaseStore, IndexConfig, Op, Result

from keel.app.agent_options import MemorySpec
from keel.errors import StorageError, UserError

if TYPE_CHECKING:  # chromadb and torch load only when used
    from keel.memory.chroma import ChromaStore

__all__ = ["ChromaServerStore"]


class ChromaServerStore(BaseStore):
    """A `keel.memory.ChromaStore` on the Chroma server `spec.chroma_url`, opened lazily."""

    supports_ttl = True

    def __init__(self, spec: MemorySpec) -> None:
        if spec.chroma_url is None:
            raise UserError("ChromaServerStore needs a MemorySpec with chroma_url.")
        self.spec = spec
        self._store: ChromaStore | None = None
        self._closed = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ChromaServerStore(url={self.spec.chroma_url!r}, name={self.spec.collection!r})"

    def opened(self) -> BaseStore:
        """The `ChromaStore`, opened now if it is not yet (blocking: call off the event loop)."""
        with self._lock:
            if self._closed:
                raise StorageError(
                    f"The Chroma store {self.spec.collection!r} on {self.spec.chroma_url} was "
                    "closed (the server is shutting down) and does not reopen"
                )
            if self._store is None:
                from keel.memory import ChromaStore  # chromadb and torch load only when used

                self._store = ChromaStore(
                    url=self.spec.chroma_url, name=self.spec.collection, index=self._index()
                )
            return self._store

    def _index(self) -> IndexConfig:
        if self.spec.index is None:
            from keel.memory import default_index

            return default_index()
        module, _, attr = self.spec.index.partition(":")
        try:
            value: Any = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise UserError(f"memory index {self.spec.index!r} cannot be imported: {exc}.") from exc
        index = value() if callable(value) else value
        if not isinstance(index, dict) or "embed" not in index or "dims" not in index:
            raise UserError(
                f"memory index {self.spec.index!r} must be an IndexConfig "
                "({'dims': N, 'embed': ..., 'fields': [...]}) or a function returning one."
            )
        return index  # type: ignore[return-value]

    def close(self) -> None:
        """Close the `ChromaStore` if it was opened; later operations raise `StorageError`."""
        with self._lock:
            self._closed = True
            store = self._store
        if store is not None:
            store.close()

    async def aclose(self) -> None:
        """Async `close`."""
        await asyncio.to_thread(self.close)

    def batch(self, ops: Iterable[Op]) -> list[Result]:
        """Run `ops` on the Chroma server (opening the store first if needed)."""
        return self.opened().batch(ops)

    async def abatch(self, ops: Iterable[Op]) -> list[Result]:
        """Async `batch`; the store is opened in a worker thread."""
        store = self._store if self._store is not None else await asyncio.to_thread(self.opened)
        return await store.abatch(ops)
