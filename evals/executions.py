"""What the tools of an eval graph really did: executions recorded from inside the tool bodies.

An evaluator that trusts the graph's own messages trusts the thing under test. Tools of an eval
graph call `record_execution(name, args)` when their body runs; the runner gives every case run
its own record (a context variable, which LangGraph and LangChain copy into tool tasks and
threads), so `CaseRun.executions` lists what actually executed, whatever the messages say.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Execution", "record_execution", "recording"]


@dataclass(frozen=True, slots=True)
class Execution:
    """One tool body that ran."""

    tool: str
    """The tool's name."""
    args: Mapping[str, Any] = field(default_factory=dict)
    """The arguments it ran with."""


_current: ContextVar[list[Execution] | None] = ContextVar("keel_eval_executions", default=None)


def record_execution(tool: str, args: Mapping[str, Any] | None = None) -> None:
    """Record that `tool`'s body ran (a no-op outside an eval run)."""
    executions = _current.get()
    if executions is not None:
        executions.append(Execution(tool, dict(args or {})))


@contextmanager
def recording() -> Iterator[list[Execution]]:
    """Collect the executions recorded inside this block (and the tasks it starts)."""
    executions: list[Execution] = []
    token = _current.set(executions)
    try:
        yield executions
    finally:
        _current.reset(token)
