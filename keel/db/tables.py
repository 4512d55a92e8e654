"""The ledger's tables: one definition each, used by the migrations (DDL) and by the queries.

A `Table` lists its columns in order; `Table.select` is the column list the flows read and
write, and `keel.db.migrations` creates the table and adds its later columns from the same
definition. A column, index or table added in a later keel release carries `since=`, the
schema version (a position in `keel.db.migrations.MIGRATIONS`) that brings it to existing
databases. Never edit or remove an existing column: add one with the next version.

The tables are defined here, in storage, because the guards that use some of them (spend,
rate limits, breakers, standing approvals) sit above storage and may not be imported by it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from keel.errors import UserError

__all__ = [
    "ADMISSION_LEASES",
    "ADMISSION_SCOPES",
    "AUDIT",
    "BREAKERS",
    "Column",
    "FEEDBACK",
    "Index",
    "MIGRATIONS_TABLE",
    "RATE_BUCKETS",
    "RESERVATIONS",
    "RUNS",
    "SPEND",
    "STANDING_APPROVALS",
    "TABLES",
    "THREAD_LEASES",
    "TOOL_CALLS",
    "Table",
    "storable",
    "where_clause",
]


@dataclass(frozen=True, slots=True)
class Column:
    """One column: its name, SQL type and constraints (the same text on SQLite and PostgreSQL)."""

    name: str
    """The column's name."""
    type: str
    """`TEXT`, `INTEGER`, `BIGINT` or `DOUBLE PRECISION`."""
    constraints: str = ""
    """`NOT NULL`, `DEFAULT …`; a column added later needs a default if it is `NOT NULL`."""
    since: int = 1
    """The schema version that added it."""

    def sql(self) -> str:
        """The column's definition, as in `CREATE TABLE` and `ALTER TABLE … ADD COLUMN`."""
        return " ".join(part for part in (self.name, self.type, self.constraints) if part)


@dataclass(frozen=True, slots=True)
class Index:
    """A secondary index on some columns of a table."""

    name: str
    """The index's name (unique in the database)."""
    columns: tuple[str, ...]
    """The indexed columns, in order."""
    since: int = 1
    """The schema version that added it."""


@dataclass(frozen=True, slots=True)
class Table:
    """A ledger table: columns in order, the primary key, secondary indexes."""

    name: str
    """The table's name."""
    columns: tuple[Column, ...]
    """Every column, oldest first."""
    primary_key: tuple[str, ...]
    """The primary key's columns."""
    indexes: tuple[Index, ...] = ()
    """Secondary indexes."""
    since: int = 1
    """The schema version that created it."""
    names: tuple[str, ...] = field(init=False, repr=False, compare=False)
    """The column names, in order (computed once: the flows read it on every write)."""
    select: str = field(init=False, repr=False, compare=False)
    """The column names as an SQL list: `a, b, c`."""
    _placeholders: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = tuple(c.name for c in self.columns)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "select", ", ".join(names))
        object.__setattr__(self, "_placeholders", ", ".join("?" * len(names)))

    def placeholders(self) -> str:
        """One `?` per column: `?, ?, ?`."""
        return self._placeholders

    def create_sql(self, version: int) -> str:
        """`CREATE TABLE IF NOT EXISTS` with the columns that exist at schema `version`."""
        columns = [c.sql() for c in self.columns if c.since <= version]
        if self.primary_key:
            columns.append(f"PRIMARY KEY ({', '.join(self.primary_key)})")
        body = ",\n    ".join(columns)
        return f"CREATE TABLE IF NOT EXISTS {self.name} (\n    {body}\n)"

    def index_sql(self, index: Index) -> str:
        """`CREATE INDEX IF NOT EXISTS` for one of this table's indexes."""
        return (
            f"CREATE INDEX IF NOT EXISTS {index.name} ON {self.name} ({', '.join(index.columns)})"
        )


