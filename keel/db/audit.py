"""The audit log: an append-only table of what keel decided and did, in the ledger database.

Every tool execution, approval, rejection, denial, budget event and circuit-breaker transition
becomes one `AuditRecord`: who (user, tenant), the tool and its version, its arguments (PII
redacted by `keel.guards.sanitize` before they are stored), the matched rule, the decision, the
approver, a result summary, when, the thread and run, the policy (`name@version`) and the agent
version (label, model, system-prompt hash; see `keel.versions`).

keel only ever inserts rows (`keel_audit`); nothing in keel updates or deletes them. Read them
with `AuditLog.query` or the `keel audit` command.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, TypedDict, Unpack

from keel.approvals import json_text
from keel.db.ledger import Flow, Ledger
from keel.db.tables import AUDIT, storable, where_clause
from keel.errors import UserError
from keel.redact import sanitize

__all__ = ["AuditKind", "AuditLog", "AuditRecord", "insert_flow"]

AuditKind = Literal["tool", "approval", "budget", "breaker", "content", "admission"]
"""What an audit record is about."""

_RESULT_CHARS = 500


@dataclass(frozen=True, kw_only=True, slots=True)
class AuditRecord:
    """One audited event.

    Example:
        ```python
        AuditRecord(kind="tool", decision="allow", tool="lookup_order", status="success")
        ```
    """

    kind: AuditKind
    """`tool` (a call was decided on and run or refused), `approval` (a human decided),
    `budget` (a limit was hit or passed its warning threshold), `breaker` (a transition) or
    `content` (a content guard flagged, redacted or blocked an input or an answer) or
    `admission` (admission control refused a run: decision `overloaded`)."""
    decision: str
    """`allow` / `ask` / `deny` for tools (`duplicate` for a repeat of an earlier side-effecting
    call of the same model turn: not run, answered with that call's answer; `not_run` for a call
    keel answered without running it: dropped while it waited for a human, or left without an
    answer by a run that stopped, with `status` what it was answered; `orphaned`, status
    `unknown`, for a call that started and never finished whose request a crash lost, which
    no later call asked for again: it may or may not have happened), `approved` /
    `edited` / `rejected` / `responded` for approvals, `exceeded` / `warning` for budgets, the
    new state for breakers, `flag` / `redact` / `block` for content (with `status` the source:
    `user`, `tool` or `answer`, and `rule` the rules that matched)."""
    status: str = ""
    """How a tool call ended (`keel_status`: `success`, `denied`, `timeout`, ...)."""
    tool: str | None = None
    """The tool (or, for breakers, the breaker key)."""
    args: Any = None
    """The call's arguments; PII is redacted when the record is written."""
    rule: str | None = None
    """The permission rule that matched, when one did."""
    approver: str | None = None
    """Who approved or rejected: under a server, the authenticated user who answered (a client
    cannot name someone else); embedded, the resume's `reviewer` field, when it has one."""
    result: str = ""
    """A summary of what happened (truncated; PII redacted when written)."""
    user_id: str | None = None
    """The user the run acted for (`RunContext.user_id`)."""
    tenant_id: str | None = None
    """The user's tenant."""
    thread_id: str | None = None
    """The LangGraph thread, when the run had one."""
    run_id: str | None = None
    """The run, when the caller (or the LangGraph server) gave it one."""
    tool_call_id: str | None = None
    """The model's id for the tool call."""
    policy: str | None = None
    """The policy the decision was made under, `name@version`."""
    tool_version: str | None = None
    """The tool's `ToolSpec.version`, on tool and approval records (`None` on others, and on
    records written before schema version 5)."""
    version: str | None = None
    """The agent version the record is from (`keel.versions.AgentVersion.id`); `None` on
    records written before schema version 6."""
    model: str | None = None
    """The agent's chat model."""
    prompt_hash: str | None = None
    """The hash of the agent's system prompt."""
    at: float = field(default_factory=time.time)
    """Unix time of the event."""
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    """The record's id."""

    def to_dict(self) -> dict[str, Any]:
        """The record as a JSON-able dict."""
        return asdict(self)


