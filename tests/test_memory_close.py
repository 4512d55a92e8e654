"""Closing a `ChromaStore`: what it gives back, what stays usable, what a closed store says."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import chromadb
import pytest
from chromadb.api.shared_system_client import SharedSystemClient
from chromadb.config import Settings

from keel.errors import SetupError, StorageError, UserError
from keel.memory import ChromaStore
from keel.memory._open import Lifetime


def _fds(*, sockets: bool = True) -> int:
    """This process's open file descriptors (`sockets=False`: but its sockets, which the test
    worker's other connection pools open and close meanwhile)."""
    if sockets:
        return len(os.listdir("/proc/self/fd"))
    found = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed since it was listed
            found += not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return found


def two_dims(texts: list[str]) -> list[list[float]]:
    return [[float(len(t)) + 1.0, 1.0] for t in texts]


def _index(embed: Any = two_dims) -> Any:
    return {"dims": 2, "embed": embed, "fields": ["text"]}


def _systems() -> set[str]:
    """The paths (and HTTP clients) chromadb keeps a started Chroma system for."""
    return set(SharedSystemClient._identifier_to_system)


def _used(store: ChromaStore) -> None:
    ns = ("memories", "acme", "u1")
    store.put(ns, "k", {"text": "tea at four"})
    assert [i.key for i in store.search(ns, query="tea")] == ["k"]


SLACK = 4
"""File descriptors another thread of the test process may open or close meanwhile."""


def _files_under(folder: Path) -> int:
    """This process's file descriptors open on files under `folder` (the stores' own: a count
    of all of them also moves with what other threads of the test worker open meanwhile)."""
    inside = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed since it was listed
            inside += os.readlink(f"/proc/self/fd/{fd}").startswith(f"{folder}{os.sep}")
    return inside


def _sqlite_workers() -> set[int]:
    """This process's threads that hold chromadb's SQLite connections (sqlx's workers)."""
    found = set()
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):  # ended since it was listed
            if Path(f"/proc/self/task/{tid}/comm").read_text().startswith("sqlx-sqlite"):
                found.add(int(tid))
    return found


@contextlib.contextmanager
def _busy_machine(workers: set[int]) -> Iterator[None]:
    """Run these SQLite worker threads as on a busy machine: on this thread's CPU, at idle
    priority, so they close their files only once this thread waits. A close that returned
    before they did is then seen almost every time, not one close in a few."""
    cpus = os.sched_getaffinity(0)
    cpu = {min(cpus)}
    os.sched_setaffinity(0, cpu)
    try:
        for tid in workers:
            with contextlib.suppress(OSError):  # ended already
                os.sched_setaffinity(tid, cpu)
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        yield
    finally:
        os.sched_setaffinity(0, cpus)


def test_closing_stores_gives_their_file_descriptors_back(tmp_path: Path) -> None:
    ChromaStore(path=tmp_path / "warm").close()  # what the first store loads, once a process
    before, files = _fds(), _fds(sockets=False)
    stores = [ChromaStore(path=tmp_path / f"s{i}", index=_index()) for i in range(4)]
    for store in stores:
        _used(store)
    opened, opened_inside = _fds(), _files_under(tmp_path)
    for store in stores:
        store.close()
    assert opened - before >= 4 * 10, (before, opened)  # each path holds ~20 open
    assert opened_inside >= 4, opened_inside  # its database file at least
    assert _files_under(tmp_path) == 0  # as close() returns (no collection, no waiting)
    assert _fds(sockets=False) == files  # and the threads' pipes went with the systems
    assert not _systems() & {str(tmp_path / f"s{i}") for i in range(4)}


def test_a_closed_store_has_closed_every_file_of_its_folder(tmp_path: Path) -> None:
    """Store after store (a tenant's each, in a long-running process): once the last store on a
    path is closed, no file under it is open, even while chromadb's SQLite threads lag, and the
    process's descriptors do not grow; the folder can be deleted and a fresh store opened."""
    ChromaStore(path=tmp_path / "warm").close()
    files = _fds(sockets=False)
    folders = [tmp_path / f"tenant{i}" for i in range(6)]
    for i, folder in enumerate(folders):
        idle = _sqlite_workers()
        stores = [ChromaStore(path=folder, index=_index()) for _ in range(1 + i % 2)]
        for store in stores:
            _used(store)
        if i % 4 == 1:  # two stores on the path, closed in either order
            stores.reverse()
        stores[0].close()
        with _busy_machine(_sqlite_workers() - idle):
            stores[-1].close()
        assert _files_under(folder) == 0, i
        assert _fds(sockets=False) == files, i
    for folder in folders[:2]:
        shutil.rmtree(folder)
        with ChromaStore(path=folder, index=_index()) as fresh:
            assert fresh.list_namespaces() == []
            _used(fresh)
        assert _files_under(folder) == 0


