"""Attacks on replay: a recorded side effect is never run again, whatever the replayed model
sends, nor a tool nobody declared read-only, and a replay leaves the production ledger (its
claims, shared circuit breakers, run records, audit log and period spend) and memory alone.

Threads are stored by keel's demo agent on a real SQLite database with a real ledger
(`test_evals_replay.store_thread`); the demo's tools record every body that really runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command
from test_evals_replay import ALICE, DEMO, REFUND, store_thread

from keel.app.demo import DEMO_TASK, SYSTEM_PROMPT, DemoShop, demo_policy, demo_tools
from keel.db.ledger import Ledger
from keel.db.persistence import Persistence
from keel.db.tables import AUDIT, RESERVATIONS, RUNS, SPEND, TOOL_CALLS
from keel.evals import ScriptedChatModel, areplay, ashadow, builtin_suite, call
from keel.evals.builtin import recorded
from keel.evals.demo import demo_model
from keel.evals.shadow import SideEffectStub
from keel.graphs import build_agent
from keel.guards import PeriodBudget, Policy, Rule
from keel.guards.breaker import BreakerPolicy
from keel.memory import ChromaStore, user_namespace
from keel.tools.stubs import stubbing


async def stored(folder: Path, thread: str = "t1", **options: Any) -> str:
    """The demo scenario stored as `thread` in a SQLite database in `folder`; its URL."""
    url = f"sqlite:///{folder}/keel.db"
    await store_thread(url, thread, **options)
    return url


def production(ledger: Ledger, policy: Policy, **options: Any) -> Callable[[BaseChatModel], Any]:
    """A graph factory on the production ledger (and its breakers), as a careless user writes;
    `options` go to `build_agent` (e.g. the production memory store)."""

    def factory(model: BaseChatModel) -> Any:
        return build_agent(
            model,
            recorded(demo_tools(DemoShop())),
            system_prompt=SYSTEM_PROMPT,
            policy=policy,
            ledger=ledger,
            checkpointer=InMemorySaver(),
            **options,
        )

    return factory


def refunding(args: dict[str, Any]) -> ScriptedChatModel:
    """A live model that looks the order up and refunds with `args` (fresh tool-call ids)."""
    return ScriptedChatModel(
        script=[call("lookup_order", order_id="A1001"), call("issue_refund", args), "Refunded."],
        fresh_ids=True,
    )


@pytest.mark.parametrize(
    "args",
    [
        {**REFUND, "reason": "arrived damaged "},  # trailing whitespace
        {**REFUND, "reason": "arrived  damaged"},  # a doubled space
        {**REFUND, "order_id": "\uff211001"},  # a fullwidth lookalike
        {**REFUND, "reason": "arrived damaged\u200b"},  # a zero-width space
        {**REFUND, "amount": "42.5"},  # the amount as text
        {**REFUND, "amount": 42.51},
    ],
    ids=["trailing-space", "double-space", "fullwidth", "zero-width", "text-amount", "cents"],
)
async def test_a_refund_whose_args_differ_from_the_recording_in_any_way_is_not_run(
    tmp_path: Path, args: dict[str, Any]
) -> None:
    url = await stored(tmp_path)
    diff = await areplay("t1", DEMO, db=url, live=True, model=refunding(args), identity=ALICE)
    assert "issue_refund" not in [e.tool for e in diff.executions]
    assert [c.name for c in diff.unrecorded] == ["issue_refund"]
    assert diff.replayed.trajectory[-1].status == "error" and diff.raised is None


async def test_the_recorded_refund_asked_for_twice_is_played_once_and_never_run(
    tmp_path: Path,
) -> None:
    url = await stored(tmp_path)
    twice = ScriptedChatModel(
        script=[call("issue_refund", REFUND), call("issue_refund", REFUND), "Refunded twice."],
        fresh_ids=True,
    )
    diff = await areplay("t1", DEMO, db=url, live=True, model=twice, identity=ALICE)
    assert diff.executions == []
    assert [t.status for t in diff.replayed.trajectory] == ["success", "error"]
    assert [c.name for c in diff.unrecorded] == ["issue_refund"]


async def test_a_refund_a_human_rejected_in_the_recording_is_not_run_on_replay(
    tmp_path: Path,
) -> None:
    url = await stored(tmp_path, "t-rejected", approval="reject")
    approving = refunding(dict(REFUND))  # the same refund, which the replay's human approves
    diff = await areplay("t-rejected", DEMO, db=url, live=True, model=approving, identity=ALICE)
    assert "issue_refund" not in [e.tool for e in diff.executions]
    assert diff.recorded.outcome["terminated_reason"] == "rejected"


async def test_replays_on_the_production_ledger_record_no_call_and_trip_no_breaker(
    tmp_path: Path,
) -> None:
    """A factory built on the production ledger, with a breaker shared through it: the stubbed
    refunds of replays are neither claimed in the ledger nor counted as failures, so the
    production agent still refunds afterwards."""
    policy = dataclasses.replace(demo_policy(), tool_breaker=BreakerPolicy(failure_threshold=2))
    url = await stored(tmp_path, policy=policy)
    ledger = Ledger(url)
    before = _claims(tmp_path)
    try:
        for amount in (10.0, 11.0, 12.0):
            model = refunding({**REFUND, "amount": amount})
            factory = production(ledger, policy)
            diff = await areplay("t1", factory, db=url, live=True, model=model, identity=ALICE)
            assert diff.replayed.trajectory[-1].status == "error"  # answered "not run" each time
            assert diff.executions == []
    finally:
        await ledger.aclose()
    assert _claims(tmp_path) == before
    state = await store_thread(url, "t2", policy=policy)  # production, after the replays
    statuses = [
        m.response_metadata.get("keel_status") for m in state["messages"] if m.type == "tool"
    ]
    assert statuses[-1] == "success" and state["outcome"]["terminated_reason"] == "completed"


async def test_a_shadow_run_on_the_production_ledger_claims_nothing_in_it(tmp_path: Path) -> None:
    policy = dataclasses.replace(demo_policy(), period_budgets=(PeriodBudget(usd=5.0),))
    ledger = Ledger(await stored(tmp_path, policy=policy))
    factory = production(ledger, policy)
    before, rows = _claims(tmp_path), _rows(tmp_path)
    try:
        compared = await ashadow(builtin_suite("demo"), factory, candidate=factory)
    finally:
        await ledger.aclose()
    assert compared.summary()["stubbed_calls"] == {"baseline": 1, "candidate": 1}
    assert compared.side_effects_run() == 0 and _claims(tmp_path) == before
    assert _rows(tmp_path) == rows  # no run record, audit record or period spend either


def _claims(folder: Path) -> int:
    """The production ledger's claimed side-effecting calls."""
    with sqlite3.connect(f"{folder}/keel.db") as db:
        count: int = db.execute(f"SELECT count(*) FROM {TOOL_CALLS.name}").fetchone()[0]
        return count


