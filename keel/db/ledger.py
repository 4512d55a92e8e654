"""keel's ledger: its own tables beside the checkpoints, in the same database (one URL).

The ledger holds what must be shared across runs and processes: per-user and per-tenant spend
(budgets), idempotency records of side-effecting tool calls, rate buckets, breaker state,
standing approvals, the audit log and run records.

Logic that talks to the database is written once, as a *flow*: a generator that yields
`(sql, params)` steps and receives each step's rows. `Ledger.run(flow)` and
`await Ledger.arun(flow)` drive it in one transaction, on SQLite (`BEGIN IMMEDIATE`: one writer
at a time, across processes) or PostgreSQL (a pooled connection; flows lock rows with
`FOR UPDATE`). SQL is written with `?` placeholders and `{for_update}` where a row lock belongs.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from keel.db.migrations import migrate_flow
from keel.db.persistence import Persistence
from keel.errors import SetupError, UserError

__all__ = ["Flow", "Ledger"]

T = TypeVar("T")
Row = tuple[Any, ...]
Flow = Generator[tuple[str, tuple[Any, ...]], list[Row], T]
"""A transaction written once: yields `(sql, params)`, receives the rows, returns a result."""


class Ledger:
    """keel's tables in the database at `url` (`sqlite:///…` or `postgresql://…`).

    Open it once per process and share it; `close()` / `await aclose()` release its pools.

    Example:
        ```python
        ledger = Ledger("sqlite:///.keel/keel.db")
        agent = build_agent(model, tools, policy=policy, ledger=ledger)
        ```
    """

    def __init__(self, url: str | None = None, *, pool_max_size: int = 10) -> None:
        if not isinstance(pool_max_size, int) or pool_max_size < 1:
            raise UserError(f"Ledger(pool_max_size=...) must be 1 or more, got {pool_max_size!r}.")
        self._persistence = Persistence(url)
        self.url = self._persistence.url
        self.backend = self._persistence.backend
        self._pool_max_size = pool_max_size
        self._pool: ConnectionPool[Any] | None = None
        self._apool: AsyncConnectionPool[Any] | None = None
        self._lock = threading.Lock()
        self._alock: asyncio.Lock | None = None
        self._setup_lock: asyncio.Lock | None = None
        self._setup_thread_lock = threading.Lock()
        self._ready = False

    def __repr__(self) -> str:
        return f"Ledger({self._persistence.safe_url!r})"

    # -- drivers -----------------------------------------------------------------------------

    def run(self, flow: Flow[T]) -> T:
        """Run `flow` in one transaction (sync)."""
        if not self._ready:
            self.setup()
        return self._run(flow)

    async def arun(self, flow: Flow[T]) -> T:
        """Run `flow` in one transaction (async)."""
        if not self._ready:
            await self.asetup()
        return await self._arun(flow)

    def setup(self) -> None:
        """Create or upgrade keel's tables (`keel.db.migrations`; idempotent, concurrency-safe).

        Raises:
            SchemaVersionError: A newer keel set the database up.
        """
        with self._setup_thread_lock:
            if not self._ready:
                self._run(migrate_flow(self.backend))
                self._ready = True

    async def asetup(self) -> None:
        """Create or upgrade keel's tables (`keel.db.migrations`; idempotent, concurrency-safe).

        Raises:
            SchemaVersionError: A newer keel set the database up.
        """
        if self._setup_lock is None:
            self._setup_lock = asyncio.Lock()
        async with self._setup_lock:
            if not self._ready:
                await self._arun(migrate_flow(self.backend))
                self._ready = True

    def close(self) -> None:
        """Close the sync pool (the async pool closes with `aclose`)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    async def aclose(self) -> None:
        """Close both pools."""
        self.close()
        if self._apool is not None:
            await self._apool.close()
            self._apool = None

    # -- internals ---------------------------------------------------------------------------

    def _run(self, flow: Flow[T]) -> T:
        with self._transaction() as execute:
            return _drive(flow, execute)

    async def _arun(self, flow: Flow[T]) -> T:
        if self.backend == "sqlite":
            path = self._sqlite_path()
            async with aiosqlite.connect(path, isolation_level=None, timeout=30) as db:
                await db.execute("BEGIN IMMEDIATE")
                try:
                    result = await _adrive(flow, lambda q, p: _afetch_sqlite(db, q, p))
                except BaseException:
                    await db.execute("ROLLBACK")
                    raise
                await db.execute("COMMIT")
                return result
        pool = await self._async_pool()
        async with pool.connection() as conn, conn.transaction():
            return await _adrive(flow, lambda q, p: _afetch_pg(conn, q, p))

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        if self.backend == "sqlite":
            db = sqlite3.connect(self._sqlite_path(), isolation_level=None, timeout=30)
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    yield lambda q, p: db.execute(_sqlite_sql(q), p).fetchall()
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
            finally:
                db.close()
            return
        pool = self._sync_pool()
        with pool.connection() as conn, conn.transaction():
            yield lambda q, p: _fetch_pg(conn, q, p)

    def _sqlite_path(self) -> str:
        path = self.url.removeprefix("sqlite:///")
        if path == ":memory:":
            raise UserError(
                "The ledger needs a database file shared by every run; sqlite:///:memory: gives "
                "each connection its own. Use sqlite:///.keel/keel.db or PostgreSQL."
            )
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return path

    def _sync_pool(self) -> ConnectionPool[Any]:
        with self._lock:
            if self._pool is None:
                self._pool = ConnectionPool(
                    self.url,
                    min_size=1,
                    max_size=self._pool_max_size,
                    open=False,
                    kwargs={"autocommit": True},
                    check=ConnectionPool.check_connection,
                )
                try:
                    self._pool.open(wait=True, timeout=10)
                except Exception as exc:
                    self._pool = None
                    raise SetupError(
                        f"Cannot open the ledger at {self._persistence.safe_url}: {exc}. "
                        "Is PostgreSQL running and the URL right?"
                    ) from exc
            return self._pool

    async def _async_pool(self) -> AsyncConnectionPool[Any]:
        if self._alock is None:
            self._alock = asyncio.Lock()
        async with self._alock:
            if self._apool is None:
                pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
                    self.url,
                    min_size=1,
                    max_size=self._pool_max_size,
                    open=False,
                    kwargs={"autocommit": True},
                    check=AsyncConnectionPool.check_connection,
                )
                try:
                    await pool.open(wait=True, timeout=10)
                except Exception as exc:
                    raise SetupError(
                        f"Cannot open the ledger at {self._persistence.safe_url}: {exc}. "
                        "Is PostgreSQL running and the URL right?"
                    ) from exc
                self._apool = pool
            return self._apool


def _drive(flow: Flow[T], execute: Any) -> T:
    try:
        step = next(flow)
        while True:
            step = flow.send(list(execute(*step)))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


async def _adrive(flow: Flow[T], fetch: Any) -> T:
    rows: list[Row] = []
    try:
        step = next(flow)
        while True:
            rows = list(await fetch(*step))
            step = flow.send(rows)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


def _sqlite_sql(sql: str) -> str:
    return sql.replace("{for_update}", "")


def _pg_sql(sql: str) -> str:
    return sql.replace("{for_update}", "FOR UPDATE").replace("?", "%s")


def _fetch_pg(conn: Any, sql: str, params: tuple[Any, ...]) -> list[Row]:
    cur = conn.execute(_pg_sql(sql), params)
    return cur.fetchall() if cur.description else []


async def _afetch_pg(conn: Any, sql: str, params: tuple[Any, ...]) -> list[Row]:
    cur = await conn.execute(_pg_sql(sql), params)
    return list(await cur.fetchall()) if cur.description else []


async def _afetch_sqlite(db: aiosqlite.Connection, sql: str, params: tuple[Any, ...]) -> list[Row]:
    async with db.execute(_sqlite_sql(sql), params) as cur:
        return [tuple(row) for row in await cur.fetchall()]
