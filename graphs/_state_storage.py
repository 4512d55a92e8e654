"""A thread's state read or updated while the checkpointer's database is down.

`get_state`, `get_state_history`, `update_state` and `bulk_update_state` (and their async
twins) of keel's graphs raise `keel.StorageError`, chained to the driver's error
(`sqlite3.Error`, `psycopg.Error`), rather than that error as it is: its message says what
failed, whether anything was written and what to do. keel's own refusals (`UserError`) raise as
they are.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import TypeVar

from langchain_core.runnables import RunnableConfig

from keel._drive import Steps
from keel.errors import StorageError, _one_line
from keel.graphs._storage import DATABASE_ERRORS

__all__ = [
    "IN_DOUBT",
    "READ",
    "UNWRITTEN",
    "ahistory_kept",
    "history_kept",
    "read_kept",
    "state_error",
]

T = TypeVar("T")

READ = "Nothing was changed; read it again once the database is back."
UNWRITTEN = "Nothing was written; send the update again once the database is back."
IN_DOUBT = (
    "The update may not have been written, or only in part: read the thread's state "
    "(get_state) once the database is back before sending it again."
)


def state_error(
    exc: BaseException, config: RunnableConfig | None, what: str, then: str
) -> StorageError:
    """`exc` as a `keel.StorageError` saying `what` failed and `then` (chain it `from exc`)."""
    thread = ((config or {}).get("configurable") or {}).get("thread_id")
    text = _one_line(exc)
    return StorageError(
        f"keel could not {what} of thread {thread!r}: the checkpointer's database failed "
        f"({type(exc).__name__}: {text}). {then}"
    )


def read_kept(steps: Steps[T], config: RunnableConfig | None, what: str, then: str) -> Steps[T]:
    """`steps`, a database error raised as `state_error(exc, config, what, then)`."""
    try:
        return (yield from steps)
    except DATABASE_ERRORS as exc:
        raise state_error(exc, config, what, then) from exc


def history_kept(states: Iterator[T], config: RunnableConfig | None) -> Iterator[T]:
    """`get_state_history`'s states, a database error raised as a `StorageError`."""
    try:
        yield from states
    except DATABASE_ERRORS as exc:
        raise state_error(exc, config, "read the state history", READ) from exc


async def ahistory_kept(
    states: AsyncIterator[T], config: RunnableConfig | None
) -> AsyncIterator[T]:
    """`aget_state_history`'s states, as `history_kept`."""
    try:
        async for state in states:
            yield state
    except DATABASE_ERRORS as exc:
        raise state_error(exc, config, "read the state history", READ) from exc
