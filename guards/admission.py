"""Admission control: caps on the runs a tenant (and each of its users) has running and queued.

Each run takes a *lease* in the ledger before it starts (`keel_admission_leases`), in one
transaction that locks the tenant's and the user's scope rows, so the caps hold across every
process and replica sharing the ledger. A run over the running cap waits in the queue (if the
queue has room) for up to `queue_timeout_s`; a run over both caps is refused at once. A refused
run ends with the outcome `stopped` / `overloaded` and a retry-after in its detail; nothing of
it is written to the thread. A lease expires after `lease_s` unless its run renews it (it does
while it streams), so a run whose process died does not hold a slot forever. A queued run
asks the ledger with a growing pause (each ask locks the tenant's rows), and at once when a
lease of the same process leaves; a `WaitingRoom` shared by a process's admissions caps how
many of its runs wait at once, over every tenant. A lease names the run that holds it and its
process (`keel.guards.holders`): one a run of this process left behind (Ctrl-C as it gave the
slot back, a release the ledger failed or refused) is taken over by the next admission of its
tenant at once, instead of holding the slot until it expires; another process's lease holds
until it expires.

Example:
    ```python
    policy = Policy(
        rules=[Rule(action="allow")],
        admission=AdmissionPolicy(tenant_running=5, user_running=2, tenant_queued=10),
    )
    agent = build_agent(model, tools, policy=policy, ledger=Ledger("sqlite:///.keel/keel.db"))
    ```
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from keel import outcome
from keel._drive import Op, Steps, adrive, both, drive, finishing, sleep
from keel.db.ledger import Flow, Ledger
from keel.db.tables import ADMISSION_LEASES
from keel.errors import UserError
from keel.guards import holders
from keel.pricing import finite_number, is_count
from keel.redact import sanitized_logger
from keel.state import Outcome, RunContext

__all__ = ["Admission", "AdmissionPolicy", "Lease", "WaitingRoom", "overloaded"]

log = sanitized_logger(__name__)

_POLL_S = 0.05
"""Seconds a queued run waits before it first asks the ledger again for a slot."""
_POLL_MAX_S = 0.5
"""The longest wait between two asks (the wait doubles from `_POLL_S`): a slot freed by
another process is taken within this much; one freed in this process, at once."""
_TICK_S = 0.01
"""How often a queued run looks, in memory, whether this process freed a slot."""
_PROCESS_FULL = "process"
"""The state of a run that would queue while the process's `WaitingRoom` is full."""


@dataclass(frozen=True, kw_only=True, slots=True)
class AdmissionPolicy:
    """How many runs a tenant, and each user of it, may have running and waiting at once.

    `None` means no cap on that count. Queued runs wait for a running slot, first come first
    served, for up to `queue_timeout_s`; over the queue's cap a run is refused at once.
    """

    tenant_running: int | None = None
    """Runs of one tenant running at once."""
    tenant_queued: int = 0
    """Runs of one tenant waiting for a slot."""
    user_running: int | None = None
    """Runs of one user (of a tenant) running at once."""
    user_queued: int = 0
    """Runs of one user waiting for a slot."""
    queue_timeout_s: float = 30.0
    """How long a queued run waits for a slot before it is refused."""
    lease_s: float = 300.0
    """How long a lease holds without renewal (a running run renews it as it streams)."""
    retry_after_s: float = 5.0
    """The retry-after a refused run is told (in its outcome's detail, and HTTP's header)."""

    def __post_init__(self) -> None:
        for name in ("tenant_running", "user_running"):
            value = getattr(self, name)
            if value is not None and (not is_count(value) or value < 1):
                raise UserError(
                    f"AdmissionPolicy.{name} must be a whole number, 1 or more (or None: no cap); "
                    f"got {value!r}."
                )
        for name in ("tenant_queued", "user_queued"):
            value = getattr(self, name)
            if not is_count(value) or value < 0:
                raise UserError(
                    f"AdmissionPolicy.{name} must be a whole number, 0 or more; got {value!r}."
                )
        for name in ("queue_timeout_s", "lease_s", "retry_after_s"):
            value = getattr(self, name)
            if (number := finite_number(value)) is None or number <= 0:
                raise UserError(
                    f"AdmissionPolicy.{name} must be a finite number of seconds greater than 0 "
                    f"(e.g. {name}=30); got {value!r}."
                )

    @property
    def retry_after(self) -> int:
        """`retry_after_s` in whole seconds (at least 1), as HTTP's `Retry-After` says it."""
        return max(1, math.ceil(self.retry_after_s))


