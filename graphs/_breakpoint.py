"""A thread paused at a caller's breakpoint, as `get_state` reads it.

`interrupt_before` / `interrupt_after` stop a run between nodes with no interrupt: LangGraph
writes nothing but the step's checkpoint, whose `outcome` is None and whose next node is still
to run. That checkpoint is the same as the one a run in flight left before its current step:
the saved state alone cannot tell them apart. keel tells them by two more things, with a ledger:

- the run's record (`keel_runs`, under its first message) says `interrupted / breakpoint`
  (keel writes it as the run stops there), written at or after that checkpoint: a run continued
  past the breakpoint that saved a step since is not paused there;
- no run holds the thread: none in this process (`graphs._one_run`'s lock) and no live lease
  in the ledger (a continued run takes it before it reads the thread, and holds it until it
  ends; a dead process's lease holds no run).

Then `get_state` reports the record's outcome. Without a ledger, or when it cannot be read
(logged), or reading an earlier checkpoint (`checkpoint_id`) or a subgraph's, the outcome
stays the saved one (None): a run in another process cannot be told from a pause.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from langchain_core.runnables import RunnableConfig
from langgraph.types import StateSnapshot

from keel._drive import Steps, both
from keel.db.ledger import Flow, Ledger
from keel.db.runs import RunRecord, record_flow
from keel.errors import StorageError
from keel.graphs._one_run import holder_flow
from keel.graphs._storage import log
from keel.state import task_start

__all__ = ["at_breakpoint"]


def at_breakpoint(
    ledger: Ledger | None,
    running_here: Callable[[RunnableConfig], bool],
    config: RunnableConfig,
    state: StateSnapshot,
) -> Steps[StateSnapshot]:
    """`state`, with its run's recorded outcome if that run is paused at a breakpoint.

    `running_here`: whether a run of this process holds the thread.
    """
    conf = config.get("configurable") or {}
    if ledger is None or conf.get("checkpoint_id") or conf.get("checkpoint_ns"):
        return state
    key = _run_key(conf.get("thread_id"), state)
    if key is None or running_here(config):
        return state
    try:
        record = yield both(ledger.read, ledger.aread, _paused_flow(config, key))
    except StorageError as exc:
        log.warning("keel could not read the run record of %r to tell a breakpoint: %s", key, exc)
        return state
    if record is None or record.ended_at < _saved_at(state):
        return state
    result = {
        "status": record.status,
        "terminated_reason": record.terminated_reason,
        "detail": record.detail,
    }
    return state._replace(values={**state.values, "outcome": result})


def _run_key(thread: Any, state: StateSnapshot) -> str | None:
    """The run record's key of a state that looks stopped between steps (else None).

    That is a state with no outcome, a node still to run, nothing waiting for a human.
    """
    values = state.values if isinstance(state.values, dict) else {}
    if thread is None or values.get("outcome") is not None or not state.next:
        return None
    if state.interrupts or any(task.interrupts for task in state.tasks):
        return None
    messages = values.get("messages") or []
    start = task_start(messages)
    if start < 0 or not messages[start].id:
        return None
    return f"{thread}:{messages[start].id}"


def _saved_at(state: StateSnapshot) -> float:
    """When the checkpoint was saved (Unix time); never, when it does not say."""
    try:
        return datetime.fromisoformat(str(state.created_at)).timestamp()
    except ValueError:
        return float("inf")


def _paused_flow(config: RunnableConfig, key: str) -> Flow[RunRecord | None]:
    """The record of the run `key`, if no run holds the thread and it says `breakpoint`."""
    if (yield from holder_flow(config)) is not None:
        return None
    record = yield from record_flow(key)
    if record is None or (record.status, record.terminated_reason) != ("interrupted", "breakpoint"):
        return None
    return record
