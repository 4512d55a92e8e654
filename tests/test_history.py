"""`valid_history` repairs a history so every provider accepts it; `pending_tool_calls`."""

from __future__ import annotations

from langchain_core.messages import (
    AIMessage,
    AnyMessage,
    HumanMessage,
    SystemMessage,
    ToolCall,
    ToolMessage,
)

from keel.evals.scripted import needs_tools
from keel.history import MISSING_RESULT, pending_tool_calls, tool_turns_as_text
from keel.nodes import valid_history


def tc(call_id: str, name: str = "lookup", **args: object) -> ToolCall:
    return ToolCall(name=name, args=dict(args), id=call_id)


def result(call_id: str, content: str = "ok", name: str = "lookup") -> ToolMessage:
    return ToolMessage(content=content, tool_call_id=call_id, name=name)


def test_a_valid_history_is_returned_unchanged() -> None:
    messages: list[AnyMessage] = [
        SystemMessage(content="be brief"),
        HumanMessage(content="where is A1?"),
        AIMessage(content="", tool_calls=[tc("c1", order_id="A1"), tc("c2", order_id="A2")]),
        result("c1", "shipped"),
        result("c2", "pending"),
        AIMessage(content="A1 shipped, A2 is pending."),
        HumanMessage(content="thanks"),
    ]
    repaired = valid_history(messages)
    assert repaired == messages
    assert repaired is not messages, "a copy, so the caller's list is never mutated"


def test_an_empty_history_is_valid() -> None:
    assert valid_history([]) == []


def test_orphan_tool_result_is_dropped() -> None:
    messages: list[AnyMessage] = [
        HumanMessage(content="hi"),
        result("ghost", "from nowhere"),
        AIMessage(content="hello"),
    ]
    assert valid_history(messages) == [HumanMessage(content="hi"), AIMessage(content="hello")]


def test_missing_result_is_filled_in() -> None:
    ai = AIMessage(content="", tool_calls=[tc("c1"), tc("c2", name="other")])
    messages: list[AnyMessage] = [HumanMessage(content="hi"), ai, result("c1")]
    repaired = valid_history(messages)
    assert repaired[:3] == [HumanMessage(content="hi"), ai, result("c1")]
    filler = repaired[3]
    assert isinstance(filler, ToolMessage)
    assert filler.content == MISSING_RESULT
    assert filler.tool_call_id == "c2"
    assert filler.name == "other"
    assert filler.status == "error"
    assert len(repaired) == 4


def test_missing_result_text_tells_the_model_why() -> None:
    """A call left without a result may have started (a run stopped mid-call): the filler says
    so rather than that it never ran (a model told so may ask for a refund again)."""
    assert MISSING_RESULT == (
        "Error: this tool call has no result (the run stopped before the call finished; it may "
        "or may not have run)."
    )


def test_result_is_moved_right_after_its_call() -> None:
    ai = AIMessage(content="", tool_calls=[tc("c1")])
    messages: list[AnyMessage] = [
        HumanMessage(content="hi"),
        ai,
        HumanMessage(content="hurry up"),
        result("c1"),
    ]
    assert valid_history(messages) == [
        HumanMessage(content="hi"),
        ai,
        result("c1"),
        HumanMessage(content="hurry up"),
    ]


def test_results_are_put_in_call_order() -> None:
    ai = AIMessage(content="", tool_calls=[tc("c1"), tc("c2")])
    messages: list[AnyMessage] = [HumanMessage(content="hi"), ai, result("c2"), result("c1")]
    assert valid_history(messages) == [HumanMessage(content="hi"), ai, result("c1"), result("c2")]


def test_a_duplicate_result_is_dropped_keeping_the_first() -> None:
    ai = AIMessage(content="", tool_calls=[tc("c1")])
    messages: list[AnyMessage] = [
        HumanMessage(content="hi"),
        ai,
        result("c1", "first"),
        result("c1", "second"),
    ]
    assert valid_history(messages) == [HumanMessage(content="hi"), ai, result("c1", "first")]


def test_mid_conversation_system_messages_are_merged_first() -> None:
    messages: list[AnyMessage] = [
        SystemMessage(content="be brief"),
        HumanMessage(content="hi"),
        AIMessage(content="hello"),
        SystemMessage(content="answer in French"),
        HumanMessage(content="again"),
    ]
    repaired = valid_history(messages)
    assert repaired == [
        SystemMessage(content="be brief\n\nanswer in French"),
        HumanMessage(content="hi"),
        AIMessage(content="hello"),
        HumanMessage(content="again"),
    ]


def test_a_single_late_system_message_moves_first() -> None:
    messages: list[AnyMessage] = [HumanMessage(content="hi"), SystemMessage(content="be brief")]
    assert valid_history(messages) == [
        SystemMessage(content="be brief"),
        HumanMessage(content="hi"),
    ]


