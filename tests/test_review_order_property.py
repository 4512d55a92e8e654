"""Property: whatever a human answers about a parallel batch, results follow the call order.

A sloppy model sends a batch (fresh tool-call ids) mixing allowed calls, calls a policy denies
and calls that need a human; the human approves, rejects or answers in the tool's place, call
by call. However the answers fall, the stored history has exactly one result per call, right
after the AI message, in the order of its `tool_calls` (the bug an `xfail` used to pin).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_core.messages import AIMessage, ToolCall, ToolMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command

from keel import RunContext, build_agent, tool
from keel.evals import ScriptedChatModel
from keel.guards import Policy, Rule
from keel.nodes import valid_history

CTX = RunContext(user_id="u1", roles=("support",))
POLICY = Policy(
    rules=(
        Rule(tool="peek", action="allow"),
        Rule(tool="wipe", action="ask"),
        Rule(tool="burn", action="deny"),
    ),
    input_guard=None,
    output_guard=None,
)


@tool
def peek(n: int) -> str:
    """Look at n."""
    return f"saw {n}"


@tool(risk="destructive")
def wipe(n: int) -> str:
    """Wipe n."""
    return f"wiped {n}"


@tool(risk="destructive")
def burn(n: int) -> str:
    """Burn n."""
    return f"burnt {n}"


calls = st.lists(st.sampled_from(["peek", "wipe", "burn"]), min_size=2, max_size=5)
answers = st.lists(st.sampled_from(["approve", "reject", "respond"]), min_size=5, max_size=5)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(names=calls, replies=answers, use_async=st.booleans())
def test_results_follow_the_call_order_whatever_the_answers(
    names: list[str], replies: list[str], use_async: bool
) -> None:
    asyncio.run(_check(names, replies, use_async))


async def _check(names: list[str], replies: list[str], use_async: bool) -> None:
    tag = uuid.uuid4().hex[:8]
    batch = AIMessage(
        content="",
        tool_calls=[ToolCall(name=n, args={"n": i}, id=f"{tag}-{i}") for i, n in enumerate(names)],
    )
    agent = build_agent(
        ScriptedChatModel(script=[batch, "done"]),
        [peek, wipe, burn],
        policy=POLICY,
        checkpointer=InMemorySaver(),
    )
    config = {"configurable": {"thread_id": tag}}

    async def run(payload: Any) -> dict[str, Any]:
        if use_async:
            return await agent.ainvoke(payload, config, context=CTX)
        return agent.invoke(payload, config, context=CTX)

    final = await run({"messages": [("user", "go")]})
    if "__interrupt__" in final:
        pending = final["__interrupt__"][0].value
        resume = {
            r["tool_call_id"]: {"type": t, "message": "no"}
            for r, t in zip(pending, replies, strict=False)
        }
        final = await run(Command(resume=resume))
    messages = final["messages"]
    assert valid_history(messages) == list(messages)
    ai = next(m for m in messages if isinstance(m, AIMessage) and m.tool_calls)
    start = messages.index(ai) + 1
    results = messages[start : start + len(names)]
    assert all(isinstance(m, ToolMessage) for m in results)
    assert [m.tool_call_id for m in results] == [tc["id"] for tc in ai.tool_calls]
