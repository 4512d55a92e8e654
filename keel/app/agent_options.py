"""What a served agent may use beyond model, tools and policy: memory, verify, fallbacks.

A served agent gets everything an embedded one has through its server config table (see
`keel.app.server_config`); `keel.app.server` turns these into `build_agent` arguments.

```toml
[tenants.acme.memory]                      # where the tenant's memories live
chroma_url = "http://127.0.0.1:8000"       # a Chroma server; omit the table: the server's store
collection = "keel"                        # the ChromaStore name (default "keel")
index = "mypkg.embed:index"                # optional: an IndexConfig (or a function returning
                                           # one); default keel's offline MiniLM

[tenants.acme.agents.billing]
memory = true                              # recall before the run, a lesson after it
fallback_models = ["openai:gpt-4o-mini"]   # tried in order when the model is down
model_timeout = 30                         # seconds per model call attempt
verify = { judge = "keel:...", max_revisions = 1, escalate = false }
```
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from keel.errors import UserError

__all__ = ["AGENT_KEYS", "AgentOptions", "MemorySpec", "VerifySpec", "agent_options", "memory_spec"]

AGENT_KEYS = frozenset({"memory", "fallback_models", "model_timeout", "verify"})
"""The keys of an agent table this module reads."""


@dataclass(frozen=True, kw_only=True, slots=True)
class VerifySpec:
    """How a served agent's final answers are verified (`build_agent(judge=...)`)."""

    judge: str
    """The judging model: `provider:name`, `keel:...` or `package.module:attribute`."""
    max_revisions: int = 1
    """How often a failed answer goes back to the model."""
    escalate: bool = False
    """When revisions are used up, ask a human instead of ending as `verification_failed`."""


@dataclass(frozen=True, kw_only=True, slots=True)
class AgentOptions:
    """The embedded-agent features a served agent turns on."""

    memory: bool = False
    """Recall the user's memories before a run and store a lesson after it."""
    fallback_models: tuple[str, ...] = ()
    """Models tried in order when the agent's model is down."""
    model_timeout: float | None = None
    """Seconds each model call attempt may take; None: the provider client's own."""
    verify: VerifySpec | None = None
    """Verification by a judge; None: answers are not verified."""


@dataclass(frozen=True, kw_only=True, slots=True)
class MemorySpec:
    """Where a tenant's long-term memory lives."""

    chroma_url: str | None = None
    """`http://host:port` of a Chroma server (`chroma run`); None: the server's own store."""
    collection: str = "keel"
    """The `ChromaStore` name on that server."""
    index: str | None = None
    """`package.module:attribute` of an `IndexConfig` (or a function returning one); None:
    `keel.memory.default_index()` (offline MiniLM, never downloaded)."""


def agent_options(raw: Mapping[str, Any], where: str, check_model: Any) -> AgentOptions:
    """Read an agent table's `memory`, `fallback_models`, `model_timeout` and `verify` keys."""
    memory = raw.get("memory", False)
    if not isinstance(memory, bool):
        raise UserError(f"[{where}] memory must be true or false, got {memory!r}.")
    fallbacks = raw.get("fallback_models", [])
    if not isinstance(fallbacks, list) or not all(isinstance(m, str) for m in fallbacks):
        raise UserError(
            f"[{where}] fallback_models must be a list of model strings, got {fallbacks!r}."
        )
    for model in fallbacks:
        check_model(model, f"[{where}] fallback_models entry")
    timeout = raw.get("model_timeout")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0
    ):
        raise UserError(f"[{where}] model_timeout must be seconds > 0, got {timeout!r}.")
    return AgentOptions(
        memory=memory,
        fallback_models=tuple(fallbacks),
        model_timeout=None if timeout is None else float(timeout),
        verify=_verify(raw.get("verify"), where, check_model),
    )


def _verify(raw: Any, where: str, check_model: Any) -> VerifySpec | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise UserError(f'[{where}] verify must be a table, e.g. {{ judge = "keel:..." }}.')
    _only(raw, {"judge", "max_revisions", "escalate"}, f"{where}.verify")
    judge = raw.get("judge")
    if not isinstance(judge, str) or not judge.strip():
        raise UserError(f'{where}.verify needs judge = "provider:name" (the judging model).')
    check_model(judge, f"{where}.verify judge")
    revisions = raw.get("max_revisions", 1)
    if isinstance(revisions, bool) or not isinstance(revisions, int) or revisions < 0:
        raise UserError(f"{where}.verify max_revisions must be 0 or more, got {revisions!r}.")
    escalate = raw.get("escalate", False)
    if not isinstance(escalate, bool):
        raise UserError(f"{where}.verify escalate must be true or false, got {escalate!r}.")
    return VerifySpec(judge=judge, max_revisions=revisions, escalate=escalate)


def memory_spec(raw: Any, where: str, expand: Any) -> MemorySpec:
    """Read a tenant's `memory` table (`chroma_url` may use `${VAR}`)."""
    if not isinstance(raw, Mapping):
        raise UserError(f"[{where}] memory must be a table, e.g. {{ chroma_url = ... }}.")
    _only(raw, {"chroma_url", "collection", "index"}, f"[{where}.memory]")
    url = raw.get("chroma_url")
    if url is not None:
        if not isinstance(url, str):
            raise UserError(f"[{where}.memory] chroma_url must be a string, got {url!r}.")
        url = expand(url, f"{where}.memory chroma_url")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UserError(
                f"[{where}.memory] chroma_url = {url!r} must look like 'http://127.0.0.1:8000' "
                "(a server started with `chroma run --path DIR --port N`)."
            )
    collection = raw.get("collection", "keel")
    if not isinstance(collection, str) or not collection:
        raise UserError(f"[{where}.memory] collection must be a name, got {collection!r}.")
    index = raw.get("index")
    if index is not None and (not isinstance(index, str) or ":" not in index):
        raise UserError(
            f"[{where}.memory] index must read 'package.module:attribute', got {index!r}."
        )
    return MemorySpec(chroma_url=url, collection=collection, index=index)


def _only(raw: Mapping[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UserError(f"unknown key(s) {unknown} in {where}; allowed: {sorted(known)}.")
