"""A PostgreSQL ledger that does not answer: a run ends `error` (category `storage`), with the
reason, within about one connect timeout, not one wait per ledger step.

README: "A run whose ledger's PostgreSQL server is down ... ends within about one connect
timeout". A run takes several ledger steps (its thread's lease, admission, budgets, breakers,
rate limits, audit, its run record); each waited for a connection of its own (10 s to open the
pool, the connection's own timeout), so a run against a hung server took 45 s to end. Real
parts: a TCP listener that accepts and never answers (a hung server), a port where nothing
listens, and a TCP proxy to the real test server that starts hanging mid-life. The bounds
are correctness bounds on a hang (a few connect timeouts), not speed goals. The checkpointers'
pools wait the same way, a busy pool still waited for; a proxy that stalls mid-query (sockets
open, nothing forwarded) ends a statement after its reply timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
from conftest import eventually, free_port, until
from test_storage_faults import POLICY as KILLS  # budgets, rate limits, breakers

from keel import Ledger, Persistence, RunContext, StorageError, build_agent, tool
from keel._drive import adrive, both, drive
from keel.db.ledger import Flow
from keel.db.pools import (
    AsyncBoundedConnection,
    BoundedConnection,
    Reachability,
    network_defaults,
    unbounded,
)
from keel.db.runs import error_category
from keel.evals import ScriptedChatModel, call
from keel.guards import AdmissionPolicy

CTX = RunContext(user_id="u1", tenant_id="acme")
TIMEOUT = 2  # the URL's connect_timeout (psycopg's least)
BOUND = 3 * TIMEOUT
POLICY = replace(KILLS, name="down", admission=AdmissionPolicy(tenant_running=5))
ENTRIES = ["invoke", "ainvoke", "stream", "astream"]


class Listener:
    """A TCP port on 127.0.0.1. Without `target`, it accepts connections and never answers (a
    hung server); with one, each connection is piped to that port (a proxy to the real server)
    until `hang()` cuts them all and makes it a hung server from then on, or `stall()` stops
    forwarding on them, the sockets left open (a server or proxy that hangs mid-query: TCP
    still acknowledges what is sent). `accepted` counts the connections it took."""

    def __init__(self, target: int | None = None) -> None:
        self.target = target
        self.hanging = target is None
        self.accepted = 0
        self._flowing = threading.Event()
        self._flowing.set()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def stall(self) -> None:
        with self._lock:
            self.hanging = True
            self._flowing.clear()

    def url(self, base: str) -> str:
        """`base` (a PostgreSQL URL) on this port (`_on_port`)."""
        return _on_port(base, self.port)

    def hang(self) -> None:
        with self._lock:
            self.hanging = True
            cut, self._open = self._open, []
        for each in cut:  # the server's side of each connection goes away
            with contextlib.suppress(OSError):
                each.shutdown(socket.SHUT_RDWR)
            each.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)  # its `accept()` returns
        self._server.close()
        self.hang()
        self._flowing.set()  # stalled pipes end, on sockets cut

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                self._open.append(client)
                if self.hanging:
                    continue  # held open, never answered
                upstream = socket.create_connection(("127.0.0.1", self.target or 0))
                self._open.append(upstream)
            for a, b in ((client, upstream), (upstream, client)):
                args = (a, b, self._flowing)
                threading.Thread(target=_pipe, args=args, daemon=True).start()


def _pipe(source: socket.socket, sink: socket.socket, flowing: threading.Event) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            flowing.wait()
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


def _on_port(base: str, port: int) -> str:
    """`base` (a PostgreSQL URL) on 127.0.0.1:`port`, with a connect timeout of `TIMEOUT` s."""
    parts = urlsplit(base)
    netloc = f"{parts.netloc.rpartition('@')[0]}@127.0.0.1:{port}"
    return parts._replace(netloc=netloc, query=f"connect_timeout={TIMEOUT}").geturl()


@contextlib.contextmanager
def _listening(target: int | None = None) -> Iterator[Listener]:
    listener = Listener(target)
    try:
        yield listener
    finally:
        listener.close()


@tool
def lookup(order_id: str) -> str:
    """Look an order up."""
    return f"order {order_id}: shipped"


def _agent(ledger: Ledger, saver: Any) -> Any:
    model = ScriptedChatModel(script=[call("lookup", order_id="A1"), "It shipped."], fresh_ids=True)
    return build_agent(model, [lookup], policy=POLICY, ledger=ledger, checkpointer=saver)


async def _arun(agent: Any, entry: str, payload: Any, config: Any) -> Any:
    if entry == "ainvoke":
        return (await agent.ainvoke(payload, config, context=CTX))["outcome"]
    chunks = [c async for c in agent.astream(payload, config, context=CTX, stream_mode="values")]
    return chunks[-1]["outcome"]


@contextlib.contextmanager
def _ledger(url: str, **kwargs: Any) -> Iterator[tuple[Ledger, asyncio.AbstractEventLoop]]:
    """A ledger at `url`, and the one event loop its async runs use; closed on exit."""
    loop = asyncio.new_event_loop()
    ledger = Ledger(url, **kwargs)
    try:
        yield ledger, loop
    finally:
        loop.run_until_complete(ledger.aclose())
        loop.close()


def _timed_run(
    entry: str, ledger: Ledger, loop: asyncio.AbstractEventLoop, folder: Path, thread: str
) -> tuple[Any, float]:
    """The outcome of one run of the agent under `entry`, and the seconds it took."""
    payload = {"messages": [("user", "where is order A1?")]}
    config = {"configurable": {"thread_id": thread}}
    persistence = Persistence(f"sqlite:///{folder}/checkpoints-{entry}.db")
    started = time.monotonic()
    if entry.startswith("a"):

        async def run() -> Any:
            async with persistence.acheckpointer() as saver:
                return await _arun(_agent(ledger, saver), entry, payload, config)

        ended = loop.run_until_complete(run())
    else:
        with persistence.checkpointer() as saver:
            agent = _agent(ledger, saver)
            if entry == "invoke":
                ended = agent.invoke(payload, config, context=CTX)["outcome"]
            else:
                chunks = list(agent.stream(payload, config, context=CTX, stream_mode="values"))
                ended = chunks[-1]["outcome"]
    return ended, time.monotonic() - started


def _assert_storage(ended: Any, reason: str) -> None:
    assert ended["status"] == "error", ended
    assert error_category(ended) == "storage", ended
    assert reason in ended["detail"], ended
    _said_once(ended["detail"])


FIXES = re.compile(r"resume the (?:run|thread)|send its input again|nothing (?:\w+ )*written", re.I)


def _said_once(detail: str) -> None:
    """The detail says what failed, then what to do once: "storage failed before the run
    started: StorageError: keel's ledger: <reason>. Nothing was written; resume the run once
    PostgreSQL answers. Nothing of this run was written (...); send its input again once the
    database is back" said both twice, the two fixes disagreeing (resume, send again)."""
    readme = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())
    assert "The `detail` says what failed and that fix once" in readme
    said = [m.lower() for m in FIXES.findall(detail)]
    assert len(said) == len(set(said)), detail
    assert len([m for m in said if not m.startswith("nothing")]) == 1, detail  # what to do


