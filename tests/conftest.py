"""Shared fixtures: real databases, never mocks.

- `postgres_url`: the server named by `KEEL_TEST_POSTGRES_URL` (skipped without it, failed in CI).
- `fresh_postgres_url`: a new, empty database on that server, dropped after the test (made
  ahead and dropped behind by a background thread, `_Databases`).
- `db_url`: each test runs on SQLite (in `tmp_path`) and on PostgreSQL (ids "sqlite", "postgres").
- `ledger`: keel's ledger, set up, on `db_url`; `clock`: a fabricated clock moved by hand.
- `chroma_server`: starts a real Chroma server (`chroma run`) on a free port, offline.
- `forks`: a fork server with keel imported (`tests/forking.py`), one per worker: a process a
  test runs apart (or kills) is forked in milliseconds, not started as a fresh interpreter.
- `keel_command`: runs the `keel` console script as a user does, in a process forked likewise.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import psycopg
import pytest
from psycopg import sql

POSTGRES_ENV = "KEEL_TEST_POSTGRES_URL"
NEED_POSTGRES = (
    f"PostgreSQL tests need {POSTGRES_ENV} (e.g. postgresql://postgres@127.0.0.1:5432/test)"
)


def _no_postgres(reason: str) -> NoReturn:
    """Skip, except in CI (`CI=true` or `CI=1`), where a missing PostgreSQL is a failure."""
    if os.environ.get("CI", "").strip().lower() in ("true", "1"):
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def _admin(url: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(url, autocommit=True, connect_timeout=5)


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The base PostgreSQL URL, checked to be reachable once per session."""
    url = os.environ.get(POSTGRES_ENV, "").strip()
    if not url:
        _no_postgres(NEED_POSTGRES)
    try:
        _admin(url).close()
    except psycopg.OperationalError as exc:
        _no_postgres(f"{NEED_POSTGRES}; cannot connect to {POSTGRES_ENV}: {exc}")
    return url


