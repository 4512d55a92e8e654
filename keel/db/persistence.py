"""Persistence from one URL: a LangGraph checkpointer on SQLite (embedded) or PostgreSQL.

`sqlite:///.keel/keel.db` is the default; `postgresql://user@host/db` is for production. For
PostgreSQL keel keeps a `psycopg_pool` pool with health checks that replace dead connections
at once, runs `setup()` once per process per URL (retrying when several processes race to
create the tables), and turns an unreachable server or a schema that was never set up into a
`SetupError` that says what to do. The async checkpointer is
`keel.db.checkpoint.AsyncPooledPostgresSaver`: a pool connection per call (no global lock) and
group commits.

Example:
    ```python
    from keel.db.persistence import Persistence

    with Persistence("sqlite:///.keel/keel.db").checkpointer() as saver:
        graph = builder.compile(checkpointer=saver)
    ```
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, closing, contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypeAlias, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiosqlite
import psycopg
from langgraph.checkpoint.base import BaseCheckpointSaver, CheckpointTuple
from langgraph.checkpoint.postgres import PostgresSaver
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from psycopg.conninfo import conninfo_to_dict, timeout_from_conninfo
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
)

from keel._drive import Op, Steps, adrive, both, call, drive, retrying
from keel._node import ERROR, INTERRUPT
from keel.db.checkpoint.retention import (
    Flow,
    PruneReport,
    Result,
    arun_prune,
    prune_flow,
    run_prune,
)
from keel.db.checkpoint.strict import (
    CheckpointPolicy,
    StrictAsyncPooledPostgresSaver,
    StrictAsyncSqliteSaver,
    StrictPostgresSaver,
    StrictSerializer,
    StrictSqliteSaver,
)
from keel.db.pools import (
    Reachability,
    adraining_pool,
    draining_pool,
    network_defaults,
    reply_timeout,
)
from keel.db.url import default_db_url
from keel.db.writer_lock import writer_lock
from keel.errors import SetupError, StorageError, UserError, _one_line
from keel.redact import sanitized_logger

__all__ = ["Persistence", "PruneReport", "ThreadSummary", "default_db_url"]

_ACCEPTED = (
    "Accepted forms: sqlite:///relative/path.db, sqlite:////absolute/path.db, sqlite:///~/path.db, "
    "sqlite:///:memory:, "
    "postgresql://user:password@host:5432/dbname (or postgres://…)."
)
_CONNECT_TIMEOUT = 5  # seconds, unless the URL sets connect_timeout
_SETUP_ATTEMPTS = 8  # concurrent first setups (several replicas starting) race; retry
_SETUP_RACES = (
    psycopg.errors.UniqueViolation,
    psycopg.errors.DuplicateTable,
    psycopg.errors.DuplicateObject,
    psycopg.errors.DeadlockDetected,
)
_SETUP_RETRY: dict[str, Any] = {
    "stop": stop_after_attempt(_SETUP_ATTEMPTS),
    "retry": retry_if_exception_type(_SETUP_RACES),
    "wait": lambda state: _backoff(state),
    "reraise": True,
}
"""tenacity's retries of a first setup that raced another process's."""
_THREADS_SQL = (
    "SELECT thread_id FROM checkpoints WHERE checkpoint_ns = '' "
    "GROUP BY thread_id ORDER BY max(checkpoint_id) DESC LIMIT {limit}"
)
_SCHEMA = {  # tables, SQL: does table {} exist?, SQL: schema version, the version needed
    "postgres": (
        ("checkpoints", "checkpoint_migrations"),
        "SELECT to_regclass('{}') IS NOT NULL",
        "SELECT max(v) FROM checkpoint_migrations",
        len(PostgresSaver.MIGRATIONS) - 1,
    ),
    "sqlite": (  # no migrations table; its one migration so far added writes.task_path
        ("checkpoints", "writes"),
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = '{}'",
        "SELECT count(*) FROM pragma_table_info('writes') WHERE name = 'task_path'",
        1,
    ),
}
log = sanitized_logger(__name__)
_SET_UP: set[str] = set()  # PostgreSQL URLs this process has set up
_SET_UP_LOCK = threading.Lock()

Plan: TypeAlias = Literal["setup", "check"] | None
_S = TypeVar(
    "_S",
    StrictSqliteSaver,
    StrictAsyncSqliteSaver,
    StrictPostgresSaver,
    StrictAsyncPooledPostgresSaver,
)
_Row: TypeAlias = tuple[Any, ...] | Mapping[str, Any] | None
_Flow: TypeAlias = Generator[str, tuple[Any, ...], None]
"""Database logic written once for both drivers: it yields SQL and is sent the first row."""
_Pool: TypeAlias = ConnectionPool[psycopg.Connection[DictRow]]
_APool: TypeAlias = AsyncConnectionPool[psycopg.AsyncConnection[DictRow]]


@dataclass(frozen=True, kw_only=True, slots=True)
class ThreadSummary:
    """The latest checkpoint of one thread, as `keel threads` shows it."""

    thread_id: str
    """The thread's id (`config["configurable"]["thread_id"]`)."""
    checkpoint_id: str
    """The id of the thread's latest checkpoint."""
    updated_at: str | None
    """When that checkpoint was written (its ISO-8601 `ts`)."""
    values: dict[str, Any] = field(default_factory=dict)
    """The state's channel values (e.g. `"messages"`, `"outcome"`), internal channels left out."""
    next: tuple[str, ...] = ()
    """Nodes that run on resume (e.g. one waiting on `interrupt()`); empty when the run ended."""
    interrupted: bool = False
    """A node waits on `interrupt()`: the thread waits for an answer (`Command(resume=...)`)."""
    error: str | None = None
    """What the last run's failed step raised (e.g. `"RuntimeError('down')"`; it runs again
    on resume), or `None`."""

    @property
    def status(self) -> str:
        """What `keel threads` shows: `error`, `waiting`, `stopped`, or the outcome's status.

        `waiting` is for an answer; `stopped` is cut short or at a breakpoint (it runs on with
        `invoke(None)`); a graph that writes no outcome shows `-`.
        """
        if self.error is not None:
            return "error"
        if self.interrupted:
            return "waiting"
        if self.next:
            return "stopped"
        outcome = self.values.get("outcome")
        return str(outcome.get("status", "-")) if isinstance(outcome, dict) else "-"