async def test_a_replay_on_a_plain_langchain_agent_runs_no_refund(tmp_path: Path) -> None:
    """A new version built with LangChain's `create_agent` and no keel middleware at all."""
    from langchain.agents import create_agent

    url = await stored(tmp_path)

    def plain(model: BaseChatModel) -> Any:
        return create_agent(model, recorded(demo_tools(DemoShop())), checkpointer=InMemorySaver())

    model = refunding({**REFUND, "amount": 10.0})
    diff = await areplay("t1", plain, db=url, live=True, model=model, identity=ALICE)
    assert diff.raised is None and "issue_refund" not in [e.tool for e in diff.executions]
    assert [c.name for c in diff.unrecorded] == ["issue_refund"]


# -- tools nobody declared read-only -----------------------------------------------------------


def _noting(folder: Path) -> tuple[Any, Any]:
    """Two tools that append to `folder/notes.txt`, neither declared through keel: a plain
    function (the registry defaults it to `read`) and a LangChain `@tool`."""
    from langchain_core.tools import tool as langchain_tool

    def write_note(text: str) -> str:
        """Add a note to the customer's file."""
        with (folder / "notes.txt").open("a") as f:
            f.write(f"{text}\n")
        return "noted"

    @langchain_tool
    def file_note(text: str) -> str:
        """File a note on the customer's record."""
        return write_note(text)

    return write_note, file_note


def _with_notes(folder: Path) -> Callable[[BaseChatModel], Any]:
    """The demo agent plus the note tools, which its policy allows."""
    notes = _noting(folder)
    allow = (Rule(action="allow", tool="write_note"), Rule(action="allow", tool="file_note"))
    policy = dataclasses.replace(demo_policy(), rules=(*allow, *demo_policy().rules))

    def factory(model: BaseChatModel) -> Any:
        tools = [*recorded(demo_tools(DemoShop())), *notes]
        return build_agent(
            model, tools, system_prompt=SYSTEM_PROMPT, policy=policy, checkpointer=InMemorySaver()
        )

    return factory


