"""Servers for the e2e tests and the throughput bench: `langgraph dev` and an Aegra cluster.

- `serving_dev`: `keel serve` (`langgraph dev`, in memory) on a free port.
- `serving_aegra`: Aegra replicas in their own Python 3.12 venv (`make aegra-venv`,
  `.venv-aegra`): one API-only replica that runs Aegra's migrations and `workers` worker replicas,
  on a fresh PostgreSQL database, one Redis database index, a queue and channel prefix of their
  own, and the given leases. `aegra.json` comes from `keel.app.aegra.write_aegra_config`.

Each process runs in its own process group and is stopped (SIGTERM, then SIGKILL) on exit.
A port found free can be taken by another process before the server listens on it: a server
whose log says so, or whose port another process listens on (`PortTaken`), is started again on
another free port (`serving_on_a_free_port`), and a server counts as ready only when the answer
came from a socket of its own process group (not from whoever took the port).

`client` and `sdk_client` are the tests' HTTP and LangGraph SDK clients, sharing one TLS context:
httpx reads the certificate store anew for each client it makes (~25-80 ms each, a test's
setup time when it makes five).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest
from langgraph_sdk._shared.utilities import NOT_PROVIDED, _get_headers
from langgraph_sdk.client import LangGraphClient
from psycopg import sql

from keel.app.aegra import replica_env, write_aegra_config

ROOT = Path(__file__).resolve().parents[1]
SERVER_CONFIG = ROOT / "tests" / "serve" / "keel-server.toml"
AEGRA_PYTHON = Path(os.environ.get("KEEL_AEGRA_PYTHON", ROOT / ".venv-aegra" / "bin" / "python"))
"""The Python of the Aegra venv (`make aegra-venv`)."""
REDIS_URL = os.environ.get("KEEL_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
"""The Redis database the Aegra clusters queue runs in (each cluster's keys carry its own prefix,
so clusters sharing a database do not see each other's runs)."""
NEED_AEGRA = f"the Aegra tests need {AEGRA_PYTHON} (make aegra-venv)"
TEST_LEASES = {
    "LEASE_DURATION_SECONDS": "9",
    "HEARTBEAT_INTERVAL_SECONDS": "4",
    "REAPER_INTERVAL_SECONDS": "3",
}


_TLS = httpx.create_ssl_context()
"""The clients' TLS context (the servers are plain http; httpx wants one per transport)."""


def client(url: str, *, headers: Mapping[str, str] | None = None, timeout: float = 60) -> Any:
    """`httpx.AsyncClient(base_url=url, headers=..., timeout=...)` with the shared TLS context."""
    return httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout, verify=_TLS)


def sdk_client(
    url: str, headers: Mapping[str, str], timeout: float | None = None
) -> LangGraphClient:
    """`langgraph_sdk.get_client(url=url, headers=headers, timeout=timeout)` made as it makes
    it (its headers, a transport that retries 5 times), with the shared TLS context."""
    return LangGraphClient(
        httpx.AsyncClient(
            base_url=url,
            transport=httpx.AsyncHTTPTransport(retries=5, verify=_TLS),
            timeout=(  # get_client's default without one
                httpx.Timeout(connect=5, read=300, write=300, pool=5)
                if timeout is None
                else httpx.Timeout(timeout)
            ),
            headers=_get_headers(NOT_PROVIDED, headers),
        )
    )


class ServerFailed(RuntimeError):
    """A server exited or did not answer in time (the message carries its log)."""


class PortTaken(ServerFailed):
    """The server could not listen on its port: another process took it after `free_port`."""


_PORT_TAKEN = re.compile(
    r"address already in use"  # uvicorn (Aegra): "[Errno 98] error while attempting to bind"
    r"|Port \d+ is already in use",  # `langgraph dev`: "..., using port N instead" (elsewhere)
    re.IGNORECASE,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def aegra_missing() -> str | None:
    """Why the Aegra cluster cannot start here (no venv, no Redis), or None."""
    if not AEGRA_PYTHON.is_file():
        return NEED_AEGRA
    parts = urlsplit(REDIS_URL)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), 2) as s:
            s.sendall(b"PING\r\n")
            if not s.recv(16).startswith(b"+PONG"):
                return f"the Aegra tests need Redis at {REDIS_URL} (KEEL_TEST_REDIS_URL)"
    except OSError as exc:
        return f"the Aegra tests need Redis at {REDIS_URL} (KEEL_TEST_REDIS_URL): {exc}"
    return None


def need_aegra_venv() -> None:
    """Skip without the Aegra venv, except in CI, where it is a failure."""
    _need(None if AEGRA_PYTHON.is_file() else NEED_AEGRA)


def need_aegra() -> None:
    """Skip without the Aegra venv or Redis, except in CI (`CI=true`), where it is a failure."""
    _need(aegra_missing())


def _need(missing: str | None) -> None:
    if missing is not None:
        if os.environ.get("CI", "").strip().lower() in ("true", "1"):
            pytest.fail(missing, pytrace=False)
        pytest.skip(missing)


