"""`keel report`, `keel audit` and `keel health`, on the records of real agent runs."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import chromadb
import pytest
from chromadb.config import Settings
from langchain_core.messages import AIMessage

from keel import Ledger, Persistence, RunContext, build_agent
from keel.app.cli import main
from keel.app.cli_observe import parse_since
from keel.app.health import acheck_health, check_health, readiness, semantic_check
from keel.app.report import Objective, build_report, load_objectives, percentile
from keel.db.runs import RunLog
from keel.errors import KeelError, UserError
from keel.evals import ScriptedChatModel
from keel.evals.scripted import call
from keel.guards import Policy
from keel.tools import tool

RULES = [{"tool": "*", "action": "allow"}]
# model, tools, model | model, tools, model | model | model (its tool call stopped by the
# budget in tool_gate: no tool round)
STEPS = (3 + 3 + 1 + 1) / 4


@tool(name="lookup")
def lookup(key: str) -> str:
    """Look a key up."""
    if key == "bad":
        raise ValueError("no such key")
    return f"value of {key}"


def _runs(url: str) -> None:
    """Four real runs: two completed (one with a failing tool call), one over budget."""
    ledger = Ledger(url)
    scripts: list[tuple[str, list[Any], dict[str, Any]]] = [
        ("u1", [call("lookup", key="a"), "done a"], {}),
        ("u1", [call("lookup", key="bad"), "done bad"], {}),
        ("u2", ["plain answer"], {}),
        ("u2", [call("lookup", key="b"), "never"], {"budget": {"model_calls": 1}}),
    ]
    for user, script, extra in scripts:
        policy = Policy.from_dict({"name": "p", "rules": RULES, **extra})
        agent = build_agent(
            ScriptedChatModel(script=script), [lookup], policy=policy, ledger=ledger
        )
        agent.invoke(
            {"messages": [("user", "go")]},
            context=RunContext(user_id=user, tenant_id="acme" if user == "u1" else "beta"),
        )
    ledger.close()


def test_report_figures_from_real_runs(tmp_path: Path, capsys: Any) -> None:
    url = f"sqlite:///{tmp_path}/keel.db"
    _runs(url)
    assert main(["report", "--db", url, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["runs"] == 4 and report["waiting"] == 0
    assert report["success_rate"] == 0.75
    assert report["error_categories"] == {"budget_exceeded": 1}
    assert report["tools"]["lookup"] == {"calls": 3, "failures": 1, "success_rate": 1 - 1 / 3}
    assert report["steps_per_task"] == STEPS
    assert set(report["cost_per_user"]) == {"u1", "u2"}
    assert 0 < report["latency_p50"] <= report["latency_p95"] <= report["latency_p99"]
    assert report["slo_breaches"] == []

    assert main(["report", "--db", url, "--json", "--tenant", "acme"]) == 0
    assert json.loads(capsys.readouterr().out)["runs"] == 2


def test_slo_breach_exits_non_zero_and_says_which(tmp_path: Path, capsys: Any) -> None:
    url = f"sqlite:///{tmp_path}/keel.db"
    _runs(url)
    slo = tmp_path / "slo.toml"
    slo.write_text("[slo]\nsuccess_rate = { min = 0.9 }\nlatency_p95 = { max = 60 }\n")
    html = tmp_path / "report.html"
    assert main(["report", "--db", url, "--slo", str(slo), "--html", str(html)]) == 1
    err = capsys.readouterr().err
    assert "keel: SLO breached: success_rate is 0.75, objective >= 0.9" in err
    assert "latency_p95" not in err
    page = html.read_text()
    assert page.count("<svg") == 4 and "success_rate is 0.75" in page
    assert "<script" not in page and not re.search(r"(src|href)=", page)


def test_a_period_with_no_runs_breaches_only_a_runs_objective(tmp_path: Path, capsys: Any) -> None:
    """No finished run: the report's rates read 0, which is no measurement. A success-rate
    objective is not breached by a quiet period (it was: `success_rate is 0`, exit 1); an
    operator who wants to hear of one says `runs = { min = 1 }`."""
    url = f"sqlite:///{tmp_path}/keel.db"
    assert main(["db", "setup", "--db", url]) == 0
    slo = tmp_path / "slo.toml"
    slo.write_text("[slo]\nsuccess_rate = { min = 0.9 }\ntool_success_rate = { min = 2 }\n")
    assert main(["report", "--db", url, "--slo", str(slo)]) == 0
    assert "breached" not in capsys.readouterr().err
    slo.write_text("[slo]\nsuccess_rate = { min = 0.9 }\nruns = { min = 1 }\n")
    assert main(["report", "--db", url, "--slo", str(slo)]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        "keel: SLO breached: runs is 0, objective >= 1"
    )


def test_objectives_reject_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "slo.toml"
    bad.write_text("[slo]\nsucess_rate = { min = 0.9 }\n")
    with pytest.raises(UserError, match=re.escape("Unknown SLO metric 'sucess_rate'; use one")):
        load_objectives(bad)
    bad.write_text("[slo]\nsuccess_rate = 0.9\n")
    with pytest.raises(UserError, match=re.escape("must be { min = x } or { max = x }, got 0.9")):
        load_objectives(bad)
    yaml = tmp_path / "slo.yaml"
    yaml.write_text("slo:\n  latency_p99: {max: .nan}\n")
    with pytest.raises(UserError, match=re.escape("'latency_p99' in")):
        load_objectives(yaml)  # a NaN objective would be breached always (or never)
    yaml.write_text("slo:\n  latency_p99: {max: 2.5}\n")
    assert load_objectives(yaml) == [Objective(metric="latency_p99", bound="max", target=2.5)]
    bad.write_bytes(b"[slo]\nsuccess_rate = { min = 0.9 } # \xff\n")
    with pytest.raises(
        UserError,
        match=re.escape("is not UTF-8 text (invalid start byte at byte 37): save it as UTF-8."),
    ):
        load_objectives(bad)


def test_percentiles_and_empty_report() -> None:
    assert percentile([], 95) == 0.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    empty = build_report([])
    assert (empty.runs, empty.success_rate, empty.tool_success_rate) == (0, 0.0, 1.0)


def test_keel_audit_lists_records_as_text_and_json(tmp_path: Path, capsys: Any) -> None:
    url = f"sqlite:///{tmp_path}/keel.db"
    _runs(url)
    assert main(["audit", "--db", url, "--user", "u1", "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(r["tool"], r["status"]) for r in lines] == [("lookup", "success"), ("lookup", "error")]
    assert [r["tool_version"] for r in lines] == ["1", "1"]
    assert main(["audit", "--db", url, "--since", "1h"]) == 0
    out = capsys.readouterr().out
    assert "budget   exceeded" in out and "user=u2" in out and " version=1 " in out
    assert main(["audit", "--db", url, "--since", "2999-01-01"]) == 0
    assert capsys.readouterr().out == "keel: no audit records match.\n"


def test_since_accepts_iso_times_and_ages() -> None:
    assert parse_since("2h", now=10_000.0) == 10_000.0 - 7200
    assert parse_since("2026-12-01") == 1796083200.0
    with pytest.raises(KeelError, match=re.escape("--since 'yesterday' is neither an ISO time")):
        parse_since("yesterday")


def test_a_chroma_folder_that_fails_its_check_passes_it_once_mended(tmp_path: Path) -> None:
    """chromadb cached the client that failed to start: every later check in the process (the
    health endpoint's) failed with `'RustBindingsAPI' object has no attribute 'bindings'`."""
    chroma = tmp_path / "chroma"
    chroma.mkdir()
    (chroma / "chroma.sqlite3").write_bytes(b"not a database" * 10)
    db = f"sqlite:///{tmp_path}/keel.db"

    def check() -> Any:
        return next(c for c in readiness(db=db, chroma=chroma).checks if c.name == "chroma")

    broken = check()
    assert not broken.ok and "file is not a database" in broken.detail
    (chroma / "chroma.sqlite3").unlink()
    mended = check()
    assert mended.ok, mended.detail


def test_keel_health_finds_a_chroma_folder_under_the_home_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """`--chroma=~/mem` (no shell expands it) failed: `no Chroma directory at '~/mem'`."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KEEL_MODEL", raising=False)
    client = chromadb.PersistentClient(
        path=str(tmp_path / "mem"), settings=Settings(anonymized_telemetry=False)
    )
    client.close()
    db = f"sqlite:///{tmp_path}/keel.db"
    (chroma,) = [c for c in readiness(db=db, chroma="~/mem").checks if c.name == "chroma"]
    assert chroma.ok, chroma.detail
    assert main(["health", "--chroma=~/mem", "--db", db, "--json"]) == 1  # no model configured
    checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)["checks"]}
    assert checks["chroma"]["ok"], checks["chroma"]
    assert not (tmp_path / "~").exists()


def _answers(text: str) -> ScriptedChatModel:
    return ScriptedChatModel(script=[call("add", a=17, b=25), text])


def test_health_checks_database_chroma_model_and_a_known_task(tmp_path: Path) -> None:
    chroma = tmp_path / "chroma"
    chromadb.PersistentClient(path=str(chroma), settings=Settings(anonymized_telemetry=False))
    url = f"sqlite:///{tmp_path}/keel.db"
    Persistence(url).setup()
    health = check_health(db=url, chroma=chroma, model=_answers("It is 42."), semantic=True)
    assert [(c.name, c.ok) for c in health.checks] == [
        ("live", True),
        ("database", True),
        ("chroma", True),
        ("model", True),
        ("semantic", True),
    ], health.to_dict()
    wrong = semantic_check(_answers("It is 41."))
    assert (
        not wrong.ok
        and wrong.detail == "AssertionError: expected 42 in the answer, got 'It is 41.'"
    )
    no_tool = semantic_check(ScriptedChatModel(script=[AIMessage(content="42")]))
    assert no_tool.detail == "AssertionError: the agent answered without calling the add tool"


def test_async_health_runs_the_same_checks(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/keel.db"
    Persistence(url).setup()
    health = asyncio.run(acheck_health(db=url, model=_answers("42"), semantic=True))
    assert health.ok and [c.name for c in health.checks][-1] == "semantic"


def test_keel_demo_records_what_keel_report_and_audit_show(tmp_path: Path, capsys: Any) -> None:
    url = f"sqlite:///{tmp_path}/keel.db"
    assert main(["demo", "--db", url, "--approve"]) == 0
    capsys.readouterr()
    assert main(["report", "--db", url, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["runs"], report["success_rate"], report["intervention_rate"]) == (1, 1.0, 1.0)
    assert main(["audit", "--db", url, "--json"]) == 0
    records = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    approval = next(r for r in records if r["kind"] == "approval")
    assert (approval["tool"], approval["decision"], approval["approver"]) == (
        "issue_refund",
        "approved",
        "cli",
    )


def test_keel_health_fails_without_a_model(
    tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KEEL_MODEL", raising=False)
    url = f"sqlite:///{tmp_path}/keel.db"
    assert main(["health", "--db", url]) == 1
    assert "FAIL database: SetupError: cannot open the SQLite database" in capsys.readouterr().out
    Persistence(url).setup()
    assert main(["health", "--db", url]) == 1
    out = capsys.readouterr().out
    assert "ok   database: checkpoints and ledger ready at sqlite:///" in out
    assert "FAIL model: UserError: no model configured: set KEEL_MODEL" in out
    assert main(["health", "--db", "postgresql://nobody@127.0.0.1:1/none", "--json"]) == 1
    checks = json.loads(capsys.readouterr().out)["checks"]
    assert checks[1]["name"] == "database" and not checks[1]["ok"]


def test_run_records_of_the_runs(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/keel.db"
    _runs(url)
    records = RunLog(Ledger(url)).query()
    assert [(r.user_id, r.status, r.tool_failures) for r in records] == [
        ("u1", "success", 0),
        ("u1", "success", 1),
        ("u2", "success", 0),
        ("u2", "stopped", 0),
    ]


def test_keel_audit_says_when_its_limit_left_later_records_out(tmp_path: Path, capsys: Any) -> None:
    url = f"sqlite:///{tmp_path}/keel.db"
    _runs(url)  # five audit records: four tool calls and a budget event
    assert main(["audit", "--db", url, "--limit", "2", "--json"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 2
    assert "keel: showing the first 2 records that match; narrow them" in captured.err
    assert main(["audit", "--db", url, "--limit", "50"]) == 0
    assert "showing the first" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["audit", "--user", ""],
        ["audit", "--thread", " "],
        ["audit", "--decision", ""],
        ["report", "--tenant", ""],
    ],
    ids=["audit-user", "audit-thread", "audit-decision", "report-tenant"],
)
def test_an_empty_filter_is_refused_naming_it(tmp_path: Path, capsys: Any, argv: list[str]) -> None:
    """It matched nothing: `keel: no audit records match.` or a report of no runs, exit 0."""
    url = f"sqlite:///{tmp_path}/keel.db"
    _runs(url)
    capsys.readouterr()
    assert main([*argv, "--db", url]) == 2
    option = argv[1]
    assert capsys.readouterr().err == (
        f"keel: {option} is empty: give the {option[2:]} to show, or leave {option} out for all "
        "of them.\n"
    )


def test_a_mistyped_decision_says_which_decisions_the_log_holds(
    tmp_path: Path, capsys: Any
) -> None:
    """`--decision orphan` (for `orphaned`) said only "no audit records match"."""
    url = f"sqlite:///{tmp_path}/keel.db"
    _runs(url)
    capsys.readouterr()
    assert main(["audit", "--db", url, "--decision", "alow"]) == 0
    out = capsys.readouterr()
    assert out.out == "keel: no audit records match.\n"
    assert out.err == (
        "keel: no record in this log has the decision 'alow'; it holds allow, exceeded "
        "(`--decision orphaned` lists the calls a crash left).\n"
    )
    assert main(["audit", "--db", url, "--decision", "allow", "--user", "nobody"]) == 0
    assert capsys.readouterr().err == ""  # a decision the log holds: none of them matched
    assert main(["audit", "--db", url, "--decision", "exceeded", "--json"]) == 0
    assert [json.loads(x)["kind"] for x in capsys.readouterr().out.splitlines()] == ["budget"]
