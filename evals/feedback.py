"""Feedback: a person's score, comment or correction on a run, kept beside the run records.

A run is named the way `keel report` and the run records name it: its `run_key`, its LangGraph
`run_id`, or its thread id (meaning the thread's latest run); feedback is stored against the
run's key. Feedback on a run the ledger does not know is refused. The table (`keel_feedback`,
`keel.db.tables.FEEDBACK`) is part of the ledger's versioned schema (version 4).

Example:
    ```python
    record_feedback(ledger, new_feedback("thread-1", score=1.0, comment="fixed it", user="ada"))
    feedback_for(ledger, "thread-1:msg-1")  # [Feedback(...)]
    ```
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, replace

from keel.db.ledger import Flow, Ledger
from keel.errors import UserError

__all__ = ["Feedback", "afeedback_for", "arecord_feedback", "feedback_for"]
__all__ += ["new_feedback", "record_feedback"]

_MATCH = "run_key = ? OR run_id = ? OR thread_id = ?"


@dataclass(frozen=True, kw_only=True, slots=True)
class Feedback:
    """One person's feedback on one run."""

    id: str
    """The feedback's id."""
    run: str
    """The run's key (a run id or thread id given is resolved to it; a thread: its latest run)."""
    user: str | None
    """Who gave it."""
    score: float | None
    """A score (any scale: thumbs as 0/1, stars as 1-5)."""
    comment: str
    """What they said."""
    correction: str
    """What the answer should have been."""
    at: float
    """When (epoch seconds)."""


def _record_flow(feedback: Feedback) -> Flow[Feedback]:
    known = yield (
        f"SELECT run_key FROM keel_runs WHERE {_MATCH} ORDER BY ended_at DESC LIMIT 1",
        (feedback.run,) * 3,
    )
    if not known:
        raise UserError(
            f"No run {feedback.run!r} in the ledger. Name a run by its run key, run id or thread "
            "id, as `keel report` and the run records show them."
        )
    feedback = replace(feedback, run=str(known[0][0]))
    yield (
        "INSERT INTO keel_feedback (id, run_ref, user_id, score, comment, correction, at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            feedback.id,
            feedback.run,
            feedback.user,
            feedback.score,
            feedback.comment,
            feedback.correction,
            feedback.at,
        ),
    )
    return feedback


def _query_flow(run: str) -> Flow[list[Feedback]]:
    rows = yield (
        "SELECT id, run_ref, user_id, score, comment, correction, at FROM keel_feedback "
        f"WHERE run_ref IN (SELECT run_key FROM keel_runs WHERE {_MATCH}) ORDER BY at",
        (run, run, run),
    )
    return [
        Feedback(id=r[0], run=r[1], user=r[2], score=r[3], comment=r[4], correction=r[5], at=r[6])
        for r in rows
    ]


def new_feedback(
    run: str,
    *,
    score: float | None = None,
    comment: str = "",
    correction: str = "",
    user: str | None = None,
) -> Feedback:
    """A person's feedback on `run` (a run key, run id or thread id), to record.

    Raises:
        UserError: no run named, a score that is not a finite number, or neither a score, a
            comment nor a correction.
    """
    if not isinstance(run, str) or not run.strip():
        raise UserError(f"Feedback needs the run it is about (a non-empty string), got {run!r}.")
    if score is not None and (isinstance(score, bool) or not math.isfinite(float(score))):
        raise UserError(f"A feedback score must be a finite number, got {score!r}.")
    if score is None and not comment.strip() and not correction.strip():
        raise UserError("Feedback needs a score, a comment or a correction.")
    return Feedback(
        id=uuid.uuid4().hex,
        run=run,
        user=user,
        score=None if score is None else float(score),
        comment=comment,
        correction=correction,
        at=time.time(),
    )


def record_feedback(ledger: Ledger, feedback: Feedback) -> Feedback:
    """Store `feedback` (from `new_feedback`); returns it with `run` resolved to the run key.

    Raises:
        UserError: the ledger knows no such run.
    """
    return ledger.run(_record_flow(feedback))


async def arecord_feedback(ledger: Ledger, feedback: Feedback) -> Feedback:
    """Async `record_feedback`."""
    return await ledger.arun(_record_flow(feedback))


def feedback_for(ledger: Ledger, run: str) -> list[Feedback]:
    """The feedback on `run` (a run key, run id or thread id: all its runs'), oldest first."""
    return ledger.run(_query_flow(run))


async def afeedback_for(ledger: Ledger, run: str) -> list[Feedback]:
    """Async `feedback_for`."""
    return await ledger.arun(_query_flow(run))
