"""keel on Aegra: the self-hosted LangGraph Agent Server on PostgreSQL and Redis.

Aegra (`aegra-api`, Python >= 3.12) serves the same graphs and auth as `langgraph dev`, with any
number of replicas sharing one database and one Redis. What differs, and what this module does:

- Aegra loads graphs, auth and the custom app from **file paths**: `write_aegra_config` writes
  `aegra.json` plus a shim file (`keel_aegra.py`) beside it that re-exports what `langgraph.json`
  names as `module:attr`.
- Creating an assistant builds the graph with **no user**: `agent` and `supervisor` here then
  return a tenant's graph for its structure only (a run always has its user; keel's nodes fail
  closed without one).
- HTTP store namespaces are filed under `("users", identity, ...)` unless `store.scopes` says
  otherwise: the generated config scopes each tenant's memory namespace by
  `["tenant_id", "identity"]`, so `(memories, tenant, user)` means the same over HTTP as in a run.

- Aegra requires the custom app (`http.app`) to be a **FastAPI** app and serves its own routes
  from it; keel's health app (`keel.app.http:app`) is plain Starlette. The shim hands Aegra
  `aegra_http_app(app)`: a FastAPI app with the same routes (they need no server token, as
  under `langgraph dev`: Aegra applies auth to custom routes only with
  `enable_custom_route_auth`), and an error handler that keeps an error's headers, which
  Aegra's own drops (admission control's `Retry-After`).

The rest (headers dict to the auth handler, the user as a pydantic model, `namespace_prefix` on
store search) is handled where keel reads them (`keel.app.auth`, `keel.identity.user_field`).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from langchain_core.runnables import RunnableConfig
from langgraph_sdk.runtime import ServerRuntime
from starlette.requests import Request
from starlette.responses import JSONResponse

from keel.app import server
from keel.app.cli_args import folder
from keel.app.serve import LANGGRAPH_JSON, read_langgraph_json
from keel.app.server_config import ServerConfig, TenantConfig, server_config
from keel.errors import SetupError, UserError
from keel.graphs.agent import Agent
from keel.graphs.supervisor import Supervisor
from keel.state import RunContext

__all__ = [
    "SHIM_NAME",
    "aegra_config",
    "agent",
    "aegra_http_app",
    "replica_env",
    "supervisor",
    "write_aegra_config",
]

SHIM_NAME = "keel_aegra.py"
"""The file `write_aegra_config` writes beside `aegra.json`: what Aegra loads by path."""

# keel's own factories are swapped for the ones here (which build without a user).
_ADAPTED = {
    "keel.app.server:agent": "keel.app.aegra:agent",
    "keel.app.server:supervisor": "keel.app.aegra:supervisor",
}


def agent(config: RunnableConfig, runtime: ServerRuntime[RunContext]) -> Agent:
    """`keel.app.server.agent`, and without a user (assistant creation) a tenant's graph."""
    if runtime.user is not None:
        return server.agent(config, runtime)
    name = (config.get("configurable") or {}).get("agent")
    config_ = server_config()
    tenant = _first(
        config_, lambda t: (name or t.agent) in t.agents, "an agent named " + repr(name)
    )
    return server.build_tenant_agent(tenant, name)


def supervisor(runtime: ServerRuntime[RunContext]) -> Supervisor:
    """`keel.app.server.supervisor`, and without a user (assistant creation) a tenant's graph."""
    if runtime.user is not None:
        return server.supervisor(runtime)
    tenant = _first(server_config(), lambda t: t.supervisor is not None, "a supervisor")
    return server.build_tenant_supervisor(tenant)


def aegra_http_app(app: Any | None = None) -> Any:
    """The FastAPI app Aegra serves as `http.app` (Aegra adds its own routes to it).

    `app` (langgraph.json's `http.app`) keeps its routes: a FastAPI app is used as is, another
    Starlette app becomes a FastAPI app with its routes, middleware and exception handlers; None
    gives an app of Aegra's routes only. Aegra's own error handler drops an error's headers, so
    unless `app` handles `HTTPException` itself, keel's handler answers with the same body and
    the headers kept (the `Retry-After` of admission control's 429). Needs FastAPI (Aegra's venv
    has it).
    """
    fastapi = importlib.import_module("fastapi")
    if app is None:
        app = fastapi.FastAPI()
    elif not isinstance(app, fastapi.FastAPI):
        routes = getattr(getattr(app, "router", None), "routes", None)
        if routes is None:
            raise UserError(
                f"The http app {app!r} is not a Starlette or FastAPI app: Aegra can only serve "
                "a FastAPI app (langgraph.json's http.app)."
            )
        app = fastapi.FastAPI(
            routes=list(routes),
            middleware=list(getattr(app, "user_middleware", [])),
            exception_handlers=dict(getattr(app, "exception_handlers", {})),
            lifespan=getattr(app.router, "lifespan_context", None),  # keel's: closes stores
        )
    app.exception_handlers.setdefault(fastapi.HTTPException, _http_error)
    return app


async def _http_error(request: Request, exc: Any) -> JSONResponse:
    """Aegra's error answer (`AgentProtocolError`) with the exception's headers kept."""
    errors = importlib.import_module("aegra_api.models.errors")
    body = errors.AgentProtocolError(
        error=errors.get_error_type(exc.status_code),
        message=exc.detail,
        details=getattr(exc, "details", None),
    ).model_dump()
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