async def test_a_live_replay_never_runs_an_unrecorded_tool_nobody_declared_read_only(
    tmp_path: Path,
) -> None:
    url = await stored(tmp_path)
    names = ["write_note", "file_note"]
    model = ScriptedChatModel(
        script=[*(call(n, text=f"by {n}") for n in names), "Noted."], fresh_ids=True
    )
    factory = _with_notes(tmp_path)
    diff = await areplay("t1", factory, db=url, live=True, model=model, identity=ALICE)
    assert not (tmp_path / "notes.txt").exists()
    assert [c.name for c in diff.unrecorded] == names and diff.raised is None
    assert [t.status for t in diff.replayed.trajectory] == ["error", "error"]
    assert "not declared read-only" in diff.unrecorded[0].content


async def test_a_replay_on_a_plain_langchain_agent_never_runs_a_langchain_tool(
    tmp_path: Path,
) -> None:
    """`create_agent` with no keel middleware: nothing of keel's runs its `ToolNode`, so the
    replay offers the node's calls to the cassette itself."""
    from langchain.agents import create_agent

    url = await stored(tmp_path)
    _, file_note = _noting(tmp_path)

    def plain(model: BaseChatModel) -> Any:
        tools = [*recorded(demo_tools(DemoShop())), file_note]
        return create_agent(model, tools, checkpointer=InMemorySaver())

    model = ScriptedChatModel(
        script=[call("lookup_order", order_id="A1001"), call("file_note", text="x"), "Noted."],
        fresh_ids=True,
    )
    diff = await areplay("t1", plain, db=url, live=True, model=model, identity=ALICE)
    assert not (tmp_path / "notes.txt").exists() and diff.raised is None
    assert [c.name for c in diff.unrecorded] == ["file_note"]
    assert [t.status for t in diff.replayed.trajectory] == ["success", "error"]
    assert diff.executions == []  # the lookup was answered from the cassette


@pytest.mark.parametrize("gate", ["none", "allow", "deny"])
async def test_a_shadow_run_on_create_agent_never_runs_a_langchain_tool(
    tmp_path: Path, gate: str
) -> None:
    """Without keel's middleware, or behind it: its permission gate still answers first."""
    from langchain.agents import create_agent

    from keel.guards.middleware import PermissionMiddleware

    _, file_note = _noting(tmp_path)
    rules = () if gate == "none" else (Rule(action=gate, tool="file_note"),)
    middleware = [] if gate == "none" else [PermissionMiddleware(Policy(rules=rules))]

    def factory(model: BaseChatModel) -> Any:
        return create_agent(model, [file_note], middleware=middleware, checkpointer=InMemorySaver())

    suite = builtin_suite("demo")
    noting = ScriptedChatModel(script=[call("file_note", text="shadow"), "Noted."])
    compared = await ashadow(
        dataclasses.replace(suite, cases=suite.cases[:1]), factory, factory, model=noting
    )
    assert not (tmp_path / "notes.txt").exists()
    statuses = [t.status for p in compared.pairs for t in p.baseline.trajectory]
    assert statuses == ["denied" if gate == "deny" else "success"]
    stubbed = [] if gate == "deny" else ["file_note"]
    assert [c.name for c in compared.stubbed["baseline"]] == stubbed


async def test_a_live_replay_runs_an_unrecorded_tool_declared_read_only(tmp_path: Path) -> None:
    url = await stored(tmp_path)
    other = ScriptedChatModel(script=[call("lookup_order", order_id="A1002"), "Found it."])
    diff = await areplay("t1", DEMO, db=url, live=True, model=other, identity=ALICE)
    assert [e.tool for e in diff.executions] == ["lookup_order"] and diff.unrecorded == []


async def test_a_shadow_run_stubs_a_tool_nobody_declared_read_only(tmp_path: Path) -> None:
    suite = builtin_suite("demo")
    noting = ScriptedChatModel(script=[call("write_note", text="shadow"), "Noted."])
    factory = _with_notes(tmp_path)
    compared = await ashadow(
        dataclasses.replace(suite, cases=suite.cases[:1]), factory, factory, model=noting
    )
    assert not (tmp_path / "notes.txt").exists()
    assert {side: [c.name for c in calls] for side, calls in compared.stubbed.items()} == {
        "baseline": ["write_note"],
        "candidate": ["write_note"],
    }


# -- production's records ----------------------------------------------------------------------


def _rows(folder: Path) -> dict[str, Any]:
    """What a run writes to the production ledger: run records, audit records, period spend
    (the tokens spent, and reservations still held)."""
    with sqlite3.connect(f"{folder}/keel.db") as db:
        counts = {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                  for t in (RUNS.name, AUDIT.name, RESERVATIONS.name)}  # fmt: skip
        counts["tokens"] = db.execute(f"SELECT sum(spent_tokens) FROM {SPEND.name}").fetchone()[0]
        return counts


