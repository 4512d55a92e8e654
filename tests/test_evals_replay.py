"""Replay of stored threads (cassettes), capture of failed threads, shadow comparison.

Threads are stored by a real keel agent on real SQLite and PostgreSQL (`db_url`), with the
ledger on the same database; replays run on keel's demo agent, whose tools record every body
that really runs (`keel.evals.record_execution`), so "no side effect ran again" is counted,
not assumed.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command
from typing_extensions import TypedDict

from keel import RunContext
from keel.app.cli import main as keel_main
from keel.app.demo import DEMO_TASK, SYSTEM_PROMPT, DemoShop, demo_policy, demo_tools
from keel.db.ledger import Ledger
from keel.db.persistence import Persistence
from keel.errors import UserError
from keel.evals import (
    Cassette,
    ScriptedChatModel,
    aload_thread,
    areplay,
    ashadow,
    builtin_suite,
    call,
    capture,
    load_suite,
    replay,
)
from keel.evals.builtin import demo_agent, recorded
from keel.evals.capture import case_of
from keel.evals.demo import demo_model
from keel.evals.executions import recording
from keel.graphs import build_agent
from keel.guards.policy import Budget, Policy, Rule

ALICE = RunContext(user_id="alice", tenant_id="acme", roles=("customer",))
DEMO = "keel.evals.builtin:demo_agent"
REFUND = {"order_id": "A1001", "amount": 42.5, "reason": "arrived damaged"}


async def store_thread(
    url: str,
    thread: str,
    model: BaseChatModel | None = None,
    *,
    approval: str = "approve",
    policy: Policy | None = None,
    shop: DemoShop | None = None,
    plan: bool = False,
    tasks: tuple[str, ...] = (DEMO_TASK,),
) -> dict[str, Any]:
    """Run the demo scenario (`tasks`: a run each) on a real checkpointer and ledger at `url`;
    the final state."""
    ledger = Ledger(url)
    try:
        async with Persistence(url).acheckpointer() as saver:
            agent = build_agent(
                model or demo_model(),
                recorded(demo_tools(shop or DemoShop())),
                system_prompt=SYSTEM_PROMPT,
                policy=policy or demo_policy(),
                plan=plan,
                ledger=ledger,
                checkpointer=saver,
            )
            config: Any = {"configurable": {"thread_id": thread}}
            for task in tasks:
                state = await agent.ainvoke({"messages": [("user", task)]}, config, context=ALICE)
                while state["outcome"]["status"] == "interrupted":
                    answer = Command(resume={"type": approval, "reviewer": "ops"})
                    state = await agent.ainvoke(answer, config, context=ALICE)
            return dict(state)
    finally:
        await ledger.aclose()


def names(trajectory: list[Any]) -> list[str]:
    return [t.name for t in trajectory]


# -- replay with the cassette ------------------------------------------------------------------


async def test_a_cassette_replay_repeats_the_run_and_runs_no_tool_again(db_url: str) -> None:
    shop = DemoShop()
    with recording() as first:
        final = await store_thread(db_url, "t-refund", shop=shop)
    assert final["outcome"]["terminated_reason"] == "completed" and shop.refunds == [
        ("A1001", 42.5)
    ]
    assert [e.tool for e in first].count("issue_refund") == 1

    diff = await areplay("t-refund", DEMO, db=db_url, identity=ALICE)

    assert not diff.changed, diff.lines()
    assert names(diff.replayed.trajectory) == ["lookup_order", "search_policy", "issue_refund"]
    assert diff.replayed.trajectory == diff.recorded.trajectory
    assert diff.replayed.outcome["terminated_reason"] == "completed"
    assert diff.replayed.usd == diff.recorded.usd > 0 and diff.tokens_delta == 0
    # every tool call was answered from the cassette: no tool body ran, the refund not again
    assert diff.executions == [] and shop.refunds == [("A1001", 42.5)]
    assert [c.name for c in diff.from_cassette] == ["lookup_order", "search_policy", "issue_refund"]
    assert diff.mode == "cassette" and diff.recorded_graph == "keel_agent"


async def test_a_live_model_with_fresh_ids_gets_the_recorded_side_effect_not_a_second_one(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path}/keel.db"
    await store_thread(url, "t1")
    same = ScriptedChatModel(
        script=[
            call("lookup_order", order_id="A1001"),
            call("search_policy", topic="refunds for damaged items"),
            call("issue_refund", REFUND),
            "Refunded.",
        ],
        fresh_ids=True,  # a real model names its calls anew: matching must not use ids
    )
    diff = await areplay("t1", DEMO, db=url, live=True, model=same, identity=ALICE)
    assert not diff.trajectory_changed and not diff.outcome_changed, diff.lines()
    assert diff.replayed.trajectory[2].status == "success"
    assert diff.executions == [] and diff.unrecorded == []
    ids = {tc["id"] for a in same.answers for tc in a.tool_calls}
    assert not ids & {"call_0_0", "call_1_0", "call_2_0"}  # the ids really were fresh


async def test_a_live_replay_on_a_changed_model_reports_the_diff(db_url: str) -> None:
    await store_thread(db_url, "t-live")
    changed = ScriptedChatModel(
        script=[
            call("lookup_order", order_id="A1001"),
            call("issue_refund", order_id="A1001", amount=10.0, reason="goodwill"),
            "I refunded $10.",
        ]
    )
    diff = await areplay("t-live", DEMO, db=db_url, live=True, model=changed, identity=ALICE)

    assert diff.changed and diff.mode == "live" and diff.divergence == 1
    assert names(diff.recorded.trajectory) == ["lookup_order", "search_policy", "issue_refund"]
    assert names(diff.replayed.trajectory) == ["lookup_order", "issue_refund"]
    # the unrecorded refund was stubbed, never run; the read-only lookup came from the cassette
    assert [(c.name, c.args["amount"]) for c in diff.unrecorded] == [("issue_refund", 10.0)]
    assert diff.replayed.trajectory[1].status == "error"
    assert "issue_refund" not in [e.tool for e in diff.executions]
    assert diff.tokens_delta < 0 and diff.usd_delta < 0
    text = "\n".join(diff.lines())
    assert "trajectory: differs from call 2" in text and "stubbed, not run): issue_refund" in text


async def test_replay_from_a_middle_checkpoint_by_step_and_by_id(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/keel.db"
    await store_thread(url, "t-mid")
    stored = await aload_thread("t-mid", db=url)
    # the first checkpoint whose history holds the lookup's result
    middle = next(c for c in stored.checkpoints if sum(m.type == "tool" for m in c.messages) == 1)
    by_step = await areplay(stored, DEMO, start=middle.step, identity=ALICE)
    by_id = await areplay(stored, DEMO, start=middle.id, identity=ALICE)
    for diff in (by_step, by_id):
        assert not diff.changed, diff.lines()
        assert names(diff.replayed.trajectory) == ["search_policy", "issue_refund"]
        assert names(diff.recorded.trajectory) == ["search_policy", "issue_refund"]
        assert diff.start == f"step {middle.step} ({middle.id})"
    assert by_step.replayed.usd < (await areplay(stored, DEMO, identity=ALICE)).replayed.usd
    with pytest.raises(UserError, match="no checkpoint '999'; give a checkpoint id or a step"):
        await areplay(stored, DEMO, start="999")
    with pytest.raises(UserError, match="holds no messages yet"):
        await areplay(stored, DEMO, start=-1)


async def test_a_cassette_that_runs_out_ends_with_an_outcome_and_says_so(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/keel.db"
    tight = dataclasses.replace(demo_policy(), budget=Budget(tool_calls=1))
    final = await store_thread(url, "t-short", policy=tight)
    assert final["outcome"]["terminated_reason"] == "budget_exceeded"
    # the new version has no such budget: it asks the cassette for answers it never recorded
    diff = await areplay("t-short", DEMO, db=url, identity=ALICE)
    assert diff.cassette_exhausted and diff.raised is None, diff.lines()
    assert (diff.replayed.outcome["status"], diff.replayed.outcome["terminated_reason"]) == (
        "error",
        "error",
    )
    assert "The cassette ran out: it recorded 2 model answers" in diff.replayed.outcome["detail"]
    assert "the cassette ran out of model answers" in "\n".join(diff.lines())
    # the read-only call the recorded run never made (its budget stopped it) ran for real
    assert [e.tool for e in diff.executions] == ["search_policy"]


def planned_agent(model: BaseChatModel) -> Any:
    """A version that plans first (a structured `Plan` answer before the first model turn)."""
    return build_agent(
        model, recorded(demo_tools(DemoShop())), system_prompt=SYSTEM_PROMPT, plan=True,
        policy=demo_policy(), checkpointer=InMemorySaver(),
    )  # fmt: skip


async def test_a_planning_version_gets_the_recorded_plan_or_a_clear_outcome(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path}/keel.db"
    await store_thread(url, "t-plan", plan=True)
    await store_thread(url, "t-noplan")
    diff = await areplay("t-plan", planned_agent, db=url, identity=ALICE)
    assert not diff.changed and diff.executions == [], diff.lines()
    # a thread that never planned has no plan to play back: keel's planner gives up on the
    # failed structured call and the run goes on unplanned, as recorded
    diff = await areplay("t-noplan", planned_agent, db=url, identity=ALICE)
    assert diff.raised is None and not diff.cassette_exhausted and not diff.changed
    assert diff.executions == []


# -- careless callers ------------------------------------------------------------------------


class Counter(TypedDict):
    count: int


async def test_bad_threads_and_arguments_are_user_errors(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/keel.db"
    await store_thread(url, "t-ok")
    with pytest.raises(UserError, match=r"No thread 'nope' in sqlite:///.*keel threads"):
        await areplay("nope", DEMO, db=url)
    # a thread written by another graph (no messages at all)
    builder = StateGraph(Counter)
    builder.add_node("inc", lambda s: {"count": s["count"] + 1})
    builder.add_edge(START, "inc")
    builder.add_edge("inc", END)
    async with Persistence(url).acheckpointer() as saver:
        await builder.compile(checkpointer=saver).ainvoke(
            {"count": 1}, {"configurable": {"thread_id": "t-counter"}}
        )
    with pytest.raises(UserError, match=r"'t-counter' was not written by a keel agent.*count"):
        await areplay("t-counter", DEMO, db=url)
    with pytest.raises(UserError, match="needs the new model: pass model="):
        await areplay("t-ok", DEMO, db=url, live=True)
    with pytest.raises(UserError, match="answers only a live replay"):
        await areplay("t-ok", DEMO, db=url, model="keel:demo")
    built = demo_agent(demo_model())
    with pytest.raises(UserError, match="replays live only"):
        await areplay("t-ok", built, db=url)
    with pytest.raises(UserError, match=r"Cannot load graph factory 'no\.such:thing'"):
        await areplay("t-ok", "no.such:thing", db=url)
    # a built agent replays live on its own model
    diff = await areplay("t-ok", built, db=url, live=True, identity=ALICE)
    assert not diff.trajectory_changed and diff.executions == []


def test_keel_eval_replay_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import asyncio

    url = f"sqlite:///{tmp_path}/keel.db"
    asyncio.run(store_thread(url, "t-cli"))
    out = tmp_path / "diff.json"
    argv = ["eval", "replay", "t-cli", "--db", url, "--graph", DEMO, "--roles", "customer"]
    assert keel_main([*argv, "--json", str(out), "--out", str(tmp_path / "r")]) == 0
    text = capsys.readouterr().out
    assert "trajectory: same (3 tool calls)" in text
    data = json.loads(out.read_text())
    assert data["changed"] is False and data["executions"] == []
    assert "| t-cli |" in (tmp_path / "r" / "replay.md").read_text()
    assert keel_main(["eval", "replay", "ghost", "--db", url, "--graph", DEMO]) == 2
    assert "No thread 'ghost'" in capsys.readouterr().err
    assert keel_main([*argv, "--from", "77"]) == 2
    assert "no checkpoint '77'" in capsys.readouterr().err
    tape = tmp_path / "t-cli.cassette.json"
    assert keel_main([*argv, "--save-cassette", str(tape)]) == 0
    assert keel_main([*argv, "--cassette", str(tape)]) == 0
    assert "trajectory: same (3 tool calls)" in capsys.readouterr().out
    missing = str(tmp_path / "missing.json")
    assert keel_main([*argv, "--cassette", missing]) == 2
    said = f"Cassette file {missing!r} does not exist. Save one with --save-cassette FILE."
    assert said in capsys.readouterr().err
    # read as every file a user gives keel is (keel._data_files.read_text): bytes that are not
    # UTF-8 were a UnicodeDecodeError traceback, a directory "No cassette file"
    tape.write_bytes(b"\xff\xfe{}")
    assert keel_main([*argv, "--cassette", str(tape)]) == 2
    err = capsys.readouterr().err
    assert "is not UTF-8 text (invalid start byte at byte 0)" in err and "Traceback" not in err
    assert keel_main([*argv, "--cassette", str(tmp_path)]) == 2
    assert "is a directory: pass the file itself." in capsys.readouterr().err
    assert keel_main([*argv, "--json", str(tmp_path)]) == 2  # a folder where a file is due
    assert "Is a directory" in capsys.readouterr().err


def test_keel_eval_replay_of_a_house_model_thread_needs_price(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The cassette plays the recorded model under its name (`house-model`): the demo agent's
    $0.50 limit refuses it until `--price` prices it; both sides' spend is then counted."""
    import asyncio

    from serve.house_model import demo as house_demo

    url = f"sqlite:///{tmp_path}/keel.db"
    unlimited = dataclasses.replace(demo_policy(), budget=None)
    asyncio.run(store_thread(url, "t-house", house_demo(), policy=unlimited))
    argv = ["eval", "replay", "t-house", "--db", url, "--graph", DEMO, "--roles", "customer"]
    assert keel_main(argv) == 2
    assert "no price for model 'house-model'" in capsys.readouterr().err
    out = tmp_path / "diff.json"
    assert keel_main([*argv, "--price", "house-model=1,2", "--json", str(out)]) == 0
    assert "trajectory: same (3 tool calls)" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["recorded"]["usd"] == data["replayed"]["usd"] > 0
    assert keel_main([*argv, "--price", "house-model"]) == 2
    assert "--price 'house-model': give MODEL=INPUT,OUTPUT" in capsys.readouterr().err
    shadow = ["eval", "shadow", "--threads", "t-house", "--db", url, "--candidate", DEMO]
    shadow += ["--out", str(tmp_path / "shadow")]
    assert keel_main(shadow) == 2
    assert "no price for model 'house-model'" in capsys.readouterr().err
    assert keel_main([*shadow, "--price", "house-model=1,2"]) == 0
    assert "trajectory: same (3 tool calls)" in capsys.readouterr().out