def storable(value: Any) -> Any:
    r"""`value` as every database stores it; text that holds NUL or lone surrogates is escaped.

    PostgreSQL refuses NUL in text and no database takes a lone surrogate (it is not UTF-8):
    each is written as its escape (`\x00`, `\ud800`). Other values are unchanged.
    """
    if not isinstance(value, str):
        return value
    if value.isascii() and "\x00" not in value:
        return value  # nothing to escape: no lone surrogate in ASCII, no NUL
    return value.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def where_clause(
    time_column: str, since: float | None, **equal: str | None
) -> tuple[str, tuple[Any, ...]]:
    """A `WHERE` clause for the given column values and `time_column >= since`.

    Values are matched as they were written (`storable`): an id with NUL or a lone surrogate
    matches its escape rather than failing the query.

    Raises:
        UserError: `since` is not a number (a Unix time).
    """
    clauses = [f"{column} = ?" for column, value in equal.items() if value is not None]
    params: list[Any] = [storable(value) for value in equal.values() if value is not None]
    if since is not None:
        if isinstance(since, bool) or not isinstance(since, int | float):
            raise UserError(
                f"since must be a Unix time (a number, e.g. time.time() - 86400), got {since!r}."
            )
        clauses.append(f"{time_column} >= ?")
        params.append(float(since))
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), tuple(params)


_DOUBLE = "DOUBLE PRECISION"

