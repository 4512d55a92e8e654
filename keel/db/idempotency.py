"""The idempotency ledger: side-effecting tool calls run at most once per thread.

A call is keyed by `(thread_id, tool_call_id)`; both are stable across resume, retry and
replay. Its row moves `started` → `completed` (the recorded `ToolMessage`) or `failed` (the
recorded error). The row is written, and committed, *before* the tool runs, so a process that
dies mid-call leaves it `started`: the call's outcome is unknown and keel never repeats it on
its own (see `keel.nodes.execute_tools`). A human settles it: it happened (`completed`), run it
again (`cleared`, free to be claimed again), or it must not happen (`failed`).

The transactions are ledger flows (`keel.db.ledger.Flow`), driven sync or async on SQLite or
PostgreSQL.
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from keel.approvals import json_text
from keel.db.ledger import Flow, Row, together
from keel.db.tables import TOOL_CALLS, storable
from keel.redact import sanitize

__all__ = [
    "CallRecord",
    "CallState",
    "Claim",
    "ClaimGate",
    "claim_flow",
    "finish_flow",
    "records_flow",
    "resolve_flow",
    "untold_flow",
]

CallState = Literal["started", "completed", "failed", "cleared"]
"""Where a side-effecting call is: running (or died running), done, failed, or free to rerun."""


@dataclass(frozen=True, slots=True)
class CallRecord:
    """One side-effecting call as the ledger knows it."""

    thread_id: str
    """The thread the call belongs to."""
    tool_call_id: str
    """The model's id for the call."""
    tool: str
    """The tool's name."""
    args_digest: str
    """sha256 of the tool, its canonical arguments and the policy (as approvals use)."""
    state: CallState
    """`started`, `completed`, `failed` or `cleared`."""
    result: dict[str, Any] | None
    """The recorded `ToolMessage` fields (`content`, `status`, `keel_status`) once finished."""
    attempts: int
    """How often the call was started."""
    started_at: float
    """Unix time it was (last) started."""
    finished_at: float | None
    """Unix time it finished, when it did."""
    args: Any = None
    """The call's arguments as the model sent them, PII redacted (`None` for a row written
    before schema version 10)."""


@dataclass(frozen=True, slots=True)
class Claim:
    """What a claim found: `run` (the caller now owns the call) or the existing record."""

    action: Literal["run", "recorded", "unknown", "conflict", "refused"]
    """`run`: run the tool; `recorded`: return `record.result`; `unknown`: it started and never
    finished; `conflict`: the id was used in this thread for different arguments; `refused`:
    the claim's gate refused to run it (nothing was written: a later claim may run it)."""
    record: CallRecord | None = None
    """The row as found (`None` for a first claim)."""
    refusal: str | None = None
    """Why the gate refused (`refused`): what the model is told instead of a result."""


class ClaimGate(Protocol):
    """A check a call must pass before it is claimed to run, in the claim's transaction.

    The tool's circuit breaker is one (`keel.guards.ToolGuard.gate`): its row is read with the
    claim's first statement, and only a call that would run (new, or claimed again) is
    checked. A call the ledger answers from its record passes no gate.
    """

    @property
    def read(self) -> tuple[str, tuple[Any, ...]]:
        """The `SELECT` whose rows `decide` needs."""
        ...

    def decide(self, rows: list[Row]) -> Flow[str | None]:
        """`None` to run the call, else why not (it may write: a breaker half-opening)."""
        ...


def _record(row: Sequence[Any]) -> CallRecord:
    values = dict(zip(TOOL_CALLS.names, row, strict=True))
    result, finished, args = values["result"], values["finished_at"], values["args"]
    return CallRecord(
        thread_id=values["thread_id"],
        tool_call_id=values["tool_call_id"],
        tool=values["tool"],
        args_digest=values["args_digest"],
        state=values["state"],
        result=json.loads(result) if result is not None else None,
        attempts=int(values["attempts"]),
        started_at=float(values["started_at"]),
        finished_at=None if finished is None else float(finished),
        args=None if args is None else json.loads(args),
    )


def _select(thread_id: str, call_id: str) -> tuple[str, tuple[Any, ...]]:
    return (
        f"SELECT {TOOL_CALLS.select} FROM keel_tool_calls WHERE thread_id = ? AND tool_call_id = ? "
        "{for_update}",
        (thread_id, call_id),
    )


