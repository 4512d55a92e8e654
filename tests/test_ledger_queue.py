"""PostgreSQL ledger transactions: a write whose rows nobody reads is queued.

A flow's `INSERT` / `UPDATE` / `DELETE` without `RETURNING` is not sent at once: it goes, in
one query, with the next statement whose rows the flow reads, and a flow's last writes are
sent and awaited on their own before `COMMIT` is. These tests try to see the difference: a
queued write that fails, a read of what was just queued, a crash of the connection while the
last writes travel, values a naive query builder would break, and the round trips a
transaction costs.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest

from keel import Ledger, StorageError
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


def test_a_transaction_waits_once_per_read_plus_its_last_writes_and_commit(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2 writes then a read, then 2 more writes: 2 round trips (`BEGIN` and the writes with the
    read; the last writes with `COMMIT`), where statement by statement it took 7."""
    sent: list[str] = []
    execute = psycopg.ClientCursor.execute

    def counted(self: psycopg.ClientCursor[Any], query: Any, *args: Any, **kwargs: Any) -> Any:
        sent.append(str(query))
        return execute(self, query, *args, **kwargs)

    def flow() -> Flow[int]:
        seen = yield from _writes_then_reads("b3")
        yield "UPDATE keel_breakers SET successes = 1 WHERE key = ?", ("b3",)
        yield "UPDATE keel_breakers SET state = 'closed' WHERE key = ?", ("b3",)
        return seen

    monkeypatch.setattr(psycopg.ClientCursor, "execute", counted)
    assert ledger.run(flow()) == 7
    assert [q.split(";")[0].split()[0] for q in sent] == ["BEGIN", "UPDATE"]
    assert sent[1].endswith("; COMMIT")
    assert ledger.read(_failures_of("b3")) == 7
    assert ledger.run(_row_of("b3")) == ("closed", 1)


@pytest.mark.parametrize(
    "value",
    ["it's; DROP TABLE keel_breakers; --", "50% off %s %(x)s", "?", "é \\ \n", "x" * 20_000],
)
def test_queued_values_travel_as_values(ledger: Ledger, value: str) -> None:
    """A queued statement's values are bound as literals: quotes, `%`, `?` and semicolons
    in them are data."""

    def flow() -> Flow[str]:
        yield "INSERT INTO keel_breakers (key) VALUES (?)", (value,)
        yield "UPDATE keel_breakers SET state = ? WHERE key = ?", ("half_open", value)
        rows = yield (
            "SELECT key FROM keel_breakers WHERE key = ? AND state = ?",
            (
                value,
                "half_open",
            ),
        )
        return str(rows[0][0])

    assert ledger.run(flow()) == value
    assert ledger.run(_count(value)) == 1


def _row_of(key: str) -> Flow[tuple[str, int]]:
    rows = yield "SELECT state, successes FROM keel_breakers WHERE key = ?", (key,)
    return str(rows[0][0]), int(rows[0][1])


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
                "AND NOT granted AND database = "
                "(SELECT oid FROM pg_database WHERE datname = current_database())"
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


def _terminate_others(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )


def _writes_only(key: str) -> Flow[None]:
    yield "INSERT INTO keel_breakers (key) VALUES (?)", (key,)
    yield "UPDATE keel_breakers SET failures = failures + 1 WHERE key = ?", (key,)


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_pooled_connection_killed_while_idle_is_replaced_not_in_doubt(
    fresh_postgres_url: str, ledger: Ledger, mode: str
) -> None:
    """A restart or failover kills the pool's idle connections. The next transaction is all
    writes, which would go with its `COMMIT` in one query: sent on a dead connection it would
    look in doubt. keel sees the server's goodbye first, sends `COMMIT` apart, and replays."""
    ledger.run(_writes_then_reads("warm"))
    await ledger.arun(_writes_then_reads("awarm"))
    _terminate_others(fresh_postgres_url)
    threading.Event().wait(0.2)  # the goodbye reaches the idle sockets
    if mode == "sync":
        ledger.run(_writes_only("b6"))
    else:
        await ledger.arun(_writes_only("b6"))
    assert ledger.read(_failures_of("b6")) == 1  # applied once
    await ledger.aclose()


class _CuttingProxy:
    """A TCP proxy to PostgreSQL that, once `armed`, cuts both sides at the server's next reply
    (the reply is lost): the server ran the query, the client never hears it."""

    def __init__(self, port: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target = port
        self.armed = threading.Event()
        self.cut = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, replies: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if replies and self.armed.is_set():
                    self.armed.clear()
                    self.cut.set()
                    break
                sink.sendall(data)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self.listener.close()


def test_a_commit_whose_reply_is_lost_is_in_doubt_never_replayed(fresh_postgres_url: str) -> None:
    """The attack on folding `COMMIT` into the last writes: the server commits, the reply is
    lost. Replaying would apply the writes twice; keel must say "in doubt" instead."""
    Ledger(fresh_postgres_url).setup()
    parts = urlsplit(fresh_postgres_url)
    proxy = _CuttingProxy(parts.port or 5432)
    ledger = Ledger(parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}").geturl())
    try:
        ledger.run(_writes_then_reads("b7"))  # 7 failures

        def flow() -> Flow[None]:
            yield "SELECT 1", ()
            proxy.armed.set()  # the next reply is the last writes' and the COMMIT's
            yield "UPDATE keel_breakers SET failures = failures + 1 WHERE key = ?", ("b7",)

        with pytest.raises(StorageError, match="died while committing") as caught:
            ledger.run(flow())
        assert caught.value.in_doubt and proxy.cut.is_set()
        # libpq's reason on one line, its period dropped as every keel message clips it
        # (the ledger's own clipper kept it: "...processing the request.): the transaction")
        said = str(caught.value)
        assert "server closed the connection unexpectedly This probably means" in said
        assert "the request): the transaction may or may not have been applied" in said
        assert ledger.read(_failures_of("b7")) == 8  # committed once, not replayed
    finally:
        ledger.close()
        proxy.close()
