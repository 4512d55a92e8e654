"""`keel report --by version` and satisfaction, on the records and feedback of real runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from keel import Ledger, RunContext, build_agent
from keel.app.cli import main
from keel.app.report import UNVERSIONED, build_report, by_version
from keel.db.runs import RunLog, RunRecord
from keel.evals import ScriptedChatModel, new_feedback, record_feedback
from keel.evals.scripted import call
from keel.guards import Policy
from keel.tools import tool


@tool(name="lookup")
def lookup(key: str) -> str:
    """Look a key up."""
    return f"value of {key}"


def _runs(url: str) -> None:
    """v1: two runs, both complete; v2: three, one over its budget. Feedback on some."""
    ledger = Ledger(url)
    plans: list[tuple[str, str, list[Any], dict[str, Any], float | None]] = [
        ("v1", "t1", [call("lookup", key="a"), "a"], {}, 1.0),
        ("v1", "t2", ["plain"], {}, 0.0),
        ("v2", "t3", [call("lookup", key="b"), "b"], {}, 1.0),
        ("v2", "t4", ["plain"], {}, None),
        ("v2", "t5", [call("lookup", key="c"), "never"], {"budget": {"model_calls": 1}}, None),
    ]
    for version, thread, script, extra, score in plans:
        rules = [{"tool": "*", "action": "allow"}]
        policy = Policy.from_dict({"name": "p", "rules": rules, **extra})
        agent = build_agent(
            ScriptedChatModel(script=script),
            [lookup],
            system_prompt=f"prompt of {version}",
            policy=policy,
            ledger=ledger,
            version=version,
        )
        agent.invoke(
            {"messages": [("user", "go")]},
            {"configurable": {"thread_id": thread}},
            context=RunContext(user_id="u1", tenant_id="acme"),
        )
        if score is not None:
            record_feedback(ledger, new_feedback(thread, score=score, user="ada"))
    record_feedback(ledger, new_feedback("t4", comment="no score, not averaged"))
    ledger.close()


def test_report_by_version_compares_runs_outcomes_cost_and_satisfaction(
    db_url: str, tmp_path: Path, capsys: Any
) -> None:
    _runs(db_url)
    html = tmp_path / "report.html"
    assert main(["report", "--db", db_url, "--by", "version", "--json", "--html", str(html)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["satisfaction"] == 2 / 3 and report["feedback"] == 3
    v1, v2 = report["versions"]
    assert (v1["version"], v1["runs"], v1["success_rate"]) == ("v1", 2, 1.0)
    assert (v2["version"], v2["runs"], v2["success_rate"]) == ("v2", 3, 2 / 3)
    assert v1["outcomes"] == {"completed": 2}
    assert v2["outcomes"] == {"completed": 2, "budget_exceeded": 1}
    assert (v1["satisfaction"], v1["feedback"]) == (0.5, 2)
    assert (v2["satisfaction"], v2["feedback"]) == (1.0, 1)
    assert v1["steps_per_task"] == (3 + 1) / 2 and v1["tokens_per_request"] > 0
    assert v1["models"] == ["scripted"] and v1["policies"] == ["p@1"]
    assert v1["prompt_hashes"] != v2["prompt_hashes"]
    page = html.read_text()
    assert "Success rate by version" in page and "Satisfaction by version" in page

    assert main(["report", "--db", db_url, "--by", "version"]) == 0
    text = capsys.readouterr().out
    assert "satisfaction: 0.67 (mean of 3 scores)" in text
    rows = {line.split()[0]: line for line in text.splitlines()[-2:]}
    assert set(rows) == {"v1", "v2"} and "budget_exceeded=1" in rows["v2"]


def test_records_without_a_version_or_feedback() -> None:
    old = RunRecord(run_key="a", status="success", terminated_reason="completed", ended_at=1.0)
    paused = RunRecord(run_key="b", status="interrupted", terminated_reason="interrupted")
    (row,) = by_version([old, paused])
    assert (row.version, row.runs, row.satisfaction, row.feedback) == (UNVERSIONED, 1, None, 0)
    report = build_report([old], {"elsewhere": [5.0]})  # feedback on runs not in the report
    assert (report.satisfaction, report.feedback) == (None, 0)


def test_scores_follow_the_report_filters(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/keel.db"
    _runs(url)
    ledger = Ledger(url)
    log = RunLog(ledger)
    assert sorted(len(s) for s in log.scores().values()) == [1, 1, 1]
    assert log.scores(tenant="elsewhere") == {}
    assert log.scores(since=9e12) == {}
    ledger.close()
