"""`AsyncPooledPostgresSaver`: LangGraph's async Postgres checkpointer without the global lock.

LangGraph's `AsyncPostgresSaver` takes one `asyncio.Lock` per saver around every database
call, even when it is given a pool, so fifty concurrent runs wait on each other's commits. This
subclass takes a connection from the pool per call instead, and group-commits writes:
`aput` and `aput_writes` from concurrent runs that arrive while a commit is in flight share
the next one (one statement for all three tables), and each returns once its rows are
committed. Reads, migrations, the on-disk format and the serializer are LangGraph's, so a
database written by one saver is read by the other.

It also survives dropped connections (server restarts, idle reaping, `pg_terminate_backend`):
a call that fails on a dead connection runs once more on a fresh one (every write is an
idempotent upsert). Made by `keel.Persistence`, its pool tells a busy pool from a server gone
(`keel.db.pools`): an unreachable server raises `StorageError` within a few connect timeouts, a
pool whose connections all stay busy `SetupError` after the pool's timeout, and a statement
whose reply does not come within the reply timeout fails as a lost connection.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any, ParamSpec, TypeVar

import psycopg
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    WRITES_IDX_MAP,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    get_serializable_checkpoint_metadata,
)
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from langgraph.checkpoint.serde.base import SerializerProtocol
from langgraph.checkpoint.serde.types import _DeltaSnapshot
from psycopg import AsyncConnection, AsyncCursor
from psycopg.rows import DictRow, dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout

from keel.db.checkpoint._batch import Rows, WriteBehind
from keel.errors import SetupError, StorageError, UserError, _one_line

__all__ = ["AsyncPooledPostgresSaver", "connection_lost", "retry_once"]

# One statement writes a whole flush: one round trip and one implicit transaction. Arrays go
# binary (`%b`), as columns of rows. Only the tables that get rows are named (`flush_statement`).
_INSERTS = (
    (  # checkpoint_blobs: inserted, existing ones kept
        """INSERT INTO checkpoint_blobs (thread_id, checkpoint_ns, channel, version, type, blob)
    SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::bytea[])
    ON CONFLICT (thread_id, checkpoint_ns, channel, version) DO NOTHING""",
        6,
    ),
    (  # checkpoints: upserted
        """INSERT INTO checkpoints
        (thread_id, checkpoint_ns, checkpoint_id, parent_checkpoint_id, checkpoint, metadata)
    SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::jsonb[], %b::jsonb[])
    ON CONFLICT (thread_id, checkpoint_ns, checkpoint_id)
    DO UPDATE SET checkpoint = EXCLUDED.checkpoint, metadata = EXCLUDED.metadata""",
        6,
    ),
    (  # checkpoint_writes of plain channels: inserted, existing ones kept
        """INSERT INTO checkpoint_writes
        (thread_id, checkpoint_ns, checkpoint_id, task_id, task_path, idx, channel, type, blob)
    SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::text[],
                         %b::integer[], %b::text[], %b::text[], %b::bytea[])
    ON CONFLICT (thread_id, checkpoint_ns, checkpoint_id, task_id, idx) DO NOTHING""",
        9,
    ),
    (  # checkpoint_writes of special channels (errors, interrupts…): upserted
        """INSERT INTO checkpoint_writes
        (thread_id, checkpoint_ns, checkpoint_id, task_id, task_path, idx, channel, type, blob)
    SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::text[],
                         %b::integer[], %b::text[], %b::text[], %b::bytea[])
    ON CONFLICT (thread_id, checkpoint_ns, checkpoint_id, task_id, idx)
    DO UPDATE SET channel = EXCLUDED.channel, type = EXCLUDED.type, blob = EXCLUDED.blob""",
        9,
    ),
)

_P = ParamSpec("_P")
_T = TypeVar("_T")
_Pool = AsyncConnectionPool[AsyncConnection[DictRow]]


def _retry_once(
    method: Callable[_P, Coroutine[Any, Any, _T]],
) -> Callable[_P, Coroutine[Any, Any, _T]]:
    """Run `method` again on a fresh connection when its connection died under it.

    The pool is drained first: its idle connections likely died with this one, and one
    checked in the last seconds is taken without a new check (`keel.db.persistence`).
    """

    @functools.wraps(method)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return await method(*args, **kwargs)
        except psycopg.OperationalError as exc:
            if not connection_lost(exc):
                raise
        pool = getattr(args[0], "conn", None) if args else None
        if isinstance(pool, AsyncConnectionPool):
            await pool.drain()  # its other idle connections likely died too
        with lost_twice(method.__name__):
            return await method(*args, **kwargs)

    return wrapper


def retry_once(method: Callable[_P, _T]) -> Callable[_P, _T]:
    """`_retry_once` for a sync method (an idempotent upsert or a read)."""

    @functools.wraps(method)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return method(*args, **kwargs)
        except psycopg.OperationalError as exc:
            if not connection_lost(exc):
                raise
        pool = getattr(args[0], "conn", None) if args else None
        if isinstance(pool, ConnectionPool):
            pool.drain()  # its other idle connections likely died too
        with lost_twice(method.__name__):
            return method(*args, **kwargs)

    return wrapper


@contextmanager
def lost_twice(what: str) -> Iterator[None]:
    """A connection lost again on the retry of `what`, as `StorageError`."""
    try:
        yield
    except psycopg.OperationalError as exc:
        if not connection_lost(exc):
            raise
        raise StorageError(
            f"the checkpointer lost its PostgreSQL connection twice in {what}: {_one_line(exc)}",
            fix="Nothing is half-written (its writes are idempotent upserts); resume the run "
            "once the database is reachable.",
        ) from exc


def connection_lost(exc: BaseException) -> bool:
    """Whether `exc` means the connection is gone (not e.g. a statement timeout).

    A pool that gave no connection within its timeout (`PoolTimeout`) lost none: a retry would
    wait as long again (a run on a server gone down took twice the pool's timeout to end).
    """
    if not isinstance(exc, psycopg.OperationalError) or isinstance(exc, PoolTimeout):
        return False
    return exc.sqlstate is None or exc.sqlstate.startswith(("08", "57P"))


class AsyncPooledPostgresSaver(AsyncPostgresSaver):
    """An `AsyncPostgresSaver` that takes a pool connection per call, without a global lock.

    It reads and writes the same tables as LangGraph's saver (run `setup()` once, or let
    `keel.Persistence` do it). Make the pool with `autocommit=True`, `row_factory=dict_row`
    and a `check` callback (`AsyncConnectionPool.check_connection`) so dead connections are
    replaced when they are taken; `keel.Persistence(url).acheckpointer()` does all of this.

    Args:
        pool: An open `psycopg_pool.AsyncConnectionPool` of autocommit, `dict_row` connections.
        serde: The serializer (LangGraph's `JsonPlusSerializer` by default).
        max_flushes: Group commits that may run at once. Writes that arrive meanwhile wait
            for the next one, so with 1 (the default, fastest in `bench/concurrency.py`)
            fifty concurrent runs share a few commits per superstep.

    Example:
        ```python
        from keel import Persistence

        async with Persistence("postgresql://postgres@127.0.0.1/app").acheckpointer() as saver:
            graph = builder.compile(checkpointer=saver)
        ```
    """

    conn: _Pool

    def __init__(
        self, pool: _Pool, *, serde: SerializerProtocol | None = None, max_flushes: int = 1
    ) -> None:
        if not isinstance(pool, AsyncConnectionPool):
            raise UserError(
                "AsyncPooledPostgresSaver(pool) needs a psycopg_pool.AsyncConnectionPool, got "
                f"{type(pool).__name__}. For one connection use LangGraph's AsyncPostgresSaver."
            )
        if not isinstance(max_flushes, int) or isinstance(max_flushes, bool) or max_flushes < 1:
            raise UserError(f"max_flushes must be an integer >= 1, got {max_flushes!r}.")
        super().__init__(pool, serde=serde)
        self._writer = WriteBehind(self._flush, max_in_flight=max_flushes)

    @asynccontextmanager
    async def _cursor(self, *, pipeline: bool = False) -> AsyncIterator[AsyncCursor[DictRow]]:
        """A cursor on a connection of its own: no lock, so calls run side by side."""
        try:
            async with self.conn.connection() as conn:
                if pipeline and self.supports_pipeline:
                    async with (
                        conn.pipeline(),
                        conn.cursor(binary=True, row_factory=dict_row) as cur,
                    ):
                        yield cur
                else:
                    async with conn.cursor(binary=True, row_factory=dict_row) as cur:
                        yield cur
        except PoolTimeout as exc:
            raise SetupError(
                f"no PostgreSQL connection for the checkpointer within {self.conn.timeout:g} s "
                f"(pool {self.conn.name!r}): {exc}. Is the server up and reachable? "
                "The checkpoint was not saved or read; retry the run once it is."
            ) from exc

    @_retry_once
    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        """`AsyncPostgresSaver.aget_tuple`, retried once on a dropped connection."""
        return await super().aget_tuple(config)

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        """Save a checkpoint (as `AsyncPostgresSaver.aput`), committed with others' writes."""
        rows, next_config = self._checkpoint_rows(config, checkpoint, metadata, new_versions)
        await self._writer.write(rows)
        return next_config

    async def aput_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        """Save a task's writes (as `AsyncPostgresSaver.aput_writes`), group-committed."""
        conf = config["configurable"]
        dumped = self._dump_writes(
            conf["thread_id"], conf["checkpoint_ns"], conf["checkpoint_id"], task_id, task_path,
            writes,
        )  # fmt: skip
        special = all(channel in WRITES_IDX_MAP for channel, _ in writes)
        rows = Rows(writes_upsert=dumped) if special else Rows(writes_insert=dumped)
        await self._writer.write(rows)

    def _checkpoint_rows(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> tuple[Rows, RunnableConfig]:
        """The blob and checkpoint rows `AsyncPostgresSaver.aput` writes, and its return value."""
        conf = config["configurable"]
        thread_id, ns = conf["thread_id"], conf["checkpoint_ns"]
        inline, blobs = _split_channel_values(checkpoint["channel_values"])
        stored = {**checkpoint, "channel_values": inline}
        row = (
            thread_id, ns, checkpoint["id"], conf.get("checkpoint_id"), Jsonb(stored),
            Jsonb(get_serializable_checkpoint_metadata(config, metadata)),
        )  # fmt: skip
        versions = {k: v for k, v in new_versions.items() if k in blobs}
        rows = Rows(blobs=self._dump_blobs(thread_id, ns, blobs, versions), checkpoints=[row])
        next_config: RunnableConfig = {
            "configurable": {"thread_id": thread_id, "checkpoint_ns": ns,
                             "checkpoint_id": checkpoint["id"]}
        }  # fmt: skip
        return rows, next_config

    @_retry_once
    async def _flush(self, rows: Rows) -> None:
        """Write merged rows in one statement (so one transaction and one round trip)."""
        if (statement := _flush_statement(rows)) is not None:
            async with self._cursor() as cur:
                await cur.execute(*statement, prepare=False)


def _split_channel_values(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(inlined in the checkpoint's JSON, stored as blobs), as `AsyncPostgresSaver` splits them."""
    inline: dict[str, Any] = {}
    blobs: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, _DeltaSnapshot):
            blobs[key], inline[key] = value, True
        elif value is None or isinstance(value, str | int | float | bool):
            inline[key] = value
        else:
            blobs[key] = value
    return inline, blobs


def _flush_statement(rows: Rows) -> tuple[str, list[list[Any]]] | None:
    """One statement writing `rows`, and its parameters: each table's rows as columns.

    `None` when there is nothing to write. Upserts get one row per key, the last (a statement
    may not update a row twice), and a special write shadows a plain write with its key, as
    when LangGraph's saver upserts it. A table without rows is not named, so the statement
    neither plans nor locks it.
    """
    checkpoints = {row[:3]: row for row in rows.checkpoints}
    upserts = {_write_key(row): row for row in rows.writes_upsert}
    plain = [row for row in rows.writes_insert if _write_key(row) not in upserts]
    tables = (rows.blobs, list(checkpoints.values()), plain, list(upserts.values()))
    written = tuple(i for i, table in enumerate(tables) if table)
    if not written:
        return None
    params: list[list[Any]] = []
    for i in written:
        params += [list(col) for col in zip(*tables[i], strict=True)]
    return _statement(written), params


@functools.lru_cache(maxsize=16)
def _statement(written: tuple[int, ...]) -> str:
    """The inserts of the tables `written` (indexes into `_INSERTS`) as one statement."""
    *first, last = (_INSERTS[i][0] for i in written)
    if not first:
        return last
    ctes = ", ".join(f"w{n} AS (\n    {sql}\n)" for n, sql in enumerate(first))
    return f"WITH {ctes}\n{last}"


def _write_key(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """A `checkpoint_writes` row's primary key: thread, namespace, checkpoint, task, idx."""
    return (*row[:4], row[5])
