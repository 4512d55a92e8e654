"""Closing a ledger while another thread's transaction runs on SQLite.

CPython's `sqlite3` lets a connection opened with `check_same_thread=False` be closed from any
thread, and closing it while another thread runs a statement on it frees that statement under
it: the process dies of a segmentation fault. A cancelled `ainvoke` leaves its transaction
running in a worker thread (`asyncio.to_thread` cannot stop one), so an app that closes its
ledger on shutdown, or a test teardown, hit exactly that (a CI run died this way). Each case
runs in a process of its own (forked with keel imported, `tests/forking.py`) so that a
regression reads as a failed test, not a dead test run.
"""

from __future__ import annotations

import textwrap
import threading
import time
from pathlib import Path
from typing import Any

from forking import ForkServer

from keel import Ledger

_PRELUDE = """
import asyncio, sqlite3, sys, threading, time
from keel import Ledger

SLOW = (
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 2000000) "
    "SELECT count(*) FROM c"
)

def slow_insert(mark, started=None):
    yield "CREATE TABLE IF NOT EXISTS scratch (mark TEXT)", ()
    if started is not None:
        started.set()  # the ledger runs SLOW next
    rows = yield SLOW, ()
    yield "INSERT INTO scratch (mark) VALUES (?)", (mark,)
    return rows[0][0]

def marks(path):
    with sqlite3.connect(path) as db:
        return sorted(m for (m,) in db.execute("SELECT mark FROM scratch"))

path = sys.argv[1]
ledger = Ledger(f"sqlite:///{path}")
ledger.setup()
"""


def _run(forks: ForkServer, tmp_path: Path, body: str) -> str:
    script = _PRELUDE + textwrap.dedent(body)
    done = forks.start_code(script, str(tmp_path / "ledger.db"), cwd=tmp_path)
    code = done.finish()
    out, err = done.output()
    assert code == 0, f"the process died (exit {code}; -11 is a segmentation fault):\n{out}\n{err}"
    return out


def test_close_from_another_thread_waits_for_the_running_transaction(
    tmp_path: Path, forks: ForkServer
) -> None:
    out = _run(
        forks,
        tmp_path,
        """
        result = {}
        started = threading.Event()
        def work():
            result["count"] = ledger.run(slow_insert("first", started))
        worker = threading.Thread(target=work)
        worker.start()
        assert started.wait(60), "the slow statement never started"
        time.sleep(0.1)  # inside the slow statement (~1 s)
        ledger.close()
        worker.join()
        assert result == {"count": 2000000}, result
        print(marks(path))
        """,
    )
    assert out.strip() == "['first']"


def test_aclose_after_a_cancelled_arun_keeps_the_process_alive(
    tmp_path: Path, forks: ForkServer
) -> None:
    out = _run(
        forks,
        tmp_path,
        """
        async def main():
            try:
                await asyncio.wait_for(ledger.arun(slow_insert("cancelled")), timeout=0.3)
            except TimeoutError:
                print("timed out")
            await ledger.aclose()  # the worker thread still runs the transaction
            await asyncio.sleep(0)
        asyncio.run(main())  # waits for the default executor's threads
        print(marks(path))
        """,
    )
    # the cancelled caller saw a timeout; its transaction, already running, still committed
    assert out.split() == ["timed", "out", "['cancelled']"]


def test_a_failed_thread_connection_reopens_and_repeated_closes_are_harmless(
    tmp_path: Path, forks: ForkServer
) -> None:
    out = _run(
        forks,
        tmp_path,
        """
        from keel.errors import StorageError
        def broken():
            yield "SELECT * FROM no_such_table", ()
        try:
            ledger.run(broken())
        except StorageError as exc:
            print("storage error:", "no such table" in str(exc))
        ledger.close_thread()  # its connection was closed after the failure already
        assert ledger.run(slow_insert("again")) == 2000000
        ledger.close()
        ledger.close()
        ledger.close_thread()
        print(marks(path))
        """,
    )
    assert out.split("\n")[:2] == ["storage error: True", "['again']"]


def test_runs_on_threads_while_the_ledger_drops_its_connections_again_and_again_never_fail(
    tmp_path: Path,
) -> None:
    # dropping the connections (`close()` before a closed ledger stayed closed; a database taken
    # away and put back) puts a fresh thread-local in place while a thread reads its own: read
    # twice, it raised a bare AttributeError ('_thread._local' object has no attribute 'file'),
    # 17-26 times in this loop before the fix
    ledger = Ledger(f"sqlite:///{tmp_path}/ledger.db")
    ledger.setup()

    def one() -> Any:
        rows = yield ("SELECT 1", ())
        return rows

    errors: list[BaseException] = []

    def work() -> None:
        for _ in range(1000):
            try:
                ledger.run(one())
            except Exception as exc:
                errors.append(exc)

    workers = [threading.Thread(target=work) for _ in range(3)]
    for worker in workers:
        worker.start()
    while any(worker.is_alive() for worker in workers):
        ledger._disconnect()
        time.sleep(0.0005)  # the workers reconnect in between: a tight loop only starves them
    for worker in workers:
        worker.join()
    ledger.close()
    assert errors == []