def _first(config: ServerConfig, fits: Any, what: str) -> TenantConfig:
    for name in sorted(config.tenants):
        if fits(config.tenants[name]):
            return config.tenants[name]
    raise UserError(f"No tenant in the server config {str(config.path)!r} has {what}.")


def aegra_config(
    server_config_path: str | Path, langgraph_json: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], str]:
    """`aegra.json` for the graphs, auth and app of `langgraph_json`, and the shim's source.

    `langgraph_json` defaults to keel's own (`keel.app.serve.LANGGRAPH_JSON`). Every
    `module:attr` it names becomes `./keel_aegra.py:<name>`; store scopes come from the server
    config's memory namespaces.
    """
    spec = dict(LANGGRAPH_JSON if langgraph_json is None else langgraph_json)
    config = ServerConfig.from_file(server_config_path)
    exports: dict[str, str] = {}

    def path_of(name: str, ref: str) -> str:
        if ":" not in ref or ref.split(":", 1)[0].endswith(".py") or ref.startswith("."):
            return ref  # already a file path
        exports[name] = _ADAPTED.get(ref, ref)
        return f"./{SHIM_NAME}:{name}"

    graphs = spec.get("graphs")
    if not isinstance(graphs, Mapping) or not graphs:
        raise UserError('langgraph.json has no "graphs": nothing for Aegra to serve.')
    out: dict[str, Any] = {"graphs": {g: path_of(g, str(ref)) for g, ref in graphs.items()}}
    auth = spec.get("auth")
    if isinstance(auth, Mapping) and auth.get("path"):
        out["auth"] = {"path": path_of("auth", str(auth["path"]))}
    http = spec.get("http")
    http = dict(http) if isinstance(http, Mapping) else {}
    if http.get("app"):  # Aegra takes only a FastAPI app: the shim converts it
        ref = str(http["app"])
        if path_of("_http_app", ref) == ref:
            raise UserError(
                f"langgraph.json's http.app {ref!r} is a file path: name it as 'module:attr' so "
                "keel can hand Aegra a FastAPI app of it."
            )
    out["http"] = {**http, "app": f"./{SHIM_NAME}:http_app"}
    namespaces = sorted({t.memory_namespace for t in config.tenants.values()})
    out["store"] = {"scopes": {ns: ["tenant_id", "identity"] for ns in namespaces}}
    lines = [
        '"""Generated by keel (keel.app.aegra): what aegra.json loads by file path."""',
        "",
        *(
            f"from {ref.split(':')[0]} import {ref.split(':')[1]} as {name}  # noqa: F401"
            for name, ref in exports.items()
        ),
    ]
    lines += [
        "from keel.app.aegra import aegra_http_app",
        "",
        f"http_app = aegra_http_app({'_http_app' if '_http_app' in exports else ''})",
    ]
    return out, "\n".join(lines) + "\n"


def write_aegra_config(
    directory: str | Path,
    server_config_path: str | Path,
    langgraph_json: str | Path | None = None,
) -> Path:
    """Write `aegra.json` and its shim into `directory`; the `aegra.json` path.

    `langgraph_json` is a langgraph.json file (default: keel's own graphs and auth).
    """
    spec = None if langgraph_json is None else read_langgraph_json(langgraph_json)
    config, shim = aegra_config(server_config_path, spec)
    out = folder(Path(directory), "Aegra config folder", "--aegra-config")
    (out / SHIM_NAME).write_text(shim, encoding="utf-8")
    target = out / "aegra.json"
    target.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return target


def replica_env(
    *,
    aegra_json: str | Path,
    server_config_path: str | Path,
    database_url: str,
    redis_url: str,
    workers: int,
    migrate: bool,
    lease_seconds: int | None = None,
) -> dict[str, str]:
    """One Aegra replica's environment (add it to `os.environ` and run `uvicorn`).

    `workers=0` is an API-only replica. Exactly one replica should `migrate` (run Aegra's
    migrations at startup). `lease_seconds` shortens the run lease (heartbeat at ~4/9 of it,
    reaper at 1/3) so a dead worker's runs come back sooner.
    """
    if not database_url.startswith(("postgresql://", "postgres://")):
        raise SetupError(f"Aegra needs a PostgreSQL DATABASE_URL, got {database_url!r}.")
    if not redis_url.startswith("redis://"):
        raise SetupError(f"Aegra's job queue needs a redis:// URL, got {redis_url!r}.")
    env = {
        "AEGRA_CONFIG": str(Path(aegra_json).resolve()),
        "KEEL_SERVER_CONFIG": str(Path(server_config_path).resolve()),
        "DATABASE_URL": database_url,
        "REDIS_BROKER_ENABLED": "true",
        "REDIS_URL": redis_url,
        "WORKER_COUNT": str(workers),
        "RUN_MIGRATIONS_ON_STARTUP": "true" if migrate else "false",
        "LANGSMITH_TRACING": "false",
    }
    if lease_seconds is not None:
        env["LEASE_DURATION_SECONDS"] = str(lease_seconds)
        env["HEARTBEAT_INTERVAL_SECONDS"] = str(max(1, lease_seconds * 4 // 9))
        env["REAPER_INTERVAL_SECONDS"] = str(max(1, lease_seconds // 3))
    return env
