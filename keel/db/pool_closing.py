"""Closing an async pool from sync code, wherever its event loop is.

An `AsyncConnectionPool` lives on the event loop that opened it: its scheduler and workers are
tasks there, and `await pool.close()` stops them (and waits for each) before it closes the idle
connections. Sync code that closes one (`Ledger.close()`) finds that loop in one of four states:

- **running in this thread** (the caller runs inside it): a sync wait for that loop would
  never end. `runs_here` says so; `close_later` closes the pool in a task on that loop, which
  ends once the caller's coroutine next awaits (`await ledger.aclose()` waits for it).
- **running in another thread**: the close runs there, and is waited for (`close_elsewhere`).
- **stopped, not closed** (`loop.run_until_complete` returned): the close is queued on it and
  the loop is run until it is done, in a thread of its own (this one may run another loop).
- **closed** (`asyncio.run` returned): `asyncio.run` cancelled the workers and waited for them,
  so only the idle connections are left open, and they are closed without a loop
  (`DrainingAsyncPool.close_abandoned`).

What cannot be helped: workers still pending on a loop closed without cancelling its tasks
never finish; once collected, each raises "Event loop is closed" (an unraisable exception)
whatever closes the pool. Their idle connections are closed all the same.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future
from contextlib import suppress

from keel.db.pools import DrainingAsyncPool

__all__ = ["CLOSE_WITHIN", "close_elsewhere", "close_later", "runs_here"]

CLOSE_WITHIN = 10.0
"""Seconds `close_elsewhere` waits for the close on the pool's loop (psycopg_pool gives its
workers 5 of them to stop)."""


def runs_here(pool: DrainingAsyncPool) -> bool:
    """Whether this thread is running the event loop `pool` was opened on."""
    try:
        return asyncio.get_running_loop() is pool.loop
    except RuntimeError:  # no loop runs here
        return False


_closing: set[asyncio.Task[None]] = set()
"""The closes `close_later` started (the loop keeps only weak references to its tasks)."""


def close_later(pool: DrainingAsyncPool) -> asyncio.Task[None]:
    """Close `pool` in a task on its loop, which this thread runs (`runs_here` is true)."""
    task = asyncio.get_running_loop().create_task(pool.close(), name="keel-pool-close")
    _closing.add(task)
    task.add_done_callback(_closing.discard)
    return task


def close_elsewhere(pool: DrainingAsyncPool, within: float = CLOSE_WITHIN) -> bool:
    """Close `pool` from a thread that is not running its loop (`runs_here` is false).

    Returns False if its loop, open, did not close it within `within` seconds (a loop blocked,
    or stopped for good by its thread meanwhile): the close then goes on whenever it runs.
    """
    loop = pool.loop
    if loop is None or pool.closed:  # never opened, or closed already
        return True
    closing = pool.close()
    try:
        done: Future[None] = asyncio.run_coroutine_threadsafe(closing, loop)
    except RuntimeError:  # its loop is closed
        closing.close()  # never started: nothing to warn about
        pool.close_abandoned()
        return True
    deadline = time.monotonic() + within
    if not loop.is_running():  # stopped: run it until the close is done
        closer = threading.Thread(target=_run_until, args=(loop, done), name="keel-pool-close")
        closer.daemon = True  # a loop that hangs does not hold the process at exit
        closer.start()
        closer.join(within)  # stopped again on return: its owner may run or close it at once
    try:
        done.result(max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        return False
    return True


def _run_until(loop: asyncio.AbstractEventLoop, done: Future[None]) -> None:
    """Run the stopped `loop` until `done` (whose waiter reads how the close went).

    A loop its thread started meanwhile runs the close itself (`run_until_complete` refuses).
    """
    with suppress(Exception):
        loop.run_until_complete(asyncio.wrap_future(done, loop=loop))
