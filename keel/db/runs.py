"""Run records: one row per run in the ledger database (`keel_runs`), feeding `keel report`.

A *run* is one task on a thread: from a user message to its final answer (or stop). Its record
is written when the run ends, and also when it pauses for a human (`status="interrupted"`);
the same row is updated when the resumed run ends. A run the caller cancels is recorded as
`stopped/cancelled` unless its row already says how it ended (a run cancelled after its end
was recorded, while its last steps were saved, keeps that end). Tokens, dollars, steps and
model calls are the run's own: the state's totals for the thread minus the totals when the run
started (its run clock, `keel.state.task_base`), or else minus those of the thread's previous
run record; a run continued after its checkpointer failed adds what its saved state lost
(`unsaved_flow`). A note of the orphaned calls a run reported (`orphans_note`) stays in its
record when the record is written again (a paused run's end), and a second record of its end
that is refused (the end the run recorded stands) adds its own note to the record that stands.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, NamedTuple

from langchain_core.messages import ToolMessage

from keel._version import __version__
from keel.db.ledger import Flow, Ledger
from keel.db.tables import FEEDBACK, RUNS, storable, where_clause
from keel.errors import UserError
from keel.redact import sanitize
from keel.state import AgentState, task_start

__all__ = [
    "Recorded",
    "RunLog",
    "RunRecord",
    "error_category",
    "orphans_note",
    "record_flow",
    "recorded_flow",
    "run_record",
    "scores_flow",
    "thread_users_flow",
    "unsaved_flow",
    "upsert_flow",
]

_USAGE = ("steps", "model_calls", "input_tokens", "output_tokens", "usd")
_FAILED = frozenset({"error", "timeout", "invalid_args", "unknown_tool"})
STORAGE_FAILED = "storage failed"
"""How the detail of a run that ended because keel's storage failed starts (category `storage`)."""
UNSAVED_KEY = "keel_unsaved_usage"
"""The `configurable` key of a run that continues a run whose record counts more than its saved
state holds (`unsaved_flow`): `{"graph", "run_key", "usage"}`, set by keel (a caller's is
dropped)."""
_MODEL_ERROR = re.compile(r"model call failed after \d+ attempt\(s\): (\w+)")
_ORPHANS_END = "keel audit --decision orphaned lists them)"
_KEPT_NOTES = re.compile(r"\(orphaned: .*?" + re.escape(_ORPHANS_END), re.DOTALL)
"""The notes of a run's record a later write of it keeps (`recorded_flow`): `orphans_note`."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RunRecord:
    """What one run did and cost."""

    run_key: str
    """`<thread>:<id of the user message that started the run>`: stable across a pause."""
    status: str
    """The outcome's status: `success`, `stopped`, `error` or `interrupted`."""
    terminated_reason: str
    """The outcome's `terminated_reason`."""
    detail: str = ""
    """The outcome's detail."""
    error_category: str | None = None
    """`None` for a completed run; else the reason, or `model:<ExceptionType>` for a failure."""
    thread_id: str | None = None
    """The LangGraph thread."""
    run_id: str | None = None
    """The id the caller or the server gave the run that started it (a resume keeps it)."""
    graph: str | None = None
    """The graph's name."""
    policy: str | None = None
    """`name@version` of the policy."""
    user_id: str | None = None
    """The user (`RunContext.user_id`)."""
    tenant_id: str | None = None
    """The tenant."""
    steps: int = 0
    """Node steps the run took."""
    model_calls: int = 0
    """Model calls."""
    input_tokens: int = 0
    """Input tokens."""
    output_tokens: int = 0
    """Output tokens."""
    usd: float = 0.0
    """Cost in US dollars."""
    latency_s: float = 0.0
    """Seconds from the run's start to its end (including any wait for a human)."""
    tool_calls: int = 0
    """Tool calls answered in the run."""
    tool_failures: int = 0
    """Of those, how many failed (error, timeout, invalid arguments, unknown tool)."""
    tools: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per tool: `{"calls": n, "failures": m}`."""
    interrupts: int = 0
    """Times the run paused for a human."""
    guard_findings: dict[str, int] = field(default_factory=dict)
    """What the content guards found in the run, per `<guard>:<rule>`
    (`{"input:instruction_override": 1, "output:pii:card": 1}`)."""
    started_at: float = 0.0
    """Unix time the run started."""
    ended_at: float = field(default_factory=time.time)
    """Unix time of the record (the end, or the pause)."""
    keel_version: str | None = None
    """keel's version."""
    version: str | None = None
    """The agent version that served the run (`keel.versions.AgentVersion.id`: the label given
    to `build_agent(version=...)` or the server config, else `auto-<digest>`); `None` on
    records written before schema version 6."""
    model: str | None = None
    """The chat model's name."""
    prompt_hash: str | None = None
    """The hash of the system prompt (`keel.versions.prompt_hash`)."""
    tool_versions: dict[str, str] = field(default_factory=dict)
    """Each tool's version, by name."""

    def to_dict(self) -> dict[str, Any]:
        """The record as a JSON-able dict."""
        return asdict(self)


