"""keel._drive: a cancelled or interrupted step closes the steps at once (their cleanup runs)."""

from __future__ import annotations

import asyncio
import contextvars

import pytest

from keel._drive import Op, Steps, adrive, drive, finishing

_SCOPE: contextvars.ContextVar[str | None] = contextvars.ContextVar("scope", default=None)


def _scoped(log: list[str], op: Op) -> Steps[None]:
    token = _SCOPE.set("open")
    try:
        yield op
    finally:
        _SCOPE.reset(token)
        log.append("closed")


async def test_a_cancelled_step_closes_the_steps_in_the_callers_context() -> None:
    log: list[str] = []
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    async def node() -> str | None:
        try:
            await adrive(_scoped(log, Op(lambda: None, forever)))
        except asyncio.CancelledError:
            return _SCOPE.get()  # the scope the steps opened was closed before this
        return "not cancelled"

    task = asyncio.create_task(node())
    await started.wait()
    task.cancel()
    assert await task is None
    assert log == ["closed"]


def test_an_interrupted_step_closes_the_steps() -> None:
    log: list[str] = []

    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        drive(_scoped(log, Op(interrupted, interrupted)))
    assert log == ["closed"]
    assert _SCOPE.get() is None


def test_a_failing_step_is_thrown_into_the_steps() -> None:
    def failing() -> Steps[str]:
        try:
            yield Op(lambda: 1 / 0, lambda: asyncio.sleep(0))
        except ZeroDivisionError:
            return "caught"
        return "not raised"

    assert drive(failing()) == "caught"


async def test_finishing_runs_its_work_to_the_end_through_repeated_cancellations() -> None:
    """The task is cancelled three times while its cleanup runs (as anyio's cancel scopes do):
    the cleanup still finishes before the task ends, and the task ends cancelled."""
    done: list[str] = []
    started = asyncio.Event()

    async def cleanup() -> str:
        started.set()
        for step in ("a", "b", "c"):
            await asyncio.sleep(0.01)
            done.append(step)
        return "released"

    task = asyncio.create_task(finishing(cleanup()))
    await started.wait()
    for _ in range(3):
        task.cancel()
        await asyncio.sleep(0)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert done == ["a", "b", "c"]
    assert await finishing(cleanup()) == "released"  # not cancelled: its result
