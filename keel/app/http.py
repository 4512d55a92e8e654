"""keel's health checks over HTTP: a plain ASGI app (Starlette) for any server to mount.

LangGraph server mounts it through `langgraph.json` (`"http": {"app": "keel.app.http:app"}`);
Aegra takes only a FastAPI app: the shim `keel.app.aegra` generates hands it these routes as one
(`aegra_http_app`); any other ASGI server can mount or serve `keel.app.http:app` as is.

- `GET /keel/health/live`: the process answers (no I/O); always 200.
- `GET /keel/health/ready`: the server database, keel's ledger, each tenant's Chroma server;
  200, or 503 naming what failed.
- `GET /keel/health/semantic`: a known task (17 + 25 with a tool) through `build_agent`; 200, or
  503 when the answer is wrong.

Every answer is JSON: `{"ok": bool, "checks": [{"name", "ok", "detail", "seconds"}],
"failing": [names]}`. What `ready` checks comes from the environment and the server config
(`KEEL_SERVER_CONFIG`): the database named by `KEEL_DB_URL`, `DATABASE_URI` (LangGraph server;
`langgraph dev`'s `:memory:` is no database) or `DATABASE_URL` (Aegra), the config's `ledger`,
and every tenant's `memory.chroma_url`; a part that is not configured is not checked. The
semantic check runs on `KEEL_HEALTH_MODEL` (else `KEEL_MODEL`); it calls that model, so expose
it only where the cost is acceptable. The routes need no token (probes carry none) and reveal
no tenant data: only the parts' health.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from keel.app.health import Check, Health, liveness, semantic_check, served_readiness
from keel.app.server_config import CONFIG_ENV, server_config
from keel.errors import KeelError

__all__ = ["DATABASE_ENVS", "app", "readiness_targets"]

DATABASE_ENVS = ("KEEL_DB_URL", "DATABASE_URI", "DATABASE_URL")
"""Where `ready` finds the server's database URL, first set wins."""
IN_MEMORY = ":memory:"
"""What `langgraph dev` sets `DATABASE_URI` to: its threads are in memory, no database to check."""


def readiness_targets() -> dict[str, Any]:
    """What `/keel/health/ready` checks: `db`, `ledger` and `chroma` URLs (from env and config)."""
    db = next((os.environ[n] for n in DATABASE_ENVS if os.environ.get(n, "").strip()), None)
    if db is not None and db.strip() == IN_MEMORY:
        db = None
    ledger, chroma = None, []
    if os.environ.get(CONFIG_ENV, "").strip():
        config = server_config()
        ledger = config.ledger_url
        chroma = [
            t.memory.chroma_url
            for t in config.tenants.values()
            if t.memory is not None and t.memory.chroma_url is not None
        ]
    return {"db": db, "ledger": ledger, "chroma": chroma}


def _answer(health: Health) -> JSONResponse:
    body = health.to_dict()
    body["failing"] = [c.name for c in health.checks if not c.ok]
    return JSONResponse(body, status_code=200 if health.ok else 503)


async def live(request: Request) -> JSONResponse:
    """Liveness: 200 while the process answers."""
    return _answer(liveness())


async def ready(request: Request) -> JSONResponse:
    """Readiness: 200 when every configured part answers, else 503 naming the failing ones."""
    try:
        targets = await asyncio.to_thread(readiness_targets)
    except KeelError as exc:  # the server config cannot be read: nothing else is ready either
        return _answer(Health((Check("config", False, str(exc)),)))
    return _answer(await asyncio.to_thread(served_readiness, **targets))


async def semantic(request: Request) -> JSONResponse:
    """The semantic check: the known task answered correctly through the agent."""
    model = os.environ.get("KEEL_HEALTH_MODEL") or None
    check = await asyncio.to_thread(semantic_check, model)
    return _answer(Health((check,)))


app = Starlette(
    routes=[
        Route("/keel/health/live", live, methods=["GET"]),
        Route("/keel/health/ready", ready, methods=["GET"]),
        Route("/keel/health/semantic", semantic, methods=["GET"]),
    ]
)
"""The ASGI app (`keel.app.http:app`)."""
