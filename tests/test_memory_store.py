"""ChromaStore on a real embedded Chroma: isolation, TTL, recorded model, deletion, errors.

Also pins where LangGraph's InMemoryStore surprises, and what ChromaStore does instead.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import chromadb
import pytest
from chromadb.config import Settings
from conftest import Clock
from langgraph.store.base import GetOp, InvalidNamespaceError, PutOp
from langgraph.store.memory import InMemoryStore

from keel.errors import UserError
from keel.memory import ChromaStore
from keel.memory.base import collection_name


def letters(texts: list[str]) -> list[list[float]]:
    """Deterministic 4-dim embeddings: counts of a, e, o and length."""
    return [
        [t.count("a") + 0.1, t.count("e") + 0.1, t.count("o") + 0.1, len(t) / 10] for t in texts
    ]


def other_model(texts: list[str]) -> list[list[float]]:
    return [[1.0, 0.0, 0.0, 0.0] for _ in texts]


def _index(embed: Any = letters, dims: int = 4) -> Any:
    return {"dims": dims, "embed": embed, "fields": ["text"]}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ChromaStore]:
    with ChromaStore(path=tmp_path / "chroma", index=_index()) as store:
        yield store


# Isolation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_namespaces_match_whole_labels_only(tmp_path: Path, depth: int) -> None:
    store = ChromaStore(path=tmp_path, index=_index(), partition_depth=depth)
    store.put(("memories", "acme", "u1"), "k", {"text": "acme secret"})
    store.put(("memories", "acme-corp", "u1"), "k", {"text": "acme-corp secret"})
    store.put(("memories", "acm", "u1"), "k", {"text": "acm secret"})
    for tenant in ("acme", "acme-corp", "acm"):
        for query in (None, "secret"):
            found = store.search(("memories", tenant), query=query, limit=50)
            assert [i.value["text"] for i in found] == [f"{tenant} secret"]
    assert store.list_namespaces(prefix=("memories", "acme")) == [("memories", "acme", "u1")]
    assert store.get(("memories", "acme-corp", "u1"), "k") is not None
    assert store.get(("memories", "acme"), "k") is None


def test_a_user_partition_is_its_own_chroma_collection(store: ChromaStore) -> None:
    store.put(("memories", "acme", "u1"), "k", {"text": "one"})
    store.put(("memories", "acme", "u2"), "k", {"text": "two"})
    raw = store.client.get_collection(collection_name("keel", ("memories", "acme", "u1"), "i"))
    assert raw.count() == 1  # a scoped search never reads u2's rows


def test_keys_and_labels_that_look_alike_stay_apart(store: ChromaStore) -> None:
    store.put(("a", "b"), "c", {"text": "1"})
    store.put(("a",), "b", {"text": "2"})
    store.put(("a", "b", "c"), "", {"text": "3"})
    assert store.get(("a", "b"), "c").value == {"text": "1"}  # type: ignore[union-attr]
    assert store.get(("a",), "b").value == {"text": "2"}  # type: ignore[union-attr]
    assert [i.key for i in store.search(("a", "b", "c"))] == [""]


# TTL ----------------------------------------------------------------------------------------------


@pytest.fixture
def timed(tmp_path: Path, clock: Clock) -> Iterator[ChromaStore]:
    """A store whose TTLs run on the test's `clock` (TTLs are in minutes)."""
    with ChromaStore(path=tmp_path / "chroma", index=_index(), clock=clock) as store:
        yield store


def test_expired_items_are_invisible_at_once_and_swept(timed: ChromaStore, clock: Clock) -> None:
    ns = ("memories", "acme", "u1")
    timed.put(ns, "long", {"text": "stays"})
    timed.put(ns, "short", {"text": "gone soon"}, ttl=10)  # 600 s
    clock.now += 599
    assert timed.get(ns, "short", refresh_ttl=False) is not None
    clock.now += 2
    assert timed.get(ns, "short", refresh_ttl=False) is None
    assert [i.key for i in timed.search(ns, query="gone soon")] == ["long"]
    assert [i.key for i in timed.search(ns)] == ["long"]
    raw = timed.client.get_collection(collection_name("keel", ns, "i"))
    assert raw.count() == 1  # the reads above already swept the expired row
    timed.put(ns, "short2", {"text": "x"}, ttl=1)
    clock.now += 61
    assert raw.count() == 2
    assert timed.sweep_ttl() == 1
    assert raw.count() == 1


