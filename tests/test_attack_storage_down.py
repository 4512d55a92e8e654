"""A PostgreSQL ledger that does not answer: a run ends `error` (category `storage`), with the
reason, within about one connect timeout, not one wait per ledger step.

README: "A run whose ledger's PostgreSQL server is down ... ends within about one connect
timeout". A run takes several ledger steps (its thread's lease, admission, budgets, breakers,
rate limits, audit, its run record); each waited for a connection of its own (10 s to open the
pool, the connection's own timeout), so a run against a hung server took 45 s to end. Real
parts: a TCP listener that accepts and never answers (a hung server), a port where nothing
listens, and a TCP proxy to the real test server that starts hanging mid-life. The bounds
are correctness bounds on a hang (a few connect timeouts), not speed goals. The checkpointer's
side: a sync PostgreSQL checkpointer whose server hangs mid-run waits its pool's timeout once.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from conftest import free_port
from test_storage_faults import POLICY as KILLS  # budgets, rate limits, breakers

from keel import Ledger, Persistence, RunContext, StorageError, build_agent, tool
from keel.db.ledger import Flow
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
    until `hang()` cuts them all and makes it a hung server from then on."""

    def __init__(self, target: int | None = None) -> None:
        self.target = target
        self.hanging = target is None
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

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

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                self._open.append(client)
                if self.hanging:
                    continue  # held open, never answered
                upstream = socket.create_connection(("127.0.0.1", self.target or 0))
                self._open.append(upstream)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pipe, args=(a, b), daemon=True).start()


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
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
    assert "Nothing was written; resume the run once PostgreSQL answers" in ended["detail"]


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
        time.sleep(0.3)  # the one connection is taken
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


@pytest.mark.postgres
def test_a_sync_checkpointer_whose_server_hangs_mid_run_waits_its_pool_timeout_once(
    fresh_postgres_url: str,
) -> None:
    """The checkpointer's pool gives no connection within `pool_timeout`: the run ends
    `error/storage` with the reason after that one wait. The sync saver took the pool's timeout
    for a lost connection and waited again (twice `pool_timeout`: 60 s with the default)."""
    pool_timeout = 3.0
    port = urlsplit(fresh_postgres_url).port or 5432
    payload = {"messages": [("user", "where is order A1?")]}
    with _listening(target=port) as proxy:
        persistence = Persistence(proxy.url(fresh_postgres_url), pool_timeout=pool_timeout)
        with persistence.checkpointer() as saver:
            model = ScriptedChatModel(script=[call("lookup", order_id="A1"), "Shipped."] * 2)
            agent = build_agent(model, [lookup], checkpointer=saver)
            first = agent.invoke(payload, {"configurable": {"thread_id": "t1"}}, context=CTX)
            assert first["outcome"]["terminated_reason"] == "completed", first["outcome"]
            proxy.hang()
            started = time.monotonic()
            ended = agent.invoke(payload, {"configurable": {"thread_id": "t2"}}, context=CTX)
            took = time.monotonic() - started
    assert took < 1.5 * pool_timeout, f"the run took {took:.1f} s"
    assert (ended["outcome"]["status"], ended["outcome"]["terminated_reason"]) == (
        "error",
        "storage",
    )
    assert "couldn't get a connection after 3.00 sec" in ended["outcome"]["detail"]
