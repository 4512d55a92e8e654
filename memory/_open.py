"""Opening and closing a `ChromaStore`: its Chroma client, index and TTL configs, models."""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import chromadb
import httpx
from chromadb.api import ClientAPI
from chromadb.api.client import Client
from chromadb.api.shared_system_client import SharedSystemClient
from chromadb.config import Settings
from chromadb.errors import ChromaError
from langchain_core.embeddings import Embeddings
from langgraph.store.base import IndexConfig, TTLConfig, ensure_embeddings

from keel.errors import SetupError, StorageError, UserError
from keel.memory.base import MAX_TTL, is_minutes
from keel.memory.embeddings import ChromaEmbeddings, is_chroma_function, model_name_of
from keel.redact import sanitized_logger

__all__ = [
    "SERVER_TIMEOUT",
    "Lifetime",
    "check_recorded",
    "check_ttl",
    "check_timeout",
    "client_of",
    "index_of",
]

SERVER_TIMEOUT = 30.0
"""Seconds a Chroma server has to answer one request of a `ChromaStore(url=...)` (default)."""

log = sanitized_logger("keel.memory")


class Lifetime:
    """A store's hold on its Chroma client: the operations in flight, and closing it once.

    `close()` marks the store closed at once (later operations raise `StorageError`); the
    client keel opened is closed then, or when the last operation in flight (a cancelled
    `abatch`'s worker thread, say) ends, so none fails half-way. A client the caller built
    (`client=`) is the caller's to close. chromadb (>= 1.5.2) counts the clients of each
    embedded path: closing one stops the path's Chroma system (its SQLite connections, index
    files and threads) only when no other client on that path is open.
    """

    def __init__(
        self, client: ClientAPI, *, owned: bool, where: str, timeout: float = SERVER_TIMEOUT
    ) -> None:
        self.client = client
        self._timeout = timeout
        self._owned = owned
        self._where = where
        self._lock = threading.Lock()
        self._busy = 0
        self._closed = False
        self._released = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def where(self) -> str:
        """The store's name and where it is, for messages."""
        return self._where

    def refuse_closed(self) -> None:
        """Raise `StorageError` if the store was closed."""
        if self._closed:
            raise StorageError(
                f"The Chroma store {self._where} was closed (ChromaStore.close() / aclose()) and "
                "does not reopen",
                fix="Close a store only after the runs that use it have ended, or open a new "
                "ChromaStore for later work.",
            )

    @contextmanager
    def using(self) -> Iterator[ClientAPI]:
        """The client, for one operation; refused once the store is closed.

        A Chroma server that does not answer in time, or cannot be reached, is a
        `StorageError` that says so (chromadb lets httpx's own exceptions through).
        """
        with self._lock:
            self.refuse_closed()
            self._busy += 1
        try:
            yield self.client
        except httpx.TimeoutException as exc:
            raise StorageError(
                f"The Chroma server of store {self._where} did not answer within "
                f"{self._timeout:g} s ({type(exc).__name__})",
                fix="Check that the server is up and not overloaded; ChromaStore(timeout=...) "
                "waits longer for each request.",
            ) from exc
        except httpx.TransportError as exc:
            raise StorageError(
                f"Cannot reach the Chroma server of store {self._where} "
                f"({type(exc).__name__}: {exc})",
                fix="Start the server again (chroma run ...); the store reconnects by itself.",
            ) from exc
        finally:
            with self._lock:
                self._busy -= 1
            self._release_if_done()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._release_if_done()

    def _release_if_done(self) -> None:
        with self._lock:
            if not self._closed or self._busy or self._released:
                return
            self._released = True
        if self._owned:
            close_client(self.client)


