"""A run whose checkpointer fails ends with an outcome, not a raw database error.

When the checkpointer's database fails mid-run (a PostgreSQL connection killed twice, a pool
with no connection, an SQLite file that turned read-only or stays locked), LangGraph raises
the driver's error out of `invoke` / `stream`. keel's graphs end such a run with
`outcome = {status: "error", terminated_reason: "storage", detail}` instead:

- `invoke` / `ainvoke` (and `stream` with `"values"` among its modes) return (or yield last)
  the latest state the run reached, with that outcome. That state is *not* saved past the last
  checkpoint that was; the detail says so, and the thread resumes from its last saved
  checkpoint (`invoke(None, config)`) once the database is back.
- A stream without `"values"` has no place for a state: it raises `keel.StorageError`
  carrying the outcome (`exc.outcome`), chained to the driver's error.

A checkpointer that raises anything else (a custom saver's bug, a value its serializer cannot
store: a `RuntimeError`, a `TypeError`) ends the run the same way, its detail naming the
exception (`saver_failed`): the exception is told apart by where it was raised, a method of a
checkpoint saver, so a tool's or a node's own exception is not taken for one. keel's own errors
(`keel.KeelError`: a state the strict saver refuses, a checkpoint over its size limit) raise
as they are: they say what to fix.

A graph that runs as a node of another graph (a subgraph) lets the error through to its parent.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, cast

import psycopg
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import ensure_config
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.postgres import PostgresSaver
from langgraph.checkpoint.postgres.shallow import ShallowPostgresSaver
from langgraph.checkpoint.sqlite import SqliteSaver

from keel import outcome
from keel._drive import Op, Steps, adrive, drive, finishing
from keel._node import inside_task, saver_in
from keel.db.ledger import Flow, Ledger
from keel.errors import KeelError, SetupError, StorageError, UserError, _one_line
from keel.graphs._chunks import ChunkShape
from keel.redact import sanitized_logger
from keel.state import Outcome

__all__ = [
    "AUPDATE",
    "DATABASE_ERRORS",
    "STORAGE_FAILURES",
    "Recorder",
    "RunEnd",
    "StreamEnding",
    "at_top",
    "refuse_sync_saver",
    "saver_failed",
    "storage_error",
    "storage_failure",
    "storage_outcome",
]

log = sanitized_logger("keel.graphs")

DATABASE_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error, psycopg.Error)
"""What a checkpointer's database driver raises when the database fails."""
STORAGE_FAILURES: tuple[type[BaseException], ...] = (StorageError, SetupError, *DATABASE_ERRORS)
"""What a checkpointer raises when its database fails: keel's own errors and the drivers'."""


def saver_failed(exc: BaseException) -> bool:
    """Whether `exc` is a checkpointer's failure other than a database error's.

    That is an exception raised in a method of a checkpoint saver (a frame of its traceback
    runs with a `BaseCheckpointSaver` as `self`), not keel's own (`KeelError`).
    """
    if not isinstance(exc, Exception) or isinstance(exc, KeelError):
        return False
    frames = exc.__traceback__
    while frames is not None:
        if isinstance(frames.tb_frame.f_locals.get("self"), BaseCheckpointSaver):
            return True
        frames = frames.tb_next
    return False


def storage_failure(exc: BaseException) -> bool:
    """Whether a run that raised `exc` ended on a failure of its checkpointer."""
    return isinstance(exc, STORAGE_FAILURES) or saver_failed(exc)


SYNC_SAVERS: tuple[type[BaseCheckpointSaver[Any]], ...] = (
    SqliteSaver,
    PostgresSaver,
    ShallowPostgresSaver,
)
"""LangGraph's savers with no async methods (each raises `NotImplementedError` under `ainvoke`)."""


AUPDATE = "aupdate_state / abulk_update_state"
"""What `refuse_sync_saver` names a refused async state update."""


