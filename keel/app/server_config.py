"""The server config file: bearer tokens → user, tenant, roles; per-tenant agents.

`keel.app.auth` and the graph factories in `keel.app.server` read it from the TOML file named by
`KEEL_SERVER_CONFIG`. Example:

```toml
ledger = "${KEEL_LEDGER_URL}"                         # only for policies with period budgets
queued_per_process = 5                                # runs waiting in admission queues, all
                                                      # tenants (default: N_JOBS_PER_WORKER / 2)

[prices]                                              # USD per 1M tokens, over keel's table; a
"gpt-5" = { input_per_mtok = 1.25, output_per_mtok = 10.0 }  # policy with a usd limit refuses
                                                      # a model keel cannot price

[[users]]
token_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
user = "alice"
tenant = "acme"
roles = ["support"]

[tenants.acme]
agent = "billing"                                     # served as the `agent` graph
memory_namespace = "memories"                         # memories: (this, tenant, user)
supervisor = { model = "keel:demo-router", agents = ["support", "billing"], policy = "r.toml" }
                                                      # the router's calls are held to its
                                                      # policy (a path or a table); needed when
                                                      # an agent it routes to has limits; add
                                                      # version = "r1" to label its records

[tenants.acme.agents.billing]
description = "Refunds and charges."
model = "keel:demo"                                   # or "openai:gpt-4o-mini"
system_prompt = "You handle refunds."
tools = ["lookup_order", "search_policy", "issue_refund"]
policy = "policies/acme.toml"                         # a path (relative to this file) or a table
version = "v1"                                        # the label its records and traces carry

# 10% of acme's users (stable by user hash) are served this candidate instead: any of model,
# system_prompt, policy, tools, plan override the agent's; or `agent = "billing_next"` serves
# another of the tenant's agents (another graph). Its runs are recorded as version "v2".
[tenants.acme.agents.billing.canary]
share = 0.1
version = "v2"
system_prompt = "You handle refunds. Confirm the order first."

[tenants.acme.admission]                              # needs `ledger` (keel.guards.admission)
tenant_running = 20                                   # runs of the tenant running at once
tenant_queued = 50                                    # ... waiting for a slot (up to 30 s)
user_running = 3                                      # runs of one user running at once

[metrics]                                             # GET /metrics answers this bearer token
token_sha256 = "..."                                  # (a scraper's); without it: 403 to all

[webhooks]                                            # a run's `webhook` may name a private
private = true                                        # address (10/8, ...); default: refused
```

A user whose `roles` include `reviewer` may list and resume the tenant's waiting threads
(`keel.app.auth`).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from keel._data_files import parse_text, read_text
from keel.app.agent_options import (
    AGENT_KEYS,
    AgentOptions,
    MemorySpec,
    agent_options,
    memory_spec,
)
from keel.errors import SetupError, UserError
from keel.guards.admission import AdmissionPolicy
from keel.guards.policy import Policy
from keel.models import BUNDLED_MODELS
from keel.pricing import Price, PriceTable

__all__ = [
    "CONFIG_ENV",
    "AgentSpec",
    "CanarySpec",
    "ServerConfig",
    "SupervisorSpec",
    "TenantConfig",
    "UserEntry",
    "loaded_configs",
    "server_config",
]

CONFIG_ENV = "KEEL_SERVER_CONFIG"


@dataclass(frozen=True, kw_only=True, slots=True)
class AgentSpec:
    """One focused agent of a tenant."""

    name: str
    """The agent's name (the supervisor routes by it)."""
    model: str
    """`provider:name` (`openai:gpt-4o-mini`) or a bundled scripted model (`keel:demo`)."""
    description: str = ""
    """What the agent does, shown to the supervisor."""
    system_prompt: str | None = None
    """The agent's system prompt."""
    tools: tuple[str, ...] = ()
    """Enabled tools: bundled names (`lookup_order`, `remember`, ...) or `module:attribute`."""
    policy: Policy | None = None
    """The policy the agent is held to (its rules use the authenticated user's roles)."""
    plan: bool = False
    """Plan first."""
    options: AgentOptions = field(default_factory=AgentOptions)
    """Memory, verification, fallbacks (`keel.app.agent_options`)."""
    version: str | None = None
    """The version label its run records, audit records and traces carry (`keel.versions`)."""
    canary: CanarySpec | None = None
    """A candidate that serves a share of the users instead (`keel.app.canary`)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class CanarySpec:
    """A candidate version of an agent and the share of users it serves."""

    share: float
    """Share of users (0 to 1), chosen by a stable hash of the user id."""
    candidate: AgentSpec
    """The candidate agent (its `version` labels the runs it serves)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class SupervisorSpec:
    """A tenant's supervisor: which agents it routes to, with what model."""

    model: str
    """The routing model (structured output `Route`)."""
    agents: tuple[str, ...]
    """The tenant's agents it may route to."""
    system_prompt: str | None = None
    """Extra instructions for routing."""
    policy: Policy | None = None
    """The policy the routing model's calls are held to (`build_supervisor(policy=...)`): its
    run budget counts the whole task, the agents' calls included; its period budgets, rate
    limits and breaker hold the router's calls. Required when an agent it routes to has a
    budget, period budgets or rate limits (else the router's calls would count against none)."""
    version: str | None = None
    """The version label its run records, audit records and traces carry (`keel.versions`)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class TenantConfig:
    """Everything one tenant's runs use."""

    name: str
    """The tenant id (becomes `RunContext.tenant_id`, and so its memory namespace)."""
    agents: Mapping[str, AgentSpec]
    """The tenant's agents, by name."""
    agent: str
    """The agent the `agent` graph serves."""
    supervisor: SupervisorSpec | None = None
    """The `supervisor` graph's setup; None: the tenant has no supervisor."""
    memory_namespace: str = "memories"
    """The first label of its memory namespaces: `(memory_namespace, tenant, user)`."""
    memory: MemorySpec | None = None
    """Where its memories live (a Chroma server); None: the server's store."""
    admission: AdmissionPolicy | None = None
    """Caps on the tenant's (and each user's) running and queued runs, over all its graphs;
    kept in the ledger. None: no caps."""
    prices: PriceTable | None = None
    """The file's `[prices]` over keel's own table (`build_agent(prices=...)`); None: keel's."""


