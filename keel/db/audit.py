"""The audit log: an append-only table of what keel decided and did, in the ledger database.

Every tool execution, approval, rejection, denial, budget event and circuit-breaker transition
becomes one `AuditRecord`: who (user, tenant), the tool, its arguments (PII redacted by
`keel.guards.sanitize` before they are stored), the matched rule, the decision, the approver,
a result summary, when, the thread and run, and the policy (`name@version`).

keel only ever inserts rows (`keel_audit`); nothing in keel updates or deletes them. Read them
with `AuditLog.query` or the `keel audit` command.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from keel.db.ledger import Flow, Ledger
from keel.errors import UserError
from keel.redact import sanitize

__all__ = ["AuditKind", "AuditLog", "AuditRecord", "insert_flow"]

AuditKind = Literal["tool", "approval", "budget", "breaker"]
"""What an audit record is about."""

_RESULT_CHARS = 500
_COLUMNS = (
    "id, at, kind, decision, status, user_id, tenant_id, tool, args, rule, approver, result, "
    "thread_id, run_id, tool_call_id, policy"
)


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
    `budget` (a limit was hit or passed its warning threshold) or `breaker` (a transition)."""
    decision: str
    """`allow` / `ask` / `deny` for tools, `approved` / `edited` / `rejected` / `responded` for
    approvals, `exceeded` / `warning` for budgets, the new state for breakers."""
    status: str = ""
    """How a tool call ended (`keel_status`: `success`, `denied`, `timeout`, ...)."""
    tool: str | None = None
    """The tool (or, for breakers, the breaker key)."""
    args: Any = None
    """The call's arguments; PII is redacted when the record is written."""
    rule: str | None = None
    """The permission rule that matched, when one did."""
    approver: str | None = None
    """Who approved or rejected, when the reviewer gave a name."""
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
        """Append `records` (sanitized) in one transaction."""
        if records:
            self.ledger.run(insert_flow(records))

    async def awrite(self, records: Sequence[AuditRecord]) -> None:
        """Append `records` (sanitized) in one transaction (async)."""
        if records:
            await self.ledger.arun(insert_flow(records))

    def query(
        self,
        *,
        thread: str | None = None,
        user: str | None = None,
        since: float | None = None,
        limit: int = 1000,
    ) -> list[AuditRecord]:
        """Records, oldest first, filtered by thread, user and time (`since`: Unix time)."""
        return self.ledger.run(_query_flow(thread, user, since, limit))

    async def aquery(
        self,
        *,
        thread: str | None = None,
        user: str | None = None,
        since: float | None = None,
        limit: int = 1000,
    ) -> list[AuditRecord]:
        """Records, oldest first, filtered by thread, user and time (async)."""
        return await self.ledger.arun(_query_flow(thread, user, since, limit))


def insert_flow(records: Sequence[AuditRecord]) -> Flow[None]:
    """Insert `records` with arguments and results sanitized; usable inside another flow."""
    for r in records:
        args = None if r.args is None else json.dumps(sanitize(r.args), default=str)
        result = sanitize(_truncate(r.result))
        yield (
            f"INSERT INTO keel_audit ({_COLUMNS}) VALUES ({', '.join('?' * 16)})",
            tuple(
                _storable(v)
                for v in (
                    r.id,
                    r.at,
                    r.kind,
                    r.decision,
                    r.status,
                    r.user_id,
                    r.tenant_id,
                    r.tool,
                    args,
                    r.rule,
                    r.approver,
                    result,
                    r.thread_id,
                    r.run_id,
                    r.tool_call_id,
                    r.policy,
                )
            ),
        )


def _storable(value: Any) -> Any:
    r"""`value` as every database stores it; text that holds NUL or lone surrogates is escaped.

    PostgreSQL refuses NUL in text and no database takes a lone surrogate (it is not UTF-8):
    each is written as its escape (`\x00`, `\ud800`). Other values are unchanged.
    """
    if not isinstance(value, str):
        return value
    return value.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def _truncate(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _RESULT_CHARS else text[: _RESULT_CHARS - 1] + "…"


def _query_flow(
    thread: str | None, user: str | None, since: float | None, limit: int
) -> Flow[list[AuditRecord]]:
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise UserError(f"AuditLog.query(limit=...) must be 1 or more, got {limit!r}.")
    where, params = where_clause("at", since, thread_id=thread, user_id=user)
    rows = yield (
        f"SELECT {_COLUMNS} FROM keel_audit{where} ORDER BY at, id LIMIT ?",
        (*params, limit),
    )
    return [_record(row) for row in rows]


def where_clause(
    time_column: str, since: float | None, **equal: str | None
) -> tuple[str, tuple[Any, ...]]:
    """A `WHERE` clause for the given column values and `time_column >= since`."""
    clauses = [f"{column} = ?" for column, value in equal.items() if value is not None]
    params: list[Any] = [value for value in equal.values() if value is not None]
    if since is not None:
        clauses.append(f"{time_column} >= ?")
        params.append(float(since))
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), tuple(params)


def _record(row: tuple[Any, ...]) -> AuditRecord:
    (id_, at, kind, decision, status, user, tenant, tool, args, rule, approver, *rest) = row
    result, thread, run, call, policy = rest
    return AuditRecord(
        id=id_,
        at=float(at),
        kind=kind,
        decision=decision,
        status=status,
        user_id=user,
        tenant_id=tenant,
        tool=tool,
        args=None if args is None else json.loads(args),
        rule=rule,
        approver=approver,
        result=result,
        thread_id=thread,
        run_id=run,
        tool_call_id=call,
        policy=policy,
    )
