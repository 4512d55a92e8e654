"""ChromaStore against LangGraph's InMemoryStore: random operation sequences, same answers.

Both stores embed with the same deterministic function, so scores are compared too. Where
InMemoryStore's behaviour is an accident of its dicts (no-query order, empty namespaces still
listed, unscored pages that repeat) the comparison uses the documented contract instead; those
differences are pinned one by one in test_memory_quirks.py.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest
from langgraph.store.base import BaseStore, SearchItem
from langgraph.store.memory import InMemoryStore

from keel.memory import ChromaStore

WORDS = ["apple", "banana", "cherry", "delta", "echo", "fox", "golf", "hotel"]
NAMESPACES = [
    ("docs",),
    ("docs", "u1"),
    ("docs", "u1", "notes"),
    ("docs", "u10"),
    ("docs", "u1", "notes", "old"),
    ("mem", "acme", "u1"),
    ("mem", "acme-corp", "u1"),
]
FILTERS: list[dict[str, Any] | None] = [
    None,
    {"tag": "red"},
    {"tag": {"$eq": "blue"}},
    {"tag": {"$ne": "red"}},
    {"n": {"$gt": 3}},
    {"n": {"$gte": 2, "$lt": 6}},
    {"n": 4},
    {"flag": True},
    {"meta": {"lang": "en"}},
    {"tag": "red", "n": {"$lte": 4}},
]


def bag_of_words(texts: list[str]) -> list[list[float]]:
    """Cheap deterministic embeddings: word counts over a fixed vocabulary."""
    return [
        [float(t.split().count(w)) + 0.01 * (i + 1) for i, w in enumerate(WORDS)] for t in texts
    ]


def _index() -> dict[str, Any]:
    return {"dims": len(WORDS), "embed": bag_of_words, "fields": ["text"]}


def _value(rng: random.Random) -> dict[str, Any]:
    value: dict[str, Any] = {
        "text": " ".join(rng.choices(WORDS, k=rng.randint(1, 4))),
        "n": rng.randint(0, 7),
        "flag": rng.random() < 0.5,
        "tags": rng.sample(WORDS, k=rng.randint(0, 2)),
        "meta": {"lang": rng.choice(["en", "de"])},
    }
    if rng.random() < 0.8:
        value["tag"] = rng.choice(["red", "blue", "green"])
    return value


def _op(rng: random.Random, keys: list[str]) -> tuple[str, dict[str, Any]]:
    roll = rng.random()
    ns = rng.choice(NAMESPACES)
    if roll < 0.45:
        index = rng.choice([None, None, False, ["text"], ["tags[*]"]])
        return "put", {
            "namespace": ns,
            "key": rng.choice(keys),
            "value": _value(rng),
            "index": index,
        }
    if roll < 0.55:
        return "delete", {"namespace": ns, "key": rng.choice(keys)}
    if roll < 0.65:
        return "get", {"namespace": ns, "key": rng.choice(keys)}
    if roll < 0.92:
        prefix = ns[: rng.randint(1, len(ns))]
        query = " ".join(rng.choices(WORDS, k=2)) if rng.random() < 0.6 else None
        return "search", {
            "namespace_prefix": prefix,
            "query": query,
            "filter": rng.choice(FILTERS),
            "limit": rng.choice([1, 2, 3, 5, 10]),
            "offset": rng.choice([0, 0, 1, 2, 4]),
        }
    return "list_namespaces", {
        "prefix": rng.choice([None, ("docs",), ("docs", "u1"), ("mem", "*", "u1")]),
        "suffix": rng.choice([None, None, ("u1",), ("notes",)]),
        "max_depth": rng.choice([None, None, 1, 2, 3]),
        "limit": rng.choice([2, 5, 100]),
        "offset": rng.choice([0, 0, 1]),
    }


def _call(store: BaseStore, kind: str, args: dict[str, Any], prefix: str = "") -> Any:
    if kind == "search":
        rest = {k: v for k, v in args.items() if k != "namespace_prefix"}
        return getattr(store, prefix + kind)(args["namespace_prefix"], **rest)
    return getattr(store, prefix + kind)(**args)


def _full(store: BaseStore, args: dict[str, Any]) -> list[SearchItem]:
    return _call(store, "search", dict(args, limit=10_000, offset=0))


def _ident(item: SearchItem) -> tuple[tuple[str, ...], str]:
    return (item.namespace, item.key)


def _check_search(
    ref: InMemoryStore, mine: ChromaStore, args: dict[str, Any], got: list[SearchItem]
) -> None:
    expected_full = _full(ref, args)
    mine_full = _full(mine, args)
    lo, hi = args["offset"], args["offset"] + args["limit"]
    assert len(got) == len(expected_full[lo:hi])
    # The same items match (value by value), in both stores.
    assert {_ident(i): i.value for i in mine_full} == {_ident(i): i.value for i in expected_full}
    # Pages are slices of one order: no repeats, nothing skipped.
    assert [_ident(i) for i in got] == [_ident(i) for i in mine_full[lo:hi]]
    if args["query"] is None:
        assert all(i.score is None for i in got)
        return
    # Where both embed with the same function, the ranking and every score agree.
    ref_score = {_ident(i): i.score for i in expected_full}
    for mine_item, ref_item in zip(got, expected_full[lo:hi], strict=True):
        if ref_item.score is None:
            assert mine_item.score is None
        else:
            assert mine_item.score == pytest.approx(ref_item.score, abs=1e-4)
        expected = ref_score[_ident(mine_item)]
        assert (mine_item.score is None) == (expected is None)
        if expected is not None:
            assert mine_item.score == pytest.approx(expected, abs=1e-4)


def _check_namespaces(ref: InMemoryStore, args: dict[str, Any], got: list[tuple[str, ...]]) -> None:
    # InMemoryStore still lists namespaces whose items were all deleted; ChromaStore does not.
    # So ask a fresh InMemoryStore holding one item per namespace that still has items.
    live = InMemoryStore()
    for ns, items in ref._data.items():
        if items:
            live.put(ns, "x", {})
    assert got == live.list_namespaces(**args)


def _run(ref: InMemoryStore, mine: ChromaStore, kind: str, args: dict[str, Any], got: Any) -> None:
    expected = _call(ref, kind, args)
    if kind == "get":
        assert (got is None) == (expected is None)
        if got is not None:
            assert (got.namespace, got.key, got.value) == (
                expected.namespace,
                expected.key,
                expected.value,
            )
    elif kind == "search":
        _check_search(ref, mine, args, got)
    elif kind == "list_namespaces":
        _check_namespaces(ref, args, got)


@pytest.mark.parametrize(("seed", "depth"), [(1, 1), (2, 2), (3, 3), (4, 2), (5, 3)])
def test_same_answers_as_in_memory_store(tmp_path: Path, seed: int, depth: int) -> None:
    rng = random.Random(seed)
    ref = InMemoryStore(index=_index())  # type: ignore[arg-type]
    mine = ChromaStore(path=tmp_path, index=_index(), partition_depth=depth)  # type: ignore[arg-type]
    keys = ["k1", "k2", "k3", "k4", "k.5"]
    for _ in range(70):
        kind, args = _op(rng, keys)
        got = _call(mine, kind, args)
        _run(ref, mine, kind, args, got)


def test_same_answers_through_abatch(tmp_path: Path) -> None:
    rng = random.Random(11)
    ref = InMemoryStore(index=_index())  # type: ignore[arg-type]
    mine = ChromaStore(path=tmp_path, index=_index(), partition_depth=2)  # type: ignore[arg-type]

    async def drive() -> None:
        for _ in range(40):
            kind, args = _op(rng, ["k1", "k2", "k3"])
            got = await _call(mine, kind, args, prefix="a")
            _run(ref, mine, kind, args, got)

    asyncio.run(drive())


def test_a_reopened_store_answers_the_same(tmp_path: Path) -> None:
    rng = random.Random(21)
    ref = InMemoryStore(index=_index())  # type: ignore[arg-type]
    mine = ChromaStore(path=tmp_path, index=_index())  # type: ignore[arg-type]
    for _ in range(30):
        kind, args = _op(rng, ["k1", "k2", "k3"])
        if kind in ("put", "delete"):
            _call(mine, kind, args)
            _call(ref, kind, args)
    reopened = ChromaStore(path=tmp_path, index=_index())  # type: ignore[arg-type]
    for ns in NAMESPACES:
        args = {
            "namespace_prefix": ns,
            "query": "apple fox",
            "filter": None,
            "limit": 50,
            "offset": 0,
        }
        _check_search(ref, reopened, args, reopened.search(ns, query="apple fox", limit=50))