def error_category(outcome: Mapping[str, Any]) -> str | None:
    """The category a report groups a run under: `None` when it completed."""
    reason = str(outcome.get("terminated_reason", "error"))
    if reason == "completed":
        return None
    if reason == "error":
        detail = str(outcome.get("detail", ""))
        if detail.startswith(STORAGE_FAILED):
            return "storage"
        found = _MODEL_ERROR.search(detail)
        return f"model:{found.group(1)}" if found else "error"
    return reason


def _detail(outcome: Mapping[str, Any], warnings: list[str]) -> str:
    """The outcome's detail, with what degraded on the way (`AgentState.warnings`)."""
    detail = str(outcome.get("detail", ""))
    return f"{detail} (degraded: {'; '.join(warnings)})" if warnings else detail


def orphans_note(calls: Sequence[tuple[str, str]]) -> str:
    """What a run record's `detail` says of the orphaned calls its run reported (sanitized).

    `calls` are `(tool, tool_call_id)`. A later write of the run's record (the end of a run
    that paused) keeps it (`recorded_flow`).
    """
    named = ", ".join(f"{tool} {call_id}" for tool, call_id in calls)
    return sanitize(
        f"(orphaned: {named} started and never finished, their requests lost in a crash or left "
        f"on a branch a fork abandoned; they may or may not have happened; {_ORPHANS_END}"
    )


def _kept_notes(record: RunRecord, stored: RunRecord) -> RunRecord:
    """`record`, with the notes of `stored` (its run's other record) it lacks (`_KEPT_NOTES`)."""
    notes = [n for n in _KEPT_NOTES.findall(stored.detail) if n not in record.detail]
    if not notes:
        return record
    return replace(record, detail=" ".join([record.detail, *notes]).strip())


def run_record(state: AgentState, **identity: Any) -> RunRecord:
    """The record of the run `state` is at (thread totals; `RunLog` subtracts the previous run).

    `identity` gives `thread_id`, `run_id`, `graph`, `policy`, `user_id`, `tenant_id`, and the
    agent version (`version`, `model`, `prompt_hash`, `tool_versions`).
    """
    messages = state.get("messages") or []
    start = task_start(messages)
    result = state.get("outcome") or {"status": "error", "terminated_reason": "error"}
    usage: Mapping[str, Any] = state.get("usage") or {}
    tools: dict[str, dict[str, int]] = {}
    for m in messages[start + 1 :]:
        if isinstance(m, ToolMessage):
            entry = tools.setdefault(sanitize(m.name or "?"), {"calls": 0, "failures": 0})
            entry["calls"] += 1
            entry["failures"] += m.response_metadata.get("keel_status") in _FAILED
    findings: dict[str, int] = {}
    for m in messages[max(start, 0) :]:
        note = m.response_metadata.get("keel_guard")
        if isinstance(note, dict):
            for rule in note.get("rules") or []:
                key = f"{note.get('guard')}:{rule}"
                findings[key] = findings.get(key, 0) + 1
    started = float((state.get("clock") or {}).get("started_at") or time.time())
    human_id = messages[start].id if start >= 0 else None

    return RunRecord(
        run_key=f"{identity.get('thread_id') or '-'}:{human_id or started}",
        status=str(result["status"]),
        terminated_reason=str(result["terminated_reason"]),
        detail=sanitize(_detail(result, state.get("warnings") or [])),
        error_category=error_category(result),
        **identity,
        steps=int(usage.get("steps", 0)),
        model_calls=int(usage.get("model_calls", 0)),
        input_tokens=int(usage.get("input_tokens", 0)),
        output_tokens=int(usage.get("output_tokens", 0)),
        usd=float(usage.get("usd", 0.0)),
        latency_s=max(0.0, time.time() - started),
        tool_calls=sum(t["calls"] for t in tools.values()),
        tool_failures=sum(t["failures"] for t in tools.values()),
        tools=tools,
        interrupts=int(result["status"] == "interrupted"),
        guard_findings=findings,
        started_at=started,
        keel_version=__version__,
    )


