"""The loop guard: `detect_loop` / `call_sequence` as pure decisions, then `build_agent` runs.

The same call `max_repeats` times in a row, or a block of 2 to `MAX_CYCLE_LENGTH` calls (not
all the same) repeated `max_cycles` times, is a loop; only the current task (since the last
human message) counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import pytest
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    InvalidToolCall,
    ToolCall,
    ToolMessage,
)
from langgraph.checkpoint.memory import InMemorySaver
from pydantic import AfterValidator, PrivateAttr

from keel import Persistence, RunContext, build_agent, tool
from keel.evals import ScriptedChatModel, call
from keel.evals.scripted import malformed
from keel.guards import Budget, LoopPolicy, Policy, Rule, detect_loop
from keel.guards.loop import MAX_CYCLE_LENGTH, call_sequence, loop_window
from keel.nodes import valid_history
from keel.tools.registry import registered

CTX = RunContext(user_id="u1", tenant_id="acme", roles=("support",))
A = ("lookup", '{"q":"x"}')
B = ("search", '{"q":"x"}')
C = ("fetch", '{"url":"u"}')


# ===========================================================================================
# detect_loop: pure
# ===========================================================================================


def test_the_same_call_max_repeats_times_in_a_row_is_a_loop() -> None:
    assert detect_loop([A, A], LoopPolicy()) is None
    assert detect_loop([A, A, A], LoopPolicy()) == (
        'lookup was called 3 times in a row with the same arguments {"q":"x"}'
    )
    assert detect_loop([A, A], LoopPolicy(max_repeats=2)) == (
        'lookup was called 2 times in a row with the same arguments {"q":"x"}'
    )
    assert detect_loop([A, A, A], LoopPolicy(max_repeats=4)) is None


def test_an_a_b_a_b_cycle_is_a_loop() -> None:
    assert detect_loop([A, B, A], LoopPolicy(max_cycles=2)) is None
    assert detect_loop([A, B, A, B], LoopPolicy(max_cycles=2)) == (
        "the calls lookup → search repeated 2 times in a cycle"
    )
    assert detect_loop([A, B, A, B], LoopPolicy(max_cycles=3)) is None
    assert detect_loop([A, B, A, B, A, B], LoopPolicy(max_cycles=3)) == (
        "the calls lookup → search repeated 3 times in a cycle"
    )


def test_an_a_b_c_cycle_is_a_loop() -> None:
    assert detect_loop([A, B, C, A, B], LoopPolicy()) is None
    assert detect_loop([A, B, C, A, B, C], LoopPolicy()) == (
        "the calls lookup → search → fetch repeated 2 times in a cycle"
    )


D = ("notify", '{"to":"x"}')


def test_an_a_b_c_d_cycle_is_a_loop() -> None:
    """Only blocks of 2 and 3 calls were looked for: A-B-C-D-A-B-C-D... ran until a budget."""
    assert detect_loop([A, B, C, D, A, B, C], LoopPolicy()) is None
    assert detect_loop([A, B, C, D, A, B, C, D], LoopPolicy()) == (
        "the calls lookup → search → fetch → notify repeated 2 times in a cycle"
    )
    assert detect_loop([A, B, C, D] * 2, LoopPolicy(max_cycles=3)) is None
    assert detect_loop([C, *[A, B, C, D] * 3], LoopPolicy(max_cycles=3)) is not None


def test_a_cycle_of_any_length_up_to_the_bound_is_a_loop() -> None:
    for period in (4, 5, 9, 17, MAX_CYCLE_LENGTH):
        block = [("lookup", f'{{"q":"{i}"}}') for i in range(period)]
        head = [A, B]  # calls before the loop began do not matter
        assert detect_loop([*head, *block, *block[:-1]], LoopPolicy()) is None, period
        found = detect_loop([*head, *block, *block], LoopPolicy())
        assert found is not None and found.endswith("repeated 2 times in a cycle"), period
        if period > 8:
            assert f"… ({period} calls)" in found
    longer = [("lookup", f'{{"q":"{i}"}}') for i in range(MAX_CYCLE_LENGTH + 1)]
    assert detect_loop(longer * 2, LoopPolicy()) is None  # beyond the bound: the budget's


def test_a_block_with_a_repeated_call_inside_is_a_cycle() -> None:
    assert detect_loop([A, A, B, A, A, B], LoopPolicy()) == (
        "the calls lookup → lookup → search repeated 2 times in a cycle"
    )
    # the same call again and again is the repeat rule's, with its own threshold
    assert detect_loop([A] * 4, LoopPolicy(max_repeats=5)) is None


def test_the_shortest_cycle_is_named() -> None:
    assert detect_loop([A, B] * 4, LoopPolicy()) == (
        "the calls lookup → search repeated 2 times in a cycle"
    )


def test_cycle_detection_reads_a_bounded_tail() -> None:
    """A long task: the guard reads the last `MAX_CYCLE_LENGTH * max_cycles` calls only."""
    distinct = [("lookup", f'{{"q":"{i}"}}') for i in range(100_000)]
    assert detect_loop(distinct, LoopPolicy()) is None
    assert detect_loop([*distinct, A, B, C, D, A, B, C, D], LoopPolicy()) is not None


def test_alternating_arguments_of_one_tool_are_a_cycle() -> None:
    one, two = ("lookup", '{"q":"1"}'), ("lookup", '{"q":"2"}')
    assert detect_loop([one, two, one, two], LoopPolicy()) == (
        "the calls lookup → lookup repeated 2 times in a cycle"
    )


@pytest.mark.parametrize(
    "calls",
    [
        [A, A, B],  # a repeat that stopped
        [A, B, B],
        [A, A, B, B],  # pairs, not a cycle of different calls
        [A, A, A, B],  # the loop is over: the latest call is new
        [("lookup", '{"q":"1"}'), ("lookup", '{"q":"2"}'), ("lookup", '{"q":"3"}')],
        [A, B, C, B, A],
        [A, B, C, D, B, A, C, D],  # the same calls in another order
        [A, B, C, D, A, B, D, C],
        [A, A, B, B, A, A, B],
        [],
    ],
    ids=[
        "AAB",
        "ABB",
        "AABB",
        "AAAB",
        "distinct-args",
        "ABCBA",
        "ABCDBACD",
        "ABCDABDC",
        "AABBAAB",
        "empty",
    ],
)
def test_no_false_positives(calls: list[tuple[str, str]]) -> None:
    assert detect_loop(calls, LoopPolicy()) is None


def test_max_cycles_zero_disables_cycle_detection_but_not_repeats() -> None:
    assert detect_loop([A, B, A, B, A, B], LoopPolicy(max_cycles=0)) is None
    assert detect_loop([A, A, A], LoopPolicy(max_cycles=0)) is not None


# -- call_sequence: what counts -------------------------------------------------------------


def ai(*calls: tuple[str, dict[str, Any]], turn: int = 0) -> AIMessage:
    return AIMessage(
        content="",
        tool_calls=[ToolCall(name=n, args=a, id=f"t{turn}_{i}") for i, (n, a) in enumerate(calls)],
    )


def answered(message: AIMessage) -> list[BaseMessage]:
    return [
        message,
        *(ToolMessage(content="ok", tool_call_id=tc["id"] or "") for tc in message.tool_calls),
    ]


def test_only_the_current_task_since_the_last_human_message_counts() -> None:
    x = ("lookup", {"q": "x"})
    history = [
        HumanMessage(content="first task"),
        *answered(ai(x, turn=1)),
        *answered(ai(x, turn=2)),
        AIMessage(content="done"),
        HumanMessage(content="second task"),
        *answered(ai(x, turn=3)),
    ]
    sequence = call_sequence(history, ai(x, turn=4))
    assert sequence == [A, A]
    assert detect_loop(sequence, LoopPolicy()) is None  # 4 in the thread, 2 in this task


def test_call_sequence_canonicalizes_arguments_and_keeps_order() -> None:
    history = [
        HumanMessage(content="go"),
        *answered(ai(("lookup", {"b": 1, "a": "é"}), ("search", {"q": "x"}), turn=1)),
    ]
    proposed = ai(("lookup", {"a": "é", "b": 1}), turn=2)
    assert call_sequence(history, proposed) == [
        ("lookup", '{"a":"é","b":1}'),
        ("search", '{"q":"x"}'),
        ("lookup", '{"a":"é","b":1}'),
    ]
    assert call_sequence(history) == call_sequence(history, proposed)[:2]


def test_parallel_identical_calls_in_one_turn_count_as_repeats() -> None:
    x = ("lookup", {"q": "x"})
    sequence = call_sequence([HumanMessage(content="go")], ai(x, x, x))
    assert detect_loop(sequence, LoopPolicy()) is not None


readings: list[int] = []


def _counted(n: int) -> int:
    readings.append(n)
    return n


@tool(name="lookup")
def counted_lookup(n: Annotated[int, AfterValidator(_counted)]) -> str:
    """Look up n (each reading of its arguments counted in `readings`)."""
    return str(n)


def test_a_long_task_reads_only_the_calls_the_guard_looks_at() -> None:
    """The guard runs at every step and read every call of the task as the tool reads it (a
    schema validation each): a task of 600 calls cost 600 readings a step, more every step.
    It reads the last `loop_window` calls, and decides as it did over the whole task."""
    readings.clear()
    entry = registered(counted_lookup)
    turns = [
        answered(ai(*[("lookup", {"n": t * 3 + i}) for i in range(3)], turn=t)) for t in range(200)
    ]
    history = [HumanMessage(content="go"), *(m for turn in turns for m in turn)]
    policy = LoopPolicy()
    window = loop_window(policy)
    assert window == MAX_CYCLE_LENGTH * policy.max_cycles < 600
    for proposed in (ai(("lookup", {"n": 7})), ai(("lookup", {"n": 597}), ("lookup", {"n": 598}))):
        readings.clear()
        tail = call_sequence(history, proposed, lambda name: entry, last=window)
        assert len(readings) == window  # not 601
        whole = call_sequence(history, proposed, lambda name: entry)
        assert tail == whole[-window:]
        assert detect_loop(tail, policy) == detect_loop(whole, policy)
    # a loop at the end of a long task is still found in the window
    looping = history + answered(ai(("lookup", {"n": 1}), ("lookup", {"n": 2}), turn=900))
    tail = call_sequence(
        looping, ai(("lookup", {"n": 1}), ("lookup", {"n": 2})), lambda name: entry, last=window
    )
    assert detect_loop(tail, policy) is not None
    assert call_sequence(history, None, lambda name: entry, last=0) == []


def test_without_a_human_message_the_whole_history_counts() -> None:
    x = ("lookup", {"q": "x"})
    assert call_sequence([*answered(ai(x, turn=1))], ai(x, turn=2)) == [A, A]


# ===========================================================================================
# End to end
# ===========================================================================================


class RecordingModel(ScriptedChatModel):
    """A scripted model that also records each call's keyword arguments (bound tools)."""

    _kwargs: list[dict[str, Any]] = PrivateAttr(default_factory=list)

    @property
    def kwargs(self) -> list[dict[str, Any]]:
        return self._kwargs

    def _respond(self, messages: list[BaseMessage], **kwargs: Any) -> AIMessage:
        self._kwargs.append(dict(kwargs))
        return super()._respond(messages, **kwargs)