def test_a_store_closed_while_you_hold_its_file_open_says_so_and_returns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """close() waits for chromadb's threads, not for you: with your own connection open on the
    store's SQLite file it returns after 2s, with a warning; reopened meanwhile, at once."""
    store = ChromaStore(path=tmp_path, index=_index())
    _used(store)
    yours = sqlite3.connect(tmp_path / "chroma.sqlite3")
    try:
        started = time.monotonic()
        store.close()
        assert 2 <= time.monotonic() - started < 4
        assert f"Chroma at {tmp_path} closed, but its SQLite file is still open" in caplog.text
        caplog.clear()
        store = ChromaStore(path=tmp_path, index=_index())
        closing = threading.Thread(target=store.close)
        started = time.monotonic()
        closing.start()
        time.sleep(0.5)  # it waits for your connection
        again = ChromaStore(path=tmp_path, index=_index())  # and stops: the path is open again
        closing.join()
        assert time.monotonic() - started < 1.5
        assert "still open" not in caplog.text
        assert again.get(("memories", "acme", "u1"), "k") is not None
    finally:
        yours.close()
    again.close()


def test_pin_chromadb_closes_its_sqlite_files_after_close_returned(tmp_path: Path) -> None:
    """chromadb 1.5: `PersistentClient.close()` returns before its SQLite connections are
    closed: their worker threads (sqlx's) close the files a few milliseconds later, on their
    own. Why `keel.memory._open.close_client` waits for them. If this fails, chromadb closes
    them before it returns: that wait can go."""
    settings = Settings(anonymized_telemetry=False)
    seen = []
    for i in range(8):  # once is enough; a thread may get the CPU anyway (1 close in 10)
        idle, folder = _sqlite_workers(), tmp_path / str(i)
        client = chromadb.PersistentClient(path=str(folder), settings=settings)
        client.get_or_create_collection("col").upsert(ids=["1"], embeddings=[[1.0]])
        with _busy_machine(_sqlite_workers() - idle):
            client.close()  # type: ignore[attr-defined]
            seen.append(_files_under(folder))
            if seen[-1]:
                break
    assert seen[-1] > 0, seen
    for _ in range(500):  # but not forever: not a leak
        if not _files_under(folder):
            break
        time.sleep(0.01)
    assert _files_under(folder) == 0


def test_pin_chromadb_clients_on_one_path_share_one_system_counted_by_reference(
    tmp_path: Path,
) -> None:
    """chromadb >= 1.5.2: `PersistentClient`s on one path share a `System`; `close()` stops it
    only with the last of them. `ChromaStore.close` relies on this to leave other stores on
    the path working."""
    settings = Settings(anonymized_telemetry=False)
    a = chromadb.PersistentClient(path=str(tmp_path), settings=settings)
    b = chromadb.PersistentClient(path=str(tmp_path), settings=settings)
    assert a._system is b._system  # type: ignore[attr-defined]
    a.get_or_create_collection("col").upsert(ids=["1"], embeddings=[[1.0]])
    a.close()  # type: ignore[attr-defined]
    a.close()  # type: ignore[attr-defined]  # twice: still one reference given back
    assert str(tmp_path) in _systems()
    assert b.get_collection("col").count() == 1
    b.close()  # type: ignore[attr-defined]
    assert str(tmp_path) not in _systems()


def test_closing_a_store_leaves_another_on_the_same_path_working(tmp_path: Path) -> None:
    ChromaStore(path=tmp_path / "warm").close()
    before = _fds(sockets=False)
    a = ChromaStore(path=tmp_path / "one", index=_index())
    b = ChromaStore(path=tmp_path / "one", index=_index())
    _used(a)
    a.close()
    assert b.get(("memories", "acme", "u1"), "k") is not None
    b.put(("memories", "acme", "u2"), "k", {"text": "coffee"})
    assert b.search(("memories", "acme", "u2"), query="coffee")[0].key == "k"
    b.close()
    assert _fds(sockets=False) == before  # but sockets (the test worker's pools open some)
    assert str(tmp_path / "one") not in _systems()


CLOSED = re.escape(
    "The Chroma store 'keel' at {} was closed (ChromaStore.close() / aclose()) and does not "
    "reopen. Close a store only after the runs that use it have ended, or open a new "
    "ChromaStore for later work."
)


