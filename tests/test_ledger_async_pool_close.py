"""`Ledger.close()` closes the async pool too, wherever its event loop is.

The async pool (PostgreSQL under `ainvoke`) lives on the loop that opened it. The sync `close()`
used to leave it open: after `asyncio.run(agent.ainvoke(...))`, a `ledger.close()` in shutdown
code or a test fixture left its connections on the server. Closing it without its loop (a first
fix, reverted) marked it closed but left its workers pending on a loop that later closed:
collected, each raised "Event loop is closed" as an unraisable exception in whatever test ran
next. Each case here checks the connections on the server (`pg_stat_activity` of a fresh
database), the pool's tasks, and what garbage collection then raises.

Real parts: PostgreSQL (`KEEL_TEST_POSTGRES_URL`; skipped without it), real event loops.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from test_attack_closed_ledger import _left_open, _open

from keel import Ledger, StorageError, UserError

pytestmark = pytest.mark.postgres


def _ping() -> Iterator[tuple[str, tuple[Any, ...]]]:
    rows = yield "SELECT 1", ()
    return rows


@contextmanager
def _unraisable() -> Iterator[list[str]]:
    """What garbage collection raises meanwhile, and then (a pool task left pending)."""
    gc.collect()  # earlier tests' garbage is not this test's
    seen: list[str] = []
    before = sys.unraisablehook
    sys.unraisablehook = lambda u: seen.append(f"{u.object!r}: {u.exc_value!r}")
    try:
        yield seen
        gc.collect()
    finally:
        sys.unraisablehook = before


def _pool_tasks(loop: asyncio.AbstractEventLoop) -> list[str]:
    """The ledger pool's tasks still pending on `loop` (its scheduler, its workers)."""
    return [t.get_name() for t in asyncio.all_tasks(loop) if "keel-ledger" in t.get_name()]


def _refuses(ledger: Ledger) -> None:
    with pytest.raises(StorageError, match="was closed"):
        ledger.run(_ping())
    with pytest.raises(StorageError, match="was closed"):
        asyncio.run(ledger.arun(_ping()))


def test_close_after_asyncio_run_closes_the_async_pools_connections(
    fresh_postgres_url: str,
) -> None:
    url = fresh_postgres_url
    with _unraisable() as raised:
        ledger = Ledger(url)
        asyncio.run(ledger.arun(_ping()))  # the async pool, on a loop that has ended since
        assert _open(url) > 0
        ledger.close()
        assert _left_open(url) == 0
        _refuses(ledger)
        del ledger
    assert raised == []


def test_close_while_the_pools_loop_runs_in_another_thread(fresh_postgres_url: str) -> None:
    url = fresh_postgres_url
    with _unraisable() as raised:
        loop = asyncio.new_event_loop()
        runner = threading.Thread(target=loop.run_forever)
        runner.start()
        try:
            ledger = Ledger(url)
            asyncio.run_coroutine_threadsafe(ledger.arun(_ping()), loop).result(30)
            assert _open(url) > 0 and _pool_tasks(loop)
            ledger.close()  # waits for the close on that loop
            assert _pool_tasks(loop) == []
            assert _left_open(url) == 0
            _refuses(ledger)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            runner.join(30)
            loop.close()
        del ledger
    assert raised == []


def test_close_while_the_pools_loop_is_stopped(fresh_postgres_url: str) -> None:
    # a loop of the caller's (`new_event_loop` + `run_until_complete`), closed after the ledger:
    # the first fix left the pool's workers pending on it
    url = fresh_postgres_url
    loop = asyncio.new_event_loop()
    with _unraisable() as raised:
        ledger = Ledger(url)
        loop.run_until_complete(ledger.arun(_ping()))
        assert _open(url) > 0 and _pool_tasks(loop)
        ledger.close()  # runs the stopped loop until the pool is closed
        assert not loop.is_running()  # stopped again: its owner may close it at once
        assert _pool_tasks(loop) == []
        assert _left_open(url) == 0
        loop.run_until_complete(ledger.aclose())  # closing again is harmless
        loop.close()
        _refuses(ledger)
        del ledger
    assert raised == []


async def test_close_inside_the_pools_loop_closes_it_in_a_task_there(
    fresh_postgres_url: str,
) -> None:
    url = fresh_postgres_url
    ledger = Ledger(url)
    await ledger.arun(_ping())
    ledger.close()  # cannot wait for this loop: the pool closes in a task on it
    assert ledger.closed
    with pytest.raises(StorageError, match="was closed"):
        await ledger.arun(_ping())
    for _ in range(600):  # the loop goes on, and the task closes the pool (30 s at most)
        if _open(url) == 0:
            break
        await asyncio.sleep(0.05)
    assert _left_open(url) == 0
    await ledger.aclose()  # waits for that close (done here), closes nothing twice
    assert _pool_tasks(asyncio.get_running_loop()) == []


