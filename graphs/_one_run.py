"""One run at a time per thread: a second run waits for the first (across processes, with a ledger).

LangGraph does not stop two runs on one thread: both start from the same checkpoint, and the
one that saves last makes the thread's history, so the other run's messages (its question,
its tool results, its answer) vanish from the thread while its caller was told it succeeded
(`tests/test_attack_concurrent_runs.py` pins this). A user who sends twice before the first
answer, or a web app that runs each request as it comes, does that. keel's graphs take the
thread first: the second run starts when the first has ended (answered, stopped or paused for
a human), reads the state the first one left, and is checked against it.

A run that could only wait for itself is a `UserError` instead: one a node or tool starts on
its own run's thread (with a config of its own; with the one it got, it is part of that run),
or one started in the task or OS thread that is still reading that thread's stream.

The lock lives in this process. With a ledger (`build_agent(..., ledger=Ledger(url))`), a run
also takes the thread's lease in it (`keel_thread_leases`, keyed on the thread id and
checkpoint namespace) once it has the lock, before anything reads the thread, so the rule
holds across every process sharing that ledger (web workers sharing a PostgreSQL checkpointer,
say): a run that finds the lease taken asks again after 50 ms, then twice as long each time
up to 0.5 s. The lease is renewed while the run streams (one thread or loop task per process
renews all its runs' leases in one statement every `lease_s / 3`, as admission's leases) and
released when the run ends, is closed or cancelled. The lease of a process that died is taken
over at once when that process was on this host and PID namespace (its PID is gone: a resume
after a crash does not wait), and so is one a run of this process left behind (Ctrl-C as it
ended, or a release the ledger failed: `keel.guards.holders`); elsewhere it expires after
`lease_s` (30 s), and then another process's run takes it. A run's model calls name the lease's
holder in their period budget reservations (`keel.guards.holders.leasing`): a crashed run's
reservation is charged and stops holding the budget's room once its lease is seen expired, or its
process gone. Two runs in one process wait for each other on the lock, without asking the ledger.
A ledger that fails as a run takes the lease leaves that run to the lock alone (a warning says
so). The lease names the thread, not the checkpointer: agents with checkpointers of their own
that share a ledger and a thread id take turns on it too. LangGraph's server orders runs on a
thread itself (`multitask_strategy`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import var_child_runnable_config

from keel._drive import Op, Steps, adrive, both, drive, finishing, sleep
from keel._node import NS_SEP, inside_task, saver_in
from keel.db.ledger import Flow, Ledger
from keel.db.tables import THREAD_LEASES, storable
from keel.errors import UserError
from keel.graphs._storage import refuse_sync_saver
from keel.guards import holders
from keel.guards.admission import _LoopRenewer, _renew_rows, _Renewer
from keel.redact import sanitized_logger
from keel.state import storable_ids

__all__ = ["OneRunPerThread", "ThreadLeases", "holder_flow", "running_here"]

log = sanitized_logger(__name__)

_HELD: dict[tuple[Any, ...], object] = {}
"""The threads with a run in this process, and who runs it (a task, or an OS thread)."""
_GUARD = threading.Lock()
_FIRST_WAIT, _MOST_WAIT = 0.002, 0.05
"""Seconds between looks at a busy thread: doubling from the first to the most."""
_FIRST_ASK, _MOST_ASK = 0.05, 0.5
"""Seconds between asks for a thread's lease that another process holds (each is a write)."""
_LEASED: dict[tuple[str, str], int] = {}
"""The threads (id, namespace) whose ledger lease a run of this process holds, and how many."""
_LEASE_S = 30.0
"""How long a thread's lease holds without renewal: a dead process's run blocks no longer."""


