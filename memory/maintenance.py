"""Keeping a `ChromaStore` clean: TTL sweeps, purging a user's memories, vacuuming the file."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeAlias

from chromadb.api import ClientAPI
from chromadb.errors import NotFoundError
from langgraph.store.base import GetOp, validate_op_namespace

from keel.errors import UserError
from keel.memory import base as b

__all__ = ["purge", "stored_namespaces", "sweep", "vacuum"]

Collection: TypeAlias = Any
"""A chromadb `Collection`, untyped as in `keel.memory.chroma` (JSON-built `where` clauses)."""


class ChromaStore(Protocol):
    """What maintenance needs of `keel.memory.ChromaStore` (which calls it, so no import)."""

    client: ClientAPI
    path: str | None
    name: str
    depth: int
    clock: Callable[[], float]
    _catalog: Collection

    def _partitions(self, prefix: tuple[str, ...]) -> list[tuple[str, ...]]: ...
    def _col(self, partition: Sequence[str], kind: str, *, create: bool) -> Collection | None: ...
    def _delete_rows(self, part: tuple[str, ...], rows: list[b.Row]) -> None: ...
    def _forget_cols(self) -> None: ...


def sweep(store: ChromaStore) -> int:
    """Delete every expired item of `store`; returns how many."""
    now = store.clock()
    swept = 0
    for part in store._partitions(()):
        items = store._col(part, "i", create=False)
        if items is None:
            continue
        got = items.get(where={"exp": {"$lte": now}}, include=["metadatas"])
        rows = [b.row_of(md) for md in got["metadatas"] or []]
        if rows:
            store._delete_rows(part, rows)
            swept += len(rows)
    return swept


def stored_namespaces(client: ClientAPI, name: str) -> set[tuple[str, ...]]:
    """Every namespace with an item record in store `name`'s partitions (to refill a catalog).

    A scan of each partition's item collection: used only when the catalog was deleted.
    """
    found: set[tuple[str, ...]] = set()
    ours = re.compile(rf"^keel-{re.escape(name)}-[0-9a-f]{{32}}-i$")  # not store `{name}-x`'s
    for col in client.list_collections():
        cname = col.name if hasattr(col, "name") else str(col)
        if not ours.match(cname):
            continue
        with contextlib.suppress(NotFoundError):  # dropped meanwhile: nothing to refill
            got = client.get_collection(cname, embedding_function=None).get(include=["metadatas"])
            found.update(tuple(json.loads(str(md["ns"]))) for md in got["metadatas"] or [])
    return found


def purge(store: ChromaStore, namespace_prefix: tuple[str, ...]) -> int:
    """Delete everything under `namespace_prefix` and vacuum (see `ChromaStore.purge`)."""
    prefix = tuple(namespace_prefix)
    if not prefix:
        raise UserError(
            "purge(namespace_prefix) needs a non-empty prefix, e.g. ('memories', 'acme', 'u1')."
        )
    validate_op_namespace(GetOp(prefix, ""))
    clauses = [{f"p{i}": label} for i, label in enumerate(prefix)]
    got = store._catalog.get(where=b.and_where(clauses), include=["metadatas"])
    namespaces = [tuple(json.loads(md["ns"])) for md in got["metadatas"] or []]
    if len(prefix) > store.depth:
        _purge_inside(store, prefix)
    else:
        names = [
            b.collection_name(store.name, part, kind)
            for part in {ns[: store.depth] for ns in namespaces} | {prefix}
            for kind in ("i", "v")
        ]
        segments = _segment_dirs(store.path, names)
        for name in names:
            with contextlib.suppress(NotFoundError, ValueError):
                store.client.delete_collection(name)
        for directory in segments:  # chromadb leaves a deleted collection's HNSW files behind
            shutil.rmtree(directory, ignore_errors=True)
    if got["ids"]:
        store._catalog.delete(ids=got["ids"])
    store._forget_cols()
    vacuum(store.path)
    return len(namespaces)


def _segment_dirs(path: str | None, collections: list[str]) -> list[Path]:
    """The on-disk segment directories (HNSW index files) of an embedded store's collections."""
    if path is None or not collections or not (Path(path) / "chroma.sqlite3").exists():
        return []
    marks = ",".join("?" * len(collections))
    con = sqlite3.connect(Path(path) / "chroma.sqlite3", timeout=30)
    try:
        rows = con.execute(
            "SELECT s.id FROM segments s JOIN collections c ON c.id = s.collection "
            f"WHERE c.name IN ({marks})",
            collections,
        ).fetchall()
    finally:
        con.close()
    return [
        Path(path) / str(segment) for (segment,) in rows if (Path(path) / str(segment)).is_dir()
    ]


def _purge_inside(store: ChromaStore, prefix: tuple[str, ...]) -> None:
    part = prefix[: store.depth]
    items = store._col(part, "i", create=False)
    if items is not None:
        where = b.and_where(b.namespace_where(prefix, store.depth))
        rows = [b.row_of(md) for md in items.get(where=where)["metadatas"] or []]
        store._delete_rows(part, rows)


def vacuum(path: str | None) -> None:
    """Rewrite an embedded Chroma's SQLite file so freed pages (deleted text) leave the disk.

    A no-op for a Chroma server (`path is None`): run `chroma vacuum` on its data directory.
    """
    if path is None:
        return
    db = Path(path) / "chroma.sqlite3"
    if db.exists():
        con = sqlite3.connect(db, isolation_level=None, timeout=30)
        try:
            con.execute("VACUUM")
        finally:
            con.close()
