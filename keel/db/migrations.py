"""The ledger's schema, versioned: an append-only list of migrations and a version table.

Version *v* is `MIGRATIONS[v - 1]`. A database records each version it received in
`keel_migrations`; `Ledger.setup()` applies the missing ones, in order, in one transaction,
under a lock (PostgreSQL: an advisory lock; SQLite: `BEGIN IMMEDIATE`), so concurrent setups
apply each version once. A database that a newer keel set up (a version above
`len(MIGRATIONS)`) is refused with `SchemaVersionError` rather than used half-understood.

What a version changes comes from the table definitions in `keel.db.tables`: the tables,
columns and indexes whose `since` is that version (created, added), then the migration's own
`sql` (moving data, for instance). So one definition serves the DDL and the queries.

To change the schema: append a `Migration` with a summary, mark the new columns / indexes /
tables `since=<its version>` in `keel.db.tables`, and never edit a migration already released.
Version 1 is the schema keel created before it had versions (`CREATE TABLE IF NOT EXISTS`
adopts such a database as it is).
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from keel._version import __version__
from keel.db.tables import MIGRATIONS_TABLE, TABLES, Table
from keel.errors import SchemaVersionError

__all__ = ["LATEST", "MIGRATIONS", "Migration", "migrate_flow", "statements", "version_flow"]

_Step = tuple[str, tuple[Any, ...]]
_Flow = Generator[_Step, list[tuple[Any, ...]], int]


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema version: what it is for, and any statements beyond the tables' own DDL."""

    summary: str
    """One line saying what the version changes (stored in `keel_migrations`)."""
    sql: tuple[str, ...] = ()
    """Statements run after the version's DDL (data moves, backfills), `?` placeholders-free."""


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        "keel's eight tables: spend, reservations, rate buckets, breakers, standing "
        "approvals, tool calls, audit log, run records"
    ),
    Migration("run records indexed by tenant and by user, for keel report"),
    Migration("run records count the content guards' findings (guard_findings)"),
    Migration("feedback on runs (keel_feedback), for keel.evals"),
    Migration("audit records carry the version of the tool they are about (tool_version)"),
    Migration(
        "run and audit records name the agent version that served them (version, model, "
        "prompt_hash; runs also tool_versions)"
    ),
    Migration("admission control: run leases per tenant and user (keel_admission_*)"),
    Migration("one run at a time per thread across processes: thread leases (keel_thread_leases)"),
    Migration(
        "admission leases name the process and run that hold them (holder), so a lease a run "
        "of the same process left behind is taken over at once"
    ),
    Migration(
        "side-effecting calls keep their arguments, PII redacted (args), so a call orphaned by "
        "a crash can be audited with what it was"
    ),
    Migration(
        "period budget reservations name the run that holds them (holder) and whether they were "
        "charged (charged), so a crashed run's reservation is charged and released once its "
        "thread lease expires"
    ),
)
"""Append only. Version v is `MIGRATIONS[v - 1]`."""

LATEST = len(MIGRATIONS)
"""The schema version this keel creates and understands."""

SCHEMA_LOCK = 0x6B65656C  # "keel"
"""The PostgreSQL advisory lock that serializes schema setup across processes.

PostgreSQL's `CREATE TABLE IF NOT EXISTS` is not safe against a concurrent twin (it can fail
with a unique violation on `pg_type`), and two setups must not both apply a version."""


def statements(version: int, tables: Sequence[Table] = TABLES) -> Iterator[str]:
    """The DDL that brings a database from `version - 1` to `version`."""
    for table in tables:
        if table.since == version:
            yield table.create_sql(version)
        elif table.since < version:
            for column in table.columns:
                if column.since == version:
                    yield f"ALTER TABLE {table.name} ADD COLUMN {column.sql()}"
        for index in table.indexes:
            if max(index.since, table.since) == version:
                yield table.index_sql(index)


def version_flow() -> _Flow:
    """The database's schema version (0: keel never set it up, or set it up unversioned)."""
    yield MIGRATIONS_TABLE.create_sql(1), ()
    rows = yield f"SELECT MAX(v) FROM {MIGRATIONS_TABLE.name}", ()
    return int(rows[0][0] or 0)


def migrate_flow(
    backend: str,
    migrations: Sequence[Migration] = MIGRATIONS,
    tables: Sequence[Table] = TABLES,
) -> _Flow:
    """Bring the database to the latest version, in one transaction; returns that version.

    Args:
        backend: `"sqlite"` or `"postgres"` (PostgreSQL takes `SCHEMA_LOCK` first).
        migrations: The migration list (tests pass a longer one).
        tables: The table definitions the migrations' DDL comes from.

    Raises:
        SchemaVersionError: The database is at a version above `len(migrations)`.
    """
    if backend == "postgres":
        yield "SELECT pg_advisory_xact_lock(?)", (SCHEMA_LOCK,)
    found = yield from version_flow()
    if found > len(migrations):
        raise SchemaVersionError(found=found, known=len(migrations))
    for version in range(found + 1, len(migrations) + 1):
        migration = migrations[version - 1]
        for statement in (*statements(version, tables), *migration.sql):
            yield statement, ()
        yield (
            f"INSERT INTO {MIGRATIONS_TABLE.name} ({MIGRATIONS_TABLE.select}) "
            f"VALUES ({MIGRATIONS_TABLE.placeholders()})",
            (version, migration.summary, time.time(), __version__),
        )
    return len(migrations)
