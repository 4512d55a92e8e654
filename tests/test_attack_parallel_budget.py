"""A model asks for many tool calls at once, past `BudgetMiddleware`'s `tool_calls` limit.

`create_agent` runs the calls of a turn as parallel tasks reading the same state, so each saw
the others as unspent budget: ten calls in one turn all ran under `Budget(tool_calls=2)`. The
calls that fit run, in the turn's order, as in `build_agent`; the rest are answered
`budget_stopped` and the run ends `budget_exceeded`. Sync and async; the tool records what ran.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, ToolCall, ToolMessage
from langgraph.checkpoint.memory import InMemorySaver

from keel import build_agent, tool
from keel.evals import ScriptedChatModel
from keel.guards import Budget, BudgetMiddleware, Policy, Rule, outcome_of

RAN: list[str] = []


@tool
def lookup_order(order_id: str) -> str:
    """Look an order up."""
    RAN.append(order_id)
    return f"order {order_id}: shipped"


def _turn() -> AIMessage:
    calls = [ToolCall(name="lookup_order", args={"order_id": f"o{i}"}, id=None) for i in range(10)]
    return AIMessage(content="", tool_calls=calls)


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
def test_parallel_calls_past_the_tool_call_budget_are_not_run(mode: str) -> None:
    RAN.clear()
    agent = create_agent(
        ScriptedChatModel(script=[_turn(), "Done."], fresh_ids=True),
        [lookup_order],
        middleware=[BudgetMiddleware(Budget(tool_calls=2))],
        checkpointer=InMemorySaver(),
    )
    config: Any = {"configurable": {"thread_id": "t"}}
    task = {"messages": [("user", "look everything up")]}
    if mode == "invoke":
        result = agent.invoke(task, config)
    else:
        result = asyncio.run(agent.ainvoke(task, config))
    answers = [m for m in result["messages"] if isinstance(m, ToolMessage)]
    statuses = [m.response_metadata.get("keel_status", m.status) for m in answers]
    assert statuses == ["success"] * 2 + ["budget_stopped"] * 8
    assert sorted(RAN) == ["o0", "o1"]
    assert outcome_of(result)["terminated_reason"] == "budget_exceeded"


def test_build_agent_holds_the_same_turn_to_the_same_budget() -> None:
    """The same rule in `build_agent`: the two calls that fit run, in order."""
    RAN.clear()
    agent = build_agent(
        ScriptedChatModel(script=[_turn(), "Done."], fresh_ids=True),
        [lookup_order],
        policy=Policy(rules=(Rule(tool="*", action="allow"),), budget=Budget(tool_calls=2)),
        checkpointer=InMemorySaver(),
    )
    config: Any = {"configurable": {"thread_id": "t"}}
    result = agent.invoke({"messages": [("user", "look everything up")]}, config)
    answers = [m for m in result["messages"] if isinstance(m, ToolMessage)]
    assert [m.response_metadata["keel_status"] for m in answers] == (
        ["success"] * 2 + ["budget_stopped"] * 8
    )
    assert RAN == ["o0", "o1"]
    assert result["outcome"]["terminated_reason"] == "budget_exceeded"
