"""Strict checkpoints: every value in state must round-trip, and a checkpoint has a size limit.

LangGraph's serializer stores an object of any class (by module and name) and, on load, only
warns that "unregistered" classes will be blocked in a future version (or blocks them with
`LANGGRAPH_STRICT_MSGPACK`); an object it cannot encode fails with `Object of type X is not
serializable`, naming no place. keel's savers check state *before* writing: a value of a type
that would not load back fails with `UnserializableState` naming its path in state
(`messages[3].additional_kwargs['order']`). They also count the bytes of each checkpoint and
warn (`CheckpointSizeWarning`) or refuse (`CheckpointTooLarge`) past `CheckpointPolicy.max_bytes`.

The savers are LangGraph's (SQLite, PostgreSQL) and keel's `AsyncPooledPostgresSaver` with the
`_Strict` mixin; `keel.Persistence` builds them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import warnings
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal

import aiosqlite
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
)
from langgraph.checkpoint.postgres import PostgresSaver
from langgraph.checkpoint.serde._msgpack import SAFE_MSGPACK_TYPES
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from pydantic import BaseModel

from keel._drive import Op, Steps, adrive, both, drive
from keel.db.checkpoint.postgres import AsyncPooledPostgresSaver, retry_once
from keel.db.checkpoint.saved import SaveWatch, checkpoint_key, newest_message, request_key
from keel.errors import (
    CheckpointSizeWarning,
    CheckpointTooLarge,
    UnserializableState,
    UserError,
)
from keel.state import storable_ids

__all__ = [
    "CheckpointPolicy",
    "CheckpointSizeWarning",
    "CheckpointTooLarge",
    "UnserializableState",
    "find_unserializable",
]

_NATIVE = (str, int, float, bool, bytes, bytearray, type(None))
_INTERNAL = frozenset({("langgraph.checkpoint.serde.types", "_DeltaSnapshot")})
_LEAVES: frozenset[tuple[str, str]] = frozenset(
    k
    for k in SAFE_MSGPACK_TYPES
    if len(k) == 2 and not k[0].startswith(("langchain_core.", "langgraph."))
)
"""Classes that survive inside a pydantic model's `model_dump()` (datetime, UUID, …)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class CheckpointPolicy:
    """What keel's checkpointers accept.

    Example:
        ```python
        Persistence(url, checkpoints=CheckpointPolicy(max_bytes=512_000, on_oversize="refuse"))
        ```
    """

    max_bytes: int | None = 1_000_000
    """The serialized size one checkpoint may reach (its state blobs, before compression);
    `None` disables the check."""
    on_oversize: Literal["warn", "refuse"] = "warn"
    """`warn`: save it and emit `CheckpointSizeWarning`; `refuse`: raise `CheckpointTooLarge`
    and save nothing."""
    strict: bool = True
    """Refuse values whose type would not load back (see `find_unserializable`)."""
    allow: tuple[type, ...] = field(default=())
    """Your own classes that may be stored in state (and are loaded back without warnings)."""

    def __post_init__(self) -> None:
        if self.max_bytes is not None and (
            isinstance(self.max_bytes, bool)
            or not isinstance(self.max_bytes, int)
            or self.max_bytes < 1
        ):
            raise UserError(
                f"CheckpointPolicy.max_bytes must be 1 or more (bytes) or None, got "
                f"{self.max_bytes!r}."
            )
        if self.on_oversize not in ("warn", "refuse"):
            raise UserError(
                f"CheckpointPolicy.on_oversize must be 'warn' or 'refuse', got "
                f"{self.on_oversize!r}."
            )
        if not all(isinstance(t, type) for t in self.allow):
            raise UserError(
                f"CheckpointPolicy.allow must be a tuple of classes, got {self.allow!r}."
            )

    def allowed(self) -> frozenset[tuple[str, str]]:
        """`(module, name)` of every class that may be stored."""
        own = {(t.__module__, t.__qualname__) for t in self.allow}
        return frozenset({*(k for k in SAFE_MSGPACK_TYPES if len(k) == 2), *_INTERNAL, *own})


def find_unserializable(
    value: Any, allowed: frozenset[tuple[str, str]], path: str = ""
) -> tuple[str, str] | None:
    """The first value under `value` whose class would not load back: `(path, module.Name)`."""
    found = _find(value, allowed)
    if found is None:
        return None
    steps, name = found
    return path + "".join(reversed(steps)) or "the value", name


_Found = tuple[list[str], str]
"""What `_find` found: the path's steps, innermost first (built only on the way out), and
the class."""


def _find(value: Any, allowed: frozenset[tuple[str, str]]) -> _Found | None:
    if isinstance(value, _NATIVE):
        return None
    if isinstance(value, Mapping):
        for key, item in value.items():
            if (found := _find(item, allowed)) is not None:
                found[0].append(f"[{key!r}]")
                return found
        return None
    if type(value) in (list, tuple, set, frozenset):
        for i, item in enumerate(value):
            if (found := _find(item, allowed)) is not None:
                found[0].append(f"[{i}]")
                return found
        return None
    if isinstance(value, BaseException):
        return None  # stored as its repr (LangGraph's error writes)
    cls = type(value)
    if (cls.__module__, cls.__qualname__) not in allowed:
        return [], f"{cls.__module__}.{cls.__qualname__}"
    return _find_in_fields(value, allowed)