@dataclass(frozen=True, kw_only=True, slots=True)
class UserEntry:
    """One bearer token and whom it authenticates."""

    token_sha256: str
    """SHA-256 (hex) of the token."""
    user_id: str
    """The user."""
    tenant: str
    """The user's tenant."""
    roles: tuple[str, ...] = ("user",)
    """The roles the permission rules match."""


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """The parsed config file."""

    path: Path
    """Where it was read from."""
    tenants: Mapping[str, TenantConfig]
    """Tenants by id."""
    users: tuple[UserEntry, ...]
    """Token entries."""
    ledger_url: str | None = None
    """The ledger database for period budgets (PostgreSQL: the served path must not block)."""
    queued_per_process: int = 5
    """Runs one server process may have waiting in admission queues at once, over every
    tenant (`keel.guards.WaitingRoom`): a queued run waits in one of a worker's
    `N_JOBS_PER_WORKER` job slots. Default: half of `N_JOBS_PER_WORKER` (10 when unset)."""
    metrics_token_sha256: str | None = None
    """SHA-256 (hex) of the bearer token `GET /metrics` answers (`[metrics]`); None: no one."""
    private_webhooks: bool = False
    """Whether a run's `webhook` may name a private address (`[webhooks] private = true`)."""
    cache: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)
    """Graphs built from this config (by the factories in `keel.app.server`)."""

    def authenticate(self, token: str) -> UserEntry | None:
        """The entry whose token this is (constant-time comparison), or None."""
        digest = hashlib.sha256(token.encode()).hexdigest()
        found = None
        for entry in self.users:
            if hmac.compare_digest(entry.token_sha256, digest):
                found = entry
        return found

    def is_metrics_token(self, token: str) -> bool:
        """Whether `token` is the `[metrics]` token (constant-time comparison)."""
        if self.metrics_token_sha256 is None:
            return False
        digest = hashlib.sha256(token.encode()).hexdigest()
        return hmac.compare_digest(self.metrics_token_sha256, digest)

    def tenant(self, name: str) -> TenantConfig:
        """The tenant's config; an authenticated user's tenant always exists (checked at load)."""
        return self.tenants[name]

    @classmethod
    def from_file(cls, path: str | Path) -> ServerConfig:
        """Read and check a server config file (TOML; `~` is the home folder)."""
        p = Path(path).expanduser()
        fix = (
            f"Set {CONFIG_ENV} to the path of a TOML file with [[users]] and [tenants.<id>] "
            "(see keel.app.server_config)."
        )
        text = read_text(p, "keel server config", error=SetupError, missing=fix)
        data = parse_text(text, "toml", f"keel server config {str(p)!r}", error=SetupError)
        try:
            return _parse(p, data)
        except (UserError, TypeError) as exc:
            raise SetupError(f"keel server config {str(p)!r}: {exc}") from exc


