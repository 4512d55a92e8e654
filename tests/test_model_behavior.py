"""A misbehaving model is its own error (`ModelBehaviorError`) and still ends the run well.

Attacks: a chaos model that breaks every tool call's JSON (fresh ids each turn), a scripted
model that sends malformed calls and then recovers (the run must go on), and a judge whose
verdict does not parse. Every run ends with an outcome and a final answer, never a traceback.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from langchain_core.messages import AIMessage, InvalidToolCall, ToolCall, ToolMessage
from langgraph.types import RetryPolicy

from keel import RunContext, build_agent, tool
from keel.db.runs import error_category
from keel.errors import KeelError, ModelBehaviorError
from keel.evals import ChaosChatModel, ChaosPolicy, ScriptedChatModel, call
from keel.guards import after_failure
from keel.history import MALFORMED_TURNS

CTX = RunContext(user_id="u1")
FAST = RetryPolicy(max_attempts=2, initial_interval=0.001, jitter=False)


@tool
def lookup_order(order_id: str) -> str:
    """Look up an order."""
    return f"order {order_id}: shipped"


def broken() -> AIMessage:
    """A turn whose only tool call's arguments are not JSON, under a fresh id."""
    return AIMessage(
        content="",
        invalid_tool_calls=[
            InvalidToolCall(
                type="invalid_tool_call",
                name="lookup_order",
                args='{"order_id": "A1"',
                id=f"bad-{uuid.uuid4().hex[:8]}",
                error="not valid JSON",
            )
        ],
    )


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
async def test_a_model_that_only_breaks_tool_calls_ends_as_a_model_behavior_error(
    mode: str,
) -> None:
    model = ChaosChatModel(
        model=ScriptedChatModel(script=[call("lookup_order", order_id="A1")] * 10),
        policy=ChaosPolicy(malformed_tool_call=1.0, seed=3),
    )
    agent = build_agent(model, [lookup_order], model_retry=FAST)
    payload = {"messages": [("user", "where is A1?")]}
    final = (
        agent.invoke(payload, context=CTX)
        if mode == "invoke"
        else await agent.ainvoke(payload, context=CTX)
    )
    result = final["outcome"]
    assert (result["status"], result["terminated_reason"]) == ("error", "error")
    assert "ModelBehaviorError" in result["detail"] and "malformed tool calls" in result["detail"]
    assert error_category(result) == "model:ModelBehaviorError"
    assert len(model.faults) == MALFORMED_TURNS  # it stopped asking after the third turn
    last = final["messages"][-1]
    assert isinstance(last, AIMessage) and last.response_metadata == {"keel_partial": True}


async def test_a_model_that_recovers_from_malformed_calls_goes_on() -> None:
    script = [*(broken() for _ in range(MALFORMED_TURNS - 1)), call("lookup_order", order_id="A1")]
    agent = build_agent(ScriptedChatModel(script=[*script, "A1 shipped."]), [lookup_order])
    final = await agent.ainvoke({"messages": [("user", "where is A1?")]}, context=CTX)
    assert final["outcome"]["terminated_reason"] == "completed"


async def test_malformed_turns_are_counted_per_task_not_per_thread() -> None:
    """Two malformed turns, a good answer, then two more: never three in a row."""
    script = [broken(), broken(), "fine", broken(), broken(), "fine again"]
    agent = build_agent(ScriptedChatModel(script=script), [lookup_order])
    first = await agent.ainvoke({"messages": [("user", "one")]}, context=CTX)
    history = [*first["messages"], ("user", "two")]
    final = await agent.ainvoke({"messages": history}, context=CTX)
    assert final["outcome"]["terminated_reason"] == "completed"


