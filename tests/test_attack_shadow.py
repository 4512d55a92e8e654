"""Attacks on shadow runs: a stubbed side-effecting tool's body never runs, by any path.

Paths tried: an async tool, a sync tool without a timeout (run inline), one with a timeout (run
in a worker thread), an idempotent tool with retries, parallel calls with fresh ids, an approved
call after a resume, and a tool inside a supervisor's sub-agent; under `invoke` and `ainvoke`.
"""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.messages import AIMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command

from keel import RunContext, build_agent, tool
from keel.evals import ScriptedChatModel
from keel.evals.shadow import SideEffectStub
from keel.graphs import Route, build_supervisor
from keel.guards import Policy, Rule
from keel.tools.stubs import stubbing

ran: list[str] = []


@tool(side_effects=True, risk="write")
async def send_async(to: str) -> str:
    """Send (async)."""
    ran.append("send_async")
    return "sent"


@tool(side_effects=True, risk="write", timeout=None)
def send_inline(to: str) -> str:
    """Send (sync, no timeout)."""
    ran.append("send_inline")
    return "sent"


@tool(side_effects=True, risk="write", timeout=5.0)
def send_threaded(to: str) -> str:
    """Send (sync, in a worker thread)."""
    ran.append("send_threaded")
    return "sent"


@tool(side_effects=True, risk="write", idempotent=True, retries=3)
def send_retried(to: str) -> str:
    """Send (idempotent, retried)."""
    ran.append("send_retried")
    raise RuntimeError("flaky")


TOOLS = [send_async, send_inline, send_threaded, send_retried]
ALLOW = Policy(rules=tuple(Rule(action="allow", tool=t.name) for t in TOOLS))
SUPPORT = RunContext(user_id="u1", tenant_id="acme")


def _fresh_calls(n: int) -> AIMessage:
    """Every tool at once, fresh ids each time (as a real model names its calls), to other
    recipients each turn (the same calls twice in a row are a loop the guard stops)."""
    calls = [
        {"name": t.name, "args": {"to": f"x{n}_{i}"}, "id": f"call_{n}_{i}"}
        for i, t in enumerate(TOOLS)
    ]
    return AIMessage("", tool_calls=calls)


def _agent(policy: Policy = ALLOW, checkpointer: Any = None) -> Any:
    return build_agent(
        ScriptedChatModel(script=[_fresh_calls(1), _fresh_calls(2), "done"]),
        TOOLS,
        policy=policy,
        checkpointer=checkpointer,
    )


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
async def test_no_stubbed_body_runs_directly(mode: str) -> None:
    ran.clear()
    stub = SideEffectStub()
    with stubbing(stub):
        agent = _agent()
        task = {"messages": [("user", "send all")]}
        if mode == "invoke":
            result = agent.invoke(task, context=SUPPORT)
        else:
            result = await agent.ainvoke(task, context=SUPPORT)
    assert ran == []
    assert len(stub.calls) == 8
    assert result["outcome"]["terminated_reason"] == "completed"


async def test_no_stubbed_body_runs_after_an_approval() -> None:
    ran.clear()
    ask = Policy(rules=tuple(Rule(action="ask", tool=t.name) for t in TOOLS))
    stub = SideEffectStub()
    config = {"configurable": {"thread_id": "approved"}}
    with stubbing(stub):
        agent = _agent(ask, InMemorySaver())
        result = await agent.ainvoke({"messages": [("user", "send all")]}, config, context=SUPPORT)
        for _ in range(4):
            if "__interrupt__" not in result:
                break
            answers = [{"type": "approve"}] * len(TOOLS)
            result = await agent.ainvoke(Command(resume=answers), config, context=SUPPORT)
    assert ran == []
    assert len(stub.calls) == 8
    assert result["outcome"]["terminated_reason"] == "completed"


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
async def test_no_stubbed_body_runs_inside_a_supervisors_sub_agent(mode: str) -> None:
    ran.clear()
    stub = SideEffectStub()
    with stubbing(stub):
        sup = build_supervisor(
            {"mailer": _agent()},
            lambda messages: Route(agent="FINISH" if len(messages) > 1 else "mailer", task="send"),
        )
        task = {"messages": [("user", "send all")]}
        if mode == "invoke":
            sup.invoke(task, context=SUPPORT)
        else:
            await sup.ainvoke(task, context=SUPPORT)
    assert ran == []
    assert len(stub.calls) == 8


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
async def test_no_stubbed_body_runs_under_create_agent_with_keels_permissions(mode: str) -> None:
    from langchain.agents import create_agent

    from keel.guards.middleware import PermissionMiddleware

    ran.clear()
    stub = SideEffectStub()
    model = ScriptedChatModel(script=[_fresh_calls(1), "done"])
    graph = create_agent(model, TOOLS, middleware=[PermissionMiddleware(ALLOW)])
    with stubbing(stub):
        task = {"messages": [("user", "send all")]}
        if mode == "invoke":
            result = graph.invoke(task)
        else:
            result = await graph.ainvoke(task)
    assert ran == []
    assert len(stub.calls) == 4
    answers = [m for m in result["messages"] if m.type == "tool"]
    assert {m.response_metadata.get("keel_stub") for m in answers} == {True}
    ran.clear()  # outside the block the tools run as usual
    plain = AIMessage("", tool_calls=[{"name": "send_inline", "args": {"to": "a"}, "id": "c9"}])
    await create_agent(
        ScriptedChatModel(script=[plain, "done"]),
        TOOLS,
        middleware=[PermissionMiddleware(ALLOW)],
    ).ainvoke({"messages": [("user", "send")]})
    assert ran == ["send_inline"]


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
@pytest.mark.parametrize("keels_middleware", [False, True])
async def test_no_stubbed_body_runs_in_a_graph_without_keels_tool_node(
    mode: str, keels_middleware: bool
) -> None:
    """LangChain's `create_agent` (LangGraph's `ToolNode`) runs the tools, with or without
    keel's middleware: the tools themselves ask the stub first."""
    from langchain.agents import create_agent

    from keel.guards.middleware import PermissionMiddleware

    ran.clear()
    stub = SideEffectStub()
    model = ScriptedChatModel(script=[_fresh_calls(1), "done"])
    middleware = [PermissionMiddleware(ALLOW)] if keels_middleware else []
    graph = create_agent(model, TOOLS, middleware=middleware)
    with stubbing(stub):
        task = {"messages": [("user", "send all")]}
        result = graph.invoke(task) if mode == "invoke" else await graph.ainvoke(task)
    assert ran == [] and len(stub.calls) == 4
    answers = [m for m in result["messages"] if m.type == "tool"]
    assert [m.response_metadata.get("keel_stub") for m in answers] == [True] * 4
    assert {m.content for m in answers} == {
        f"(shadow run) {t.name} was not run; assume it succeeded." for t in TOOLS
    }
    with stubbing(stub):  # called directly, outside any graph
        assert send_inline.invoke({"to": "a"}).startswith("(shadow run) send_inline")
    assert ran == []
