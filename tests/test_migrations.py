"""The ledger's versioned schema, on SQLite and PostgreSQL: upgrades in place, once, and only up.

A database keel created before its schema had versions is made here from a frozen copy of that
DDL (`V0_SCHEMA`, never to be edited), filled, and upgraded by `Ledger.setup()`.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields, replace
from typing import Any

import psycopg
import pytest

from keel import Ledger
from keel.db.audit import AuditLog, AuditRecord
from keel.db.idempotency import CallRecord, records_flow
from keel.db.migrations import LATEST, MIGRATIONS, Migration, migrate_flow, version_flow
from keel.db.runs import RunLog, RunRecord
from keel.db.tables import AUDIT, RUNS, TABLES, TOOL_CALLS, Column, Index, Table
from keel.errors import SchemaVersionError, SetupError

# keel's DDL before versions (keel/db/ledger.py `SCHEMA` at 0a69c92), frozen: never edit.
V0_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS keel_spend (
        scope_key TEXT NOT NULL, period TEXT NOT NULL,
        spent_usd DOUBLE PRECISION NOT NULL DEFAULT 0, spent_tokens BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (scope_key, period))""",
    """CREATE TABLE IF NOT EXISTS keel_reservations (
        id TEXT PRIMARY KEY, scope_key TEXT NOT NULL, period TEXT NOT NULL,
        usd DOUBLE PRECISION NOT NULL, tokens BIGINT NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS keel_reservations_scope ON keel_reservations (scope_key, period)",
    """CREATE TABLE IF NOT EXISTS keel_rate_buckets (
        key TEXT PRIMARY KEY, tokens DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS keel_breakers (
        key TEXT PRIMARY KEY, state TEXT NOT NULL DEFAULT 'closed',
        failures INTEGER NOT NULL DEFAULT 0, successes INTEGER NOT NULL DEFAULT 0,
        opened_at DOUBLE PRECISION, window_start DOUBLE PRECISION)""",
    """CREATE TABLE IF NOT EXISTS keel_standing_approvals (
        scope_key TEXT NOT NULL, key TEXT NOT NULL, record TEXT NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (scope_key, key))""",
    """CREATE TABLE IF NOT EXISTS keel_tool_calls (
        thread_id TEXT NOT NULL, tool_call_id TEXT NOT NULL, tool TEXT NOT NULL,
        args_digest TEXT NOT NULL, state TEXT NOT NULL, result TEXT,
        attempts INTEGER NOT NULL DEFAULT 1, started_at DOUBLE PRECISION NOT NULL,
        finished_at DOUBLE PRECISION, PRIMARY KEY (thread_id, tool_call_id))""",
    """CREATE TABLE IF NOT EXISTS keel_audit (
        id TEXT PRIMARY KEY, at DOUBLE PRECISION NOT NULL, kind TEXT NOT NULL,
        decision TEXT NOT NULL, status TEXT NOT NULL DEFAULT '', user_id TEXT, tenant_id TEXT,
        tool TEXT, args TEXT, rule TEXT, approver TEXT, result TEXT NOT NULL DEFAULT '',
        thread_id TEXT, run_id TEXT, tool_call_id TEXT, policy TEXT)""",
    "CREATE INDEX IF NOT EXISTS keel_audit_at ON keel_audit (at)",
    "CREATE INDEX IF NOT EXISTS keel_audit_thread ON keel_audit (thread_id, at)",
    "CREATE INDEX IF NOT EXISTS keel_audit_user ON keel_audit (user_id, at)",
    """CREATE TABLE IF NOT EXISTS keel_runs (
        run_key TEXT PRIMARY KEY, thread_id TEXT, run_id TEXT, graph TEXT, policy TEXT,
        user_id TEXT, tenant_id TEXT, status TEXT NOT NULL, terminated_reason TEXT NOT NULL,
        error_category TEXT, detail TEXT NOT NULL DEFAULT '', steps INTEGER NOT NULL DEFAULT 0,
        model_calls INTEGER NOT NULL DEFAULT 0, input_tokens BIGINT NOT NULL DEFAULT 0,
        output_tokens BIGINT NOT NULL DEFAULT 0, usd DOUBLE PRECISION NOT NULL DEFAULT 0,
        latency_s DOUBLE PRECISION NOT NULL DEFAULT 0, tool_calls INTEGER NOT NULL DEFAULT 0,
        tool_failures INTEGER NOT NULL DEFAULT 0, tools TEXT NOT NULL DEFAULT '{}',
        interrupts INTEGER NOT NULL DEFAULT 0, thread_usage TEXT NOT NULL DEFAULT '{}',
        started_at DOUBLE PRECISION NOT NULL, ended_at DOUBLE PRECISION NOT NULL,
        keel_version TEXT)""",
    "CREATE INDEX IF NOT EXISTS keel_runs_ended ON keel_runs (ended_at)",
    "CREATE INDEX IF NOT EXISTS keel_runs_thread ON keel_runs (thread_id, started_at)",
)

# One row in each of the eight tables, as keel before versions wrote them.
V0_ROWS = {
    "keel_spend": ("u:alice", "2026-12", 1.25, 900),
    "keel_reservations": ("r1", "u:alice", "2026-12", 0.5, 300, 9e9),
    "keel_rate_buckets": ("model:gpt", 3.5, 1000.0),
    "keel_breakers": ("tool:charge", "open", 5, 0, 1000.0, 990.0),
    "keel_standing_approvals": ("u:alice", "k1", '{"tool": "charge"}', 9e9),
    "keel_tool_calls": ("t1", "c1", "charge", "d1", "completed", '{"content": "ok"}', 1, 1.0, 2.0),
    "keel_audit": (
        *("a1", 5.0, "tool", "allow", "success", "alice", "acme", "charge", '{"amount": 5}'),
        *("rule-1", None, "charged", "t1", "r1", "c1", "support@1"),
    ),
    "keel_runs": (
        *("t1:m1", "t1", "r1", "agent", "support@1", "alice", "acme", "success", "completed"),
        *(None, "", 3, 2, 100, 20, 0.01, 1.5, 1, 0, '{"charge": {"calls": 1, "failures": 0}}'),
        *(0, '{"steps": 3}', 10.0, 11.5, "0.1.0"),
    ),
}


@contextmanager
def raw(url: str) -> Iterator[Any]:
    """`execute(sql, params) -> rows` on a plain connection (autocommit), `?` placeholders."""
    if url.startswith("sqlite:///"):
        db = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        try:
            yield lambda q, p=(): db.execute(q, p).fetchall()
        finally:
            db.close()
        return
    with psycopg.connect(url, autocommit=True) as conn:

        def execute(q: str, p: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
            cur = conn.execute(q.replace("?", "%s"), p)  # type: ignore[call-overload]
            return cur.fetchall() if cur.description else []

        yield execute


def describe(url: str) -> dict[str, Any]:
    """Every keel table's columns (name, type, nullability, default) and index names."""
    out: dict[str, Any] = {}
    with raw(url) as execute:
        for table in (*TABLES, *EXTRA):
            if url.startswith("sqlite"):
                columns = execute(f"PRAGMA table_info({table.name})")
                indexes = execute(
                    "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ? "
                    "AND name NOT LIKE 'sqlite_autoindex%'",
                    (table.name,),
                )
            else:
                columns = execute(
                    "SELECT column_name, data_type, is_nullable, column_default "
                    "FROM information_schema.columns WHERE table_name = ? "
                    "ORDER BY ordinal_position",
                    (table.name,),
                )
                indexes = execute(
                    "SELECT indexname FROM pg_indexes WHERE tablename = ? "
                    "AND indexname NOT LIKE '%%_pkey'",
                    (table.name,),
                )
            if columns:
                out[table.name] = (columns, sorted(i[0] for i in indexes))
    return out


EXTRA: list[Table] = []  # tables a test adds (`describe` covers them too)


def column_names(url: str, table: str) -> list[str]:
    names = [c[0] if not url.startswith("sqlite") else c[1] for c in describe(url)[table][0]]
    return names


def schema_version(url: str) -> int:
    ledger = Ledger(url)
    try:
        return ledger.run(version_flow())
    finally:
        ledger.close()


def make_v0(url: str) -> None:
    with raw(url) as execute:
        for statement in V0_SCHEMA:
            execute(statement)
        for table, row in V0_ROWS.items():
            execute(f"INSERT INTO {table} VALUES ({', '.join('?' * len(row))})", row)


def test_a_fresh_database_is_at_the_latest_version_with_every_table_as_defined(
    db_url: str,
) -> None:
    Ledger(db_url).setup()
    assert schema_version(db_url) == LATEST == len(MIGRATIONS)
    found = describe(db_url)
    for table in TABLES:
        assert column_names(db_url, table.name) == list(table.names)
        assert found[table.name][1] == sorted(i.name for i in table.indexes)


def test_an_unversioned_database_is_upgraded_in_place_without_losing_rows(db_url: str) -> None:
    make_v0(db_url)
    ledger = Ledger(db_url)
    ledger.setup()
    assert schema_version(db_url) == LATEST
    with raw(db_url) as execute:
        for table, row in V0_ROWS.items():
            # old columns keep their values; columns a later version added come after them
            assert [tuple(r)[: len(row)] for r in execute(f"SELECT * FROM {table}")] == [row], table
        applied = execute("SELECT v, summary FROM keel_migrations ORDER BY v")
    assert applied == [(v, m.summary) for v, m in enumerate(MIGRATIONS, 1)]

    # the upgraded database is the one a fresh setup makes (same columns, same indexes)
    fresh = db_url.replace("keel.db", "fresh.db") if db_url.startswith("sqlite") else None
    if fresh is not None:
        Ledger(fresh).setup()
        assert describe(db_url) == describe(fresh)
    else:
        assert describe(db_url)["keel_runs"][1] == sorted(i.name for i in RUNS.indexes)

    # and keel's own queries read the old rows
    (audit,) = AuditLog(ledger).query()
    assert (audit.id, audit.args, audit.policy) == ("a1", {"amount": 5}, "support@1")
    assert audit.tool_version is None  # added by version 5; old records do not know it
    (run,) = RunLog(ledger).query(tenant="acme")
    assert (run.run_key, run.tools, run.usd, run.guard_findings) == (
        "t1:m1",
        {"charge": {"calls": 1, "failures": 0}},
        0.01,
        {},  # added by version 3, with its default
    )
    call = ledger.run(records_flow("t1", ["c1"]))["c1"]
    assert (call.state, call.result, call.finished_at) == ("completed", {"content": "ok"}, 2.0)
    ledger.close()


def test_a_version_4_database_gains_tool_version_and_keeps_its_audit_rows(db_url: str) -> None:
    backend = "sqlite" if db_url.startswith("sqlite") else "postgres"
    with raw(db_url) as execute:  # what keel 4 set up (its definitions are never edited)
        assert drive(execute, migrate_flow(backend, MIGRATIONS[:4])) == 4
        row = V0_ROWS["keel_audit"]
        execute(f"INSERT INTO keel_audit VALUES ({', '.join('?' * len(row))})", row)
    assert "tool_version" not in column_names(db_url, "keel_audit")
    ledger = Ledger(db_url)
    ledger.setup()
    assert schema_version(db_url) == LATEST
    assert "tool_version" in column_names(db_url, "keel_audit")
    (old,) = AuditLog(ledger).query()
    assert (old.id, old.tool, old.policy, old.tool_version) == ("a1", "charge", "support@1", None)
    AuditLog(ledger).write([AuditRecord(kind="tool", decision="allow", tool_version="2")])
    assert [r.tool_version for r in AuditLog(ledger).query()] == [None, "2"]
    ledger.close()


def test_a_version_5_database_gains_agent_versions_and_keeps_its_rows(db_url: str) -> None:
    backend = "sqlite" if db_url.startswith("sqlite") else "postgres"
    with raw(db_url) as execute:  # what keel 5 set up
        assert drive(execute, migrate_flow(backend, MIGRATIONS[:5])) == 5
        for table in ("keel_audit", "keel_runs"):
            row = V0_ROWS[table]
            names = ", ".join(column_names(db_url, table)[: len(row)])
            execute(f"INSERT INTO {table} ({names}) VALUES ({', '.join('?' * len(row))})", row)
    assert "version" not in column_names(db_url, "keel_runs")
    assert "keel_runs_version" not in describe(db_url)["keel_runs"][1]
    ledger = Ledger(db_url)
    ledger.setup()
    assert schema_version(db_url) == LATEST
    for table in (AUDIT, RUNS):  # every column and index a fresh database has
        assert column_names(db_url, table.name) == list(table.names)
        assert describe(db_url)[table.name][1] == sorted(i.name for i in table.indexes)

    # the old rows are read, with no version; new rows carry theirs
    (old_audit,) = AuditLog(ledger).query()
    assert (old_audit.id, old_audit.policy, old_audit.version, old_audit.model) == (
        *("a1", "support@1"),
        *(None, None),
    )
    (old_run,) = RunLog(ledger).query()
    assert (old_run.run_key, old_run.usd, old_run.version, old_run.tool_versions) == (
        *("t1:m1", 0.01),
        *(None, {}),
    )
    stamp = {"version": "v2", "model": "gpt-x", "prompt_hash": "abc"}
    AuditLog(ledger).write([AuditRecord(kind="tool", decision="allow", **stamp)])
    RunLog(ledger).write(
        RunRecord(
            run_key="t2:m1",
            status="success",
            terminated_reason="completed",
            tool_versions={"charge": "3"},
            **stamp,
        )
    )
    assert [r.version for r in AuditLog(ledger).query()] == [None, "v2"]
    new = [r for r in RunLog(ledger).query() if r.run_key == "t2:m1"]
    assert [(r.version, r.model, r.prompt_hash, r.tool_versions) for r in new] == [
        ("v2", "gpt-x", "abc", {"charge": "3"})
    ]
    ledger.close()


def drive(execute: Any, flow: Any) -> Any:
    """Run a ledger flow on a plain connection (no `Ledger`, so no setup first)."""
    try:
        statement = next(flow)
        while True:
            statement = flow.send(execute(*statement))
    except StopIteration as done:
        return done.value


def test_setup_is_idempotent(db_url: str) -> None:
    for _ in range(3):
        ledger = Ledger(db_url)
        ledger.setup()
        ledger.setup()
        ledger.close()
    with raw(db_url) as execute:
        assert execute("SELECT COUNT(*) FROM keel_migrations") == [(LATEST,)]


@pytest.mark.postgres
async def test_fifty_concurrent_setups_on_postgres_apply_each_version_once(
    fresh_postgres_url: str,
) -> None:
    make_v0(fresh_postgres_url)  # the upgrade itself races, not only the creation
    ledgers = [Ledger(fresh_postgres_url, pool_max_size=1) for _ in range(50)]
    try:
        await asyncio.gather(*(ledger.asetup() for ledger in ledgers))
    finally:
        await asyncio.gather(*(ledger.aclose() for ledger in ledgers))
    with raw(fresh_postgres_url) as execute:
        assert execute("SELECT v FROM keel_migrations ORDER BY v") == [
            (v,) for v in range(1, LATEST + 1)
        ]
        assert execute("SELECT COUNT(*) FROM keel_audit") == [(1,)]


def test_concurrent_setups_on_sqlite_from_threads(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path}/keel.db"
    make_v0(url)
    errors: list[BaseException] = []

    def setup() -> None:
        try:
            Ledger(url).setup()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=setup) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert schema_version(url) == LATEST