class _Databases:
    """Fresh databases `keel_test_<hex>` on the test server, made one ahead and dropped behind.

    Each test still gets a new, empty database (from `template1`) and it is still dropped after
    the test; background threads do both, so the server creates the next test's database and
    drops the last one while a test runs (about 0.3 s a PostgreSQL test otherwise). Creating
    and dropping have a thread each: a drop waits for a checkpoint (a second or more while
    other work writes), a create does not, and the next test must not wait behind a drop. A
    drop that fails fails the next test that takes a database, or the session's end.
    """

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="keel-test-databases")
        self._dropper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="keel-test-drops")
        self._next = self._worker.submit(self._create)
        self._drops: list[Future[None]] = []

    def take(self) -> str:
        """A new database's URL; `give_back` it after the test."""
        for drop in [d for d in self._drops if d.done()]:
            self._drops.remove(drop)
            drop.result()  # a drop that failed is an error here
        name = self._next.result()
        self._next = self._worker.submit(self._create)
        return urlsplit(self.base_url)._replace(path=f"/{name}").geturl()

    def give_back(self, url: str) -> None:
        """Drop the database of `url` (in the background)."""
        self._drops.append(self._dropper.submit(self._drop, urlsplit(url).path.lstrip("/")))

    def close(self) -> None:
        """Drop the database made ahead, and wait for every drop."""
        self._drops.append(self._dropper.submit(self._drop, self._next.result()))
        self._worker.shutdown(wait=True)
        self._dropper.shutdown(wait=True)
        for drop in self._drops:
            drop.result()

    def _create(self) -> str:
        name = f"keel_test_{uuid.uuid4().hex[:12]}"
        with _admin(self.base_url) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return name

    def _drop(self, name: str) -> None:
        with _admin(self.base_url) as conn:
            drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
            conn.execute(drop.format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def _databases(postgres_url: str) -> Iterator[_Databases]:
    databases = _Databases(postgres_url)
    yield databases
    databases.close()


@pytest.fixture
def fresh_postgres_url(_databases: _Databases) -> Iterator[str]:
    """A new empty database `keel_test_<hex>` on the test server; dropped afterwards."""
    yield from _fresh_database(_databases)


@pytest.fixture(scope="module")
def module_postgres_url(_databases: _Databases) -> Iterator[str]:
    """`fresh_postgres_url`, shared by a module's tests (e.g. a served agents' ledger)."""
    yield from _fresh_database(_databases)


def _fresh_database(databases: _Databases) -> Iterator[str]:
    url = databases.take()
    try:
        yield url
    finally:
        databases.give_back(url)


@pytest.fixture(
    params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
    ids=["sqlite", "postgres"],
)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database URL for each backend: a file in `tmp_path`, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/keel.db"
    url: str = request.getfixturevalue("fresh_postgres_url")
    return url


@pytest.fixture
async def ledger(db_url: str) -> AsyncIterator[Any]:
    """keel's ledger on `db_url`, its tables created, closed after the test."""
    from keel import Ledger

    ledger = Ledger(db_url)
    await ledger.asetup()
    yield ledger
    await ledger.aclose()


class Clock:
    """A fabricated clock (`time.time` stand-in) the test moves by setting `now`."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    """A `Clock` at t = 1000 s."""
    return Clock()


def _chroma_systems() -> dict[str, Any]:
    """chromadb's started Chroma systems by path (or HTTP client id); {} before it is imported."""
    shared = sys.modules.get("chromadb.api.shared_system_client")
    return dict(shared.SharedSystemClient._identifier_to_system) if shared is not None else {}


@pytest.fixture(autouse=True)
def _chroma_left_open() -> Iterator[None]:
    """Stop the Chroma systems a test started and left open (a store it did not close).

    Each embedded path holds ~20 file descriptors and 7 threads until its last client closes;
    without this a worker ran past 1,800 descriptors. Tests close what their fixtures open
    (`ChromaStore.close()`); this catches the stores a test body opens and drops.
    """
    before = _chroma_systems()
    yield
    left = {k: s for k, s in _chroma_systems().items() if k not in before}
    if not left:
        return
    from chromadb.api import ServerAPI
    from chromadb.api.shared_system_client import SharedSystemClient

    for key in left:
        SharedSystemClient._identifier_to_system.pop(key, None)
        SharedSystemClient._identifier_to_refcount.pop(key, None)
    for system in {id(s): s for s in left.values()}.values():
        session = getattr(system.instance(ServerAPI), "_session", None)  # an HTTP client's
        if session is not None:
            session.close()
        with contextlib.suppress(AttributeError):  # stopped already
            system.stop()


@pytest.fixture(autouse=True)
def _no_real_model_calls() -> Iterator[None]:
    """No test may call a real model: only keel's test doubles run (see keel.evals)."""
    from keel.evals import forbid_model_requests

    with forbid_model_requests():
        yield


CHROMA = shutil.which("chroma", path=str(Path(sys.executable).parent)) or "chroma"


def eventually(check: Callable[[], bool], what: str, seconds: float = 60) -> None:
    """Poll `check` until it holds; fail after `seconds` (generous: the machine may be loaded).

    What a test waits for instead of sleeping: a fixed sleep passes before the thing happened
    on a slow machine and proves nothing (or fails)."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"timed out after {seconds} s waiting for {what}"
        time.sleep(0.02)


def ctrl_c_as_in_a_terminal() -> None:
    """For `subprocess.Popen(preexec_fn=...)`: SIGINT at its default in the child, so that its
    Python raises KeyboardInterrupt on Ctrl-C, as in a program started from a terminal.

    A test run that ignores SIGINT (`nohup`, `trap '' INT`, a background job, some CI runners)
    passes the ignore on to its children, and a Python started so installs no handler: the
    test's Ctrl-C was lost. (The `keel` command honours the shell's ignore, as Python does.)"""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def ctrl_c() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt in this process for the test (`_thread.interrupt_main`
    too), as in a terminal, even when the test run ignores SIGINT."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


async def until(check: Callable[[], bool], what: str, seconds: float = 60) -> None:
    """`eventually` on an event loop: the loop runs on between polls."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"timed out after {seconds} s waiting for {what}"
        await asyncio.sleep(0.02)