class RunLog:
    """Run records in `ledger`'s database: `write` / `awrite` one, `query` them.

    Example:
        ```python
        runs = RunLog(Ledger("sqlite:///.keel/keel.db")).query(tenant="acme")
        ```
    """

    def __init__(self, ledger: Ledger) -> None:
        if not isinstance(ledger, Ledger):
            raise UserError(
                f"RunLog needs a keel.Ledger (RunLog(Ledger(url))), got {type(ledger).__name__}."
            )
        self.ledger = ledger

    def write(
        self, record: RunRecord, base: Mapping[str, float] | None = None, *, first_end: bool = False
    ) -> RunRecord:
        """Insert or update the run's row; returns what was stored (the run's own usage).

        `base` is the thread's usage when the run started (`keel.state.task_base`); without it, the
        thread's previous run record's totals are subtracted. `first_end`: see `upsert_flow`.
        """
        return self.ledger.run(upsert_flow(record, base, first_end=first_end))

    async def awrite(
        self, record: RunRecord, base: Mapping[str, float] | None = None, *, first_end: bool = False
    ) -> RunRecord:
        """Insert or update the run's row (async)."""
        return await self.ledger.arun(upsert_flow(record, base, first_end=first_end))

    def query(
        self, *, since: float | None = None, tenant: str | None = None, user: str | None = None
    ) -> list[RunRecord]:
        """Records ended at or after `since` (Unix time), oldest first."""
        return self.ledger.run(_query_flow(since, tenant, user))

    async def aquery(
        self, *, since: float | None = None, tenant: str | None = None, user: str | None = None
    ) -> list[RunRecord]:
        """Records ended at or after `since` (Unix time), oldest first (async)."""
        return await self.ledger.arun(_query_flow(since, tenant, user))

    def scores(
        self, *, since: float | None = None, tenant: str | None = None, user: str | None = None
    ) -> dict[str, list[float]]:
        """The feedback scores on the runs `query` returns, by run key (runs without: absent).

        Feedback is what people said about runs (`keel.evals.feedback`, table `keel_feedback`).
        """
        return self.ledger.run(scores_flow(since, tenant, user))


_COLUMNS = RUNS.names
_UPDATED = [c for c in _COLUMNS if c not in ("run_key", "interrupts", "started_at", "run_id")]
"""Columns a later write of a run's record replaces. Not `run_id`: a resume, or a new message
that drops the run's pending calls, is another server run, and the record keeps the id of the
run that started it (`COALESCE`, so a record first written without one takes a later one)."""


class Recorded(NamedTuple):
    """What a write of a run's record stored, and the row it found (`recorded_flow`)."""

    stored: RunRecord
    """The run's record as written, or the stored one that stands (the write was refused)."""
    before: RunRecord | None
    """The run's row before the write; `None` for its first."""


def upsert_flow(
    record: RunRecord, base: Mapping[str, float] | None = None, *, first_end: bool = False
) -> Flow[RunRecord]:
    """Store `record`, whose usage holds the thread's totals, as the run's own usage.

    Returns what was stored; see `recorded_flow`.
    """
    recorded = yield from recorded_flow(record, base, first_end=first_end)
    return recorded.stored