@pytest.mark.postgres
@pytest.mark.parametrize("entry", ENTRIES)
def test_a_run_on_a_hung_ledger_server_ends_within_a_few_connect_timeouts(
    tmp_path: Path, postgres_url: str, entry: str
) -> None:
    """The server accepts connections and never answers: every ledger step of the run (lease,
    admission, budgets, audit, run record) waited again; now the first one's failed connect
    ends them all (it took 45 s with keel's defaults, 30 s with a 2 s connect timeout)."""
    with _listening() as hung, _ledger(hung.url(postgres_url)) as (ledger, loop):
        ended, took = _timed_run(entry, ledger, loop, tmp_path, "t1")
    assert took < BOUND, f"{entry} took {took:.1f} s against a hung server"
    _assert_storage(ended, "connection timeout expired")


@pytest.mark.parametrize("entry", ["invoke", "ainvoke"])
def test_a_run_on_a_port_where_nothing_listens_ends_at_once_with_the_reason(
    tmp_path: Path, entry: str
) -> None:
    """Connection refused: the pool retried for 10 s per step before (30 s a run), and said
    "pool initialization incomplete", not why."""
    url = _on_port("postgresql://postgres@127.0.0.1/keel", free_port())
    with _ledger(url) as (ledger, loop):
        ended, took = _timed_run(entry, ledger, loop, tmp_path, "t1")
    assert took < BOUND, f"{entry} took {took:.1f} s against a closed port"
    _assert_storage(ended, "Connection refused")


