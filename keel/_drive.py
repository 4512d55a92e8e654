"""One sync/async driver: a decision yields I/O steps; `drive` and `adrive` run them.

keel writes each piece of logic that does I/O (a model call with its ledger bookkeeping, an
at-most-once tool call, a review's ledger writes) once, as a generator that yields `Op`s and is
sent each one's result, the pattern of tenacity's `iter()` / `DoAttempt` and httpx's
`auth_flow`. `drive` runs the steps with the sync half of each `Op`, `adrive` with the async
half, so `invoke` and `ainvoke` cannot drift apart.

```python
from keel._drive import Op, Steps, adrive, drive


def double(x: int) -> Steps[int]:
    got = yield Op(lambda: x, lambda: _value(x))  # I/O: a sync and an async way to do it
    return got * 2


async def _value(x: int) -> int:
    return x


assert drive(double(2)) == 4
```

A step ended by a `BaseException` that is not an `Exception` (a cancelled task, Ctrl-C) closes
the generator before it propagates, so its `finally` blocks and `with` exits run then, in the
caller's context, not whenever the generator is collected.

`finishing(work)` awaits what a run must do as it ends (give its thread's lease back, record
how it ended) to its end, even while the run's task is cancelled again and again, then raises
the cancellation.

An `Op` may name `on_error`, which turns its own failure into the exception thrown back into
the generator (a ledger write's database error becomes a storage failure, say).

`calls(flow, fn)` runs a generator that yields plain requests (the retention pruner's SQL
statements) under both drivers, `fn` running each one. `call(fn, ...)` is also the step for a
method of an object that is sync in one driver and async in the other: a psycopg cursor's
`execute` / `fetchall` (the ledger's transactions, the checkpoint schema check), a LangChain
middleware's `handler`.

`retrying(retrying, attempt)` runs tenacity's own decision engine (`Retrying.iter`: attempt,
sleep, stop) over an attempt written as steps, so model and tool retries keep tenacity's
stop / wait / retry objects and still run under both drivers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Generator
from contextlib import closing
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from tenacity import DoAttempt, DoSleep, RetryCallState, Retrying

__all__ = [
    "Op",
    "Steps",
    "adrive",
    "both",
    "call",
    "calls",
    "drive",
    "finishing",
    "retrying",
    "sleep",
]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Op:
    """One I/O step: how to do it synchronously (`run`) and on the event loop (`arun`)."""

    run: Callable[[], Any]
    arun: Callable[[], Awaitable[Any]]
    on_error: Callable[[Exception], Exception] | None = None
    """Turns this step's own exception into the one the generator sees (default: as is)."""


Steps = Generator[Op, Any, T]
"""A decision written once: yields `Op`s, is sent their results, returns its value."""


@dataclass(frozen=True, slots=True)
class _Done:
    value: Any


def _next(steps: Steps[Any], sent: Any, error: Exception | None) -> Op | _Done:
    try:
        return steps.send(sent) if error is None else steps.throw(error)
    except StopIteration as done:
        return _Done(done.value)


def _failed(op: Op, exc: Exception) -> Exception:
    return op.on_error(exc) if op.on_error is not None else exc


def drive(steps: Steps[T]) -> T:
    """Run `steps` synchronously; an `Op`'s exception is thrown back into the generator."""
    with closing(steps):  # cancelled or interrupted: the steps' `finally` blocks run now
        sent: Any = None
        error: Exception | None = None
        while True:  # `_next` inlined: the hot path of every guard and ledger call
            try:
                op = steps.send(sent) if error is None else steps.throw(error)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            if not isinstance(op, Op):  # as before: a step that is no `Op` ends the drive
                return op.value  # type: ignore[unreachable]
            try:
                sent, error = op.run(), None
            except Exception as exc:
                sent, error = None, _failed(op, exc)