def overloaded(policy: AdmissionPolicy, why: str) -> Outcome:
    """The outcome of a refused run: `stopped` / `overloaded`, with the retry-after."""
    return outcome.stopped("overloaded", f"{why}; retry after {policy.retry_after} s")


class WaitingRoom:
    """How many runs of one process may wait in admission queues at once, over every tenant.

    A queued run waits inside the process that runs it: on a server, in one of a worker's
    `N_JOBS_PER_WORKER` job slots. Each tenant's `tenant_queued` bounds its own queue, not what
    all queues together take, so one tenant's waiting runs could hold every slot another
    tenant's runs need. Admissions that share a room let at most `limit` of their runs wait; a
    run that would wait beyond that is refused at once (`overloaded`, with the retry-after).
    The served graphs share one room, sized by the server config's `queued_per_process`.

    Example:
        ```python
        room = WaitingRoom(4)  # shared by every Admission of this process
        caps = AdmissionPolicy(tenant_running=5, tenant_queued=10)
        admission = Admission(ledger, caps, waiting_room=room)
        ```
    """

    def __init__(self, limit: int) -> None:
        if not is_count(limit) or limit < 0:
            raise UserError(f"WaitingRoom(limit=...) must be 0 or more, got {limit!r}.")
        self.limit = limit
        self._waiting = 0
        self._lock = threading.Lock()  # held for a few instructions: fine on an event loop too

    def __repr__(self) -> str:
        return f"WaitingRoom(limit={self.limit}, waiting={self._waiting})"

    @property
    def waiting(self) -> int:
        """Runs waiting in a queue now."""
        return self._waiting

    def enter(self) -> bool:
        """Take a place (`False`: the room is full; the run must not wait)."""
        with self._lock:
            if self._waiting >= self.limit:
                return False
            self._waiting += 1
            return True

    def leave(self) -> None:
        """Give a place back (the run was admitted, timed out or gave up)."""
        with self._lock:
            if self._waiting <= 0:
                raise RuntimeError("WaitingRoom.leave() without a matching enter()")
            self._waiting -= 1


@dataclass(frozen=True, slots=True)
class Lease:
    """A slot a run holds (`id`), or the refusal (`refused`: why)."""

    id: str
    """The lease's id in `keel_admission_leases`."""
    refused: str | None = None
    """Why the run was refused (over which cap), or None when it was admitted."""