class Counter:
    def __init__(self) -> None:
        self.ran: list[str] = []

    def tools(self) -> list[Any]:
        @tool
        def lookup(q: str) -> str:
            """Look something up."""
            self.ran.append(f"lookup {q}")
            return f"found {q}"

        @tool
        def search(q: str) -> str:
            """Search for something."""
            self.ran.append(f"search {q}")
            return f"results for {q}"

        return [lookup, search]


def fixed(message: AIMessage) -> AIMessage:
    """100 tokens in, 10 out, whatever the conversation."""
    message.usage_metadata = {"input_tokens": 100, "output_tokens": 10, "total_tokens": 110}
    return message


def agent_for(model: ScriptedChatModel, counter: Counter, loop: Any, saver: Any = None) -> Any:
    policy = Policy(rules=(Rule(action="allow"),), loop=loop)
    return build_agent(model, counter.tools(), policy=policy, checkpointer=saver)


def statuses(messages: Sequence[BaseMessage]) -> list[str]:
    return [m.response_metadata["keel_status"] for m in messages if isinstance(m, ToolMessage)]


REPEAT = 'lookup was called 3 times in a row with the same arguments {"q":"x"}'


def test_on_loop_stop_ends_the_run_as_loop_detected(db_url: str) -> None:
    counter = Counter()
    model = ScriptedChatModel(script=[call("lookup", q="x")] * 10)
    config = {"configurable": {"thread_id": "loop"}}
    with Persistence(db_url).checkpointer() as saver:
        agent = agent_for(model, counter, LoopPolicy(on_loop="stop"), saver)
        final = agent.invoke({"messages": [("user", "go")]}, config, context=CTX)
        stored = agent.get_state(config)

    assert final["outcome"] == {
        "status": "stopped",
        "terminated_reason": "loop_detected",
        "detail": REPEAT,
    }
    assert counter.ran == ["lookup x", "lookup x"]
    assert len(model.calls) == 3
    assert statuses(final["messages"]) == ["success", "success", "not_run"]
    pending = [m for m in final["messages"] if isinstance(m, ToolMessage)][-1]
    assert pending.content == "Not run: the run stopped (loop_detected)."
    last = final["messages"][-1]
    assert isinstance(last, AIMessage) and last.response_metadata == {"keel_partial": True}
    assert last.text.startswith(f"I had to stop before finishing (loop_detected): {REPEAT}.")
    assert valid_history(final["messages"]) == final["messages"]
    assert stored.next == ()