class OneRunPerThread:
    """A compiled graph's `stream` / `astream` (and so `invoke` / `ainvoke`), one per thread.

    A mixin for `CompiledStateGraph` subclasses: put it first, so the thread is taken before
    anything reads its state.
    """

    checkpointer: Any
    keel_thread_leases: ThreadLeases | None = None
    """Where a run takes its thread's lease across processes (the agent's ledger), if any."""

    def stream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        storable_ids(config)  # before the lease writes the thread's id
        key = _key(self.checkpointer, config)
        if key is None:
            return super().stream(input, config, **kwargs)  # type: ignore[misc]
        return self._one_stream(key, input, config, kwargs)

    def _one_stream(
        self, key: tuple[Any, ...], input: Any, config: RunnableConfig | None, kwargs: Any
    ) -> Iterator[Any]:
        with _taken(key), _leased(self.keel_thread_leases, key):
            yield from super().stream(input, config, **kwargs)  # type: ignore[misc]

    async def astream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        storable_ids(config)
        refuse_sync_saver(self.checkpointer, config)  # before the lease is taken
        key = _key(self.checkpointer, config)
        async with contextlib.AsyncExitStack() as stack:
            if key is not None:
                await stack.enter_async_context(_ataken(key))
                await stack.enter_async_context(_aleased(self.keel_thread_leases, key))
            # closed with this stream (a client gone): what the run holds comes back now
            chunks = super().astream(input, config, **kwargs)  # type: ignore[misc]
            async for chunk in await stack.enter_async_context(contextlib.aclosing(chunks)):
                yield chunk


def _key(checkpointer: Any, config: RunnableConfig | None) -> tuple[Any, ...] | None:
    """Which thread a run writes, or `None` for a run that keeps no thread.

    A run inside another one (a subgraph, an agent a tool calls with its config) is part of
    the run that holds the thread. A run that a node or tool of a run on the same thread
    starts on its own would wait for the run that waits for it: that is a `UserError`.
    """
    if inside_task(config):
        return None
    conf = (config or {}).get("configurable") or {}
    key = _thread_of(checkpointer, conf, str(conf.get("checkpoint_ns") or ""))
    parent = _parent()  # a task's namespace is its graph's, then its own `node:task_id`
    if key is not None and key == _thread_of(None, parent, _graph_ns(parent)):
        raise UserError(
            f"A node or tool of a run on thread {key[1]!r} started another run on that thread "
            "(it would wait for the run that waits for it): give it its own thread_id, or "
            "pass it the config the node or tool got, so it runs as part of that run."
        )
    return key


def _thread_of(checkpointer: Any, conf: Mapping[str, Any], ns: str) -> tuple[Any, ...] | None:
    thread = conf.get("thread_id")
    saver = checkpointer if checkpointer not in (None, True, False) else None
    saver = saver if saver is not None else saver_in(conf)
    if thread is None or saver is None:
        return None
    return (id(saver), str(thread), ns)


def _graph_ns(task: Mapping[str, Any]) -> str:
    return str(task.get("checkpoint_ns") or "").rpartition(NS_SEP)[0]


def _parent() -> Mapping[str, Any]:
    """The configurable of the node or tool this code runs in, if any."""
    parent = var_child_runnable_config.get()
    return (parent or {}).get("configurable") or {} if inside_task(parent) else {}


def _owner() -> object:
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no running loop
        task = None
    return task if task is not None else threading.current_thread()


def _take(key: tuple[Any, ...], owner: object) -> bool:
    """Take the thread for `owner`; `False` while another run has it."""
    with _GUARD:
        held = _HELD.get(key)
        if held is None:
            _HELD[key] = owner
            return True
    if held is owner:  # waiting would never end: the run that has it can only go on here
        raise UserError(
            f"A run on thread {key[1]!r} is still going where this one starts (its stream is "
            "being read, or was left unfinished): finish or close that stream first, or give "
            "this run another thread_id."
        )
    return False


def _give_back(key: tuple[Any, ...], owner: object) -> None:
    with _GUARD:
        if _HELD.get(key) is owner:
            del _HELD[key]


def _waits() -> Iterator[float]:
    wait = _FIRST_WAIT
    while True:
        yield wait
        wait = min(wait * 2, _MOST_WAIT)


@contextlib.contextmanager
def _taken(key: tuple[Any, ...]) -> Iterator[None]:
    owner = _owner()
    drive(_waited(key, owner))
    try:
        yield
    finally:
        _give_back(key, owner)


@contextlib.asynccontextmanager
async def _ataken(key: tuple[Any, ...]) -> AsyncIterator[None]:
    owner = _owner()
    await adrive(_waited(key, owner))
    try:
        yield
    finally:
        _give_back(key, owner)


def _waited(key: tuple[Any, ...], owner: Any) -> Steps[None]:
    """Wait, backing off, until `owner` takes `key` (`_taken` / `_ataken`)."""
    for wait in _waits():
        if _take(key, owner):
            return
        yield sleep(wait)


