"""keel's health routes (`keel.app.http:app`) in process: each broken part is named, 503.

Against real parts only: a real PostgreSQL for what is up, free ports nobody listens on for what
is down. The routes on a real `langgraph dev` (and a Chroma server stopped under them) are in
test_server_parity.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port
from starlette.testclient import TestClient

from keel import Ledger, RunContext
from keel.app.http import app
from keel.db.runs import RunLog

pytestmark = pytest.mark.postgres

CONFIG = """
ledger = "{ledger}"

[[users]]
token = "t"
user = "alice"
tenant = "acme"

[tenants.acme]
memory = {{ chroma_url = "{chroma}" }}

[tenants.acme.agents.main]
model = "keel:demo"
"""


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> TestClient:
    for name in ("KEEL_DB_URL", "DATABASE_URI", "DATABASE_URL", "KEEL_SERVER_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    return TestClient(app)


def _config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ledger: str, chroma: str) -> None:
    path = tmp_path / f"server-{free_port()}.toml"  # a new path: server_config() caches by path
    path.write_text(CONFIG.format(ledger=ledger, chroma=chroma), encoding="utf-8")
    monkeypatch.setenv("KEEL_SERVER_CONFIG", str(path))


def test_live_answers_and_ready_with_nothing_configured_checks_nothing(client: TestClient) -> None:
    live = client.get("/keel/health/live")
    assert (live.status_code, live.json()["ok"], live.json()["failing"]) == (200, True, [])
    ready = client.get("/keel/health/ready")
    assert (ready.status_code, ready.json()["checks"]) == (200, [])


def test_langgraph_devs_in_memory_database_is_not_checked(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pinned: `langgraph dev` sets DATABASE_URI=":memory:" (its threads are in memory)."""
    monkeypatch.setenv("DATABASE_URI", ":memory:")
    ready = client.get("/keel/health/ready")
    assert (ready.status_code, ready.json()["checks"]) == (200, [])


def test_a_database_that_is_down_is_named(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, fresh_postgres_url: str
) -> None:
    monkeypatch.setenv(
        "DATABASE_URL", fresh_postgres_url.replace("postgresql", "postgresql+asyncpg")
    )
    assert client.get("/keel/health/ready").status_code == 200  # Aegra's SQLAlchemy-style URL
    down = f"postgresql://postgres:s3cret@127.0.0.1:{free_port()}/nope"
    monkeypatch.setenv("KEEL_DB_URL", down)  # wins over DATABASE_URL
    ready = client.get("/keel/health/ready")
    assert ready.status_code == 503
    assert ready.json()["failing"] == ["database"]
    assert "s3cret" not in ready.text  # the password is never shown


def test_the_ledger_and_chroma_of_the_server_config_are_checked(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fresh_postgres_url: str
) -> None:
    chroma = f"http://127.0.0.1:{free_port()}"
    _config(tmp_path, monkeypatch, fresh_postgres_url, chroma)
    ready = client.get("/keel/health/ready")
    assert ready.status_code == 503
    body = ready.json()
    assert [(c["name"], c["ok"]) for c in body["checks"]] == [("ledger", True), ("chroma", False)]
    assert body["failing"] == ["chroma"]
    down = f"postgresql://postgres@127.0.0.1:{free_port()}/nope"
    _config(tmp_path, monkeypatch, down, chroma)
    down_body = client.get("/keel/health/ready").json()
    assert down_body["failing"] == ["ledger", "chroma"]
    # a probe answers with the reason at once, not after the ledger pool's 10 s of retries
    # (a kubelet gives a readiness probe 1 s by default)
    ledger = down_body["checks"][0]
    assert "Connection refused" in ledger["detail"], ledger
    assert "pool initialization" not in ledger["detail"], ledger