def server_config() -> ServerConfig:
    """The config named by `KEEL_SERVER_CONFIG`, read once per process and path.

    No file I/O after the first call: the server calls this on the request path, where
    `langgraph dev` refuses blocking calls (keel.app.auth and keel.app.server read it at import).
    """
    raw = os.environ.get(CONFIG_ENV, "").strip()
    if not raw:
        raise SetupError(
            f"{CONFIG_ENV} is not set. Point it at the server config file, e.g. "
            f"`export {CONFIG_ENV}=keel-server.toml` (see keel.app.server_config for the format)."
        )
    if raw not in _LOADED:
        _LOADED[raw] = ServerConfig.from_file(raw)
    return _LOADED[raw]


_LOADED: dict[str, ServerConfig] = {}


def loaded_configs() -> list[ServerConfig]:
    """The configs `server_config()` read in this process (with what the factories built)."""
    return list(_LOADED.values())


def _parse(path: Path, data: Mapping[str, Any]) -> ServerConfig:
    known = {"users", "tenants", "ledger", "queued_per_process", "prices", "metrics", "webhooks"}
    _only(data, known, "the file")
    tenants_raw = data.get("tenants")
    if not isinstance(tenants_raw, Mapping) or not tenants_raw:
        raise UserError("it needs at least one [tenants.<id>] table.")
    prices = _prices(data.get("prices"))
    tenants = {
        name: replace(_tenant(path, name, raw), prices=prices) for name, raw in tenants_raw.items()
    }
    users_raw = data.get("users", [])
    if not isinstance(users_raw, list) or not users_raw:
        raise UserError("it needs [[users]] entries (token_sha256, user, tenant, roles).")
    users = tuple(_user(i, raw, tenants) for i, raw in enumerate(users_raw))
    seen: dict[str, int] = {}
    for i, user in enumerate(users):
        first = seen.get(user.token_sha256)
        if first is not None:
            raise UserError(
                f"users[{i}] ({user.user_id!r}) has the same token as users[{first}] "
                f"({users[first].user_id!r}): a token must name one user. Give each user its "
                "own token."
            )
        seen[user.token_sha256] = i
    ledger_url = _ledger_url(data)
    capped = sorted(name for name, tenant in tenants.items() if tenant.admission is not None)
    if capped and ledger_url is None:
        raise UserError(
            f"[tenants.{capped[0]}.admission] keeps its run leases in the ledger: add "
            'ledger = "postgresql://..." at the top of the file.'
        )
    return ServerConfig(
        path=path,
        tenants=tenants,
        users=users,
        ledger_url=ledger_url,
        queued_per_process=_queued_per_process(data),
        metrics_token_sha256=_metrics_token(data.get("metrics"), seen),
        private_webhooks=_private_webhooks(data.get("webhooks")),
    )


