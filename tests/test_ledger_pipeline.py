"""PostgreSQL ledger transactions in pipeline mode: a write whose rows nobody reads is queued.

A flow's `INSERT` / `UPDATE` / `DELETE` without `RETURNING` does not wait for the server: it
travels with the next statement whose rows the flow reads, and a flow's last writes are sent
and awaited on their own before `COMMIT` is. These tests try to see the difference: a queued
write that fails, a read of what was just queued, a crash of the connection while the last
writes travel, and the round trips a transaction costs.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from keel import Ledger
from keel.db.ledger import Flow

pytestmark = pytest.mark.postgres


def _writes_then_reads(key: str) -> Flow[int]:
    """Two queued writes, then a read that must see them (one transaction)."""
    yield "INSERT INTO keel_breakers (key) VALUES (?)", (key,)
    yield "UPDATE keel_breakers SET failures = failures + 7 WHERE key = ?", (key,)
    rows = yield "SELECT failures FROM keel_breakers WHERE key = ?", (key,)
    return int(rows[0][0])


def _failing_write(key: str) -> Flow[str]:
    """A good write, then a queued one that violates the key, then more statements."""
    yield "INSERT INTO keel_breakers (key) VALUES (?)", (key,)
    yield "INSERT INTO keel_breakers (key) VALUES (?)", (key,)  # the same key: fails
    yield "UPDATE keel_breakers SET failures = 1 WHERE key = ?", (key,)
    rows = yield "SELECT 'went on'", ()
    return str(rows[0][0])


def _count(key: str) -> Flow[int]:
    rows = yield "SELECT COUNT(*) FROM keel_breakers WHERE key = ?", (key,)
    return int(rows[0][0])


@pytest.fixture
def ledger(fresh_postgres_url: str) -> Iterator[Ledger]:
    ledger = Ledger(fresh_postgres_url)
    ledger.setup()
    yield ledger
    ledger.close()


def test_a_read_sees_the_writes_queued_before_it(ledger: Ledger) -> None:
    assert ledger.run(_writes_then_reads("b1")) == 7


async def test_a_read_sees_the_writes_queued_before_it_async(ledger: Ledger) -> None:
    assert await ledger.arun(_writes_then_reads("b1")) == 7
    await ledger.aclose()


def test_a_queued_write_that_fails_rolls_the_whole_transaction_back(ledger: Ledger) -> None:
    with pytest.raises(psycopg.errors.UniqueViolation):
        ledger.run(_failing_write("b2"))
    assert ledger.run(_count("b2")) == 0  # the first, good write is gone too


async def test_a_queued_write_that_fails_rolls_back_async(ledger: Ledger) -> None:
    with pytest.raises(psycopg.errors.UniqueViolation):
        await ledger.arun(_failing_write("b2"))
    assert await ledger.arun(_count("b2")) == 0
    await ledger.aclose()


def test_a_transaction_waits_once_per_read_plus_its_last_writes(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2 writes then a read, then 2 more writes: 2 waits for results (the read; the last writes,
    before `COMMIT`), where statement by statement it took 5."""
    waits: list[int] = []
    sync = psycopg.Pipeline.sync

    def counted(self: psycopg.Pipeline) -> None:
        waits.append(1)
        sync(self)

    def flow() -> Flow[int]:
        seen = yield from _writes_then_reads("b3")
        yield "UPDATE keel_breakers SET successes = 1 WHERE key = ?", ("b3",)
        yield "UPDATE keel_breakers SET state = 'closed' WHERE key = ?", ("b3",)
        return seen

    monkeypatch.setattr(psycopg.Pipeline, "sync", counted)
    assert ledger.run(flow()) == 7
    assert len(waits) == 2


def test_a_connection_lost_while_the_last_writes_travel_is_replayed(
    fresh_postgres_url: str, ledger: Ledger
) -> None:
    """The last writes wait on a lock; their backend is killed: not in doubt, replayed once."""
    admin = psycopg.connect(fresh_postgres_url, autocommit=True)
    ledger.run(_writes_then_reads("b4"))
    admin.execute("BEGIN")
    admin.execute("LOCK TABLE keel_breakers IN ACCESS EXCLUSIVE MODE")
    attempts: list[int] = []

    def flow() -> Flow[None]:
        attempts.append(1)
        yield "SELECT 1", ()  # the transaction's first round trip; the UPDATE waits alone
        yield "UPDATE keel_breakers SET failures = failures + 1 WHERE key = ?", ("b4",)

    done: list[Any] = []
    runner = threading.Thread(target=lambda: done.append(ledger.run(flow())))
    runner.start()
    with psycopg.connect(fresh_postgres_url, autocommit=True) as killer:
        for _ in range(500):  # the UPDATE waits on the lock
            waiting = killer.execute(
                "SELECT pid FROM pg_locks WHERE relation = 'keel_breakers'::regclass "
                "AND NOT granted"
            ).fetchall()
            if waiting:
                break
            threading.Event().wait(0.01)
        assert waiting, "the queued UPDATE never reached the server"
        killer.execute("SELECT pg_terminate_backend(%s)", (waiting[0][0],))
    admin.execute("ROLLBACK")
    runner.join(timeout=30)
    admin.close()
    assert done == [None]  # replayed on a fresh connection, not a StorageError "in doubt"
    assert attempts == [1]  # one flow, its steps replayed (a generator is not restarted)
    assert ledger.read(_failures_of("b4")) == 8  # 7, then the increment: once, not twice


def _failures_of(key: str) -> Flow[int]:
    rows = yield "SELECT failures FROM keel_breakers WHERE key = ?", (key,)
    return int(rows[0][0])