async def test_aclose_after_close_inside_the_pools_loop_waits_for_the_close(
    fresh_postgres_url: str,
) -> None:
    url = fresh_postgres_url
    ledger = Ledger(url)
    await ledger.arun(_ping())
    ledger.close()
    await ledger.aclose()
    assert _pool_tasks(asyncio.get_running_loop()) == [] and _left_open(url) == 0


def test_aclose_on_a_new_loop_after_the_pools_loop_ended(fresh_postgres_url: str) -> None:
    # `await pool.close()` there raised RuntimeError (it gathers the done workers on their
    # closed loop) after taking the idle connections out of the pool, which stayed open
    url = fresh_postgres_url
    with _unraisable() as raised:
        ledger = Ledger(url)
        asyncio.run(ledger.arun(_ping()))
        asyncio.run(ledger.aclose())
        assert _left_open(url) == 0
        _refuses(ledger)
        del ledger
    assert raised == []


def test_close_with_the_pools_loop_blocked_says_so_and_the_close_goes_on(
    fresh_postgres_url: str,
) -> None:
    url = fresh_postgres_url
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever)
    runner.start()
    gate = threading.Event()
    try:
        ledger = Ledger(url)
        asyncio.run_coroutine_threadsafe(ledger.arun(_ping()), loop).result(30)
        loop.call_soon_threadsafe(gate.wait, 60)  # its thread busy in sync code
        with pytest.raises(StorageError, match=r"did not close the pool within 0.5 s"):
            ledger.close(timeout=0.5)  # (the default, 10 s, is pinned below)
        assert ledger.closed
        _refuses(ledger)
        gate.set()  # the loop gets to the close it was given
        assert _left_open(url, within=30) == 0
    finally:
        gate.set()
        loop.call_soon_threadsafe(loop.stop)
        runner.join(30)
        loop.close()


def _meet(name: str, together: int) -> Iterator[tuple[str, tuple[Any, ...]]]:
    """A transaction that waits (10 s at most) until `together` connections of the pool have
    run it: each holds its connection meanwhile, and names it `name` for good (the others may
    see it after it returned). True if they met."""
    yield "SELECT set_config('application_name', ?, false)", (name,)
    for _ in range(1000):
        yield "SELECT pg_stat_clear_snapshot()", ()  # a transaction's reads share one snapshot
        rows = yield "SELECT count(*) FROM pg_stat_activity WHERE application_name = ?", (name,)
        if int(rows[0][0]) >= together:
            return True
        yield "SELECT pg_sleep(0.01)", ()
    return False


def _backend() -> Iterator[tuple[str, tuple[Any, ...]]]:
    rows = yield "SELECT pg_backend_pid()", ()
    return int(rows[0][0])


async def _three_at_once(ledger: Ledger) -> list[bool]:
    return list(await asyncio.gather(*(ledger.arun(_meet("keel-meet", 3)) for _ in "abc")))


def test_a_second_asyncio_run_gets_a_pool_that_grows(fresh_postgres_url: str) -> None:
    # an app that shares one ledger across `asyncio.run` calls (a script, a sync web handler):
    # the first loop's pool, its workers gone with that loop, never opened a second connection,
    # so the second loop's concurrent runs took turns on one (and its idle connection stayed
    # open until the process ended)
    url = fresh_postgres_url
    with _unraisable() as raised:
        ledger = Ledger(url)
        first = asyncio.run(ledger.arun(_backend()))

        assert asyncio.run(_three_at_once(ledger)) == [True, True, True]
        with psycopg.connect(url, autocommit=True) as admin:  # the ended loop's pool: closed
            pids = {r[0] for r in admin.execute("SELECT pid FROM pg_stat_activity").fetchall()}
        assert first not in pids
        ledger.close()
        assert _left_open(url) == 0
        del ledger
    assert raised == []


def test_close_waits_10_s_by_default_and_refuses_a_timeout_that_is_no_wait(
    tmp_path: Path,
) -> None:
    # README: "waited for, 10 s at most"
    assert inspect.signature(Ledger.close).parameters["timeout"].default == 10.0
    ledger = Ledger(f"sqlite:///{tmp_path / 'keel.db'}")
    for bad in (0, -1.0, float("nan"), "5", True):
        with pytest.raises(UserError, match=r"Ledger.close\(timeout=...\) .* a number > 0; got"):
            ledger.close(timeout=bad)  # type: ignore[arg-type]
    assert not ledger.closed  # refused before closing anything
    ledger.close()