def _find_in_fields(value: Any, allowed: frozenset[tuple[str, str]]) -> _Found | None:
    if isinstance(value, BaseModel):
        # LangGraph stores a pydantic model as its `model_dump()`: a class inside one (a
        # dataclass in `additional_kwargs`) comes back as a dict, so only safe leaves pass
        fields: Mapping[str, Any] = value.__dict__
        allowed = _LEAVES
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    else:
        return None
    for name, item in fields.items():
        if (found := _find(item, allowed)) is not None:
            found[0].append(f".{name}")
            return found
    return None


# -- counting the bytes of one checkpoint -----------------------------------------------------


@dataclass(slots=True)
class _Tally:
    thread_id: str
    limit: int
    refuse: bool
    size: int = 0

    def add(self, n: int) -> None:
        self.size += n
        if self.refuse and self.size > self.limit:
            raise CheckpointTooLarge(self.thread_id, self.size, self.limit)


_TALLY: ContextVar[_Tally | None] = ContextVar("keel_checkpoint_tally", default=None)


class StrictSerializer(JsonPlusSerializer):
    """LangGraph's serializer that loads keel's allowed classes and counts checkpoint bytes."""

    def __init__(self, policy: CheckpointPolicy) -> None:
        # strict loading: LangGraph's safe types and the policy's classes, nothing else
        super().__init__(allowed_msgpack_modules=policy.allow or None)

    def dumps_typed(self, obj: Any) -> tuple[str, bytes]:
        """Serialize as LangGraph does, adding the bytes to the checkpoint being written."""
        kind, data = super().dumps_typed(obj)
        tally = _TALLY.get()
        if tally is not None:
            tally.add(len(data))
        return kind, data


