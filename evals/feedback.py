"""Feedback: a person's score, comment or correction on a run, kept beside the run records.

A run is named the way `keel report` and the run records name it: its `run_key`, its LangGraph
`run_id`, or its thread id (meaning the thread's latest run); feedback is stored against the
run's key. Feedback on a run the ledger does not know is refused. The table (`keel_feedback`,
`keel.db.tables.FEEDBACK`) is part of the ledger's versioned schema (version 4). `keel report`
shows it as satisfaction (the mean score), overall and by agent version.

With a LangSmith key (`LANGSMITH_API_KEY`), `record_feedback` also forwards the feedback to
LangSmith (`Client.create_feedback`) against the run's trace: the run record's `run_id`, which
LangGraph server sets to the run's trace id (locally, pass `config={"run_id": rid,
"configurable": {"run_id": str(rid)}}`). Without a key nothing touches the network. A LangSmith
failure never loses the feedback: it is stored first, and the failure is logged.

Example:
    ```python
    record_feedback(ledger, new_feedback("thread-1", score=1.0, comment="fixed it", user="ada"))
    feedback_for(ledger, "thread-1:msg-1")  # [Feedback(...)]
    ```
"""

from __future__ import annotations

import asyncio
import math
import os
import time
import uuid
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from keel._drive import Op, Steps, adrive, both, drive
from keel.db.ledger import Flow, Ledger
from keel.db.tables import storable
from keel.errors import UserError
from keel.redact import sanitize, sanitized_logger

__all__ = ["Feedback", "afeedback_for", "arecord_feedback", "feedback_for", "forward_feedback"]
__all__ += ["langsmith_key", "new_feedback", "record_feedback"]

FEEDBACK_KEY = "user_feedback"
"""The LangSmith feedback key keel forwards under."""
log = sanitized_logger("keel.evals.feedback")

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


def _run_key_flow(run: str) -> Flow[str]:
    """The key of `run` (a run key, run id or thread id: its latest run), or a `UserError`."""
    known = yield (
        f"SELECT run_key FROM keel_runs WHERE {_MATCH} ORDER BY ended_at DESC LIMIT 1",
        (storable(run),) * 3,
    )
    if not known:
        raise UserError(
            f"No run {run!r} in the ledger. Name a run by its run key, run id or thread "
            "id, as `keel report` and the run records show them."
        )
    return str(known[0][0])


def run_key(ledger: Ledger, run: str) -> str:
    """The key of `run` (a run key, run id or thread id: its latest run).

    Raises:
        UserError: the ledger has no such run.
    """
    return ledger.run(_run_key_flow(run))


def _record_flow(feedback: Feedback) -> Flow[Feedback]:
    feedback = replace(feedback, run=(yield from _run_key_flow(feedback.run)))
    yield (
        "INSERT INTO keel_feedback (id, run_ref, user_id, score, comment, correction, at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        tuple(  # a person's text may hold NUL or a lone surrogate (a browser sends both)
            storable(v)
            for v in (
                feedback.id,
                feedback.run,
                feedback.user,
                feedback.score,
                feedback.comment,
                feedback.correction,
                feedback.at,
            )
        ),
    )
    return feedback


