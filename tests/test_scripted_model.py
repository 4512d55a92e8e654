"""`ScriptedChatModel` (the test double) and `forbid_model_requests` (the real-model guard)."""

from __future__ import annotations

import asyncio
import operator
import re
import threading
import time
from collections.abc import Sequence
from functools import reduce

import pytest
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    ToolCall,
    ToolMessage,
)
from pydantic import BaseModel

from keel import RunContext, build_agent, tool
from keel.errors import ModelRequestsForbidden
from keel.evals import (
    ScriptedChatModel,
    ScriptExhausted,
    call,
    forbid_model_requests,
    model_requests_forbidden,
    say,
)


@tool
def lookup(q: str) -> str:
    """Look something up."""
    return f"found {q}"


def answer_of(ai: BaseMessage, content: str) -> ToolMessage:
    assert isinstance(ai, AIMessage)
    return ToolMessage(content=content, tool_call_id=ai.tool_calls[0]["id"] or "")


# -- turns ----------------------------------------------------------------------------------


def test_the_turn_is_the_number_of_ai_messages_so_far() -> None:
    model = ScriptedChatModel(script=["first", "second", "third"])
    assert model.invoke([HumanMessage(content="hi")]).content == "first"
    history = [HumanMessage(content="hi"), AIMessage(content="x"), HumanMessage(content="more")]
    assert model.invoke(history).content == "second"
    # Asking again with the same conversation gives the same turn: no hidden per-run state.
    assert model.invoke(history).content == "second"
    assert model.invoke([*history, AIMessage(content="y")]).content == "third"


def test_one_model_serves_interleaved_conversations() -> None:
    model = ScriptedChatModel(script=[call("lookup", q="x"), "the answer"])
    a0 = model.invoke([HumanMessage(content="a")])
    b0 = model.invoke([HumanMessage(content="b")])
    assert [(tc["name"], tc["args"]) for tc in a0.tool_calls] == [("lookup", {"q": "x"})]
    assert [(tc["name"], tc["args"]) for tc in b0.tool_calls] == [("lookup", {"q": "x"})]
    assert a0.tool_calls[0]["id"] != b0.tool_calls[0]["id"], "fresh ids by default"
    bound = model.bind_tools([lookup])  # a history with tool turns needs tools bound
    a1 = bound.invoke([HumanMessage(content="a"), a0, answer_of(a0, "found x")])
    b1 = bound.invoke([HumanMessage(content="b"), b0, answer_of(b0, "found x")])
    assert (a1.content, b1.content) == ("the answer", "the answer")
    assert [len(c) for c in model.calls] == [1, 1, 3, 3]


async def test_one_model_serves_concurrent_agent_runs() -> None:
    def ask(messages: Sequence[BaseMessage]) -> AIMessage:
        return call("lookup", q=str(messages[0].content))

    def conclude(messages: Sequence[BaseMessage]) -> str:
        return f"answer: {messages[-1].content}"

    model = ScriptedChatModel(script=[ask, conclude], latency=0.05)
    agent = build_agent(model, [lookup])
    runs = await asyncio.gather(
        *(
            agent.ainvoke({"messages": [("user", q)]}, context=RunContext(user_id=q))
            for q in ("apples", "pears", "plums")
        )
    )
    assert [r["messages"][-1].content for r in runs] == [
        "answer: found apples",
        "answer: found pears",
        "answer: found plums",
    ]
    assert all(r["outcome"]["terminated_reason"] == "completed" for r in runs)


def test_one_model_serves_threads() -> None:
    model = ScriptedChatModel(script=[call("lookup", q="x"), "done"])
    agent = build_agent(model, [lookup])
    results: list[str] = []

    def run() -> None:
        final = agent.invoke({"messages": [("user", "hi")]})
        results.append(final["outcome"]["terminated_reason"])

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["completed"] * 8


def test_script_entries_can_be_messages_text_or_functions() -> None:
    seen: list[int] = []

    def responder(messages: Sequence[BaseMessage]) -> str:
        seen.append(len(messages))
        return "from a function"

    model = ScriptedChatModel(script=[say("from say"), AIMessage(content="a message"), responder])
    history: list[BaseMessage] = [HumanMessage(content="hi")]
    out = []
    for _ in range(3):
        reply = model.invoke(history)
        out.append(reply.content)
        history = [*history, reply]
    assert out == ["from say", "a message", "from a function"]
    assert seen == [3]


