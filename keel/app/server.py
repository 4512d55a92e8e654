"""Graph factories for LangGraph server (`langgraph.json`): `agent` and `supervisor`.

The server calls a factory for every run and state read with a `ServerRuntime` carrying the
authenticated user (from `keel.app.auth`). The factory picks that user's tenant from the server
config file (`KEEL_SERVER_CONFIG`, see `keel.app.server_config`) and returns the tenant's graph,
compiled *without* a checkpointer or store: the server supplies its own (in memory under
`langgraph dev`, Postgres when self-hosted). Graphs are built once per tenant and config file.

```json
{
  "dependencies": ["."],
  "graphs": {"agent": "keel.app.server:agent", "supervisor": "keel.app.server:supervisor"},
  "auth": {"path": "keel.app.auth:auth", "disable_studio_auth": true},
  "http": {"app": "keel.app.http:app"}
}
```

A tenant's agents get memory, a judge, fallbacks and timeouts from their config tables
(`keel.app.agent_options`); a tenant whose memory lives on a Chroma server shares one lazily
opened `keel.app.server_memory.ChromaServerStore` between its graphs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

from langchain_core.language_models import BaseChatModel
from langchain_core.runnables import RunnableConfig
from langgraph.store.base import BaseStore
from langgraph_sdk.runtime import ServerRuntime

from keel.app.canary import serves_candidate
from keel.app.server_config import (
    AgentSpec,
    ServerConfig,
    TenantConfig,
    loaded_configs,
    server_config,
)
from keel.app.server_memory import ChromaServerStore
from keel.db.ledger import Ledger
from keel.errors import SetupError, UserError
from keel.graphs.agent import Agent, build_agent
from keel.graphs.supervisor import Supervisor, build_supervisor
from keel.graphs.threads import admitted
from keel.guards.admission import Admission, WaitingRoom
from keel.guards.policy import Policy
from keel.identity import context_from_user, user_field
from keel.memory.tools import memory_tools
from keel.models import resolve_model
from keel.state import RunContext
from keel.tools.registry import KeelTool

__all__ = [
    "aclose_served",
    "admission_of",
    "agent",
    "build_tenant_agent",
    "build_tenant_supervisor",
    "supervisor",
]

G = TypeVar("G")


def agent(config: RunnableConfig, runtime: ServerRuntime[RunContext]) -> Agent:
    """The `agent` graph: the authenticated tenant's main agent, or another of its agents.

    An assistant (or run) configured with `{"configurable": {"agent": "assistant"}}` runs the
    tenant's agent of that name. When the agent has a canary, the users it picks (a stable
    share, `keel.app.canary`) get the candidate; its runs carry the candidate's version.
    """
    server, tenant = _tenant_of(runtime)
    name = (config.get("configurable") or {}).get("agent") or tenant.agent
    if not isinstance(name, str) or name not in tenant.agents:
        raise UserError(
            f"Tenant {tenant.name!r} has no agent {name!r}; its agents are {sorted(tenant.agents)}."
        )
    ledger = _ledger(server)
    store = _store(server, tenant)
    canary = tenant.agents[name].canary
    if canary is not None and serves_candidate(
        _served_user(config, runtime), canary.share, f"{tenant.name}/{name}"
    ):
        spec = canary.candidate
        candidate = ("agent", tenant.name, name, "candidate")
        return cast(
            Agent,
            _cached(
                server,
                candidate,
                lambda: _admit(_build(spec, tenant, ledger=ledger, store=store), server, tenant),
            ),
        )
    key = ("agent", tenant.name, name)
    return cast(
        Agent,
        _cached(
            server,
            key,
            lambda: _admit(
                build_tenant_agent(tenant, name, ledger=ledger, store=store), server, tenant
            ),
        ),
    )


def supervisor(runtime: ServerRuntime[RunContext]) -> Supervisor:
    """The `supervisor` graph: the authenticated tenant's supervisor of focused agents."""
    server, tenant = _tenant_of(runtime)
    ledger = _ledger(server)
    store = _store(server, tenant)
    key = ("supervisor", tenant.name)
    return cast(
        Supervisor,
        _cached(
            server,
            key,
            lambda: _admit(
                build_tenant_supervisor(tenant, ledger=ledger, store=store), server, tenant
            ),
        ),
    )


