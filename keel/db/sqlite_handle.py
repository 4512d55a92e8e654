"""A thread's SQLite connection that another thread may close while it is in use.

CPython's `sqlite3` does not guard a connection opened with `check_same_thread=False`: closing
it while another thread runs a statement on it frees that statement under the running thread, and
the process dies of a segmentation fault, not an exception. That happens when `Ledger.close()`
runs while a cancelled `ainvoke`'s transaction still runs in its worker thread
(`asyncio.to_thread` cannot stop a thread). A `SqliteHandle` is held for each transaction;
`retire()` closes an idle connection at once and leaves a busy one for its user to close the
moment its transaction ends.

A handle also names the thread that opened it (`owner`): the ledger closes the connection of a
thread that has ended (a web server's request thread, the worker threads of an `asyncio.run`
that returned), instead of keeping it, and its file descriptors, for as long as the ledger.
"""

from __future__ import annotations

import sqlite3
import threading


class SqliteHandle:
    """One thread's connection: `acquire` it for a transaction, `release` it after."""

    __slots__ = ("_busy", "_guard", "_retired", "db", "owner")

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.owner = threading.current_thread()
        """The thread that opened the connection, and the only one that runs statements on it."""
        self._guard = threading.Lock()
        self._busy = False
        self._retired = False

    def acquire(self) -> bool:
        """Mark the connection in use; False if it was retired (open another)."""
        with self._guard:
            if self._retired:
                return False
            self._busy = True
            return True

    def release(self) -> None:
        """The transaction is over: close the connection now if it was retired meanwhile."""
        with self._guard:
            self._busy = False
            closing = self._retired
        if closing:
            self.db.close()

    def retire(self) -> None:
        """Close the connection now if idle, else when its user releases it."""
        with self._guard:
            self._retired = True
            if self._busy:
                return
        self.db.close()