@pytest.mark.postgres
@pytest.mark.parametrize("entry", ["invoke", "ainvoke"])
def test_a_ledger_server_that_hangs_mid_life_ends_the_next_run_within_a_few_connect_timeouts(
    tmp_path: Path, fresh_postgres_url: str, entry: str
) -> None:
    """The ledger worked (its pool open), then its server hangs: its connections are cut and
    new ones get no answer. The next run waited 10 s for a pool connection per step; now one
    connect timeout, one connection of keel's own that fails, and the rest fail at once. Once
    the server answers again, a run completes on the same ledger."""
    port = urlsplit(fresh_postgres_url).port or 5432
    with _listening(target=port) as proxy, _ledger(proxy.url(fresh_postgres_url)) as opened:
        ledger, loop = opened
        first, _ = _timed_run(entry, ledger, loop, tmp_path, "t1")
        assert first["terminated_reason"] == "completed", first
        proxy.hang()
        ended, took = _timed_run(entry, ledger, loop, tmp_path, "t2")
    assert took < BOUND, f"{entry} took {took:.1f} s after the server hung"
    _assert_storage(ended, "connection timeout expired")


def _hold(seconds: float) -> Flow[None]:
    yield f"SELECT pg_sleep({seconds})", ()


def _until_held(admin_url: str, seconds: float) -> None:
    """Until a backend of `admin_url`'s database runs `_hold(seconds)`: the pool's one
    connection is taken (a fixed wait could end before it, and the test would prove nothing)."""
    query = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND state = 'active' AND pid <> pg_backend_pid() AND position(%s in query) > 0"
    )
    deadline = time.monotonic() + 30
    with psycopg.connect(admin_url, autocommit=True) as admin:
        while admin.execute(query, (f"SELECT pg_sleep({seconds})",)).fetchone() == (0,):
            assert time.monotonic() < deadline, "the holder did not take the connection in 30 s"
            time.sleep(0.02)


def _one() -> Flow[int]:
    rows = yield "SELECT 1", ()
    return int(rows[0][0])


@pytest.mark.postgres
def test_a_busy_pool_is_waited_for_past_the_connect_timeout(fresh_postgres_url: str) -> None:
    """A pool whose connections are all in use is not a down server: a transaction waits for
    one (up to 10 s) instead of failing after one connect timeout."""
    parts = urlsplit(fresh_postgres_url)
    ledger = Ledger(parts._replace(query=f"connect_timeout={TIMEOUT}").geturl(), pool_max_size=1)
    try:
        ledger.setup()
        holder = threading.Thread(target=ledger.run, args=(_hold(TIMEOUT + 1.5),))
        holder.start()
        _until_held(fresh_postgres_url, TIMEOUT + 1.5)  # the one connection is taken
        assert ledger.run(_one()) == 1
        holder.join()
    finally:
        ledger.close()


def test_storage_error_is_what_a_caller_of_the_ledger_sees(tmp_path: Path) -> None:
    """Outside a run, `Ledger.run` raises `StorageError` with the reason, at once, and so does
    the step after it (remembered for a connect timeout), without connecting again."""
    ledger = Ledger(_on_port("postgresql://postgres@127.0.0.1/keel", free_port()))
    try:
        with pytest.raises(StorageError, match="Connection refused"):
            ledger.run(_one())
        with pytest.raises(StorageError, match=r"connecting failed \d+\.\d s ago"):
            ledger.run(_one())
    finally:
        ledger.close()


PAYLOAD = {"messages": [("user", "where is order A1?")]}


def _saver_agent(saver: Any) -> Any:
    model = ScriptedChatModel(script=[call("lookup", order_id="A1"), "Shipped."] * 2)
    return build_agent(model, [lookup], checkpointer=saver)


