"""Group commit for checkpoint writes: many concurrent `aput`s share one transaction.

Each writer hands over its rows and waits until they are committed, so a write is as durable
as before when the call returns. Writes that arrive while a flush is in flight are gathered
into the next flush: the busier the database, the bigger the batch, and the fewer statements
and commits per checkpoint. A flush that fails for a reason other than a lost connection is
retried row group by row group, so one bad write fails only its own caller.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Rows", "WriteBehind"]


@dataclass(slots=True)
class Rows:
    """Rows for LangGraph's three tables, as `AsyncPostgresSaver` would insert them."""

    blobs: list[tuple[Any, ...]] = field(default_factory=list)
    """`checkpoint_blobs` rows: inserted, existing ones kept."""
    checkpoints: list[tuple[Any, ...]] = field(default_factory=list)
    """`checkpoints` rows: upserted."""
    writes_upsert: list[tuple[Any, ...]] = field(default_factory=list)
    """`checkpoint_writes` rows of special channels (errors, interrupts…): upserted."""
    writes_insert: list[tuple[Any, ...]] = field(default_factory=list)
    """Other `checkpoint_writes` rows: inserted, existing ones kept."""

    def extend(self, other: Rows) -> None:
        """Append another writer's rows."""
        self.blobs += other.blobs
        self.checkpoints += other.checkpoints
        self.writes_upsert += other.writes_upsert
        self.writes_insert += other.writes_insert


Flush = Callable[[Rows], Awaitable[None]]


class WriteBehind:
    """Gathers `Rows` from concurrent writers and commits them in shared flushes.

    Args:
        flush: Writes merged rows in one transaction (and retries a lost connection itself).
        max_in_flight: Flushes that may run at once (each holds one pool connection).
    """

    def __init__(self, flush: Flush, *, max_in_flight: int) -> None:
        self._flush = flush
        self._max_in_flight = max_in_flight
        self._in_flight = 0
        self._queue: list[tuple[Rows, asyncio.Future[None]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def write(self, rows: Rows) -> None:
        """Return once `rows` are committed; raise what their flush raised."""
        future = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieve)  # no "never retrieved" log if the caller left
        self._queue.append((rows, future))
        self._start_flush()
        await future  # cancelling a caller cancels only its own future, not the flush

    def _start_flush(self) -> None:
        if not self._queue or self._in_flight >= self._max_in_flight:
            return
        batch, self._queue = self._queue, []
        self._in_flight += 1
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[Rows, asyncio.Future[None]]]) -> None:
        try:
            merged = Rows()
            for rows, _ in batch:
                merged.extend(rows)
            try:
                await self._flush(merged)
            except Exception as exc:
                if len(batch) == 1:
                    _settle(batch[0][1], exc)
                    return
                await self._one_by_one(batch)  # isolate the bad write
                return
            for _, future in batch:
                _settle(future, None)
        finally:
            for _, future in batch:  # only when cancelled: the loop is closing
                _settle(future, RuntimeError("the checkpoint write was cancelled"))
            self._in_flight -= 1
            self._start_flush()

    async def _one_by_one(self, batch: list[tuple[Rows, asyncio.Future[None]]]) -> None:
        for rows, future in batch:
            try:
                await self._flush(rows)
            except Exception as exc:
                _settle(future, exc)
            else:
                _settle(future, None)


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
