"""Who holds a lease: a run of some process, named so that a run of this process can tell.

A lease (a thread's, `keel.graphs._one_run`; a tenant's run slot, `keel.guards.admission`)
names its holder as `host/pid-namespace/pid/run`. The runs of this process that have not ended
are `live`; a lease whose holder is a run of this process that is not live was left behind
(Ctrl-C as the run gave it back, or a release the ledger failed or refused): nothing will renew
or release it, so it is taken over at once instead of waited out (`left`). A lease of a process
of this host (and PID namespace) that is gone can be told too (`dead`).

A run that holds its thread's lease is known by that thread here (`leasing`, `of_thread`): a
period budget's reservation names it (`keel.guards.spend`), and is charged and released once
that lease is seen expired or its holder gone, instead of holding the budget's room until the
reservation's own expiry. A run that holds no lease (a graph without a checkpointer, a one-shot
`invoke`) names its process instead (`unleased`: host, PID namespace, PID and the process's start
time): its reservation is charged once that process is seen gone from this host, or its PID
taken by a process started later (`dead`); a process elsewhere cannot be told, and its
reservation holds until it expires.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

from keel._node import NS_SEP
from keel.db.tables import storable

__all__ = [
    "dead",
    "enter",
    "gone",
    "holder",
    "is_unleased",
    "leasing",
    "leave",
    "left",
    "live",
    "named",
    "of_thread",
    "this_process",
    "unleased",
]

_LIVE: set[str] = set()
"""The holders of this process's runs that have not ended (`live`, `left`)."""
_GUARD = threading.Lock()
_THREADS: dict[tuple[str, str], tuple[str, object]] = {}
"""The runs of this process that hold a thread's lease: `(thread id, namespace)` → the run's
holder and the ledger that keeps the lease (`leasing`)."""


def holder() -> str:
    """A new run's name in a lease: this process (host, PID namespace, PID) and the run."""
    return named(uuid.uuid4().hex)


def named(run: str) -> str:
    """The holder that names `run` (an id unique in this process) as a run of this process."""
    return f"{this_process()}/{run}"


def enter(name: str) -> None:
    """`name` is a run of this process that has not ended (its lease must be respected)."""
    with _GUARD:
        _LIVE.add(name)


def leave(name: str) -> None:
    """The run `name` ended: a lease it still holds is left behind (`left`)."""
    with _GUARD:
        _LIVE.discard(name)


@contextlib.contextmanager
def live(name: str) -> Iterator[None]:
    """`name` is live while the block runs (`enter`, then `leave` however it ends)."""
    enter(name)
    try:
        yield
    finally:
        leave(name)


def left(name: str) -> bool:
    """Whether `name` is a run of this process that ended without giving its lease back.

    Ctrl-C as it ended, or a ledger that failed (or was closed) as it released it: nothing will
    renew or release that lease.
    """
    with _GUARD:
        return name.startswith(f"{this_process()}/") and name not in _LIVE


_UNLEASED = "process@"
"""How the run part of an `unleased` holder starts (then the process's start time)."""


def unleased() -> str:
    """The holder a run without a thread lease names: this process, since its start time."""
    return named(f"{_UNLEASED}{_PROCESS['start']}")


def is_unleased(name: str) -> bool:
    """Whether `name` is an `unleased` holder: a process, not a run holding a lease."""
    return name.rsplit("/", 1)[-1].startswith(_UNLEASED)


def _started(pid: int | str) -> str:
    """When process `pid` started (clock ticks since boot, `/proc/<pid>/stat`); `?` unknown.

    With the PID, it names one process: a PID is reused, never with the same start time.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return "?"
    fields = stat.rpartition(b")")[2].split()  # the name in parentheses may hold spaces
    return fields[19].decode() if len(fields) > 19 else "?"


def _process() -> str:
    try:  # two containers can share a host name and a PID, never a PID namespace
        space = os.readlink("/proc/self/ns/pid")
    except OSError:
        space = "?"
    return f"{socket.gethostname()}/{space}/{os.getpid()}"


def this_process() -> str:
    """`_process()`, read at import and again in a forked child (a process of its own).

    Not on the event loop: reading `/proc` there is a blocking call (`langgraph dev` refuses it).
    """
    return _PROCESS["name"]


def _forked() -> None:
    _PROCESS.update(name=_process(), start=_started("self"))


_PROCESS = {"name": _process(), "start": _started("self")}
os.register_at_fork(after_in_child=_forked)


def dead(name: str) -> bool:
    """Whether `name` is a run of a process of this host (and PID namespace) that is gone.

    Such a lease need not be waited out: its process will never renew or release it (a worker
    killed mid-run, resumed by the next). A holder elsewhere, or where that cannot be told,
    holds until its lease expires. An `unleased` holder names its process's start time too: a
    process with its PID that started at another time (this one, or another) took the PID of
    the one that is gone. Reads `/proc`: not on an event loop.
    """
    parts = name.rsplit("/", 3)
    if len(parts) != 4:
        return False
    where, pid, run = parts[:2], parts[2], parts[3]
    this = this_process()
    here, here_pid = this.rsplit("/", 2)[:2], this.rsplit("/", 1)[1]
    if "?" in where or where != here or not pid.isdigit():
        return False
    start = run[len(_UNLEASED) :] if is_unleased(name) else "?"
    if pid == here_pid:
        return start not in ("?", _PROCESS["start"])
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # it exists (another user's)
        pass
    return start != "?" and _started(pid) not in ("?", start)


def gone(name: str) -> bool:
    """Whether no run holds what `name` holds: its process is gone (`dead`) or it `left` it."""
    return dead(name) or left(name)


@contextlib.contextmanager
def leasing(thread: str, ns: str, name: str, ledger: object) -> Iterator[None]:
    """The run `name` holds the lease of `thread` (namespace `ns`), kept in `ledger`, meanwhile."""
    with _GUARD:
        _THREADS[thread, ns] = (name, ledger)
    try:
        yield
    finally:
        with _GUARD:
            if _THREADS.get((thread, ns), (None,))[0] == name:
                del _THREADS[thread, ns]


def of_thread(configurable: Mapping[str, Any], ledger: object) -> str | None:
    """The run of this process whose thread lease in `ledger` covers a node's `configurable`.

    The run holds the lease of the graph it streams (its thread id and namespace); a node of it,
    or of a subgraph or an agent inside it, runs in a namespace under that one. `None`: no run
    of this process holds that thread's lease in `ledger` (a run without a thread, a lease kept
    in another ledger, one the ledger failed to give).
    """
    thread = configurable.get("thread_id")
    if thread is None:
        return None
    parts = str(configurable.get("checkpoint_ns") or "").split(NS_SEP)
    key = storable(str(thread))
    with _GUARD:
        for end in range(len(parts), -1, -1):
            held = _THREADS.get((key, storable(NS_SEP.join(parts[:end]))))
            if held is not None and held[1] is ledger:
                return held[0]
    return None