def test_tool_call_ids_are_fresh_by_default_as_real_models_give() -> None:
    model = ScriptedChatModel(script=[call("lookup", q="x")])
    first = model.invoke([HumanMessage(content="hi")])
    again = model.invoke([HumanMessage(content="hi")])  # the same turn asked again (a retry)
    ids = [first.tool_calls[0]["id"], again.tool_calls[0]["id"]]
    assert all(i and i.startswith("call_") for i in ids)
    assert ids[0] != ids[1]


def test_tool_call_ids_are_assigned_per_turn_and_kept_when_given() -> None:
    given = AIMessage(content="", tool_calls=[ToolCall(name="lookup", args={"q": "z"}, id="mine")])
    two_calls = AIMessage(
        content="",
        tool_calls=[
            ToolCall(name="lookup", args={"q": "a"}, id=None),
            ToolCall(name="lookup", args={"q": "b"}, id=None),
        ],
    )
    # stable ids on request: fresh_ids=False names calls call_<turn>_<i>
    model = ScriptedChatModel(script=[call("lookup", q="x"), two_calls, given], fresh_ids=False)
    first = model.invoke([HumanMessage(content="hi")])
    assert first.tool_calls == [
        {"name": "lookup", "args": {"q": "x"}, "id": "call_0_0", "type": "tool_call"}
    ]
    second = model.invoke([HumanMessage(content="hi"), AIMessage(content="x")])
    assert [tc["id"] for tc in second.tool_calls] == ["call_1_0", "call_1_1"]
    third = model.invoke([AIMessage(content="x"), AIMessage(content="y")])
    assert [tc["id"] for tc in third.tool_calls] == ["mine"]
    assert two_calls.tool_calls[0]["id"] is None, "the script entry itself is not mutated"


def test_call_helper_merges_positional_and_keyword_args() -> None:
    assert call("lookup", {"q": "x"}, limit=3).tool_calls[0]["args"] == {"q": "x", "limit": 3}


def test_every_answer_has_usage_metadata_and_model_name() -> None:
    model = ScriptedChatModel(script=[call("lookup", q="x"), "a final answer"])
    for history in ([HumanMessage(content="hi")], [AIMessage(content="x")]):
        reply = model.invoke(history)
        usage = reply.usage_metadata
        assert usage is not None
        assert usage["input_tokens"] > 0
        assert usage["output_tokens"] > 0
        assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
        assert reply.response_metadata["model_name"] == "scripted"


def test_scripted_usage_is_kept() -> None:
    scripted = AIMessage(
        content="hi",
        usage_metadata={"input_tokens": 7, "output_tokens": 11, "total_tokens": 18},
    )
    model = ScriptedChatModel(script=[scripted], model_name="gpt-4o-mini")
    reply = model.invoke([HumanMessage(content="x")])
    assert reply.usage_metadata == {"input_tokens": 7, "output_tokens": 11, "total_tokens": 18}
    assert reply.response_metadata["model_name"] == "gpt-4o-mini"


def test_calls_records_every_request() -> None:
    model = ScriptedChatModel(script=["a"])
    model.invoke([HumanMessage(content="hello")])
    assert model.calls == [[HumanMessage(content="hello")]]


def test_script_exhausted_says_how_to_fix_it() -> None:
    model = ScriptedChatModel(script=["only one"])
    with pytest.raises(ScriptExhausted) as excinfo:
        model.invoke([HumanMessage(content="hi"), AIMessage(content="only one")])
    assert str(excinfo.value) == (
        "ScriptedChatModel has 1 turns but the conversation asks for turn 2. "
        "Add turns to `script` (or end it with a final text answer)."
    )


# -- structured output ----------------------------------------------------------------------


class Weather(BaseModel):
    city: str
    celsius: float


def test_structured_output_is_answered_from_structured() -> None:
    model = ScriptedChatModel(structured={"Weather": {"city": "Oslo", "celsius": -3}})
    result = model.with_structured_output(Weather).invoke("weather in Oslo?")
    assert result == Weather(city="Oslo", celsius=-3)


def test_structured_answer_can_be_a_function_of_the_conversation() -> None:
    model = ScriptedChatModel(
        structured={"Weather": lambda messages: {"city": messages[-1].content, "celsius": 20}}
    )
    result = model.with_structured_output(Weather).invoke([HumanMessage(content="Rome")])
    assert result == Weather(city="Rome", celsius=20)