# A later keel release, simulated: it adds a table (version LATEST + 1), then a column and an
# index on it (LATEST + 2). This keel's database meets each in turn.
_THINGS = Table(
    "keel_test_things",
    (Column("id", "TEXT", "PRIMARY KEY"), Column("size", "INTEGER", "NOT NULL")),
    primary_key=(),
    since=LATEST + 1,
)
_THINGS_LATER = replace(
    _THINGS,
    columns=(*_THINGS.columns, Column("color", "TEXT", "NOT NULL DEFAULT 'red'", LATEST + 2)),
    indexes=(Index("keel_test_things_color", ("color",), LATEST + 2),),
)
_NEXT = (*MIGRATIONS, Migration("test: things"))
_AFTER = (*_NEXT, Migration("test: things get a color", ("UPDATE keel_test_things SET size = 2",)))


def test_a_column_added_by_a_later_release_reaches_an_existing_database(db_url: str) -> None:
    EXTRA[:] = [_THINGS_LATER]
    ledger = Ledger(db_url)
    ledger.setup()
    backend = ledger.backend
    assert ledger.run(migrate_flow(backend, _NEXT, (*TABLES, _THINGS))) == LATEST + 1
    ledger.run(iter_insert("INSERT INTO keel_test_things (id, size) VALUES ('t1', 1)"))
    assert ledger.run(migrate_flow(backend, _AFTER, (*TABLES, _THINGS_LATER))) == LATEST + 2
    assert column_names(db_url, "keel_test_things") == ["id", "size", "color"]
    assert describe(db_url)["keel_test_things"][1] == ["keel_test_things_color"]
    with raw(db_url) as execute:
        assert execute("SELECT id, size, color FROM keel_test_things") == [("t1", 2, "red")]
    # applied once: running the same list again changes nothing
    assert ledger.run(migrate_flow(backend, _AFTER, (*TABLES, _THINGS_LATER))) == LATEST + 2
    ledger.close()
    EXTRA.clear()


