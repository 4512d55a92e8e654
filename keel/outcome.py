"""Constructors for `Outcome`, the record every run ends with.

A detail is for people and logs: one longer than `MAX_DETAIL` characters (a judge's essay, an
error quoting a whole page) is cut, saying how much was left out.
"""

from __future__ import annotations

from keel.state import Outcome, TerminatedReason

__all__ = [
    "MAX_DETAIL",
    "at_breakpoint",
    "cancelled",
    "completed",
    "failed",
    "interrupted",
    "step_limit",
    "stopped",
    "storage_failed",
]

MAX_DETAIL = 2_000
"""The most characters an outcome's detail keeps."""


def completed(detail: str = "final answer given") -> Outcome:
    """The run reached a final answer."""
    return {"status": "success", "terminated_reason": "completed", "detail": _clipped(detail)}


def stopped(reason: TerminatedReason, detail: str) -> Outcome:
    """A guard or a human ended the run early; `respond` gives a partial answer."""
    return {"status": "stopped", "terminated_reason": reason, "detail": _clipped(detail)}


def cancelled(detail: str) -> Outcome:
    """The caller ended the run before it finished (no partial answer: nobody waits for one)."""
    return stopped("cancelled", detail)


def failed(detail: str) -> Outcome:
    """Something failed that keel could not recover from."""
    return {"status": "error", "terminated_reason": "error", "detail": _clipped(detail)}


def interrupted(detail: str) -> Outcome:
    """The run is paused for a human and can be resumed."""
    return {
        "status": "interrupted",
        "terminated_reason": "awaiting_approval",
        "detail": _clipped(detail),
    }


def at_breakpoint(detail: str) -> Outcome:
    """The run is paused at a breakpoint its caller set; `invoke(None, config)` continues it."""
    return {"status": "interrupted", "terminated_reason": "breakpoint", "detail": _clipped(detail)}


def step_limit() -> Outcome:
    """The run used up LangGraph's `recursion_limit` and was stopped before it could raise."""
    return stopped(
        "budget_exceeded",
        "step limit: the run reached LangGraph's recursion_limit; raise `recursion_limit` in "
        "the run config to allow longer runs",
    )


def storage_failed(detail: str) -> Outcome:
    """The checkpointer's database failed mid-run; the run's last steps may not be saved.

    The thread resumes from its last saved checkpoint once the database is back.
    """
    return {"status": "error", "terminated_reason": "storage", "detail": _clipped(detail)}


def _clipped(detail: str) -> str:
    if len(detail) <= MAX_DETAIL:
        return detail
    return f"{detail[:MAX_DETAIL]}… ({len(detail) - MAX_DETAIL} more characters)"