class Admission:
    """Takes, renews and releases run leases in `ledger` under `policy`.

    Leases are dated by `clock` (epoch seconds, `time.time`; a test's fabricated clock): they
    are taken, renewed and expire by it. The renewal beats and the queue's waits are real time.

    Example:
        ```python
        admission = Admission(Ledger("sqlite:///.keel/keel.db"), AdmissionPolicy(tenant_running=5))
        lease = admission.acquire(RunContext(user_id="u1", tenant_id="acme"))
        try:
            ...  # the run, unless lease.refused
        finally:
            admission.release(lease)
        ```
    """

    def __init__(
        self,
        ledger: Ledger,
        policy: AdmissionPolicy,
        *,
        waiting_room: WaitingRoom | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(ledger, Ledger):
            raise UserError(f"Admission needs a keel.Ledger, got {type(ledger).__name__}.")
        if not isinstance(policy, AdmissionPolicy):
            raise UserError(f"Admission needs an AdmissionPolicy, got {type(policy).__name__}.")
        if waiting_room is not None and not isinstance(waiting_room, WaitingRoom):
            raise UserError(
                "Admission(waiting_room=...) must be a WaitingRoom, got "
                f"{type(waiting_room).__name__}."
            )
        self.ledger = ledger
        self.policy = policy
        self.waiting_room = waiting_room
        """Where this process's queued runs wait, shared with other admissions (None: no cap)."""
        if not callable(clock):
            raise UserError(
                f"Admission(clock=...) must be a function returning seconds since the epoch "
                f"(e.g. time.time), got {clock!r}."
            )
        self._clock = clock
        renew = (ledger, policy.lease_s, _renew_flow, "admission", clock)
        self._renewer, self._arenewer = _Renewer(*renew), _LoopRenewer(*renew)

    @classmethod
    def of(
        cls,
        ledger: Ledger | None,
        policy: AdmissionPolicy | None,
        *,
        waiting_room: WaitingRoom | None = None,
    ) -> Admission | None:
        """Admission control for `policy`, kept in `ledger`; None without either (no caps)."""
        if ledger is None or policy is None:
            return None
        return cls(ledger, policy, waiting_room=waiting_room)

    def acquire(self, context: RunContext) -> Lease:
        """A running lease for a run of `context`'s user, waiting in the queue if there is room."""
        lease_id = uuid.uuid4().hex
        try:
            return drive(self._acquiring(context, lease_id))
        except BaseException:  # interrupted while queued: the queue slot must not leak
            with contextlib.suppress(Exception):
                self.ledger.run(_release_flow(lease_id))
            raise

    async def aacquire(self, context: RunContext) -> Lease:
        """A running lease (async); see `acquire`."""
        lease_id = uuid.uuid4().hex
        try:
            return await adrive(self._acquiring(context, lease_id))
        except BaseException:  # cancelled (a client gone) while queued: give the slot back
            with contextlib.suppress(Exception):
                await finishing(self.ledger.arun(_release_flow(lease_id)))
            raise

    def _acquiring(self, context: RunContext, lease_id: str) -> Steps[Lease]:
        """`_taking`, its run live (`keel.guards.holders`) from before its lease is written.

        It stays live until its lease is released (`_releasing`); a refused run, or one whose
        acquiring failed, ends here.
        """
        holder = holders.named(lease_id)
        holders.enter(holder)
        try:
            lease = yield from self._taking(context, lease_id, holder)
        except BaseException:
            holders.leave(holder)
            raise
        if lease.refused is not None:
            holders.leave(holder)
        return lease

    def _taking(self, context: RunContext, lease_id: str, holder: str) -> Steps[Lease]:
        """Take `lease_id`: run now, wait in the queue, or be refused (written once for both).

        A queued run asks the ledger again after 50 ms, then twice as long each time up to
        `_POLL_MAX_S` (every ask locks the tenant's rows, so many waiting runs must not ask 20
        times a second each), and at once when a lease of this process's ledger comes free.
        """

        def run(flow: Flow[Any]) -> Op:
            return both(self.ledger.run, self.ledger.arun, flow)

        state = yield run(_admit_flow(self.policy, context, lease_id, holder, self._clock()))
        state, seated = self._seated(state)
        try:
            now = time.monotonic()
            deadline, interval = now + self.policy.queue_timeout_s, _POLL_S
            ask_at, seen = now + interval, _freed(self.ledger)
            while state == "queued" and now < deadline:
                yield sleep(min(_TICK_S, deadline - now, max(ask_at - now, 0.0)))
                now = time.monotonic()
                if now < ask_at and _freed(self.ledger) == seen:
                    continue
                seen = _freed(self.ledger)
                state = yield run(_promote_flow(self.policy, context, lease_id, self._clock()))
                interval = min(interval * 2, _POLL_MAX_S)
                now = time.monotonic()
                ask_at = now + interval
        finally:
            self._stand(seated)
        if state == "running":
            return Lease(lease_id)
        if state in ("queued", _PROCESS_FULL):  # its queued row goes: those behind move up
            yield run(_release_flow(lease_id))
            _free(self.ledger)
        return Lease(lease_id, refused=self._why(state, context))

    def _seated(self, state: str) -> tuple[str, bool]:
        """`(state, seated)`: a queued run takes a place in the waiting room, or is refused."""
        if state != "queued" or self.waiting_room is None:
            return state, False
        if self.waiting_room.enter():
            return state, True
        return _PROCESS_FULL, False

    def _stand(self, seated: bool) -> None:
        if seated:
            assert self.waiting_room is not None
            self.waiting_room.leave()

    def _why(self, state: str, context: RunContext) -> str:
        if state == _PROCESS_FULL:
            limit = self.waiting_room.limit if self.waiting_room is not None else 0
            return (
                f"tenant {context.tenant_id!r} has no free run slot, and this process has "
                f"{limit} run(s) waiting for one already, its cap (queued_per_process)"
            )
        return _why(state, context, self.policy)

    def renew(self, lease: Lease) -> None:
        """Push the lease's expiry `lease_s` ahead (a running run calls this as it goes)."""
        if lease.refused is None:
            self.ledger.run(_renew_flow([lease.id], self._clock() + self.policy.lease_s))

    async def arenew(self, lease: Lease) -> None:
        """Push the lease's expiry ahead (async)."""
        if lease.refused is None:
            await self.ledger.arun(_renew_flow([lease.id], self._clock() + self.policy.lease_s))

    def release(self, lease: Lease) -> None:
        """Give the slot back (a refused lease holds none); this process's queued runs ask now.

        However it ends, the run is no longer live: a lease the release could not delete
        (Ctrl-C, the ledger failed) is taken over by the next admission of this process.
        """
        drive(self._releasing(lease))

    async def arelease(self, lease: Lease) -> None:
        """Give the slot back (async); see `release`."""
        await adrive(self._releasing(lease))

    def _releasing(self, lease: Lease) -> Steps[None]:
        if lease.refused is None:
            try:
                yield both(self.ledger.run, self.ledger.arun, _release_flow(lease.id))
                _free(self.ledger)
            finally:
                holders.leave(holders.named(lease.id))

    @contextlib.contextmanager
    def holding(self, lease: Lease) -> Iterator[None]:
        """Renew `lease` at least every `lease_s / 3` while the block runs; release it after.

        One thread per `Admission` renews every lease its sync runs hold, in one statement a
        beat (see `_Renewer`). A process that dies stops renewing: its leases expire and their
        slots come free.
        """
        try:  # (Ctrl-C may land while the renewal thread starts: the lease still goes back)
            if lease.refused is None:
                self._renewer.add(lease.id)
            yield
        finally:
            drive(self._given_back(lease))

    @contextlib.asynccontextmanager
    async def aholding(self, lease: Lease) -> AsyncIterator[None]:
        """Renew `lease` while the block runs; release it after (async).

        One task per event loop renews every lease this `Admission`'s runs on that loop hold,
        in one statement a beat (see `_LoopRenewer`).
        """
        try:
            if lease.refused is None:
                self._arenewer.add(lease.id)
            yield
        finally:  # given back before the run ends, however often it is cancelled meanwhile
            await finishing(adrive(self._given_back(lease)))

    def _given_back(self, lease: Lease) -> Steps[None]:
        """After the run: stop renewing `lease`, then release it.

        Interrupted or failed, the run still ends (`holders.leave`): its lease, left in the
        ledger, is taken over by this process's next admission of the tenant.
        """
        try:
            discard = functools.partial(self._renewer.discard, lease.id)
            yield Op(discard, functools.partial(self._arenewer.discard, lease.id))
            try:
                yield from self._releasing(lease)
            except Exception as exc:  # the run's own result or error wins
                log.warning("keel could not release admission lease %s: %s", lease.id, exc)
        finally:
            holders.leave(holders.named(lease.id))

    def held(self, tenant_id: str, user_id: str | None = None) -> dict[str, int]:
        """Unexpired leases of a tenant (or one of its users) by state: running, queued.

        Not those a run of this process left behind: its next admission takes them over.
        """
        return self.ledger.run(_held_flow(tenant_id, user_id, self._clock()))

    async def aheld(self, tenant_id: str, user_id: str | None = None) -> dict[str, int]:
        """Unexpired leases by state (async)."""
        return await self.ledger.arun(_held_flow(tenant_id, user_id, self._clock()))


_FREED: weakref.WeakKeyDictionary[Ledger, int] = weakref.WeakKeyDictionary()
_FREED_LOCK = threading.Lock()


def _free(ledger: Ledger) -> None:
    """Count a lease of `ledger` that left: this process's queued runs ask at once."""
    with _FREED_LOCK:
        _FREED[ledger] = _FREED.get(ledger, 0) + 1


def _freed(ledger: Ledger) -> int:
    """How many leases of `ledger` this process has seen leave (a change means: ask now)."""
    return _FREED.get(ledger, 0)


def _why(state: str, context: RunContext, policy: AdmissionPolicy) -> str:
    if state == "queued":
        return (
            f"no run slot of tenant {context.tenant_id!r} came free within "
            f"{policy.queue_timeout_s:g} s in the queue"
        )
    whose = (
        f"user {context.user_id!r} of tenant {context.tenant_id!r}"
        if state == "user"
        else f"tenant {context.tenant_id!r}"
    )
    running = policy.user_running if state == "user" else policy.tenant_running
    queued = policy.user_queued if state == "user" else policy.tenant_queued
    return f"{whose} has {running} run(s) running and {queued} queued, its caps"


def _lock_scopes(context: RunContext, now: float) -> Flow[None]:
    """Lock the tenant's and the user's scope rows (in that order), drop expired leases."""
    for key in (f"tenant:{context.tenant_id}", f"user:{context.key(':')}"):
        yield (
            "INSERT INTO keel_admission_scopes (scope_key) VALUES (?) ON CONFLICT DO NOTHING",
            (key,),
        )
        yield "SELECT scope_key FROM keel_admission_scopes WHERE scope_key = ? {for_update}", (key,)
    yield (
        f"DELETE FROM {ADMISSION_LEASES.name} WHERE tenant_id = ? AND expires_at <= ?",
        (context.tenant_id, now),
    )


def _counts(context: RunContext, lease_id: str | None = None) -> Flow[dict[str, int]]:
    """Running and queued leases of the tenant and of the user, but `lease_id`'s own.

    `*_ahead`: the queued ones that came before `lease_id` (by arrival); `mine`: 1 while
    `lease_id` is still in the table.
    """
    rows = yield from _leases_of(context.tenant_id)
    mine = next((r for r in rows if r[3] == lease_id), None)
    out = {"tenant_running": 0, "tenant_queued": 0, "user_running": 0, "user_queued": 0}
    ahead = {"tenant": 0, "user": 0}
    for user, state, at, other in rows:
        if other == lease_id:
            continue
        same_user = user == context.user_id
        out[f"tenant_{state}"] += 1
        if same_user:
            out[f"user_{state}"] += 1
        if mine is not None and state == "queued" and (at, other) < (mine[2], mine[3]):
            ahead["tenant"] += 1
            ahead["user"] += int(same_user)
    out["tenant_ahead"], out["user_ahead"] = ahead["tenant"], ahead["user"]
    out["mine"] = int(mine is not None)
    return out


def _room(policy: AdmissionPolicy, counts: dict[str, int], ahead: bool) -> bool:
    """Whether a run may run now (`ahead`: count the queued runs that came first)."""
    for scope in ("tenant", "user"):
        cap = policy.tenant_running if scope == "tenant" else policy.user_running
        waiting = counts[f"{scope}_ahead"] if ahead else counts[f"{scope}_queued"]
        if cap is not None and counts[f"{scope}_running"] + waiting >= cap:
            return False
    return True


def _leases_of(tenant_id: str) -> Flow[list[tuple[Any, ...]]]:
    """The leases of `tenant_id` (user, state, acquired_at, id), its scope rows locked.

    Those a run of this process left behind (`holders.left`) are deleted and left out: nothing
    will renew or release them.
    """
    rows = yield (
        f"SELECT user_id, state, acquired_at, id, holder FROM {ADMISSION_LEASES.name} "
        "WHERE tenant_id = ?",
        (tenant_id,),
    )
    gone = [row[3] for row in rows if row[4] is not None and holders.left(row[4])]
    if gone:
        marks = ", ".join("?" * len(gone))
        yield f"DELETE FROM {ADMISSION_LEASES.name} WHERE id IN ({marks})", tuple(gone)
    return [row[:4] for row in rows if row[3] not in gone]


def _admit_flow(
    policy: AdmissionPolicy, context: RunContext, lease_id: str, holder: str, now: float
) -> Flow[str]:
    """Take a lease: `running`, `queued`, or the scope (`tenant` / `user`) that is full."""
    yield from _lock_scopes(context, now)
    counts = yield from _counts(context)
    if _room(policy, counts, ahead=False):
        state = "running"
    else:
        for scope, queued in (("tenant", policy.tenant_queued), ("user", policy.user_queued)):
            cap = policy.tenant_running if scope == "tenant" else policy.user_running
            full = cap is not None and counts[f"{scope}_running"] + counts[f"{scope}_queued"] >= cap
            if full and counts[f"{scope}_queued"] >= queued:
                return scope
        state = "queued"
    expires = now + (policy.lease_s if state == "running" else policy.queue_timeout_s + 60)
    yield (
        f"INSERT INTO {ADMISSION_LEASES.name} ({ADMISSION_LEASES.select}) VALUES "
        f"({ADMISSION_LEASES.placeholders()})",
        (lease_id, context.tenant_id, context.user_id, state, now, expires, holder),
    )
    return state


def _promote_flow(
    policy: AdmissionPolicy, context: RunContext, lease_id: str, now: float
) -> Flow[str]:
    """Move a queued lease to running when a slot is free and no earlier queued run waits."""
    yield from _lock_scopes(context, now)
    counts = yield from _counts(context, lease_id)
    if not counts["mine"] or not _room(policy, counts, ahead=True):
        return "queued"
    yield (
        f"UPDATE {ADMISSION_LEASES.name} SET state = 'running', expires_at = ? WHERE id = ?",
        (now + policy.lease_s, lease_id),
    )
    return "running"


_Renew = Callable[[list[str], float], Flow[None]]
"""Pushes the expiry of some leases (by id) to a time, in one transaction."""


class _Renewal:
    """What a renewer renews: leases of one kind (`what`) in `ledger`, `lease_s` past `clock`."""

    def __init__(
        self,
        ledger: Ledger,
        lease_s: float,
        renew: _Renew,
        what: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._ledger, self._lease_s, self._renew, self._what = ledger, lease_s, renew, what
        self._clock = clock
        self._lock = threading.Lock()  # held for a few instructions: fine on an event loop too
        self._fresh()

    def _fresh(self) -> None:
        """Set up what the renewer keeps of its own (none held yet)."""

    def _flow(self, held: list[str]) -> Flow[None]:
        return self._renew(held, self._clock() + self._lease_s)

    def _missed(self, held: list[str], exc: Exception) -> None:
        log.warning("keel could not renew %d %s leases: %s", len(held), self._what, exc)


class _Renewer(_Renewal):
    """The one thread that renews the leases of one kind a ledger's sync runs hold.

    A run adds its lease when it starts and discards it when it ends. Every `lease_s / 3` the
    thread pushes the expiry of every lease held then `lease_s` ahead, in one statement; when
    the last lease is discarded the thread is told to stop (and waited for), and the next run
    starts a new one. So many sync runs at once cost one thread and one statement a beat, not
    a thread and a statement each. A beat that fails (the ledger is down) is skipped: the next
    one tries again, and a lease not renewed in time lapses, as a dead process's does.
    Admission's run leases and the thread leases (`keel.graphs._one_run`) each have their own.
    """

    def _fresh(self) -> None:
        self._held: set[str] = set()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def add(self, lease_id: str) -> None:
        with self._lock:
            self._held.add(lease_id)
            if self._thread is None or not self._thread.is_alive():  # none yet, or forked
                self._stop = threading.Event()
                self._thread = threading.Thread(
                    target=self._beat, args=(self._stop,), name=f"keel-{self._what}-lease",
                    daemon=True,
                )  # fmt: skip
                self._thread.start()

    def discard(self, lease_id: str) -> None:
        """Stop renewing `lease_id`.

        The last lease out stops the thread and waits for it to end (and close its
        connection), so a ledger closed after the runs finds no renewal under way. The thread
        is detached first: a run that starts meanwhile starts a thread of its own, and this
        wait never depends on it.
        """
        with self._lock:
            self._held.discard(lease_id)
            if self._held or self._thread is None:
                return
            thread, stop = self._thread, self._stop
            self._thread = None
        stop.set()
        if thread is not threading.current_thread() and thread.ident is not None:
            thread.join()  # (one whose start failed never ran: nothing to wait for)

    def _beat(self, stop: threading.Event) -> None:
        try:
            while not stop.wait(self._lease_s / 3):
                with self._lock:
                    held = sorted(self._held)
                if not held:
                    continue
                try:
                    self._ledger.run(self._flow(held))
                except Exception as exc:  # a missed renewal shortens the leases
                    self._missed(held, exc)
        finally:
            self._ledger.close_thread()


class _LoopRenewer(_Renewal):
    """The tasks that renew the leases of one kind a ledger's async runs hold: one per loop.

    As `_Renewer` for threads: a run adds its lease when it starts and discards it when it
    ends; every `lease_s / 3` the loop's task pushes every lease held there `lease_s` ahead in
    one statement; the last lease out of a loop cancels its task (and waits for it), and a run
    that starts meanwhile starts a task of its own. A failed beat is logged and the next one
    tries again.
    """

    def _fresh(self) -> None:  # (guarded by the lock: loops may run in threads)
        self._held: dict[asyncio.AbstractEventLoop, set[str]] = {}
        self._tasks: dict[asyncio.AbstractEventLoop, asyncio.Task[None]] = {}

    def add(self, lease_id: str) -> None:
        """Renew `lease_id` from this event loop's task (started if there is none)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            self._held.setdefault(loop, set()).add(lease_id)
            task = self._tasks.get(loop)
            if task is None or task.done():
                self._tasks[loop] = loop.create_task(
                    self._beat(loop), name=f"keel-{self._what}-lease"
                )

    async def discard(self, lease_id: str) -> None:
        """Stop renewing `lease_id`; the loop's last one out stops its task and waits for it."""
        loop = asyncio.get_running_loop()
        with self._lock:
            held = self._held.get(loop)
            if held is None:
                return
            held.discard(lease_id)
            if held:
                return
            del self._held[loop]
            task = self._tasks.pop(loop, None)
        if task is not None:
            task.cancel()
            await asyncio.wait((task,))  # a cancellation of this run still reaches it

    async def _beat(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            await asyncio.sleep(self._lease_s / 3)
            with self._lock:
                held = sorted(self._held.get(loop, ()))
            if not held:
                continue
            try:
                await self._ledger.arun(self._flow(held))
            except Exception as exc:  # a missed renewal shortens the leases
                self._missed(held, exc)


def _renew_rows(table: str, column: str, ids: list[str], expires_at: float) -> Flow[None]:
    """Push the expiry of the leases of `table` whose `column` is one of `ids`."""
    for start in range(0, len(ids), _RENEWED_AT_ONCE):
        some = ids[start : start + _RENEWED_AT_ONCE]
        marks = ", ".join("?" * len(some))
        sql = f"UPDATE {table} SET expires_at = ? WHERE {column} IN ({marks})"
        yield sql, (expires_at, *some)


_RENEWED_AT_ONCE = 500
"""Leases one statement renews (a statement's values stay far below either database's cap)."""
_renew_flow = functools.partial(_renew_rows, ADMISSION_LEASES.name, "id")


def _release_flow(lease_id: str) -> Flow[None]:
    yield f"DELETE FROM {ADMISSION_LEASES.name} WHERE id = ?", (lease_id,)


def _held_flow(tenant_id: str, user_id: str | None, now: float) -> Flow[dict[str, int]]:
    params: tuple[str | float, ...] = (tenant_id, now)
    where = "tenant_id = ? AND expires_at > ?"
    if user_id is not None:
        where += " AND user_id = ?"
        params = (*params, user_id)
    rows = yield (
        f"SELECT state, holder, COUNT(*) FROM {ADMISSION_LEASES.name} WHERE {where} "
        "GROUP BY state, holder",
        params,
    )
    out = {"running": 0, "queued": 0}
    for state, holder, n in rows:  # not those this process left behind: the next run takes them
        if holder is None or not holders.left(holder):
            out[str(state)] = out.get(str(state), 0) + int(n)
    return out