def refuse_sync_saver(
    checkpointer: Any,
    config: RunnableConfig | None,
    call: str = "An async run (ainvoke / astream)",
    instead: str = "invoke / stream",
) -> None:
    """Refuse an async call on a graph whose checkpointer is sync only: a `UserError`.

    LangGraph's `SqliteSaver` and `PostgresSaver` raise `NotImplementedError` from `aget_tuple`,
    `alist` and `aput`: a run would end as a failure of its database (`error / storage`), which
    it is not, and `aget_state`, `aget_state_history`, `aupdate_state` raised LangGraph's bare
    `NotImplementedError` (naming `AsyncSqliteSaver`, not keel's `acheckpointer()`). The saver
    is the one the call would use: the config's (as LangGraph's server sets it), else the
    graph's. A run inside another one uses its parent's, checked there. `call` names what was
    called, `instead` its sync twin.
    """
    if inside_task(config):
        return
    saver = saver_in((config or {}).get("configurable") or {})
    saver = saver if saver is not None else checkpointer
    if isinstance(saver, SYNC_SAVERS):
        raise UserError(
            f"{call} calls the checkpointer's async methods, and "
            f"this graph's checkpointer ({type(saver).__name__}) is sync only "
            "(Persistence(url).checkpointer()). For async calls compile the graph with "
            f"`async with Persistence(url).acheckpointer() as saver`, or call {instead}."
        )


def at_top(config: RunnableConfig | None) -> bool:
    """Whether a graph runs as the caller's run (not as another graph's node)."""
    return not inside_task(ensure_config(config))


def storage_outcome(exc: BaseException, *, started: bool = True) -> Outcome:
    """The outcome of a run that ended on `exc`, a failure of its storage.

    `started=False`: it failed before the run began (as keel read the thread or wrote what
    the run answers first), so nothing of it was written and its input is to be sent again.
    """
    text = _one_line(exc)
    database = isinstance(exc, STORAGE_FAILURES)
    raised = "" if database else "the checkpointer raised "
    back = "the database is back" if database else "the checkpointer is fixed"
    if not started:
        return outcome.storage_failed(
            f"storage failed before the run started: {raised}{type(exc).__name__}: {text}. "
            "Nothing of this run was written (calls that waited for a human still wait); send "
            f"its input again once {back}"
        )
    return outcome.storage_failed(
        f"storage failed: {raised}{type(exc).__name__}: {text}. The state of this run is not "
        f"saved past its last saved checkpoint; resume the thread (invoke(None, config)) once "
        f"{back}"
    )


def storage_error(exc: BaseException, *, started: bool = True) -> StorageError:
    """`exc` as a `keel.StorageError` carrying the run's outcome (chain it with `from exc`)."""
    ended = storage_outcome(exc, started=started)
    return StorageError(
        f"the run ended: {ended['detail']}",
        in_doubt=getattr(exc, "in_doubt", False),
        outcome={key: str(value) for key, value in ended.items()},
    )


class Recorder(Protocol):
    """Where a run that ended on a storage failure records itself (`keel.observe.Observer`)."""

    ledger: Ledger
    """The ledger its records go to."""

    def ending_flow(
        self,
        state: Any,
        config: RunnableConfig,
        context: Any,
        *,
        first_end: bool = False,
        report: bool = True,
    ) -> Flow[Callable[[], None]] | None:
        """The record's write as a flow; its result reports it once committed (None: no record).

        `report`: with the thread's orphaned calls (`keel.observe.Observer.ending_flow`).
        """
        ...

    def recording(
        self,
        state: Any,
        config: RunnableConfig,
        context: Any,
        *,
        first_end: bool = False,
        thread: str | None = None,
    ) -> Steps[None]:
        """Write the record (`keel.observe.Observer.record_run`) as `keel._drive` steps."""
        ...

    def who(self, config: RunnableConfig, context: Any) -> Any:
        """Who and where the run's records belong to (`keel.observe.Who`)."""
        ...

    def resuming(self, state: Any, config: RunnableConfig, context: Any) -> Steps[RunnableConfig]:
        """`config` for a run that continues the run `state` is at (None: a new run)."""
        ...


