"""keel's health checks over HTTP: a plain ASGI app (Starlette) for any server to mount.

LangGraph server mounts it through `langgraph.json` (`"http": {"app": "keel.app.http:app"}`);
Aegra takes only a FastAPI app: the shim `keel.app.aegra` generates hands it these routes as one
(`aegra_http_app`); any other ASGI server can mount or serve `keel.app.http:app` as is.

- `GET /keel/health/live`: the process answers (no I/O); always 200.
- `GET /keel/health/ready`: the server database, keel's ledger, each tenant's Chroma server;
  200, or 503 naming what failed.
- `GET /keel/health/semantic`: a known task (17 + 25 with a tool) through `build_agent`; 200, or
  503 when the answer is wrong. It calls a model, so it answers only a caller that sends
  `Authorization: Bearer <KEEL_HEALTH_TOKEN>` (403 while the server has no such token set, 401
  for a wrong one).

It also closes what LangGraph server answers without a token (`GatedRoutes`): `/metrics`
answers only the server config's `[metrics]` token, `/docs` and `/openapi.json` only a known
token, and `langgraph dev`'s own `/internal/...` and `/deploy` routes no one; with LangGraph's
`http.mount_prefix`, the root routes of the app it wraps keel's in too (`gate_outer_routes`).

It also answers an MCP `tools/call` whose run the server refused (keel's auth: 422, 429, ...)
with a JSON-RPC error carrying the refusal (`RefusedToolCalls`): LangGraph server applies
`http.app`'s middleware to its own routes, and its MCP route let that error escape as a 500.

Every answer is JSON: `{"ok": bool, "checks": [{"name", "ok", "detail", "seconds"}],
"failing": [names]}`. What `ready` checks comes from the environment and the server config
(`KEEL_SERVER_CONFIG`): the database named by `KEEL_DB_URL`, `DATABASE_URI` (LangGraph server;
`langgraph dev`'s `:memory:` is no database) or `DATABASE_URL` (Aegra), the config's `ledger`,
and every tenant's `memory.chroma_url`; a part that is not configured is not checked. The
semantic check runs on `KEEL_HEALTH_MODEL` (else `KEEL_MODEL`); it calls that model, so it
needs the health token. `live` and `ready` need no token (probes carry none) and reveal no
tenant data: only the parts' health.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keel.app.health import Check, Health, liveness, semantic_check, served_readiness
from keel.app.server_config import CONFIG_ENV, server_config
from keel.errors import KeelError

__all__ = [
    "DATABASE_ENVS",
    "GatedRoutes",
    "gate_outer_routes",
    "RefusedToolCalls",
    "app",
    "lifespan",
    "readiness_targets",
]

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


def _answer(health: Health, status: int | None = None) -> JSONResponse:
    """`health` as JSON; 200 when it is ok, else 503 (or `status`)."""
    body = health.to_dict()
    body["failing"] = [c.name for c in health.checks if not c.ok]
    return JSONResponse(body, status_code=status or (200 if health.ok else 503))


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


TOKEN_ENV = "KEEL_HEALTH_TOKEN"
"""The environment variable holding the bearer token the semantic check asks for."""


def _refused(request: Request) -> JSONResponse | None:
    """Why the caller may not run the semantic check (it spends model calls), or None."""
    token = os.environ.get(TOKEN_ENV, "")
    if not token:
        why = (
            f"the semantic check calls a model, so it needs a token: set {TOKEN_ENV} on the "
            "server and send it as `Authorization: Bearer <token>`"
        )
        return _refusal(403, why)
    sent = request.headers.get("authorization", "")
    scheme, _, value = sent.partition(" ")
    # as bytes: compare_digest refuses str with non-ASCII characters (a TypeError, a 500);
    # Starlette reads a header's bytes as Latin-1, so this is the bytes the client sent
    sent_token, wanted = value.strip().encode("latin-1"), token.encode()
    if scheme.lower() != "bearer" or not hmac.compare_digest(sent_token, wanted):
        why = f"send `Authorization: Bearer <{TOKEN_ENV}>` to run the semantic check"
        return _refusal(401, why)
    return None


def _refusal(status: int, why: str) -> JSONResponse:
    return _answer(Health((Check("semantic", False, why),)), status)


async def semantic(request: Request) -> JSONResponse:
    """The semantic check: the known task answered correctly through the agent."""
    if (refused := _refused(request)) is not None:
        return refused
    model = os.environ.get("KEEL_HEALTH_MODEL") or None
    check = await asyncio.to_thread(semantic_check, model)
    return _answer(Health((check,)))


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    """Gate the serving app's own routes, then serve; at shutdown, close stores and the ledger.

    `gate_outer_routes` runs before the server takes requests. What the graph factories opened
    is closed at shutdown: Chroma stores, then the ledger.
    """
    gate_outer_routes(app)
    yield
    if (server := sys.modules.get("keel.app.server")) is not None:  # else none were opened
        await server.aclose_served()


MCP_PATH = "/mcp"
"""LangGraph server's MCP endpoint (each assistant a tool)."""
INVALID_PARAMS = -32602
"""The JSON-RPC error code of a call whose parameters were refused."""