def test_an_a_b_a_b_cycle_stops_the_run() -> None:
    counter = Counter()
    model = ScriptedChatModel(script=[call("lookup", q="x"), call("search", q="x")] * 5)
    final = agent_for(model, counter, LoopPolicy()).invoke(
        {"messages": [("user", "go")]}, context=CTX
    )
    assert final["outcome"]["detail"] == "the calls lookup → search repeated 2 times in a cycle"
    assert counter.ran == ["lookup x", "search x", "lookup x"]
    assert valid_history(final["messages"]) == final["messages"]


def test_an_a_b_c_d_cycle_gets_the_wrap_up_turn() -> None:
    """A-B-C-D-A-B-C-D... escaped the guard (blocks of 2 and 3 only) and ran until a budget."""
    counter = Counter()
    cycle = [call("lookup", q="1"), call("search", q="1"), call("lookup", q="2")]
    cycle.append(call("search", q="2"))

    def turn(messages: Sequence[BaseMessage]) -> AIMessage:
        last = messages[-1]
        if isinstance(last, HumanMessage) and last.text.startswith("(keel loop guard)"):
            return AIMessage(content="Here is what I found.")
        done = sum(isinstance(m, ToolMessage) for m in messages)
        return cycle[done % 4]

    model = RecordingModel(script=[turn] * 20)
    final = agent_for(model, counter, LoopPolicy(on_loop="wrap_up")).invoke(
        {"messages": [("user", "go")]}, context=CTX
    )
    reason = "the calls lookup → search → lookup → search repeated 2 times in a cycle"
    assert final["outcome"] == {
        "status": "stopped",
        "terminated_reason": "loop_detected",
        "detail": f"{reason}; answered without tools",
    }
    once = ["lookup 1", "search 1", "lookup 2", "search 2"]
    assert counter.ran == [*once, *once[:3]]  # the 8th call closes the cycle: it never runs
    note = model.calls[-1][-1]
    assert isinstance(note, HumanMessage)
    assert note.text.startswith(f"(keel loop guard) You are repeating tool calls: {reason}.")
    assert [("tools" in kw) for kw in model.kwargs][-1] is False
    assert final["messages"][-1].text == "Here is what I found."
    assert valid_history(final["messages"]) == final["messages"]


