"""LangSmith tracing with keel's PII sanitizer on every input and output.

When `LANGSMITH_API_KEY` and `LANGSMITH_TRACING=true` are set (or the `LANGCHAIN_*` twins),
`build_agent` attaches a LangChain tracer whose LangSmith `Client` passes every run's inputs
and outputs through `keel.guards.sanitize` (`Client(hide_inputs=..., hide_outputs=...)`), and
names and tags the runs (`keel`, `graph:<name>`, `version:<id>`) with metadata: graph, policy,
keel version, and the agent version (`keel.versions`: label, model, system-prompt hash, tools).
LangChain adds its own (unsanitized) tracer only when none is present, so this one replaces it.

`trace_config(context)` adds the per-run metadata (user, tenant) to a run's config:

    agent.invoke(state, trace_config(ctx), context=ctx)

With no key nothing is sent and nothing fails (with tracing switched on but no key,
LangChain's own tracer would post unsanitized runs anyway; keel puts a silent tracer in its
place). The client sends from a background thread; a LangSmith outage (errors, timeouts) is
logged by `langsmith` and never fails a run.
"""

from __future__ import annotations

import os
from typing import Any

from langchain_core.runnables import RunnableConfig
from langchain_core.tracers.langchain import LangChainTracer

from keel._version import __version__
from keel.observe.switch import NO_KEY_WARNING, switched_on, tracing_enabled, tracing_without_key
from keel.redact import sanitize, sanitized_logger
from keel.state import RunContext
from keel.versions import AgentVersion

__all__ = [
    "NO_KEY_WARNING",
    "graph_config",
    "sanitized",
    "sanitizing_client",
    "trace_config",
    "tracer",
    "tracing_enabled",
    "tracing_without_key",
]

log = sanitized_logger("keel.observe.tracing")


def sanitized(values: dict[str, Any]) -> dict[str, Any]:
    """A run's inputs or outputs with PII redacted (the `hide_inputs` / `hide_outputs` hook)."""
    return sanitize(values)


def sanitizing_client(**kwargs: Any) -> Any:
    """A `langsmith.Client` that redacts PII from every run's inputs and outputs."""
    from langsmith import Client

    # langsmith caches what it reads from the environment (an lru_cache on get_env_var), so
    # the endpoint and key are read here, as they are now
    env = os.environ
    kwargs.setdefault("api_url", env.get("LANGSMITH_ENDPOINT") or env.get("LANGCHAIN_ENDPOINT"))
    kwargs.setdefault("api_key", env.get("LANGSMITH_API_KEY") or env.get("LANGCHAIN_API_KEY"))
    return Client(hide_inputs=sanitized, hide_outputs=sanitized, **kwargs)


def _metadata(graph: str, policy: str | None, version: AgentVersion | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"graph": graph, "keel_version": __version__}
    if version is not None:
        meta.update(version.metadata())
    if policy is not None:
        meta["policy"] = policy
    return meta


def _tags(graph: str, version: AgentVersion | None) -> list[str]:
    return ["keel", f"graph:{graph}", *([f"version:{version.id}"] if version else [])]


class _SanitizingTracer(LangChainTracer):
    """Also redacts each run's `serialized` description and `error`.

    A model's repr can hold user data; the error of a tool or model that raised (exception and
    traceback) quotes its arguments or the provider's echo of the input.
    """

    def _start_trace(self, run: Any) -> None:
        if getattr(run, "serialized", None):
            run.serialized = sanitized(run.serialized)
        super()._start_trace(run)

    def _end_trace(self, run: Any) -> None:
        if getattr(run, "error", None):
            run.error = sanitize(run.error)
        super()._end_trace(run)


class _SilentTracer(LangChainTracer):
    """A tracer that sends nothing, in place of LangChain's default when there is no key.

    With tracing switched on but no key, LangChain's default tracer still posts every run,
    unsanitized, to the endpoint; this one's presence keeps that one out.
    """

    def _start_trace(self, run: Any) -> None:
        super()._start_trace(run)
        run.extra["__disabled"] = True  # LangChainTracer skips posting such runs


def _offline_client() -> Any:
    """A LangSmith client that never reaches the network, for the silent tracer.

    `Client()`'s default batching thread asks the API for its limits (`GET /info`) at once,
    even with no key and no run to send; without it nothing is fetched. Its missing-key warning
    is keel's own one line already.
    """
    import warnings

    from langsmith.utils import LangSmithMissingAPIKeyWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LangSmithMissingAPIKeyWarning)
        return sanitizing_client(auto_batch_tracing=False)


def tracer(
    *,
    graph: str,
    policy: str | None = None,
    client: Any = None,
    version: AgentVersion | None = None,
) -> LangChainTracer:
    """A LangSmith tracer for `graph` with sanitized inputs and outputs, tags and metadata."""
    return _SanitizingTracer(
        client=client if client is not None else sanitizing_client(),
        tags=_tags(graph, version),
        metadata=_metadata(graph, policy, version),
    )


def graph_config(
    *, graph: str, policy: str | None, version: AgentVersion | None = None
) -> RunnableConfig | None:
    """The config `build_agent` binds for tracing, or None.

    Enabled: run name, tags, metadata (with the agent `version`: label or id, model, prompt
    hash, tool versions, policy) and the sanitizing tracer. Switched on without a key: a
    silent tracer. Off: None (nothing bound, nothing sent).
    """
    if not tracing_enabled():
        if not switched_on(os.environ):
            return None
        log.warning(NO_KEY_WARNING)
        return {"callbacks": [_SilentTracer(client=_offline_client())]}
    return {
        "run_name": graph,
        "tags": _tags(graph, version),
        "metadata": _metadata(graph, policy, version),
        "callbacks": [tracer(graph=graph, policy=policy, version=version)],
    }


def trace_config(context: RunContext, config: RunnableConfig | None = None) -> RunnableConfig:
    """`config` plus the run's identity as trace metadata (`user_id`, `tenant_id`, `roles`)."""
    out: RunnableConfig = dict(config or {})  # type: ignore[assignment]
    out["metadata"] = {
        **(out.get("metadata") or {}),
        "user_id": context.user_id,
        "tenant_id": context.tenant_id,
        "roles": list(context.roles),
    }
    return out