def _on_checkpointer(
    url: str, flavour: str, stop: str, query: str = "", **options: Any
) -> tuple[Any, float]:
    """A run (thread t1) on a PostgreSQL checkpointer through a proxy to `url`'s server, then
    the proxy's `stop` (`hang`, `stall`) and a second run (t2): its outcome and seconds. Once
    the server answers again (directly), t1's checkpoints are all there."""
    port = urlsplit(url).port or 5432
    with _listening(target=port) as proxy:
        persistence = Persistence(proxy.url(url) + query, **options)
        ended, took = (_arun_twice if flavour == "async" else _run_twice)(persistence, proxy, stop)
    with Persistence(url).checkpointer() as saver:
        saved = saver.get_tuple({"configurable": {"thread_id": "t1"}})
    assert saved is not None
    assert saved.checkpoint["channel_values"]["outcome"]["terminated_reason"] == "completed"
    return ended, took


def _run_twice(persistence: Persistence, proxy: Listener, stop: str) -> tuple[Any, float]:
    with persistence.checkpointer() as saver:
        agent = _saver_agent(saver)
        first = agent.invoke(PAYLOAD, {"configurable": {"thread_id": "t1"}}, context=CTX)
        assert first["outcome"]["terminated_reason"] == "completed", first["outcome"]
        getattr(proxy, stop)()
        started = time.monotonic()
        ended = agent.invoke(PAYLOAD, {"configurable": {"thread_id": "t2"}}, context=CTX)
        return ended["outcome"], time.monotonic() - started


def _arun_twice(persistence: Persistence, proxy: Listener, stop: str) -> tuple[Any, float]:
    async def run() -> tuple[Any, float]:
        async with persistence.acheckpointer() as saver:
            agent = _saver_agent(saver)
            first = await agent.ainvoke(PAYLOAD, {"configurable": {"thread_id": "t1"}}, context=CTX)
            assert first["outcome"]["terminated_reason"] == "completed", first["outcome"]
            getattr(proxy, stop)()
            started = time.monotonic()
            ended = await agent.ainvoke(PAYLOAD, {"configurable": {"thread_id": "t2"}}, context=CTX)
            return ended["outcome"], time.monotonic() - started

    return asyncio.run(run())


def _assert_checkpointer_down(ended: Any, reason: str) -> None:
    assert (ended["status"], ended["terminated_reason"]) == ("error", "storage"), ended
    assert error_category(ended) == "storage", ended
    assert reason in ended["detail"], ended
    _said_once(ended["detail"])


@pytest.mark.postgres
@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_checkpointer_whose_server_hangs_mid_life_ends_the_run_within_a_few_connect_timeouts(
    fresh_postgres_url: str, flavour: str
) -> None:
    """The checkpointer's pool worked, then its server hangs (connections cut, new ones never
    answered): the run waited the pool's whole timeout (30 s by default; the sync saver twice
    that before). Now its pool's wait past one connect timeout connects once on its own, and
    that failure ends the run: `error/storage`, the driver's reason, what to do."""
    ended, took = _on_checkpointer(fresh_postgres_url, flavour, "hang")
    assert took < BOUND, f"the {flavour} run took {took:.1f} s after the server hung"
    _assert_checkpointer_down(ended, "connection timeout expired")


@pytest.mark.postgres
@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_checkpointer_whose_server_stalls_mid_query_ends_the_run_after_its_reply_timeout(
    fresh_postgres_url: str, flavour: str
) -> None:
    """The proxy stops forwarding with its sockets open (a server process or a proxy that hangs
    mid-query): TCP acknowledges what is sent, so keepalives and `tcp_user_timeout` see nothing,
    and the run hung forever. Each statement now waits the reply timeout (the URL's
    `statement_timeout` plus one connect timeout: 3 s here), then its connection is closed;
    the retry on a fresh connection finds the server unreachable."""
    query = "&options=-c%20statement_timeout%3D1s"
    ended, took = _on_checkpointer(fresh_postgres_url, flavour, "stall", query)
    assert took < 1 + TIMEOUT + BOUND, f"the {flavour} run took {took:.1f} s after the stall"
    _assert_checkpointer_down(ended, "connection timeout expired")