def test_the_same_four_parallel_calls_every_turn_stop_the_run() -> None:
    counter = Counter()
    four = AIMessage(
        content="",
        tool_calls=[
            ToolCall(name=n, args={"q": q}, id=f"{n}{q}")
            for n, q in (("lookup", "1"), ("search", "1"), ("lookup", "2"), ("search", "2"))
        ],
    )
    model = ScriptedChatModel(script=[four.model_copy(deep=True) for _ in range(10)])
    final = agent_for(model, counter, LoopPolicy()).invoke(
        {"messages": [("user", "go")]}, context=CTX
    )
    assert final["outcome"] == {
        "status": "stopped",
        "terminated_reason": "loop_detected",
        "detail": "the calls lookup → search → lookup → search repeated 2 times in a cycle",
    }
    assert counter.ran == ["lookup 1", "search 1", "lookup 2", "search 2"]  # the 2nd turn: none
    assert len(model.calls) == 2
    assert statuses(final["messages"])[4:] == ["not_run"] * 4
    assert valid_history(final["messages"]) == final["messages"]


def test_repeats_across_tasks_do_not_count() -> None:
    counter = Counter()

    def turn(messages: Sequence[BaseMessage]) -> AIMessage | str:
        since_human = messages[
            max(i for i, m in enumerate(messages) if isinstance(m, HumanMessage)) :
        ]
        done = sum(isinstance(m, ToolMessage) for m in since_human)
        return call("lookup", q="x") if done < 2 else "found x twice"

    model = ScriptedChatModel(script=[turn] * 10)
    agent = agent_for(model, counter, LoopPolicy(), InMemorySaver())
    config = {"configurable": {"thread_id": "tasks"}}
    agent.invoke({"messages": [("user", "look x up twice")]}, config, context=CTX)
    final = agent.invoke({"messages": [("user", "and again")]}, config, context=CTX)
    assert final["outcome"]["terminated_reason"] == "completed"
    assert counter.ran == ["lookup x"] * 4


