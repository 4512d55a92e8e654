"""keel's PostgreSQL pools and connections: how long anything waits on a server that is gone.

- **Health checks that drain** (`draining_pool`): psycopg_pool checks a connection when it is
  taken and, when the check fails, sleeps with exponential backoff (1 s, 2 s, 4 s…) before
  taking the next one: after a server restart or `pg_terminate_backend`, a pool of 20 dead
  connections would stall a run far past any timeout. One dead connection means its siblings
  are likely dead too, so keel's check drains the pool: every idle connection is replaced at
  once and the next one taken is fresh.
- **A wait that tells a busy pool from a server gone** (`Reachability`): a pool that gives no
  connection within one connect timeout is checked with one connection of keel's own. When
  that fails, the wait ends with the reason, and so does every wait of the next connect
  timeout; when it works, the pool is busy and the wait goes on (up to the pool's timeout).
- **Replies that come or end** (`reply_timeout`, `network_defaults`): TCP keepalives and
  `tcp_user_timeout` end a connection whose network or server host is gone, and a statement
  whose reply does not come within the reply timeout ends its connection (a server process
  or a proxy that hangs mid-query, which TCP cannot see).
"""

from __future__ import annotations

import asyncio
import re
import select
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import partial
from typing import Any, Self

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout

from keel._drive import Op, Steps, adrive, call, drive
from keel.errors import SetupError, StorageError

__all__ = [
    "FRESH_FOR",
    "REPLY_TIMEOUT",
    "AsyncBoundedConnection",
    "BoundedConnection",
    "DrainingAsyncPool",
    "Reachability",
    "IDLE_IN_TRANSACTION",
    "adraining_pool",
    "draining_pool",
    "idle_sessions_end",
    "network_defaults",
    "quiet",
    "reply_timeout",
    "unbounded",
]

NETWORK_DEFAULTS = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}
"""libpq's TCP options keel sets unless the URL does: a peer that stops answering keepalives
(10 s idle, then 3 probes 5 s apart) or leaves sent data unacknowledged for 30 s (ms) ends the
connection. libpq ignores them on a Unix socket."""
REPLY_TIMEOUT = 60.0
"""Seconds a statement on a pooled connection waits for its reply, unless the URL sets the
server's `statement_timeout` (then that plus one connect timeout; 0: no limit)."""


IDLE_IN_TRANSACTION = "30s"
"""How long PostgreSQL lets one of keel's ledger sessions sit idle inside an open transaction
before it ends the session, unless the URL's `options` set
`idle_in_transaction_session_timeout`. keel's transactions last milliseconds; a process
stopped in one (SIGSTOP, a debugger, a paused VM, a network gone while the server still sees
the connection: TCP keepalives keep a stopped process's socket alive) would hold its row locks
until it resumed: the rows every run of a model shares (rate limits, breakers) and a tenant's
period budget, so every other process's run waited its reply timeout out and failed."""


def idle_sessions_end(url: str) -> str:
    """The libpq `-c` option of `IDLE_IN_TRANSACTION`, or "" when the URL sets its own."""
    given = str(conninfo_to_dict(url).get("options") or "")
    if re.search(r"idle[_-]in[_-]transaction[_-]session[_-]timeout", given):
        return ""
    return f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION}"


def network_defaults(url: str) -> dict[str, Any]:
    """The `NETWORK_DEFAULTS` the URL does not set (a URL's own value always wins)."""
    given = conninfo_to_dict(url)
    return {key: value for key, value in NETWORK_DEFAULTS.items() if key not in given}


def reply_timeout(url: str, connect_timeout: float) -> float | None:
    """Seconds a pooled statement waits for its reply (`REPLY_TIMEOUT`); None: no limit.

    With the server's `statement_timeout` in the URL's `options`
    (`?options=-c%20statement_timeout%3D5min`), the server cancels a slow statement first and
    keel waits one connect timeout more for that answer.
    """
    server = _statement_timeout(str(conninfo_to_dict(url).get("options") or ""))
    if server is None:
        return REPLY_TIMEOUT
    return None if server == 0 else server + connect_timeout


