"""Feedback on runs, kept in the ledger beside the run records (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from langgraph.checkpoint.memory import InMemorySaver

from keel import RunContext, build_agent
from keel.db import RunLog
from keel.db.ledger import Ledger
from keel.errors import UserError
from keel.evals import ScriptedChatModel
from keel.evals.cli import main as eval_main
from keel.evals.feedback import (
    afeedback_for,
    arecord_feedback,
    feedback_for,
    new_feedback,
    record_feedback,
)


async def a_run(ledger: Ledger, thread: str = "t-1") -> str:
    agent = build_agent(
        ScriptedChatModel(script=["Hello!"]), [], ledger=ledger, checkpointer=InMemorySaver()
    )
    config: Any = {"configurable": {"thread_id": thread}}
    await agent.ainvoke({"messages": [("user", "hi")]}, config, context=RunContext(user_id="ada"))
    (record,) = [r for r in await RunLog(ledger).aquery() if r.thread_id == thread]
    return record.run_key


async def test_feedback_is_kept_against_a_known_run(ledger: Ledger) -> None:
    run_key = await a_run(ledger)
    first = await arecord_feedback(
        ledger, new_feedback(run_key, score=1, comment="solved it", user="ada")
    )
    by_thread = await arecord_feedback(
        ledger, new_feedback("t-1", correction="say goodbye too", user="bob")
    )
    assert first.run == by_thread.run == run_key  # a thread id means its latest run
    found = await afeedback_for(ledger, run_key)
    assert [(f.run, f.score, f.comment, f.correction, f.user) for f in found] == [
        (run_key, 1.0, "solved it", "", "ada"),
        (run_key, None, "", "say goodbye too", "bob"),
    ]
    assert await afeedback_for(ledger, "t-1") == found
    await a_run(ledger, "t-2")
    assert await afeedback_for(ledger, "t-2") == []


async def test_feedback_on_an_unknown_run_or_with_nothing_in_it_is_refused(ledger: Ledger) -> None:
    await a_run(ledger)
    with pytest.raises(UserError, match="No run 'nope' in the ledger"):
        await arecord_feedback(ledger, new_feedback("nope", score=1))
    with pytest.raises(UserError, match="needs a score, a comment or a correction"):
        new_feedback("t-1")
    for bad in (float("nan"), float("inf"), "x", "1", True, 10**400, [1]):
        with pytest.raises(UserError, match="finite number"):
            new_feedback("t-1", score=bad)  # type: ignore[arg-type]
    assert await afeedback_for(ledger, "t-1") == []


async def test_feedback_text_with_nul_or_a_lone_surrogate_is_kept_and_odd_ids_find_nothing(
    ledger: Ledger,
) -> None:
    """A person's comment comes from a form: a browser sends NUL and lone surrogates in JSON.
    PostgreSQL refused the NUL and no database took the surrogate (bare DataError /
    UnicodeEncodeError); the text is kept as its escape, like audit and run records. A run
    named with them is simply not found."""
    run_key = await a_run(ledger)
    said = "great\x00 answer \ud83d"  # a NUL, and half an emoji cut off by the form
    await arecord_feedback(ledger, new_feedback(run_key, score=1, comment=said, user="a\ud800"))
    (kept,) = await afeedback_for(ledger, run_key)
    assert (kept.comment, kept.user) == ("great\\x00 answer \\ud83d", "a\\ud800")
    assert await afeedback_for(ledger, "t-1\x00") == []
    assert await afeedback_for(ledger, "t-1\udc00") == []
    with pytest.raises(UserError, match="No run 't-1\\\\x00' in the ledger"):
        await arecord_feedback(ledger, new_feedback("t-1\x00", score=1))


async def test_concurrent_first_writes_create_the_table_once(ledger: Ledger) -> None:
    await a_run(ledger)
    await asyncio.gather(
        *(arecord_feedback(ledger, new_feedback("t-1", score=i)) for i in range(12))
    )
    assert sorted(f.score for f in await afeedback_for(ledger, "t-1")) == [
        float(i) for i in range(12)
    ]


def test_the_sync_api_and_keel_eval_feedback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path}/keel.db"
    ledger = Ledger(url)
    asyncio.run(a_run(ledger, "t-9"))
    # none yet, and a mistyped run: both printed nothing at all, exit 0
    assert eval_main(["feedback", "t-9", "--db", url]) == 0
    assert capsys.readouterr().out == "keel eval feedback: no feedback on 't-9' yet.\n"
    assert eval_main(["feedback", "t-nine", "--db", url]) == 2
    out_err = capsys.readouterr()
    assert out_err.out == "" and "keel eval feedback: No run 't-nine' in the ledger." in out_err.err
    record_feedback(ledger, new_feedback("t-9", score=0, comment="wrong order"))
    assert [f.comment for f in feedback_for(ledger, "t-9")] == ["wrong order"]
    ledger.close()
    assert eval_main(["feedback", "t-9", "--score", "5", "--user", "cy", "--db", url]) == 0
    assert eval_main(["feedback", "t-9", "--db", url]) == 0
    out = capsys.readouterr().out
    assert "feedback recorded on t-9" in out and "score 5  by cy" in out and "wrong order" in out
    assert out.count("t-9:") == 2  # listed by run key
    assert eval_main(["feedback", "nope", "--score", "1", "--db", url]) == 2
    assert "No run 'nope'" in capsys.readouterr().err


def test_keel_eval_feedback_on_a_database_that_is_not_there_says_so_at_once(
    tmp_path: Path, postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not an empty SQLite file at a mistyped path, nor the ledger pool's 10 s of retries."""
    missing = tmp_path / "typo" / "keel.db"
    assert eval_main(["feedback", "t-1", "--db", f"sqlite:///{missing}"]) == 2
    assert f"No keel database at {missing}: check --db" in capsys.readouterr().err
    assert not missing.parent.exists()
    typo = postgres_url.rsplit("/", 1)[0] + "/keel_no_such_db"
    start = time.monotonic()
    assert eval_main(["feedback", "t-1", "--score", "1", "--db", typo]) == 2
    assert time.monotonic() - start < 5
    assert 'database "keel_no_such_db" does not exist' in capsys.readouterr().err
    assert eval_main(["feedback", "t-1", "--db", "mysql://x/y"]) == 2  # not a traceback
    assert "keel eval feedback: " in capsys.readouterr().err
