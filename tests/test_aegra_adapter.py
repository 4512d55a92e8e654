"""keel's Aegra adapter without a server: the generated aegra.json and shim, and the ways Aegra
calls keel differently from `langgraph dev` (headers dict, pydantic user, no user at assistant
creation, `namespace_prefix`, the run body not nested under `kwargs`). The served behaviour is
in test_server_e2e.py (parametrized over both servers) and test_aegra.py."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import servers
from langgraph.store.memory import InMemoryStore
from langgraph_sdk import Auth
from langgraph_sdk.runtime import _ExecutionRuntime
from pydantic import BaseModel, ConfigDict

from keel import UserError
from keel.app.aegra import SHIM_NAME, aegra_config, replica_env, write_aegra_config
from keel.app.server_config import CONFIG_ENV
from keel.errors import SetupError
from keel.identity import context_from_user, user_field, user_record

ROOT = Path(__file__).resolve().parents[1]
E2E_CONFIG = ROOT / "tests" / "serve" / "keel-server.toml"


class AegraUser(BaseModel):
    """What Aegra hands keel: a pydantic model, extra fields as attributes, not subscriptable."""

    model_config = ConfigDict(extra="allow")
    identity: str
    permissions: list[str] = []


def aegra_user(tenant: str = "acme", user: str = "alice") -> AegraUser:
    return AegraUser(**user_record(user_id=user, tenant_id=tenant, roles=["support"], policy="p"))


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONFIG_ENV, str(E2E_CONFIG))
    monkeypatch.setenv("KEEL_LEDGER_URL", "postgresql://nobody@127.0.0.1:1/unused")  # lazy


def test_aegra_json_names_files_and_scopes_memory_namespaces(served: None, tmp_path: Path) -> None:
    path = write_aegra_config(tmp_path, E2E_CONFIG)
    config = json.loads(path.read_text())
    assert config["graphs"] == {
        "agent": f"./{SHIM_NAME}:agent",
        "supervisor": f"./{SHIM_NAME}:supervisor",
    }
    assert config["auth"] == {"path": f"./{SHIM_NAME}:auth"}
    # both tenants' memory kinds, by the attributes Aegra reads off its user model
    assert config["store"]["scopes"] == {
        "globex-memories": ["tenant_id", "identity"],
        "memories": ["tenant_id", "identity"],
    }
    assert config["http"] == {"app": f"./{SHIM_NAME}:http_app"}


SHIM_CHECK = """
import importlib.util, json, sys
from fastapi import FastAPI, HTTPException
from fastapi.testclient import TestClient
spec = importlib.util.spec_from_file_location("shim_under_test", sys.argv[1])
shim = importlib.util.module_from_spec(spec)
spec.loader.exec_module(shim)
from keel.app import aegra, auth
app = shim.http_app
@app.get("/busy")
async def busy():
    raise HTTPException(status_code=429, detail="Overloaded", headers={"Retry-After": "3"})
