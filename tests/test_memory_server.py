"""ChromaStore through a real Chroma server (`chroma run`), with two processes writing at once."""

from __future__ import annotations

import json
import os
import signal
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from forking import ForkServer

from keel import RunContext, SetupError, StorageError, UserError, build_agent
from keel.evals import ScriptedChatModel
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


def test_chromadb_s_own_http_client_waits_for_ever(chroma_url: str) -> None:
    """Pinned: chromadb's HTTP sessions have no timeout (why keel bounds them, below)."""
    import chromadb
    from chromadb.config import Settings

    from keel.memory._open import close_client

    host, port = chroma_url.removeprefix("http://").split(":")
    client = chromadb.HttpClient(host=host, port=int(port), settings=Settings())
    try:
        assert client._server._session.timeout.read is None  # type: ignore[attr-defined]
    finally:
        close_client(client)  # chromadb's close() leaves its sessions' sockets open


def test_a_hung_server_fails_each_call_in_time_and_the_run_goes_on(
    chroma_server: Any, tmp_path: Path
) -> None:
    """A Chroma server that stops answering (overloaded, SIGSTOPped, a network dropping
    packets) held every call for good: chromadb's client has no timeout, so a run that
    recalled a memory never ended, and neither did opening a store on it."""
    alice = RunContext(user_id="alice", tenant_id="acme")
    ns = ("memories", "acme", "alice")
    with chroma_server(tmp_path) as server:
        store = ChromaStore(url=server.url, index=_words_index(), timeout=1)
        store.put(ns, "tz", {"text": "prefers CET"})
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            began = time.monotonic()
            with pytest.raises(StorageError, match=r"did not answer within 1 s \(ReadTimeout\)"):
                store.search(ns, query="a")
            agent = build_agent(ScriptedChatModel(script=["Hello."]), store=store, memory=True)
            done = agent.invoke({"messages": [("user", "hi")]}, context=alice)
            assert done["outcome"]["terminated_reason"] == "completed"
            assert any("memory: recall failed" in w for w in done["warnings"])
            with pytest.raises(SetupError, match="did not answer within 1 s"):
                ChromaStore(url=server.url, index=_words_index(), timeout=1)
            assert time.monotonic() - began < 30  # each wait is one timeout, not for ever
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        assert [i.key for i in store.search(ns, query="a")] == ["tz"]  # answering again
        store.close()


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf"), True, "30"])
def test_a_timeout_that_is_not_seconds_above_zero_is_refused(timeout: Any) -> None:
    with pytest.raises(UserError, match=r"timeout=\.\.\.\) must be a number of seconds above 0"):
        ChromaStore(url="http://127.0.0.1:1", timeout=timeout)
