"""One writer at a time per SQLite file, within a process: the checkpointer and the ledger queue.

SQLite lets one connection write at a time. A second one that tries waits in SQLite's busy
handler, which sleeps in steps of 1, 2, 5, ... ms, even when the writer it waits for is done
after 100 µs. keel's SQLite checkpointer (LangGraph's `SqliteSaver`, which saves checkpoints
on a background thread) and its ledger usually share one file, so on every tool step they
meet: measured on `bench/guards_overhead.py`, 91% of the ledger's time in `BEGIN IMMEDIATE`
was such sleeps (median 9 µs, p90 1.1 ms).

Both take the file's lock here first: `SqliteSaver` uses it as its own `lock` (it holds it
around each read and write), the ledger around each transaction. Waiters then wake as soon as
the writer releases it. The lock is a speed-up, never what makes a write correct: SQLite's
locking still guards the file (other processes, and a ledger that gave up waiting here), so a
ledger that cannot take the lock within `WAIT` seconds goes on without it.
"""

from __future__ import annotations

import os
import threading

__all__ = ["WAIT", "writer_lock"]

WAIT = 0.5
"""Seconds the ledger waits for the file's lock before it relies on SQLite's own locking."""

_LOCKS: dict[str, threading.RLock] = {}
_GUARD = threading.Lock()


def writer_lock(path: str | os.PathLike[str]) -> threading.RLock:
    """The process-wide lock of the SQLite file at `path` (the same for every spelling of it).

    Re-entrant: a thread that holds it (say, while it reads the checkpointer's history) may
    start a ledger transaction on the same file.
    """
    key = os.path.realpath(os.fspath(path))
    with _GUARD:
        lock = _LOCKS.get(key)
        if lock is None:
            lock = _LOCKS[key] = threading.RLock()
        return lock