def close_client(client: ClientAPI) -> None:
    """Give back a client keel opened: chromadb's `Client.close` (reference-counted by path).

    Closing the last client on an embedded path returns once the process holds its SQLite file
    no more: chromadb (1.5) closes those connections on their own threads (sqlx's workers), a
    few milliseconds after its `close()` returned (`_sqlite_closed` waits for them).

    An HTTP client needs more (chromadb 1.5): its `close()` neither closes its two HTTP
    sessions (their sockets stay open) nor forgets the alias its admin client registers its
    System under (a fresh id per client, kept in chromadb's class-level cache for good, with
    that session): both are done here. Both pinned by `tests/test_memory_close.py`.
    """
    if not isinstance(client, Client):
        return
    admin = getattr(client, "_admin_client", None)
    sessions = [getattr(getattr(c, "_server", None), "_session", None) for c in (client, admin)]
    system = SharedSystemClient._identifier_to_system.get(client._identifier)
    client.close()
    for session in sessions:  # an HTTP client's (`httpx.Client`); an embedded one has none
        if session is not None:
            session.close()
    if system is None:
        return
    if sessions[0] is None:  # embedded: its folder is its identifier
        if client._identifier not in SharedSystemClient._identifier_to_system:
            _sqlite_closed(client._identifier)  # this close stopped the path's system
        return
    cached, counted = (
        SharedSystemClient._identifier_to_system,
        SharedSystemClient._identifier_to_refcount,
    )
    for key, held in list(cached.items()):  # the admin client's alias of this client's System
        if held is system and key not in counted:
            cached.pop(key, None)


_FDS = Path("/proc/self/fd")
"""This process's open file descriptors (Linux)."""


def _sqlite_closed(folder: str, *, within: float = 2.0) -> None:
    """Wait (up to `within` seconds) until no descriptor is open on the Chroma's SQLite files.

    Those of the Chroma at `folder` (`chroma.sqlite3`, its journal, WAL): its connections'
    worker threads close them after chromadb's `close()` returned. Where the descriptors cannot
    be listed (not Linux) it returns at once; it stops waiting if the path is opened again.
    """
    if not _FDS.is_dir():
        return
    database = os.path.join(folder, "chroma.sqlite3")
    deadline, pause = time.monotonic() + within, 0.001
    while any(target.startswith(database) for target in _fd_targets()):
        if folder in SharedSystemClient._identifier_to_system:
            return
        if time.monotonic() > deadline:
            log.warning(
                "Chroma at %s closed, but its SQLite file is still open after %gs", folder, within
            )
            return
        time.sleep(pause)
        pause = min(2 * pause, 0.05)


def _fd_targets() -> Iterator[str]:
    for fd in os.listdir(_FDS):
        try:
            yield os.readlink(_FDS / fd)
        except OSError:  # closed since it was listed
            continue


def check_recorded(
    name: str, found: dict[str, Any], *, depth: int, model: str | None, dims: int | None
) -> None:
    """Fail when a store is opened with another layout or embedding model than it was built with."""
    if found.get("keel:depth", depth) != depth:
        raise UserError(
            f"Chroma store {name!r} was created with partition_depth="
            f"{found['keel:depth']}; open it with the same partition_depth."
        )
    recorded = found.get("keel:model")
    if recorded is None:
        return
    was = found.get("keel:dims")
    if model is None or dims is None:
        raise UserError(
            f"Chroma store {name!r} holds embeddings of {recorded!r} ({was} dims); "
            f"open it with index={{'dims': {was}, 'embed': <that model>}} so new items "
            "are embedded the same way."
        )
    if (model, dims) != (recorded, was):
        raise UserError(
            f"Chroma store {name!r} was built with embedding model {recorded!r} "
            f"({was} dims), but this ChromaStore embeds with {model!r} ({dims} dims). "
            "Vectors of different models cannot be compared: open it with the same model, "
            "or use another store name and re-index."
        )


def check_timeout(timeout: object) -> float:
    """`ChromaStore(timeout=...)`: seconds, a finite number above 0."""
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise UserError(
            f"ChromaStore(timeout=...) must be a number of seconds above 0, got {timeout!r}."
        )
    return float(timeout)