def free_port() -> int:
    """A TCP port nobody listens on now (loopback)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ChromaServer:
    """A `chroma run` process: its `url`; `stop()` ends it (the data stays in `path`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.url = f"http://127.0.0.1:{free_port()}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the server (again) on its port and wait for its heartbeat."""
        self.launch()
        self.wait()

    def launch(self) -> None:
        """Start the server (again) on its port; `wait()` for it (meanwhile start another)."""
        port = self.url.rpartition(":")[2]
        log = (self.path / "server.log").open("ab")
        self.proc = subprocess.Popen(
            [CHROMA, "run", "--path", str(self.path / "db"), "--port", port, "--host", "127.0.0.1"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, ANONYMIZED_TELEMETRY="False"),
            cwd=self.path,
        )
        log.close()

    def wait(self) -> None:
        """Until the launched server answers its heartbeat (30 s at most)."""
        assert self.proc is not None, "launch() the server first"
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/api/v2/heartbeat", timeout=1):
                    return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"chroma run did not start: {(self.path / 'server.log').read_text()}"
                    ) from None
                time.sleep(0.05)

    def stop(self) -> None:
        """Stop the server and wait for it to exit."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


@contextmanager
def _chroma_server(path: Path, *, wait: bool = True) -> Iterator[ChromaServer]:
    server = ChromaServer(path)
    try:
        server.launch()
        if wait:  # else the caller waits, once it has started what it would start meanwhile
            server.wait()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def chroma_server() -> Callable[..., AbstractContextManager[ChromaServer]]:
    """`with chroma_server(tmp_dir) as server:` a real Chroma server, telemetry off
    (`wait=False`: launched, not yet answering; call `server.wait()`)."""
    return _chroma_server


@pytest.fixture
def ls_keyed(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A local LangSmith stand-in (`tests/langsmith_stand_in.py`) and a key pointing at it."""
    from langsmith_stand_in import serve

    yield from serve(monkeypatch, "ls-test-key")


@pytest.fixture
def ls_keyless(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The same stand-in, with no LangSmith key in the environment."""
    from langsmith_stand_in import serve

    yield from serve(monkeypatch, None)


FORK_PRELOAD = (
    "langchain_core.messages",
    "langgraph.types",
    "keel.db.audit",  # what `import keel` loaded before its names loaded on first use
    "keel.db.ledger",
    "keel.db.persistence",
    "keel.db.runs",
    "keel.graphs",
    "keel.tools",
    "keel.evals.runner",  # (keel.evals' names, too, load on first use)
    "keel.evals.scripted",
    "keel.evals.chaos",
    "keel.guards",
    "keel.history",
)
"""What the `forks` server imports before it forks (and `forking.CHECKPOINTERS`, which keel
loads when first used). Not chromadb or onnxruntime: a process forked after their import
aborts as it exits."""


@pytest.fixture(scope="session")
def forks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A `forking.ForkServer` (`FORK_PRELOAD` imported, LangSmith tracing off), shared by the
    worker's tests: its children start with keel imported (~2 s each saved)."""
    from forking import CHECKPOINTERS, ForkServer

    env = {**os.environ, "LANGSMITH_TRACING": "false"}
    server = ForkServer((*FORK_PRELOAD, *CHECKPOINTERS), tmp_path_factory.mktemp("forks"), env)
    yield server
    server.close()


CLI_PRELOAD = (
    "keel_cli",
    "keel.app.cli",
    "keel.app.cli_db",
    "keel.app.cli_observe",
    "keel.app.cli_run",
    "keel.app.cli_serve",
    "langchain.agents",
)
"""What the `keel_command` server imports: the command and what its subcommands load when they
run. (Not onnxruntime: a process forked after its import aborts as it exits.)"""


@pytest.fixture(scope="session")
def keel_command(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., subprocess.CompletedProcess[str]]]:
    """`keel_command(*args, cwd=folder)`: `keel args` run as a user runs it (stdin /dev/null,
    no KEEL_MODEL, LangSmith off), its exit code, stdout and stderr. The console script itself,
    run in a process forked with keel's CLI imported (`tests/forking.py`), which ends as the
    command does (its interpreter's shutdown, atexit handlers and thread joins included)."""
    from forking import ForkServer

    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEEL_MODEL", "LANGSMITH_"))}
    env["LANGSMITH_TRACING"] = "false"
    server = ForkServer(CLI_PRELOAD, tmp_path_factory.mktemp("keel-forks"), env)
    keel = Path(sys.executable).with_name("keel")

    def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
        proc = server.start_script(keel, *args, cwd=cwd)
        code = proc.finish()
        return subprocess.CompletedProcess([str(keel), *args], code, *proc.output())

    yield run
    server.close()