client = TestClient(app)
live, busy = client.get("/keel/health/live"), client.get("/busy")
print(json.dumps({
    "fastapi": isinstance(app, FastAPI),
    "same": [
        shim.agent is aegra.agent, shim.supervisor is aegra.supervisor, shim.auth is auth.auth
    ],
    "live": [live.status_code, live.json()["checks"][0]["name"]],
    "busy": [busy.status_code, busy.headers.get("retry-after"), busy.json()],
}))
"""


@pytest.mark.aegra
def test_the_shim_hands_aegra_a_fastapi_app_that_keeps_error_headers(
    served: None, tmp_path: Path
) -> None:
    """Run in Aegra's Python (it has FastAPI): the shim loads by file path, as Aegra loads it,
    re-exports the adapted factories, and turns keel's Starlette health app into FastAPI, with
    an error handler that keeps `Retry-After` (Aegra's own drops an error's headers)."""
    servers.need_aegra_venv()
    write_aegra_config(tmp_path, E2E_CONFIG)
    script = tmp_path / "check.py"
    script.write_text(SHIM_CHECK, encoding="utf-8")
    env = {**os.environ, CONFIG_ENV: str(E2E_CONFIG)}
    done = subprocess.run(
        [str(servers.AEGRA_PYTHON), str(script), str(tmp_path / SHIM_NAME)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["fastapi"] is True and got["same"] == [True, True, True]
    assert got["live"] == [200, "live"]
    assert got["busy"] == [
        429,
        "3",
        {"error": "unknown_error", "message": "Overloaded", "details": None},
    ]


def test_a_langgraph_json_of_ones_own_is_converted_too(served: None) -> None:
    mine = {
        "graphs": {"bot": "my_pkg.graphs:bot", "local": "./graphs.py:local"},
        "http": {"app": "my_pkg.web:app"},
    }
    config, shim = aegra_config(E2E_CONFIG, mine)
    assert config["graphs"] == {"bot": f"./{SHIM_NAME}:bot", "local": "./graphs.py:local"}
    assert config["http"] == {"app": f"./{SHIM_NAME}:http_app"}
    assert "auth" not in config
    assert "from my_pkg.graphs import bot as bot" in shim
    # Aegra takes only a FastAPI app: the shim converts whatever the http app is
    assert "from my_pkg.web import app as _http_app" in shim
    assert "http_app = aegra_http_app(_http_app)" in shim
    # without an http app of one's own, Aegra still gets keel's (its error handler)
    config, shim = aegra_config(E2E_CONFIG, {"graphs": {"bot": "my_pkg.graphs:bot"}})
    assert config["http"] == {"app": f"./{SHIM_NAME}:http_app"}
    assert "http_app = aegra_http_app()" in shim
    with pytest.raises(UserError, match="is a file path"):
        aegra_config(E2E_CONFIG, {"graphs": mine["graphs"], "http": {"app": "./web.py:app"}})
    with pytest.raises(UserError, match='no "graphs"'):
        aegra_config(E2E_CONFIG, {"graphs": {}})


def test_replica_env_checks_its_urls() -> None:
    env = replica_env(
        aegra_json="a.json",
        server_config_path="k.toml",
        database_url="postgresql://h/db",
        redis_url="redis://h:6379/5",
        workers=0,
        migrate=True,
        lease_seconds=9,
    )
    assert env["WORKER_COUNT"] == "0" and env["REDIS_BROKER_ENABLED"] == "true"
    assert (env["LEASE_DURATION_SECONDS"], env["HEARTBEAT_INTERVAL_SECONDS"]) == ("9", "4")
    assert env["REAPER_INTERVAL_SECONDS"] == "3"
    with pytest.raises(SetupError, match="PostgreSQL DATABASE_URL"):
        replica_env(
            aegra_json="a",
            server_config_path="k",
            database_url="sqlite:///x",
            redis_url="redis://h",
            workers=1,
            migrate=False,
        )


def test_user_fields_read_by_key_or_attribute() -> None:
    record = user_record(user_id="alice", tenant_id="acme", roles=["support"], policy="p")
    assert user_field(record, "tenant_id") == user_field(aegra_user(), "tenant_id") == "acme"
    assert context_from_user(aegra_user()) == context_from_user(record)
    with pytest.raises(KeyError):
        user_field(AegraUser(identity="x"), "tenant_id")
    with pytest.raises(UserError, match="has no 'tenant_id' field"):
        context_from_user(AegraUser(identity="x", roles=[], policy="p"))


async def test_auth_takes_the_headers_dict_and_a_pydantic_user(served: None) -> None:
    from keel.app import auth

    user = await auth.authenticate({"authorization": "Bearer token-alice", "host": "x"})
    assert (user["identity"], user["tenant_id"]) == ("alice", "acme")
    with pytest.raises(Auth.exceptions.HTTPException) as caught:
        await auth.authenticate({"host": "x"})
    assert caught.value.status_code == 401
    assert auth.owner_filter(aegra_user()) == {"keel_tenant": "acme", "keel_owner": "alice"}
    with pytest.raises(Auth.exceptions.HTTPException):  # a user keel did not make
        auth.owner_filter(AegraUser(identity="anonymous"))
    # Aegra hands a run's body as is (no `kwargs`)
    assert auth.protected_keys_in({"input": {"usage": {}, "messages": []}}) == ["usage"]
    assert auth.protected_keys_in({"command": {"update": {"outcome": 1}}}) == ["outcome"]


async def test_store_search_by_namespace_prefix_is_checked(served: None) -> None:
    from keel.app import auth

    def ctx(user: Any) -> Any:
        return Auth.types.AuthContext(user=user, permissions=[], resource="store", action="search")

    await auth.own_store(ctx(aegra_user()), {"namespace_prefix": ["memories", "acme", "alice"]})
    with pytest.raises(Auth.exceptions.HTTPException, match="is not yours"):
        await auth.own_store(ctx(aegra_user("globex", "bob")), {"namespace_prefix": ["memories"]})
    with pytest.raises(Auth.exceptions.HTTPException, match="is not yours"):
        await auth.own_store(
            ctx(aegra_user("globex", "bob")), {"namespace_prefix": ["memories", "acme", "alice"]}
        )


def test_assistant_creation_builds_a_graph_without_a_user(served: None) -> None:
    from keel.app import aegra

    no_user: Any = _ExecutionRuntime(access_context="assistants.create", store=InMemoryStore())
    assert aegra.agent({}, no_user).name == "billing"
    assert aegra.agent({"configurable": {"agent": "assistant"}}, no_user).name == "assistant"
    assert "route" in aegra.supervisor(no_user).nodes
    with pytest.raises(UserError, match=r"No tenant in the server config .* has an agent named"):
        aegra.agent({"configurable": {"agent": "nobody"}}, no_user)
    user: Any = _ExecutionRuntime(
        access_context="threads.create_run", user=aegra_user("globex", "bob"), store=InMemoryStore()
    )
    assert aegra.agent({}, user) is aegra.agent({}, user)  # the tenant's, built once