class Persistence:
    """LangGraph checkpointers (sync and async) on the database one URL names.

    Args:
        url: `sqlite:///path.db` or `postgresql://…`; default `default_db_url()`.
        setup: Create or migrate the tables on first use (once per process per URL). With
            `False`, check the schema instead and raise `SetupError` when it is not current.
            SQLite tables are always created: that is cheap and LangGraph does it anyway.
        prepare_threshold: psycopg's `prepare_threshold`; `None` disables prepared statements
            (needed behind PgBouncer in transaction mode).
        pool_min_size: Connections the PostgreSQL pool keeps open.
        pool_max_size: The most connections the pool opens.
        pool_timeout: Seconds to wait for a pool connection (or for the pool to open).
        max_idle: Seconds an idle connection above `pool_min_size` is kept.
        max_lifetime: Seconds after which a connection is replaced.
        checkpoints: What the checkpointers accept: a size limit per checkpoint (warn or
            refuse) and strict serialization (a value that would not load back fails, naming
            its path in state). Default `CheckpointPolicy()`: warn over 1 MB, strict.
    """

    url: str
    """The URL, normalized (`postgres://` becomes `postgresql://`). It may hold a password."""
    backend: Literal["sqlite", "postgres"]
    """Which database the URL names."""

    def __init__(
        self,
        url: str | None = None,
        *,
        setup: bool = True,
        prepare_threshold: int | None = 0,
        pool_min_size: int = 1,
        pool_max_size: int = 10,
        pool_timeout: float = 30.0,
        max_idle: float = 300.0,
        max_lifetime: float = 1800.0,
        checkpoints: CheckpointPolicy | None = None,
    ) -> None:
        _validate(setup=setup, prepare_threshold=prepare_threshold, pool_min_size=pool_min_size)
        _validate(pool_max_size=pool_max_size, pool_timeout=pool_timeout, max_idle=max_idle)
        _validate(max_lifetime=max_lifetime)
        if pool_min_size > pool_max_size:
            raise UserError(
                f"Persistence(pool_min_size={pool_min_size}) exceeds pool_max_size="
                f"{pool_max_size}; raise pool_max_size or lower pool_min_size."
            )
        self.url, self.backend, self._path = _parse_url(default_db_url() if url is None else url)
        if checkpoints is not None and not isinstance(checkpoints, CheckpointPolicy):
            raise UserError(
                f"Persistence(checkpoints=...) must be a keel.db.checkpoint.CheckpointPolicy, got "
                f"{type(checkpoints).__name__}."
            )
        self.checkpoints = checkpoints or CheckpointPolicy()
        """What the checkpointers accept (size limit, strict serialization)."""
        self._setup = setup
        self._prepare_threshold = prepare_threshold
        self._pool_args: dict[str, Any] = dict(
            min_size=pool_min_size, max_size=pool_max_size, timeout=pool_timeout,
            max_idle=max_idle, max_lifetime=max_lifetime,
        )  # fmt: skip

    @property
    def sqlite_path(self) -> Path | None:
        """The SQLite database file, or None (PostgreSQL, or `sqlite:///:memory:`)."""
        return None if self._path in (None, ":memory:") else Path(self._path)

    @property
    def safe_url(self) -> str:
        """The URL with any password replaced by `***`, for logs and messages."""
        return _redact(self.url)

    def __repr__(self) -> str:
        return f"Persistence({_redact(self.url)!r}, setup={self._setup})"

    @contextmanager
    def checkpointer(self) -> Iterator[BaseCheckpointSaver[str]]:
        """A sync checkpointer, ready to use; its connection or pool closes on exit.

        Raises:
            SetupError: The database is unreachable, or (with `setup=False`) not set up.
        """
        if self._path is not None:
            conn = self._sqlite_connect()
            saver = self._strict(StrictSqliteSaver(conn, serde=self._serde()))
            if self.sqlite_path is not None:  # queue with the ledger on this file
                saver.lock = writer_lock(self.sqlite_path)  # type: ignore[assignment]
            try:
                with self._errors("open"):  # a file that is not a database fails here
                    saver.setup()
                yield saver
            finally:  # not under a statement another thread still runs on it
                _close_when_idle(conn, saver.lock, self.safe_url)
            return
        self._ready(self._plan())
        with self._pg_pool() as pool:
            yield self._strict(StrictPostgresSaver(pool, serde=self._serde()))

    @asynccontextmanager
    async def acheckpointer(self) -> AsyncIterator[BaseCheckpointSaver[str]]:
        """An async checkpointer, ready to use; its connection or pool closes on exit.

        Raises:
            SetupError: The database is unreachable, or (with `setup=False`) not set up.
        """
        if self._path is not None:
            async with self._asqlite() as conn:
                asaver = self._strict(StrictAsyncSqliteSaver(conn, serde=self._serde()))
                with self._errors("open"):  # a file that is not a database fails here
                    await asaver.setup()
                yield asaver
            return
        await self._aready(self._plan())
        async with self._apg_pool() as pool:
            yield self._strict(StrictAsyncPooledPostgresSaver(pool, serde=self._serde()))

    def _serde(self) -> StrictSerializer:
        return StrictSerializer(self.checkpoints)

    def _strict(self, saver: _S) -> _S:
        saver._keel_configure(self.checkpoints)
        return saver

    def setup(self) -> None:
        """Create the checkpoint tables, or migrate them to this LangGraph version (idempotent).

        Raises:
            SetupError: The database is unreachable or refuses the change.
        """
        self._ready("setup")

    async def asetup(self) -> None:
        """Async `setup()`."""
        await self._aready("setup")

    def check(self) -> None:
        """Readiness: connect and verify the checkpoint schema is current.

        Raises:
            SetupError: What is wrong (unreachable, no tables, old migrations) and the fix.
        """
        self._ready("check")

    async def acheck(self) -> None:
        """Async `check()`."""
        await self._aready("check")

    def reach(self) -> None:
        """Connect once (PostgreSQL; nothing to do on SQLite), for a command that only reads.

        An unreachable database (no such database, a wrong password, no server) fails at once
        with the fix, instead of after a pool's retries.

        Raises:
            SetupError: the database cannot be reached, and why.
        """
        if self.backend == "postgres":
            with self._errors("reach"), psycopg.connect(self.url, **self._connect_kwargs()):
                pass

    async def areach(self) -> None:
        """Async `reach()`."""
        if self.backend == "postgres":
            with self._errors("reach"):
                conn = await psycopg.AsyncConnection.connect(self.url, **self._connect_kwargs())
            await conn.close()

    def list_threads(self, limit: int = 50) -> list[ThreadSummary]:
        """The threads with checkpoints, newest first, each with its latest state.

        Args:
            limit: The most threads to return (at least 1).

        Raises:
            UserError: `limit` is not a positive integer.
        """
        _validate(limit=limit)
        with self.checkpointer() as saver:
            ids = _thread_ids(saver, _THREADS_SQL.format(limit=limit))
            tuples = [(tid, saver.get_tuple({"configurable": {"thread_id": tid}})) for tid in ids]
        return [_summarize(tid, tup) for tid, tup in tuples if tup is not None]

    def prune(
        self,
        *,
        keep_last: int | None = None,
        idle_ttl: timedelta | float | None = None,
        dry_run: bool = False,
    ) -> PruneReport:
        """Delete old checkpoints: keep the latest `keep_last` per thread, drop idle threads.

        Each thread is pruned in its own transaction. A pending `interrupt()` survives (it
        lives in the latest checkpoint's writes, and idle threads waiting on one are kept), so
        the thread resumes with identical state. See `keel.db.checkpoint.retention`.

        Args:
            keep_last: Checkpoints to keep per thread and namespace (at least 1); `None`
                trims nothing.
            idle_ttl: Delete threads whose newest checkpoint is older than this (seconds or a
                `timedelta`); `None` deletes no thread.
            dry_run: Delete nothing; report what would go.

        Raises:
            UserError: Neither `keep_last` nor `idle_ttl` given, or a bad value.
            SetupError: The database is unreachable.
        """
        flow = self._prune_flow(keep_last, idle_ttl, dry_run)
        self._ready(self._plan() if self._path is None else "setup")
        with self._connected() as conn:
            return run_prune(flow, partial(_fetch, conn))

    async def aprune(
        self,
        *,
        keep_last: int | None = None,
        idle_ttl: timedelta | float | None = None,
        dry_run: bool = False,
    ) -> PruneReport:
        """Async `prune()`."""
        flow = self._prune_flow(keep_last, idle_ttl, dry_run)
        await self._aready(self._plan() if self._path is None else "setup")
        async with self._aconnected() as conn:
            return await arun_prune(flow, partial(_afetch, conn))

    # -- decisions shared by the sync and async drivers ------------------------------------

    def _prune_flow(
        self, keep_last: int | None, idle_ttl: timedelta | float | None, dry_run: bool
    ) -> Flow:
        if keep_last is None and idle_ttl is None:
            raise UserError(
                "prune() needs keep_last=N (checkpoints kept per thread) and/or idle_ttl "
                "(seconds or a timedelta after which an idle thread is deleted)."
            )
        if isinstance(idle_ttl, timedelta):
            idle_ttl = idle_ttl.total_seconds()
        _validate(keep_last=keep_last, idle_ttl=idle_ttl, dry_run=dry_run)
        return prune_flow(self.backend, keep_last=keep_last, idle_ttl=idle_ttl, dry_run=dry_run)

    def _plan(self) -> Plan:
        """What opening a PostgreSQL checkpointer must do after connecting."""
        if not self._setup:
            return "check"
        with _SET_UP_LOCK:
            return None if self.url in _SET_UP else "setup"

    def _check_flow(self) -> _Flow:
        """Verify the schema is current, or raise `SetupError` with the fix."""
        where = f"{'PostgreSQL' if self.backend == 'postgres' else 'SQLite'} at {_redact(self.url)}"
        fix = (
            f"Run `keel db setup --db {_redact(self.url)}` once, "
            "or create Persistence(url, setup=True)."
        )
        tables, exists_sql, version_sql, need = _SCHEMA[self.backend]
        for table in tables:
            if not (yield exists_sql.format(table))[0]:
                raise SetupError(
                    f'{where} has no LangGraph checkpoint tables (relation "{table}" does not '
                    f"exist). {fix}"
                )
        (have,) = yield version_sql
        if have is None or have < need:
            raise SetupError(
                f"{where} has LangGraph checkpoint tables at migration {have}, but this "
                f"langgraph-checkpoint version needs migration {need}. {fix}"
            )

    def _connect_kwargs(self) -> dict[str, Any]:
        kwargs = dict(row_factory=dict_row, prepare_threshold=self._prepare_threshold)
        return self._connecting(kwargs)

    def _connecting(self, kwargs: Mapping[str, Any], options: str = "") -> dict[str, Any]:
        """`kwargs` for one of keel's connections to this URL, bounded and in autocommit.

        Each connection attempt waits one connect timeout (the URL's, else 5 s), not psycopg's
        130 s, and TCP keepalives end a connection whose server is gone (`network_defaults`).
        `options` are added to the URL's own (its search_path, its statement_timeout).
        """
        params = conninfo_to_dict(self.url)
        out: dict[str, Any] = {"autocommit": True, **kwargs}
        if "connect_timeout" not in params:
            out["connect_timeout"] = _CONNECT_TIMEOUT
        if options:
            out["options"] = f"{params.get('options') or ''} {options}".strip()
        return {**out, **network_defaults(self.url)}

    @property
    def connect_timeout(self) -> float:
        """Seconds one attempt to connect to PostgreSQL waits for the server (per address).

        The URL's `connect_timeout` (psycopg's rules: at least 2 s; 0 or less is psycopg's
        130 s), else 5 s; 0 on SQLite.
        """
        if self.backend == "sqlite":
            return 0.0
        params = conninfo_to_dict(self.url)
        params.setdefault("connect_timeout", _CONNECT_TIMEOUT)
        return float(timeout_from_conninfo(params))

    def _pool_kwargs(self) -> dict[str, Any]:
        # every connection is checked when taken: skipping the check for a fresh, quiet one
        # (as the ledger's pool does) lost a race in a fresh-clone CI run, a retry taking a
        # connection whose server had just killed it before it said so
        reachability = Reachability(
            self.connect_timeout, lambda: both(self.reach, self.areach), self._unreachable
        )
        connection = dict(row_factory=dict_row, prepare_threshold=self._prepare_threshold)
        return self.pool_kwargs(reachability, connection, name="keel", **self._pool_args)

    def pool_kwargs(
        self,
        reachability: Reachability,
        connection: Mapping[str, Any],
        *,
        options: str = "",
        **pool: Any,
    ) -> dict[str, Any]:
        """The arguments of `keel.db.pools.draining_pool` for a pool of this URL's connections.

        The checkpointer's pool and the ledger's. Each connection is `_connecting`'s (with
        `connection`'s arguments and `options`), and each statement's reply waits
        `reply_timeout`; a wait for a connection past one connect timeout connects once on its
        own (`reachability`): a server that is gone ends it then, not after the pool's timeout.
        `pool`: the pool's own arguments (name, sizes, timeout).
        """
        bounded = {**self._connecting(connection, options), "reply_timeout": self.reply_timeout}
        return {**pool, "kwargs": bounded, "open": False, "reachability": reachability}

    @property
    def reply_timeout(self) -> float | None:
        """Seconds a pooled statement waits for its reply; then its connection is closed.

        `keel.db.pools.reply_timeout`: 60 s, or the URL's `statement_timeout` plus one connect
        timeout; None: no limit (or SQLite).
        """
        if self.backend == "sqlite":
            return None
        return reply_timeout(self.url, self.connect_timeout)

    def _unreachable(self, exc: SetupError) -> StorageError:
        """The checkpointer's pool gave no connection and connecting failed with `exc`."""
        return StorageError(
            f"keel's checkpointer: {str(exc).rstrip('.')}",
            fix="The checkpoint was not saved or read; resume the run once PostgreSQL answers.",
        )

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Turn a database error raised while doing `action` into a `SetupError` with a fix."""
        try:
            yield
        except (psycopg.Error, PoolTimeout, sqlite3.DatabaseError) as exc:
            raise SetupError(_failure(self, action, exc)) from exc

    def _prepared(self, plan: Plan, conn: Any, saver: Callable[[Any], Any]) -> Steps[None]:
        """Set up or check as planned, on `conn`, open (sync or async; `saver` LangGraph's)."""
        with self._errors(plan or "connect"):
            if self._path is None and plan == "setup":
                setup = partial(_step, call(lambda: saver(conn).setup()))
                yield from retrying(Retrying(**_SETUP_RETRY), setup)
                _mark_set_up(self.url)
            elif self._path is not None and (plan == "setup" or self._path == ":memory:"):
                yield call(saver(conn).setup)  # (a new :memory: db is empty)
            if plan == "check":
                yield from _checked(self._check_flow(), conn)

    # -- sync driver ---------------------------------------------------------------------------

    def _ready(self, plan: Plan) -> None:
        """Connect (which proves the server is up), then set up or check as planned."""
        with self._connected(readonly=plan == "check") as conn:
            saver = SqliteSaver if self._path is not None else PostgresSaver
            drive(self._prepared(plan, conn, saver))

    @contextmanager
    def _connected(self, *, readonly: bool = False) -> Iterator[Any]:
        """A connection (sqlite3 or psycopg), closed on exit; `readonly`: SQLite's, read-only."""
        if self._path is not None:
            with self._sqlite(readonly=readonly) as lite:
                yield lite
            return
        with self._errors("connect"):
            conn = psycopg.Connection.connect(self.url, **self._connect_kwargs())
        with conn:
            yield conn

    @contextmanager
    def _sqlite(self, *, readonly: bool = False) -> Iterator[sqlite3.Connection]:
        with closing(self._sqlite_connect(readonly=readonly)) as conn:
            yield conn

    def _sqlite_connect(self, *, readonly: bool = False) -> sqlite3.Connection:
        target, uri = _sqlite_target(self._path, readonly)
        with self._errors("open"):
            return sqlite3.connect(target, uri=uri, check_same_thread=False)

    @contextmanager
    def _pg_pool(self) -> Iterator[_Pool]:
        pool = draining_pool(self.url, **self._pool_kwargs())
        try:
            with self._errors("open a connection pool"):
                pool.open(wait=True, timeout=self._pool_args["timeout"])
            yield pool
        finally:
            pool.close()

    # -- async driver: the same steps, awaited -------------------------------------------------

    async def _aready(self, plan: Plan) -> None:
        """Async `_ready`."""
        async with self._aconnected(readonly=plan == "check") as conn:
            saver = AsyncSqliteSaver if self._path is not None else AsyncPostgresSaver
            await adrive(self._prepared(plan, conn, saver))

    @asynccontextmanager
    async def _aconnected(self, *, readonly: bool = False) -> AsyncIterator[Any]:
        """Async `_connected` (aiosqlite or psycopg)."""
        if self._path is not None:
            async with self._asqlite(readonly=readonly) as lite:
                yield lite
            return
        with self._errors("connect"):
            conn = await psycopg.AsyncConnection.connect(self.url, **self._connect_kwargs())
        async with conn:
            yield conn

    @asynccontextmanager
    async def _asqlite(self, *, readonly: bool = False) -> AsyncIterator[aiosqlite.Connection]:
        target, uri = _sqlite_target(self._path, readonly)
        conn = aiosqlite.connect(target, uri=uri)
        try:
            with self._errors("open"):
                await conn  # starts aiosqlite's thread and opens the file
        except BaseException:
            # aiosqlite stops its thread on a failed open but does not wait for it: once
            # asyncio.run has closed the loop, the thread's last reply raises a traceback there
            await asyncio.to_thread(conn._thread.join, 5)
            raise
        try:
            yield conn
        finally:
            await conn.close()

    @asynccontextmanager
    async def _apg_pool(self) -> AsyncIterator[_APool]:
        pool = adraining_pool(self.url, **self._pool_kwargs())
        try:
            with self._errors("open a connection pool"):
                await pool.open(wait=True, timeout=self._pool_args["timeout"])
            yield pool
        finally:
            await pool.close()


# -- pure helpers ------------------------------------------------------------------------------


def _close_when_idle(conn: sqlite3.Connection, lock: Any, where: str) -> None:
    """Close the sync checkpointer's `conn` once no statement runs on it.

    `SqliteSaver` holds `lock` around each use of its connection, from whichever thread calls
    it (a node's or a tool's thread, a web server's request thread). CPython's `sqlite3` does
    not guard a `check_same_thread=False` connection: closing it while another thread runs a
    statement on it frees that statement under it, and the process dies of a segmentation
    fault (`tests/test_attack_cancellation.py`). Holding `lock`, the close waits for that
    statement; a thread that keeps the lock past `_CLOSE_WAIT` seconds (a `list()` it never
    finished iterating) leaves the connection open, to be closed when the saver is collected.
    """
    if not lock.acquire(timeout=_CLOSE_WAIT):
        log.warning(
            "keel left the checkpointer's connection to %s open: another thread held it for "
            "%g s (closing it under a running statement would crash the process)",
            where,
            _CLOSE_WAIT,
        )
        return
    try:
        conn.close()
    finally:
        lock.release()


_CLOSE_WAIT = 10.0
"""Seconds closing the sync SQLite checkpointer waits for another thread's statement."""


def _checked(flow: _Flow, conn: Any) -> Steps[None]:
    """Run a check flow on `conn` (sqlite3, aiosqlite or psycopg): each statement's first row."""
    row: tuple[Any, ...] | None = None
    while True:
        try:
            sql = flow.send(row)  # type: ignore[arg-type]
        except StopIteration:
            return
        cursor = yield call(conn.execute, sql)
        row = _as_tuple((yield call(cursor.fetchone)))


def _step(op: Op) -> Steps[Any]:
    """One `op` as steps: its result."""
    return (yield op)


def _executing(conn: Any, sql: str, args: Sequence[Any]) -> Any:
    """`conn.execute(sql, args)`: sqlite3, aiosqlite or psycopg (unprepared, as before)."""
    if isinstance(conn, (psycopg.Connection, psycopg.AsyncConnection)):
        return conn.execute(sql, args, prepare=False)
    return conn.execute(sql, args)


def _fetch(conn: Any, sql: str, args: Sequence[Any]) -> Result:
    """(rows as tuples, row count) of `sql` run on a sqlite3 or psycopg connection."""
    cursor = _executing(conn, sql, args)
    rows = cursor.fetchall() if cursor.description is not None else []
    return [_as_tuple(row) for row in rows], cursor.rowcount


async def _afetch(conn: Any, sql: str, args: Sequence[Any]) -> Result:
    """(rows as tuples, row count) of `sql` run on an aiosqlite or psycopg async connection."""
    cursor = await _executing(conn, sql, args)
    rows = await cursor.fetchall() if cursor.description is not None else []
    return [_as_tuple(row) for row in rows], cursor.rowcount


def _as_tuple(row: _Row) -> tuple[Any, ...]:
    if row is None:
        return (None,)
    return tuple(row.values()) if isinstance(row, Mapping) else tuple(row)


def _backoff(state: RetryCallState) -> float:
    """Seconds to wait before retrying a setup that raced another process's."""
    return random.uniform(0.05, 0.2) * state.attempt_number


def _mark_set_up(url: str) -> None:
    with _SET_UP_LOCK:
        _SET_UP.add(url)


def _thread_ids(saver: BaseCheckpointSaver[str], sql: str) -> list[str]:
    """Run `sql` (selecting thread ids) on the saver's own connection or pool."""
    if isinstance(saver, SqliteSaver):
        with saver.cursor(transaction=False) as cur:
            return [row[0] for row in cur.execute(sql).fetchall()]
    if isinstance(saver, PostgresSaver) and isinstance(saver.conn, ConnectionPool):
        with saver.conn.connection() as conn:
            return [row["thread_id"] for row in conn.execute(sql).fetchall()]
    raise UserError(
        f"Persistence.list_threads reads keel's own checkpointers (SQLite, or PostgreSQL with "
        f"a pool, from Persistence(url).checkpointer()), got a {type(saver).__name__}: do not "
        "override Persistence.checkpointer(), or list threads with the saver's own list()."
    )


def _summarize(thread_id: str, tup: CheckpointTuple) -> ThreadSummary:
    """A `ThreadSummary` from a thread's latest checkpoint (no graph needed)."""
    checkpoint = tup.checkpoint
    channels, writes = checkpoint["channel_values"], tup.pending_writes or ()
    # A node is pending while its trigger channel holds a value: LangGraph clears
    # `branch:to:<node>` once the node ran; `Send` packets wait in `__pregel_tasks`.
    pending = [c.removeprefix("branch:to:") for c in channels if c.startswith("branch:to:")]
    pending += [send.node for send in channels.get("__pregel_tasks") or ()]
    return ThreadSummary(
        thread_id=thread_id,
        checkpoint_id=checkpoint["id"],
        updated_at=checkpoint.get("ts"),
        values={k: v for k, v in channels.items() if not k.startswith(("branch:", "join:", "__"))},
        next=tuple(dict.fromkeys(pending)),
        interrupted=any(channel == INTERRUPT for _, channel, _ in writes),
        error=next((str(value) for _, channel, value in writes if channel == ERROR), None),
    )


def _sqlite_target(path: str | None, readonly: bool) -> tuple[str, bool]:
    """What `connect` takes: the path (its folder created), or a read-only `file:` URI."""
    if path is None or path == ":memory:":
        return ":memory:", False
    if readonly:
        return f"{Path(path).as_uri()}?mode=ro", True
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return path, False


def _failure(persistence: Persistence, action: str, exc: BaseException) -> str:
    """The `SetupError` message for a database error: what failed, why, and the fix."""
    reason, url = _one_line(exc), _redact(persistence.url)
    if persistence.backend == "sqlite":
        return (
            f"cannot {action} the SQLite database at {url}: {reason}. Check the path and its "
            "permissions / KEEL_DB_URL, or run `keel db setup` to create it."
        )
    if action in ("setup", "check"):
        return f"{action} on PostgreSQL at {url} failed: {reason}. Check the URL's privileges."
    if "database" in reason and "does not exist" in reason:
        hint = "Create the database (e.g. `createdb`) or fix its name in the URL."
    elif "authentication" in reason or "password" in reason:
        hint = "Check the user and password in the URL / KEEL_DB_URL."
    else:
        hint = "Is the server running? Check the URL / KEEL_DB_URL."
    return f"cannot reach PostgreSQL at {url}: {reason}. {hint}"


def _parse_url(url: object) -> tuple[str, Literal["sqlite", "postgres"], str | None]:
    """Validate a URL: (normalized URL, backend, absolute SQLite path or None)."""
    if not isinstance(url, str) or not url.strip():
        raise UserError(f"The database URL must be a non-empty string, got {url!r}. {_ACCEPTED}")
    url = url.strip()
    scheme, sep, rest = url.partition("://")
    if sep and scheme == "sqlite":
        if not rest.startswith("/") or len(rest) < 2 or "?" in rest:
            raise UserError(
                f"Invalid SQLite URL {url!r}: use three slashes and a path, with no host or "
                f"?options. {_ACCEPTED}"
            )
        path = rest[1:]  # `~` is the home folder (a shell leaves `--db=sqlite:///~/x.db` alone)
        return (
            url,
            "sqlite",
            path if path == ":memory:" else str(Path(path).expanduser().absolute()),
        )
    if sep and scheme in ("postgresql", "postgres"):
        url = f"postgresql://{rest}"
        try:
            conninfo_to_dict(url)
        except psycopg.Error as exc:
            raise UserError(f"Invalid PostgreSQL URL {_redact(url)}: {exc}. {_ACCEPTED}") from exc
        return url, "postgres", None
    hint = " Drop the `+driver` part." if "+" in scheme else ""
    raise UserError(f"Unsupported database URL {_redact(url)}.{hint} {_ACCEPTED}")


def _redact(url: str) -> str:
    """The URL with any password (in the user part or `?password=`) replaced by `***`."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    user, at, host = parts.netloc.rpartition("@")
    query = parse_qsl(parts.query, keep_blank_values=True)
    if not (at and ":" in user) and all(key != "password" for key, _ in query):
        return url
    user = user.split(":", 1)[0] + (":***" if ":" in user else "")
    query = [(key, "***" if key == "password" else value) for key, value in query]
    netloc = f"{user}{at}{host}"
    return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query, safe="*")))


def _is_int(minimum: int) -> Callable[[object], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def _is_seconds(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


_RULES: dict[str, tuple[Callable[[object], bool], str]] = {
    "setup": (lambda v: isinstance(v, bool), "True or False"),
    "prepare_threshold": (
        lambda v: v is None or _is_int(0)(v),
        "None (no prepared statements, for PgBouncer) or an integer >= 0",
    ),
    "pool_min_size": (_is_int(0), "an integer >= 0"),
    "pool_max_size": (_is_int(1), "an integer >= 1"),
    "pool_timeout": (_is_seconds, "a positive number of seconds"),
    "max_idle": (_is_seconds, "a positive number of seconds"),
    "max_lifetime": (_is_seconds, "a positive number of seconds"),
    "limit": (_is_int(1), "an integer >= 1"),
    "keep_last": (lambda v: v is None or _is_int(1)(v), "None or an integer >= 1"),
    "idle_ttl": (lambda v: v is None or _is_seconds(v), "None, positive seconds or a timedelta"),
    "dry_run": (lambda v: isinstance(v, bool), "True or False"),
}


_WHERE = {"limit": "list_threads", "keep_last": "prune", "idle_ttl": "prune", "dry_run": "prune"}


def _validate(**arguments: object) -> None:
    """Raise `UserError` naming the first argument that breaks its rule in `_RULES`."""
    for name, value in arguments.items():
        ok, wanted = _RULES[name]
        if not ok(value):
            where = _WHERE.get(name, "Persistence")
            raise UserError(f"{where}({name}=...) must be {wanted}, got {value!r}.")