def test_an_expired_namespace_is_not_listed(timed: ChromaStore, clock: Clock) -> None:
    timed.put(("tmp", "a"), "k", {"text": "x"}, ttl=1)
    timed.put(("keep", "a"), "k", {"text": "x"})
    assert timed.list_namespaces() == [("keep", "a"), ("tmp", "a")]
    clock.now += 61
    assert timed.list_namespaces() == [("keep", "a")]


def test_reads_refresh_the_ttl_unless_told_not_to(timed: ChromaStore, clock: Clock) -> None:
    ns = ("memories", "acme", "u1")
    timed.put(ns, "a", {"text": "a"}, ttl=10)  # 600 s
    timed.put(ns, "b", {"text": "b"}, ttl=10)
    for _ in range(3):
        clock.now += 300
        assert timed.get(ns, "a") is not None  # refreshes a
        assert timed.search(ns, query="a", refresh_ttl=False, limit=1) is not None
    assert timed.get(ns, "a") is not None
    assert timed.get(ns, "b") is None  # never refreshed: 900 s > 600 s


def test_default_ttl_and_refresh_on_read_come_from_the_ttl_config(
    tmp_path: Path, clock: Clock
) -> None:
    ttl: Any = {"default_ttl": 10, "refresh_on_read": False}
    with ChromaStore(path=tmp_path, ttl=ttl, clock=clock) as store:
        store.put(("t", "u"), "k", {"v": 1})
        clock.now += 300
        assert store.get(("t", "u"), "k") is not None  # no refresh
        clock.now += 301
        assert store.get(("t", "u"), "k") is None


# Recorded model ----------------------------------------------------------------------------------


def test_opening_with_another_model_fails_and_says_which(tmp_path: Path) -> None:
    ChromaStore(path=tmp_path, index=_index()).put(("d", "u"), "k", {"text": "x"})
    with pytest.raises(
        UserError,
        match=r"built with embedding model '.*letters' \(4 dims\).*other_model' \(4 dims\)",
    ):
        ChromaStore(path=tmp_path, index=_index(other_model))
    with pytest.raises(UserError, match=r"\(4 dims\).*\(5 dims\)"):
        ChromaStore(path=tmp_path, index=_index(dims=5))
    with pytest.raises(UserError, match=r"open it with index=\{'dims': 4"):
        ChromaStore(path=tmp_path)
    with pytest.raises(UserError, match="partition_depth=3"):
        ChromaStore(path=tmp_path, index=_index(), partition_depth=2)
    assert ChromaStore(path=tmp_path, index=_index()).get(("d", "u"), "k") is not None


def test_the_model_is_recorded_on_every_vector_collection(store: ChromaStore) -> None:
    store.put(("d", "u", "x"), "k", {"text": "x"})
    raw = store.client.get_collection(collection_name("keel", ("d", "u", "x"), "v"))
    assert raw.metadata["keel:model"].endswith("letters")
    assert raw.metadata["keel:dims"] == 4


def test_a_model_returning_the_wrong_size_is_refused(tmp_path: Path) -> None:
    store = ChromaStore(path=tmp_path, index=_index(dims=3))
    with pytest.raises(UserError, match=r"returned 4-dim vectors but the index config says dims=3"):
        store.put(("d",), "k", {"text": "x"})


# Deletion ----------------------------------------------------------------------------------------


def _on_disk(root: Path, token: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and token in p.read_bytes()]


def test_purging_a_user_removes_their_text_from_disk(tmp_path: Path) -> None:
    root = tmp_path / "chroma"
    store = ChromaStore(path=root, index=_index())
    for i in range(30):
        store.put(("memories", "acme", "u1"), f"k{i}", {"text": f"ZEBRAPASSWORD{i} alpha"})
        store.put(("memories", "acme", "u1", "notes"), f"k{i}", {"text": f"ZEBRANOTE{i}"})
        store.put(("memories", "acme", "u2"), f"k{i}", {"text": f"KEEPTHISTEXT{i}"})
    assert _on_disk(root, b"ZEBRAPASSWORD7")
    segments = {p.name for p in root.iterdir() if p.is_dir()}  # one HNSW directory per index
    assert store.purge(("memories", "acme", "u1")) == 2
    assert _on_disk(root, b"ZEBRAPASSWORD") == []
    assert _on_disk(root, b"ZEBRANOTE") == []
    assert _on_disk(root, b"KEEPTHISTEXT7")
    # the user's two collections (items, vectors) took their index directories with them
    assert len(segments - {p.name for p in root.iterdir() if p.is_dir()}) == 2
    assert store.search(("memories", "acme", "u1"), query="alpha") == []
    assert store.list_namespaces() == [("memories", "acme", "u2")]
    assert len(store.search(("memories", "acme", "u2"), limit=100)) == 30
    store.put(("memories", "acme", "u1"), "again", {"text": "new"})  # the store still works
    assert store.get(("memories", "acme", "u1"), "again") is not None