async def test_calls_sharing_an_id_with_a_malformed_one_still_run_and_are_answered_apart() -> None:
    """A turn names two good calls and a malformed one `c1`, and another malformed one not at
    all. The malformed call's error answered `c1`, so neither good call ran (both looked
    answered). Each call is renamed apart, in its `tool_calls` and its `tool_use` content
    block (as Anthropic sends them), so the provider reads back a consistent message."""
    lookups = [("A1", "c1"), ("B2", "c1")]
    turn = AIMessage(
        content=[
            {"type": "text", "text": "Checking both."},
            *(
                {"type": "tool_use", "id": i, "name": "lookup_order", "input": {"order_id": o}}
                for o, i in lookups
            ),
        ],
        tool_calls=[ToolCall(name="lookup_order", args={"order_id": o}, id=i) for o, i in lookups],
        invalid_tool_calls=[
            InvalidToolCall(
                type="invalid_tool_call", name="lookup_order", args="{", id=i, error="not JSON"
            )
            for i in ("c1", None)
        ],
    )
    # the provider's ids as given (one shared, one missing): what the test is about
    model = ScriptedChatModel(script=[turn, "Both shipped."], fresh_ids=False)
    agent = build_agent(model, [lookup_order])
    final = await agent.ainvoke({"messages": [("user", "where are A1, B2?")]}, context=CTX)
    assert final["outcome"]["terminated_reason"] == "completed"
    request = final["messages"][1]
    assert isinstance(request, AIMessage)
    assert [c["id"] for c in request.tool_calls] == ["c1", "c1_2"]
    assert [c["id"] for c in request.invalid_tool_calls] == ["c1_3", "call_1"]
    blocks = [b for b in request.content if isinstance(b, dict) and b["type"] == "tool_use"]
    assert [(b["id"], b["input"]) for b in blocks] == [
        ("c1", {"order_id": "A1"}),
        ("c1_2", {"order_id": "B2"}),
    ]
    answers = {m.tool_call_id: m.content for m in final["messages"] if isinstance(m, ToolMessage)}
    assert answers.keys() == {"c1", "c1_2", "c1_3", "call_1"}
    assert (answers["c1"], answers["c1_2"]) == ("order A1: shipped", "order B2: shipped")


async def test_a_judge_whose_verdict_does_not_parse_fails_verification_with_the_error() -> None:
    judge = ScriptedChatModel(structured={"JudgeVerdict": {"passed": "perhaps"}})
    agent = build_agent(ScriptedChatModel(script=["An answer."] * 3), judge=judge)
    final = await agent.ainvoke({"messages": [("user", "q")]}, context=CTX)
    assert final["outcome"]["terminated_reason"] == "verification_failed"
    reasons = [v["reason"] for v in final["verdicts"]]
    assert reasons and all(r.startswith("the judge failed: ModelBehaviorError: ") for r in reasons)


def test_a_misbehaving_model_falls_back_and_is_not_retried_in_place() -> None:
    error = ModelBehaviorError("m", "returned str, not an AIMessage")
    assert isinstance(error, KeelError)
    assert after_failure(error, 1, FAST, has_fallback=True) == "fallback"
    assert after_failure(error, 1, FAST, has_fallback=False) == "stop"


def test_the_error_names_the_model_and_the_problem() -> None:
    error: Any = ModelBehaviorError("gpt-x", "sent only malformed tool calls")
    assert (error.model, error.problem) == ("gpt-x", "sent only malformed tool calls")
    assert str(error).startswith("gpt-x sent only malformed tool calls. A different model")


# -- retries run on tenacity's engine, and honour Retry-After ------------------------------------


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
async def test_a_429_is_retried_after_its_retry_after_not_the_shorter_backoff(mode: str) -> None:
    from keel.evals.chaos import ChaosRateLimitError

    calls: list[float] = []

    def limited(messages: Any) -> str:
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise ChaosRateLimitError(retry_after=0.3)
        return "fine"

    retry = RetryPolicy(max_attempts=3, initial_interval=0.001, max_interval=5.0, jitter=False)
    agent = build_agent(ScriptedChatModel(script=[limited]), model_retry=retry)
    payload = {"messages": [("user", "hi")]}
    final = (
        agent.invoke(payload, context=CTX)
        if mode == "invoke"
        else await agent.ainvoke(payload, context=CTX)
    )
    assert final["outcome"]["terminated_reason"] == "completed"
    assert len(calls) == 2 and calls[1] - calls[0] >= 0.3  # waited Retry-After, not 1 ms


def test_a_429_longer_than_the_policy_allows_is_capped_at_max_interval() -> None:
    from keel.evals.chaos import ChaosRateLimitError
    from keel.guards.fallback import backoff

    retry = RetryPolicy(max_attempts=3, initial_interval=0.001, max_interval=0.05, jitter=False)
    assert backoff(retry, 1, ChaosRateLimitError(retry_after=30)) == 0.05
