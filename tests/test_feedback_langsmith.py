"""Feedback forwarded to LangSmith with a key, against a local stand-in for its API.

With a key the feedback reaches `POST /feedback` against the run's trace id, PII redacted; a
LangSmith that refuses loses nothing (the ledger keeps it); without a key no connection is
attempted at all (every socket connect in the process is watched).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from langsmith_stand_in import LangSmithStandIn, watch_connections

from keel import Ledger, RunContext, build_agent
from keel.errors import UserError
from keel.evals import ScriptedChatModel, feedback_for, new_feedback, record_feedback
from keel.evals.cli import main as eval_main
from keel.evals.feedback import arecord_feedback, forward_feedback


def _run(ledger: Ledger, thread: str, run_id: uuid.UUID | None) -> None:
    agent = build_agent(ScriptedChatModel(script=["Hello!"]), [], ledger=ledger)
    config: Any = {"configurable": {"thread_id": thread}}
    if run_id is not None:  # the trace's root run id, and the run record's run id
        config = {"run_id": run_id, "configurable": {**config["configurable"], "run_id": run_id}}
    agent.invoke({"messages": [("user", "hi")]}, config, context=RunContext(user_id="ada"))


def _posted_feedback(server: LangSmithStandIn) -> list[dict[str, Any]]:
    return [json.loads(body) for _, path, body in server.requests if path == "/feedback"]


def test_with_a_key_feedback_reaches_the_runs_trace(
    ls_keyed: LangSmithStandIn, tmp_path: Path
) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path}/keel.db")
    run_id = uuid.uuid4()
    _run(ledger, "t-1", run_id)
    stored = record_feedback(
        ledger,
        new_feedback("t-1", score=0, comment="mail me at jane@example.com", correction="A2"),
    )
    (sent,) = _posted_feedback(ls_keyed)
    assert sent["run_id"] == str(run_id) and sent["id"] == str(uuid.UUID(stored.id))
    assert sent["session_id"] == ls_keyed.session("keel-tests")["id"]
    assert (sent["key"], sent["score"], sent["correction"]) == ("user_feedback", 0, {"text": "A2"})
    assert "jane@example.com" not in sent["comment"] and "[EMAIL]" in sent["comment"]
    ledger.close()


async def test_async_recording_forwards_too(ls_keyed: LangSmithStandIn, tmp_path: Path) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path}/keel.db")
    run_id = uuid.uuid4()
    _run(ledger, "t-1", run_id)
    await arecord_feedback(ledger, new_feedback("t-1", score=5))
    assert [f["run_id"] for f in _posted_feedback(ls_keyed)] == [str(run_id)]
    ledger.close()


def test_a_failing_langsmith_loses_no_feedback(ls_keyed: LangSmithStandIn, tmp_path: Path) -> None:
    ls_keyed.sessions.clear()  # the tracing project is unknown to LangSmith: forwarding fails
    ledger = Ledger(f"sqlite:///{tmp_path}/keel.db")
    _run(ledger, "t-1", uuid.uuid4())
    record_feedback(ledger, new_feedback("t-1", score=1))  # logs, does not raise
    assert "/sessions" in ls_keyed.paths("GET"), "it was tried"
    assert _posted_feedback(ls_keyed) == []
    assert [f.score for f in feedback_for(ledger, "t-1")] == [1.0]
    ledger.close()


def test_a_run_without_a_trace_id_is_kept_and_named(
    ls_keyed: LangSmithStandIn, tmp_path: Path
) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path}/keel.db")
    _run(ledger, "t-1", None)
    stored = record_feedback(ledger, new_feedback("t-1", score=1))
    with pytest.raises(UserError, match="has no run id, so its LangSmith trace is unknown"):
        forward_feedback(ledger, stored)
    assert _posted_feedback(ls_keyed) == []
    assert len(feedback_for(ledger, "t-1")) == 1
    ledger.close()


def test_the_cli_says_it_forwarded(ls_keyed: LangSmithStandIn, tmp_path: Path, capsys: Any) -> None:
    url = f"sqlite:///{tmp_path}/keel.db"
    ledger = Ledger(url)
    _run(ledger, "t-1", uuid.uuid4())
    ledger.close()
    assert eval_main(["feedback", "t-1", "--score", "1", "--db", url]) == 0
    assert "feedback forwarded to LangSmith" in capsys.readouterr().out
    assert len(_posted_feedback(ls_keyed)) == 1


def test_without_a_key_no_connection_is_attempted(
    ls_keyless: LangSmithStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    url = f"sqlite:///{tmp_path}/keel.db"
    ledger = Ledger(url)
    _run(ledger, "t-1", uuid.uuid4())
    attempts = watch_connections(monkeypatch)
    record_feedback(ledger, new_feedback("t-1", score=1))
    with pytest.raises(UserError, match="needs LANGSMITH_API_KEY"):
        forward_feedback(ledger, feedback_for(ledger, "t-1")[0])
    ledger.close()
    assert eval_main(["feedback", "t-1", "--score", "0", "--db", url]) == 0
    assert "forwarded" not in capsys.readouterr().out
    assert attempts == [] and ls_keyless.requests == []


def test_pin_langsmith_warns_on_run_feedback_without_its_project(
    ls_keyed: LangSmithStandIn,
) -> None:
    """Why `forward_feedback` looks the tracing project up and passes `session_id`."""
    import langsmith
    from langsmith.utils import LangSmithWarning

    client = langsmith.Client(api_url=ls_keyed.url, api_key="ls-test-key")
    with pytest.warns(LangSmithWarning, match="without session_id is deprecated"):
        client.create_feedback(uuid.uuid4(), "k", score=1)