class _Strict:
    """Mixin for a saver: check state before a checkpoint or a write is stored."""

    keel_policy: CheckpointPolicy = CheckpointPolicy()
    _keel_allowed: frozenset[tuple[str, str]] = CheckpointPolicy().allowed()

    keel_saves: SaveWatch
    """The checkpoints this saver saved or loaded (`keel.db.checkpoint.saved`)."""

    def _keel_configure(self, policy: CheckpointPolicy) -> None:
        self.keel_policy = policy
        self._keel_allowed = policy.allowed()
        self.keel_saves = SaveWatch()

    def _keel_check(self, values: Mapping[str, Any], channels: Sequence[str]) -> None:
        if not self.keel_policy.strict:
            return
        for channel in channels:
            if channel in values:
                found = find_unserializable(values[channel], self._keel_allowed, channel)
                if found is not None:
                    raise UnserializableState(*found)

    @contextmanager
    def _keel_checkpoint(
        self, config: RunnableConfig, checkpoint: Checkpoint, new_versions: ChannelVersions
    ) -> Iterator[None]:
        self._keel_check(checkpoint["channel_values"], list(new_versions))
        limit = self.keel_policy.max_bytes
        if limit is None:
            yield
            return
        thread_id = str((config.get("configurable") or {}).get("thread_id", ""))
        tally = _Tally(thread_id, limit, self.keel_policy.on_oversize == "refuse")
        token = _TALLY.set(tally)
        try:
            yield
        finally:
            _TALLY.reset(token)
        if tally.size > limit:
            warnings.warn(
                CheckpointTooLarge.describe(thread_id, tally.size, limit, "was saved"),
                CheckpointSizeWarning,
                stacklevel=4,
            )

    def put(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        """Check, count, then save a checkpoint."""
        save = both(super().put, super().aput, config, checkpoint, metadata, new_versions)  # type: ignore[misc]
        return drive(self._keel_put(config, checkpoint, new_versions, save))

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        """Check, count, then save a checkpoint."""
        save = both(super().put, super().aput, config, checkpoint, metadata, new_versions)  # type: ignore[misc]
        return await adrive(self._keel_put(config, checkpoint, new_versions, save))

    def _keel_put(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        new_versions: ChannelVersions,
        save: Op,
    ) -> Steps[RunnableConfig]:
        """`put` / `aput` once: check and count around `save` (the saver's own), then note it."""
        with self._keel_checkpoint(config, checkpoint, new_versions):
            saved: RunnableConfig = yield save
        self._keel_saved(saved, checkpoint)
        return saved

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        """Load a checkpoint (noted as saved)."""
        storable_ids(config)
        return self._keel_loaded(super().get_tuple(config))  # type: ignore[misc]

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        """Load a checkpoint (noted as saved)."""
        storable_ids(config)
        return self._keel_loaded(await super().aget_tuple(config))  # type: ignore[misc]

    def list(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> Iterator[CheckpointTuple]:
        """The thread's checkpoints, newest first, once its ids can be stored (`storable_ids`)."""
        storable_ids(config)
        return super().list(config, filter=filter, before=before, limit=limit)  # type: ignore[misc,no-any-return]

    def alist(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]:
        """`list` under `ainvoke`."""
        storable_ids(config)
        return super().alist(config, filter=filter, before=before, limit=limit)  # type: ignore[misc,no-any-return]

    def _keel_loaded(self, found: CheckpointTuple | None) -> CheckpointTuple | None:
        """`found` (a loaded checkpoint, or None), noted as saved."""
        if found is not None:
            self._keel_saved(found.config, found.checkpoint)
        return found

    def _keel_saved(self, config: RunnableConfig, checkpoint: Checkpoint) -> None:
        watch = getattr(self, "keel_saves", None)
        if watch is not None:
            watch.saved(checkpoint_key(config))
            # the model's request it holds, if its newest message is one
            watch.saved(request_key(config, newest_message(checkpoint["channel_values"])))

    def put_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        """Check, then save a task's writes."""
        self._keel_check_writes(writes)
        super().put_writes(config, writes, task_id, task_path)  # type: ignore[misc]

    async def aput_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        """Check, then save a task's writes."""
        self._keel_check_writes(writes)
        await super().aput_writes(config, writes, task_id, task_path)  # type: ignore[misc]

    def _keel_check_writes(self, writes: Sequence[tuple[str, Any]]) -> None:
        for channel, value in writes:
            self._keel_check({channel: value}, [channel])


class StrictSqliteSaver(_Strict, SqliteSaver):
    """LangGraph's `SqliteSaver`, strict (see `keel.db.checkpoint.strict`).

    Its failed writes are rolled back (`cursor`).
    """

    @contextmanager
    def cursor(self, transaction: bool = True) -> Iterator[sqlite3.Cursor]:
        """`SqliteSaver.cursor`, rolling a failed write back instead of committing it.

        LangGraph's commits in a `finally`: a task's writes that failed halfway (the database
        turned read-only, a full disk) kept their first rows, and a resumed run took the task
        as done with half its writes, its next step lost (`tests/test_checkpoint_strict.py`).
        """
        with self.lock:
            self.setup()
            cur = self.conn.cursor()
            try:
                yield cur
            except BaseException:
                if transaction and self.conn.in_transaction:
                    self.conn.rollback()
                raise
            else:
                if transaction:
                    self.conn.commit()
            finally:
                cur.close()


class StrictAsyncSqliteSaver(_Strict, AsyncSqliteSaver):
    """LangGraph's `AsyncSqliteSaver`, strict, whose failed writes are rolled back."""

    def __init__(self, conn: aiosqlite.Connection, *, serde: Any = None) -> None:
        super().__init__(conn, serde=serde)
        self.lock = _RollingBack(conn)


class _RollingBack(asyncio.Lock):
    """The async SQLite saver's lock: a write that failed is rolled back before it is released.

    LangGraph's `aput_writes` commits only when every row went in; one that failed halfway left
    its first rows in an open transaction, which the saver's next commit made durable. Every
    call of the saver takes this lock first: on a closed connection it raises the error the
    sync saver raises (`sqlite3.ProgrammingError`, a storage failure), not aiosqlite's bare
    `ValueError`, so the run ends with a `storage` outcome.
    """

    def __init__(self, conn: aiosqlite.Connection) -> None:
        super().__init__()
        self._conn = conn

    async def __aenter__(self) -> None:
        await self.acquire()
        try:
            self._conn.in_transaction  # noqa: B018 (aiosqlite raises ValueError once closed)
        except ValueError as exc:
            self.release()
            raise sqlite3.ProgrammingError(
                f"Cannot operate on a closed database (the checkpointer's connection: {exc})."
            ) from exc

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is not None and self._conn.in_transaction:
                await self._conn.rollback()
        finally:
            self.release()


class _ReconnectingPostgresSaver(PostgresSaver):
    """LangGraph's `PostgresSaver`, each read and write run once more when its connection died.

    As keel's async saver: its writes are idempotent upserts, so a second run is safe.
    """

    @retry_once
    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        """`PostgresSaver.get_tuple`, retried once on a dropped connection."""
        return super().get_tuple(config)

    def put(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        """`PostgresSaver.put`, retried once on a dropped connection (bytes counted once)."""
        tally = _TALLY.get()
        counted = tally.size if tally is not None else 0
        return self._put_once(config, checkpoint, metadata, new_versions, tally, counted)

    @retry_once
    def _put_once(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
        tally: _Tally | None,
        counted: int,
    ) -> RunnableConfig:
        if tally is not None:
            tally.size = counted
        return super().put(config, checkpoint, metadata, new_versions)

    @retry_once
    def put_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        """`PostgresSaver.put_writes`, retried once on a dropped connection."""
        super().put_writes(config, writes, task_id, task_path)


class StrictPostgresSaver(_Strict, _ReconnectingPostgresSaver):
    """LangGraph's `PostgresSaver`, strict, retried once on a dropped connection."""


class StrictAsyncPooledPostgresSaver(_Strict, AsyncPooledPostgresSaver):
    """keel's `AsyncPooledPostgresSaver`, strict."""