class AuditLog:
    """The audit table in `ledger`'s database: `write` / `awrite` records, `query` them.

    Example:
        ```python
        log = AuditLog(Ledger("sqlite:///.keel/keel.db"))
        for record in log.query(user="u1", limit=20):
            print(record.at, record.tool, record.decision)
        ```
    """

    def __init__(self, ledger: Ledger) -> None:
        if not isinstance(ledger, Ledger):
            raise UserError(
                "AuditLog needs a keel.Ledger (AuditLog(Ledger(url))), got "
                f"{type(ledger).__name__}."
            )
        self.ledger = ledger

    def write(self, records: Sequence[AuditRecord]) -> None:
        """Append `records` (sanitized) in one transaction (with the records deferred so far)."""
        if records:
            self.ledger.run(insert_flow(records))

    async def awrite(self, records: Sequence[AuditRecord]) -> None:
        """Append `records` (sanitized) in one transaction (async); see `write`."""
        if records:
            await self.ledger.arun(insert_flow(records))

    def query(self, **where: Unpack[_Where]) -> list[AuditRecord]:
        """Records, oldest first, filtered by thread, user, decision and time (`since`: Unix time).

        Keywords: `thread`, `user`, `decision` (`orphaned`, say), `since` (all optional) and
        `limit` (default 1000).
        """
        return self.ledger.run(_query_flow(**where))

    async def aquery(self, **where: Unpack[_Where]) -> list[AuditRecord]:
        """Records, oldest first, filtered by thread, user and time (async); see `query`."""
        return await self.ledger.arun(_query_flow(**where))

    def decisions(self) -> list[str]:
        """The distinct decisions the log holds, sorted (to tell a mistyped filter from none)."""
        return self.ledger.run(_decisions_flow())


def _decisions_flow() -> Flow[list[str]]:
    rows = yield f"SELECT DISTINCT decision FROM {AUDIT.name}", ()
    return sorted(str(decision) for (decision,) in rows)


def insert_flow(records: Sequence[AuditRecord], *, redacted: bool = False) -> Flow[None]:
    """Insert `records` with arguments and results sanitized; usable inside another flow.

    A record whose id is stored already is skipped: writing a record again (kept after a
    failure that may have committed it, or a `not_run` answer written again when its run
    failed to start) stores it once. `redacted`: the records' arguments and results were
    made of text keel stored sanitized already (an orphaned call's, `keel_tool_calls.args`),
    and are not walked again.
    """
    clean: Callable[[Any], Any] = _as_stored if redacted else sanitize
    for r in records:
        values = {name: getattr(r, name) for name in AUDIT.names}
        values["args"] = None if r.args is None else json_text(clean(r.args))
        values["tool"] = sanitize(r.tool)  # a model may call a tool no one has, by any name
        values["result"] = _truncate(clean(str(r.result)))
        yield _INSERT, tuple([storable(values[column]) for column in AUDIT.names])


def _as_stored(value: Any) -> Any:
    """`value` as it is: made of text keel stored sanitized already."""
    return value


_INSERT = (
    f"INSERT INTO {AUDIT.name} ({AUDIT.select}) VALUES ({AUDIT.placeholders()}) "
    "ON CONFLICT (id) DO NOTHING"
)


def _truncate(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _RESULT_CHARS else text[: _RESULT_CHARS - 1] + "…"


class _Where(TypedDict, total=False):
    """`AuditLog.query`'s filters."""

    thread: str | None
    user: str | None
    decision: str | None
    since: float | None
    limit: int


def _query_flow(
    *,
    thread: str | None = None,
    user: str | None = None,
    decision: str | None = None,
    since: float | None = None,
    limit: int = 1000,
) -> Flow[list[AuditRecord]]:
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise UserError(f"AuditLog.query(limit=...) must be 1 or more, got {limit!r}.")
    where, params = where_clause("at", since, thread_id=thread, user_id=user, decision=decision)
    rows = yield (
        f"SELECT {AUDIT.select} FROM {AUDIT.name}{where} ORDER BY at, id LIMIT ?",
        (*params, limit),
    )
    return [_record(row) for row in rows]


def _record(row: tuple[Any, ...]) -> AuditRecord:
    values = dict(zip(AUDIT.names, row, strict=True))
    args = None if values["args"] is None else json.loads(values["args"])
    return AuditRecord(**{**values, "at": float(values["at"]), "args": args})