def claim_flow(
    thread_id: str,
    call_id: str,
    tool: str,
    digest: str,
    *,
    rerun_unknown: bool = False,
    spelled: str | None = None,
    known: Collection[str] | None = None,
    since: float = 0.0,
    gate: ClaimGate | None = None,
    args: Any = None,
) -> Flow[Claim]:
    """Claim a call before running it; commits `started` when the caller may run it.

    Args:
        thread_id: The thread.
        call_id: The call's `tool_call_id`.
        tool: The tool's name.
        digest: The call's digest (`keel.approvals.call_digest`: tool, canonical arguments
            as the tool reads them and tool version); a different digest under the same id
            conflicts.
        rerun_unknown: Claim a `started` call again (the tool is safe to repeat, or a
            reconciliation found the effect did not happen).
        spelled: The digest of the arguments as the model spelled them, when it differs from
            `digest`: a row recorded under it is this call too (keel stored that digest
            before it read arguments as the tool does; a thread in flight keeps its rows).
        known: The tool-call ids in the thread's history. A `started` call of the same tool
            and digest whose id is not among them is an orphan: its request was lost (the
            process died before the checkpoint holding it was saved) and the model asked
            again under a new id. The new call adopts the orphan's row, so it is `unknown`
            ("did this happen?") instead of running a second time. A call with other
            arguments is another action: it leaves the orphan alone (for a later call that
            matches it) and is claimed as usual. A call of the same tool and digest that ended
            under an id not among them was left behind by time travel: the new call gets its
            record (`_forked_away`), unless the history holds a call of that digest.
        since: When the conversation `known` is of began (`keel._node.handed_at`): a row
            started before it is another conversation's (an earlier task a supervisor handed
            an agent, stopped mid-call), never this one's lost request.
        gate: A check a call that would run must pass first (`ClaimGate`); refused, the
            claim writes nothing and is `refused`.
        args: The call's arguments, stored (PII redacted) with a new row: what an orphan
            nobody asks for again was (`untold_flow`).
    """
    now = time.time()
    gated: list[Row] = []
    digests = (digest, spelled or digest)
    if known is not None:
        rows, gated = yield from _orphans(thread_id, call_id, tool, digests, since, gate)
        orphan = yield from _adopt_orphan(thread_id, call_id, digests, known, rows)
        if orphan is not None:
            return Claim("unknown", orphan)
        forked = yield from _forked_away(thread_id, call_id, digests, known, rows)
        if forked is not None:
            return Claim("recorded", forked)
    elif gate is not None:
        gated = yield gate.read
    inserted = yield (
        "INSERT INTO keel_tool_calls (thread_id, tool_call_id, tool, args_digest, state, "
        "started_at, args) VALUES (?, ?, ?, ?, 'started', ?, ?) "
        "ON CONFLICT (thread_id, tool_call_id) DO NOTHING RETURNING 1",
        (thread_id, call_id, tool, digest, now, _stored_args(args)),
    )
    if inserted:
        refusal = (yield from gate.decide(gated)) if gate is not None else None
        if refusal is not None:  # the new row goes again: this transaction wrote nothing
            yield (
                "DELETE FROM keel_tool_calls WHERE thread_id = ? AND tool_call_id = ?",
                (thread_id, call_id),
            )
            return Claim("refused", refusal=refusal)
        return Claim("run")
    rows = yield _select(thread_id, call_id)
    record = _record(rows[0])
    if record.args_digest not in digests:
        return Claim("conflict", record)
    if record.state in ("completed", "failed"):
        return Claim("recorded", record)
    if record.state == "started" and not rerun_unknown:
        return Claim("unknown", record)
    refusal = (yield from gate.decide(gated)) if gate is not None else None
    if refusal is not None:
        return Claim("refused", record, refusal)
    yield (
        "UPDATE keel_tool_calls SET state = 'started', attempts = attempts + 1, started_at = ?, "
        "result = NULL, finished_at = NULL WHERE thread_id = ? AND tool_call_id = ?",
        (now, thread_id, call_id),
    )
    return Claim("run", record)


def _orphans(
    thread_id: str,
    call_id: str,
    tool: str,
    digests: tuple[str, str],
    since: float,
    gate: ClaimGate | None,
) -> Flow[tuple[list[Row], list[Row]]]:
    """The call's own row, the thread's rows of `tool` with the call's digests since `since`.

    Those are the `started` ones (`_adopt_orphan`) and the ended ones (`_forked_away`); each
    row is `(tool_call_id, state, args_digest)`, and all are locked. The gate's rows are read
    in the same round trip; without a gate there are none.
    """
    select = (
        "SELECT tool_call_id, state, args_digest FROM keel_tool_calls WHERE thread_id = ? "
        "AND (tool_call_id = ? OR (tool = ? AND started_at >= ? "
        "AND args_digest IN (?, ?))) {for_update}",
        (thread_id, call_id, tool, since, *digests),
    )
    if gate is None:
        return (yield select), []
    rows, gated = yield from together(select, gate.read)
    return rows, gated


def _adopt_orphan(
    thread_id: str,
    call_id: str,
    digests: tuple[str, str],
    known: Collection[str],
    rows: list[Row],
) -> Flow[CallRecord | None]:
    """Move an orphaned `started` row of the call's digests (in `rows`) to `call_id`; return it.

    Only a row of the same arguments (as the tool reads them) is this call's lost request: a
    call with other arguments adopting it would be asked "did this happen?" about the orphan's
    action, under its own arguments, and never run.
    """
    ids = {r[0] for r in rows}
    orphans = sorted({r[0] for r in rows if r[1] == "started" and r[2] in digests} - set(known))
    if call_id in ids or not orphans:
        return None  # the call has its own row (claimed as usual), or nothing was lost
    move = (
        "UPDATE keel_tool_calls SET tool_call_id = ?, args_digest = ? "
        "WHERE thread_id = ? AND tool_call_id = ?",
        (call_id, digests[0], thread_id, orphans[0]),
    )
    return (yield from _taken_as(move, thread_id, call_id))