_SETTING = re.compile(r"(?:-c\s*|--)statement[_-]timeout=(\S+)")
_UNITS = {"us": 1e-6, "ms": 1e-3, "": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def _statement_timeout(options: str) -> float | None:
    """Seconds of `statement_timeout` set in libpq `options`.

    None when it is not set; 0 when it is 0 (no limit) or a value keel cannot read (then keel
    sets no limit either).
    """
    found = _SETTING.findall(options.replace("\\ ", " "))
    if not found:
        return None
    value = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]*)", found[-1])
    if value is None or value.group(2) not in _UNITS:
        return 0.0
    return float(value.group(1)) * _UNITS[value.group(2)]


# -- replies bounded -------------------------------------------------------------------------

_BOUNDED: ContextVar[bool] = ContextVar("keel_reply_bounded", default=True)


@contextmanager
def unbounded() -> Iterator[None]:
    """Statements run here wait for their replies as long as it takes (migrations, setup).

    Creating or migrating tables waits for another process's migration (an advisory lock) and
    may rewrite a table: the reply timeout would cut it off.
    """
    token = _BOUNDED.set(False)
    try:
        yield
    finally:
        _BOUNDED.reset(token)


def _no_reply(seconds: float) -> str:
    return (
        f"no reply from PostgreSQL within {seconds:g} s: keel closed the connection (a server "
        "or a proxy that hangs mid-query). Raise the limit with the server's statement_timeout "
        "in the URL (?options=-c%20statement_timeout%3D5min) if a statement needs longer"
    )


class BoundedConnection(psycopg.Connection[Any]):
    """A psycopg connection whose statements wait `reply_timeout` seconds at most for a reply.

    Past it the connection is closed (its state is unknown: the statement may still run) and
    `psycopg.OperationalError` raised, which keel takes for a lost connection.
    """

    reply_timeout: float | None = None

    @classmethod
    def connect(  # type: ignore[override]
        cls, conninfo: str = "", *, reply_timeout: float | None = None, **kwargs: Any
    ) -> Self:
        """Connect as psycopg does, and keep the seconds each statement waits for its reply."""
        conn = super().connect(conninfo, **kwargs)
        conn.reply_timeout = reply_timeout
        return conn

    def wait(self, gen: Any, interval: float = 0.1, timeout: float | None = None) -> Any:
        """Wait as psycopg does, for `reply_timeout` seconds at most (unless `unbounded`)."""
        bound = self.reply_timeout if timeout is None and _BOUNDED.get() else None
        try:
            return super().wait(gen, interval, timeout if bound is None else bound)
        except psycopg.errors._WaitTimeout as exc:
            if bound is None:
                raise
            self.pgconn.finish()
            raise psycopg.OperationalError(_no_reply(bound)) from exc


class AsyncBoundedConnection(psycopg.AsyncConnection[Any]):
    """`BoundedConnection` for the async pool."""

    reply_timeout: float | None = None

    @classmethod
    async def connect(  # type: ignore[override]
        cls, conninfo: str = "", *, reply_timeout: float | None = None, **kwargs: Any
    ) -> Self:
        """Connect as psycopg does, and keep the seconds each statement waits for its reply."""
        conn = await super().connect(conninfo, **kwargs)
        conn.reply_timeout = reply_timeout
        return conn

    async def wait(
        self,
        gen: Any,
        interval: float = 0.1,
        timeout: float | None = None,  # noqa: ASYNC109 (psycopg's signature)
    ) -> Any:
        """Wait as psycopg does, for `reply_timeout` seconds at most (unless `unbounded`)."""
        bound = self.reply_timeout if timeout is None and _BOUNDED.get() else None
        try:
            return await super().wait(gen, interval, timeout if bound is None else bound)
        except psycopg.errors._WaitTimeout as exc:
            if bound is None:
                raise
            self.pgconn.finish()
            raise psycopg.OperationalError(_no_reply(bound)) from exc


# -- a busy pool or a server gone ------------------------------------------------------------


