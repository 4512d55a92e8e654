"""What a refused run (admission control, `keel.guards.admission`) yields and records.

A refused run writes nothing to its thread: its output is the outcome alone
(`{"outcome": {"status": "stopped", "terminated_reason": "overloaded", ...}}`) in each stream
mode that carries state (`values`, and `updates` as the node `admission`); the ledger gets an
audit record (kind `admission`) and a run record, so `keel report` counts it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import Any

from langchain_core.runnables import RunnableConfig

from keel.db.audit import AuditRecord
from keel.db.runs import RunRecord
from keel.guards.admission import Lease
from keel.identity import context_from_user
from keel.state import Outcome, RunContext
from keel.versions import AgentVersion

__all__ = ["refused_chunks", "refused_records", "run_context"]


def run_context(config: RunnableConfig | None, context: Any) -> RunContext:
    """Who a run is for, as keel's nodes will see it (the server's user wins over `context`)."""
    configurable = (config or {}).get("configurable") or {}
    user = configurable.get("langgraph_auth_user")
    if user is not None and hasattr(user, "identity"):
        metadata = (config or {}).get("metadata")
        return context_from_user(user, metadata if isinstance(metadata, Mapping) else None)
    if isinstance(context, RunContext):
        return context
    if isinstance(context, Mapping):
        return RunContext(**context)
    return RunContext()


def refused_records(
    config: RunnableConfig | None,
    context: RunContext,
    lease: Lease,
    result: Outcome,
    graph: str,
    version: AgentVersion | None = None,
    policy: str | None = None,
) -> tuple[AuditRecord, RunRecord]:
    """The audit record and the run record of a refused run.

    `policy` is `name@version` as the run's other records name it; else the context's name.
    """
    policy = policy or context.policy
    configurable = (config or {}).get("configurable") or {}
    thread = configurable.get("thread_id")
    run_id = configurable.get("run_id")
    now = time.time()
    served = version.fields() if version is not None else {}
    audit = AuditRecord(
        kind="admission",
        decision="overloaded",
        status="stopped",
        result=result["detail"],
        user_id=context.user_id,
        tenant_id=context.tenant_id,
        thread_id=None if thread is None else str(thread),
        run_id=None if run_id is None else str(run_id),
        policy=policy,
        at=now,
        **served,
    )
    record = RunRecord(
        run_key=f"{thread or '-'}:overloaded:{lease.id}",
        status=result["status"],
        terminated_reason=result["terminated_reason"],
        error_category="overloaded",
        detail=result["detail"],
        thread_id=None if thread is None else str(thread),
        run_id=None if run_id is None else str(run_id),
        graph=graph,
        policy=policy,
        user_id=context.user_id,
        tenant_id=context.tenant_id,
        started_at=now,
        ended_at=now,
        tool_versions=dict(version.tool_versions) if version is not None else {},
        **served,
    )
    return audit, record


def refused_chunks(result: Outcome, kwargs: Mapping[str, Any], default_mode: Any) -> Iterator[Any]:
    """What `stream` yields for a refused run, shaped as the caller's stream mode asks."""
    mode = kwargs.get("stream_mode") or default_mode
    modes = [mode] if isinstance(mode, str) else list(mode)
    subgraphs = bool(kwargs.get("subgraphs"))
    v2 = kwargs.get("version") == "v2"
    for m in modes:
        if m == "values":
            data: Any = {"outcome": result}
        elif m == "updates":
            data = {"admission": {"outcome": result}}
        else:
            continue
        if v2:
            part = {"type": m, "ns": (), "data": data}
            yield {**part, "interrupts": ()} if m == "values" else part
        elif isinstance(mode, str):
            yield ((), data) if subgraphs else data
        else:
            yield ((), m, data) if subgraphs else (m, data)