def _metrics_token(raw: Any, users: Mapping[str, int]) -> str | None:
    """`[metrics]`: the SHA-256 of the token `GET /metrics` answers (`token_sha256` or `token`)."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise UserError('[metrics] must be a table: token_sha256 = "<sha256 hex of the token>".')
    _only(raw, {"token", "token_sha256"}, "[metrics]")
    if ("token" in raw) == ("token_sha256" in raw):
        raise UserError("[metrics] needs exactly one of token_sha256 (preferred) or token.")
    digest = _token_digest(raw, "[metrics]")
    if digest in users:
        raise UserError(
            "[metrics] has the same token as a user: /metrics counts every tenant's runs, so "
            "give the scraper a token of its own."
        )
    return digest


def _private_webhooks(raw: Any) -> bool:
    """`[webhooks] private = true`: a run's webhook may name a private address."""
    if raw is None:
        return False
    if not isinstance(raw, Mapping):
        raise UserError("[webhooks] must be a table: private = true.")
    _only(raw, {"private"}, "[webhooks]")
    private = raw.get("private", False)
    if not isinstance(private, bool):
        raise UserError(f"[webhooks] private must be true or false, got {private!r}.")
    return private


def _prices(raw: Any) -> PriceTable | None:
    """`[prices]`: `"model" = { input_per_mtok = …, output_per_mtok = … }` per model."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise UserError(
            '[prices] must be a table of "model" = { input_per_mtok = …, output_per_mtok = … }, '
            f"got {raw!r}."
        )
    table = {}
    for name, entry in raw.items():
        where = f"[prices] {name!r}"
        if not isinstance(entry, Mapping):
            raise UserError(
                f"{where} must be {{ input_per_mtok = …, output_per_mtok = … }} (USD per 1M "
                f"tokens), got {entry!r}."
            )
        _only(entry, {"input_per_mtok", "output_per_mtok"}, where)
        missing = sorted({"input_per_mtok", "output_per_mtok"} - set(entry))
        if missing:
            raise UserError(f"{where} needs {' and '.join(missing)} (USD per 1M tokens).")
        table[name] = Price(**entry)
    return PriceTable(table)


JOBS_ENV = "N_JOBS_PER_WORKER"
"""The environment variable both servers (LangGraph's and Aegra) read their job slots from."""


def _queued_per_process(data: Mapping[str, Any]) -> int:
    """`queued_per_process`, or half of the worker's job slots: the other half stay for runs."""
    if "queued_per_process" in data:
        value = data["queued_per_process"]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise UserError(
                f"queued_per_process must be a whole number, 0 or more, got {value!r} (0: a run "
                "over its tenant's running cap is refused at once, never queued)."
            )
        return value
    raw = os.environ.get(JOBS_ENV, "").strip()
    try:
        jobs = int(raw) if raw else 10
    except ValueError:
        raise UserError(
            f"{JOBS_ENV}={raw!r} is not a whole number; keel sizes queued_per_process from it. "
            "Fix it, or set queued_per_process in the server config."
        ) from None
    return max(jobs, 0) // 2


def _ledger_url(data: Mapping[str, Any]) -> str | None:
    if "ledger" not in data:
        return None
    url = _expand(_text(data, "ledger", "the file"), "ledger")
    if not url.startswith(("postgresql://", "postgres://")):
        raise UserError(
            f"ledger = {url!r}: a served ledger must be PostgreSQL (postgresql://...); the SQLite "
            "ledger creates its file with blocking calls, which `langgraph dev` refuses."
        )
    return url


def _expand(value: str, key: str) -> str:
    """`value` with `$VAR` / `${VAR}` replaced from the environment; an unset one is named."""
    unset = [
        name
        for name in re.findall(r"\$\{(\w+)\}|\$(\w+)", value)
        for name in name
        if name and name not in os.environ
    ]
    if unset:
        raise UserError(
            f"{key} = {value!r} uses the environment variable {unset[0]}, which is not set. "
            f"Set it (export {unset[0]}=...) before starting the server."
        )
    return os.path.expandvars(value)


def _user(i: int, raw: Any, tenants: Mapping[str, TenantConfig]) -> UserEntry:
    where = f"users[{i}]"
    if not isinstance(raw, Mapping):
        raise UserError(f"{where} must be a table.")
    _only(raw, {"token", "token_sha256", "user", "tenant", "roles"}, where)
    if ("token" in raw) == ("token_sha256" in raw):
        raise UserError(f"{where} needs exactly one of token_sha256 (preferred) or token.")
    digest = _token_digest(raw, where)
    tenant = _text(raw, "tenant", where)
    if tenant not in tenants:
        raise UserError(f"{where}: tenant {tenant!r} has no [tenants.{tenant}] table.")
    roles = raw.get("roles", ["user"])
    if not isinstance(roles, list) or not all(isinstance(r, str) and r for r in roles):
        raise UserError(f"{where}: roles must be a list of role names, got {roles!r}.")
    return UserEntry(
        token_sha256=digest,
        user_id=_text(raw, "user", where),
        tenant=tenant,
        roles=tuple(roles),
    )


_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


def _token_digest(raw: Mapping[str, Any], where: str) -> str:
    """The user's token's SHA-256 (hex), from `token_sha256` or `token`.

    A digest that is not 64 hex digits, or a token that is empty or has spaces around it
    (keel's auth strips the token a client sends), would make a user no token can log in as.
    """
    if "token_sha256" in raw:
        digest = raw["token_sha256"]
        if not isinstance(digest, str) or not _SHA256_HEX.fullmatch(digest):
            raise UserError(
                f"{where}: token_sha256 must be the 64 hex digits of the token's SHA-256 "
                f"(`printf %s TOKEN | sha256sum`), got {digest!r}."
            )
        return digest.lower()
    token = raw["token"]
    if not isinstance(token, str) or not token.strip() or token != token.strip():
        raise UserError(
            f"{where}: token must be a non-empty string without spaces around it (keel's auth "
            "strips the token a client sends, so no client could send this one)."
        )
    return hashlib.sha256(token.encode()).hexdigest()


def _tenant(path: Path, name: str, raw: Any) -> TenantConfig:
    where = f"tenants.{name}"
    if not isinstance(raw, Mapping):
        raise UserError(f"[{where}] must be a table.")
    _only(
        raw,
        {"agent", "agents", "supervisor", "memory_namespace", "memory", "admission"},
        f"[{where}]",
    )
    memory_namespace = raw.get("memory_namespace", "memories")
    if not isinstance(memory_namespace, str) or not memory_namespace or "." in memory_namespace:
        raise UserError(
            f"[{where}] memory_namespace must be a non-empty label without '.', "
            f"got {memory_namespace!r}."
        )
    agents_raw = raw.get("agents")
    if not isinstance(agents_raw, Mapping) or not agents_raw:
        raise UserError(f"[{where}] needs at least one [{where}.agents.<name>] table.")
    agents = {n: _agent(path, f"{where}.agents.{n}", n, a) for n, a in agents_raw.items()}
    agents = {
        n: _with_canary(path, f"{where}.agents.{n}", spec, agents_raw[n].get("canary"), agents)
        for n, spec in agents.items()
    }
    agent = raw.get("agent", next(iter(agents)))
    if agent not in agents:
        raise UserError(f"[{where}] agent = {agent!r} is not one of its agents {sorted(agents)}.")
    supervisor = None
    if "supervisor" in raw:
        sup = raw["supervisor"]
        if not isinstance(sup, Mapping):
            raise UserError(f"[{where}] supervisor must be a table.")
        _only(sup, {"model", "agents", "system_prompt", "policy", "version"}, f"{where}.supervisor")
        names = sup.get("agents", list(agents))
        unknown = sorted(set(names) - set(agents)) if isinstance(names, list) else names
        if unknown:
            raise UserError(f"{where}.supervisor agents {unknown!r} are not in {sorted(agents)}.")
        _check_model(_text(sup, "model", f"{where}.supervisor"), f"{where}.supervisor model")
        policy = _policy(path, sup.get("policy"), f"{where}.supervisor")
        limited = [n for n in names if _limits(agents[n].policy)]
        if policy is None and limited:
            raise UserError(
                f"{where}.supervisor routes to {limited[0]!r}, whose policy has a budget or rate "
                "limits, but names no policy of its own: its router's model calls would count "
                'against none. Add policy = "policy.toml" (a path or a table, as an agent\'s) to '
                "the supervisor; its run budget counts the whole task, its agents' calls included."
            )
        supervisor = SupervisorSpec(
            model=_text(sup, "model", f"{where}.supervisor"),
            agents=tuple(names),
            system_prompt=sup.get("system_prompt"),
            policy=policy,
            version=_text(sup, "version", f"{where}.supervisor") if "version" in sup else None,
        )
    return TenantConfig(
        name=name,
        agents=agents,
        agent=agent,
        supervisor=supervisor,
        memory_namespace=memory_namespace,
        memory=memory_spec(raw["memory"], where, _expand) if "memory" in raw else None,
        admission=_admission(raw.get("admission"), f"{where}.admission"),
    )


def _admission(raw: Any, where: str) -> AdmissionPolicy | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise UserError(f"[{where}] must be a table (tenant_running = 5, ...).")
    _only(raw, set(AdmissionPolicy.__dataclass_fields__), f"[{where}]")
    try:
        return AdmissionPolicy(**raw)
    except UserError as exc:
        raise UserError(f"[{where}]: {exc}") from exc


BUNDLED_TOOLS = frozenset(
    {"remember", "recall_memories", "forget", "issue_refund", "lookup_order", "search_policy"}
)
"""Tools a server config may name without an import path (memory tools, the demo's tools)."""


def _check_model(model: str, where: str) -> None:
    """A bundled `keel:` model must exist; any other must read `provider:name`."""
    if model.startswith("keel:") and model not in BUNDLED_MODELS:
        raise UserError(
            f"{where} {model!r} is not a bundled model; keel bundles {sorted(BUNDLED_MODELS)}."
        )
    provider, _, name = model.partition(":")
    if not provider or not name:
        raise UserError(
            f"{where} {model!r} must read 'provider:name' (e.g. 'openai:gpt-4o-mini') or name "
            f"a bundled model ({', '.join(sorted(BUNDLED_MODELS))})."
        )


_OVERRIDES = {"model", "system_prompt", "tools", "policy", "plan"}
"""What a canary may change on its agent (or `agent = "other"` serves another agent)."""


def _with_canary(
    path: Path, where: str, spec: AgentSpec, raw: Any, agents: Mapping[str, AgentSpec]
) -> AgentSpec:
    """`spec` with its canary, when `raw` (the `canary` table) gives one."""
    if raw is None:
        return spec
    where = f"{where}.canary"
    if not isinstance(raw, Mapping):
        raise UserError(f'[{where}] must be a table: share = 0.1, version = "v2", ...')
    _only(raw, {"share", "version", "agent", *_OVERRIDES}, f"[{where}]")
    share = raw.get("share")
    if isinstance(share, bool) or not isinstance(share, int | float) or not 0 <= share <= 1:
        raise UserError(f"[{where}] share must be a number from 0 to 1 (0.1 = 10%), got {share!r}.")
    version = _text(raw, "version", f"[{where}]")
    if version == spec.version:
        raise UserError(
            f"[{where}] version {version!r} is the agent's own version: give the candidate its "
            "own label, so the runs it serves can be told apart."
        )
    overrides = _OVERRIDES & set(raw)
    if "agent" in raw:
        other = raw["agent"]
        if overrides:
            raise UserError(
                f"[{where}] agent = {other!r} serves another agent as it is; drop "
                f"{sorted(overrides)} or drop agent."
            )
        if other not in agents or other == spec.name:
            raise UserError(
                f"[{where}] agent = {other!r} must be another of the tenant's agents "
                f"{sorted(set(agents) - {spec.name})}."
            )
        base = replace(agents[other], canary=None)
    else:
        if not overrides:
            raise UserError(
                f"[{where}] changes nothing: set one of {sorted(_OVERRIDES)}, or agent = "
                '"<another agent>".'
            )
        table = {
            "model": spec.model,
            "description": spec.description,
            "system_prompt": spec.system_prompt,
            "tools": list(spec.tools),
            "plan": spec.plan,
            **{k: raw[k] for k in overrides},
        }
        parsed = replace(_agent(path, where, spec.name, table), options=spec.options)
        base = parsed if "policy" in overrides else replace(parsed, policy=spec.policy)
    candidate = replace(base, name=spec.name, version=version, canary=None)
    return replace(spec, canary=CanarySpec(share=float(share), candidate=candidate))


def _agent(path: Path, where: str, name: str, raw: Any) -> AgentSpec:
    if not isinstance(raw, Mapping):
        raise UserError(f"[{where}] must be a table.")
    known = {"model", "description", "system_prompt", "tools", "policy", "plan", *AGENT_KEYS}
    _only(raw, {*known, "version", "canary"}, f"[{where}]")
    tools = raw.get("tools", [])
    if not isinstance(tools, list) or not all(isinstance(t, str) for t in tools):
        raise UserError(f"[{where}] tools must be a list of tool names, got {tools!r}.")
    for ref in tools:
        if ref not in BUNDLED_TOOLS and ":" not in ref:
            raise UserError(
                f"[{where}] unknown tool {ref!r}. Use a bundled tool "
                f"({', '.join(sorted(BUNDLED_TOOLS))}) or 'package.module:attribute'."
            )
    _check_model(_text(raw, "model", f"[{where}]"), f"[{where}] model")
    policy = _policy(path, raw.get("policy"), f"[{where}]")
    return AgentSpec(
        name=name,
        model=_text(raw, "model", f"[{where}]"),
        description=str(raw.get("description", "")),
        system_prompt=raw.get("system_prompt"),
        tools=tuple(tools),
        policy=policy,
        plan=bool(raw.get("plan", False)),
        options=agent_options(raw, where, _check_model),
        version=_text(raw, "version", f"[{where}]") if "version" in raw else None,
    )


def _policy(path: Path, raw: Any, where: str) -> Policy | None:
    """`policy = "file.toml"` (relative to the config file) or `policy = { ... }`."""
    if isinstance(raw, str):
        return Policy.from_file(path.parent / raw)
    if isinstance(raw, Mapping):
        return Policy.from_dict(raw)
    if raw is not None:
        raise UserError(f"{where} policy must be a file path or a table, got {raw!r}.")
    return None


def _limits(policy: Policy | None) -> bool:
    """Whether `policy` limits spend or calls (a run budget, period budgets, rate limits)."""
    return policy is not None and bool(policy.budget or policy.period_budgets or policy.rate_limits)


def _text(raw: Mapping[str, Any], key: str, where: str) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not value.strip():
        raise UserError(f'{where} needs {key} = "..." (a non-empty string), got {value!r}.')
    return value


def _only(raw: Mapping[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UserError(f"unknown key(s) {unknown} in {where}; allowed: {sorted(known)}.")