def test_delete_hides_an_item_and_its_vectors(store: ChromaStore) -> None:
    ns = ("memories", "acme", "u1")
    store.put(ns, "k", {"text": "hello"})
    store.delete(ns, "k")
    assert store.get(ns, "k") is None
    assert store.search(ns, query="hello") == []
    raw = store.client.get_collection(collection_name("keel", ns, "v"))
    assert raw.count() == 0


# Errors that say what to do -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of path="),
        ({"path": "x", "url": "http://h:1"}, "exactly one of path="),
        ({"url": "localhost:8000"}, "must look like 'http://127.0.0.1:8000'"),
        ({"path": "P", "name": "Bad Name"}, "1-40 characters"),
        ({"path": "P", "partition_depth": 0}, "partition_depth"),
        ({"path": "P", "index": {"embed": letters}}, "needs 'dims'"),
        ({"path": "P", "ttl": {"default_ttl": -1}}, "minutes > 0"),
    ],
)
def test_bad_arguments_are_refused_with_the_fix(
    tmp_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    if kwargs.get("path") == "P":
        kwargs["path"] = tmp_path
    with pytest.raises(UserError, match=re.escape(message)):
        ChromaStore(**kwargs)


def test_bad_operations_are_refused_with_the_fix(store: ChromaStore) -> None:
    with pytest.raises(UserError, match=r"unsupported operator\(s\) \['\$in'\]"):
        store.search(("a",), filter={"n": {"$in": [1]}})
    with pytest.raises(UserError, match="both must be 0 or more"):
        store.search(("a",), limit=-1)
    with pytest.raises(UserError, match="ttl is in minutes"):
        store.put(("a",), "k", {"v": 1}, ttl=0)
    with pytest.raises(ValueError, match="periods"):
        store.batch([GetOp(("a.b",), "k")])
    with pytest.raises(UserError, match="non-empty prefix"):
        store.purge(())


@pytest.mark.parametrize(
    ("namespace", "message"),
    [((), "Namespace cannot be empty"), (("langgraph", "a"), 'cannot be "langgraph"')],
)
async def test_a_put_op_to_a_namespace_langgraph_refuses_is_refused_in_batch_too(
    store: ChromaStore, namespace: tuple[str, ...], message: str
) -> None:
    # (BaseStore.put refuses these, but a PutOp handed to batch/abatch, as the LangGraph
    # server does, was written: the empty namespace even got listed)
    with pytest.raises(InvalidNamespaceError, match=re.escape(message)):
        store.put(namespace, "k", {"text": "tea"})
    with pytest.raises(InvalidNamespaceError, match=re.escape(message)):
        store.batch(
            [PutOp(("m", "a"), "ok", {"text": "fine"}), PutOp(namespace, "k", {"text": "x"})]
        )
    with pytest.raises(InvalidNamespaceError, match=re.escape(message)):
        await store.abatch([PutOp(namespace, "k", {"text": "tea"})])
    assert store.list_namespaces() == []  # nothing written, not even the good op
    assert store.batch([GetOp(namespace, "k")]) == [None]
    store.batch([PutOp(namespace, "k", None)])  # a delete is allowed, as in LangGraph


@pytest.mark.parametrize(
    ("value", "index", "message"),
    [
        ("green tea", None, "the value must be a dict (a JSON object), got str"),
        (["green tea"], None, "the value must be a dict (a JSON object), got list"),
        ({"text": "tea", "at": object()}, None, "the value must hold only JSON types"),
        ({"text": "tea", "seen": {1, 2}}, None, "the value must hold only JSON types"),
        ({"text": "tea"}, True, "index must be None (the store's fields), False"),
        ({"text": "tea"}, "text", "index must be None (the store's fields), False"),
        ({"text": "tea"}, ["text", 3], "index must be None (the store's fields), False"),
    ],
)
async def test_a_put_that_is_not_a_json_object_is_refused_before_anything_is_written(
    store: ChromaStore, value: Any, index: Any, message: str
) -> None:
    # (it failed inside the store, after embedding: AttributeError / TypeError naming nothing)
    with pytest.raises(UserError, match=re.escape(message)):
        store.put(("m", "a"), "k", value, index=index)
    with pytest.raises(UserError, match=re.escape(message)):
        await store.aput(("m", "a"), "k", value, index=index)
    with pytest.raises(UserError, match=re.escape(message)):  # one bad op fails the whole batch
        store.batch(
            [PutOp(("m", "a"), "ok", {"text": "fine"}), PutOp(("m", "a"), "k", value, index)]
        )
    assert store.search(("m", "a")) == []  # nothing half-written
    store.put(("m", "a"), "k", {"text": "tea", "n": 1.5, "tags": ["a"], "x": None}, index=["text"])
    assert store.get(("m", "a"), "k").value["tags"] == ["a"]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("what", "op"),
    [
        ("value", lambda s: s.put(("m", "a"), "k", {"text": "tea \ud800"})),
        ("value", lambda s: s.put(("m", "a"), "k", {"text": "ok", "note": "\udfff"}, index=False)),
        ("key", lambda s: s.put(("m", "a"), "\ud800", {"text": "tea"})),
        ("key", lambda s: s.get(("m", "a"), "k\ud800")),
        ("namespace", lambda s: s.put(("m", "\ud800"), "k", {"text": "tea"})),
        ("query", lambda s: s.search(("m", "a"), query="tea \ud800")),
    ],
)
def test_a_lone_surrogate_is_refused_naming_what_held_it(
    store: ChromaStore, what: str, op: Any
) -> None:
    # (Chroma's tokenizer, metadata and SQLite fail on one with errors that name nothing)
    with pytest.raises(UserError, match=f"the {what} of a .* holds a lone surrogate"):
        op(store)
    assert store.search(("m", "a")) == []  # nothing half-written
    store.put(("m", "a"), "k", {"text": "NUL \x00 is text"})  # valid UTF-8 is kept as it is
    assert store.get(("m", "a"), "k").value == {"text": "NUL \x00 is text"}  # type: ignore[union-attr]


