"""ChromaStore through a real Chroma server (`chroma run`), with two processes writing at once."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from forking import ForkServer

from keel.memory import ChromaStore


@pytest.fixture(scope="module")
def chroma_url(tmp_path_factory: pytest.TempPathFactory, chroma_server: Any) -> Iterator[str]:
    with chroma_server(tmp_path_factory.mktemp("chroma-server")) as server:
        yield server.url


def words(texts: list[str]) -> list[list[float]]:
    return [[t.count("a") + 0.5, t.count("b") + 0.5, float(len(t))] for t in texts]


def _words_index() -> Any:
    return {"dims": 3, "embed": words, "fields": ["text"]}


WRITER = textwrap.dedent(
    """
    import sys
    from keel.memory import ChromaStore

    def words(texts):
        return [[t.count("a") + 0.5, t.count("b") + 0.5, float(len(t))] for t in texts]

    url, who, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    index = {"dims": 3, "embed": words, "fields": ["text"]}
    store = ChromaStore(url=url, name="shared", index=index, embedding_model="words-v1")
    for i in range(n):
        store.put(("memories", "acme", who), f"k{i}", {"text": f"{who} note {i}", "i": i})
        store.put(("memories", "acme", "team"), f"{who}-{i}", {"text": f"team note from {who}"})
    print("done", who)
    """
)


def test_two_processes_write_through_the_server_at_once(
    chroma_url: str, tmp_path: Path, forks: ForkServer
) -> None:
    """(The two are forked with keel imported, `tests/forking.py`; each imports chromadb.)"""
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    procs = [
        forks.start_script(script, chroma_url, who, "25", cwd=tmp_path) for who in ("alice", "bob")
    ]
    for p in procs:
        code = p.finish()
        out, err = p.output()
        assert code == 0, err
        assert out.startswith("done")
    store = ChromaStore(
        url=chroma_url, name="shared", index=_words_index(), embedding_model="words-v1"
    )
    assert store.list_namespaces() == [
        ("memories", "acme", "alice"),
        ("memories", "acme", "bob"),
        ("memories", "acme", "team"),
    ]
    for who in ("alice", "bob"):
        mine = store.search(("memories", "acme", who), limit=100)
        assert sorted(i.value["i"] for i in mine) == list(range(25))
        assert {i.value["text"].split()[0] for i in mine} == {who}
    team = store.search(("memories", "acme", "team"), query="team note from bob", limit=100)
    assert len(team) == 50 and team[0].value["text"] == "team note from bob"


def test_the_server_store_behaves_like_the_embedded_one(chroma_url: str, tmp_path: Path) -> None:
    index = {"dims": 3, "embed": words, "fields": ["text"]}
    remote = ChromaStore(url=chroma_url, name="same", index=index)  # type: ignore[arg-type]
    local = ChromaStore(path=tmp_path, name="same", index=index)  # type: ignore[arg-type]
    for s in (remote, local):
        s.put(("docs", "u1"), "a", {"text": "aaa", "n": 1})
        s.put(("docs", "u1"), "b", {"text": "bbb", "n": 2}, ttl=60)
        s.put(("docs", "u2"), "c", {"text": "ab", "n": 3})
        s.delete(("docs", "u1"), "a")

    def view(s: ChromaStore) -> str:
        found = s.search(("docs",), query="ab", filter={"n": {"$gte": 2}}, limit=10)
        return json.dumps([(i.namespace, i.key, i.value, round(i.score or 0, 5)) for i in found])

    assert view(remote) == view(local)
    assert remote.list_namespaces() == local.list_namespaces() == [("docs", "u1"), ("docs", "u2")]
    remote.purge(("docs", "u1"))
    assert remote.list_namespaces() == [("docs", "u2")]