def iter_insert(sql: str) -> Any:
    yield sql, ()


def test_a_database_from_a_newer_keel_is_refused_and_left_alone(db_url: str) -> None:
    ledger = Ledger(db_url)
    ledger.setup()
    ledger.run(migrate_flow(ledger.backend, _NEXT, (*TABLES, _THINGS)))
    ledger.close()

    newer = Ledger(db_url)
    message = (
        f"The ledger database is at schema version {LATEST + 1}, but this keel knows versions "
        f"up to {LATEST}: a newer keel set it up. Upgrade keel"
    )
    with pytest.raises(SchemaVersionError, match=message) as caught:
        newer.setup()
    assert (caught.value.found, caught.value.known) == (LATEST + 1, LATEST)
    assert isinstance(caught.value, SetupError)
    with pytest.raises(SchemaVersionError):  # every entry point, not only setup()
        AuditLog(newer).write([AuditRecord(kind="tool", decision="allow")])
    newer.close()
    with raw(db_url) as execute:
        assert execute("SELECT COUNT(*) FROM keel_audit") == [(0,)]
        assert execute("SELECT MAX(v) FROM keel_migrations") == [(LATEST + 1,)]


def test_every_definition_names_a_known_version_and_every_record_field_a_column() -> None:
    for table in TABLES:
        assert 1 <= table.since <= LATEST, table.name
        for column in table.columns:
            assert table.since <= column.since <= LATEST, (table.name, column.name)
            if column.since > table.since and "NOT NULL" in column.constraints:
                assert "DEFAULT" in column.constraints, f"{column.name}: NOT NULL needs a default"
        for index in table.indexes:
            assert set(index.columns) <= set(table.names), index.name
            assert table.since <= index.since <= LATEST, index.name
    assert {f.name for f in fields(AuditRecord)} == set(AUDIT.names)
    assert {f.name for f in fields(CallRecord)} == set(TOOL_CALLS.names)
    assert {f.name for f in fields(RunRecord)} == set(RUNS.names) - {"thread_usage"}