# -- capture ---------------------------------------------------------------------------------


def test_capture_turns_a_failed_thread_into_a_case_keel_eval_runs(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import asyncio

    # production: the reviewer rejected a refund the customer was owed
    final = asyncio.run(store_thread(db_url, "t-failed", approval="reject"))
    assert final["outcome"]["terminated_reason"] == "rejected"
    suite = tmp_path / "regressions.yaml"
    base = ["eval", "capture", "t-failed", "--db", db_url, "--suite", str(suite)]
    assert keel_main([*base, "--graph", DEMO, "--roles", "customer", "--id", "observed"]) == 0
    assert keel_main([*base, "--expect", "success/completed", "--id", "should-refund"]) == 0
    assert "appended case 'should-refund'" in capsys.readouterr().out
    text = suite.read_text()
    assert text.count("# TODO: set the outcome this run SHOULD have had") == 1
    assert "observed outcome: stopped/rejected" in text
    loaded = load_suite(suite)
    observed, fixed = loaded.cases
    assert loaded.graph == DEMO and observed.identity.roles == ("customer",)
    assert observed.approvals == "reject" and observed.expect.status is None
    assert [c["name"] for c in observed.expect.trajectory.calls] == [  # type: ignore[union-attr]
        "lookup_order", "search_policy", "issue_refund",
    ]  # fmt: skip
    assert (fixed.expect.status, fixed.expect.terminated_reason) == ("success", "completed")
    # the same id twice is refused, and the file is left as it was; so is a misspelt outcome
    assert keel_main([*base, "--id", "observed"]) == 2
    assert keel_main([*base, "--expect", "success/complete", "--id", "typo"]) == 2
    assert "--expect: terminated_reason must be one of ['completed'," in capsys.readouterr().err
    assert suite.read_text() == text
    # keel eval runs the captured cases offline: the observed one passes, the fixed one fails
    assert keel_main(["eval", str(suite), "--out", str(tmp_path / "out")]) == 1
    out = capsys.readouterr().out
    assert "PASS observed #0 stopped/rejected" in out
    assert "FAIL should-refund #0 stopped/rejected" in out and "failed: outcome" in out


def test_capture_takes_the_run_that_failed_not_the_thread_s_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A chat thread fails in a later run: capture took its first run (which passed) and wrote
    the thread's outcome beside it, a case that could never catch the regression."""
    import asyncio

    url = f"sqlite:///{tmp_path}/keel.db"
    greeting = "Hi! What can I do for you?"
    model = ScriptedChatModel(script=[greeting, *demo_model().script])  # type: ignore[attr-defined]
    final = asyncio.run(
        store_thread(url, "t-two", model, approval="reject", tasks=("Hello", DEMO_TASK))
    )
    assert final["outcome"]["terminated_reason"] == "rejected"
    stored = asyncio.run(aload_thread("t-two", db=url))
    last = case_of(stored)  # the default: the last run, the one that failed
    assert last["id"] == "thread-t-two" and last["approvals"] == "reject"
    assert last["messages"] == [  # the run before it, as text, then the run's own input
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": greeting},
        {"role": "user", "content": DEMO_TASK},
    ]
    calls = last["expect"]["trajectory"]["calls"]
    assert [c["name"] for c in calls] == ["lookup_order", "search_policy", "issue_refund"]
    assert last["model"]["script"][0] == greeting  # the history's answer, never played
    assert len(last["model"]["script"]) == 4  # then the run's three (a rejection ended it)
    first = case_of(stored, run=1)
    assert first["id"] == "thread-t-two-run-1" and first["messages"] == last["messages"][:1]
    assert first["model"]["script"] == [greeting] and first["expect"]["trajectory"]["calls"] == []
    assert case_of(stored, run=-2) == first
    for wrong in (0, 3, -3, True, "1"):
        with pytest.raises(UserError, match="has 2 runs: give 1 to 2, or -1 for the last"):
            case_of(stored, run=wrong)  # type: ignore[arg-type]
    # the CLI: the case says which run it is and whose outcome it observed; both cases run
    suite = tmp_path / "s.yaml"
    capture = ["eval", "capture", "t-two", "--db", url, "--suite", str(suite)]
    capture += ["--roles", "customer"]
    assert keel_main([*capture, "--graph", DEMO]) == 0
    assert keel_main([*capture, "--run", "1"]) == 0
    assert keel_main([*capture, "--run", "5"]) == 2
    assert "Thread 't-two' has no run 5; it has 2 runs" in capsys.readouterr().err
    text = suite.read_text()
    assert "# captured from thread t-two, run 2 of 2 (observed outcome: stopped/rejected)" in text
    assert "# captured from thread t-two, run 1 of 2 (its outcome is not kept" in text
    assert keel_main(["eval", str(suite), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "PASS thread-t-two #0 stopped/rejected" in out
    assert "PASS thread-t-two-run-1 #0 success/completed" in out


def test_capture_appends_to_a_suite_with_its_own_indentation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import asyncio

    url = f"sqlite:///{tmp_path}/keel.db"
    asyncio.run(store_thread(url, "t-ind"))
    suite = tmp_path / "s.yaml"
    suite.write_text("name: s\nmodel: keel:demo\ncases:\n- id: one\n  input: hi\n")
    assert keel_main(["eval", "capture", "t-ind", "--db", url, "--suite", str(suite)]) == 0
    assert [c.id for c in load_suite(suite).cases] == ["one", "thread-t-ind"]
    suite.write_text("name: s\ncases:\n  - id: one\n    input: hi\nmodel: keel:demo\n")
    before = suite.read_text()
    assert keel_main(["eval", "capture", "t-ind", "--db", url, "--suite", str(suite)]) == 2
    assert suite.read_text() == before
    as_json = tmp_path / "s.json"  # capture writes YAML: a JSON suite is refused, untouched
    as_json.write_text('{"cases": [{"id": "one", "input": "hi"}]}')
    assert keel_main(["eval", "capture", "t-ind", "--db", url, "--suite", str(as_json)]) == 2
    assert as_json.read_text() == '{"cases": [{"id": "one", "input": "hi"}]}'
    assert "capture writes YAML; give a .yaml suite file" in capsys.readouterr().err


def test_capture_into_a_new_suite_takes_a_home_folder_and_any_file_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--suite=~/…` (no shell expands it) wrote into a folder named `~` here, then said the
    suite did not exist; a file named `*x.yaml` got `name: *x`, not YAML, and was left broken."""
    import asyncio

    url = f"sqlite:///{tmp_path}/keel.db"
    asyncio.run(store_thread(url, "t-names"))
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    capture = ["eval", "capture", "t-names", "--db", url]
    assert keel_main([*capture, "--suite=~/regs/r.yaml"]) == 0
    assert [c.id for c in load_suite(home / "regs" / "r.yaml").cases] == ["thread-t-names"]
    assert not (work / "~").exists()
    for name in ("*x.yaml", "@x.yaml", "a: b.yaml", "#1.yaml", "[r].yaml"):
        assert keel_main([*capture, "--suite", name]) == 0, capsys.readouterr().err
        suite = load_suite(work / name)
        assert suite.name == Path(name).stem and [c.id for c in suite.cases] == ["thread-t-names"]
    capsys.readouterr()
    assert keel_main([*capture, "--suite", "e.yaml", "--id", " "]) == 2  # not thread-<id>
    assert capsys.readouterr().err == (
        "keel eval capture: The case id is empty: give one (--id NAME), or leave it out for "
        "thread-<THREAD>.\n"
    )
    assert not (work / "e.yaml").exists()


# -- shadow ----------------------------------------------------------------------------------


def strict_agent(model: BaseChatModel) -> Any:
    """A candidate version: refunds are denied by policy."""
    policy = demo_policy()
    deny = Rule(action="deny", tool="issue_refund")
    policy = dataclasses.replace(policy, rules=(deny, *policy.rules), version="2")
    return build_agent(
        model, recorded(demo_tools(DemoShop())), system_prompt=SYSTEM_PROMPT, policy=policy,
        checkpointer=InMemorySaver(),
    )  # fmt: skip


async def test_shadow_reports_differences_with_side_effects_stubbed() -> None:
    result = await ashadow(builtin_suite("demo"), DEMO, strict_agent)
    approved, rejected = result.pairs
    # the refund is denied now: the trajectory differs and the case fails (tool_success)
    assert approved.trajectory_changed and approved.changed and not approved.outcome_changed
    assert [t.status for t in approved.candidate.trajectory][-1] == "denied"
    assert approved.baseline.passed and not approved.candidate.passed
    # where a human rejected the refund, the candidate never asks: the outcome differs
    assert rejected.outcome_changed
    assert rejected.baseline.outcome["terminated_reason"] == "rejected"
    assert rejected.candidate.outcome["terminated_reason"] == "completed"
    # the baseline's approved refund was answered by the stub: its body never ran anywhere
    assert [c.name for c in result.stubbed["baseline"]] == ["issue_refund"]
    assert result.stubbed["candidate"] == []
    ran = [e.tool for p in result.pairs for r in (p.baseline, p.candidate) for e in r.executions]
    assert "issue_refund" not in ran and "lookup_order" in ran  # read-only tools do run
    assert result.side_effects_run() == 0
    s = result.summary()
    assert s["outcome_changed"] == 1 and s["trajectory_changed"] == 2
    assert s["baseline_pass_rate"] == 1.0
    assert s["candidate_pass_rate"] < 1.0


def test_keel_eval_shadow_cli_writes_the_reports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["eval", "shadow", "demo", "--candidate", "test_evals_replay:strict_agent"]
    assert keel_main([*argv, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "CHANGED refund-approved #0" in out and "side effects run: 0" in out
    data = json.loads((tmp_path / "shadow.json").read_text())
    assert data["summary"]["stubbed_calls"] == {"baseline": 1, "candidate": 0}
    html = (tmp_path / "shadow.html").read_text()
    assert "CHANGED" in html and "<script" not in html
    assert "| refund-approved | 0 | CHANGED |" in (tmp_path / "shadow.md").read_text()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["shadow", "demo", "--candidate", ""], "--candidate is empty: give it a value, or leave"),
        (["shadow", "demo", "--candidate-model", " "], "--candidate-model is empty: give it"),
        (["shadow", "demo", "--candidate", "test_evals_replay:strict_agent", "--out", ""], "--out"),
        (["replay", "t", "--graph", ""], "--graph is empty: give it a value.\n"),
        (["replay", "t", "--graph", "x:y", "--json", ""], "--json is empty: give it a value, or"),
        (["replay", "t", "--graph", "x:y", "--cassette", ""], "--cassette is empty"),
        (["capture", "t", "--suite", ""], "--suite is empty: give it a value.\n"),
    ],
)
def test_an_empty_option_of_shadow_replay_or_capture_is_refused_before_anything_runs(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    """`--candidate ""` (a variable that was not set) shadowed the current version against
    itself and reported `0/2 changed`; an empty `--json`, `--out` or `--cassette` was ignored."""
    monkeypatch.chdir(tmp_path)
    assert keel_main(["eval", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"keel eval {argv[0]}: ") and message in err
    assert not (tmp_path / ".keel").exists()  # nothing ran, no report folder


SEEN: list[Any] = []


def who_graph(model: BaseChatModel) -> Any:
    """A graph that notes who it runs for (the run's `RunContext`) and answers."""
    from langchain_core.messages import AIMessage
    from langgraph.graph import MessagesState
    from langgraph.runtime import Runtime

    def answer(state: MessagesState, runtime: Runtime[RunContext]) -> dict[str, Any]:
        SEEN.append(runtime.context)
        return {"messages": [AIMessage("ok")]}

    g = StateGraph(MessagesState, context_schema=RunContext)
    g.add_node("answer", answer)
    g.add_edge(START, "answer")
    g.add_edge("answer", END)
    return g.compile(checkpointer=InMemorySaver())


def test_replay_roles_alone_run_for_the_threads_user_and_tenant(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--roles` alone replayed as user `replay-user` of tenant `default`, not the thread's
    (as the help says): another user's budgets, memories and tenant policy."""
    import asyncio

    url = f"sqlite:///{tmp_path}/keel.db"
    asyncio.run(store_thread(url, "t-who"))
    replay = ["eval", "replay", "t-who", "--db", url, "--graph", "test_evals_replay:who_graph"]
    SEEN.clear()
    assert keel_main([*replay, "--roles", "customer, vip"]) == 0, capsys.readouterr().err
    assert [(c.user_id, c.tenant_id, c.roles) for c in SEEN] == [
        (ALICE.user_id, ALICE.tenant_id, ("customer", "vip"))
    ]
    SEEN.clear()
    assert keel_main([*replay, "--tenant", "beta"]) == 0
    assert [(c.user_id, c.tenant_id) for c in SEEN] == [(ALICE.user_id, "beta")]
    capsys.readouterr()
    for bad, message in (
        (["--roles", ",,"], "--roles ',,' names no role: give them comma-separated"),
        (["--user", ""], "--user is empty: give it a value, or leave --user out."),
        (["--tenant", " "], "--tenant is empty: give it a value, or leave --tenant out."),
    ):
        SEEN.clear()
        assert keel_main([*replay, *bad]) == 2
        assert message in capsys.readouterr().err and SEEN == []
    capture = ["eval", "capture", "t-who", "--db", url, "--suite", str(tmp_path / "s.yaml")]
    assert keel_main([*capture, "--roles", " , "]) == 2  # it captured the case with [user]
    assert "--roles ' , ' names no role" in capsys.readouterr().err
    assert not (tmp_path / "s.yaml").exists()


async def test_shadow_refuses_an_empty_candidate() -> None:
    for options in ({"candidate": ""}, {"candidate_model": " "}):
        with pytest.raises(UserError, match=r"The candidate's .* is empty: name one"):
            await ashadow(builtin_suite("demo"), DEMO, **options)


def test_a_case_on_its_own_graph_is_not_reported_as_shadowed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its `graph:` wins over the candidate too: the report says the candidate never ran it."""
    text = "model: keel:demo\ncases:\n  - {id: plain, input: hi}\n"
    text += "  - {id: own, input: hi, graph: 'keel.evals.builtin:chaos_agent'}\n"
    (tmp_path / "mixed.yaml").write_text(text)
    argv = ["eval", "shadow", str(tmp_path / "mixed.yaml"), "--candidate"]
    argv.append("test_evals_replay:strict_agent")
    assert keel_main([*argv, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "OWN GRAPH (candidate not run) own #0" in out and "OWN GRAPH" not in out.split("\n")[0]
    data = json.loads((tmp_path / "shadow.json").read_text())
    assert data["summary"]["not_compared"] == ["own"]
    assert [p["compared"] for p in data["pairs"]] == [True, False]
    assert "| own | 0 | own graph |" in (tmp_path / "shadow.md").read_text()


def test_keel_eval_shadow_on_stored_threads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import asyncio

    url = f"sqlite:///{tmp_path}/keel.db"
    asyncio.run(store_thread(url, "s1"))
    argv = ["eval", "shadow", "--threads", "s1", "--db", url, "--candidate"]
    assert keel_main([*argv, "test_evals_replay:strict_agent", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "trajectory: differs from call 3" in out and "[denied]" in out
    data = json.loads((tmp_path / "replay.json").read_text())
    assert data["replays"][0]["changed"] and data["replays"][0]["executions"] == []


def test_a_cassette_matches_calls_by_name_and_args_not_by_id() -> None:
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

    from keel.tools import ToolRegistry

    messages = [
        HumanMessage("hi"),
        AIMessage("", tool_calls=[{"name": "issue_refund", "args": REFUND, "id": "a"}]),
        ToolMessage("done once", tool_call_id="a", response_metadata={"keel_status": "success"}),
        AIMessage("", tool_calls=[{"name": "issue_refund", "args": REFUND, "id": "b"}]),
        ToolMessage("no", tool_call_id="b", response_metadata={"keel_status": "denied"}),
    ]
    stub = Cassette.from_messages(messages).tools()
    entry = ToolRegistry(demo_tools()).get("issue_refund")
    assert entry is not None
    first = stub(entry, {"name": "issue_refund", "args": dict(REFUND), "id": "zzz"})
    assert first is not None and first.content == "done once"
    # the second recorded call was refused, not run: nothing to play back; stubbed, not run
    second = stub(entry, {"name": "issue_refund", "args": dict(REFUND), "id": "yyy"})
    assert second is not None and second.status == "error" and "Not run" in second.content


def test_stubbing_holds_inside_its_block_only_under_invoke_and_ainvoke() -> None:
    import asyncio

    from keel.evals.shadow import SideEffectStub
    from keel.tools import stubbing

    def run(agent: Any, thread: str) -> dict[str, Any]:
        config: Any = {"configurable": {"thread_id": thread}}
        agent.invoke({"messages": [("user", DEMO_TASK)]}, config, context=ALICE)
        return dict(agent.invoke(Command(resume={"type": "approve"}), config, context=ALICE))

    shop = DemoShop()
    agent = build_agent(
        demo_model(), demo_tools(shop), system_prompt=SYSTEM_PROMPT, policy=demo_policy(),
        checkpointer=InMemorySaver(),
    )  # fmt: skip
    stub = SideEffectStub()
    with stubbing(stub):
        final = run(agent, "sync")
    assert shop.refunds == [] and [c.name for c in stub.calls] == ["issue_refund"]
    assert "was not run; assume it succeeded" in str(final["messages"][-2].content)
    assert final["messages"][-2].response_metadata["keel_stub"] is True

    async def arun() -> dict[str, Any]:
        config: Any = {"configurable": {"thread_id": "async"}}
        with stubbing(stub):
            await agent.ainvoke({"messages": [("user", DEMO_TASK)]}, config, context=ALICE)
            answer = Command(resume={"type": "approve"})
            return dict(await agent.ainvoke(answer, config, context=ALICE))

    asyncio.run(arun())
    assert shop.refunds == [] and len(stub.calls) == 2
    run(agent, "outside")  # no stub: the refund really happens
    assert shop.refunds == [("A1001", 42.5)] and len(stub.calls) == 2


def test_a_cassette_takes_a_result_the_history_lacks_from_the_ledger_record() -> None:
    from langchain_core.messages import AIMessage, HumanMessage

    from keel.db.idempotency import CallRecord

    messages = [
        HumanMessage("hi"),
        AIMessage("", tool_calls=[{"name": "issue_refund", "args": REFUND, "id": "c1"}]),
    ]  # the process died after the refund ran, before its ToolMessage was checkpointed
    record = CallRecord(
        thread_id="t", tool_call_id="c1", tool="issue_refund", args_digest="d",
        state="completed", result={"content": "Refunded $42.50.", "keel_status": "success"},
        attempts=1, started_at=0.0, finished_at=1.0,
    )  # fmt: skip
    cassette = Cassette.from_messages(messages, {"c1": record})
    assert [(c.name, c.content, c.status) for c in cassette.calls] == [
        ("issue_refund", "Refunded $42.50.", "success")
    ]


async def test_a_thread_of_another_keel_graph_replays_and_says_whose_it_was(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path}/keel.db"
    ledger = Ledger(url)
    async with Persistence(url).acheckpointer() as saver:
        billing = build_agent(
            ScriptedChatModel(script=[call("open_invoice", number="I-7"), "Invoice I-7 is paid."]),
            [], ledger=ledger, checkpointer=saver, name="billing_agent",
        )  # fmt: skip
        config: Any = {"configurable": {"thread_id": "t-billing"}}
        await billing.ainvoke({"messages": [("user", "Is I-7 paid?")]}, config, context=ALICE)
    await ledger.aclose()
    diff = await areplay("t-billing", DEMO, db=url, identity=ALICE)
    assert diff.recorded_graph == "billing_agent" and diff.replayed_graph == "keel_agent"
    assert "written by graph 'billing_agent', replayed on 'keel_agent'" in diff.lines()[1]
    # neither graph has open_invoice: the call is answered unknown on both, and nothing ran
    assert [t.status for t in diff.replayed.trajectory] == ["unknown_tool"]
    assert not diff.trajectory_changed and diff.executions == [] and diff.raised is None


async def test_a_thread_of_several_user_turns_replays_turn_by_turn(db_url: str) -> None:
    script = [
        call("lookup_order", order_id="A1001"),
        "A1001 was delivered.",
        call("lookup_order", order_id="A1002"),
        "A1002 has shipped.",
    ]
    ledger = Ledger(db_url)
    async with Persistence(db_url).acheckpointer() as saver:
        agent = build_agent(
            ScriptedChatModel(script=script), recorded(demo_tools()), policy=demo_policy(),
            ledger=ledger, checkpointer=saver,
        )  # fmt: skip
        config: Any = {"configurable": {"thread_id": "t-turns"}}
        for text in ("Where is A1001?", "And A1002?"):
            await agent.ainvoke({"messages": [("user", text)]}, config, context=ALICE)
    await ledger.aclose()
    stored = await aload_thread("t-turns", db=db_url)
    assert stored.identity.user_id == "alice" and stored.identity.tenant_id == "acme"
    diff = await areplay(stored, DEMO, identity=ALICE)
    assert not diff.changed and diff.executions == [], diff.lines()
    assert [t.args["order_id"] for t in diff.replayed.trajectory] == ["A1001", "A1002"]
    assert diff.replayed.answer == "A1002 has shipped."
    # from a checkpoint inside the second turn: only its call is replayed
    second = next(c for c in stored.checkpoints if sum(m.type == "human" for m in c.messages) == 2)
    diff = await areplay(stored, DEMO, start=second.id, identity=ALICE)
    assert [t.args["order_id"] for t in diff.replayed.trajectory] == ["A1002"]
    assert not diff.changed, diff.lines()


async def test_a_saved_cassette_replays_like_the_thread_and_bad_text_is_refused(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path}/keel.db"
    await store_thread(url, "t-save", plan=True)
    stored = await aload_thread("t-save", db=url)
    saved = tmp_path / "refund.cassette.json"
    saved.write_text(Cassette.from_thread(stored).to_json())
    again = Cassette.from_json(saved.read_text())
    assert again == Cassette.from_thread(stored)
    diff = await areplay(stored, DEMO, cassette=again, identity=ALICE)
    assert not diff.changed and diff.executions == [], diff.lines()
    for bad in ("{}", "not json", '{"answers": [{"type": "human", "data": {"content": "x"}}]}'):
        with pytest.raises(UserError, match="Not a saved cassette"):
            Cassette.from_json(bad)


def test_a_cassette_nested_past_the_parsers_depth_is_refused_not_a_recursion_error() -> None:
    """`--cassette F` on a file of runaway brackets: a `UserError`, not a RecursionError."""
    with pytest.raises(UserError, match="Not a saved cassette"):
        Cassette.from_json('{"answers": ' + "[" * 5000 + "]" * 5000 + "}")


def test_replay_and_capture_on_a_mistyped_sqlite_path_say_so_and_leave_no_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """They only read: opening the path left an empty database there and answered "No thread",
    as if the thread were missing from the right database."""
    typo = tmp_path / "keel.bd"
    url = f"sqlite:///{typo}"
    with pytest.raises(UserError, match=f"No keel database at {re.escape(str(typo))}"):
        replay("t-1", DEMO, db=url, identity=ALICE)
    with pytest.raises(UserError, match="No keel database at"):
        capture("t-1", tmp_path / "s.yaml", db=url)
    assert keel_main(["eval", "replay", "t-1", "--db", url, "--graph", DEMO]) == 2
    assert "No keel database at" in capsys.readouterr().err
    assert not typo.exists() and not (tmp_path / "s.yaml").exists()


def _judged_agent(model: BaseChatModel, checkpointer: Any = None) -> Any:
    """An agent whose judge fails the first, short answer: each run has one revision."""

    def verdict(messages: list[Any]) -> dict[str, Any]:
        short = messages[-1].text.endswith("Answer:\nshort")
        return {"passed": not short, "reason": "Say more."}

    judge = ScriptedChatModel(structured={"JudgeVerdict": verdict})
    return build_agent(model, judge=judge, checkpointer=checkpointer)


async def test_a_thread_with_a_verification_revision_replays_and_captures_as_one_run(
    tmp_path: Path,
) -> None:
    """verify's feedback is a user-role message of keel's: replay sent it again as a user's
    next task (a third model call the cassette did not have: the replay ended `error`), and
    capture cut the run at it (a case with one answer of the two)."""
    url = f"sqlite:///{tmp_path}/keel.db"
    async with Persistence(url).acheckpointer() as saver:
        agent = _judged_agent(ScriptedChatModel(script=["short", "a longer answer"]), saver)
        config: Any = {"configurable": {"thread_id": "t-rev"}}
        done = await agent.ainvoke({"messages": [("user", "Explain X.")]}, config)
    assert done["outcome"]["detail"] == "answer verified" and done["revisions"] == 1
    stored = await aload_thread("t-rev", db=url)
    diff = await areplay(stored, _judged_agent)
    assert not diff.changed and not diff.cassette_exhausted, diff.lines()
    assert (diff.replayed.model_calls, diff.replayed.answer) == (2, "a longer answer")
    case = case_of(stored)
    assert case["messages"] == [{"role": "user", "content": "Explain X."}]
    assert case["model"]["script"] == ["short", "a longer answer"]