@dataclass(frozen=True, slots=True)
class RunEnd:
    """A run's recorder, with the config and context its record is written under."""

    recorder: Recorder
    config: RunnableConfig
    context: Any
    thread: str | None = None
    """The thread the graph saves the run's state under (None: it keeps none). The caller's
    config does not say (the checkpointer is the graph's): the record's look for the thread's
    orphaned calls needs it (`keel.observe.Observer.record_run`)."""

    def earlier(self, run_id: str | None) -> RunEnd:
        """The recorder for the thread's run before this one: under its `run_id`, not this one's.

        `run_id` is the earlier run's, as its checkpoints name it (`None`: it had none); a row
        it wrote keeps the one it has.
        """
        config: dict[str, Any] = dict(self.config)
        for key in ("configurable", "metadata"):
            given: Mapping[str, Any] = config.get(key) or {}
            config[key] = {k: v for k, v in given.items() if k != "run_id"}
        if run_id is not None:
            config["configurable"]["run_id"] = run_id
        return RunEnd(self.recorder, cast(RunnableConfig, config), self.context, self.thread)

    def flow(
        self, state: dict[str, Any], *, first_end: bool = False, report: bool = True
    ) -> Flow[Callable[[], None]] | None:
        """The write of the record of the run `state` ends, for a caller's transaction.

        `report`: with the thread's orphaned calls (`Recorder.ending_flow`).
        """
        return self.recorder.ending_flow(
            state, self.config, self.context, first_end=first_end, report=report
        )

    def recording(self, state: dict[str, Any], *, first_end: bool = False) -> Op:
        """The step that writes the record of the run `state` ends (`first_end`: unless it has one).

        Its halves drive the recorder's `recording` (`record_run`, `arecord_run`).
        """
        steps = partial(
            self.recorder.recording,
            state,
            self.config,
            self.context,
            first_end=first_end,
            thread=self.thread,
        )
        return Op(lambda: drive(steps()), lambda: adrive(steps()))


_KEEL_ONLY = object()
"""A chunk keel streamed for itself: not sent to the caller."""