def test_structured_output_with_raw_has_usage() -> None:
    model = ScriptedChatModel(structured={"Weather": {"city": "Oslo", "celsius": 1}})
    out = model.with_structured_output(Weather, include_raw=True).invoke("x")
    assert out["parsed"] == Weather(city="Oslo", celsius=1)
    assert out["raw"].usage_metadata is not None


def test_structured_output_does_not_use_up_script_turns() -> None:
    model = ScriptedChatModel(script=["text"], structured={"Weather": {"city": "a", "celsius": 0}})
    model.with_structured_output(Weather).invoke("x")
    assert model.invoke([HumanMessage(content="x")]).content == "text"


def test_structured_output_missing_from_structured_says_how_to_fix_it() -> None:
    model = ScriptedChatModel(structured={"Plan": {"steps": []}})
    with pytest.raises(ScriptExhausted) as excinfo:
        model.with_structured_output(Weather).invoke("x")
    assert str(excinfo.value) == (
        "ScriptedChatModel was asked for structured output 'Weather' but `structured` has "
        "only ['Plan']. Add structured={'Weather': {...}}."
    )


# -- streaming ------------------------------------------------------------------------------


def test_stream_yields_text_chunks_that_add_up_to_the_message() -> None:
    model = ScriptedChatModel(script=["It shipped on Monday."])
    history = [HumanMessage(content="where is A1?")]
    chunks = list(model.stream(history))
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    assert [c.content for c in chunks] == ["It", " shipped", " on", " Monday.", ""]
    whole = reduce(operator.add, chunks)
    expected = model.invoke(history)
    assert whole.content == expected.content
    assert whole.tool_calls == []
    assert whole.usage_metadata == expected.usage_metadata


def test_stream_tool_call_chunks_aggregate_to_the_same_tool_calls() -> None:
    turn = AIMessage(
        content="Let me check.",
        tool_calls=[
            ToolCall(name="lookup", args={"q": "A1"}, id=None),
            ToolCall(name="lookup", args={"q": "A2", "deep": True}, id=None),
        ],
    )
    model = ScriptedChatModel(script=[turn], fresh_ids=False)  # compares two answers' ids
    history = [HumanMessage(content="hi")]
    chunks = list(model.bind_tools([lookup]).stream(history))
    assert [c.content for c in chunks[:-1]] == ["Let", " me", " check."]
    assert [tc["name"] for tc in chunks[-1].tool_call_chunks] == ["lookup", "lookup"]
    whole = reduce(operator.add, chunks)
    expected = model.invoke(history)
    assert whole.content == expected.content == "Let me check."
    assert whole.tool_calls == expected.tool_calls
    assert [tc["id"] for tc in whole.tool_calls] == ["call_0_0", "call_0_1"]
    assert whole.usage_metadata == expected.usage_metadata


async def test_astream_matches_stream() -> None:
    model = ScriptedChatModel(script=[call("lookup", q="x")], fresh_ids=False)  # compares ids
    history = [HumanMessage(content="hi")]
    chunks = [c async for c in model.astream(history)]
    whole = reduce(operator.add, chunks)
    assert whole.tool_calls == model.invoke(history).tool_calls


# -- latency --------------------------------------------------------------------------------


async def test_async_latency_does_not_block_the_event_loop() -> None:
    # two calls one after the other take 2 * latency: the bound is that, not latency + 0.15 s
    # (too tight on a loaded CI machine); 2 s each leaves 2 s for the calls' own work
    latency = 2.0
    model = ScriptedChatModel(script=["a"], latency=latency)
    start = time.perf_counter()
    replies = await asyncio.gather(
        model.ainvoke([HumanMessage(content="1")]), model.ainvoke([HumanMessage(content="2")])
    )
    elapsed = time.perf_counter() - start
    assert [r.content for r in replies] == ["a", "a"]
    assert latency <= elapsed < 2 * latency, (
        f"two concurrent {latency} s calls took {elapsed:.3f} s"
    )


def test_sync_latency_is_applied() -> None:
    model = ScriptedChatModel(script=["a"], latency=0.05)
    start = time.perf_counter()
    model.invoke([HumanMessage(content="1")])
    assert time.perf_counter() - start >= 0.05


# -- forbid_model_requests ------------------------------------------------------------------