@pytest.mark.parametrize("live", [False, True], ids=["cassette", "live"])
async def test_a_replay_on_production_writes_no_run_audit_spend_or_lesson_there(
    tmp_path: Path, live: bool
) -> None:
    """A factory on the production ledger (with a period budget) and memory store: the replay
    leaves the user's run records, audit log, monthly spend and lessons as they were."""
    policy = dataclasses.replace(demo_policy(), period_budgets=(PeriodBudget(usd=5.0),))
    url = await stored(tmp_path, policy=policy)
    ledger, store = Ledger(url), ChromaStore(path=tmp_path / "memory")
    lessons = user_namespace(ALICE, "lessons")

    factory = production(ledger, policy, store=store, memory=True)
    before = _rows(tmp_path)
    assert before[RUNS.name] and before[AUDIT.name] and before["tokens"], before
    model = refunding({**REFUND, "amount": 10.0}) if live else None
    try:
        diff = await areplay("t1", factory, db=url, live=live, model=model, identity=ALICE)
        assert diff.raised is None and diff.replayed.outcome["terminated_reason"] == "completed"
        assert _rows(tmp_path) == before and store.search(lessons) == []
        agent = factory(demo_model())  # the same factory, outside a replay, still writes
        config: Any = {"configurable": {"thread_id": "t2"}}
        await agent.ainvoke({"messages": [("user", DEMO_TASK)]}, config, context=ALICE)
        await agent.ainvoke(Command(resume={"type": "approve"}), config, context=ALICE)
    finally:
        await ledger.aclose()
    after = _rows(tmp_path)
    assert after[RUNS.name] > before[RUNS.name] and after[AUDIT.name] > before[AUDIT.name]
    assert after["tokens"] > before["tokens"] and len(store.search(lessons)) == 1


def test_a_dry_run_under_invoke_writes_nothing_to_production_either(tmp_path: Path) -> None:
    """`keel.tools.stubbing` by hand around a sync `invoke` (the sync writers' path)."""
    policy = dataclasses.replace(demo_policy(), period_budgets=(PeriodBudget(usd=5.0),))
    url = asyncio.run(stored(tmp_path, policy=policy))
    ledger, store = Ledger(url), ChromaStore(path=tmp_path / "memory")
    agent = production(ledger, policy, store=store, memory=True)(demo_model())
    before, config = _rows(tmp_path), {"configurable": {"thread_id": "dry"}}
    try:
        with stubbing(SideEffectStub()):
            agent.invoke({"messages": [("user", DEMO_TASK)]}, config, context=ALICE)
            done = agent.invoke(Command(resume={"type": "approve"}), config, context=ALICE)
    finally:
        ledger.close()
    assert done["outcome"]["terminated_reason"] == "completed"
    assert _rows(tmp_path) == before and store.search(user_namespace(ALICE, "lessons")) == []


async def test_replays_and_shadow_runs_leave_no_thread_in_production_checkpoints(
    tmp_path: Path,
) -> None:
    """A factory on the production checkpointer: `keel threads` lists what users ran only."""
    url = await stored(tmp_path)
    async with Persistence(url).acheckpointer() as saver:

        def factory(model: BaseChatModel) -> Any:
            tools = recorded(demo_tools(DemoShop()))
            return build_agent(model, tools, policy=demo_policy(), checkpointer=saver)

        diff = await areplay("t1", factory, db=url, identity=ALICE)
        compared = await ashadow(builtin_suite("demo"), factory, candidate=factory)
    assert not diff.changed, diff.lines()
    assert compared.summary()["runs"] == 2 and not compared.changed()
    assert [t.thread_id for t in Persistence(url).list_threads()] == ["t1"]


async def test_a_replay_takes_no_admission_slot_of_the_user_it_replays(tmp_path: Path) -> None:
    """Alice's only running slot is taken by her own run: her replay neither waits for it nor
    is refused as overloaded, and takes nothing from her."""
    from keel.guards.admission import Admission, AdmissionPolicy

    policy = dataclasses.replace(demo_policy(), admission=AdmissionPolicy(user_running=1))
    url = await stored(tmp_path)
    ledger = Ledger(url)
    admission = Admission.of(ledger, policy.admission)
    assert admission is not None
    try:
        lease = await admission.aacquire(ALICE)  # alice's run in production, still running
        diff = await areplay("t1", production(ledger, policy), db=url, identity=ALICE)
        assert await admission.aheld(ALICE.tenant_id, ALICE.user_id) == {"running": 1, "queued": 0}
        await admission.arelease(lease)
    finally:
        await ledger.aclose()
    assert not diff.changed, diff.lines()