def client_of(
    *,
    path: str | Path | None,
    url: str | None,
    client: ClientAPI | None,
    timeout: float = SERVER_TIMEOUT,
) -> tuple[ClientAPI, str | None]:
    """The Chroma client of a store, and its folder (embedded) or None.

    A server's client waits at most `timeout` seconds for each request: chromadb's own waits
    without end (its httpx sessions have no timeout, pinned by `tests/test_memory_server.py`),
    so a server that hangs (overloaded, stopped, a network that drops packets) would hold
    every run that recalls a memory for good.
    """
    given = [n for n, v in (("path", path), ("url", url), ("client", client)) if v is not None]
    if len(given) != 1:
        raise UserError(
            "ChromaStore needs exactly one of path= (embedded, one process), url= (a Chroma "
            f"server, e.g. url='http://127.0.0.1:8000'), or client=; got {given or 'none'}."
        )
    settings = Settings(anonymized_telemetry=False)
    if client is not None:
        return client, None
    if path is not None:
        # chromadb keys its shared System by the path string: every spelling of one folder
        # (relative, `m/`, `./m`, a symlink) must give the same key, or two engines write it;
        # `~/mem` is the home folder's, as a shell reads it (realpath would make a folder `~`)
        folder = os.path.realpath(os.path.expanduser(path))
        return _persistent_client(folder, settings), folder
    parts = urlsplit(str(url))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"ChromaStore(url={url!r}) must look like 'http://127.0.0.1:8000'.")
    port = parts.port or (443 if parts.scheme == "https" else 8000)
    base = f"{parts.scheme}://{parts.hostname}:{port}"
    try:
        # bounded first: building chromadb's client asks the server already, without end
        httpx.get(f"{base}/api/v2/heartbeat", timeout=timeout).raise_for_status()
        http = chromadb.HttpClient(
            host=parts.hostname, port=port, ssl=parts.scheme == "https", settings=settings
        )
        bound(http, timeout)
        http.heartbeat()
    except httpx.TimeoutException as exc:
        raise SetupError(
            f"The Chroma server at {url} did not answer within {timeout:g} s "
            f"({type(exc).__name__}). Check that it is up and not overloaded, or give it "
            "longer: ChromaStore(timeout=...)."
        ) from exc
    except Exception as exc:
        raise SetupError(
            f"Cannot reach a Chroma server at {url} ({type(exc).__name__}: {exc}). Start one "
            f"with `chroma run --path <dir> --host {parts.hostname} --port {port}`, or use "
            "ChromaStore(path=...) for an embedded store."
        ) from exc
    return http, None


def bound(client: ClientAPI, timeout: float) -> None:
    """Make each request of an HTTP client (and of its admin client) wait `timeout` s at most."""
    admin = getattr(client, "_admin_client", None)
    for each in (client, admin):
        session = getattr(getattr(each, "_server", None), "_session", None)
        if isinstance(session, httpx.Client):
            session.timeout = httpx.Timeout(timeout, connect=min(timeout, 5.0))


def _persistent_client(path: str, settings: Settings) -> ClientAPI:
    """An embedded client on `path`; a folder Chroma cannot open is a `SetupError` that says so.

    chromadb caches a client's system by path before starting it, so one that failed to start
    would stay cached and break every later open of that path in the process (`'RustBindingsAPI'
    object has no attribute 'bindings'`, even once the folder is fixed): it is dropped.
    """
    cached = SharedSystemClient._identifier_to_system
    known = path in cached
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        return chromadb.PersistentClient(path=path, settings=settings)
    except (OSError, ChromaError) as exc:
        if not known:
            cached.pop(path, None)
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise SetupError(
            f"Cannot open the Chroma store at {path} ({reason}): it must be a folder keel can "
            "write, empty or holding a Chroma database. Check the folder and its permissions, "
            "or give another one."
        ) from exc


def check_ttl(ttl: TTLConfig | None) -> TTLConfig | None:
    if ttl is None:
        return None
    default = ttl.get("default_ttl")
    if default is not None and not is_minutes(default):
        raise UserError(
            f"ChromaStore(ttl={{'default_ttl': {default!r}}}) must be minutes > 0 (at most "
            f"{MAX_TTL:g}), or None for no expiry."
        )
    return dict(ttl)  # type: ignore[return-value]


def index_of(
    index: IndexConfig | None,
) -> tuple[IndexConfig | None, Embeddings | None, list[str], str | None]:
    if index is None:
        return None, None, [], None
    dims = index.get("dims")
    if not isinstance(dims, int) or dims < 1 or "embed" not in index:
        raise UserError(
            "ChromaStore(index=...) needs 'dims' (a positive int) and 'embed', e.g. "
            "keel.memory.default_index() or {'dims': 384, 'embed': MiniLMEmbeddings()}."
        )
    embed: Any = index["embed"]
    if is_chroma_function(embed):
        embed = ChromaEmbeddings(embed)
    fields = list(index.get("fields") or ["$"])
    config: IndexConfig = {"dims": dims, "embed": embed, "fields": fields}
    return config, ensure_embeddings(embed), fields, model_name_of(embed)
