"""The chaos suite's failing backends: a ledger whose database is dropped, a memory store whose
file is emptied, and a ledger that fails in the middle of a side-effecting call.

Every run ends with an outcome (category `storage` for the ledger) and a provider-valid history;
a side effect the ledger cannot keep to at most once does not run; a call that ran but could not
be recorded keeps its result and stops the run, so a resume asks a human instead of repeating it.
"""

from __future__ import annotations

import gc
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from langgraph.checkpoint.memory import InMemorySaver

from keel import Ledger, RunContext, build_agent
from keel.db.idempotency import records_flow
from keel.db.runs import error_category
from keel.evals import ScriptedChatModel, builtin_suite, call
from keel.evals.builtin import failing_ledger_agent, failing_store_agent
from keel.evals.evaluators import ended_validly
from keel.evals.executions import recording
from keel.evals.runner import arun_case, arun_suite
from keel.evals.suite import Case, Expect
from keel.models import resolve_model
from keel.tools import tool

TASK = {"messages": [("user", "Order A1001 arrived damaged. Please refund it.")]}
CTX = RunContext(user_id="alice", tenant_id="acme", roles=("customer",))


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
async def test_a_dropped_ledger_ends_the_run_as_storage_and_runs_no_side_effect(
    mode: str,
) -> None:
    from langgraph.types import Command

    agent = failing_ledger_agent(resolve_model("keel:demo"))
    config: Any = {"configurable": {"thread_id": f"t-{mode}"}}
    with recording() as executions:
        for payload in (TASK, Command(resume={"type": "approve"})):
            if mode == "invoke":
                result = agent.invoke(payload, config, context=CTX)
            else:
                result = await agent.ainvoke(payload, config, context=CTX)
    assert result["outcome"]["status"] == "error"
    assert error_category(result["outcome"]) == "storage"
    assert "issue_refund" in result["outcome"]["detail"]
    assert "issue_refund" not in [e.tool for e in executions], "ran without at-most-once"
    (answer,) = [m for m in result["messages"] if getattr(m, "name", None) == "issue_refund"]
    assert answer.status == "error" and "not run: keel's ledger failed" in answer.text


async def test_a_failing_store_degrades_and_completes() -> None:
    suite = builtin_suite("chaos")
    case = next(c for c in suite.cases if c.id == "failing-store")
    run = await arun_case(case, failing_store_agent, model=resolve_model("keel:demo"))
    assert run.outcome["terminated_reason"] == "completed", run.raised
    score = ended_validly(run)
    assert score is not None and score.passed


def test_the_failing_store_closes_with_its_agent() -> None:
    from chromadb.api.shared_system_client import SharedSystemClient

    agent = failing_store_agent(resolve_model("keel:demo"))
    (folder,) = [k for k in SharedSystemClient._identifier_to_system if "keel-chaos-store-" in k]
    del agent
    gc.collect()
    assert folder not in SharedSystemClient._identifier_to_system
    assert not Path(folder).exists()


async def test_a_case_graph_wins_over_the_suites_and_the_callers() -> None:
    suite = builtin_suite("chaos")
    only = [c for c in suite.cases if c.id == "failing-ledger"]
    picked = type(suite)(name="x", cases=tuple(only), graph=suite.graph, model=suite.model)
    result = await arun_suite(picked, "keel.evals.builtin:demo_agent")
    (run,) = result.runs
    assert error_category(run.outcome) == "storage", "the failing ledger was not used"


def test_a_ledger_that_fails_mid_call_keeps_the_result_and_stops(tmp_path: Path) -> None:
    """The tool itself drops the ledger's table: the claim was written, the finish cannot be."""
    path = tmp_path / "keel.db"
    ledger = Ledger(f"sqlite:///{path}")
    ran: list[str] = []

    @tool(name="charge", side_effects=True)
    def charge(amount: float) -> str:
        """Charge the customer."""
        ran.append("charge")
        with sqlite3.connect(path) as db:
            db.execute("ALTER TABLE keel_tool_calls RENAME TO keel_tool_calls_away")
        return f"charged {amount}"

    model = ScriptedChatModel(script=[call("charge", amount=5.0), "Charged."])
    agent = build_agent(model, [charge], ledger=ledger, checkpointer=InMemorySaver())
    config: Any = {"configurable": {"thread_id": "mid"}}
    result = agent.invoke({"messages": [("user", "charge me 5")]}, config, context=CTX)
    assert ran == ["charge"]
    assert error_category(result["outcome"]) == "storage"
    (answer,) = [m for m in result["messages"] if getattr(m, "name", None) == "charge"]
    assert answer.text == "charged 5.0", "the result of a call that ran is kept"
    assert "after the call" in result["outcome"]["detail"]

    # the database comes back: the call is still `started`, so a resume asks a human, never
    # runs it again on its own
    with sqlite3.connect(path) as db:
        db.execute("ALTER TABLE keel_tool_calls_away RENAME TO keel_tool_calls")
    (record,) = ledger.run(records_flow("mid", [answer.tool_call_id])).values()
    assert record.state == "started"
    ledger.close()


def test_the_chaos_cases_expect_what_they_claim() -> None:
    cases = {c.id: c for c in builtin_suite("chaos").cases}
    ledger_case: Case = cases["failing-ledger"]
    assert ledger_case.graph == "keel.evals.builtin:failing_ledger_agent"
    assert ledger_case.expect == Expect(
        status="error", valid_history=True, forbidden_tools=("issue_refund",)
    )
    assert cases["failing-store"].graph == "keel.evals.builtin:failing_store_agent"
