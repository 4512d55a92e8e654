"""The test servers' start (`tests/servers.py`): a port found free and then taken by another
process before the server listens on it.

`langgraph dev` would then move to another port of its own choosing (it logs "Port N is already
in use, using port M instead"), and uvicorn (Aegra) exit ("address already in use") once
started up. Seen as soon as another process listens on the port (or the log says so), the
server is started again on another free port; and whoever took the port (here an HTTP server
that answers 200 to everything) is never taken for the server. A server that fails
for any other reason is not started again. The port is taken for real: `free_port` hands out
a port something already listens on, once.
"""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import servers


class _Answers200(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def _someone_elses_http_server() -> Iterator[int]:
    """An HTTP server on a free port that answers 200 to every GET (another test's server)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answers200)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def _a_listening_socket() -> Iterator[int]:
    """A port something listens on (and never answers)."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        yield taken.getsockname()[1]


def _first_port_taken(monkeypatch: pytest.MonkeyPatch, taken: int | None) -> list[int]:
    """`servers.free_port` gives `taken` first (if any), then free ports; the ports it gave."""
    given: list[int] = []
    real: Callable[[], int] = servers.free_port

    def free_port() -> int:
        given.append(taken if taken is not None and not given else real())
        return given[-1]

    monkeypatch.setattr(servers, "free_port", free_port)
    return given


@pytest.fixture
def ledger_url(postgres_url: str) -> Iterator[str]:
    with servers.fresh_database(postgres_url, "keel_serve") as url:
        yield url


def test_a_dev_server_whose_port_was_taken_starts_again_on_another(
    tmp_path: Path, ledger_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with _someone_elses_http_server() as taken:
        given = _first_port_taken(monkeypatch, taken)
        with servers.serving_dev(tmp_path, ledger_url) as (url, process):
            port = urlsplit(url).port
            assert port is not None and port != taken and given == [taken, port]
            assert httpx.get(f"{url}/ok", timeout=10).status_code == 200
            assert servers.listens(process, port) and not servers.listens(process, taken)


def test_an_aegra_replica_whose_port_was_taken_starts_again_on_another(
    tmp_path: Path, postgres_url: str, ledger_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    servers.need_aegra()
    with _a_listening_socket() as taken:
        given = _first_port_taken(monkeypatch, taken)
        with servers.serving_aegra(tmp_path, postgres_url, ledger_url, workers=1) as cluster:
            port = urlsplit(cluster.url).port
            assert port is not None and port != taken and given[:2] == [taken, port]
            assert httpx.get(f"{cluster.url}/health", timeout=10).status_code == 200
            assert servers.listens(cluster.api, port)
            assert len(given) == 3 and len(cluster.workers) == 1  # the worker's port was free


def test_a_server_that_fails_otherwise_is_not_started_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A served SQLite ledger is refused: the server exits at once, and that is the failure."""
    given = _first_port_taken(monkeypatch, None)
    sqlite = f"sqlite:///{tmp_path}/keel.db"
    with pytest.raises(servers.ServerFailed) as failed, servers.serving_dev(tmp_path, sqlite):
        pass
    assert not isinstance(failed.value, servers.PortTaken)
    assert "a served ledger must be PostgreSQL" in str(failed.value)
    assert len(given) == 1
