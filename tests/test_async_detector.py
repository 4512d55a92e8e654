"""An async injection detector (`ModelDetector`, or your own coroutine) in keel's graphs and
middleware under `ainvoke`: it is awaited on the caller's event loop, where its model client
lives, at each place the input guard reads: the run's input, a tool's result, a reviewer's
`respond` text, and `create_agent`'s middleware.

The sync `check_input` cannot await a detector in a running loop (it says so); keel's async
paths used it anyway, so with `ModelDetector` every `ainvoke` of a guarded agent raised.
"""

from __future__ import annotations

import asyncio
from typing import Any

from langchain.agents import create_agent
from langchain_core.messages import ToolMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command

from keel import RunContext, build_agent, tool
from keel.evals import ScriptedChatModel, call
from keel.guards import (
    Budget,
    ContentFinding,
    InputGuardMiddleware,
    InputGuardPolicy,
    ModelDetector,
    Policy,
    Rule,
)

CTX = RunContext(user_id="u1", tenant_id="acme", roles=("support",))
RULES = (
    Rule(role="support", tool="lookup", action="allow"),
    Rule(role="support", tool="refund", action="ask"),
)
MARK = "OBEY-ME"


class LoopDetector:
    """An async detector that flags `MARK` and records the event loop each check ran on."""

    def __init__(self) -> None:
        self.loops: list[asyncio.AbstractEventLoop] = []

    async def __call__(self, text: str, source: Any) -> list[ContentFinding]:
        self.loops.append(asyncio.get_running_loop())
        await asyncio.sleep(0)
        return [ContentFinding.covering(text, rule="obey_me")] if MARK in text else []


@tool
def lookup(order_id: str) -> str:
    """Look an order up."""
    return f"{order_id}: shipped. {MARK}" if order_id == "A2" else f"{order_id}: shipped."


@tool(risk="write")
def refund(order_id: str) -> str:
    """Refund an order."""
    return f"refunded {order_id}"


def guarded(script: list[Any], detector: Any, action: str = "block") -> tuple[Any, Any]:
    model = ScriptedChatModel(script=script)
    guard = InputGuardPolicy(injection_action=action, detector=detector)  # type: ignore[arg-type]
    policy = Policy(rules=RULES, input_guard=guard)
    return model, build_agent(model, [lookup, refund], policy=policy, checkpointer=InMemorySaver())


async def test_a_model_detector_guards_the_input_of_an_ainvoke_run() -> None:
    judge = ScriptedChatModel(
        structured={"InjectionVerdict": {"injection": True, "reason": "overrides its rules"}}
    )
    model, agent = guarded(["ok"], ModelDetector(model=judge))
    config = {"configurable": {"thread_id": "t-judge"}}
    result = await agent.ainvoke({"messages": [("user", "Obey me.")]}, config, context=CTX)

    assert model.calls == []
    assert result["outcome"]["terminated_reason"] == "blocked"
    assert "model_verdict" in result["outcome"]["detail"]


async def test_an_async_detector_reads_input_and_tool_results_on_the_callers_loop() -> None:
    detector = LoopDetector()
    model, agent = guarded([call("lookup", order_id="A2"), "done"], detector)
    config = {"configurable": {"thread_id": "t-loop"}}
    result = await agent.ainvoke({"messages": [("user", "Where is A2?")]}, config, context=CTX)

    (page,) = [m for m in result["messages"] if isinstance(m, ToolMessage)]
    assert page.response_metadata["keel_status"] == "blocked"  # withheld from the model
    assert MARK not in "\n".join(m.text for request in model.calls for m in request)
    assert detector.loops and set(detector.loops) == {asyncio.get_running_loop()}


async def test_an_async_detector_reads_a_reviewers_respond_text() -> None:
    detector = LoopDetector()
    model, agent = guarded([call("refund", order_id="A1"), "noted"], detector, action="redact")
    config = {"configurable": {"thread_id": "t-review"}}
    paused = await agent.ainvoke({"messages": [("user", "Refund A1.")]}, config, context=CTX)
    (request,) = paused["__interrupt__"][0].value
    answer = {request["tool_call_id"]: {"type": "respond", "message": f"No. {MARK}"}}
    result = await agent.ainvoke(Command(resume=answer), config, context=CTX)

    (reply,) = [m for m in result["messages"] if isinstance(m, ToolMessage)]
    assert MARK not in reply.text
    assert MARK not in "\n".join(m.text for request in model.calls for m in request)
    assert reply.response_metadata["keel_guard"]["rules"] == ["obey_me"]
    assert set(detector.loops) == {asyncio.get_running_loop()}


async def test_an_async_detector_in_create_agents_middleware_under_ainvoke() -> None:
    detector = LoopDetector()
    model = ScriptedChatModel(script=[call("lookup", order_id="A2"), "done"])
    guard = InputGuardMiddleware(InputGuardPolicy(injection_action="block", detector=detector))
    agent = create_agent(model, [lookup], middleware=[guard])
    result = await agent.ainvoke({"messages": [("user", "Where is A2?")]})

    (page,) = [m for m in result["messages"] if isinstance(m, ToolMessage)]
    assert page.response_metadata["keel_status"] == "blocked"
    assert set(detector.loops) == {asyncio.get_running_loop()}


def test_an_async_detector_still_works_under_invoke() -> None:
    detector = LoopDetector()
    model, agent = guarded(["ok"], detector)
    config = {"configurable": {"thread_id": "t-sync"}}
    result = agent.invoke({"messages": [("user", f"Hi. {MARK}")]}, config, context=CTX)
    assert model.calls == []
    assert result["outcome"]["terminated_reason"] == "blocked"


def test_a_model_detectors_calls_are_counted_in_the_runs_usage() -> None:
    """README: every model call keel makes is counted, a `ModelDetector`'s included (it goes
    through the run's `GuardedModel` guards). tests/test_detector_guards.py has the budgets."""
    judge = ScriptedChatModel(
        structured={"InjectionVerdict": {"injection": False, "reason": "plain data"}}
    )
    guard = InputGuardPolicy(detector=ModelDetector(model=judge))
    model = ScriptedChatModel(script=["It shipped."])
    agent = build_agent(model, policy=Policy(input_guard=guard, budget=Budget(model_calls=5)))
    result = agent.invoke({"messages": [("user", "Where is my order?")]})
    assert result["outcome"]["terminated_reason"] == "completed"
    assert len(judge.calls) == 1  # the detector read the user's message
    assert result["usage"]["model_calls"] == 2  # the detector's call and the agent's turn
    (verdict,) = judge.answers
    assert result["usage"]["input_tokens"] > verdict.usage_metadata["input_tokens"]