@contextmanager
def fresh_database(base_url: str, prefix: str) -> Iterator[str]:
    """A new PostgreSQL database `<prefix>_<hex>` beside `base_url`'s; dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield urlsplit(base_url)._replace(path=f"/{name}").geturl()
    finally:
        with psycopg.connect(base_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@dataclass
class Process:
    """A started server process and its log."""

    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    terminated: bool = False
    """SIGTERM sent (once: a second one makes uvicorn skip its graceful shutdown)."""

    def terminate(self) -> None:
        """SIGTERM, once, without waiting (`stop()` waits)."""
        if self.proc.poll() is None and not self.terminated:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.terminated = True

    def stop(self) -> None:
        """SIGTERM (unless sent), then wait up to 15 s for it to exit; else SIGKILL."""
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)

    def kill(self) -> None:
        """SIGKILL: no drain, no lease release (what a crashed machine does)."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


def stop_all(processes: list[Process]) -> None:
    """Stop `processes` together: SIGTERM to each, then wait for each (their shutdowns overlap)."""
    for process in processes:
        process.terminate()
    for process in processes:
        process.stop()


def start(cmd: list[str], *, cwd: Path, env: Mapping[str, str], log: Path) -> Process:
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=dict(env),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Process(proc, log)


def wait_ready(url: str, process: Process, path: str = "/ok", seconds: float = 120) -> None:
    """Until `process` answers `url` + `path` with 200 from a socket of its own.

    Raises `PortTaken` once its log says its port was taken or another process listens on it
    (the server cannot bind it then: `langgraph dev` moves elsewhere, uvicorn exits, after
    their start-up), `ServerFailed` when it exits or does not answer within `seconds`. Asks
    nothing before a socket listens on the port (with /proc), so never waits on another's."""
    port = urlsplit(url).port
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _PORT_TAKEN.search(process.text()):
            raise PortTaken(f"the port of {url} was taken:\n{process.text()}")
        if process.proc.poll() is not None:
            raise ServerFailed(f"server exited with {process.proc.returncode}:\n{process.text()}")
        inodes = None if port is None else _listeners(port)
        mine = None if inodes is None else _holds(process, inodes)
        if inodes and not mine:
            raise PortTaken(f"another process listens on the port of {url}:\n{process.text()}")
        if mine is not False and _answers(f"{url}{path}"):
            return
        time.sleep(0.05)
    raise ServerFailed(f"server did not answer {url}{path} within {seconds} s:\n{process.text()}")


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _listeners(port: int) -> set[str] | None:
    """The sockets listening on TCP `port` (IPv4, any address), as `socket:[inode]`; None: no
    /proc."""
    try:
        table = Path("/proc/net/tcp").read_text()
    except OSError:
        return None
    hexport = f"{port:04X}"
    return {
        f"socket:[{fields[9]}]"
        for fields in (line.split() for line in table.splitlines()[1:])
        if fields[1].endswith(f":{hexport}") and fields[3] == "0A"  # 0A: LISTEN
    }


def listens(process: Process, port: int) -> bool | None:
    """Whether a process of `process`'s group listens on 127.0.0.1:`port` (None: no /proc)."""
    inodes = _listeners(port)
    return None if inodes is None else _holds(process, inodes)


def _holds(process: Process, inodes: set[str]) -> bool:
    """Whether a process of `process`'s group holds one of the sockets `inodes`."""
    if not inodes:
        return False
    for pid in _group(process.pid):
        with contextlib.suppress(OSError):  # (a process that ended meanwhile)
            if any(os.readlink(fd) in inodes for fd in Path(f"/proc/{pid}/fd").iterdir()):
                return True
    return False


