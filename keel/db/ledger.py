"""keel's ledger: its own tables beside the checkpoints, in the same database (one URL).

The ledger holds what must be shared across runs and processes: per-user and per-tenant spend
(budgets), idempotency records of side-effecting tool calls, rate buckets, breaker state,
standing approvals, the audit log and run records.

Logic that talks to the database is written once, as a *flow*: a generator that yields
`(sql, params)` steps and receives each step's rows. `Ledger.run(flow)` and
`await Ledger.arun(flow)` drive it in one transaction, on SQLite (`BEGIN IMMEDIATE`: one writer
at a time, across processes; one connection per thread, kept open, in WAL mode) or PostgreSQL
(a pooled connection; flows lock rows with `FOR UPDATE`; a write whose rows nobody reads
waits and travels with the next statement, see `_blind`). SQL is written with `?` placeholders
and `{for_update}` where a row lock belongs; `{least}` / `{greatest}` are the two-argument
minimum and maximum (`MIN` / `MAX` on SQLite, `LEAST` / `GREATEST` on PostgreSQL). Statements
whose rows the flow needs but none of which needs another's go `together` (one round trip).

Records whose result nobody reads (a rate bucket's refund, a breaker's success, a tool call's
result) may be *deferred* inside a `batch()` scope: they run at the start of the scope's next
transaction (its settled spend, its audit records), or together when the scope ends. keel opens
one scope per graph node, so what a node writes after its model or tool call commits in one
transaction before the node returns, instead of one transaction per record.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import random
import sqlite3
import threading
import time
import weakref
from collections.abc import AsyncIterator, Generator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from functools import lru_cache
from typing import Any, Generic, NamedTuple, TypeVar

import psycopg
from psycopg import AsyncClientCursor, ClientCursor
from psycopg.pq import ExecStatus, TransactionStatus
from psycopg_pool import ConnectionPool, PoolTimeout

from keel._drive import Op, Steps, adrive, both, call, drive, sleep
from keel.db.checkpoint.postgres import connection_lost
from keel.db.migrations import migrate_flow
from keel.db.persistence import Persistence
from keel.db.pool_closing import CLOSE_WITHIN, close_elsewhere, close_later, runs_here
from keel.db.pools import (
    FRESH_FOR,
    DrainingAsyncPool,
    Reachability,
    adraining_pool,
    draining_pool,
    idle_sessions_end,
    quiet,
    unbounded,
)
from keel.db.sqlite_handle import SqliteHandle
from keel.db.writer_lock import WAIT, writer_lock
from keel.errors import SetupError, StorageError, UserError, _one_line

__all__ = ["Flow", "Ledger", "read_ahead", "refused_for_good", "returning", "together"]

T = TypeVar("T")
Row = tuple[Any, ...]
Flow = Generator[tuple[str, tuple[Any, ...]], list[Row], T]
"""A transaction written once: yields `(sql, params)`, receives the rows, returns a result."""


_REFUSED_VALUES = (
    psycopg.DataError,
    psycopg.IntegrityError,
    sqlite3.DataError,
    sqlite3.IntegrityError,
    UnicodeError,
)
"""What a database driver raises for a value or constraint it refuses, not for being down."""


def refused_for_good(exc: BaseException) -> bool:
    """Whether the ledger refused what a flow writes (its values), not the write itself.

    The same write fails whenever it is sent again: kept to be sent with later writes, it would
    fail them too. A ledger that is down, locked or cut off raises something else.
    """
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, _REFUSED_VALUES):
            return True
        seen = seen.__cause__
    return False


def together(*statements: tuple[str, tuple[Any, ...]]) -> Flow[list[list[Row]]]:
    """Run `statements`, none of which needs another's rows, in one round trip: their rows.

    On PostgreSQL they travel as one query (each statement still sees what the ones before it
    committed or locked: a statement's snapshot is taken when it starts); on SQLite they run
    one after the other. For example the locked spend row and the reservations held against
    it: `spend, held = yield from together(upsert, select)`.

    Raises:
        UserError: no statement is given.
    """
    if not statements:
        raise UserError("together(...) needs one statement or more, got none.")
    return _together(statements)


def _together(statements: tuple[tuple[str, tuple[Any, ...]], ...]) -> Flow[list[list[Row]]]:
    rows = yield _TOGETHER, statements
    return [list(each) for each in rows]


_TOGETHER = "-- together"
"""The `sql` of a step whose `params` are statements run in one round trip (`together`)."""


def read_ahead(read: tuple[str, tuple[Any, ...]], flow: Flow[T]) -> Flow[tuple[list[Row], Flow[T]]]:
    """`read` together with `flow`'s first step: `read`'s rows, and the rest of `flow`.

    For a check that decides whether `flow` goes on (a breaker before a reservation): the
    check costs no round trip of its own. The caller runs the rest (`yield from rest`) or
    raises, which rolls back what `flow`'s first step wrote.
    """
    try:
        sql, params = next(flow)
    except StopIteration as stop:
        rows = yield read
        return rows, returning(stop.value)
    grouped = sql is _TOGETHER
    got = yield from together(read, *(params if grouped else ((sql, params),)))
    return got[0], _resumed(flow, got[1:] if grouped else got[1])


def _resumed(flow: Flow[T], rows: list[Any]) -> Flow[T]:
    """`flow`, already at its first step, sent that step's `rows` and run to its end."""
    try:
        step = flow.send(rows)
        while True:
            step = flow.send((yield step))
    except StopIteration as stop:
        result: T = stop.value
        return result


def returning(value: T) -> Flow[T]:
    """A flow with no steps that returns `value` (nothing sent, nothing written)."""
    yield from ()
    return value


class Ledger:
    """keel's tables in the database at `url` (`sqlite:///…` or `postgresql://…`).

    Open it once per process and share it; `close()` / `await aclose()` release its pools, once
    the runs that use it have ended (`await aclose()` inside the event loop that ran them). A
    closed ledger stays closed: using it again raises `StorageError` instead of opening new
    connections behind the app's back.

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
        # one async pool per event loop: a pool's workers are tasks on the loop that opened it
        # (a second `asyncio.run` of an app that shares the ledger gets a pool of its own)
        self._apools: dict[asyncio.AbstractEventLoop, DrainingAsyncPool] = {}
        self._closing: list[asyncio.Task[None]] = []  # `close()` inside a pool's loop
        self._lock = threading.Lock()
        self._alocks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )
        self._setup_lock: asyncio.Lock | None = None
        self._setup_thread_lock = threading.Lock()
        self._ready = False
        self._closed = False
        self._local = threading.local()
        self._sqlite_dbs: list[SqliteHandle] = []  # every thread's, for `close()`
        self._writer: threading.RLock | None = None  # the file's (`writer_lock`)
        self._down = Reachability(
            self._persistence.connect_timeout,
            lambda: both(self._persistence.reach, self._persistence.areach),
            self._unreachable,
        )

    def __repr__(self) -> str:
        return f"Ledger({self._persistence.safe_url!r})"

    # -- drivers -----------------------------------------------------------------------------

    def run(self, flow: Flow[T]) -> T:
        """Run `flow` in one transaction (sync), after the records deferred in this scope."""
        if not self._ready:
            self.setup()
        return self._run(self._with_deferred(flow))

    async def arun(self, flow: Flow[T]) -> T:
        """Run `flow` in one transaction (async), after the records deferred in this scope."""
        if not self._ready:
            await self.asetup()
        return await self._arun(self._with_deferred(flow))

    def read(self, flow: Flow[T]) -> T:
        """Run `flow`, whose statements only `SELECT`, outside a transaction (sync).

        Each statement sees what is committed when it runs, and nothing waits for a writer:
        no write lock on SQLite, no `BEGIN` / `COMMIT` round trips on PostgreSQL. For a check
        that is right whatever commits between its statements (a breaker's state). The records
        deferred in this scope wait for the next `run`.

        Raises:
            UserError: a statement of `flow` is not a `SELECT`.
        """
        if not self._ready:
            self.setup()
        return self._run(_selects(flow), transaction=False)

    async def aread(self, flow: Flow[T]) -> T:
        """`read` under `ainvoke`."""
        if not self._ready:
            await self.asetup()
        return await self._arun(_selects(flow), transaction=False)

    # -- deferred records --------------------------------------------------------------------

    def defer(self, flow: Flow[Any]) -> None:
        """Run `flow`, a record whose result nobody reads, with the scope's next transaction.

        Outside a `batch()` scope it runs now, in a transaction of its own.
        """
        if not self._enqueue(flow):
            self.run(flow)

    async def adefer(self, flow: Flow[Any]) -> None:
        """`defer` under `ainvoke`."""
        if not self._enqueue(flow):
            await self.arun(flow)

    def flush(self) -> None:
        """Commit the records deferred in this scope now, in a transaction of their own.

        For a flow that may be refused by raising (a breaker's `admitting`): the exception rolls
        back its transaction, and the deferred records it carried would go with it. Nothing to
        do (no transaction) when none waits.
        """
        if (pending := self._taken()) is not None:
            self.run(pending)

    async def aflush(self) -> None:
        """`flush` under `ainvoke`."""
        if (pending := self._taken()) is not None:
            await self.arun(pending)

    @contextmanager
    def batch(self) -> Iterator[None]:
        """A scope whose deferred records commit with its next transaction, or on exit.

        The exit commits them even when the scope raises; nested scopes join the outer one.
        """
        token = self._open()
        try:
            yield
        finally:
            if (pending := self._close(token)) is not None:
                self.run(pending)

    @asynccontextmanager
    async def abatch(self) -> AsyncIterator[None]:
        """`batch` under `ainvoke`."""
        token = self._open()
        try:
            yield
        finally:
            if (pending := self._close(token)) is not None:
                await self.arun(pending)

    def _open(self) -> contextvars.Token[_Batch | None] | None:
        """Open a scope (`None`: one is open already, which this one joins)."""
        return None if self._scope() is not None else _BATCH.set(_Batch(self))

    def _close(self, token: contextvars.Token[_Batch | None] | None) -> Flow[None] | None:
        """Close the scope `token` opened: its records still waiting, as one flow."""
        if token is None:
            return None
        pending = self._taken()
        _BATCH.reset(token)
        return pending

    @property
    def deferred(self) -> int:
        """How many records wait in this scope's batch for its next transaction."""
        batch = self._scope()
        return 0 if batch is None else len(batch.flows)

    @property
    def batching(self) -> bool:
        """Whether a `batch()` scope of this ledger is open here (deferred records wait)."""
        return self._scope() is not None

    def _scope(self) -> _Batch | None:
        batch = _BATCH.get()
        return batch if batch is not None and batch.ledger is self else None

    def _enqueue(self, flow: Flow[Any]) -> bool:
        batch = self._scope()
        if batch is None:
            return False
        with batch.lock:
            batch.flows.append(flow)
        return True

    def _take(self) -> list[Flow[Any]]:
        batch = self._scope()
        if batch is None:
            return []
        with batch.lock:
            pending, batch.flows = batch.flows, []
        return pending

    def _taken(self) -> Flow[None] | None:
        """The records waiting in this scope, taken out as one flow (`None`: none wait)."""
        pending = self._take()
        return _chain(pending, returning(None)) if pending else None

    def _with_deferred(self, flow: Flow[T]) -> Flow[T]:
        pending = self._take()
        return _chain(pending, flow) if pending else flow

    def setup(self) -> None:
        """Create or upgrade keel's tables (`keel.db.migrations`; idempotent, concurrency-safe).

        Raises:
            SchemaVersionError: A newer keel set the database up.
        """
        with self._setup_thread_lock:
            if not self._ready:
                with unbounded():  # may wait for another process's migration
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
                with unbounded():  # may wait for another process's migration
                    await self._arun(migrate_flow(self.backend))
                self._ready = True

    def close(self, *, timeout: float = CLOSE_WITHIN) -> None:
        """Close the ledger's pools and SQLite connections, once the runs that use it have ended.

        Safe while another thread's transaction runs (say, a cancelled `ainvoke`'s, which
        `asyncio.to_thread` cannot stop): that transaction ends, then its connection closes.
        The ledger stays closed (closing it again does nothing): a later transaction raises
        `StorageError` and opens nothing, so what a run still does after the app closed its
        ledger (a stream closed late giving its leases back) cannot leak a pool.

        The async pools (PostgreSQL under `ainvoke`, one per event loop that used the ledger)
        are each closed on the loop that opened it: when that loop runs in another thread, the
        close runs there and is waited for (`timeout` seconds at most, default 10, for each
        such pool); when it is stopped, it is run until the close is done; when it has ended
        (`asyncio.run` returned), its idle connections are closed here. Called inside that loop
        (a coroutine, or sync code it calls), which cannot wait for itself, the pool closes in a
        task on it, done once the caller next awaits: `await ledger.aclose()` there waits for
        the close (and, as the last line of an `asyncio.run`, is the one that is sure to finish
        before the loop ends).

        Raises:
            StorageError: The async pool's loop, in another thread, did not close it within
                `timeout` s (blocked). The ledger is closed; the pool closes when that loop gets
                to it.
            UserError: `timeout` is not a number of seconds > 0.
        """
        timeout = _close_timeout(timeout)
        late = False
        for pool in self._shut():
            if runs_here(pool):
                self._closing.append(close_later(pool))
            elif not close_elsewhere(pool, timeout):
                late = True
        if late:
            raise self._not_closed_in_time(timeout)

    def _shut(self) -> list[DrainingAsyncPool]:
        """Mark the ledger closed and close its sync side; the async pools, left to close."""
        with self._lock:
            self._closed = True
            pools, self._apools = list(self._apools.values()), {}
        self._disconnect()
        return pools

    def _not_closed_in_time(self, timeout: float) -> StorageError:
        return StorageError(
            f"{self!r} is closed, but its async pool's event loop, in another thread, did not "
            f"close the pool within {timeout:g} s (it is blocked)",
            fix="The pool closes when that loop gets to it; `await ledger.aclose()` on that loop "
            "waits for it.",
        )

    def _disconnect(self) -> None:
        """Close the SQLite connections and the sync pool; the next transaction opens new ones.

        (Unless the ledger is closed.) For a database taken away and put back under a running
        process (`tests/test_attack_storage_faults.py`).
        """
        with self._lock:
            handles, self._sqlite_dbs = self._sqlite_dbs, []
            pool, self._pool = self._pool, None
        self._local = threading.local()
        for handle in handles:  # one in use closes when its transaction ends
            handle.retire()
        if pool is not None:
            pool.close()

    @property
    def closed(self) -> bool:
        """Whether `close()` or `aclose()` was called (the ledger then refuses transactions)."""
        return self._closed

    def _refuse_closed(self) -> None:
        """Raise `StorageError` if the ledger was closed: nothing is opened again."""
        if self._closed:
            raise self._closed_error()

    def _closed_error(self) -> StorageError:
        return StorageError(
            f"the ledger at {self._persistence.safe_url} was closed (Ledger.close() / aclose()) "
            "and does not reopen: close a ledger only after the runs that use it have ended (a "
            "stream read to its end or closed), or give later runs a new Ledger."
        )

    def close_thread(self) -> None:
        """Close the calling thread's SQLite connection; nothing to do on PostgreSQL.

        A short-lived thread calls this when it is done; a later transaction reopens one.
        """
        if getattr(self._local, "handle", None) is not None:
            self._forget_sqlite()

    async def aclose(self) -> None:
        """`close` under `ainvoke`: the async pool's close is awaited (on any event loop).

        Raises:
            StorageError: As `close` (its default `timeout`).
        """
        late = False
        for pool in self._shut():
            if runs_here(pool):
                await pool.close()
            elif not await asyncio.to_thread(close_elsewhere, pool):  # a loop ended, or elsewhere
                late = True
        for closing in self._closing:  # the closes `close()` started on this loop
            if not closing.done() and closing.get_loop() is asyncio.get_running_loop():
                await asyncio.shield(closing)
        if late:
            raise self._not_closed_in_time(CLOSE_WITHIN)

    # -- internals ---------------------------------------------------------------------------

    def _run(self, flow: Flow[T], *, transaction: bool = True) -> T:
        """`flow` in one transaction, or (`transaction=False`) each statement on its own."""
        if self.backend == "sqlite":
            return self._run_sqlite(flow, transaction=transaction)
        return drive(self._attempts(flow, transaction=transaction))

    async def _arun(self, flow: Flow[T], *, transaction: bool = True) -> T:
        """`_run` under `ainvoke`."""
        if self.backend == "sqlite":  # a short transaction on the thread's own connection
            return await asyncio.to_thread(self._run_sqlite, flow, transaction=transaction)
        return await adrive(self._attempts(flow, transaction=transaction))

    def _attempts(self, flow: Flow[T], *, transaction: bool = True) -> Steps[T]:
        """`flow` in a PostgreSQL transaction, again on a fresh connection while `_Replay` may.

        `transaction=False`: the statements run on an autocommit connection, each on its own.
        """
        replay = _Replay(flow)
        attempt = 0
        while True:
            self._down.check()  # connecting failed a moment ago: fail now, as it did
            try:
                done: T = yield both(self._on_pg, self._aon_pg, replay.steps(), transaction)
                return done
            except psycopg.Error as exc:  # `PoolTimeout` and `PoolClosed` among them
                if self._closed:  # its pool closed under it (`PoolClosed`): no retry reopens it
                    raise self._closed_error() from exc
                if _dead(exc):  # its siblings likely died too: replace every idle one
                    yield Op(self._drain, self._adrain)
                if not replay.failed(exc, attempt, self):
                    return replay.result  # a read whose commit was cut off: its rows stand
            yield sleep(_backoff(attempt))
            attempt += 1

    def _on_pg(self, steps: Flow[T], transaction: bool) -> T:
        """`steps` on a pooled connection (`_on_cursor`), rolled back if they fail mid-way.

        A pool with no connection to give within one connect timeout (a server down, or every
        connection busy) connects once on its own to tell which (`Reachability`).
        """
        with self._sync_pool().connection() as conn:
            cur = ClientCursor(conn) if transaction else conn.cursor()
            try:
                return drive(_on_cursor(cur, steps, transaction))
            except BaseException:
                if transaction and _rollback_needed(conn):
                    with suppress(psycopg.Error):
                        cur.execute("ROLLBACK")
                raise

    async def _aon_pg(self, steps: Flow[T], transaction: bool) -> T:
        """`_on_pg` on the async pool (the connection and its rollback awaited)."""
        pool = await self._async_pool()
        async with pool.connection() as conn:
            cur = AsyncClientCursor(conn) if transaction else conn.cursor()
            try:
                return await adrive(_on_cursor(cur, steps, transaction))
            except BaseException:
                if transaction and _rollback_needed(conn):
                    with suppress(psycopg.Error):
                        await cur.execute("ROLLBACK")
                raise

    def _drain(self) -> None:
        if self._pool is not None:
            self._pool.drain()

    async def _adrain(self) -> None:
        if (pool := self._apools.get(asyncio.get_running_loop())) is not None:
            await pool.drain()

    def _run_sqlite(self, flow: Flow[T], *, transaction: bool = True) -> T:
        handle = self._sqlite_connection()
        try:
            if not transaction:  # autocommit: each SELECT reads what is committed
                return _statements(flow, handle.db)
            return self._transact_sqlite(flow, handle.db)
        except sqlite3.DatabaseError as exc:
            self._forget_sqlite()
            undone = "; the transaction was rolled back" if transaction else ""
            raise StorageError(
                f"the ledger at {self._persistence.safe_url} failed: {_one_line(exc)}{undone}. "
                "Check the file and its disk, then resume the run."
            ) from exc
        finally:
            handle.release()

    def _transact_sqlite(self, flow: Flow[T], db: sqlite3.Connection) -> T:
        lock = writer_lock(self._sqlite_path()) if self._writer is None else self._writer
        self._writer = lock
        queued = lock.acquire(timeout=WAIT)  # else SQLite's own locking queues us
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                result = _statements(flow, db)
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return result
        finally:
            if queued:
                lock.release()

    def _sqlite_connection(self) -> SqliteHandle:
        """This thread's connection, opened once and acquired (WAL: readers never wait).

        `_run_sqlite` releases it; one that `close()` retired meanwhile is then closed. Opening
        one closes those of threads that have ended: an app that runs each request on a thread
        (or an `asyncio.run`, whose worker threads end with it) would otherwise keep a
        connection per request open until `close()`.
        """
        self._refuse_closed()
        mine = self._local  # once: `close()` may put a fresh one in its place meanwhile
        handle: SqliteHandle | None = getattr(mine, "handle", None)
        if handle is not None and mine.pid == os.getpid() and handle.acquire():
            if _file_id(mine.path) == mine.file:
                return handle
            handle.release()  # its file was removed or replaced: its writes would be lost
            self._forget_sqlite()
        path = self._sqlite_path()
        if self._ready and _file_id(path) is None:
            raise StorageError(
                f"the ledger's file at {self._persistence.safe_url} was removed while keel had it "
                "open (what it wrote since would go to the removed file, and a new one would have "
                "none of keel's tables): restore it, or create it again (keel db setup), then "
                "resume the run."
            )
        try:
            db = sqlite3.connect(path, isolation_level=None, timeout=30, check_same_thread=False)
            _to_wal(db)  # stored in the file: every process uses it
            # commits survive a crash of any process (WAL); a power loss may lose the last ones
            db.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.DatabaseError as exc:
            raise StorageError(
                f"cannot open the ledger at {self._persistence.safe_url}: {_one_line(exc)}. "
                "Check the path and its permissions."
            ) from exc
        handle = SqliteHandle(db)
        handle.acquire()
        with self._lock:  # the connections of threads that ended go as a new one comes
            if self._closed:  # closed while it opened: `close()` did not see it
                handle.release()
                handle.retire()
                self._refuse_closed()
            mine = self._local
            mine.pid, mine.file, mine.path = os.getpid(), _file_id(path), path
            mine.handle = handle  # last: a handle found here has the rest beside it
            ended: list[SqliteHandle] = []
            kept = [handle]
            for each in self._sqlite_dbs:  # one look each: a thread ending meanwhile is in one
                (kept if each.owner.is_alive() else ended).append(each)
            self._sqlite_dbs = kept
        for gone in ended:
            gone.retire()
        return handle

    def _forget_sqlite(self) -> None:
        """Close this thread's connection after a failure; the next transaction reopens."""
        mine = self._local
        handle: SqliteHandle | None = getattr(mine, "handle", None)
        mine.handle = None
        if handle is not None:
            with self._lock:
                if handle in self._sqlite_dbs:  # else `close()` took it (and retired it)
                    self._sqlite_dbs.remove(handle)
            handle.retire()  # closed now, or by `_run_sqlite` when it releases it

    def _sqlite_path(self) -> str:
        path = self._persistence.sqlite_path
        if path is None:
            raise UserError(
                "The ledger needs a database file shared by every run; sqlite:///:memory: gives "
                "each connection its own. Use sqlite:///.keel/keel.db or PostgreSQL."
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        return str(path)

    def _pool_kwargs(self) -> dict[str, Any]:
        # keel's draining health check: after connections die, every idle one is replaced at
        # once instead of psycopg_pool's 1 s, 2 s, 4 s… wait per dead connection. Commits are
        # asynchronous except for claims and standing approvals (`durable`); connecting is
        # bounded as the checkpointer's is (`Persistence.pool_kwargs`)
        # a process stopped mid-transaction gives its row locks back (`IDLE_IN_TRANSACTION`)
        options = f"-c synchronous_commit=off {idle_sessions_end(self._persistence.url)}"
        return self._persistence.pool_kwargs(
            self._down, {}, options=options.strip(), name="keel-ledger",
            min_size=1, max_size=self._pool_max_size, timeout=_POOL_TIMEOUT, fresh_for=FRESH_FOR,
        )  # fmt: skip

    def _unreachable(self, exc: Exception) -> StorageError:
        """Connecting failed with `exc`: the error that says so, with the likely fix."""
        if isinstance(exc, SetupError):  # `Persistence.reach`'s: the server's reason, the fix
            reason = str(exc).rstrip(".")
        else:
            reason = f"cannot open a pool at {self._persistence.safe_url}: {_one_line(exc)}"
        return StorageError(
            f"keel's ledger: {reason}",
            fix="Nothing was written; resume the run once PostgreSQL answers.",
        )

    def _sync_pool(self) -> ConnectionPool[Any]:
        with self._lock:
            self._refuse_closed()
            if self._pool is None:
                drive(self._down.reaching())  # a server down fails in one connect timeout, says why
                self._pool = draining_pool(self.url, **self._pool_kwargs())
                try:
                    self._pool.open(wait=True, timeout=_POOL_TIMEOUT)
                except Exception as exc:
                    self._pool = None
                    raise self._down.found(self._unreachable(exc)) from exc
            return self._pool

    async def _async_pool(self) -> DrainingAsyncPool:
        loop = asyncio.get_running_loop()
        if (lock := self._alocks.get(loop)) is None:
            lock = self._alocks.setdefault(loop, asyncio.Lock())
        async with lock:
            self._refuse_closed()
            if (pool := self._apools.get(loop)) is None:
                self._forget_ended_loops()
                await adrive(self._down.reaching())
                pool = adraining_pool(self.url, **self._pool_kwargs())
                try:
                    await pool.open(wait=True, timeout=_POOL_TIMEOUT)
                except Exception as exc:
                    raise self._down.found(self._unreachable(exc)) from exc
                with self._lock:  # `close()` may run in another thread
                    if kept := not self._closed:
                        self._apools[loop] = pool
                if not kept:  # closed while it opened: `close()` did not see it
                    await pool.close()
                    self._refuse_closed()
            return pool

    def _forget_ended_loops(self) -> None:
        """Close the pools of event loops that have ended (an earlier `asyncio.run`'s).

        Their workers are gone with their loop, so such a pool never grows again; its idle
        connections would stay open on the server until the process exits.
        """
        with self._lock:
            ended = [loop for loop in self._apools if loop.is_closed()]
            pools = [self._apools.pop(loop) for loop in ended]
        for pool in pools:
            pool.close_abandoned()


class _Batch:
    """The records deferred in one `Ledger.batch()` scope (shared by the tasks it starts)."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.flows: list[Flow[Any]] = []
        self.lock = threading.Lock()


_BATCH: contextvars.ContextVar[_Batch | None] = contextvars.ContextVar(
    "keel_ledger_batch", default=None
)


def _chain(pending: list[Flow[Any]], flow: Flow[T]) -> Flow[T]:
    """The deferred records, then `flow`: one transaction, whose reads see those records."""
    for record in pending:
        yield from record
    return (yield from flow)


_ATTEMPTS = 3
"""Attempts of one transaction whose connection died before it committed."""


def _close_timeout(timeout: object) -> float:
    """`close(timeout=...)` checked: seconds > 0."""
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise UserError(
            f"Ledger.close(timeout=...) is the seconds to wait for the async pool's event loop to "
            f"close it, a number > 0; got {timeout!r}."
        )
    return float(timeout)


_POOL_TIMEOUT = 10.0
"""Seconds a transaction waits for a pool connection before `StorageError`."""


class _Replay(Generic[T]):
    """One flow across attempts: the steps it took and the rows they returned.

    A flow is a generator and cannot be restarted, but it has only seen rows. After the
    connection died before `COMMIT` (the server rolled the transaction back), `steps()` runs the
    steps taken so far again on a fresh connection; when every one returns the rows the flow
    saw, the flow's state is what it would be in this transaction, and it goes on from there.
    Rows that differ (another process wrote meanwhile) end it with `StorageError`.
    """

    def __init__(self, flow: Flow[T]) -> None:
        self.flow = flow
        self.done: list[tuple[tuple[str, tuple[Any, ...]], list[Row]]] = []
        self.finished = False
        self.result: T
        try:
            self.pending = next(flow)
        except StopIteration as stop:
            self.finished, self.result = True, stop.value

    def steps(self) -> Flow[T]:
        """The flow for one attempt: the steps taken so far (checked), then the rest."""
        durable = False
        for step, rows in self.done:
            durable = yield from _durable_before(step, durable)
            if (yield step) != rows:
                raise _Diverged(step[0])
        while not self.finished:
            step = self.pending
            if step is _FLUSH:  # the flow returned: its queued writes go with the `COMMIT`
                yield _FLUSH
                self.finished = True
                break
            durable = yield from _durable_before(step, durable)
            rows = yield step
            self.done.append((step, rows))
            try:
                self.pending = self.flow.send(rows)
            except StopIteration as stop:
                self.result = stop.value
                if _blind(step[0]):
                    self.pending = _FLUSH
                else:
                    self.finished = True
        return self.result

    def failed(self, exc: Exception, attempt: int, ledger: Ledger) -> bool:
        """After attempt `attempt` raised `exc`: whether to try again.

        `False` when the result stands (a read-only flow whose `COMMIT` was cut off); raises
        `StorageError` when no retry is safe or the attempts are used up.
        """
        where = f"the ledger at {ledger._persistence.safe_url}"
        if isinstance(exc, PoolTimeout):
            raise StorageError(
                f"no connection to {where} within {_POOL_TIMEOUT:g} s ({exc})",
                fix="Nothing was written. Is PostgreSQL up? Resume the run once it is.",
            ) from exc
        if isinstance(exc, _Diverged):
            raise StorageError(
                f"a transaction on {where} lost its connection and, replayed, read other rows "
                f"({exc})",
                fix="Nothing was written. Resume the run.",
            ) from exc
        if not connection_lost(exc):
            raise exc
        if self.finished or isinstance(exc, _InDoubt):  # the connection died while committing
            if not self._writes():
                return False
            raise StorageError(
                f"the connection to {where} died while committing ({_one_line(exc)}): the "
                "transaction may or may not have been applied. keel's records are keyed, so "
                "resuming the run finds whichever happened.",
                in_doubt=True,
            ) from exc
        if attempt + 1 >= _ATTEMPTS:
            raise StorageError(
                f"{where} lost the connection {_ATTEMPTS} times in a row ({_one_line(exc)})",
                fix="Nothing was written. Resume the run once the database is reachable.",
            ) from exc
        return True

    def _writes(self) -> bool:
        statements = (each for step, _ in self.done for each, _ in _each(*step))
        return any(not sql.lstrip().upper().startswith("SELECT") for sql in statements)


@lru_cache(maxsize=512)
def durable(sql: str) -> bool:
    """Whether a ledger statement commits synchronously on PostgreSQL (flushed to disk first).

    Claims of side-effecting tool calls (a `keel_tool_calls` row set to `'started'`: on disk
    before the tool runs) and standing human decisions. Every other write (a call's result,
    spend, rate buckets, breakers, audit, run records) commits with `synchronous_commit` off: a
    crash of the database *server* may lose its last fraction of a second of them, never
    corrupt them, and the next synchronous commit flushes every earlier one. A lost result
    leaves its call `started`, which asks "did this happen?" and never runs it again.
    """
    head = sql.lstrip()
    if head[:6].upper() not in ("INSERT", "UPDATE", "DELETE"):
        return False
    if "keel_standing_approvals" in head:
        return True
    return "keel_tool_calls" in head and "'started'" in head.upper().split("WHERE")[0].lower()


def _durable_before(step: tuple[str, tuple[Any, ...]], done: bool) -> Generator[Any, Any, bool]:
    """Yield `SET LOCAL synchronous_commit = on` before the transaction's first durable write."""
    if done or not any(durable(sql) for sql, _ in _each(*step)):
        return done
    yield "SET LOCAL synchronous_commit = on", ()
    return True


class _Diverged(psycopg.Error):
    """A replayed step returned rows other than the first attempt's."""


def _dead(exc: Exception) -> bool:
    """Whether `exc` says the connection died (not that the pool had none to give)."""
    return not isinstance(exc, PoolTimeout) and connection_lost(exc)


def _file_id(path: str) -> tuple[int, int] | None:
    """The identity (device, inode) of the file at `path`; None when there is none."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return None
    return found.st_dev, found.st_ino


def _backoff(attempt: int) -> float:
    """Seconds before attempt `attempt + 1` (the pool reconnects meanwhile)."""
    return float(random.uniform(0.01, 0.05) * 2**attempt)


def _on_cursor(cur: Any, flow: Flow[T], transaction: bool) -> Steps[T]:
    """`flow` on a psycopg cursor, sync or async (each query a `call` of its own method).

    `transaction`: in one transaction (`_sent`: writes queued, `BEGIN` with the first query,
    `COMMIT` with the last or apart); else each statement on its own (`_fetch_pg`).
    """
    queue = _Queue()
    rows: Any = None
    while True:
        try:
            sql, params = flow.send(rows)
        except StopIteration as done:
            result: T = done.value
            break
        if transaction:
            rows = yield from _sent(cur, queue, sql, params)
        else:
            rows = yield from _fetch_pg(cur, sql, params)
    if transaction and queue.begun and not queue.committed:
        yield call(cur.execute, "COMMIT")
    return result


def _rollback_needed(conn: Any) -> bool:
    """Whether `conn` is open and in a transaction (or a query) a failure left behind."""
    return not conn.closed and conn.info.transaction_status != TransactionStatus.IDLE


def _to_wal(db: sqlite3.Connection) -> None:
    """`PRAGMA journal_mode=WAL`, tried again while another process holds the file.

    Switching a new file to WAL needs it to itself, and SQLite answers "database is locked" at
    once (no busy handler) while another process does the same or writes: several workers
    that start together on a fresh file would fail. Measured in `tests/test_crash.py` (three
    processes opening one fresh ledger). Up to `_WAL_WAIT` seconds, then the error stands.
    """
    deadline = time.monotonic() + _WAL_WAIT
    pause = 0.005
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause + random.uniform(0, pause))
        pause = min(pause * 2, 0.2)


_WAL_WAIT = 30.0
"""Seconds a new connection keeps trying to switch the ledger's file to WAL."""


def _selects(flow: Flow[T]) -> Flow[T]:
    """`flow`, refused at its first statement that is not a `SELECT` (see `Ledger.read`)."""
    rows: list[Row] | None = None
    try:
        while True:
            sql, params = flow.send(rows)  # type: ignore[arg-type]
            for each, _ in _each(sql, params):
                if each.lstrip()[:6].upper() != "SELECT" or "{for_update}" in each:
                    raise UserError(
                        f"Ledger.read runs only plain SELECTs, got {each.split(None, 1)[0]!r}: "
                        "use Ledger.run for a flow that writes or locks rows."
                    )
            rows = yield sql, params
    except StopIteration as done:
        result: T = done.value
        return result
    finally:
        flow.close()


def _statements(flow: Flow[T], db: sqlite3.Connection) -> T:
    """Run `flow` on a SQLite connection (`_on_cursor` without the `Op` steps: the hot path)."""
    try:
        statement = next(flow)
        while True:
            sql, params = statement
            if sql is _TOGETHER:
                rows: list[Any] = [_sqlite_rows(db, *each) for each in params]
            else:  # `_sqlite_rows` inlined: one statement after another, the common step
                rows = db.execute(_sqlite_sql(sql), params).fetchall()
            statement = flow.send(rows)
    except StopIteration as done:
        result: T = done.value
        return result
    finally:
        flow.close()


def _sqlite_rows(db: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> list[Row]:
    return db.execute(_sqlite_sql(sql), params).fetchall()


def _each(sql: str, params: tuple[Any, ...]) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    """The statements of a step: those of a `together` step, or the step itself."""
    return params if sql is _TOGETHER else ((sql, params),)


@lru_cache(maxsize=512)
def _sqlite_sql(sql: str) -> str:
    return sql.replace("{for_update}", "").replace("{least}", "MIN").replace("{greatest}", "MAX")


@lru_cache(maxsize=512)
def _pg_sql(sql: str) -> str:
    return (
        sql.replace("{for_update}", "FOR UPDATE")
        .replace("{least}", "LEAST")
        .replace("{greatest}", "GREATEST")
        .replace("?", "%s")
    )


def _fetch_pg(cur: Any, sql: str, params: tuple[Any, ...]) -> Steps[list[Any]]:
    """One step of a plain read (`Ledger.read`): its rows, a list per statement if `together`."""
    if sql is _TOGETHER:
        rows: list[Any] = []
        for each in params:
            rows.append((yield from _fetch_pg(cur, *each)))
        return rows
    yield call(cur.execute, _pg_sql(sql), params)
    return list((yield call(cur.fetchall))) if _has_rows(cur) else []


class _Queue:
    """The statements of one PostgreSQL transaction not sent yet (see `_blind`)."""

    def __init__(self) -> None:
        self.sql: list[str] = ["BEGIN"]
        self.params: list[Any] = []
        self.begun = False
        """Whether `BEGIN` was sent (a flow without statements sends nothing)."""
        self.committed = False
        """Whether `COMMIT` was sent, with the flow's last writes (`_FLUSH`)."""

    def add(self, sql: str, params: tuple[Any, ...]) -> None:
        self.sql.append(_pg_sql(sql))
        self.params.extend(params)

    def take(self, wanted: int, *, commit: bool = False) -> _Send:
        """What waits, as one query; the flow reads the last `wanted` statements' rows.

        `commit`: with `COMMIT` last.
        """
        if commit:
            self.sql.append("COMMIT")
            self.committed = True
        send = _Send("; ".join(self.sql), tuple(self.params), len(self.sql), wanted)
        self.sql, self.params, self.begun = [], [], True
        return send


class _Send(NamedTuple):
    """One query of a transaction.

    Its text, its values, how many statements it holds and how many of them (the last ones)
    have rows the flow reads.
    """

    query: str
    params: tuple[Any, ...]
    statements: int
    wanted: int


_FLUSH = ("-- flush", ())
"""The step `_Replay` yields after a flow whose last statements wait in the `_Queue`: they go
with the `COMMIT`, in one round trip (see `_in_doubt` for a connection lost meanwhile)."""


class _InDoubt(psycopg.OperationalError):
    """The connection died after `COMMIT` was sent, and nothing says the server did not run it."""


def _queued(queue: _Queue, sql: str, params: tuple[Any, ...], conn: Any) -> _Send | None:
    """Queue one step; what to send now, if its rows are needed (or it is `_FLUSH`)."""
    if sql is _FLUSH[0]:
        # on a connection its server dropped while idle, the query fails before it runs:
        # `COMMIT` goes apart then, so that failure is replayed, not in doubt (`_in_doubt`)
        return queue.take(0, commit=quiet(conn))
    for each in _each(sql, params):
        queue.add(*each)
    if sql is _TOGETHER:
        return queue.take(len(params))
    return None if _blind(sql) else queue.take(1)


def _in_doubt(exc: psycopg.Error, sent: str) -> bool:
    """Whether the query `sent`, ending with `COMMIT`, may have committed though it raised `exc`.

    An error the server reports (a `sqlstate`) ends the query at the statement that failed,
    and a connection killed while a statement runs (waiting on a lock, say) names it: before
    `COMMIT` the transaction is rolled back, and replaying it is safe. Killed in or after
    `COMMIT` (no statement named, or the `COMMIT`), or lost without a word from the server,
    it may have committed.
    """
    if not connection_lost(exc):
        return False  # a statement, or `COMMIT` itself, failed: rolled back
    position = exc.diag.statement_position if exc.sqlstate else None
    return not position or sent[int(position) - 1 :].upper().startswith("COMMIT")


def _sent(cur: Any, queue: _Queue, sql: str, params: tuple[Any, ...]) -> Steps[list[Any]]:
    """One step of a transaction: its rows.

    `[]` for a queued write; a list of rows per statement for a `together` step.
    """
    if (send := _queued(queue, sql, params, cur.connection)) is None:
        return []
    with _in_doubt_raised(cur, queue, send):
        yield call(cur.execute, send.query, send.params)
    rows: list[list[Row]] = []
    for _ in _results(cur, send):
        rows.append(list((yield call(cur.fetchall))) if _has_rows(cur) else [])
    return _step_rows(sql, rows)


@contextmanager
def _in_doubt_raised(cur: Any, queue: _Queue, send: _Send) -> Iterator[None]:
    """Around sending `send`: a failure that may have committed it (`_in_doubt`) as `_InDoubt`.

    Any other failure is raised as it is.
    """
    try:
        yield
    except psycopg.Error as exc:
        if queue.committed and _in_doubt(exc, cur.mogrify(send.query, send.params)):
            raise _InDoubt(_one_line(exc)) from exc
        raise


def _has_rows(cur: Any) -> bool:
    """Whether the cursor's current result is rows (a `SELECT`, a `RETURNING`).

    What `cur.description` tells, without building its column objects (5 µs a result).
    """
    result = cur.pgresult
    return result is not None and result.status == ExecStatus.TUPLES_OK


def _results(cur: Any, send: _Send) -> Iterator[None]:
    """Move `cur` to each result the flow reads: those of the last `send.wanted` statements."""
    for _ in range(send.statements - send.wanted):
        cur.nextset()
    for i in range(send.wanted):
        if i:
            cur.nextset()
        yield


def _step_rows(sql: str, rows: list[list[Row]]) -> list[Any]:
    """What a step receives: its statement's rows, or a `together` step's list of them."""
    if sql is _TOGETHER:
        return rows
    return rows[0] if rows else []


@lru_cache(maxsize=512)
def _blind(sql: str) -> bool:
    """Whether `sql` writes and returns nothing (`INSERT`, `UPDATE`, `DELETE`, `SET`).

    (A statement with `RETURNING` returns rows.) In a PostgreSQL transaction such a statement
    is not sent at once: it waits in the transaction's `_Queue` and goes, in the same query
    (one round trip, psycopg's `ClientCursor` binding the values), with the next statement
    whose rows the flow reads; the first one carries the `BEGIN`, and a flow's last writes
    carry the `COMMIT` (`_FLUSH`). So a transaction costs a round trip per read, plus one for
    its last writes and `COMMIT`, instead of one per statement plus two; a queued statement's
    error surfaces at that round trip and rolls the whole transaction back, as before.
    """
    words = sql.split(None, 1)
    head = words[0].upper() if words else ""
    return head in ("INSERT", "UPDATE", "DELETE", "SET") and "RETURNING" not in sql.upper()