HOLD = TIMEOUT + 1.5  # seconds the pool's one connection stays taken: past one connect timeout
LOCK = 7321  # the advisory lock the holder's statement waits on (each test has its own database)


@contextlib.contextmanager
def _holding_the_pool(admin_url: str) -> Iterator[tuple[Callable[[], bool], threading.Timer]]:
    """An advisory lock taken on `admin_url` (a connection outside the pool and the proxy): a
    statement of the pool's that waits on it holds the pool's connection until the lock goes.
    Yields whether such a statement waits now, and a timer that lets it go `HOLD` s after its
    start (so the readers started just before wait that long, however loaded the machine)."""
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute("SELECT pg_advisory_lock(%s)", (LOCK,))
        lock = threading.Lock()  # the connection is read by the test, and let go by the timer

        def waiting() -> bool:
            with lock:
                row = admin.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'advisory'"
                    " AND datname = current_database()"
                ).fetchone()
            return row is not None and row[0] == 1

        def let_go() -> None:
            with lock:
                admin.execute("SELECT pg_advisory_unlock(%s)", (LOCK,))

        timer = threading.Timer(HOLD, let_go)
        try:
            yield waiting, timer
        finally:
            timer.cancel()
            if timer.ident is not None:
                timer.join()
            with lock:
                admin.execute("SELECT pg_advisory_unlock_all()")  # (the test failed before)


def _waits_on_a_busy_pool(
    persistence: Persistence,
    flavour: str,
    admin_url: str,
    readers: int = 1,
    proxy: Listener | None = None,
) -> tuple[float, int]:
    """With the checkpointer pool's one connection held (`HOLD` s, see `_holding_the_pool`),
    `readers` reads at once: the seconds the last one took (each found no checkpoint), and the
    connections `proxy` (the way to the server) took meanwhile."""
    opened = (lambda: proxy.accepted) if proxy is not None else (lambda: 0)
    config = {"configurable": {"thread_id": "t1"}}
    hold = f"SELECT pg_advisory_xact_lock({LOCK})"  # (the transaction ends with the block)
    if flavour == "async":

        async def run() -> tuple[float, int]:
            async with persistence.acheckpointer() as saver:
                pool = saver.conn  # type: ignore[attr-defined]

                async def hold_it() -> None:
                    async with pool.connection() as conn:
                        await conn.execute(hold)

                with _holding_the_pool(admin_url) as (waiting, timer):
                    holder = asyncio.create_task(hold_it())
                    await until(waiting, "the pool's connection to wait on the lock")
                    timer.start()
                    started, before = time.monotonic(), opened()
                    reads = (saver.aget_tuple(config) for _ in range(readers))
                    found = await asyncio.gather(*reads)
                    took, checks = time.monotonic() - started, opened() - before
                    await holder
            assert found == [None] * readers
            return took, checks

        return asyncio.run(run())
    with persistence.checkpointer() as saver, _holding_the_pool(admin_url) as (waiting, timer):
        pool = saver.conn  # type: ignore[attr-defined]

        def hold_it() -> None:
            with pool.connection() as conn:
                conn.execute(hold)

        holder = threading.Thread(target=hold_it)
        holder.start()
        eventually(waiting, "the pool's connection to wait on the lock")
        timer.start()
        started, before = time.monotonic(), opened()
        with ThreadPoolExecutor(readers) as workers:
            found = list(workers.map(lambda _: saver.get_tuple(config), range(readers)))
        took, checks = time.monotonic() - started, opened() - before
        holder.join()
    assert found == [None] * readers
    return took, checks


@pytest.mark.postgres
@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_busy_checkpointer_pool_is_waited_for_past_the_connect_timeout(
    fresh_postgres_url: str, flavour: str
) -> None:
    """A checkpointer pool whose one connection is in use is not a down server: a read waits
    for it past one connect timeout (the check in between connects) and succeeds."""
    url = _on_port(fresh_postgres_url, urlsplit(fresh_postgres_url).port or 5432)
    took, _ = _waits_on_a_busy_pool(Persistence(url, pool_max_size=1), flavour, fresh_postgres_url)
    assert took > TIMEOUT, f"the read took {took:.1f} s: it did not wait for the held connection"


