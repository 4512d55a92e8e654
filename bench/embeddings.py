"""Offline embedding throughput: keel's `MiniLMEmbeddings` against the raw model it wraps.

Both embed the same synthetic documents (30-60 words each) with the same weights, interleaved
over rounds; the raw floor is sentence-transformers' `encode` returning a numpy array (no
conversion to Python lists, which LangChain's `Embeddings` interface requires). Also reports
single-query latency. The last line is machine-readable:

    keel_docs_per_s=… keel_vs_raw_encode=… query_p50_ms=…
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from keel.memory import MiniLMEmbeddings

WORDS = [
    "order",
    "refund",
    "teapot",
    "delivery",
    "damaged",
    "customer",
    "invoice",
    "policy",
    "support",
    "berlin",
    "tea",
    "coffee",
    "timezone",
    "account",
    "billing",
    "shipment",
    "return",
    "warehouse",
    "address",
    "payment",
    "card",
    "subscription",
]


def documents(n: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(30, 60))) for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=256, help="documents per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--queries", type=int, default=50)
    args = parser.parse_args()

    emb = MiniLMEmbeddings()
    raw = emb._model()  # the sentence-transformers model keel loaded (offline)
    docs = documents(args.docs)
    emb.embed_documents(docs[:8])  # warm up

    keel_s: list[float] = []
    raw_s: list[float] = []
    for _ in range(args.rounds):
        t = time.perf_counter()
        emb.embed_documents(docs)
        keel_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        raw.encode(docs, batch_size=64, normalize_embeddings=True, show_progress_bar=False)
        raw_s.append(time.perf_counter() - t)
    query_ms = []
    for q in documents(args.queries, seed=11):
        t = time.perf_counter()
        emb.embed_query(q[:80])
        query_ms.append((time.perf_counter() - t) * 1000)

    keel_rate = args.docs / statistics.median(keel_s)
    raw_rate = args.docs / statistics.median(raw_s)
    ratio = statistics.median(k / r for k, r in zip(keel_s, raw_s, strict=True))
    p50 = statistics.median(query_ms)
    print(f"keel MiniLMEmbeddings  {keel_rate:7.1f} docs/s")
    print(f"raw encode (numpy)     {raw_rate:7.1f} docs/s")
    print(f"query latency p50      {p50:7.2f} ms")
    print(f"keel_docs_per_s={keel_rate:.1f} keel_vs_raw_encode={ratio:.2f} query_p50_ms={p50:.2f}")


if __name__ == "__main__":
    main()