@pytest.fixture
def requests_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start from "allowed", whatever an autouse fixture elsewhere may have switched on."""
    monkeypatch.setattr("keel.evals.requests._forbidden_globally", False)


FORBIDDEN = re.escape(
    "A real model call to FakeListChatModel was made while model requests are forbidden "
    "(keel.evals.forbid_model_requests). Use keel.evals.ScriptedChatModel in tests, or leave "
    "the forbid_model_requests() block to call a real model."
)


@pytest.mark.usefixtures("requests_allowed")
async def test_real_models_are_forbidden_inside_the_block_only() -> None:
    real = FakeListChatModel(responses=["real answer"] * 10)
    assert real.invoke("hi").content == "real answer"
    assert not model_requests_forbidden()
    with forbid_model_requests():
        assert model_requests_forbidden()
        with pytest.raises(ModelRequestsForbidden, match=f"^{FORBIDDEN}$"):
            real.invoke("hi")
        with pytest.raises(ModelRequestsForbidden, match=FORBIDDEN):
            await real.ainvoke("hi")
        with pytest.raises(ModelRequestsForbidden, match=FORBIDDEN):
            list(real.stream("hi"))
        with pytest.raises(ModelRequestsForbidden, match=FORBIDDEN):
            [c async for c in real.astream("hi")]
        with pytest.raises(ModelRequestsForbidden, match=FORBIDDEN):
            real.batch(["a", "b"])
    assert not model_requests_forbidden()
    assert real.invoke("hi").content == "real answer"
    assert "".join(str(c.content) for c in real.stream("hi")) == "real answer"
    assert (await real.ainvoke("hi")).content == "real answer"


@pytest.mark.usefixtures("requests_allowed")
async def test_scripted_model_still_runs_inside_the_block() -> None:
    model = ScriptedChatModel(script=["scripted"])
    with forbid_model_requests():
        assert model.invoke("hi").content == "scripted"
        assert (await model.ainvoke("hi")).content == "scripted"
        assert "".join(str(c.content) for c in model.stream("hi")) == "scripted"
        agent = build_agent(ScriptedChatModel(script=["done"]))
        assert agent.invoke({"messages": [("user", "hi")]})["outcome"]["status"] == "success"


@pytest.mark.usefixtures("requests_allowed")
def test_a_forbidden_model_inside_an_agent_ends_the_run_with_an_error() -> None:
    agent = build_agent(FakeListChatModel(responses=["x"]))
    with forbid_model_requests():
        final = agent.invoke({"messages": [("user", "hi")]})
    assert final["outcome"]["status"] == "error"
    assert final["outcome"]["detail"].startswith(
        "model call failed after 1 attempt(s): ModelRequestsForbidden: A real model call"
    )


@pytest.mark.usefixtures("requests_allowed")
def test_blocks_nest_and_restore_on_error() -> None:
    with forbid_model_requests():
        with forbid_model_requests():
            pass
        assert model_requests_forbidden(), "leaving the inner block keeps the outer one on"
    assert not model_requests_forbidden()
    with pytest.raises(KeyError), forbid_model_requests():
        raise KeyError("boom")
    assert not model_requests_forbidden()


# -- Anthropic's rule: tool blocks need tools ----------------------------------------------


def _tool_turns() -> list[BaseMessage]:
    asked = AIMessage(content="", tool_calls=[ToolCall(name="lookup", args={"q": "x"}, id="c1")])
    return [HumanMessage(content="go"), asked, answer_of(asked, "found x")]


def test_a_call_without_tools_refuses_tool_calls_and_results_as_anthropic_does() -> None:
    model = ScriptedChatModel(script=["a", "b"])
    assert model.bind_tools([lookup]).invoke(_tool_turns()).text == "b"
    assert model.invoke([HumanMessage(content="go")]).text == "a"  # no tool turns: no tools
    with pytest.raises(ValueError, match=r"Invalid messages.*must define tools.*message 1"):
        model.invoke(_tool_turns())  # no bind_tools: Anthropic answers 400
    broken = AIMessage(content="", invalid_tool_calls=[{"name": "x", "args": "{", "id": "c9"}])
    with pytest.raises(ValueError, match=r"must define tools"):
        model.invoke([HumanMessage(content="go"), broken, ToolMessage("e", tool_call_id="c9")])
    weather = {"Weather": {"city": "Oslo", "celsius": 1}}
    judged = ScriptedChatModel(structured=weather).with_structured_output(Weather)
    assert judged.invoke(_tool_turns()) == Weather(city="Oslo", celsius=1)  # a schema is a tool
    lenient = ScriptedChatModel(script=["a", "b"], strict_history=False)
    assert lenient.invoke(_tool_turns()).text == "b"