def _forked_away(
    thread_id: str,
    call_id: str,
    digests: tuple[str, str],
    known: Collection[str],
    rows: list[Row],
) -> Flow[CallRecord | None]:
    """The recorded call (in `rows`) this one asks for again on a fork of the thread.

    Time travel to a checkpoint before the model's turn asks the model again, and a real
    model names the same call with a new id: a call of the same tool and digest that ended
    (`completed` / `failed`) under an id the history does not hold (the fork left it behind)
    is that call, and its record is copied to `call_id`. When the history holds a call of that
    digest, the model asked for it in an earlier turn of this line: a repeat it means, which
    runs.
    """
    same = {r[0] for r in rows if r[2] in digests and r[1] in ("completed", "failed")}
    if any(r[0] == call_id for r in rows) or same & set(known):
        return None
    left = sorted(same)
    if not left:
        return None
    copy = (
        "INSERT INTO keel_tool_calls (thread_id, tool_call_id, tool, args_digest, state, result, "
        "attempts, started_at, finished_at, args) SELECT thread_id, ?, tool, args_digest, state, "
        "result, attempts, started_at, finished_at, args FROM keel_tool_calls "
        "WHERE thread_id = ? AND tool_call_id = ?",
        (call_id, thread_id, left[0]),
    )
    return (yield from _taken_as(copy, thread_id, call_id))


def _stored_args(args: Any) -> str | None:
    """`args` as the ledger stores them: JSON, PII redacted as the audit log redacts it."""
    return None if args is None else storable(json_text(sanitize(args)))


def untold_flow(thread_id: str, known: Collection[str]) -> Flow[list[CallRecord]]:
    """The thread's orphaned calls nobody was told about, oldest first.

    An orphan is a `started` row whose `tool_call_id` the thread's history (`known`) does not
    hold: its request was lost with a process that died mid-call, or left on the branch a fork
    from an earlier checkpoint abandoned, and a later call of the same tool and arguments would
    adopt it (`claim_flow`). Until one does, it may or may not have
    happened, and nothing in the thread says so. Told: a `tool` audit record names its
    thread and id (an `orphaned` one, or the `not_run` answer a new message gave a call
    left behind), so each is returned until its audit record is written, then never again.
    The row stays `started`: a later call that matches still adopts it.
    """
    rows = yield (
        f"SELECT {TOOL_CALLS.select} FROM keel_tool_calls WHERE thread_id = ? "
        "AND state = 'started' ORDER BY started_at, tool_call_id",
        (thread_id,),
    )
    lost = [r for r in map(_record, rows) if r.tool_call_id not in known]
    if not lost:
        return []
    marks = ", ".join("?" * len(lost))
    told = yield (
        f"SELECT tool_call_id FROM keel_audit WHERE thread_id = ? AND kind = 'tool' "
        f"AND tool_call_id IN ({marks})",
        (thread_id, *(r.tool_call_id for r in lost)),
    )
    seen = {t[0] for t in told}
    return [r for r in lost if r.tool_call_id not in seen]


def _taken_as(write: tuple[str, tuple[Any, ...]], thread_id: str, call_id: str) -> Flow[CallRecord]:
    """Run `write`, which gives another call's row to `call_id`; return that row's record."""
    yield write
    found = yield _select(thread_id, call_id)
    return _record(found[0])


def finish_flow(
    thread_id: str, call_id: str, state: Literal["completed", "failed"], result: dict[str, Any]
) -> Flow[None]:
    """Record how a claimed call ended: `completed` or `failed`, with its `ToolMessage` fields."""
    yield (
        "UPDATE keel_tool_calls SET state = ?, result = ?, finished_at = ? "
        "WHERE thread_id = ? AND tool_call_id = ?",
        (state, json.dumps(result), time.time(), thread_id, call_id),
    )


def resolve_flow(
    thread_id: str,
    call_id: str,
    state: Literal["completed", "failed", "cleared"],
    result: dict[str, Any] | None = None,
) -> Flow[bool]:
    """A human settles a `started` call: it happened, it must not, or run it again.

    Returns whether a `started` row was settled (`False`: already settled, e.g. on a re-run).
    """
    rows = yield (
        "UPDATE keel_tool_calls SET state = ?, result = ?, finished_at = ? "
        "WHERE thread_id = ? AND tool_call_id = ? AND state = 'started' RETURNING 1",
        (
            state,
            None if result is None else json.dumps(result),
            None if state == "cleared" else time.time(),
            thread_id,
            call_id,
        ),
    )
    return bool(rows)


def records_flow(thread_id: str, call_ids: Sequence[str]) -> Flow[dict[str, CallRecord]]:
    """The records of some calls of a thread, by `tool_call_id` (calls without one left out)."""
    out: dict[str, CallRecord] = {}
    for call_id in call_ids:
        rows = yield _select(thread_id, call_id)
        if rows:
            out[call_id] = _record(rows[0])
    return out