def _file_in_its_place(root: Path) -> None:
    root.write_text("not a folder")


def _a_folder_for_its_database(root: Path) -> None:
    (root / "chroma.sqlite3").mkdir(parents=True)


def _not_a_database(root: Path) -> None:
    root.mkdir()
    (root / "chroma.sqlite3").write_bytes(b"garbage, not SQLite" * 10)


@pytest.mark.parametrize("spoil", [_file_in_its_place, _a_folder_for_its_database, _not_a_database])
def test_a_folder_chroma_cannot_open_says_so_and_opens_once_mended(
    tmp_path: Path, spoil: Any
) -> None:
    from keel.errors import SetupError

    root = tmp_path / "chroma"
    spoil(root)
    with pytest.raises(
        SetupError, match=rf"^Cannot open the Chroma store at {re.escape(str(root))} \("
    ):
        ChromaStore(path=root, index=_index())
    if root.is_file():
        root.unlink()
    else:
        shutil.rmtree(root)
    # chromadb kept the client that failed to start cached by path; it is dropped, or this
    # open, in the same process, failed with "'RustBindingsAPI' object has no attribute ..."
    store = ChromaStore(path=root, index=_index())
    store.put(("m", "a"), "k", {"text": "tea"})
    assert store.get(("m", "a"), "k") is not None


def test_a_client_you_built_works_too(tmp_path: Path) -> None:
    client = chromadb.PersistentClient(
        path=str(tmp_path), settings=Settings(anonymized_telemetry=False)
    )
    store = ChromaStore(client=client, name="other")
    store.put(("x",), "k", {"v": 1})
    assert store.get(("x",), "k").value == {"v": 1}  # type: ignore[union-attr]
    assert ChromaStore(client=client).list_namespaces() == []  # stores sharing a client are apart


# InMemoryStore's surprises, pinned ----------------------------------------------------------------


def test_created_at_survives_an_update_unlike_in_memory_store(store: ChromaStore) -> None:
    for s in (store, InMemoryStore()):
        s.put(("a",), "k", {"text": "v1"})
        first = s.get(("a",), "k")
        time.sleep(0.01)
        s.put(("a",), "k", {"text": "v2"})
        second = s.get(("a",), "k")
        assert first is not None and second is not None
        assert second.updated_at > first.updated_at
        if isinstance(s, InMemoryStore):
            assert second.created_at > first.created_at  # InMemoryStore resets it
        else:
            assert second.created_at == first.created_at


def test_emptied_namespaces_are_not_listed_unlike_in_memory_store(store: ChromaStore) -> None:
    ref = InMemoryStore()
    for s in (store, ref):
        s.put(("a", "b"), "k", {"v": 1})
        s.delete(("a", "b"), "k")
        s.get(("never", "written"), "k")
    assert ref.list_namespaces() == [("a", "b"), ("never", "written")]  # even a mere get
    assert store.list_namespaces() == []