SPEND = Table(  # keel.guards.spend: what each scope spent per period
    "keel_spend",
    (
        Column("scope_key", "TEXT", "NOT NULL"),
        Column("period", "TEXT", "NOT NULL"),
        Column("spent_usd", _DOUBLE, "NOT NULL DEFAULT 0"),
        Column("spent_tokens", "BIGINT", "NOT NULL DEFAULT 0"),
    ),
    primary_key=("scope_key", "period"),
)
RESERVATIONS = Table(  # keel.guards.spend: estimates held while a model call runs
    "keel_reservations",
    (
        Column("id", "TEXT", "PRIMARY KEY"),
        Column("scope_key", "TEXT", "NOT NULL"),
        Column("period", "TEXT", "NOT NULL"),
        Column("usd", _DOUBLE, "NOT NULL"),
        Column("tokens", "BIGINT", "NOT NULL"),
        Column("expires_at", _DOUBLE, "NOT NULL"),
        # the run that holds it (`keel.guards.holders`: its thread lease's, or its process's)
        Column("holder", "TEXT", since=11),
        # 1: its run looked dead (lease expired): counts as spent, not held, while the row lasts
        Column("charged", "INTEGER", "NOT NULL DEFAULT 0", since=11),
    ),
    primary_key=(),
    indexes=(Index("keel_reservations_scope", ("scope_key", "period")),),
)
RATE_BUCKETS = Table(  # keel.guards.ratelimit: shared token buckets
    "keel_rate_buckets",
    (
        Column("key", "TEXT", "PRIMARY KEY"),
        Column("tokens", _DOUBLE, "NOT NULL"),
        Column("updated_at", _DOUBLE, "NOT NULL"),
    ),
    primary_key=(),
)
BREAKERS = Table(  # keel.guards.breaker: shared circuit-breaker state
    "keel_breakers",
    (
        Column("key", "TEXT", "PRIMARY KEY"),
        Column("state", "TEXT", "NOT NULL DEFAULT 'closed'"),
        Column("failures", "INTEGER", "NOT NULL DEFAULT 0"),
        Column("successes", "INTEGER", "NOT NULL DEFAULT 0"),
        Column("opened_at", _DOUBLE),
        Column("window_start", _DOUBLE),
    ),
    primary_key=(),
)
STANDING_APPROVALS = Table(  # keel.guards.standing: approvals that outlive one call
    "keel_standing_approvals",
    (
        Column("scope_key", "TEXT", "NOT NULL"),
        Column("key", "TEXT", "NOT NULL"),
        Column("record", "TEXT", "NOT NULL"),
        Column("expires_at", _DOUBLE, "NOT NULL"),
    ),
    primary_key=("scope_key", "key"),
)
TOOL_CALLS = Table(  # keel.db.idempotency: side-effecting tool calls, at most once
    "keel_tool_calls",
    (
        Column("thread_id", "TEXT", "NOT NULL"),
        Column("tool_call_id", "TEXT", "NOT NULL"),
        Column("tool", "TEXT", "NOT NULL"),
        Column("args_digest", "TEXT", "NOT NULL"),
        Column("state", "TEXT", "NOT NULL"),
        Column("result", "TEXT"),
        Column("attempts", "INTEGER", "NOT NULL DEFAULT 1"),
        Column("started_at", _DOUBLE, "NOT NULL"),
        Column("finished_at", _DOUBLE),
        # the call's arguments, PII redacted: what an orphaned call was (`untold_flow`)
        Column("args", "TEXT", since=10),
    ),
    primary_key=("thread_id", "tool_call_id"),
)
AUDIT = Table(  # keel.db.audit: the audit log, append-only from keel's side
    "keel_audit",
    (
        Column("id", "TEXT", "PRIMARY KEY"),
        Column("at", _DOUBLE, "NOT NULL"),
        Column("kind", "TEXT", "NOT NULL"),
        Column("decision", "TEXT", "NOT NULL"),
        Column("status", "TEXT", "NOT NULL DEFAULT ''"),
        Column("user_id", "TEXT"),
        Column("tenant_id", "TEXT"),
        Column("tool", "TEXT"),
        Column("args", "TEXT"),
        Column("rule", "TEXT"),
        Column("approver", "TEXT"),
        Column("result", "TEXT", "NOT NULL DEFAULT ''"),
        Column("thread_id", "TEXT"),
        Column("run_id", "TEXT"),
        Column("tool_call_id", "TEXT"),
        Column("policy", "TEXT"),
        Column("tool_version", "TEXT", since=5),
        # the agent version the record is from (keel.versions.AgentVersion)
        Column("version", "TEXT", since=6),
        Column("model", "TEXT", since=6),
        Column("prompt_hash", "TEXT", since=6),
    ),
    primary_key=(),
    indexes=(
        Index("keel_audit_at", ("at",)),
        Index("keel_audit_thread", ("thread_id", "at")),
        Index("keel_audit_user", ("user_id", "at")),
    ),
)
RUNS = Table(  # keel.db.runs: one row per run, written when it ends or pauses
    "keel_runs",
    (
        Column("run_key", "TEXT", "PRIMARY KEY"),
        Column("thread_id", "TEXT"),
        Column("run_id", "TEXT"),
        Column("graph", "TEXT"),
        Column("policy", "TEXT"),
        Column("user_id", "TEXT"),
        Column("tenant_id", "TEXT"),
        Column("status", "TEXT", "NOT NULL"),
        Column("terminated_reason", "TEXT", "NOT NULL"),
        Column("error_category", "TEXT"),
        Column("detail", "TEXT", "NOT NULL DEFAULT ''"),
        Column("steps", "INTEGER", "NOT NULL DEFAULT 0"),
        Column("model_calls", "INTEGER", "NOT NULL DEFAULT 0"),
        Column("input_tokens", "BIGINT", "NOT NULL DEFAULT 0"),
        Column("output_tokens", "BIGINT", "NOT NULL DEFAULT 0"),
        Column("usd", _DOUBLE, "NOT NULL DEFAULT 0"),
        Column("latency_s", _DOUBLE, "NOT NULL DEFAULT 0"),
        Column("tool_calls", "INTEGER", "NOT NULL DEFAULT 0"),
        Column("tool_failures", "INTEGER", "NOT NULL DEFAULT 0"),
        Column("tools", "TEXT", "NOT NULL DEFAULT '{}'"),
        Column("interrupts", "INTEGER", "NOT NULL DEFAULT 0"),
        Column("thread_usage", "TEXT", "NOT NULL DEFAULT '{}'"),
        Column("started_at", _DOUBLE, "NOT NULL"),
        Column("ended_at", _DOUBLE, "NOT NULL"),
        Column("keel_version", "TEXT"),
        Column("guard_findings", "TEXT", "NOT NULL DEFAULT '{}'", since=3),
        # the agent version that served the run (keel.versions.AgentVersion)
        Column("version", "TEXT", since=6),
        Column("model", "TEXT", since=6),
        Column("prompt_hash", "TEXT", since=6),
        Column("tool_versions", "TEXT", "NOT NULL DEFAULT '{}'", since=6),
    ),
    primary_key=(),
    indexes=(
        Index("keel_runs_ended", ("ended_at",)),
        Index("keel_runs_thread", ("thread_id", "started_at")),
        # `keel report --tenant/--user` and `RunLog.query(tenant=, user=)`
        Index("keel_runs_tenant", ("tenant_id", "ended_at"), since=2),
        Index("keel_runs_user", ("user_id", "ended_at"), since=2),
        # `keel report --by version`
        Index("keel_runs_version", ("version", "ended_at"), since=6),
    ),
)
FEEDBACK = Table(  # keel.evals.feedback: a person's score, comment or correction on a run
    "keel_feedback",
    (
        Column("id", "TEXT", "PRIMARY KEY", since=4),
        Column("run_ref", "TEXT", "NOT NULL", since=4),
        Column("user_id", "TEXT", since=4),
        Column("score", _DOUBLE, since=4),
        Column("comment", "TEXT", "NOT NULL DEFAULT ''", since=4),
        Column("correction", "TEXT", "NOT NULL DEFAULT ''", since=4),
        Column("at", _DOUBLE, "NOT NULL", since=4),
    ),
    primary_key=(),
    indexes=(Index("keel_feedback_run", ("run_ref", "at"), since=4),),
    since=4,
)
ADMISSION_SCOPES = Table(  # keel.guards.admission: one row per tenant / user, locked to admit
    "keel_admission_scopes",
    (Column("scope_key", "TEXT", "PRIMARY KEY", since=7),),
    primary_key=(),
    since=7,
)
ADMISSION_LEASES = Table(  # keel.guards.admission: a slot held by a running or queued run
    "keel_admission_leases",
    (
        Column("id", "TEXT", "PRIMARY KEY", since=7),
        Column("tenant_id", "TEXT", "NOT NULL", since=7),
        Column("user_id", "TEXT", "NOT NULL", since=7),
        Column("state", "TEXT", "NOT NULL", since=7),
        Column("acquired_at", _DOUBLE, "NOT NULL", since=7),
        Column("expires_at", _DOUBLE, "NOT NULL", since=7),
        # the run of which process holds it (`keel.guards.holders`); NULL: an older keel's
        Column("holder", "TEXT", since=9),
    ),
    primary_key=(),
    indexes=(
        Index("keel_admission_tenant", ("tenant_id", "state"), since=7),
        Index("keel_admission_user", ("tenant_id", "user_id", "state"), since=7),
    ),
    since=7,
)
MIGRATIONS_TABLE = Table(  # keel.db.migrations: which schema versions a database has had
    "keel_migrations",
    (
        Column("v", "INTEGER", "PRIMARY KEY"),
        Column("summary", "TEXT", "NOT NULL"),
        Column("applied_at", _DOUBLE, "NOT NULL"),
        Column("keel_version", "TEXT"),
    ),
    primary_key=(),
)

THREAD_LEASES = Table(  # keel.graphs._one_run: the run that has a thread, across processes
    "keel_thread_leases",
    (
        Column("thread_id", "TEXT", "NOT NULL", since=8),
        Column("checkpoint_ns", "TEXT", "NOT NULL", since=8),
        Column("holder", "TEXT", "NOT NULL", since=8),
        Column("expires_at", _DOUBLE, "NOT NULL", since=8),
    ),
    primary_key=("thread_id", "checkpoint_ns"),
    indexes=(Index("keel_thread_leases_holder", ("holder",), since=8),),
    since=8,
)
TABLES: tuple[Table, ...] = (
    SPEND,
    RESERVATIONS,
    RATE_BUCKETS,
    BREAKERS,
    STANDING_APPROVALS,
    TOOL_CALLS,
    AUDIT,
    RUNS,
    FEEDBACK,
    ADMISSION_SCOPES,
    ADMISSION_LEASES,
    THREAD_LEASES,
)
"""Every ledger table that `MIGRATIONS` manages, in creation order."""