@pytest.mark.postgres
@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_waits_on_a_busy_pool_open_one_check_connection_between_them(
    fresh_postgres_url: str, flavour: str
) -> None:
    """Four reads wait on a busy pool past one connect timeout: one of them connects to check
    the server, the others wait on (each opened a connection of its own: a busy server took
    one more connection per waiting step)."""
    with _listening(target=urlsplit(fresh_postgres_url).port or 5432) as proxy:
        persistence = Persistence(proxy.url(fresh_postgres_url), pool_max_size=1)
        took, checks = _waits_on_a_busy_pool(
            persistence, flavour, fresh_postgres_url, readers=4, proxy=proxy
        )
    assert took > TIMEOUT, f"the reads took {took:.1f} s: they did not wait"
    assert checks == 1, f"{checks} connections checked the server"


@pytest.mark.postgres
def test_a_server_with_no_free_connection_is_busy_not_down(fresh_postgres_url: str) -> None:
    """The check that tells a busy pool from a server gone finds no free connection ("too many
    connections for role", the server's max_connections alike): the server answered, so the
    step waits on for the pool, as it does for any busy pool, instead of ending the run."""
    parts = urlsplit(fresh_postgres_url)
    role, database = f"keel_full_{uuid.uuid4().hex[:8]}", parts.path.lstrip("/")
    with psycopg.connect(fresh_postgres_url, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 1")
        admin.execute(f'ALTER DATABASE "{database}" OWNER TO {role}')  # it may create tables
    netloc = f"{role}@{parts.netloc.rpartition('@')[2]}"
    ledger = Ledger(
        _on_port(parts._replace(netloc=netloc).geturl(), parts.port or 5432), pool_max_size=1
    )
    try:
        ledger.setup()
        holder = threading.Thread(target=ledger.run, args=(_hold(TIMEOUT + 1.5),))
        holder.start()
        _until_held(fresh_postgres_url, TIMEOUT + 1.5)  # the role's one connection is taken
        assert ledger.run(_one()) == 1
        holder.join()
    finally:
        ledger.close()
        with psycopg.connect(fresh_postgres_url, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{database}" OWNER TO CURRENT_USER')
            admin.execute(f"REASSIGN OWNED BY {role} TO CURRENT_USER")
            admin.execute(f"DROP ROLE {role}")


def _settings() -> Flow[tuple[str, str]]:
    rows = yield (
        "SELECT current_setting('statement_timeout'), current_setting('synchronous_commit')",
        (),
    )
    return rows[0][0], rows[0][1]


@pytest.mark.postgres
def test_the_ledger_keeps_the_urls_options_beside_its_own(fresh_postgres_url: str) -> None:
    """The ledger's pool set `options=-c synchronous_commit=off`, which replaced the URL's own
    `options` (a search_path, a statement_timeout): now both apply."""
    ledger = Ledger(f"{fresh_postgres_url}?options=-c%20statement_timeout%3D1234")
    try:
        assert ledger.read(_settings()) == ("1234ms", "off")
    finally:
        ledger.close()


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", 60.0),  # keel's default
        ("?options=-c%20statement_timeout%3D5min", 305.0),  # the server's, plus one connect timeout
        ("?options=-cstatement_timeout%3D1500", 6.5),  # milliseconds
        ("?options=--statement-timeout%3D2s", 7.0),
        ("?options=-c%20statement_timeout%3D0", None),  # no limit on the server: none here
        ("?options=-c%20statement_timeout%3Dsoon", None),  # unreadable: keel sets none either
    ],
)
def test_the_reply_timeout_follows_the_urls_statement_timeout(
    query: str, expected: float | None
) -> None:
    persistence = Persistence(f"postgresql://u@db.example/app{query}")
    assert persistence.connect_timeout == 5.0
    assert persistence.reply_timeout == expected


