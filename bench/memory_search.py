"""Per-user memory search: keel's ChromaStore against the one-collection peer and the floors.

At N = 10k and 50k memories (100 users, 1 % each, fixed random 384-d vectors, seed 42) it
measures top-5 search for one user, interleaved in blocks:

- keel:   `ChromaStore.search(("memories", "acme", user), query=..., limit=5)`
- peer:   one Chroma collection holding everyone, `where={"user_id": user}`
- floor:  an unfiltered query on a Chroma collection holding only that user's items
- numpy:  exact cosine over that user's rows (pre-indexed)

Queries are pre-embedded (the embedding model is not what is measured). Last line:
`keel_vs_chroma_floor=… peer_vs_keel=…` at 50k (goal: ≤ 1.5 and ≥ 10).

Run (from outside the repo root):
`cd /tmp && /work/main/.venv/bin/python /work/main/bench/memory_search.py [--sizes 10000 50000]`
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import chromadb
import numpy as np
from chromadb.config import Settings
from langgraph.store.base import PutOp

from keel.memory import ChromaStore

DIMS = 384
USERS = 100
QUERIES = 300
MEASURED_USERS = 5


def _vectors(n: int) -> np.ndarray:
    rng = np.random.default_rng(42)
    return rng.standard_normal((n, DIMS)).astype(np.float32)


def _queries() -> np.ndarray:
    return np.random.default_rng(7).standard_normal((QUERIES, DIMS)).astype(np.float32)


def _lookup(docs: np.ndarray, queries: np.ndarray) -> Callable[[list[str]], list[list[float]]]:
    def embed(texts: list[str]) -> list[list[float]]:
        out = []
        for t in texts:
            kind, i = t.split()
            out.append((docs if kind == "doc" else queries)[int(i)].tolist())
        return out

    return embed


def _keel(root: Path, docs: np.ndarray, queries: np.ndarray) -> tuple[ChromaStore, float]:
    index: Any = {"dims": DIMS, "embed": _lookup(docs, queries), "fields": ["text"]}
    store = ChromaStore(path=root / "keel", index=index)
    t = time.perf_counter()
    ops = [
        PutOp(("memories", "acme", f"u{i % USERS}"), f"m{i}", {"text": f"doc {i}"})
        for i in range(len(docs))
    ]
    for start in range(0, len(ops), 10_000):
        store.batch(ops[start : start + 10_000])
    return store, time.perf_counter() - t


def _client(root: Path) -> Any:
    return chromadb.PersistentClient(path=str(root), settings=Settings(anonymized_telemetry=False))


def _peer(root: Path, docs: np.ndarray) -> tuple[Any, float]:
    col = _client(root / "peer").create_collection(
        "everyone", embedding_function=None, configuration={"hnsw": {"space": "cosine"}}
    )
    t = time.perf_counter()
    for start in range(0, len(docs), 5000):
        idx = range(start, min(start + 5000, len(docs)))
        col.add(
            ids=[f"m{i}" for i in idx],
            embeddings=docs[start : idx.stop],
            metadatas=[{"user_id": f"u{i % USERS}", "text": f"doc {i}"} for i in idx],
        )
    return col, time.perf_counter() - t


def _floors(root: Path, docs: np.ndarray, users: list[int]) -> dict[int, Any]:
    client = _client(root / "floor")
    cols = {}
    for u in users:
        rows = list(range(u, len(docs), USERS))
        col = client.create_collection(
            f"user-{u}", embedding_function=None, configuration={"hnsw": {"space": "cosine"}}
        )
        col.add(
            ids=[f"m{i}" for i in rows],
            embeddings=docs[rows],
            metadatas=[{"user_id": f"u{u}", "text": f"doc {i}"} for i in rows],
        )
        cols[u] = col
    return cols


def _time(fn: Callable[[int], object], n: int) -> list[float]:
    out = []
    for j in range(n):
        t = time.perf_counter()
        fn(j)
        out.append((time.perf_counter() - t) * 1000)
    return out


def run(n: int) -> dict[str, float]:
    docs, queries = _vectors(n), _queries()
    users = list(range(MEASURED_USERS))
    with tempfile.TemporaryDirectory(prefix="keel-bench-mem-") as tmp:
        root = Path(tmp)
        store, keel_add = _keel(root, docs, queries)
        peer, peer_add = _peer(root, docs)
        floors = _floors(root, docs, users)
        unit = docs / np.linalg.norm(docs, axis=1, keepdims=True)
        rows = {u: np.arange(u, n, USERS) for u in users}
        inc: Any = ["metadatas", "distances"]

        def user(j: int) -> int:
            return users[j % len(users)]

        engines: dict[str, Callable[[int], object]] = {
            "keel": lambda j: store.search(
                ("memories", "acme", f"u{user(j)}"), query=f"q {j}", limit=5
            ),
            "peer": lambda j: peer.query(
                query_embeddings=[queries[j]],
                n_results=5,
                where={"user_id": f"u{user(j)}"},
                include=inc,
            ),
            "floor": lambda j: floors[user(j)].query(
                query_embeddings=[queries[j]], n_results=5, include=inc
            ),
            "numpy": lambda j: np.argpartition(
                -(unit[rows[user(j)]] @ (queries[j] / np.linalg.norm(queries[j]))), 5
            )[:5],
        }
        for fn in engines.values():  # warm up
            _time(fn, 20)
        samples: dict[str, list[float]] = {k: [] for k in engines}
        for _block in range(3):
            for name, fn in engines.items():
                samples[name] += _time(fn, QUERIES // 3)
        p50 = {k: statistics.median(v) for k, v in samples.items()}
        p95 = {k: float(np.percentile(v, 95)) for k, v in samples.items()}
        for k in engines:
            print(f"N={n:>6} {k:<6} p50={p50[k]:7.3f} ms  p95={p95[k]:7.3f} ms")
        print(f"N={n:>6} add: keel {n / keel_add:,.0f} items/s, peer {n / peer_add:,.0f} docs/s")
        print(
            f"N={n:>6} keel/floor={p50['keel'] / p50['floor']:.2f} "
            f"peer/keel={p50['peer'] / p50['keel']:.1f} keel/numpy={p50['keel'] / p50['numpy']:.1f}"
        )
        return p50


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000])
    args = parser.parse_args()
    last: dict[str, float] = {}
    for n in args.sizes:
        last = run(n)
    print(
        f"keel_vs_chroma_floor={last['keel'] / last['floor']:.2f} "
        f"peer_vs_keel={last['peer'] / last['keel']:.1f}"
    )


if __name__ == "__main__":
    main()