class RefusedToolCalls:
    """LangGraph's MCP route answers a tool call the server refused as a JSON-RPC error.

    Its `tools/call` starts the run with `runs.wait` and lets the HTTP error of a refused run
    escape (keel's auth refuses a run with 422, 429, 403, ...): the client got a 500 and a
    reset connection, the server log a traceback. LangGraph server applies `http.app`'s
    middleware to its own routes, so this answers instead with a JSON-RPC error (`-32602`)
    carrying the refusal's `detail`. Any other error, and one after the answer began, is left
    as it was.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on; a POST to `/mcp` whose run was refused gets the error."""
        if scope["type"] != "http" or scope["path"] != MCP_PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        body = bytearray()
        started = False

        async def reading() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                body.extend(message.get("body", b""))
            return message

        async def sending(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, reading, sending)
        except httpx.HTTPStatusError as exc:
            if started or not 400 <= exc.response.status_code < 500:
                raise
            answer = {"jsonrpc": "2.0", "id": _request_id(bytes(body)), "error": _run_refused(exc)}
            await JSONResponse(answer)(scope, receive, send)


def _request_id(body: bytes) -> Any:
    """The JSON-RPC request's `id` (None when the body is not one request)."""
    try:
        request = json.loads(body)
    except ValueError:
        return None
    return request.get("id") if isinstance(request, dict) else None


def _run_refused(exc: httpx.HTTPStatusError) -> dict[str, Any]:
    """A JSON-RPC error for a refused run: the server's `detail`, and the HTTP status."""
    try:
        detail = exc.response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    status = exc.response.status_code
    message = f"The run was refused ({status}): {detail or exc.response.text}"
    return {"code": INVALID_PARAMS, "message": message, "data": {"status": status}}


METRICS_PATH = "/metrics"
"""LangGraph server's Prometheus (and `?format=json`) metrics: every tenant's run counts."""
SPEC_PATHS = frozenset({"/docs", "/openapi.json"})
"""LangGraph server's API reference (every route, keel's too): for a known token."""
CLOSED_ROUTES = ("/internal", "/deploy")
"""`langgraph dev`'s own routes: `POST /internal/truncate` deletes every thread and run,
`/internal/debug/thread/{id}` reads any thread, `POST /deploy` runs `langgraph deploy`."""