class ThreadLeases:
    """Takes, renews and releases thread leases in `ledger`: one run per thread, in every process.

    A lease is a row per (thread id, checkpoint namespace) that names the run holding it and
    when it expires; taking it is one transaction (insert, or take over an expired row), so is
    releasing it, and a process's leases are renewed together every `lease_s / 3`.
    """

    def __init__(self, ledger: Ledger, lease_s: float = _LEASE_S) -> None:
        """Leases of `lease_s` seconds (renewed every third of that) kept in `ledger`."""
        if not isinstance(lease_s, int | float) or isinstance(lease_s, bool) or lease_s <= 0:
            raise UserError(
                f"ThreadLeases(lease_s=...) must be a positive number, got {lease_s!r}."
            )
        self.ledger = ledger
        self.lease_s = float(lease_s)
        renew = functools.partial(_renew_rows, THREAD_LEASES.name, "holder")
        self._renewer = _Renewer(ledger, self.lease_s, renew, "thread")
        self._arenewer = _LoopRenewer(ledger, self.lease_s, renew, "thread")

    @classmethod
    def of(cls, ledger: Ledger | None) -> ThreadLeases | None:
        """The leases kept in `ledger`; None without one (one run per thread in this process)."""
        return None if ledger is None else cls(ledger)

    def _taking(self, thread: str, ns: str, holder: str) -> Steps[None]:
        """Wait until `holder` has the thread's lease (free, expired, or its holder dead)."""
        wait = _FIRST_ASK
        while True:
            flow = _take_flow(thread, ns, holder, time.time(), self.lease_s)
            held_by = yield both(self.ledger.run, self.ledger.arun, flow)
            if held_by == holder:
                return
            if held_by is not None and holders.gone(held_by):
                flow = _take_over_flow(thread, ns, held_by, holder, time.time() + self.lease_s)
                yield both(self.ledger.run, self.ledger.arun, flow)
                continue
            yield sleep(wait)
            wait = min(wait * 2, _MOST_ASK)

    def _took(self, thread: str, ns: str, holder: str) -> Steps[bool]:
        """`_taking`; False (logged) if the ledger failed: the run goes on, as other guards do."""
        try:
            yield from self._taking(thread, ns, holder)
        except Exception as exc:
            _unleased(thread, exc)
            return False
        return True

    def _release(self, holder: str) -> Op:
        """The step that releases `holder`'s lease.

        Shielded on the event loop: a cancelled run still gives its thread back now.
        """
        return Op(
            lambda: self.ledger.run(_release_flow(holder)),
            lambda: asyncio.shield(self.ledger.arun(_release_flow(holder))),
        )

    def _given_back(self, thread: str, holder: str) -> Steps[None]:
        """After the run: stop renewing `holder`'s lease, then release it."""
        discard = functools.partial(self._renewer.discard, holder)
        yield Op(discard, functools.partial(self._arenewer.discard, holder))
        try:
            yield self._release(holder)
        except Exception as exc:  # the run's own result or error wins; the lease expires
            log.warning("keel could not release the lease of thread %r: %s", thread, exc)

    @contextlib.contextmanager
    def held(self, thread: str, ns: str) -> Iterator[None]:
        """Hold the thread's lease while the block runs (renewed), release it after."""
        holder = holders.holder()
        with holders.live(holder):
            try:
                taken = drive(self._took(thread, ns, holder))
            except BaseException:  # interrupted while it waited: a lease just taken goes back
                with contextlib.suppress(Exception):
                    self._release(holder).run()
                raise
            if not taken:
                yield
                return
            try:  # (Ctrl-C may land while the renewal thread starts)
                self._renewer.add(holder)
                with _holding(thread, ns), holders.leasing(thread, ns, holder, self.ledger):
                    yield
            finally:
                drive(self._given_back(thread, holder))

    @contextlib.asynccontextmanager
    async def aheld(self, thread: str, ns: str) -> AsyncIterator[None]:
        """Hold the thread's lease while the block runs (async); see `held`."""
        holder = holders.holder()
        with holders.live(holder):
            try:
                taken = await adrive(self._took(thread, ns, holder))
            except BaseException:  # cancelled (a client gone) while it waited: give it back
                with contextlib.suppress(Exception):
                    await finishing(self._release(holder).arun())
                raise
            if not taken:
                yield
                return
            try:
                self._arenewer.add(holder)
                with _holding(thread, ns), holders.leasing(thread, ns, holder, self.ledger):
                    yield
            finally:  # given back before the run ends, however often it is cancelled meanwhile
                await finishing(adrive(self._given_back(thread, holder)))