def test_empty_ai_message_gets_placeholder_text() -> None:
    empty = AIMessage(content="", id="ai-1")
    messages: list[AnyMessage] = [HumanMessage(content="hi"), empty, HumanMessage(content="?")]
    repaired = valid_history(messages)
    assert [m.content for m in repaired] == ["hi", "(no answer)", "?"]
    assert repaired[1].id == "ai-1"
    assert empty.content == "", "the caller's message is not mutated"


def test_repairs_do_not_mutate_the_input() -> None:
    ai = AIMessage(content="", tool_calls=[tc("c1")])
    messages: list[AnyMessage] = [
        HumanMessage(content="hi"),
        SystemMessage(content="late"),
        ai,
        result("orphan"),
    ]
    snapshot = [m.model_copy(deep=True) for m in messages]
    valid_history(messages)
    assert messages == snapshot


def test_every_repair_is_itself_valid() -> None:
    messages: list[AnyMessage] = [
        result("orphan"),
        HumanMessage(content="hi"),
        SystemMessage(content="late system"),
        AIMessage(content="", tool_calls=[tc("c1"), tc("c2")]),
        HumanMessage(content="interjection"),
        result("c2"),
        AIMessage(content=""),
        AIMessage(content="", tool_calls=[tc("c3")]),
    ]
    repaired = valid_history(messages)
    assert valid_history(repaired) == repaired
    assert [type(m).__name__ for m in repaired] == [
        "SystemMessage",
        "HumanMessage",
        "AIMessage",
        "ToolMessage",
        "ToolMessage",
        "HumanMessage",
        "AIMessage",
        "AIMessage",
        "ToolMessage",
    ]
    assert [m.content for m in repaired if isinstance(m, ToolMessage)] == [
        MISSING_RESULT,
        "ok",
        MISSING_RESULT,
    ]


# -- pending_tool_calls ----------------------------------------------------------------------


def test_pending_tool_calls_lists_unanswered_calls_of_the_last_ai_message() -> None:
    ai = AIMessage(content="", tool_calls=[tc("c1"), tc("c2"), tc("c3")])
    messages: list[AnyMessage] = [HumanMessage(content="hi"), ai, result("c2")]
    index, calls = pending_tool_calls(messages)
    assert index == 1
    assert [c["id"] for c in calls] == ["c1", "c3"]


def test_pending_tool_calls_looks_only_at_the_last_ai_message() -> None:
    messages: list[AnyMessage] = [
        HumanMessage(content="hi"),
        AIMessage(content="", tool_calls=[tc("old")]),
        AIMessage(content="done"),
    ]
    assert pending_tool_calls(messages) == (2, [])


def test_pending_tool_calls_all_answered() -> None:
    ai = AIMessage(content="", tool_calls=[tc("c1")])
    assert pending_tool_calls([HumanMessage(content="hi"), ai, result("c1")]) == (1, [])


def test_pending_tool_calls_without_ai_message() -> None:
    assert pending_tool_calls([HumanMessage(content="hi")]) == (-1, [])
    assert pending_tool_calls([]) == (-1, [])


def test_system_messages_with_content_blocks_are_merged_as_text() -> None:
    messages: list[AnyMessage] = [
        HumanMessage(content="hi"),
        SystemMessage(content=[{"type": "text", "text": "be brief"}]),
    ]
    merged = valid_history(messages)[0]
    assert isinstance(merged, SystemMessage)
    assert merged.text == "be brief"


def test_tool_turns_as_text_sends_no_tool_block_and_keeps_every_turn() -> None:
    # an Anthropic answer: text and a tool_use block in its content, one call that did not parse
    ai = AIMessage(
        content=[
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "c1", "name": "lookup", "input": {"q": "A1"}},
        ],
        tool_calls=[ToolCall(name="lookup", args={"q": "A1"}, id="c1")],
        invalid_tool_calls=[{"name": "refund", "args": "{", "id": "c0", "error": None}],
    )
    history = [
        SystemMessage(content="be brief"),
        HumanMessage(content="where is A1?"),
        ai,
        ToolMessage(content="Error: bad arguments", tool_call_id="c0", status="error"),
        ToolMessage(content="A1 shipped", tool_call_id="c1"),
        AIMessage(content="It shipped."),
    ]
    assert needs_tools(history) is not None
    sent = tool_turns_as_text(history)
    assert needs_tools(sent) is None and valid_history(sent) == sent
    assert [type(m) for m in sent] == [SystemMessage, HumanMessage, AIMessage, AIMessage]
    assert sent[2].id == ai.id and isinstance(sent[2].content, str)
    lines = sent[2].text.split("\n")
    assert lines[0] == "Let me look."
    assert "'refund'" in lines[1] and "Error: bad arguments" in lines[1]
    assert "'lookup'" in lines[2] and "'q': 'A1'" in lines[2] and "A1 shipped" in lines[2]
    assert sent[3] is history[5] and sent[:2] == history[:2]
    missing = tool_turns_as_text(history[:3])  # a call without a result says so
    assert MISSING_RESULT in missing[2].text
    assert history[2].tool_calls  # the stored messages are not changed