def test_pages_of_unscored_results_do_not_repeat_unlike_in_memory_store(tmp_path: Path) -> None:
    ref = InMemoryStore(index=_index())
    mine = ChromaStore(path=tmp_path, index=_index())
    for s in (ref, mine):
        s.put(("a",), "scored", {"text": "aaa"})
        for i in range(4):
            s.put(("a",), f"plain{i}", {"text": "x"}, index=False)

    def pages(s: Any) -> list[list[str]]:
        return [[i.key for i in s.search(("a",), query="a", limit=2, offset=o)] for o in (0, 2, 4)]

    assert pages(ref)[1] == pages(ref)[2] == ["plain0", "plain1"]  # offset ignored past scores
    keys = [k for page in pages(mine) for k in page]
    assert keys[0] == "scored" and sorted(keys[1:]) == [f"plain{i}" for i in range(4)]


def test_range_filters_on_a_missing_field_do_not_match_where_in_memory_store_raises(
    store: ChromaStore,
) -> None:
    ref = InMemoryStore()
    for s in (store, ref):
        s.put(("a",), "with", {"n": 5})
        s.put(("a",), "without", {"m": 1})
    with pytest.raises(TypeError):
        ref.search(("a",), filter={"n": {"$gt": 1}})
    assert [i.key for i in store.search(("a",), filter={"n": {"$gt": 1}})] == ["with"]
    assert [i.key for i in store.search(("a",), filter={"n": {"$ne": 5}})] == ["without"]


def test_reads_in_a_batch_see_the_state_before_its_writes_like_in_memory_store(
    store: ChromaStore,
) -> None:
    for s in (store, InMemoryStore()):
        s.put(("a",), "k", {"v": "old"})
        got = s.batch([PutOp(("a",), "k", {"v": "new"}), GetOp(("a",), "k")])
        assert got[1].value == {"v": "old"}  # type: ignore[union-attr]
        assert s.get(("a",), "k").value == {"v": "new"}  # type: ignore[union-attr]


def test_search_without_a_query_is_newest_first(store: ChromaStore) -> None:
    for k in ("a", "b", "c"):
        store.put(("n",), k, {"v": k})
        time.sleep(0.005)
    store.put(("n",), "a", {"v": "again"})
    assert [i.key for i in store.search(("n",))] == ["a", "c", "b"]


def test_the_async_twins_work_under_a_running_loop(store: ChromaStore) -> None:
    async def go() -> Any:
        await store.aput(("x", "y"), "k", {"text": "hello"})
        return await asyncio.gather(
            store.aget(("x", "y"), "k"), store.asearch(("x",), query="hello")
        )

    item, found = asyncio.run(go())
    assert item.value == {"text": "hello"}
    assert [i.key for i in found] == ["k"] and found[0].score == pytest.approx(1.0)
    assert json.loads(json.dumps(found[0].dict()))["namespace"] == ["x", "y"]


def test_a_store_recovers_when_another_process_purged_a_partition(tmp_path: Path) -> None:
    a = ChromaStore(path=tmp_path, index=_index())
    b = ChromaStore(path=tmp_path, index=_index())  # a second handle: its own caches
    ns = ("memories", "acme", "u1")
    a.put(ns, "k", {"text": "one"})
    assert b.get(ns, "k") is not None  # b caches the partition's collections
    a.purge(ns)
    assert b.get(ns, "k") is None
    b.put(ns, "k2", {"text": "two"})
    assert [i.key for i in a.search(ns, query="two")] == ["k2"]
    assert a.list_namespaces() == [ns]


def test_an_unreachable_server_says_how_to_start_one() -> None:
    from keel.errors import SetupError

    with pytest.raises(SetupError, match=r"chroma run --path <dir> --host 127\.0\.0\.1 --port 9"):
        ChromaStore(url="http://127.0.0.1:9")


def test_pin_chromadb_delete_collection_leaves_its_index_files_on_disk(tmp_path: Path) -> None:
    """chromadb 1.5: `delete_collection` keeps the HNSW directory, which holds copies of the
    records' bytes; that is why `purge` removes the segment directories itself."""
    import chromadb
    from chromadb.config import Settings

    client = chromadb.PersistentClient(
        path=str(tmp_path), settings=Settings(anonymized_telemetry=False)
    )
    col = client.create_collection("pin", embedding_function=None)
    col.add(ids=["a"], embeddings=[[1.0, 0.0]], documents=["SECRET"])
    before = {p.name for p in tmp_path.iterdir() if p.is_dir()}
    assert before
    client.delete_collection("pin")
    assert {p.name for p in tmp_path.iterdir() if p.is_dir()} == before