def _unleased(thread: str, exc: Exception) -> None:
    log.warning(
        "keel could not take the lease of thread %r in the ledger (%s): the run goes on, one "
        "at a time on this thread in this process only",
        thread,
        exc,
    )


@contextlib.contextmanager
def _holding(thread: str, ns: str) -> Iterator[None]:
    with _GUARD:
        _LEASED[thread, ns] = _LEASED.get((thread, ns), 0) + 1
    try:
        yield
    finally:
        with _GUARD:
            left = _LEASED.pop((thread, ns)) - 1
            if left:
                _LEASED[thread, ns] = left


def _within_lease(key: tuple[Any, ...]) -> bool:
    """Whether a node or tool of a run that holds this run's thread's lease starts this run.

    Only a run with another checkpointer gets here (one with the same one is a `UserError`):
    it shares the thread id, so its lease is the one its own caller holds and waits on. The
    caller's lease keeps other processes off that thread id meanwhile.
    """
    parent = _parent()
    thread, ns = _named(key)
    return (
        parent.get("thread_id") is not None
        and storable(str(parent["thread_id"])) == thread
        and storable(_graph_ns(parent)) == ns
        and (thread, ns) in _LEASED
    )


def _leased(
    leases: ThreadLeases | None, key: tuple[Any, ...]
) -> contextlib.AbstractContextManager[None]:
    if leases is None or _within_lease(key):
        return contextlib.nullcontext()
    return leases.held(*_named(key))


def _aleased(
    leases: ThreadLeases | None, key: tuple[Any, ...]
) -> contextlib.AbstractAsyncContextManager[None]:
    if leases is None or _within_lease(key):
        return contextlib.nullcontext()
    return leases.aheld(*_named(key))


def _named(key: tuple[Any, ...]) -> tuple[str, str]:
    """The thread id and namespace of an in-process key, as the ledger stores text."""
    return storable(key[1]), storable(key[2])


def _take_over_flow(thread: str, ns: str, dead: str, holder: str, expires_at: float) -> Flow[None]:
    """Give the lease a dead process's run holds to `holder` (if it is still that run's)."""
    yield (
        f"UPDATE {THREAD_LEASES.name} SET holder = ?, expires_at = ? "
        "WHERE thread_id = ? AND checkpoint_ns = ? AND holder = ?",
        (holder, expires_at, thread, ns, dead),
    )


def _take_flow(thread: str, ns: str, holder: str, now: float, lease_s: float) -> Flow[str | None]:
    """Take the thread's lease for `holder` if it is free or expired; who holds it now."""
    table = THREAD_LEASES.name
    yield (
        f"INSERT INTO {table} ({THREAD_LEASES.select}) VALUES ({THREAD_LEASES.placeholders()}) "
        "ON CONFLICT (thread_id, checkpoint_ns) DO UPDATE SET holder = excluded.holder, "
        f"expires_at = excluded.expires_at WHERE {table}.expires_at <= ?",
        (thread, ns, holder, now + lease_s, now),
    )
    rows = yield (
        f"SELECT holder FROM {table} WHERE thread_id = ? AND checkpoint_ns = ?",
        (thread, ns),
    )
    return str(rows[0][0]) if rows else None


def running_here(checkpointer: Any, config: RunnableConfig) -> bool:
    """Whether a run of this process holds (or waits for) the thread `config` names."""
    conf = config.get("configurable") or {}
    key = _thread_of(checkpointer, conf, str(conf.get("checkpoint_ns") or ""))
    with _GUARD:
        return key is not None and key in _HELD


def holder_flow(config: RunnableConfig) -> Flow[str | None]:
    """The run that holds the lease of the thread `config` names (None: no live run holds it).

    A lease expired, or held by a dead process of this host or a run of this process that
    left it behind, is held by no run.
    """
    conf = config.get("configurable") or {}
    thread, ns = (
        storable(str(conf.get("thread_id"))),
        storable(str(conf.get("checkpoint_ns") or "")),
    )
    rows = yield (
        f"SELECT holder FROM {THREAD_LEASES.name} "
        "WHERE thread_id = ? AND checkpoint_ns = ? AND expires_at > ?",
        (thread, ns, time.time()),
    )
    held = str(rows[0][0]) if rows else None
    return None if held is None or holders.gone(held) else held


def _release_flow(holder: str) -> Flow[None]:
    yield f"DELETE FROM {THREAD_LEASES.name} WHERE holder = ?", (holder,)