class GatedRoutes:
    """Close the routes LangGraph server answers without a token (it skips auth for them).

    - `/metrics`: only `Authorization: Bearer <the [metrics] token>` (a Prometheus scraper's);
      it counts every tenant's runs and requests, so a user's token is not enough. 403 while
      the server config has no `[metrics]`, 401 for a missing or wrong token.
    - `/docs`, `/openapi.json`: any known token (a user's or the metrics token), else 401.
    - `/internal/...`, `/deploy...` (`langgraph dev`'s test and deploy routes): 404 for all.

    `/ok`, `/` and `/info` (versions and feature flags, which LangGraph Studio asks for before
    it sends a token) stay open, as do keel's `/keel/health/live` and `ready`.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse a closed route; pass anything else on."""
        if scope["type"] == "http":
            refused = _gate(_route_path(scope), Request(scope).headers.get("authorization", ""))
            if refused is not None:
                await refused(scope, receive, send)
                return
        await self.app(scope, receive, send)


def gate_outer_routes(app: Any) -> int:
    """Put `GatedRoutes` in front of the routes of `app` that keel's middleware does not see.

    The lifespan runs on the app the server serves. That is keel's app itself (its middleware
    gates every request), unless the server wraps it: with `http.mount_prefix` (or
    `MOUNT_PREFIX`) LangGraph server mounts it under the prefix in an app of its own whose root
    `/`, `/ok` and `/metrics` pass no custom middleware, so the root `/metrics` answered
    anyone. Each of the wrapper's routes not already gated (or mounting an app whose middleware
    gates) is wrapped here, before the server takes requests. The number of routes wrapped.
    """
    if _gates(app):
        return 0
    wrapped = 0
    for route in getattr(getattr(app, "router", None), "routes", ()):
        inner = getattr(route, "app", None)
        if inner is None or isinstance(inner, GatedRoutes) or _gates(inner):
            continue
        route.app = GatedRoutes(inner)
        wrapped += 1
    return wrapped


def _gates(app: Any) -> bool:
    """Whether `app` is a Starlette app with `GatedRoutes` in its middleware."""
    middleware = getattr(app, "user_middleware", None) or ()
    return any(getattr(m, "cls", None) is GatedRoutes for m in middleware)


def _route_path(scope: Scope) -> str:
    """The path the router matches (without the server's `root_path`), no trailing `/`."""
    path = str(scope.get("path", ""))
    root = str(scope.get("root_path", ""))
    if root and path.startswith(root):
        path = path[len(root) :]
    return "/" + path.strip("/")


def _gate(path: str, authorization: str) -> JSONResponse | None:
    """The refusal for a request to `path` with this `Authorization`, or None to let it in."""
    if any(path == closed or path.startswith(f"{closed}/") for closed in CLOSED_ROUTES):
        return JSONResponse({"detail": "Not Found"}, status_code=404)
    if path != METRICS_PATH and path not in SPEC_PATHS:
        return None
    try:
        config = server_config()
    except KeelError as exc:
        return JSONResponse({"detail": str(exc)}, status_code=503)
    scheme, _, token = authorization.partition(" ")
    token = token.strip() if scheme.lower() == "bearer" else ""
    if path == METRICS_PATH:
        if config.metrics_token_sha256 is None:
            why = (
                "/metrics counts every tenant's runs: it answers only the server config's "
                '[metrics] token. Add [metrics] token_sha256 = "<sha256 hex of the token>" and '
                "have the scraper send `Authorization: Bearer <token>`."
            )
            return JSONResponse({"detail": why}, status_code=403)
        if token and config.is_metrics_token(token):
            return None
        why = "Send `Authorization: Bearer <token>` with the server config's [metrics] token."
        return JSONResponse({"detail": why}, status_code=401)
    if token and (config.authenticate(token) is not None or config.is_metrics_token(token)):
        return None
    return JSONResponse(
        {"detail": f"{path} answers a known token: send 'Authorization: Bearer <token>'."},
        status_code=401,
    )


app = Starlette(
    lifespan=lifespan,
    middleware=[Middleware(GatedRoutes), Middleware(RefusedToolCalls)],
    routes=[
        Route("/keel/health/live", live, methods=["GET"]),
        Route("/keel/health/ready", ready, methods=["GET"]),
        Route("/keel/health/semantic", semantic, methods=["GET"]),
    ],
)
"""The ASGI app (`keel.app.http:app`)."""