def test_keel_db_setup_upgrades_the_ledger_and_refuses_a_newer_one(
    db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from keel.app.cli import main

    make_v0(db_url)
    assert main(["db", "setup", "--db", db_url]) == 0
    assert f"(ledger schema version {LATEST})" in capsys.readouterr().out
    assert schema_version(db_url) == LATEST
    with raw(db_url) as execute:
        execute(
            "INSERT INTO keel_migrations VALUES (?, 'from the future', 0, '9.0')", (LATEST + 1,)
        )
    assert main(["db", "setup", "--db", db_url]) == 2
    assert "a newer keel set it up. Upgrade keel" in capsys.readouterr().err


def test_a_release_whose_migration_fails_halfway_leaves_the_database_as_it_was(
    db_url: str,
) -> None:
    # README: the missing versions are applied "in one transaction ... rows kept": a release
    # that brings two versions (a new table, then a column whose data move fails) applies none
    broken = (*_NEXT, Migration("test: a bad data move", ("UPDATE keel_no_such_table SET x = 1",)))
    ledger = Ledger(db_url)
    ledger.setup()
    AuditLog(ledger).write([AuditRecord(kind="tool", decision="allow")])
    with pytest.raises(Exception, match="keel_no_such_table"):
        ledger.run(migrate_flow(ledger.backend, broken, (*TABLES, _THINGS_LATER)))
    assert ledger.run(version_flow()) == LATEST
    with raw(db_url) as execute:
        assert execute("SELECT COUNT(*) FROM keel_audit") == [(1,)]
        assert execute("SELECT MAX(v) FROM keel_migrations") == [(LATEST,)]
        tables = execute(
            "SELECT name FROM sqlite_master WHERE name = 'keel_test_things'"
            if db_url.startswith("sqlite")
            else "SELECT tablename FROM pg_tables WHERE tablename = 'keel_test_things'"
        )
        assert tables == []
    # the fixed release then applies both versions
    assert ledger.run(migrate_flow(ledger.backend, _AFTER, (*TABLES, _THINGS_LATER))) == LATEST + 2
    ledger.close()