def build_tenant_agent(
    tenant: TenantConfig,
    name: str | None = None,
    *,
    ledger: Ledger | None = None,
    store: BaseStore | None = None,
) -> Agent:
    """Build one of a tenant's agents (default: its main one) without a checkpointer.

    `store` is the tenant's memory (default: a `ChromaServerStore` when the tenant's config
    names a Chroma server, else the server's own store at run time). This is the agent itself,
    never its canary candidate (the `agent` factory picks that).
    """
    return _build(tenant.agents[name or tenant.agent], tenant, ledger=ledger, store=store)


def _build(
    spec: AgentSpec, tenant: TenantConfig, *, ledger: Ledger | None, store: BaseStore | None
) -> Agent:
    if store is None and tenant.memory is not None and tenant.memory.chroma_url is not None:
        store = ChromaServerStore(tenant.memory)
    _check_ledger(spec.policy, f"Agent {spec.name!r}", tenant, ledger)
    options = spec.options
    verify = options.verify
    return build_agent(
        _model(spec.model),
        _tools(spec, tenant.memory_namespace, store),
        system_prompt=spec.system_prompt,
        plan=spec.plan,
        policy=spec.policy,
        ledger=ledger,
        name=spec.name,
        version=spec.version,
        store=store,
        memory=options.memory,
        fallback_models=[_model(m) for m in options.fallback_models],
        model_timeout=options.model_timeout,
        judge=None if verify is None else _model(verify.judge),
        max_revisions=1 if verify is None else verify.max_revisions,
        escalate=False if verify is None else verify.escalate,
        prices=tenant.prices,
    )


def build_tenant_supervisor(
    tenant: TenantConfig, *, ledger: Ledger | None = None, store: BaseStore | None = None
) -> Supervisor:
    """Build a tenant's supervisor over its focused agents, without a checkpointer."""
    if tenant.supervisor is None:
        raise UserError(
            f"Tenant {tenant.name!r} has no supervisor: add supervisor = {{ model = ..., agents = "
            f"[...] }} to [tenants.{tenant.name}] in the server config."
        )
    spec = tenant.supervisor
    _check_ledger(spec.policy, "The supervisor", tenant, ledger)
    return build_supervisor(
        {n: build_tenant_agent(tenant, n, ledger=ledger, store=store) for n in spec.agents},
        _model(spec.model),
        descriptions={n: tenant.agents[n].description for n in spec.agents},
        system_prompt=spec.system_prompt,
        policy=spec.policy,  # the router's calls count against its budgets and rate limits
        ledger=ledger,
        prices=tenant.prices,
        name="supervisor",
        version=spec.version,
    )


def _check_ledger(
    policy: Policy | None, who: str, tenant: TenantConfig, ledger: Ledger | None
) -> None:
    """A policy whose state lives in the ledger (period budgets, rate limits, ...) needs one."""
    if policy is not None and policy.ledger_features and ledger is None:
        raise SetupError(
            f"{who} of tenant {tenant.name!r} has {', '.join(policy.ledger_features)}, which "
            'live in the ledger: add ledger = "postgresql://..." at the top of the server config.'
        )


def _admit(graph: G, server: ServerConfig, tenant: TenantConfig) -> G:
    """`graph` under the tenant's admission control (`[tenants.<id>.admission]`), if any."""
    admission = _admission(server, tenant)
    return graph if admission is None else cast(G, admitted(graph, admission))


def admission_of(tenant: str) -> Admission | None:
    """The tenant's admission control (on the config's one ledger), or None without caps."""
    config = server_config()
    return _admission(config, config.tenant(tenant))


def _admission(server: ServerConfig, tenant: TenantConfig) -> Admission | None:
    """The tenant's caps on the config's ledger, queued runs in the process's one waiting room."""
    room = _cached(server, ("waiting_room",), lambda: WaitingRoom(server.queued_per_process))
    return Admission.of(_ledger(server), tenant.admission, waiting_room=room)


def _served_user(config: RunnableConfig, runtime: ServerRuntime[RunContext]) -> str:
    """Whose side of a canary a run is on: the user's, or the thread owner's.

    A reviewer resuming another user's thread (as keel's auth stamped it) acts for the owner,
    so the thread is resumed by the version that started it.
    """
    metadata = config.get("metadata")
    acting = context_from_user(_user(runtime), metadata if isinstance(metadata, Mapping) else None)
    return acting.user_id