def recorded_flow(
    record: RunRecord, base: Mapping[str, float] | None = None, *, first_end: bool = False
) -> Flow[Recorded]:
    """Store `record`, whose usage holds the thread's totals, as the run's own usage.

    The run's own is the totals less `base` (the thread's usage when the run started), or,
    without it, less the totals of the thread's previous run record. With `first_end`, a
    record that names no message (the state of a run found stopped held none: a supervisor's
    agent stopped before it saved a step) is kept out when its run (thread, graph, run id) has a
    record already. A later write of a run's
    record never lowers its usage (`_kept`). A `cancelled` record
    replaces only a paused (or cancelled) one: a row that says how the run ended is kept, and
    returned. With `first_end`, a cancelled one is kept too (the record of a run found stopped
    later, which says less than the end the run recorded itself).
    """
    if first_end and _unkeyed(record) and record.run_id is not None and record.graph is not None:
        rows = yield (
            f"SELECT {', '.join(_COLUMNS)} FROM keel_runs WHERE thread_id = ? AND graph = ? "
            "AND run_id = ? ORDER BY ended_at DESC LIMIT 1",
            (record.thread_id, record.graph, record.run_id),
        )
        if rows:  # the run recorded itself, under the message that started it: that stands
            return (yield from _standing_flow(_stored(rows[0]), record))
    totals = {k: getattr(record, k) for k in _USAGE}
    previous: Mapping[str, Any] = base or {}
    if base is None and record.thread_id is not None:
        rows = yield (
            "SELECT thread_usage FROM keel_runs WHERE thread_id = ? AND run_key <> ? "
            "ORDER BY started_at DESC LIMIT 1",
            (record.thread_id, record.run_key),
        )
        previous = json.loads(rows[0][0]) if rows else {}
    own = replace(record, **{k: type(v)(v - previous.get(k, 0)) for k, v in totals.items()})
    rows = yield f"SELECT {', '.join(_COLUMNS)} FROM keel_runs WHERE run_key = ?", (own.run_key,)
    before = _stored(rows[0]) if rows else None
    if before is not None:  # a note of its pause (an orphan it reported) stays
        own = _kept_notes(own, before)
    if own.terminated_reason == "cancelled" and before is not None:
        stands = before.status != "interrupted"
        if stands and (first_end or before.terminated_reason != "cancelled"):
            return (yield from _standing_flow(before, own))  # it ended before it was cancelled
    values = {
        **own.to_dict(),
        "tools": json.dumps(own.tools),
        "guard_findings": json.dumps(own.guard_findings),
        "tool_versions": json.dumps(own.tool_versions, sort_keys=True),
        "thread_usage": json.dumps(totals),
    }
    updates = ", ".join(_kept(c) if c in _USAGE else f"{c} = excluded.{c}" for c in _UPDATED)
    yield (
        f"INSERT INTO keel_runs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))}) "
        f"ON CONFLICT (run_key) DO UPDATE SET {updates}, "
        "run_id = COALESCE(keel_runs.run_id, excluded.run_id), "
        "interrupts = keel_runs.interrupts + excluded.interrupts",
        tuple(storable(values[c]) for c in _COLUMNS),
    )
    return Recorded(own, before)


def _standing_flow(stands: RunRecord, refused: RunRecord) -> Flow[Recorded]:
    """The stored record that stands against a refused write of its run, with that write's notes.

    A refused write (a second record of the run's end, `recorded_flow`) may note orphans it told
    in its transaction (their `orphaned` audit records are written): the standing row takes the
    notes it lacks (`_kept_notes`), or no run record would say so.
    """
    kept = _kept_notes(stands, refused)
    if kept is not stands:
        yield (
            "UPDATE keel_runs SET detail = ? WHERE run_key = ?",
            (storable(kept.detail), kept.run_key),
        )
    return Recorded(kept, kept)