class Reachability:
    """Whether a server was found unreachable lately; then waits for it fail at once.

    A run takes several database steps; with the server down, each waited for a connection of
    its own, and a run took tens of seconds to end. Once connecting failed, the waits of the
    next connect timeout raise that failure at once; the first one after it connects again.
    One check runs at a time: the waits that time out meanwhile wait on instead of each
    opening a connection of its own (a busy pool's load on the server stays one connection).

    Args:
        connect_timeout: Seconds one attempt to connect waits.
        reach: The check: one connection, outside the pool (`SetupError` when it fails).
        unreachable: The error to raise for the check's failure.
    """

    def __init__(
        self,
        connect_timeout: float,
        reach: Callable[[], Op],
        unreachable: Callable[[SetupError], StorageError],
    ) -> None:
        self.connect_timeout = connect_timeout
        self._reach = reach
        self._unreachable = unreachable
        self._checking = threading.Lock()
        self.error: StorageError | None = None
        self.at = 0.0
        """When connecting last failed (`error`) or, with `error` None, last worked."""

    def check(self) -> None:
        """Raise `StorageError` when connecting failed within the last connect timeout."""
        error, ago = self.error, time.monotonic() - self.at
        if error is not None and ago < self.connect_timeout:
            raise StorageError(
                f"{error.reason} (connecting failed {ago:.1f} s ago; keel tries again "
                f"{self.connect_timeout - ago:.1f} s from now)",
                fix=error.fix,
            ) from error

    def found(self, error: StorageError) -> StorageError:
        """Remember `error`, connecting's failure, and return it."""
        self.error, self.at = error, time.monotonic()
        return error

    def reaching(self) -> Steps[None]:
        """Connect once, outside the pool (unless that worked lately or runs now): raise if not.

        A server that refuses for want of free connections ("too many clients") answered: it is
        busy, not gone.
        """
        self.check()
        if self.error is None and time.monotonic() - self.at < self.connect_timeout:
            return
        if not self._checking.acquire(blocking=False):
            return  # another wait checks now: it remembers what it finds
        try:
            yield self._reach()
        except SetupError as exc:
            if not _full(exc):
                raise self.found(self._unreachable(exc)) from exc
        finally:
            self._checking.release()
        self.error, self.at = None, time.monotonic()

    def waiting(self, take: Callable[[float], Op], total: float) -> Steps[Any]:
        """`take(seconds)` (a pool's `getconn`) for up to `total` seconds, in connect timeouts.

        After each one the server is checked (`reaching`): one found unreachable ends the wait
        with `StorageError`.
        """
        waited = 0.0
        while True:
            self.check()
            wait = min(self.connect_timeout, total - waited)
            try:
                return (yield take(wait))
            except PoolTimeout:
                waited += wait
                if waited >= total:
                    raise PoolTimeout(f"couldn't get a connection after {total:.2f} sec") from None
            yield from self.reaching()


_FULL = ("too many connections", "too many clients", "remaining connection slots are reserved")
"""The server's messages for a connect it refuses for want of connections (SQLSTATE 53300).

By text: psycopg (3.3) gives a failed connect no SQLSTATE (`sqlstate`, `diag.sqlstate` and
`pgresult` are None; libpq keeps the server's error fields only on a query's result), so the
server's English message is all there is (`tests/test_attack_storage_down.py` pins this)."""


def _full(exc: BaseException) -> bool:
    """Whether connecting failed because the server has no free connection (it answered)."""
    return any(text in str(exc) for text in _FULL)


# -- pools -----------------------------------------------------------------------------------


def draining_pool(
    url: str, *, fresh_for: float = 0.0, reachability: Reachability | None = None, **kwargs: Any
) -> ConnectionPool[Any]:
    """A psycopg pool (unopened; `kwargs` as `ConnectionPool`'s) whose health check drains it.

    `fresh_for`: seconds after a check during which a connection is taken unchecked (a round
    trip saved per use), for callers that replay a transaction whose connection died (the
    ledger) and drain the pool themselves. `reachability`: how a wait for a connection tells a
    busy pool from a server gone (`Reachability`); its connections then bound their replies
    (`BoundedConnection`; give `reply_timeout` in `kwargs["kwargs"]`).
    """
    pool: ConnectionPool[Any] = _made(_Pool, _PoolCheck(fresh_for), url, reachability, kwargs)
    return pool


def adraining_pool(
    url: str, *, fresh_for: float = 0.0, reachability: Reachability | None = None, **kwargs: Any
) -> DrainingAsyncPool:
    """An async psycopg pool (unopened) whose health check drains it, as `draining_pool`."""
    pool: DrainingAsyncPool = _made(
        DrainingAsyncPool, _APoolCheck(fresh_for), url, reachability, kwargs
    )
    return pool


def _made(
    kind: Any, check: Any, url: str, reachability: Reachability | None, kwargs: dict[str, Any]
) -> Any:
    """A pool of `kind` (`_Pool`, `DrainingAsyncPool`) with `check`; bounded replies if watched."""
    if reachability is not None:
        kwargs["connection_class"] = kind.bounded
    pool = kind(url, check=check, **kwargs)
    pool.reachability = reachability
    check.pool = pool
    return pool