def test_a_server_config_that_cannot_be_read_is_not_ready(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KEEL_SERVER_CONFIG", str(tmp_path / "missing.toml"))
    ready = client.get("/keel/health/ready")
    assert ready.status_code == 503
    assert ready.json()["failing"] == ["config"]
    assert "does not exist" in ready.json()["checks"][0]["detail"]


def test_the_semantic_check_without_a_model_is_503_with_why(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KEEL_HEALTH_MODEL", raising=False)
    monkeypatch.delenv("KEEL_MODEL", raising=False)
    monkeypatch.setenv("KEEL_HEALTH_TOKEN", "s3cret")
    token = {"Authorization": "Bearer s3cret"}
    semantic = client.get("/keel/health/semantic", headers=token)
    assert semantic.status_code == 503
    assert "no model configured for the semantic check" in semantic.json()["checks"][0]["detail"]
    monkeypatch.setenv("KEEL_HEALTH_MODEL", "keel:demo")  # a model that answers something else
    wrong = client.get("/keel/health/semantic", headers=token)
    assert wrong.status_code == 503 and wrong.json()["failing"] == ["semantic"]


def test_the_semantic_check_spends_model_calls_only_for_the_health_token(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Anyone who can reach the route could otherwise run up the model's bill."""
    monkeypatch.setenv("KEEL_HEALTH_MODEL", "keel:demo")
    monkeypatch.delenv("KEEL_HEALTH_TOKEN", raising=False)
    closed = client.get("/keel/health/semantic", headers={"Authorization": "Bearer anything"})
    assert closed.status_code == 403
    assert "set KEEL_HEALTH_TOKEN" in closed.json()["checks"][0]["detail"]
    monkeypatch.setenv("KEEL_HEALTH_TOKEN", "s3cret")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
        refused = client.get("/keel/health/semantic", headers=headers)
        assert refused.status_code == 401, headers
        assert "s3cret" not in refused.text
    # the token opens it (the scripted demo model answers the wrong sum: 503, but it ran)
    ran = client.get("/keel/health/semantic", headers={"Authorization": "Bearer s3cret"})
    assert ran.status_code == 503 and "semantic" in ran.json()["failing"]
    assert "KEEL_HEALTH_TOKEN" not in ran.json()["checks"][0]["detail"]
    # live and ready stay open to probes
    assert client.get("/keel/health/live").status_code == 200


def test_a_token_with_non_ascii_bytes_is_refused_not_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found by attack: `hmac.compare_digest` raises TypeError on a str with a non-ASCII
    character, so a header `Bearer \xe9` (or any token while KEEL_HEALTH_TOKEN was not ASCII)
    was a 500 with a traceback in the server log, not a 401."""
    monkeypatch.setenv("KEEL_HEALTH_MODEL", "keel:demo")
    client = TestClient(app, raise_server_exceptions=False)
    for token, sent in (("s3cret", "\xe9t\xe9"), ("s\xe9cret", "wrong")):
        monkeypatch.setenv("KEEL_HEALTH_TOKEN", token)
        header = [(b"authorization", f"Bearer {sent}".encode())]
        assert client.get("/keel/health/semantic", headers=header).status_code == 401, sent
    # a UTF-8 token opens it when the client sends its UTF-8 bytes
    header = [(b"authorization", "Bearer s\xe9cret".encode())]
    ran = client.get("/keel/health/semantic", headers=header)
    assert ran.status_code == 503 and "semantic" in ran.json()["failing"]


def test_the_servers_shutdown_closes_the_ledger_its_graphs_use(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fresh_postgres_url: str
) -> None:
    """`keel.app.http:app`'s lifespan (LangGraph server runs it) closes the served ledger's
    pools: before, its PostgreSQL connections stayed open until the process died."""
    from keel.app import server
    from keel.app.server_config import server_config
    from keel.errors import StorageError

    _config(tmp_path, monkeypatch, fresh_postgres_url, f"http://127.0.0.1:{free_port()}")
    ledger = server._ledger(server_config())  # the one the served graphs share
    assert ledger is not None
    pools: list[Any] = []

    async def serve() -> None:
        async with app.router.lifespan_context(app):  # the server starts, runs, stops
            await ledger.asetup()  # a served run opens the ledger's async pool
            pools.extend(ledger._apools.values())
            assert pools[0] is not None and not pools[0].closed

    asyncio.run(serve())
    assert ledger.closed and pools[0].closed
    with pytest.raises(StorageError, match="was closed"):
        ledger.run(_one())


def _one() -> Any:
    rows = yield "SELECT 1", ()
    return rows


def test_the_server_started_again_in_the_process_runs_on_a_fresh_ledger(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fresh_postgres_url: str
) -> None:
    """The app's lifespan run twice in one process (tests; an ASGI server that reloads): the
    second start's graphs run on a ledger of their own. Before, the factories' cache kept the
    ledger the first shutdown closed, and every run of the second ended on a closed ledger."""
    from test_canary import _runtime

    from keel.app import server
    from keel.app.server_config import server_config

    _config(tmp_path, monkeypatch, fresh_postgres_url, f"http://127.0.0.1:{free_port()}")
    ledgers: list[Any] = []

    async def serve() -> Any:
        async with app.router.lifespan_context(app):  # the server starts, runs a graph, stops
            agent = server.agent({}, _runtime("alice"))
            ledgers.append(server._ledger(server_config()))
            return await agent.ainvoke(
                {"messages": [("user", "Where is order A1001?")]},
                context=RunContext(user_id="alice", tenant_id="acme", roles=("support",)),
            )

    first, second = asyncio.run(serve()), asyncio.run(serve())
    assert first["outcome"]["terminated_reason"] == "completed", first["outcome"]
    assert second["outcome"] == {**first["outcome"], "detail": second["outcome"]["detail"]}
    ledger = Ledger(fresh_postgres_url)
    assert len(RunLog(ledger).query()) == 2  # the second run's record too
    ledger.close()
    assert ledgers[0] is not ledgers[1] and ledgers[0].closed and ledgers[1].closed
    assert not server_config().cache  # nothing of the stopped server is kept for the next
