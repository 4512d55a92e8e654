"""Storage that fails at the edges of a run: the ledger down while `human_review` takes a
reviewer's answers.

Real parts: a PostgreSQL ledger whose statements are killed mid-transaction
(`pg_terminate_backend`). README: "No run ends in a bare traceback: it ends
with an outcome and a reason."
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from langchain_core.messages import ToolMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command
from test_storage_faults import InFlightKiller

from keel import Ledger, RunContext, build_agent, tool
from keel.db.runs import STORAGE_FAILED, RunLog
from keel.evals import ScriptedChatModel, call
from keel.guards import InputGuardPolicy, ModelDetector, PeriodBudget, Policy, Rule
from keel.pricing import Price, PriceTable

CTX = RunContext(user_id="u1", tenant_id="acme")
PRICES = PriceTable(
    {
        "agent-model": Price(input_per_mtok=1.0, output_per_mtok=1.0),
        "judge-model": Price(input_per_mtok=1.0, output_per_mtok=1.0),
    }
)


def _review_agent(ledger: Ledger, saver: Any, world: list[str]) -> Any:
    """Two refunds that ask a human; the reviewer's text passes a model detector whose calls
    reserve the user's period budget in the ledger."""

    @tool(risk="write")
    def refund(order_id: str) -> str:
        """Refund an order."""
        world.append(order_id)
        return f"refunded {order_id}"

    judge = ScriptedChatModel(
        structured={"InjectionVerdict": {"injection": False, "reason": "plain"}},
        model_name="judge-model",
    )
    turn = call("refund", order_id="A1")
    turn.tool_calls.append({**turn.tool_calls[0], "args": {"order_id": "B2"}, "id": "second"})
    model = ScriptedChatModel(script=[turn, "unused", "done again"], model_name="agent-model")
    guard = InputGuardPolicy(detector=ModelDetector(model=judge), injection_action="block")
    policy = Policy(
        name="review",
        rules=(Rule(tool="refund", action="ask"),),
        input_guard=guard,
        period_budgets=(PeriodBudget(scope="user", period="month", usd=100),),
    )
    return build_agent(
        model, [refund], policy=policy, prices=PRICES, ledger=ledger, checkpointer=saver
    )


@pytest.mark.postgres
@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
async def test_ledger_down_while_the_reviewers_text_is_screened_runs_no_approved_call(
    fresh_postgres_url: str, mode: str
) -> None:
    """The reviewer approves A1 and answers B2 with text; the ledger fails (its statement killed in
    each of its attempts) when the detector's call reserves the period budget. The node
    ends the run as `error`; the approved A1 does not go on to run in a run that failed (it
    did: the route after review sent only `stopped` runs to `respond`). The run says why, its
    record too, and the thread goes on once the ledger is back."""
    killer, world = InFlightKiller(fresh_postgres_url), []
    ledger = Ledger(fresh_postgres_url)
    try:
        agent = _review_agent(ledger, InMemorySaver(), world)
        config: Any = {"configurable": {"thread_id": f"review-down-{mode}"}}

        async def run(payload: Any) -> Any:
            if mode == "ainvoke":
                return await agent.ainvoke(payload, config, context=CTX)
            # no event loop in a worker thread: the detector is called as under a plain invoke
            return await asyncio.to_thread(agent.invoke, payload, config, context=CTX)

        paused = await run({"messages": [("user", "refund both")]})
        requests = paused["__interrupt__"][0].value
        assert [r["action_request"]["args"]["order_id"] for r in requests] == ["A1", "B2"]
        killer.arm("keel_spend", times=3)  # each of the ledger's 3 attempts
        answers = [{"type": "approve"}, {"type": "respond", "message": "not B2"}]
        result = await run(Command(resume=answers))
        await asyncio.to_thread(killer.join)
        assert killer.killed == ["keel_spend"] * 3

        ended = result["outcome"]
        assert ended["status"] == "error" and ended["detail"].startswith(STORAGE_FAILED), ended
        assert world == []  # the approved call did not run
        replies = {m.tool_call_id: m for m in result["messages"] if isinstance(m, ToolMessage)}
        assert set(replies) == {r["tool_call_id"] for r in requests}  # the thread stays valid
        approved = replies[requests[0]["tool_call_id"]]
        assert approved.response_metadata["keel_status"] == "not_run"
        assert "not B2" not in replies["second"].text  # not screened: withheld (block)
        records = RunLog(ledger).query()
        assert [r.terminated_reason for r in records] == ["error"]
        assert records[0].detail.startswith(STORAGE_FAILED) and "keel_spend" in records[0].detail

        # the ledger is back: the thread takes the next message and completes
        again = await run({"messages": [("user", "and now?")]})
        assert again["outcome"]["terminated_reason"] == "completed", again["outcome"]
        assert world == []
        records = RunLog(ledger).query()
        assert [r.terminated_reason for r in records] == ["error", "completed"]
    finally:
        await ledger.aclose()