def test_loop_none_disables_the_guard() -> None:
    counter = Counter()
    model = ScriptedChatModel(script=[call("lookup", q="x")] * 5 + ["done"])
    final = agent_for(model, counter, None).invoke({"messages": [("user", "go")]}, context=CTX)
    assert final["outcome"]["terminated_reason"] == "completed"
    assert counter.ran == ["lookup x"] * 5


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
async def test_on_loop_wrap_up_forces_one_tool_free_final_turn(mode: str) -> None:
    counter = Counter()

    def turn(messages: Sequence[BaseMessage]) -> AIMessage:
        last = messages[-1]
        if isinstance(last, HumanMessage) and last.text.startswith("(keel loop guard)"):
            return fixed(AIMessage(content="x is found; I stopped repeating myself."))
        return fixed(call("lookup", q="x"))

    model = RecordingModel(script=[turn] * 10)
    agent = agent_for(model, counter, LoopPolicy(on_loop="wrap_up"))
    payload = {"messages": [("user", "go")]}
    if mode == "invoke":
        final = agent.invoke(payload, context=CTX)
    else:
        final = await agent.ainvoke(payload, context=CTX)

    detail = f"{REPEAT}; answered without tools"
    assert final["outcome"] == {
        "status": "stopped",
        "terminated_reason": "loop_detected",
        "detail": detail,
    }
    assert counter.ran == ["lookup x", "lookup x"]
    # 3 turns with tools bound, then one extra call without tools, told why
    assert len(model.calls) == 4
    assert [("tools" in kw) for kw in model.kwargs] == [True, True, True, False]
    note = model.calls[-1][-1]
    assert isinstance(note, HumanMessage)
    assert note.text == (
        f"(keel loop guard) You are repeating tool calls: {REPEAT}. Do not call any more tools. "
        "Give your final answer now with what you have."
    )
    # the same conversation, plus the note, with its tool turns as text: Anthropic refuses
    # tool_use / tool_result blocks in a request that defines no tools (a 400)
    asked, before = model.calls[-1][:-1], model.calls[-2]
    assert len(asked) == len([m for m in before if not isinstance(m, ToolMessage)])
    assert not any(isinstance(m, ToolMessage) or getattr(m, "tool_calls", None) for m in asked)
    results = [m.text for m in before if isinstance(m, ToolMessage)]
    texts = [m.text for m in asked if isinstance(m, AIMessage)]
    assert len(results) == len(texts) == 2
    assert all(
        "'lookup'" in t and "'q': 'x'" in t and r in t for t, r in zip(texts, results, strict=True)
    )
    # the looping turn is dropped, the wrap-up answer kept; the note is not stored
    ais = [m for m in final["messages"] if isinstance(m, AIMessage)]
    assert [len(m.tool_calls) for m in ais] == [1, 1, 0]
    assert ais[2].text == "x is found; I stopped repeating myself."
    assert final["messages"][-1] is not None and final["messages"][-1].text == ais[2].text
    assert not any(
        isinstance(m, HumanMessage) and "keel loop guard" in m.text for m in final["messages"]
    )
    # the wrap-up answer is the last word: no stock partial answer after it
    assert not any(m.response_metadata.get("keel_partial") for m in ais)
    assert statuses(final["messages"]) == ["success", "success"]
    assert valid_history(final["messages"]) == final["messages"]
    # both calls of the looping turn are paid for
    assert final["usage"]["model_calls"] == 4
    assert final["usage"]["input_tokens"] == 400
    assert final["usage"]["output_tokens"] == 40