def _user(runtime: ServerRuntime[RunContext]) -> Any:
    user = runtime.user
    if user is None:
        raise SetupError(
            "keel's served graphs need the authenticated user: set "
            '"auth": {"path": "keel.app.auth:auth"} in langgraph.json.'
        )
    return user


def _tenant_of(runtime: ServerRuntime[RunContext]) -> tuple[ServerConfig, TenantConfig]:
    config = server_config()
    user = _user(runtime)
    try:
        tenant = str(user_field(user, "tenant_id"))
    except KeyError as exc:
        raise SetupError(
            f"The server user {user.identity!r} has no tenant_id; use keel.app.auth:auth."
        ) from exc
    if tenant not in config.tenants:
        raise SetupError(f"Tenant {tenant!r} is not in the server config {str(config.path)!r}.")
    return config, config.tenant(tenant)


def _cached(config: ServerConfig, key: tuple[str, ...], build: Any) -> Any:
    if key not in config.cache:
        config.cache[key] = build()
    return config.cache[key]


def _ledger(config: ServerConfig) -> Ledger | None:
    """One ledger (one connection pool) per config, opened on first use."""
    if config.ledger_url is None:
        return None
    return cast(Ledger, _cached(config, ("ledger",), lambda: Ledger(config.ledger_url)))


async def aclose_served() -> None:
    """Close what the factories opened: the tenants' Chroma stores, then the ledger's pools.

    The server's shutdown hook: `keel.app.http:app`'s lifespan calls it as the server stops;
    LangGraph server runs that lifespan (`http.app` in `langgraph.json`). Each is closed even
    when closing another fails; the first failure is raised after. The factories then forget
    everything they built (graphs hold the closed ledger and stores), so a server started
    again in this process (tests; an ASGI server that reloads) opens fresh ones.
    """
    failed: list[Exception] = []
    for config in loaded_configs():
        held = list(config.cache.values())
        config.cache.clear()
        closing: list[ChromaServerStore | Ledger] = [
            v for v in held if isinstance(v, ChromaServerStore)
        ]
        closing += [v for v in held if isinstance(v, Ledger)]
        for value in closing:
            try:
                await value.aclose()
            except Exception as exc:  # close the rest, then raise the first
                failed.append(exc)
    if failed:
        raise failed[0]


def _store(config: ServerConfig, tenant: TenantConfig) -> BaseStore | None:
    """The tenant's memory on a Chroma server (one per URL and collection), or None."""
    spec = tenant.memory
    if spec is None or spec.chroma_url is None:
        return None
    key = ("chroma", spec.chroma_url, spec.collection, spec.index or "")
    return cast(BaseStore, _cached(config, key, lambda: ChromaServerStore(spec)))


def _model(name: str) -> BaseChatModel:
    return resolve_model(name)


DEMO_TOOLS = ("issue_refund", "lookup_order", "search_policy")
"""The demo scenario's tools (`keel.app.demo`), loaded only when a server config names one."""


def _demo_tools() -> list[KeelTool]:
    demo = importlib.import_module("keel.app.demo")  # by name: not on the production path
    factory: Callable[[], list[KeelTool]] = demo.demo_tools
    return factory()


def _tools(spec: AgentSpec, memory_namespace: str, store: BaseStore | None) -> list[Any]:
    bundled = {t.name: t for t in memory_tools(store, kind=memory_namespace)}
    if any(ref in DEMO_TOOLS for ref in spec.tools):
        bundled.update({t.name: t for t in _demo_tools()})
    out: list[Any] = []
    for ref in spec.tools:
        if ref in bundled:
            out.append(bundled[ref])
        elif ":" in ref:
            out.extend(_import_tools(ref, spec.name))
        else:
            raise UserError(
                f"Agent {spec.name!r}: unknown tool {ref!r}. Use a bundled tool "
                f"({', '.join(sorted({*bundled, *DEMO_TOOLS}))}) or 'package.module:attribute'."
            )
    return out


def _import_tools(ref: str, agent_name: str) -> list[Any]:
    module_name, _, attr = ref.partition(":")
    try:
        value = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"Agent {agent_name!r}: cannot import tool {ref!r}: {exc}.") from exc
    return list(value) if isinstance(value, list | tuple) else [value]