def test_the_urls_tcp_options_win_over_keels_defaults() -> None:
    """keel's keepalive and tcp_user_timeout defaults fill in what the URL leaves out."""
    url = "postgresql://u@db.example/app?tcp_user_timeout=5000&keepalives=0"
    assert network_defaults(url) == {
        "keepalives_idle": 10,
        "keepalives_interval": 5,
        "keepalives_count": 3,
    }


@pytest.mark.postgres
@pytest.mark.parametrize("entry", ["invoke", "ainvoke"])
def test_a_ledger_server_that_stalls_mid_query_ends_the_next_run_after_its_reply_timeout(
    tmp_path: Path, fresh_postgres_url: str, entry: str
) -> None:
    """The ledger worked, then its proxy stops forwarding with the sockets open: a ledger
    statement waited for its reply forever. Now it waits the reply timeout (1 s of the URL's
    statement_timeout plus one connect timeout), then the replay finds the server unreachable."""
    port = urlsplit(fresh_postgres_url).port or 5432
    with _listening(target=port) as proxy:
        url = proxy.url(fresh_postgres_url) + "&options=-c%20statement_timeout%3D1s"
        with _ledger(url) as (ledger, loop):
            first, _ = _timed_run(entry, ledger, loop, tmp_path, "t1")
            assert first["terminated_reason"] == "completed", first
            proxy.stall()
            ended, took = _timed_run(entry, ledger, loop, tmp_path, "t2")
    assert took < 1 + TIMEOUT + BOUND, f"{entry} took {took:.1f} s after the stall"
    _assert_storage(ended, "connection timeout expired")


@pytest.mark.postgres
@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_statement_past_the_reply_timeout_ends_its_connection_unless_unbounded(
    fresh_postgres_url: str, flavour: str
) -> None:
    """A pooled connection's statement gets `reply_timeout` seconds; inside `unbounded()`
    (migrations, which may wait on another process's advisory lock) it takes what it takes."""
    slow = "SELECT pg_sleep(1.5)"

    async def arun() -> None:
        async with await AsyncBoundedConnection.connect(fresh_postgres_url, reply_timeout=1) as c:
            with unbounded():
                await c.execute(slow)
            with pytest.raises(
                psycopg.OperationalError, match="no reply from PostgreSQL within 1 s"
            ):
                await c.execute(slow)
            assert c.closed

    if flavour == "async":
        asyncio.run(arun())
        return
    with BoundedConnection.connect(fresh_postgres_url, reply_timeout=1) as conn:
        with unbounded():
            conn.execute(slow)
        with pytest.raises(psycopg.OperationalError, match="no reply from PostgreSQL within 1 s"):
            conn.execute(slow)
        assert conn.closed


@pytest.mark.postgres
def test_a_server_out_of_connections_is_busy_not_gone(fresh_postgres_url: str) -> None:
    """Pinned psycopg behaviour: a connect the server refuses for want of connections ("too
    many connections for role", SQLSTATE 53300) raises an `OperationalError` with no SQLSTATE
    (`sqlstate`, `diag.sqlstate` and `pgresult` are None; libpq keeps the server's error
    fields only on a query's result), so keel tells it by the server's message
    (`keel.db.pools._FULL`). Such a server answered: connecting is not remembered as failed,
    and the next wait does not fail at once as it does for a server that is gone."""
    role = f"keel_full_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(fresh_postgres_url, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 0")
        try:
            parts = urlsplit(fresh_postgres_url)
            full_url = parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port}").geturl()
            with pytest.raises(psycopg.OperationalError, match="too many connections") as caught:
                psycopg.connect(full_url, connect_timeout=TIMEOUT)
            exc = caught.value
            assert (exc.sqlstate, exc.diag.sqlstate, exc.pgresult) == (None, None, None)
            persistence = Persistence(full_url)

            def reachability() -> Reachability:
                return Reachability(
                    persistence.connect_timeout,
                    lambda: both(persistence.reach, persistence.areach),
                    lambda failed: StorageError(str(failed)),
                )

            busy, abusy = reachability(), reachability()
            drive(busy.reaching())  # it answered: no error, none remembered
            asyncio.run(adrive(abusy.reaching()))
            assert (busy.error, abusy.error) == (None, None)
        finally:
            admin.execute(f"DROP ROLE {role}")