class _Pool(ConnectionPool[Any]):
    """A pool whose `getconn` waits in `Reachability` steps (when it has one)."""

    reachability: Reachability | None = None
    bounded = BoundedConnection

    def getconn(self, timeout: float | None = None) -> Any:
        total = self.timeout if timeout is None else timeout
        if self.reachability is None:
            return super().getconn(total)
        take = partial(ConnectionPool.getconn, self)
        return drive(self.reachability.waiting(partial(call, take), total))


class DrainingAsyncPool(AsyncConnectionPool[Any]):
    """The async `_Pool` (`adraining_pool`); it knows the event loop it was opened on."""

    reachability: Reachability | None = None
    bounded = AsyncBoundedConnection
    loop: asyncio.AbstractEventLoop | None = None
    """The event loop `open()` ran on: its scheduler and workers are tasks there
    (`keel.db.pool_closing` closes the pool from outside it)."""

    async def open(self, wait: bool = False, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Open as psycopg_pool does, on the running loop, which `loop` keeps."""
        self.loop = asyncio.get_running_loop()
        await super().open(wait, timeout)

    def close_abandoned(self) -> None:
        """Close a pool whose event loop has closed: its idle connections, here, without a loop.

        `asyncio.run` cancels the pool's workers and waits for them before it closes its loop;
        what it leaves open is the idle connections. `await close()` cannot run on another loop
        (it gathers those workers, on their closed loop: `RuntimeError`, after taking the idle
        connections out of the pool), so they are closed as `AsyncConnection.close()` would
        (libpq's `PQfinish`). A connection still handed out is its holder's to close.
        """
        self._closed = True
        idle = list(self._pool)
        self._pool.clear()
        for conn in idle:
            conn.pgconn.finish()

    async def getconn(self, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        """A connection, as psycopg_pool gives one, waited for in `Reachability` steps."""
        total = self.timeout if timeout is None else timeout
        if self.reachability is None:
            return await super().getconn(total)
        take = partial(AsyncConnectionPool.getconn, self)
        return await adrive(self.reachability.waiting(partial(call, take), total))


class _Freshness:
    """When each connection was last checked (an attribute on it), and whether that is recent."""

    def __init__(self, fresh_for: float) -> None:
        self.fresh_for = fresh_for

    def fresh(self, conn: Any) -> bool:
        """Whether `conn` may be taken unchecked.

        It was checked within `fresh_for` seconds, and its server has said nothing since.
        """
        checked = getattr(conn, "_keel_checked", None)
        if checked is None or time.monotonic() - checked >= self.fresh_for:
            return False
        return quiet(conn)

    def checked(self, conn: Any) -> None:
        if self.fresh_for > 0:
            conn._keel_checked = time.monotonic()


FRESH_FOR = 2.0
"""Seconds a pooled connection is taken without the pool's health check (a round trip) after
one passed, while its server has said nothing (`quiet`)."""


def quiet(conn: Any) -> bool:
    """Whether the server has said nothing on `conn` since its last reply (no round trip).

    A server that drops an idle connection (a restart, a failover, an administrator's
    `pg_terminate_backend`) says so or closes the socket: it becomes readable. Silence is what
    a live idle connection shows. (`poll`, not `select`: `select` refuses a descriptor above
    1023, which a process with many files and sockets open gives its new connections, and every
    connection looked loud.)
    """
    try:
        watch = select.poll()
        watch.register(conn.pgconn.socket, select.POLLIN)
        return not watch.poll(0)
    except (psycopg.Error, OSError, ValueError):
        return False  # closed already


class _PoolCheck(_Freshness):
    """The sync pool's `check`: `check_connection`, draining the pool when it fails."""

    pool: ConnectionPool[Any] | None = None

    def __call__(self, conn: psycopg.Connection[Any]) -> None:
        if self.fresh(conn):
            return
        try:
            ConnectionPool.check_connection(conn)
        except psycopg.Error:
            if self.pool is not None:
                self.pool.drain()
            raise
        self.checked(conn)


class _APoolCheck(_Freshness):
    """The async pool's `check`: `check_connection`, draining the pool when it fails."""

    pool: AsyncConnectionPool[Any] | None = None

    async def __call__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        if self.fresh(conn):
            return
        try:
            await AsyncConnectionPool.check_connection(conn)
        except psycopg.Error:
            if self.pool is not None:
                await self.pool.drain()
            raise
        self.checked(conn)