def test_a_broken_call_in_the_wrap_up_answer_is_not_saved_unanswered() -> None:
    """The wrap-up answer came with a call whose arguments did not parse: keel saved it as is,
    a call nothing answers. OpenAI refuses that thread (400): the replanner, which reads the
    history raw, failed on it, and the next turn read a made-up 'the run stopped' result.
    The answer is kept without the broken call (the model was told to call no tool)."""
    counter = Counter()
    broken = InvalidToolCall(type="invalid_tool_call", name="lookup", args="{", id="b", error=None)

    def turn(messages: Sequence[BaseMessage]) -> AIMessage:
        last = messages[-1]
        if isinstance(last, HumanMessage) and last.text.startswith("(keel loop guard)"):
            return AIMessage(content="x is found.", invalid_tool_calls=[broken])
        if isinstance(last, HumanMessage) and last.text == "thanks":
            return AIMessage(content="You are welcome.")
        return call("lookup", q="x")

    model = ScriptedChatModel(script=[turn] * 10)
    agent = agent_for(model, counter, LoopPolicy(on_loop="wrap_up"), InMemorySaver())
    config = {"configurable": {"thread_id": "t"}}
    final = agent.invoke({"messages": [("user", "go")]}, config, context=CTX)
    assert final["outcome"]["terminated_reason"] == "loop_detected"
    last = final["messages"][-1]
    assert isinstance(last, AIMessage)
    assert (last.text, last.invalid_tool_calls) == ("x is found.", [])
    assert malformed(final["messages"]) is None
    agent.invoke({"messages": [("user", "thanks")]}, config, context=CTX)
    assert not any(isinstance(m, ToolMessage) for m in model.calls[-1][-2:])  # no filler result


def test_the_wrap_up_turn_respects_the_model_call_budget() -> None:
    counter = Counter()

    def turn(messages: Sequence[BaseMessage]) -> AIMessage | str:
        last = messages[-1]
        if isinstance(last, HumanMessage) and last.text.startswith("(keel loop guard)"):
            return "wrapped up"
        return call("lookup", q="x")

    model = ScriptedChatModel(script=[turn] * 10)
    policy = Policy(
        rules=(Rule(action="allow"),),
        budget=Budget(model_calls=3),
        loop=LoopPolicy(on_loop="wrap_up"),
    )
    final = build_agent(model, counter.tools(), policy=policy).invoke(
        {"messages": [("user", "go")]}, context=CTX
    )
    assert len(model.calls) <= 3
    assert final["usage"]["model_calls"] <= 3