def _group(pgid: int) -> list[int]:
    """The processes of process group `pgid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.getpgid(int(entry.name)) == pgid:
                    found.append(int(entry.name))
    return found


def serving_on_a_free_port(
    launch: Callable[[int], Process], path: str, *, attempts: int = 3
) -> tuple[str, Process]:
    """`launch(port)` on a free port; its URL once it answers `path` (`wait_ready`).

    A launch whose port was taken meanwhile (`PortTaken`) is stopped and made again on another
    free port, up to `attempts` in all; any other failure is raised at once."""
    port = free_port()
    return ready_or_again(launch, port, launch(port), path, attempts=attempts)


def ready_or_again(
    launch: Callable[[int], Process], port: int, process: Process, path: str, *, attempts: int = 3
) -> tuple[str, Process]:
    """`process` (launched on `port`) once ready; relaunched elsewhere if its port was taken."""
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, path)
    except PortTaken:
        process.stop()
        if attempts <= 1:
            raise
        return serving_on_a_free_port(launch, path, attempts=attempts - 1)
    return url, process


def _base_env(ledger_url: str, extra_env: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LANGSMITH_")}
    env["KEEL_LEDGER_URL"] = ledger_url
    # scripted models and tools: tests/serve/e2e_models (admission), serve.parity_models, ...
    env["PYTHONPATH"] = os.pathsep.join(
        p
        for p in (str(ROOT / "tests" / "serve"), str(ROOT / "tests"), env.get("PYTHONPATH", ""))
        if p
    )
    return {**env, **(extra_env or {})}


@contextmanager
def serving_dev(
    workdir: Path,
    ledger_url: str,
    *,
    config: Path | None = None,
    server_config: Path | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> Iterator[tuple[str, Process]]:
    """`keel serve` on a free port from `workdir`; the URL once `/ok` answers."""
    keel = str(Path(sys.executable).with_name("keel"))
    env = _base_env(ledger_url, extra_env)

    def launch(port: int) -> Process:
        cmd = [keel, "serve", "--server-config", str(server_config or SERVER_CONFIG)]
        cmd += ["--port", str(port), "--config", str(config or ROOT / "langgraph.json")]
        return start(cmd, cwd=workdir, env=env, log=workdir / "server.log")

    launched: list[Process] = []

    def launch_kept(port: int) -> Process:
        launched.append(launch(port))
        return launched[-1]

    try:
        url, process = serving_on_a_free_port(launch_kept, "/ok")
        yield url, process
    finally:
        stop_all(launched)
        if os.environ.get("KEEL_SHOW_SERVER_LOG") and launched:
            print(launched[-1].text())


@dataclass
class AegraCluster:
    """An API-only replica (`url`) and worker replicas sharing one database and one Redis."""

    url: str
    api: Process
    workers: list[Process] = field(default_factory=list)

    def logs(self) -> str:
        parts = [f"--- api\n{self.api.text()}"]
        parts += [f"--- worker {w.pid}\n{w.text()}" for w in self.workers]
        return "\n".join(parts)


@contextmanager
def serving_aegra(
    workdir: Path,
    postgres_url: str,
    ledger_url: str,
    *,
    workers: int = 2,
    server_config: Path | None = None,
    leases: Mapping[str, str] = TEST_LEASES,
    extra_env: Mapping[str, str] | None = None,
) -> Iterator[AegraCluster]:
    """An Aegra cluster on a fresh database (`keel_aegra_<hex>`); stopped and dropped after."""
    server_config = server_config or SERVER_CONFIG
    base = _base_env(ledger_url, extra_env)
    # the server config names ${KEEL_LEDGER_URL} (and maybe others of extra_env)
    saved = {name: os.environ.get(name) for name in base}
    os.environ.update(base)
    try:
        aegra_json = write_aegra_config(workdir, server_config)
    finally:
        for name, value in saved.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value
    prefix = f"keel-test-{uuid.uuid4().hex[:8]}"
    with ExitStack() as stack:
        database_url = stack.enter_context(fresh_database(postgres_url, "keel_aegra"))
        launched: list[Process] = []
        stack.callback(stop_all, launched)  # before the database is dropped

        def replica(name: str, n_workers: int, migrate: bool) -> Callable[[int], Process]:
            env = {
                **base,
                **replica_env(
                    aegra_json=aegra_json,
                    server_config_path=server_config,
                    database_url=database_url,
                    redis_url=REDIS_URL,
                    workers=n_workers,
                    migrate=migrate,
                ),
                **leases,
                "WORKER_QUEUE_KEY": f"{prefix}:jobs",
                "REDIS_CHANNEL_PREFIX": f"{prefix}:run:",
                "LOG_LEVEL": "WARNING",
            }

            def launch(port: int) -> Process:
                cmd = [str(AEGRA_PYTHON), "-m", "uvicorn", "aegra_api.main:app"]
                cmd += ["--host", "127.0.0.1", "--port", str(port)]
                process = start(cmd, cwd=workdir, env=env, log=workdir / f"{name}.log")
                launched.append(process)
                return process

            return launch

        # migrations done before the workers start
        url, api = serving_on_a_free_port(replica("api", 0, True), "/health")
        cluster = AegraCluster(url=url, api=api)
        try:
            started = []
            for i in range(workers):  # started together, then waited for
                launch, port = replica(f"worker{i}", 1, False), free_port()
                started.append((launch, port, launch(port)))
            cluster.workers += [process for _, _, process in started]
            for i, (launch, port, process) in enumerate(started):
                _, cluster.workers[i] = ready_or_again(launch, port, process, "/health")
        except ServerFailed:
            raise ServerFailed(cluster.logs()) from None
        try:
            yield cluster
        finally:
            if os.environ.get("KEEL_SHOW_SERVER_LOG"):
                print(cluster.logs())


def slow_tools_schema() -> str:
    """The tables `tests/serve/slow_tools.py` records attempts and effects in."""
    return (
        "CREATE TABLE IF NOT EXISTS attempts (job text NOT NULL, pid int NOT NULL);"
        "CREATE TABLE IF NOT EXISTS effects (job text NOT NULL, pid int NOT NULL)"
    )
