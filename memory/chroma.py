"""`ChromaStore`: a LangGraph `BaseStore` on Chroma (embedded or server), with TTL and search."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeAlias, TypeVar

import numpy as np
from chromadb.api import ClientAPI
from chromadb.errors import NotFoundError
from langchain_core.embeddings import Embeddings
from langgraph.store.base import (
    BaseStore,
    GetOp,
    IndexConfig,
    Item,
    ListNamespacesOp,
    Op,
    PutOp,
    Result,
    SearchItem,
    SearchOp,
    TTLConfig,
    validate_op_namespace,
)

from keel._drive import Op as Step
from keel._drive import Steps, adrive, both, drive
from keel.errors import StorageError, UserError
from keel.memory import base as b
from keel.memory import maintenance
from keel.memory._open import (
    SERVER_TIMEOUT,
    Lifetime,
    check_recorded,
    check_timeout,
    check_ttl,
    client_of,
    index_of,
)

__all__ = ["ChromaStore"]

_T = TypeVar("_T")

Collection: TypeAlias = Any
"""A chromadb `Collection`; its annotations reject JSON-built `where` clauses, so untyped."""


def _embed_queries(emb: Embeddings, queries: list[str]) -> list[list[float]]:
    return [emb.embed_query(q) for q in queries]


async def _aembed_queries(emb: Embeddings, queries: list[str]) -> list[list[float]]:
    return list(await asyncio.gather(*(emb.aembed_query(q) for q in queries)))


class ChromaStore(BaseStore):
    """A LangGraph store on Chroma: key-value items, semantic search, filters and TTL.

    It plugs in wherever LangGraph takes a store: `graph.compile(store=...)`,
    `build_agent(store=...)`, `InjectedStore` tools, LangMem. `batch`/`abatch` carry the logic;
    `get`/`put`/`search`/`list_namespaces`/`delete` and their `a*` twins are LangGraph's.

    Layout: items are partitioned by the first `partition_depth` namespace labels, one pair of
    Chroma collections per partition. A search whose prefix is at least that deep reads one
    partition only (a user's 500 memories, not everyone's 50k); a shorter prefix looks the
    partitions up in a catalog collection first. keel's user namespaces are
    `("memories", tenant, user)`, hence the default depth 3.

    Behaves like LangGraph's `InMemoryStore`, except where that one is surprising (each pinned
    by a test): an update keeps `created_at`; a search without a query is ordered newest
    `updated_at` first (as `PostgresStore`); pages of unscored results do not repeat;
    `list_namespaces` leaves out namespaces whose items were all deleted or expired.

    !!! warning
        `delete` hides an item at once, but Chroma keeps its text in its write-ahead log until
        it compacts. To remove a user's text from disk use `purge(namespace_prefix)`, which
        drops the user's partition and (embedded client) vacuums the SQLite file.

    Args:
        path: Directory of an embedded `PersistentClient` (one process). `~` is expanded and
            the path resolved (`os.path.realpath`): every spelling of one folder shares one
            Chroma system.
        url: `http://host:port` of a Chroma server (`chroma run`), for several processes.
        client: A Chroma client you built (instead of `path`/`url`).
        index: Semantic search: `dims`, `embed` (LangChain `Embeddings`, a function, or a
            Chroma embedding function) and `fields` (default `["$"]`). Without it items are
            stored and listed but `query` is ignored, as in LangGraph's stores.
        ttl: `TTLConfig`: `default_ttl` (minutes), `refresh_on_read` (default True).
        name: Store name (a slug); several stores can share one Chroma database.
        partition_depth: How many namespace labels select a partition.
        embedding_model: The model name recorded on the store; derived from `embed` if omitted.
        clock: Seconds since the epoch, now (default `time.time`): what TTLs are measured by.
        timeout: Seconds a Chroma server (`url=`) has to answer each request (default 30);
            past it the operation raises `keel.StorageError` (chromadb's own client would wait
            for ever). A `client=` you built keeps its own settings.

    Example:
        ```python
        from keel.memory import ChromaStore

        store = ChromaStore(path=".keel/chroma")
        store.put(("memories", "acme", "u1"), "tz", {"text": "prefers CET"}, ttl=60 * 24)
        assert store.get(("memories", "acme", "u1"), "tz").value["text"] == "prefers CET"
        ```
    """

    supports_ttl = True

    def __init__(
        self,
        *,
        path: str | Path | None = None,
        url: str | None = None,
        client: ClientAPI | None = None,
        index: IndexConfig | None = None,
        ttl: TTLConfig | None = None,
        name: str = "keel",
        partition_depth: int = 3,
        embedding_model: str | None = None,
        clock: Callable[[], float] = time.time,
        timeout: float = SERVER_TIMEOUT,
    ) -> None:
        self.name = b.check_store_name(name)
        self.clock = clock
        if not isinstance(partition_depth, int) or partition_depth < 1:
            raise UserError(
                f"ChromaStore(partition_depth=...) must be 1 or more, got {partition_depth!r}."
            )
        self.depth = partition_depth
        self.ttl_config = check_ttl(ttl)
        self.index_config, self.embeddings, self.fields, model = index_of(index)
        self.model = embedding_model or model
        self._cols: dict[str, Collection] = {}
        self._known: set[str] = set()
        self._lock = threading.Lock()
        wait = check_timeout(timeout)
        self.client, self.path = client_of(path=path, url=url, client=client, timeout=wait)
        where = f"at {self.path}" if self.path is not None else f"on {url}" if url else "(client=)"
        self._life = Lifetime(
            self.client, owned=client is None, where=f"{name!r} {where}", timeout=wait
        )
        with self._life.using():
            try:
                self._catalog = self._open_catalog()
            except BaseException:  # a store that does not open holds nothing open
                self._life.close()
                raise

    def __repr__(self) -> str:
        where = f"path={self.path!r}" if self.path is not None else "client"
        closed = ", closed" if self.closed else ""
        return f"ChromaStore({where}, name={self.name!r}, model={self.model!r}{closed})"

    # Closing ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Release what the store holds open; it stays closed (a second call does nothing).

        An embedded store holds its folder's SQLite connections, index files and threads
        (about 20 file descriptors per path) until it is closed. Other stores and clients on
        the same path stay usable: the path's Chroma system stops when the last one closes,
        and (on Linux) `close()` then returns once no file under the folder is open. A
        store on a Chroma server (`url=`) gives back its HTTP client; a store on a `client=`
        you built leaves that client open (yours to close). Later calls raise
        `keel.StorageError`; an operation already running ends first, then the client closes.
        """
        self._life.close()
        self._forget_cols()

    async def aclose(self) -> None:
        """Async `close` (stopping an embedded Chroma joins its threads: done in a worker)."""
        await asyncio.to_thread(self.close)

    @property
    def closed(self) -> bool:
        """Whether `close()` or `aclose()` was called (the store then refuses operations)."""
        return self._life.closed

    def __enter__(self) -> ChromaStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Opening ----------------------------------------------------------------------------------

    def _open_catalog(self) -> Collection:
        meta: dict[str, Any] = {"keel:depth": self.depth}
        if self.model is not None and self.index_config is not None:
            meta |= {"keel:model": self.model, "keel:dims": int(self.index_config["dims"])}
        catalog = self.client.get_or_create_collection(
            f"keel-{self.name}-catalog", embedding_function=None, metadata=meta
        )
        found = dict(catalog.metadata or {})
        self._check_recorded(found)
        if "keel:model" not in found and "keel:model" in meta:
            catalog.modify(metadata=found | meta)
        return catalog

    def _check_recorded(self, found: dict[str, Any]) -> None:
        dims = int(self.index_config["dims"]) if self.index_config else None
        check_recorded(self.name, found, depth=self.depth, model=self.model, dims=dims)

    def _col(self, partition: Sequence[str], kind: str, *, create: bool) -> Collection | None:
        cname = b.collection_name(self.name, partition, kind)
        with self._lock:
            col = self._cols.get(cname)
        if col is not None:
            return col
        meta: dict[str, Any] = {"keel:ns": b.ns_json(partition)}
        if kind == "v" and self.model is not None and self.index_config is not None:
            meta |= {"keel:model": self.model, "keel:dims": int(self.index_config["dims"])}
        try:
            if create:
                col = self.client.get_or_create_collection(
                    cname,
                    embedding_function=None,
                    metadata=meta,
                    configuration={"hnsw": {"space": "cosine"}},
                )
            else:
                col = self.client.get_collection(cname, embedding_function=None)
        except NotFoundError:
            return None
        if kind == "v":
            self._check_recorded(dict(col.metadata or {}) | {"keel:depth": self.depth})
        with self._lock:
            self._cols[cname] = col
        return col

    def _forget_cols(self) -> None:
        with self._lock:
            self._cols.clear()
            self._known.clear()

    # LangGraph's interface --------------------------------------------------------------------

    def batch(self, ops: Iterable[Op]) -> list[Result]:
        """Run LangGraph store operations (reads see the state before the batch's writes)."""
        return drive(self._batch(ops))

    async def abatch(self, ops: Iterable[Op]) -> list[Result]:
        """Async `batch`: embeds with `aembed_*`, talks to Chroma in a worker thread."""
        return await adrive(self._batch(ops))

    def _batch(self, ops: Iterable[Op]) -> Steps[list[Result]]:
        """`batch` as `keel._drive` steps: embed the texts, then run the operations on Chroma."""
        self._life.refuse_closed()  # before embedding anything
        todo = self._check_ops(ops)
        docs, queries = self._texts(todo)
        emb = self.embeddings
        dvec = (yield both(emb.embed_documents, emb.aembed_documents, docs)) if docs and emb else []
        embedded = both(_embed_queries, _aembed_queries, emb, queries)
        qvec = (yield embedded) if emb else []
        qmap = dict(zip(queries, qvec, strict=True))
        run = partial(self._fresh, partial(self._run, todo, docs, dvec, qmap))
        return (yield Step(run, partial(asyncio.to_thread, run)))  # type: ignore[no-any-return]

    def _check_ops(self, ops: Iterable[Op]) -> list[Op]:
        todo = [b.check_types(op) for op in ops]
        for op in todo:
            validate_op_namespace(op)
            b.check_utf8(op)
            if isinstance(op, SearchOp):
                b.check_filter(op.filter)
                if op.limit < 0 or op.offset < 0:
                    raise UserError(
                        f"search(limit={op.limit}, offset={op.offset}): both must be 0 or more."
                    )
            elif isinstance(op, PutOp):
                b.check_put(op)
        return todo

    def _texts(self, ops: list[Op]) -> tuple[list[str], list[str]]:
        docs: list[str] = []
        queries: list[str] = []
        if self.embeddings is None:
            return docs, queries
        for put in b.last_puts(ops).values():
            docs.extend(self._op_texts(put))
        for op in ops:
            if isinstance(op, SearchOp) and op.query and op.query not in queries:
                queries.append(op.query)
        return docs, queries

    def _op_texts(self, op: PutOp) -> list[str]:
        if op.value is None or op.index is False or self.embeddings is None:
            return []
        return b.index_texts(op.value, self.fields if op.index is None else op.index)

    def _fresh(self, run: Callable[[], _T]) -> _T:
        """`run()`, once more with fresh collection handles when another client dropped one.

        A partition dropped elsewhere (another process's `purge`) is looked up anew; a catalog
        deleted under the store is made again and refilled from the partitions (without it
        every write, prefix search and `list_namespaces` failed with chromadb's `NotFoundError`
        until the process restarted). Writes are upserts, so running them again is safe.
        """
        with self._life.using():
            try:
                return run()
            except NotFoundError:
                self._reopen()
            try:
                return run()
            except NotFoundError as exc:  # deleted again at once: say so, not chromadb's words
                raise StorageError(
                    f"The Chroma store {self._life.where} lost a collection twice in one "
                    f"operation ({exc}): another client is deleting its collections",
                    fix="Stop whatever deletes the store's collections (a purge or reset "
                    "elsewhere), then try again.",
                ) from exc

    def _reopen(self) -> None:
        """Forget the cached collections; make the catalog again if it was deleted."""
        self._forget_cols()
        try:
            self._catalog = self.client.get_collection(
                f"keel-{self.name}-catalog", embedding_function=None
            )
        except NotFoundError:
            self._catalog = self._open_catalog()
            self._register(maintenance.stored_namespaces(self.client, self.name))

    def _run(
        self,
        ops: list[Op],
        docs: list[str],
        dvec: list[list[float]],
        qvec: dict[str, list[float]],
    ) -> list[Result]:
        self._check_dims([*dvec, *qvec.values()])
        now = self.clock()
        pending = b.Pending()
        results: list[Result] = []
        for op in ops:
            if isinstance(op, GetOp):
                results.append(self._get(op, now, pending))
            elif isinstance(op, SearchOp):
                vec = qvec.get(op.query) if op.query else None
                results.append(self._search(op, vec, now, pending))
            elif isinstance(op, ListNamespacesOp):
                results.append(self._list_namespaces(op, now))
            elif isinstance(op, PutOp):
                results.append(None)
            else:
                raise UserError(f"Unknown store operation {type(op).__name__}.")
        self._apply_pending(pending, now)
        self._put_all(b.last_puts(ops), dvec, now)
        return results

    def _check_dims(self, vectors: list[list[float]]) -> None:
        dims = int(self.index_config["dims"]) if self.index_config else 0
        for v in vectors:
            if len(v) != dims:
                raise UserError(
                    f"The embedding model {self.model!r} returned {len(v)}-dim vectors but the "
                    f"index config says dims={dims}. Set index={{'dims': {len(v)}, ...}}."
                )

    # Reads ------------------------------------------------------------------------------------

    def _get(self, op: GetOp, now: float, pending: b.Pending) -> Item | None:
        items = self._col(op.namespace[: self.depth], "i", create=False)
        if items is None:
            return None
        got = items.get(ids=[b.item_id(op.namespace, op.key)], include=["metadatas"])
        rows = [b.row_of(md) for md in got["metadatas"] or []]
        if not rows:
            return None
        row = rows[0]
        if not b.alive(row, now):
            pending.expired[row.iid] = row
            return None
        if op.refresh_ttl and row.ttl is not None:
            pending.refresh[row.iid] = row
        return row.item()

    def _partitions(self, prefix: tuple[str, ...]) -> list[tuple[str, ...]]:
        if len(prefix) >= self.depth:
            return [prefix[: self.depth]]
        clauses = [{f"p{i}": label} for i, label in enumerate(prefix)]
        got = self._catalog.get(where=b.and_where(clauses), include=["metadatas"])
        parts = {tuple(json.loads(md["ns"]))[: self.depth] for md in got["metadatas"] or []}
        return sorted(parts)

    def _search(
        self, op: SearchOp, vec: list[float] | None, now: float, pending: b.Pending
    ) -> list[SearchItem]:
        need = op.offset + op.limit
        if need == 0:
            return []
        hits: list[b.Hit] = []
        for part in self._partitions(op.namespace_prefix):
            hits.extend(self._search_partition(op, part, vec, need, now, pending))
        hits.sort(key=b.rank)
        page = hits[op.offset : need]
        for _, row in page:
            if op.refresh_ttl and row.ttl is not None:
                pending.refresh[row.iid] = row
        return [row.search_item(score) for score, row in page]

    def _search_partition(
        self,
        op: SearchOp,
        part: tuple[str, ...],
        vec: list[float] | None,
        need: int,
        now: float,
        pending: b.Pending,
    ) -> list[b.Hit]:
        ns_where = b.namespace_where(op.namespace_prefix, self.depth)
        where = [*ns_where, *b.pushdown(op.filter)]
        hits: list[b.Hit] = []
        if vec is not None:
            hits = self._scored(part, vec, ns_where, op, need, now, pending)
            if len(hits) >= need:
                return hits
            where = [*where, {"nv": 0}]  # fill with items that have no vectors, as LangGraph
        items = self._col(part, "i", create=False)
        if items is None:
            return hits
        got = items.get(where=b.and_where(where), include=["metadatas"])
        rows = self._visible(got["metadatas"] or [], op, now, pending)
        rows.sort(key=lambda r: (-r.updated, r.namespace, r.key))
        return hits + [(None, r) for r in rows[: need - len(hits)]]

    def _scored(
        self,
        part: tuple[str, ...],
        vec: list[float],
        where: list[dict[str, Any]],
        op: SearchOp,
        need: int,
        now: float,
        pending: b.Pending,
    ) -> list[b.Hit]:
        vectors = self._col(part, "v", create=False)
        if vectors is None:
            return []
        n = need if not op.filter else need * 4  # filters are checked on the hits
        while True:
            got = vectors.query(
                query_embeddings=[np.asarray(vec, dtype=np.float32)],
                n_results=n,
                where=b.and_where(where),
                include=["metadatas", "distances"],
            )
            mds, dists = (got["metadatas"] or [[]])[0], (got["distances"] or [[]])[0]
            best: dict[tuple[str, str], b.Hit] = {}  # (ns, record) is unique per item version
            for md, dist in zip(mds, dists, strict=True):
                ident = md["ns"], md["r"]  # an item's vectors share it; decode its best only
                if ident not in best:
                    rows = self._visible([md], op, now, pending)
                    if rows:
                        best[ident] = (1.0 - float(dist), rows[0])  # cosine distance -> score
            if len(best) >= need or len(mds) < n:
                return sorted(best.values(), key=b.rank)[:need]
            n *= 4

    def _visible(
        self, mds: Sequence[Any], op: SearchOp, now: float, pending: b.Pending
    ) -> list[b.Row]:
        out = []
        for md in mds:
            row = b.row_of(md)
            if not b.alive(row, now):
                pending.expired[row.iid] = row
            elif b.matches(row.value, op.filter):
                out.append(row)
        return out

    def _list_namespaces(self, op: ListNamespacesOp, now: float) -> list[tuple[str, ...]]:
        got = self._catalog.get(include=["metadatas"])
        found = {tuple(json.loads(md["ns"])) for md in got["metadatas"] or []}
        conditions = op.match_conditions or ()
        found = {ns for ns in found if all(b.does_match(c, ns) for c in conditions)}
        live = [ns for ns in found if self._has_live_items(ns, now)]
        if op.max_depth is not None:
            live = list({ns[: op.max_depth] for ns in live})
        return sorted(live)[op.offset : op.offset + op.limit]

    def _has_live_items(self, ns: tuple[str, ...], now: float) -> bool:
        items = self._col(ns[: self.depth], "i", create=False)
        if items is None:
            return False
        where = {"$and": [{"ns": b.ns_json(ns)}, {"exp": {"$gt": now}}]}
        return bool(items.get(where=where, limit=1, include=[])["ids"])

    # Writes -----------------------------------------------------------------------------------

    def _apply_pending(self, pending: b.Pending, now: float) -> None:
        for part, rows in b.by_partition(pending.expired.values(), self.depth).items():
            self._delete_rows(part, rows)
        for part, rows in b.by_partition(pending.refresh.values(), self.depth).items():
            self._refresh(part, rows, now)

    def _refresh(self, part: tuple[str, ...], rows: list[b.Row], now: float) -> None:
        ids: list[str] = []
        vids: list[str] = []
        mds: list[dict[str, float]] = []
        vmds: list[dict[str, float]] = []
        for row in rows:
            md = {"exp": now + (row.ttl or 0.0) * 60.0}
            ids.append(row.iid)
            mds.append(md)
            vids.extend(b.vector_id(row.iid, i) for i in range(row.nv))
            vmds.extend(md for _ in range(row.nv))
        items = self._col(part, "i", create=False)
        if items is not None:
            items.update(ids=ids, metadatas=mds)
        vectors = self._col(part, "v", create=False) if vids else None
        if vectors is not None:
            vectors.update(ids=vids, metadatas=vmds)

    def _delete_rows(self, part: tuple[str, ...], rows: list[b.Row], *, items: bool = True) -> None:
        icol = self._col(part, "i", create=False) if items and rows else None
        if icol is not None:
            icol.delete(ids=[r.iid for r in rows])
        vids = [b.vector_id(r.iid, i) for r in rows for i in range(r.nv)]
        vectors = self._col(part, "v", create=False) if vids else None
        if vectors is not None:
            vectors.delete(ids=vids)

    def _put_all(
        self, puts: dict[tuple[tuple[str, ...], str], PutOp], dvec: list[list[float]], now: float
    ) -> None:
        vectors = iter(dvec)
        grouped: dict[tuple[str, ...], list[tuple[PutOp, list[str], list[list[float]]]]] = {}
        for op in puts.values():
            texts = self._op_texts(op)
            vecs = [next(vectors) for _ in texts]
            grouped.setdefault(op.namespace[: self.depth], []).append((op, texts, vecs))
        self._register(op.namespace for op in puts.values() if op.value is not None)
        for part, entries in grouped.items():
            self._put_partition(part, entries, now)

    def _put_partition(
        self,
        part: tuple[str, ...],
        entries: list[tuple[PutOp, list[str], list[list[float]]]],
        now: float,
    ) -> None:
        items = self._col(part, "i", create=True)
        assert items is not None
        ids = [b.item_id(op.namespace, op.key) for op, _, _ in entries]
        old = {b.row_of(md).iid: b.row_of(md) for md in items.get(ids=ids)["metadatas"] or []}
        dead = {i for (op, _, _), i in zip(entries, ids, strict=True) if op.value is None}
        self._delete_rows(part, [old[i] for i in dead if i in old])
        updated = [old[i] for i in ids if i in old and i not in dead]
        self._delete_rows(part, updated, items=False)  # their old vectors
        rows: list[tuple[str, dict[str, Any]]] = []
        vrows: list[tuple[str, dict[str, Any], list[float]]] = []
        for (op, _, vecs), iid in zip(entries, ids, strict=True):
            if op.value is None:
                continue
            prev = old.get(iid)
            created = prev.created if prev is not None and b.alive(prev, now) else now
            exp = b.NEVER if op.ttl is None else now + op.ttl * 60.0
            md = b.item_metadata(
                op.namespace, op.key, op.value,
                created=created, updated=now, exp=exp, ttl=op.ttl, nv=len(vecs), depth=self.depth,
            )  # fmt: skip
            rows.append((iid, md))
            vmd = b.vector_metadata(md)
            vrows.extend((b.vector_id(iid, i), vmd, v) for i, v in enumerate(vecs))
        if rows:
            items.upsert(
                ids=[i for i, _ in rows],
                embeddings=[[1.0]] * len(rows),  # items are found by id/where, never by vector
                metadatas=[md for _, md in rows],
            )
        if vrows:
            vcol = self._col(part, "v", create=True)
            assert vcol is not None
            vcol.upsert(
                ids=[i for i, _, _ in vrows],
                embeddings=[v for _, _, v in vrows],
                metadatas=[md for _, md, _ in vrows],
            )

    def _register(self, namespaces: Iterable[tuple[str, ...]]) -> None:
        new = {b.ns_json(ns): ns for ns in namespaces if b.ns_json(ns) not in self._known}
        if not new:
            return
        mds = []
        for ns in new.values():
            md: dict[str, Any] = {"ns": b.ns_json(ns), "d": len(ns)}
            md |= {f"p{i}": label for i, label in enumerate(ns)}
            mds.append(md)
        self._catalog.upsert(ids=list(new), embeddings=[[1.0]] * len(new), metadatas=mds)
        with self._lock:
            self._known.update(new)

    # Maintenance ------------------------------------------------------------------------------

    def sweep_ttl(self) -> int:
        """Delete every expired item now; returns how many. Reads also sweep what they meet."""
        return self._fresh(partial(maintenance.sweep, self))

    async def asweep_ttl(self) -> int:
        """Async `sweep_ttl`."""
        return await asyncio.to_thread(self.sweep_ttl)

    def purge(self, namespace_prefix: tuple[str, ...]) -> int:
        """Delete every item under a namespace prefix and remove its text from disk.

        Whole partitions are dropped (their Chroma collections and log entries go with them),
        then an embedded store's SQLite file is vacuumed so no freed page keeps the text. On a
        Chroma server, run `chroma vacuum` on the server's data directory afterwards.

        Args:
            namespace_prefix: At least `partition_depth` labels deep for a user's partition,
                e.g. `("memories", tenant, user)`; shorter prefixes drop every partition below.

        Returns:
            The number of namespaces removed from the catalog.
        """
        return self._fresh(partial(maintenance.purge, self, namespace_prefix))

    async def apurge(self, namespace_prefix: tuple[str, ...]) -> int:
        """Async `purge`."""
        return await asyncio.to_thread(self.purge, namespace_prefix)

    def vacuum(self) -> None:
        """Compact an embedded store's SQLite file so deleted text leaves the disk."""
        with self._life.using():
            maintenance.vacuum(self.path)


# Helpers -------------------------------------------------------------------------------------