def test_a_closed_store_refuses_every_call_and_says_what_to_do(tmp_path: Path) -> None:
    store = ChromaStore(path=tmp_path, index=_index())
    _used(store)
    assert not store.closed
    store.close()
    store.close()  # a no-op
    assert store.closed and repr(store).endswith(", closed)")
    ns = ("memories", "acme", "u1")
    calls = [
        lambda: store.get(ns, "k"),
        lambda: store.put(ns, "k2", {"text": "x"}),
        lambda: store.search(ns, query="tea"),
        lambda: store.list_namespaces(),
        lambda: asyncio.run(store.aget(ns, "k")),
        store.sweep_ttl,
        lambda: store.purge(ns),
        store.vacuum,
    ]
    message = CLOSED.replace(re.escape("{}"), re.escape(str(tmp_path)))
    for call in calls:
        with pytest.raises(StorageError, match=f"^{message}$"):
            call()
    assert str(tmp_path) not in _systems()  # nothing reopened it


def test_with_and_aclose_close_the_store(tmp_path: Path) -> None:
    with ChromaStore(path=tmp_path / "a") as store:
        _used(store)
    assert store.closed and str(tmp_path / "a") not in _systems()
    other = ChromaStore(path=tmp_path / "b")
    asyncio.run(other.aclose())
    assert other.closed and str(tmp_path / "b") not in _systems()


def test_a_store_on_your_client_leaves_the_client_open(tmp_path: Path) -> None:
    client = chromadb.PersistentClient(
        path=str(tmp_path), settings=Settings(anonymized_telemetry=False)
    )
    store = ChromaStore(client=client)
    _used(store)
    store.close()
    with pytest.raises(StorageError, match=r"^The Chroma store 'keel' \(client=\) was closed"):
        store.get(("memories", "acme", "u1"), "k")
    assert ChromaStore(client=client).get(("memories", "acme", "u1"), "k") is not None
    client.close()  # type: ignore[attr-defined]


def test_a_store_that_does_not_open_holds_nothing_open(tmp_path: Path) -> None:
    ChromaStore(path=tmp_path, index=_index()).close()  # records the model
    before = _fds()
    for _ in range(3):
        with pytest.raises(UserError, match="was built with embedding model"):
            ChromaStore(path=tmp_path, index=_index(lambda ts: [[1.0, 0.0] for _ in ts]))
    assert str(tmp_path) not in _systems()
    assert _fds() <= before + SLACK


def test_an_operation_in_flight_ends_before_its_client_closes(tmp_path: Path) -> None:
    client = chromadb.PersistentClient(
        path=str(tmp_path), settings=Settings(anonymized_telemetry=False)
    )
    life = Lifetime(client, owned=True, where=f"'keel' at {tmp_path}")
    with life.using() as using:
        life.close()  # say, from the event loop, while a worker thread runs a batch
        assert life.closed
        assert using.get_or_create_collection("col").count() == 0  # the client still works
        with pytest.raises(StorageError, match="was closed"):
            life.refuse_closed()
    assert str(tmp_path) not in _systems()  # closed as that operation ended


@pytest.fixture(scope="module")
def chroma_url(tmp_path_factory: pytest.TempPathFactory, chroma_server: Any) -> Iterator[str]:
    with chroma_server(tmp_path_factory.mktemp("chroma-server")) as server:
        yield server.url


def test_a_store_on_a_server_gives_its_client_back(chroma_url: str) -> None:
    ChromaStore(url=chroma_url, name="warm").close()
    systems, before = len(_systems()), _fds()
    stores = [ChromaStore(url=chroma_url, name=f"s{i}", index=_index()) for i in range(3)]
    for store in stores:
        _used(store)
    assert len(_systems()) >= systems + 3  # each HTTP client's Systems, cached by chromadb
    assert _fds() >= before + 3  # and its sockets
    for store in stores:
        store.close()
    assert len(_systems()) == systems
    assert _fds() <= before + SLACK
    with pytest.raises(StorageError, match=f"^The Chroma store 's0' on {chroma_url} was closed"):
        stores[0].get(("memories", "acme", "u1"), "k")


def test_a_server_that_does_not_answer_leaves_no_client_behind() -> None:
    """chromadb's `HttpClient` asks the server before it registers its admin client's alias,
    and gives its references back when that fails: nothing for keel to close."""
    systems = len(_systems())
    for _ in range(3):
        with pytest.raises(SetupError, match="Cannot reach a Chroma server"):
            ChromaStore(url="http://127.0.0.1:9")
    assert len(_systems()) == systems