def unsaved_flow(record: RunRecord, base: Mapping[str, float]) -> Flow[dict[str, float]]:
    """What the run's stored record counts beyond the state `record` was made from.

    `record` holds the thread's totals in the state a continuation (`invoke(None)`) starts
    from, the saved one, and `base` the totals when the run started (`keel.state.task_base`).
    A run whose checkpointer failed recorded the model calls it made and paid for in steps whose
    checkpoint was not saved: the saved state has lost them, and the continuation makes them
    again. Returns, per usage field, what the record counts beyond `record` less `base` (only
    fields with more), for the continuation's record to add (`UNSAVED_KEY`).
    """
    rows = yield f"SELECT {', '.join(_USAGE)} FROM keel_runs WHERE run_key = ?", (record.run_key,)
    if not rows:
        return {}
    saved = {k: getattr(record, k) - base.get(k, 0) for k in _USAGE}
    lost = {k: float(v) - saved[k] for k, v in zip(_USAGE, rows[0], strict=True)}
    return {k: v for k, v in lost.items() if v > 1e-12}


def _unkeyed(record: RunRecord) -> bool:
    """Whether `record`'s run key names no message, only the time its run started."""
    return record.run_key == f"{record.thread_id or '-'}:{record.started_at}"


def _kept(column: str) -> str:
    """The update of a usage column: the larger of the stored and the written value.

    A run only adds to what it used: a later write of its record saying less saw an earlier
    state (a checkpoint that failed to save the run's last step, whose model call was made and
    paid, after the run recorded its end with it).
    """
    return (
        f"{column} = CASE WHEN excluded.{column} > keel_runs.{column} "
        f"THEN excluded.{column} ELSE keel_runs.{column} END"
    )


def scores_flow(
    since: float | None, tenant: str | None, user: str | None
) -> Flow[dict[str, list[float]]]:
    """The feedback scores on the matching runs, by run key, oldest first."""
    where, params = where_clause("r.ended_at", since, **{"r.tenant_id": tenant, "r.user_id": user})
    rows = yield (
        f"SELECT f.run_ref, f.score FROM {FEEDBACK.name} f JOIN {RUNS.name} r "
        f"ON r.run_key = f.run_ref{where}{' AND' if where else ' WHERE'} f.score IS NOT NULL "
        "ORDER BY f.at",
        params,
    )
    out: dict[str, list[float]] = {}
    for run_key, score in rows:
        out.setdefault(str(run_key), []).append(float(score))
    return out


def thread_users_flow(thread_id: str) -> Flow[list[tuple[str, str]]]:
    """Whom the ledger has seen a thread act for: its runs' and audit records' (tenant, user).

    A thread id outlives its thread here: a deleted thread's records (its runs, its audited
    decisions, its side-effecting calls' recorded results) stay in the ledger, keyed by the id.
    """
    rows = yield (
        "SELECT tenant_id, user_id FROM keel_runs WHERE thread_id = ? "
        "UNION SELECT tenant_id, user_id FROM keel_audit WHERE thread_id = ?",
        (thread_id, thread_id),
    )
    return sorted({(str(t), str(u)) for t, u in rows if t is not None and u is not None})


def record_flow(run_key: str) -> Flow[RunRecord | None]:
    """The record stored under `run_key`, if any."""
    rows = yield f"SELECT {', '.join(_COLUMNS)} FROM keel_runs WHERE run_key = ?", (run_key,)
    return _stored(rows[0]) if rows else None


def _query_flow(since: float | None, tenant: str | None, user: str | None) -> Flow[list[RunRecord]]:
    where, params = where_clause("ended_at", since, tenant_id=tenant, user_id=user)
    rows = yield f"SELECT {', '.join(_COLUMNS)} FROM keel_runs{where} ORDER BY ended_at", params
    return [_stored(row) for row in rows]


def _stored(row: Sequence[Any]) -> RunRecord:
    """A `keel_runs` row (its columns in `_COLUMNS` order) as the record it stores."""
    values = dict(zip(_COLUMNS, row, strict=True))
    values["tools"] = json.loads(values["tools"])
    values["guard_findings"] = json.loads(values["guard_findings"] or "{}")
    values["tool_versions"] = json.loads(values["tool_versions"] or "{}")
    del values["thread_usage"]
    for k in ("steps", "model_calls", "input_tokens", "output_tokens", "tool_calls"):
        values[k] = int(values[k])
    return RunRecord(**values)
