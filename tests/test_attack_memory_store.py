"""ChromaStore under a careless caller and a hostile neighbour, on a real embedded Chroma.

The README's memory section promises that a value and `index` of the wrong shape are a
`UserError` before anything is written, and that one user's search never reaches another's.
These tests push further: a namespace written without its comma, arguments of the wrong type,
a TTL that is infinite, a catalog deleted by another client on the same folder, and writers
at once from threads and from two handles.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import chromadb
import pytest
from chromadb.config import Settings
from conftest import Clock
from langgraph.store.base import GetOp, PutOp, SearchOp

from keel import RunContext
from keel.errors import UserError
from keel.memory import ChromaStore, user_namespace


def letters(texts: list[str]) -> list[list[float]]:
    """Deterministic 4-dim embeddings: counts of a, e, o and length."""
    return [
        [t.count("a") + 0.1, t.count("e") + 0.1, t.count("o") + 0.1, len(t) / 10] for t in texts
    ]


INDEX: Any = {"dims": 4, "embed": letters, "fields": ["text"]}
ALICE = user_namespace(RunContext(user_id="alice", tenant_id="acme"))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ChromaStore]:
    with ChromaStore(path=tmp_path / "chroma", index=INDEX) as store:
        yield store


# A namespace without its comma, and arguments of the wrong type ---------------------------------


def test_a_namespace_written_without_its_comma_is_refused_not_split_into_letters(
    store: ChromaStore,
) -> None:
    # ("memories") is the string "memories": LangGraph took it as eight one-letter labels,
    # stored the item under ("m", "e", "m", ...) and a search of ("memories",) never found it
    with pytest.raises(UserError, match=re.escape("('memories',) (mind the comma)")):
        store.put(("memories"), "k", {"text": "tea"})
    with pytest.raises(UserError, match="the namespace_prefix 'memories' is a string"):
        store.search(("memories"))  # noqa: UP034
    with pytest.raises(UserError, match="the namespace 'memories' is a string"):
        store.get(("memories"), "k")
    assert store.list_namespaces() == []  # nothing was stored under the letters
    # a list is a namespace too (LangGraph's server hands JSON lists): taken as the tuple
    store.batch([PutOp(["memories", "acme", "alice"], "k", {"text": "tea"})])  # type: ignore[arg-type]
    assert [i.key for i in store.search(ALICE)] == ["k"]


@pytest.mark.parametrize(
    ("op", "message"),
    [
        (SearchOp(("m",), limit="3"), "SearchOp: limit must be a whole number, got '3'"),  # type: ignore[arg-type]
        (SearchOp(("m",), offset=1.5), "SearchOp: offset must be a whole number, got 1.5"),  # type: ignore[arg-type]
        (SearchOp(("m",), query=5), "SearchOp: the query must be text or None, got int"),  # type: ignore[arg-type]
        (GetOp(("m",), 5), "GetOp: the key must be a string, got int 5"),  # type: ignore[arg-type]
        (PutOp(("m",), b"k", {"text": "x"}), "PutOp: the key must be a string, got bytes"),  # type: ignore[arg-type]
        (PutOp(("m",), "k", {"text": "x"}, ttl="5"), "put(ttl='5'): ttl is in minutes"),  # type: ignore[arg-type]
        (PutOp(("m",), "k", {"text": "x"}, ttl=True), "put(ttl=True): ttl is in minutes"),
        (GetOp({"m": 1}, "k"), "GetOp: the namespace must be a tuple of string labels, got dict"),  # type: ignore[arg-type]
    ],
)
def test_arguments_of_the_wrong_type_are_refused_naming_them(
    store: ChromaStore, op: Any, message: str
) -> None:
    # (they failed deep in the store: TypeError '<' not supported, AttributeError 'int' object
    # has no attribute 'count', unhashable type)
    with pytest.raises(UserError, match=re.escape(message)):
        store.batch([op])


# An infinite TTL --------------------------------------------------------------------------------


@pytest.mark.parametrize("ttl", [float("inf"), 1e308, float("nan"), 0, -5])
def test_a_ttl_that_is_not_a_finite_number_of_minutes_is_refused_and_poisons_nothing(
    store: ChromaStore, ttl: float
) -> None:
    # ttl=inf ("never expire") made an expiry of inf, which Chroma drops from the metadata: the
    # item was stored without one, and every later search of the user's memories raised
    # KeyError: 'exp' (1e308 minutes overflowed to inf the same way)
    store.put(ALICE, "kept", {"text": "green tea"})
    with pytest.raises(UserError, match=r"ttl is in minutes .* or None for no expiry"):
        store.put(ALICE, "forever", {"text": "oolong"}, ttl=ttl)
    assert [i.key for i in store.search(ALICE)] == ["kept"]
    assert [i.key for i in store.search(ALICE, query="tea")] == ["kept"]
    store.put(ALICE, "long", {"text": "oolong"}, ttl=1e15)  # the longest TTL is kept
    assert {i.key for i in store.search(ALICE)} == {"kept", "long"}


@pytest.mark.parametrize("ttl", [float("inf"), "60", True])
def test_a_default_ttl_that_is_not_a_finite_number_of_minutes_is_refused(
    tmp_path: Path, ttl: Any
) -> None:
    with pytest.raises(UserError, match=r"default_ttl.*must be minutes > 0 \(at most 1e\+15\)"):
        ChromaStore(path=tmp_path, index=INDEX, ttl={"default_ttl": ttl})


# Collections deleted under the store ------------------------------------------------------------


def _other_client(path: Path) -> Any:
    return chromadb.PersistentClient(path=str(path), settings=Settings(anonymized_telemetry=False))


def test_a_store_recovers_when_its_catalog_is_deleted_under_it(tmp_path: Path) -> None:
    # the catalog lists the namespaces; deleted by another client on the folder, every write,
    # prefix search, list_namespaces, purge and sweep raised chromadb's NotFoundError until
    # the process restarted. Now it is made again and refilled from the partitions.
    clock = Clock(1_000_000.0)
    store = ChromaStore(path=tmp_path, index=INDEX, clock=clock)
    bob = ("memories", "acme", "bob")
    store.put(ALICE, "drink", {"text": "green tea"})
    store.put((*bob, "notes"), "pet", {"text": "a dog"})
    store.put(bob, "old", {"text": "stale"}, ttl=1)
    _other_client(tmp_path).delete_collection("keel-keel-catalog")

    store.put(bob, "food", {"text": "pasta"})
    assert store.list_namespaces() == [ALICE, bob, (*bob, "notes")]
    assert {i.key for i in store.search(("memories", "acme"))} == {"drink", "pet", "food", "old"}
    assert [i.key for i in store.search(ALICE, query="tea")] == ["drink"]
    clock.now += 120 * 60
    assert store.sweep_ttl() == 1
    assert store.purge(bob) == 2
    assert store.list_namespaces() == [ALICE]
    store.close()


def test_a_purge_after_the_catalog_was_deleted_still_removes_the_user(tmp_path: Path) -> None:
    store = ChromaStore(path=tmp_path, index=INDEX)
    store.put(ALICE, "drink", {"text": "green tea"})
    _other_client(tmp_path).delete_collection("keel-keel-catalog")
    assert store.purge(ALICE) == 1
    assert store.search(ALICE) == [] and store.get(ALICE, "drink") is None
    store.close()


# Writers at once --------------------------------------------------------------------------------


def test_writers_at_once_from_threads_and_two_handles_lose_nothing(tmp_path: Path) -> None:
    handles = [ChromaStore(path=tmp_path, index=INDEX) for _ in range(2)]

    def write(worker: int) -> None:
        for j in range(8):
            user = ("memories", "acme", f"u{j % 3}")
            handles[worker % 2].put(user, f"k{worker}-{j}", {"text": f"note {worker} {j}"})

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(write, range(6)))
    for handle in handles:
        assert len(handle.search(("memories",), limit=100)) == 48
        assert len(handle.search(("memories", "acme", "u0"), query="note", limit=100)) == 18
        assert handle.list_namespaces() == [("memories", "acme", f"u{i}") for i in range(3)]
        handle.close()


# Numbers past a float, values nested past the recursion limit -----------------------------------


def test_integers_past_a_float_are_stored_and_filtered_exactly(store: ChromaStore) -> None:
    # 10**400 is JSON, but its filter copy raised OverflowError: int too large to convert to
    # float; and 2**53 + 1 > 2**53, compared as floats in Chroma's pre-filter, was dropped
    store.put(ALICE, "huge", {"text": "a", "n": 10**400})
    store.put(ALICE, "odd", {"text": "b", "n": 2**53 + 1})
    store.put(ALICE, "even", {"text": "c", "n": 2**53})
    assert store.get(ALICE, "huge").value["n"] == 10**400  # type: ignore[union-attr]

    def keys(**flt: Any) -> set[str]:
        return {i.key for i in store.search(ALICE, filter=flt)}

    assert keys(n={"$gt": 2**53}) == {"huge", "odd"}
    assert keys(n={"$lt": 2**53 + 1}) == {"even"}
    assert keys(n={"$gt": 10**399}) == {"huge"}
    assert keys(n={"$gte": 10**400}) == {"huge"} and keys(n={"$gt": 10**400}) == set()
    assert keys(n={"$lt": -(10**400)}) == set()
    assert {i.key for i in store.search(ALICE, query="a", filter={"n": {"$gt": 2**53}})} == {
        "huge",
        "odd",
    }


def test_a_value_nested_past_the_recursion_limit_is_refused(store: ChromaStore) -> None:
    deep: list[Any] = []
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(UserError, match="the value of a PutOp is nested too deeply"):
        store.put(ALICE, "deep", {"text": "x", "d": deep})  # a bare RecursionError
    assert store.search(ALICE) == []