class StreamEnding:
    """Watches a stream's chunks and makes the chunk that ends it on a storage failure.

    It keeps the latest top-level state (see `ChunkShape` for the chunk shapes it knows). A
    stream without `"values"` among its modes streams them too (`kwargs`, for LangGraph), and
    the caller gets only the modes it asked for: a run that ends on a storage failure or is
    cancelled is recorded with what it reached (its messages, its usage) in whichever mode it
    streams, so its record is the same row its graph wrote (one record per run), not a second
    one keyed on nothing. With a `RunEnd`, a run that ends so is recorded (its run record,
    `terminated_reason` storage), as far as the ledger still takes writes: its graph never
    reached the route that records a finished run, or that route recorded an end (`completed`)
    whose checkpoint then failed to save.
    """

    def __init__(
        self,
        graph_mode: Any,
        kwargs: dict[str, Any],
        end: RunEnd | None = None,
        *,
        continues: bool = False,
        started: bool = True,
    ) -> None:
        self.continues = continues
        """Whether the stream continues its thread's last run (`invoke(None, config)`)."""
        self.started = started
        """Whether the run began (else storage failed before it: see `storage_outcome`)."""
        self.shape = ChunkShape(graph_mode, kwargs)
        """The chunks the caller asked for."""
        self.added = "values" not in self.shape.modes
        """Whether `values` is streamed for keel only (the caller did not ask for it)."""
        modes = [*self.shape.modes, "values"] if self.added else self.shape.modes
        self.kwargs = {**kwargs, "stream_mode": modes} if self.added else kwargs
        """The stream's arguments for LangGraph."""
        self.streamed = ChunkShape(graph_mode, self.kwargs)
        self.latest: dict[str, Any] = {}
        self.end = end

    def see(self, chunk: Any) -> Any:
        """Keep `chunk`'s state if it is a top-level `values` chunk; the chunk for the caller.

        That is `chunk` in the shape the caller asked for, or `_KEEL_ONLY` for a `values`
        chunk streamed for keel alone.
        """
        parts = self.streamed.parts(chunk)
        if parts is None:
            return chunk
        ns, mode, payload = parts
        if mode == "values" and not ns and isinstance(payload, dict):
            self.latest = payload
        if not self.added:
            return chunk
        if mode == "values":
            return _KEEL_ONLY
        return self.shape.make(ns, mode, payload, chunk)

    def ended(self, exc: BaseException) -> dict[str, Any]:
        """The run's last state: the latest one seen, with the storage outcome."""
        # a saver's bug keeps its traceback in the log: the outcome has no room for it
        log.warning("a run ended on a storage failure: %s", exc, exc_info=saver_failed(exc))
        return {**self.latest, "outcome": storage_outcome(exc, started=self.started)}

    def finished(self) -> dict[str, Any] | None:
        """The end to record of a run that continued and finished (None: none to record).

        A run resumed after its checkpointer failed may not run the route that records its end
        again: it ran before the failure, and the resume goes on from the writes its step
        saved. Its record said `storage` while it completed.
        """
        result = self.latest.get("outcome") or {}
        if not self.continues or result.get("status") in (None, "interrupted"):
            return None
        return self.latest

    def cancelled(
        self, how: str = "its task was cancelled or its stream closed"
    ) -> dict[str, Any] | None:
        """The state a run the caller cancelled ends with, to record (None: none to record).

        A run cancelled before its first state streamed has nothing of it to record.
        """
        if not self.latest:
            return None
        return {
            **self.latest,
            "outcome": outcome.cancelled(
                f"cancelled by the caller before the run ended ({how}); what it did up to its "
                "last saved step is kept"
            ),
        }

    def at_breakpoint(self) -> dict[str, Any] | None:
        """The state of a run that stopped at a breakpoint its caller set, with its outcome.

        `interrupt_before` / `interrupt_after` stop a run between nodes with no interrupt and
        nothing written but the checkpoint: its result had `outcome` None and no run record.
        None: no breakpoint was set, or the run ended (keel's graphs end every run with an
        outcome) or waits for a human (`__interrupt__`).
        """
        set_at = {
            key: list(nodes) if isinstance(nodes, list | tuple) else nodes
            for key in ("interrupt_before", "interrupt_after")
            if (nodes := self.kwargs.get(key))
        }
        latest = self.latest
        if not set_at or not latest or latest.get("outcome") is not None:
            return None
        if "__interrupt__" in latest:
            return None
        where = ", ".join(f"{key}={nodes!r}" for key, nodes in set_at.items())
        return {
            **latest,
            "outcome": outcome.at_breakpoint(
                f"paused at a breakpoint the caller set ({where}); continue the run with "
                "invoke(None, config), or send a new message"
            ),
        }

    def _paused_chunk(self, state: dict[str, Any]) -> Any:
        """The `values` chunk that ends a run paused at a breakpoint (`_KEEL_ONLY` if unasked)."""
        if "values" not in self.shape.modes:
            return _KEEL_ONLY
        return self.shape.make((), "values", state, {"interrupts": ()})

    def last_chunk(self, exc: BaseException, state: dict[str, Any]) -> Any:
        """The `values` chunk that ends the stream, or raise `StorageError` without one."""
        if "values" not in self.shape.modes:
            raise storage_error(exc, started=self.started) from exc
        return self.shape.make((), "values", state, {"interrupts": ()})

    def guard(self, chunks: Iterator[Any]) -> Iterator[Any]:
        """`chunks`, ended by `last_chunk` when storage fails."""
        try:
            for chunk in chunks:
                if (sent := self.see(chunk)) is not _KEEL_ONLY:
                    yield sent
            if self.end is not None and (ended := self.finished()) is not None:
                self.end.recording(ended).run()
            if (paused := self.at_breakpoint()) is not None:
                if self.end is not None:
                    self.end.recording(paused).run()
                if (sent := self._paused_chunk(paused)) is not _KEEL_ONLY:
                    yield sent
        except Exception as exc:
            if not storage_failure(exc):
                raise
            yield drive(self.failed(exc))
        except GeneratorExit:  # the caller stopped reading: LangGraph stops the run
            drive(self._stopped())
            raise
        except (KeyboardInterrupt, SystemExit) as exc:  # Ctrl-C, Jupyter's stop, a SIGTERM handler
            drive(self._stopped(f"{type(exc).__name__} in the process running it"))
            raise

    async def aguard(self, chunks: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """`guard` for an async stream."""
        try:
            async for chunk in chunks:
                if (sent := self.see(chunk)) is not _KEEL_ONLY:
                    yield sent
            if self.end is not None and (ended := self.finished()) is not None:
                await self.end.recording(ended).arun()
            if (paused := self.at_breakpoint()) is not None:
                if self.end is not None:
                    await self.end.recording(paused).arun()
                if (sent := self._paused_chunk(paused)) is not _KEEL_ONLY:
                    yield sent
        except Exception as exc:
            if not storage_failure(exc):
                raise
            yield await adrive(self.failed(exc))
        except (asyncio.CancelledError, GeneratorExit):  # the caller cancelled, or went away
            await finishing(adrive(self._stopped()))  # recorded, even if cancelled again
            raise

    def failed(self, exc: Exception) -> Steps[Any]:
        """The run ended on `exc`, a storage failure: record it; its last chunk (`last_chunk`).

        A run whose storage failed before its stream began (`latest` is empty) ends with the
        outcome alone.
        """
        state = self.ended(exc)
        if self.end is not None:
            yield self.end.recording(state)
        return self.last_chunk(exc, state)

    def _stopped(self, *how: str) -> Steps[None]:
        """The caller stopped the run (`how`: see `cancelled`): record it if it streamed a state."""
        if self.end is not None and (ended := self.cancelled(*how)) is not None:
            yield self.end.recording(ended)