async def adrive(steps: Steps[T]) -> T:
    """Run `steps` on the event loop; see `drive`."""
    with closing(steps):  # cancelled or interrupted: the steps' `finally` blocks run now
        op = _next(steps, None, None)
        while isinstance(op, Op):
            try:
                sent, error = await op.arun(), None
            except Exception as exc:
                sent, error = None, _failed(op, exc)
            op = _next(steps, sent, error)
        return op.value  # type: ignore[no-any-return]


async def finishing(work: Awaitable[T]) -> T:
    """Await `work` to its end even while the awaiting task is cancelled, once or many times.

    For what a run must do as it ends (give its thread's lease back, record how it ended):
    anyio's cancel scopes (FastAPI, Starlette) cancel a task again at each await until it
    leaves the scope, and `asyncio.shield` alone only lets the shielded work go on unawaited,
    after the run is over and the app may have closed the ledger under it. The first
    cancellation that arrived meanwhile is raised once `work` has finished (its own result or
    error is then dropped: the task was cancelled).
    """
    task = asyncio.ensure_future(work)
    cancelled: asyncio.CancelledError | None = None
    while not task.done():
        try:
            await asyncio.wait((task,))
        except asyncio.CancelledError as exc:
            cancelled = cancelled or exc
    if cancelled is not None:
        if not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved" warning
        raise cancelled
    return task.result()


def both(run: Callable[..., Any], arun: Callable[..., Awaitable[Any]], *args: Any) -> Op:
    """`run(*args)` / `arun(*args)` as an `Op` (e.g. `both(ledger.run, ledger.arun, flow)`)."""
    return Op(partial(run, *args), partial(arun, *args))


def call(fn: Callable[..., Any], *args: Any) -> Op:
    """`fn(*args)` as an `Op`, for a `fn` that is sync under `drive`, async under `adrive`.

    A LangChain middleware's `handler` is one: `wrap_*` gets a sync one, `awrap_*` an async one.
    """
    return Op(partial(fn, *args), partial(fn, *args))


def calls(
    flow: Generator[Any, Any, T],
    fn: Callable[[Any], Any],
    catch: tuple[type[Exception], ...] = (),
) -> Steps[T]:
    """`flow`, a generator that yields requests for `fn`, as steps: each one `call(fn, request)`.

    A database flow yields its statements this way, and `fn` runs one on the connection at
    hand (sync under `drive`, async under `adrive`). An exception of a type in `catch` is thrown
    into `flow`, which decides; any other ends the steps (`flow` is left where it was).
    """
    sent: Any = None
    error: Exception | None = None
    while True:
        try:
            request = flow.send(sent) if error is None else flow.throw(error)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        try:
            sent, error = (yield call(fn, request)), None
        except catch as exc:
            sent, error = None, exc


def sleep(seconds: float) -> Op:
    """Wait `seconds` (`time.sleep` / `asyncio.sleep`)."""
    return Op(lambda: time.sleep(seconds), lambda: asyncio.sleep(seconds))


def retrying(policy: Retrying, attempt: Callable[[], Steps[T]]) -> Steps[T]:
    """`attempt()` under tenacity's `policy` (its `iter()` engine), as steps.

    Each attempt runs as steps; tenacity decides, from the attempt's result or exception,
    whether to retry, how long to wait (a `sleep` step), and when to stop. Give a fresh copy
    of `policy` per call (`policy.copy()`): its `statistics["attempt_number"]` then counts
    this call's attempts. With `reraise=True` the last exception is raised when it stops.
    """
    policy.begin()
    state = RetryCallState(policy, fn=None, args=(), kwargs={})
    while True:
        do = policy.iter(state)
        if isinstance(do, DoAttempt):
            try:
                result = yield from attempt()
            except Exception as exc:
                state.set_exception((type(exc), exc, exc.__traceback__))
            else:
                state.set_result(result)
        elif isinstance(do, DoSleep):
            state.prepare_for_next_attempt()
            yield sleep(float(do))
        else:
            return do  # type: ignore[no-any-return]