def _query_flow(run: str) -> Flow[list[Feedback]]:
    rows = yield (
        "SELECT id, run_ref, user_id, score, comment, correction, at FROM keel_feedback "
        f"WHERE run_ref IN (SELECT run_key FROM keel_runs WHERE {_MATCH}) ORDER BY at",
        (storable(run),) * 3,
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
    if score is not None and not _finite(score):
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


def langsmith_key() -> str | None:
    """The LangSmith API key from the environment (`LANGSMITH_API_KEY` or `LANGCHAIN_API_KEY`)."""
    return os.environ.get("LANGSMITH_API_KEY") or os.environ.get("LANGCHAIN_API_KEY") or None


def record_feedback(
    ledger: Ledger, feedback: Feedback, *, client: Any = None, forward: bool = True
) -> Feedback:
    """Store `feedback` (from `new_feedback`); returns it with `run` resolved to the run key.

    With a LangSmith key (or a `client`) and `forward`, it is also forwarded
    (`forward_feedback`); a forwarding failure is logged and the stored feedback kept.

    Raises:
        UserError: the ledger knows no such run.
    """
    return drive(_recorded(ledger, feedback, client, forward))


async def arecord_feedback(
    ledger: Ledger, feedback: Feedback, *, client: Any = None, forward: bool = True
) -> Feedback:
    """Async `record_feedback` (forwarding runs in a worker thread)."""
    return await adrive(_recorded(ledger, feedback, client, forward))


def _recorded(ledger: Ledger, feedback: Feedback, client: Any, forward: bool) -> Steps[Feedback]:
    """`record_feedback` as `keel._drive` steps (`forward_feedback`'s, once the key is known)."""
    stored: Feedback = yield both(ledger.run, ledger.arun, _record_flow(feedback))
    if forward and (client is not None or langsmith_key()):
        try:
            run_id = yield both(ledger.run, ledger.arun, _trace_flow(stored.run))
            send = partial(_send, stored, run_id, client)
            yield Op(send, partial(asyncio.to_thread, send))
        except Exception as exc:
            log.warning("keel could not forward feedback %s to LangSmith: %r", stored.id, exc)
    return stored


def _trace_flow(run_key: str) -> Flow[str | None]:
    rows = yield "SELECT run_id FROM keel_runs WHERE run_key = ?", (run_key,)
    return str(rows[0][0]) if rows and rows[0][0] else None


def forward_feedback(ledger: Ledger, feedback: Feedback, *, client: Any = None) -> str:
    """Send stored `feedback` to LangSmith against its run's trace; returns the feedback's id.

    `client` defaults to a `langsmith.Client` for `LANGSMITH_ENDPOINT` and the key.

    Raises:
        UserError: no LangSmith key (and no `client`), or the run has no trace id (no run id).
    """
    if client is None and not langsmith_key():
        raise UserError(
            "Forwarding feedback to LangSmith needs LANGSMITH_API_KEY; without it keel keeps "
            "feedback in the ledger only (keel report shows it)."
        )
    return _send(feedback, ledger.run(_trace_flow(feedback.run)), client)


def _send(feedback: Feedback, run_id: str | None, client: Any) -> str:
    if run_id is None:
        raise UserError(
            f"Run {feedback.run!r} has no run id, so its LangSmith trace is unknown. LangGraph "
            "server runs have one; locally pass config={'run_id': rid, 'configurable': "
            "{'run_id': str(rid)}}."
        )
    if client is None:
        from keel.observe.tracing import sanitizing_client

        client = sanitizing_client()
    # langsmith 0.15 deprecates run feedback without the run's project (session) id
    project = os.environ.get("LANGSMITH_PROJECT") or os.environ.get("LANGCHAIN_PROJECT")
    session = client.read_project(project_name=project or "default")
    client.create_feedback(
        run_id,
        FEEDBACK_KEY,
        session_id=session.id,
        score=feedback.score,
        comment=sanitize(feedback.comment) or None,
        correction={"text": sanitize(feedback.correction)} if feedback.correction else None,
        feedback_id=uuid.UUID(feedback.id),
        source_info={"user": feedback.user, "keel_run": feedback.run},
    )
    return feedback.id


def feedback_for(ledger: Ledger, run: str) -> list[Feedback]:
    """The feedback on `run` (a run key, run id or thread id: all its runs'), oldest first."""
    return ledger.run(_query_flow(run))


async def afeedback_for(ledger: Ledger, run: str) -> list[Feedback]:
    """Async `feedback_for`."""
    return await ledger.arun(_query_flow(run))


def _finite(score: object) -> bool:
    """Whether `score` is a finite number (not a bool, a string or a float-overflowing int)."""
    if isinstance(score, bool) or not isinstance(score, int | float):
        return False
    try:
        return math.isfinite(float(score))
    except OverflowError:
        return False
