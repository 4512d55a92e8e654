"""End-to-end runs of the agent on real persistence: SQLite and PostgreSQL.

The demo scenario (plan, two reads, one destructive call needing approval, final answer) is
run to its approval interrupt, then resumed from a *new* Persistence (as a new process would),
with approve and with reject, through both `invoke` and `ainvoke`.
"""

from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage, ToolMessage
from langgraph.types import Command

from keel import Persistence, RunContext, build_agent
from keel.app.demo import DEMO_TASK, SYSTEM_PROMPT, DemoShop, demo_tools
from keel.evals.demo import demo_model

CTX = RunContext(user_id="u1", tenant_id="acme", roles=("support",))


def _agent(shop: DemoShop, saver: object) -> object:
    return build_agent(
        demo_model(),
        demo_tools(shop),
        system_prompt=SYSTEM_PROMPT,
        plan=True,
        checkpointer=saver,  # type: ignore[arg-type]
    )


def _config(thread: str) -> dict[str, dict[str, str]]:
    return {"configurable": {"thread_id": thread}}


def _assert_paused_for_refund(result: dict[str, object], shop: DemoShop) -> None:
    assert result["outcome"] == {
        "status": "interrupted",
        "terminated_reason": "awaiting_approval",
        "detail": "awaiting approval for issue_refund",
    }
    (request,) = result["__interrupt__"][0].value  # type: ignore[index]
    assert request["action_request"] == {
        "action": "issue_refund",
        "args": {"order_id": "A1001", "amount": 42.5, "reason": "arrived damaged"},
    }
    assert shop.refunds == [], "nothing may be refunded before approval"


def test_approve_resume_on_a_new_connection_sync(db_url: str) -> None:
    shop = DemoShop()
    with Persistence(db_url).checkpointer() as saver:
        agent = _agent(shop, saver)
        first = agent.invoke({"messages": [("user", DEMO_TASK)]}, _config("t1"), context=CTX)  # type: ignore[attr-defined]
    _assert_paused_for_refund(first, shop)

    with Persistence(db_url).checkpointer() as saver:  # a new pool / connection
        agent = _agent(shop, saver)
        final = agent.invoke(Command(resume={"type": "approve"}), _config("t1"), context=CTX)  # type: ignore[attr-defined]

    assert final["outcome"]["terminated_reason"] == "completed"
    assert shop.refunds == [("A1001", 42.5)]
    assert final["usage"]["model_calls"] == 5  # plan + 4 turns
    assert final["usage"]["tool_calls"] == 3
    assert final["usage"]["usd"] > 0
    assert [s["status"] for s in final["plan"]] == ["done"] * 4
    tool_results = [m for m in final["messages"] if isinstance(m, ToolMessage)]
    assert [m.response_metadata["keel_status"] for m in tool_results] == ["success"] * 3
    assert isinstance(final["messages"][-1], AIMessage)
    assert "refunded the full $42.50" in final["messages"][-1].text


async def test_reject_resume_on_a_new_connection_async(db_url: str) -> None:
    shop = DemoShop()
    async with Persistence(db_url).acheckpointer() as saver:
        agent = _agent(shop, saver)
        first = await agent.ainvoke(  # type: ignore[attr-defined]
            {"messages": [("user", DEMO_TASK)]}, _config("t2"), context=CTX
        )
    _assert_paused_for_refund(first, shop)

    async with Persistence(db_url).acheckpointer() as saver:
        agent = _agent(shop, saver)
        final = await agent.ainvoke(  # type: ignore[attr-defined]
            Command(resume={"type": "reject", "message": "ask a manager first"}),
            _config("t2"),
            context=CTX,
        )

    assert final["outcome"]["status"] == "stopped"
    assert final["outcome"]["terminated_reason"] == "rejected"
    assert shop.refunds == []
    rejected = [m for m in final["messages"] if isinstance(m, ToolMessage)][-1]
    assert rejected.response_metadata["keel_status"] == "rejected"
    assert "ask a manager first" in rejected.text
    last = final["messages"][-1]
    assert isinstance(last, AIMessage) and last.response_metadata.get("keel_partial")
    assert "rejected" in last.text
    # the digest of the rejected call is stored, so this exact call can never be approved later
    decisions = [a["decision"] for a in final["approvals"].values()]
    assert decisions == ["rejected"]


def test_paused_thread_is_listed_as_waiting(db_url: str) -> None:
    shop = DemoShop()
    persistence = Persistence(db_url)
    with persistence.checkpointer() as saver:
        _agent(shop, saver).invoke(  # type: ignore[attr-defined]
            {"messages": [("user", DEMO_TASK)]}, _config("waiting"), context=CTX
        )
    rows = persistence.list_threads()
    assert [r.thread_id for r in rows] == ["waiting"]
    assert rows[0].next == ("human_review",)
    assert rows[0].values["outcome"]["status"] == "interrupted"
    assert (rows[0].interrupted, rows[0].error, rows[0].status) == (True, None, "waiting")


def test_threads_say_whether_they_wait_stopped_failed_or_ended(db_url: str) -> None:
    """`ThreadSummary.status` (what `keel threads` shows): only a thread waiting on
    `interrupt()` is `waiting`; one at a breakpoint is `stopped`; one whose step raised is
    `error` (all three have a `next`: `keel threads` called them all waiting)."""
    from langgraph.graph import START, MessagesState, StateGraph

    def boom(state: MessagesState) -> dict[str, object]:
        raise RuntimeError("the inventory service is down")

    persistence = Persistence(db_url)
    with persistence.checkpointer() as saver:
        agent = _agent(DemoShop(), saver)
        task = {"messages": [("user", DEMO_TASK)]}
        agent.invoke(task, _config("paused"), context=CTX, interrupt_before=["execute_tools"])  # type: ignore[attr-defined]
        builder = StateGraph(MessagesState)
        builder.add_node("only", boom)
        builder.add_edge(START, "only")
        with pytest.raises(RuntimeError):
            builder.compile(checkpointer=saver).invoke(task, _config("failed"))
        ended = build_agent(demo_model(), [], checkpointer=saver)  # type: ignore[arg-type]
        ended.invoke({"messages": [("user", "hi")]}, _config("ended"), context=CTX)
    rows = {row.thread_id: row for row in persistence.list_threads()}
    assert rows["paused"].next and not rows["paused"].interrupted
    assert rows["paused"].status == "stopped"
    assert rows["failed"].error == "RuntimeError('the inventory service is down')"
    assert (rows["failed"].next, rows["failed"].status) == (("only",), "error")
    assert (rows["ended"].next, rows["ended"].error, rows["ended"].status) == ((), None, "success")


@pytest.mark.parametrize("limit", [4, 7, 12])
def test_recursion_limit_ends_with_an_outcome_on_a_saver(db_url: str, limit: int) -> None:
    from keel.evals import ScriptedChatModel, call

    shop = DemoShop()
    looping = ScriptedChatModel(script=[call("lookup_order", order_id="A1002")] * 50)
    with Persistence(db_url).checkpointer() as saver:
        agent = build_agent(looping, demo_tools(shop), checkpointer=saver)
        config = {**_config(f"loop{limit}"), "recursion_limit": limit}
        final = agent.invoke({"messages": [("user", "loop")]}, config, context=CTX)
        state = agent.get_state(_config(f"loop{limit}"))
    assert final["outcome"]["terminated_reason"] == "budget_exceeded"
    assert "recursion_limit" in final["outcome"]["detail"]
    assert state.next == ()  # the run ended; nothing pending
