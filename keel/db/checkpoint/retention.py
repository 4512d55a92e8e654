"""Checkpoint retention: keep the latest N checkpoints per thread, drop threads idle too long.

The logic is written once, as a flow that yields SQL statements and is sent their results;
`run_prune` and `arun_prune` drive it on a sync or async connection (SQLite or PostgreSQL,
LangGraph's own tables). Each thread is pruned in its own transaction, on one snapshot, so a
run that saves meanwhile loses nothing; a dry run does the same work and rolls it back, so its
report is exact.

What is kept:
- per thread and namespace, the latest `keep_last` checkpoints and their pending writes (an
  `interrupt()` waiting for a human is a pending write of the latest checkpoint, so it
  survives, and the thread resumes with identical state);
- on PostgreSQL, every `checkpoint_blobs` row a remaining checkpoint references (channel
  values are stored once per version and shared between checkpoints);
- threads idle longer than `idle_ttl` are deleted whole, except those waiting on an interrupt;
- threads that use LangGraph's `DeltaChannel` are not trimmed (their state is a chain of
  deltas across checkpoints) and are reported as skipped.

Idle time comes from the thread's newest checkpoint id, a time-based UUID (version 6).

When keel's ledger lives in the same database, a prune also releases the period-budget
reservations (`keel_reservations`) that expired: a model call holds one only while it runs, a
process that died mid-call leaves its row behind, and budgets already ignore expired rows, so
deleting them frees nothing anyone counts. No spend is recorded for them (that is what
"released" means); a call that outlived its reservation still settles its cost when it ends.
A reservation charged as its run looked dead (`keel.guards.spend.charge_flow`) counts as spent
while its row lasts: it is kept.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

import psycopg
from langgraph.checkpoint.postgres.base import PRUNE_DELTA_THREADS_SQL

from keel._drive import adrive, calls, drive

__all__ = ["PruneReport", "arun_prune", "prune_flow", "run_prune"]

Dialect: TypeAlias = Literal["sqlite", "postgres"]
Result: TypeAlias = tuple[list[tuple[Any, ...]], int]
"""What a flow is sent for a statement: its rows and its row count."""
Flow: TypeAlias = Generator[tuple[str, Sequence[Any]], Result, "PruneReport"]

_UUID6_EPOCH = 0x01B21DD213814000  # 100-ns intervals from 1582-10-15 to 1970-01-01
_INTERRUPT = "__interrupt__"
_BUSY = (psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected)


@dataclass(frozen=True, kw_only=True, slots=True)
class PruneReport:
    """What a prune deleted, or with `dry_run`, what it would delete."""

    dry_run: bool
    """Whether nothing was deleted (the counts say what would have been)."""
    threads_deleted: tuple[str, ...] = ()
    """Threads idle longer than the TTL, deleted whole."""
    threads_trimmed: tuple[str, ...] = ()
    """Threads that lost old checkpoints (their latest `keep_last` remain)."""
    threads_skipped: tuple[tuple[str, str], ...] = ()
    """`(thread_id, reason)` for threads left alone: waiting on an interrupt, `DeltaChannel`…"""
    checkpoints_deleted: int = 0
    """Rows of `checkpoints`."""
    writes_deleted: int = 0
    """Rows of `checkpoint_writes` (`writes` on SQLite)."""
    blobs_deleted: int = 0
    """Rows of `checkpoint_blobs` (PostgreSQL only; SQLite keeps values in the checkpoint)."""
    reservations_released: int = 0
    """Expired period-budget reservations deleted (with keel's ledger in the same database)."""

    def summary(self) -> str:
        """One line for people: what went (or would go)."""
        verb = "would delete" if self.dry_run else "deleted"
        text = (
            f"{verb} {len(self.threads_deleted)} idle threads; trimmed "
            f"{len(self.threads_trimmed)} threads; {self.checkpoints_deleted} checkpoints, "
            f"{self.writes_deleted} writes, {self.blobs_deleted} blobs"
        )
        if self.reservations_released:
            text += f"; released {self.reservations_released} expired budget reservations"
        return text + (f"; skipped {len(self.threads_skipped)}" if self.threads_skipped else "")


@dataclass(slots=True)
class _Tally:
    deleted: list[str] = field(default_factory=list)
    trimmed: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    counts: dict[str, int] = field(
        default_factory=lambda: {"checkpoints": 0, "writes": 0, "blobs": 0, "reservations": 0}
    )

    def report(self, dry_run: bool) -> PruneReport:
        return PruneReport(
            dry_run=dry_run,
            threads_deleted=tuple(self.deleted),
            threads_trimmed=tuple(self.trimmed),
            threads_skipped=tuple(self.skipped),
            checkpoints_deleted=self.counts["checkpoints"],
            writes_deleted=self.counts["writes"],
            blobs_deleted=self.counts["blobs"],
            reservations_released=self.counts["reservations"],
        )


# -- SQL, per dialect ---------------------------------------------------------------------------

_WRITES = {"sqlite": "writes", "postgres": "checkpoint_writes"}
_BEGIN = {"sqlite": "BEGIN IMMEDIATE", "postgres": "BEGIN ISOLATION LEVEL REPEATABLE READ"}
_THREADS_SQL = "SELECT thread_id, max(checkpoint_id) FROM checkpoints GROUP BY thread_id"
_INTERRUPTED_SQL = """
SELECT count(*) FROM {writes} WHERE thread_id = {p} AND checkpoint_ns = '' AND channel = {p}
AND checkpoint_id = (SELECT max(checkpoint_id) FROM checkpoints
                     WHERE thread_id = {p} AND checkpoint_ns = '')
"""
_UNKEPT_SQL = """
SELECT checkpoint_ns, checkpoint_id FROM (
    SELECT checkpoint_ns, checkpoint_id, row_number() OVER (
        PARTITION BY checkpoint_ns ORDER BY checkpoint_id DESC) AS newer
    FROM checkpoints WHERE thread_id = {p}
) AS ranked WHERE newer > {p}
"""
_IN = {"sqlite": "IN (SELECT value FROM json_each({p}))", "postgres": "= ANY({p})"}
_DELETE_SQL = (
    "DELETE FROM {table} WHERE thread_id = {p} AND checkpoint_ns = {p} AND checkpoint_id {in_}"
)
_ORPHANS_SQL = (
    "UPDATE checkpoints SET parent_checkpoint_id = NULL "
    "WHERE thread_id = {p} AND checkpoint_ns = {p} AND parent_checkpoint_id {in_}"
)
_THREAD_TABLES = {
    "sqlite": (("checkpoints", "checkpoints"), ("writes", "writes")),
    "postgres": (
        ("checkpoints", "checkpoints"),
        ("checkpoint_writes", "writes"),
        ("checkpoint_blobs", "blobs"),
    ),
}
_HAS_RESERVATIONS = {
    "sqlite": "SELECT count(*) FROM sqlite_master WHERE type = 'table' "
    "AND name = 'keel_reservations'",
    "postgres": "SELECT count(*) FROM pg_catalog.pg_tables WHERE tablename = 'keel_reservations' "
    "AND schemaname = ANY(current_schemas(false))",
}
_HAS_CHARGED = {
    "sqlite": "SELECT count(*) FROM pragma_table_info('keel_reservations') WHERE name = 'charged'",
    "postgres": "SELECT count(*) FROM information_schema.columns WHERE table_name = "
    "'keel_reservations' AND column_name = 'charged' "
    "AND table_schema = ANY(current_schemas(false))",
}
"""Whether the ledger's reservations can be charged (schema version 11 on)."""
_EXPIRED_RESERVATIONS_SQL = "DELETE FROM keel_reservations WHERE expires_at <= {p}"
_UNCHARGED = " AND charged = 0"
"""A reservation charged as its run looked dead counts as spent: it is kept (`charge_flow`)."""
_VERSIONS_SQL = """
SELECT checkpoint_id, v.key, v.value FROM checkpoints
CROSS JOIN LATERAL jsonb_each_text(checkpoint -> 'channel_versions') AS v
WHERE thread_id = %s AND checkpoint_ns = %s
"""
_BLOBS_SQL = (
    "DELETE FROM checkpoint_blobs WHERE thread_id = %s AND checkpoint_ns = %s "
    "AND channel = %s AND version = ANY(%s)"
)


def _sql(dialect: Dialect, template: str, **names: str) -> str:
    p = "?" if dialect == "sqlite" else "%s"
    return template.format(p=p, writes=_WRITES[dialect], **names)


def _id_list(dialect: Dialect, ids: list[str]) -> Any:
    """An id list as a parameter: a JSON array for SQLite's `json_each`, an array for Postgres."""
    return json.dumps(ids) if dialect == "sqlite" else ids


# -- the flow -------------------------------------------------------------------------------------


def prune_flow(
    dialect: Dialect, *, keep_last: int | None, idle_ttl: float | None, dry_run: bool
) -> Flow:
    """Prune every thread: delete the idle ones, trim the rest to `keep_last` checkpoints."""
    tally = _Tally()
    threads, _ = yield _THREADS_SQL, ()
    cutoff = None if idle_ttl is None else time.time() - idle_ttl
    for thread_id, last_id in sorted(threads):
        last_time = _id_time(last_id)
        idle = cutoff is not None and last_time is not None and last_time < cutoff
        if not idle and keep_last is None:
            continue
        yield _BEGIN[dialect], ()
        try:
            deleted = idle and (yield from _delete_idle(dialect, thread_id, tally))
            if not deleted and keep_last is not None:
                yield from _trim(dialect, thread_id, keep_last, tally)
        except _BUSY:
            tally.skipped.append((thread_id, "changed while pruning; prune again"))
            dry_run_or_busy = True
        else:
            dry_run_or_busy = dry_run
        yield ("ROLLBACK" if dry_run_or_busy else "COMMIT"), ()
    yield from _release_expired_reservations(dialect, time.time(), dry_run, tally)
    return tally.report(dry_run)


def _release_expired_reservations(
    dialect: Dialect, now: float, dry_run: bool, tally: _Tally
) -> Generator[Any, Result, None]:
    """Delete `keel_reservations` rows that expired by `now`, if keel's ledger is here."""
    (((present,),), _) = yield _HAS_RESERVATIONS[dialect], ()
    if not present:
        return
    (((chargeable,),), _) = yield _HAS_CHARGED[dialect], ()
    expired = _EXPIRED_RESERVATIONS_SQL + (_UNCHARGED if chargeable else "")
    yield "BEGIN", ()  # read committed on PostgreSQL: a row a settle deleted is just skipped
    _, count = yield _sql(dialect, expired), (now,)
    tally.counts["reservations"] += count
    yield ("ROLLBACK" if dry_run else "COMMIT"), ()


def _delete_idle(dialect: Dialect, thread_id: str, tally: _Tally) -> Generator[Any, Result, bool]:
    """Delete the whole thread, unless it waits on an interrupt. Whether it was deleted."""
    sql = _sql(dialect, _INTERRUPTED_SQL)
    (((waiting,),), _) = yield sql, (thread_id, _INTERRUPT, thread_id)
    if waiting:
        tally.skipped.append((thread_id, "idle but waiting on an interrupt"))
        return False
    for table, key in _THREAD_TABLES[dialect]:
        _, count = yield (
            _sql(dialect, "DELETE FROM {table} WHERE thread_id = {p}", table=table),
            (thread_id,),
        )
        tally.counts[key] += count
    tally.deleted.append(thread_id)
    return True


def _trim(
    dialect: Dialect, thread_id: str, keep_last: int, tally: _Tally
) -> Generator[Any, Result, None]:
    if dialect == "postgres":
        delta, _ = yield PRUNE_DELTA_THREADS_SQL, ([thread_id], [thread_id])
        if delta:
            tally.skipped.append((thread_id, "uses a DeltaChannel; not trimmed"))
            return
    unkept, _ = yield _sql(dialect, _UNKEPT_SQL), (thread_id, keep_last)
    if not unkept:
        return
    by_ns: dict[str, list[str]] = {}
    for ns, checkpoint_id in unkept:
        by_ns.setdefault(ns, []).append(checkpoint_id)
    for ns, ids in sorted(by_ns.items()):
        yield from _trim_namespace(dialect, thread_id, ns, ids, tally)
    tally.trimmed.append(thread_id)


def _trim_namespace(
    dialect: Dialect, thread_id: str, ns: str, ids: list[str], tally: _Tally
) -> Generator[Any, Result, None]:
    in_ = _sql(dialect, _IN[dialect])
    if dialect == "postgres":  # the versions each checkpoint references, before deleting
        versions, _ = yield _VERSIONS_SQL, (thread_id, ns)
    args = (thread_id, ns, _id_list(dialect, ids))
    for table, key in ((_WRITES[dialect], "writes"), ("checkpoints", "checkpoints")):
        _, count = yield _sql(dialect, _DELETE_SQL, table=table, in_=in_), args
        tally.counts[key] += count
    # The oldest kept checkpoint becomes the root of the thread's history.
    yield _sql(dialect, _ORPHANS_SQL, in_=in_), args
    if dialect == "postgres":
        for channel, garbage in _garbage_blobs(versions, set(ids)).items():
            _, count = yield _BLOBS_SQL, (thread_id, ns, channel, garbage)
            tally.counts["blobs"] += count


def _garbage_blobs(versions: Iterable[tuple[Any, ...]], deleted: set[str]) -> dict[str, list[str]]:
    """Blob versions only deleted checkpoints referenced, by channel."""
    kept = {(ch, v) for cid, ch, v in versions if cid not in deleted}
    garbage: dict[str, set[str]] = {}
    for cid, channel, version in versions:
        if cid in deleted and (channel, version) not in kept:
            garbage.setdefault(channel, set()).add(version)
    return {channel: sorted(v) for channel, v in sorted(garbage.items())}


def _id_time(checkpoint_id: str) -> float | None:
    """Unix time in a version-6 UUID checkpoint id (LangGraph's), else None."""
    try:
        value = uuid.UUID(checkpoint_id)
    except ValueError:
        return None
    if value.version != 6:
        return None
    ticks = ((value.int >> 80) << 12) | ((value.int >> 64) & 0xFFF)
    return (ticks - _UUID6_EPOCH) / 1e7


# -- drivers -------------------------------------------------------------------------------------


def run_prune(flow: Flow, execute: Callable[[str, Sequence[Any]], Result]) -> PruneReport:
    """Drive a prune flow on a sync connection; `execute` runs one statement."""
    return drive(calls(flow, lambda step: execute(*step), _DB_ERRORS))


async def arun_prune(
    flow: Flow, execute: Callable[[str, Sequence[Any]], Awaitable[Result]]
) -> PruneReport:
    """Drive a prune flow on an async connection; `execute` runs one statement."""
    return await adrive(calls(flow, lambda step: execute(*step), _DB_ERRORS))


_DB_ERRORS = (psycopg.Error, sqlite3.Error)
"""A statement's errors the flow decides on (skip a busy thread, or re-raise)."""