def test_pin_chromadb_an_http_clients_close_keeps_a_system_and_its_sockets(
    chroma_url: str,
) -> None:
    """chromadb 1.5: `HttpClient.close()` leaves the System its admin client registered under
    a fresh id in the class-level cache, and closes neither HTTP session (their sockets stay
    open): why `keel.memory._open.close_client` does both. If this fails, chromadb fixed it."""
    before = _systems()
    host, _, port = chroma_url.removeprefix("http://").partition(":")
    client = chromadb.HttpClient(
        host=host, port=int(port), settings=Settings(anonymized_telemetry=False)
    )
    client.heartbeat()
    sessions = [client._server._session, client._admin_client._server._session]  # type: ignore[attr-defined]
    client.close()  # type: ignore[attr-defined]
    left = _systems() - before
    assert len(left) == 1
    assert not any(s.is_closed for s in sessions)
    for s in sessions:
        s.close()
    SharedSystemClient._identifier_to_system.pop(left.pop())


def test_readiness_checks_of_chroma_hold_nothing_open(chroma_url: str, tmp_path: Path) -> None:
    from keel.app.health import readiness, served_readiness

    ChromaStore(path=tmp_path / "warm").close()
    folder = tmp_path / "chroma"
    store = ChromaStore(path=folder)  # a store open on the folder the probe checks
    _used(store)
    systems, before = _systems(), _fds()
    for _ in range(5):  # a probe every few seconds
        assert served_readiness(chroma=[chroma_url]).ok
        checks = readiness(db="sqlite:///:memory:", chroma=folder).checks
        assert next(c for c in checks if c.name == "chroma").ok
    assert _systems() == systems
    assert _fds() <= before + SLACK
    _used(store)  # the probe's close left the store's own reference
    store.close()
    assert str(folder) not in _systems()


SERVER_CONFIG = """
[[users]]
token = "t"
user = "alice"
tenant = "acme"

[tenants.acme]
memory = {{ chroma_url = "{chroma}", collection = "served", index = "test_memory_close:_index" }}

[tenants.acme.agents.main]
model = "keel:demo"
"""


def test_the_servers_shutdown_closes_the_tenants_chroma_stores(
    chroma_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`keel.app.http:app`'s lifespan (LangGraph server runs it) closes the tenants' stores."""
    from keel.app import server
    from keel.app.http import app
    from keel.app.server_config import server_config

    path = tmp_path / "server.toml"
    path.write_text(SERVER_CONFIG.format(chroma=chroma_url), encoding="utf-8")
    monkeypatch.setenv("KEEL_SERVER_CONFIG", str(path))
    config = server_config()
    served = server._store(config, config.tenant("acme"))
    systems = len(_systems())

    async def serve() -> None:
        async with app.router.lifespan_context(app):  # the server starts, runs, stops
            assert served is not None
            await served.aput(("memories", "acme", "alice"), "k", {"text": "tea"})
            assert len(_systems()) > systems  # its Chroma client is open

    asyncio.run(serve())
    assert len(_systems()) == systems
    assert served is not None
    closed = r"^The Chroma store 'served' on \S+ was closed \(the server is shutting down\)"
    with pytest.raises(StorageError, match=closed):
        served.get(("memories", "acme", "alice"), "k")


def test_every_spelling_of_a_folder_shares_one_system(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """chromadb keys its shared System by the path string as given: keel resolves the path, so
    a relative path, a trailing slash, `./` and a symlink open one engine on one folder (two
    would be two writers, which Chroma does not support)."""
    ChromaStore(path=tmp_path / "warm").close()
    before = _fds()
    folder = tmp_path / "m"
    (tmp_path / "link").symlink_to(folder, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    spellings: list[str | Path] = [folder, "m", "m/", "./m", tmp_path / "link", "link/../m"]
    stores = [ChromaStore(path=p, index=_index()) for p in spellings]
    assert str(folder) in _systems()
    assert not _systems() & {"m", "m/", "./m", str(tmp_path / "link"), "link/../m"}
    assert len({id(s.client._system) for s in stores}) == 1  # type: ignore[attr-defined]
    assert {s.path for s in stores} == {str(folder)}
    _used(stores[1])  # written through "m", read through each other spelling
    for store in stores:
        assert store.get(("memories", "acme", "u1"), "k") is not None
    for store in stores[:-1]:
        store.close()
    assert str(folder) in _systems()  # the last store still holds the folder's system
    assert stores[-1].search(("memories", "acme", "u1"), query="tea")[0].key == "k"
    stores[-1].close()
    assert str(folder) not in _systems()
    assert _fds() <= before + SLACK


def test_a_path_under_the_home_folder_is_there_not_in_a_folder_named_tilde(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ChromaStore(path="~/mem")` opened a folder literally named `~` in the working folder
    (`os.path.realpath` does not expand `~`), where the user never looks for their memories."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    with ChromaStore(path="~/mem", index=_index()) as store:
        _used(store)
        assert store.path == str(home / "mem")
    with ChromaStore(path=Path("~") / "mem", index=_index()) as again:  # a Path too
        assert again.get(("memories", "acme", "u1"), "k") is not None
    assert not (work / "~").exists()
