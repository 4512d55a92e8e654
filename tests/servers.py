"""Servers for the e2e tests and the throughput bench: `langgraph dev` and an Aegra cluster.

- `serving_dev`: `keel serve` (`langgraph dev`, in memory) on a free port.
- `serving_aegra`: Aegra replicas in their own Python 3.12 venv (`make aegra-venv`,
  `.venv-aegra`): one API-only replica that runs Aegra's migrations and `workers` worker replicas,
  on a fresh PostgreSQL database, one Redis database index, a queue and channel prefix of their
  own, and the given leases. `aegra.json` comes from `keel.app.aegra.write_aegra_config`.

Each process runs in its own process group and is stopped (SIGTERM, then SIGKILL) on exit.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest
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


class ServerFailed(RuntimeError):
    """A server exited or did not answer in time (the message carries its log)."""


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

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)

    def kill(self) -> None:
        """SIGKILL: no drain, no lease release (what a crashed machine does)."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


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
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.proc.poll() is not None:
            raise ServerFailed(f"server exited with {process.proc.returncode}:\n{process.text()}")
        try:
            if httpx.get(f"{url}{path}", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise ServerFailed(f"server did not answer {url}{path} within {seconds} s:\n{process.text()}")


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
    port = free_port()
    keel = str(Path(sys.executable).with_name("keel"))
    cmd = [keel, "serve", "--server-config", str(server_config or SERVER_CONFIG)]
    cmd += ["--port", str(port), "--config", str(config or ROOT / "langgraph.json")]
    env = _base_env(ledger_url, extra_env)
    process = start(cmd, cwd=workdir, env=env, log=workdir / "server.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process)
        yield url, process
    finally:
        process.stop()
        if os.environ.get("KEEL_SHOW_SERVER_LOG"):
            print(process.text())


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

        def replica(name: str, n_workers: int, migrate: bool) -> tuple[str, Process]:
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
            port = free_port()
            cmd = [str(AEGRA_PYTHON), "-m", "uvicorn", "aegra_api.main:app"]
            cmd += ["--host", "127.0.0.1", "--port", str(port)]
            process = start(cmd, cwd=workdir, env=env, log=workdir / f"{name}.log")
            stack.callback(process.stop)
            return f"http://127.0.0.1:{port}", process

        url, api = replica("api", 0, True)
        cluster = AegraCluster(url=url, api=api)
        try:
            wait_ready(url, api, "/health")  # migrations done before the workers start
            started = [replica(f"worker{i}", 1, False) for i in range(workers)]  # start together
            cluster.workers += [process for _, process in started]
            for worker_url, process in started:
                wait_ready(worker_url, process, "/health")
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
