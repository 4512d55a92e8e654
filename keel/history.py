"""Keep the message history valid for every provider before each model call.

OpenAI and Anthropic reject a history where a tool call has no result, a result has no call,
a result is not right after its call, or system messages sit mid-conversation. `valid_history`
returns a repaired copy; the checkpointed state is never rewritten.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.messages import (
    AIMessage,
    AnyMessage,
    BaseMessage,
    RemoveMessage,
    SystemMessage,
    ToolCall,
    ToolMessage,
)

from keel import outcome
from keel.errors import ModelBehaviorError
from keel.state import Outcome, starts_task

__all__ = [
    "MALFORMED_TURNS",
    "MISSING_RESULT",
    "earlier_turns",
    "in_call_order",
    "invalid_call_answers",
    "malformed_stop",
    "pending_tool_calls",
    "tool_turns_as_text",
    "valid_history",
]

MISSING_RESULT = (
    "Error: this tool call has no result (the run stopped before the call finished; it may or "
    "may not have run)."
)


def tool_turns_as_text(messages: Sequence[BaseMessage]) -> list[BaseMessage]:
    """`messages` for a call that binds no tools: tool calls and their results as text.

    Anthropic refuses a request whose messages hold tool calls or results unless it defines
    tools (a 400), so a tool-less call (the loop guard's wrap-up answer) sends each AI message
    with calls as its text plus one line per call and its result, and no tool messages. Give
    it a `valid_history`: a result is read from the tool messages after its call.
    """
    results = {m.tool_call_id: m for m in messages if isinstance(m, ToolMessage)}
    out: list[BaseMessage] = []
    for m in messages:
        if isinstance(m, ToolMessage):
            continue
        if isinstance(m, AIMessage) and (m.tool_calls or m.invalid_tool_calls):
            lines: list[str] = [str(m.text)] if m.text else []
            for call in [*m.invalid_tool_calls, *m.tool_calls]:
                found = results.get(call.get("id") or "")
                result = found.text if found is not None else MISSING_RESULT
                args = call.get("args")
                lines.append(f"(called tool {call.get('name')!r} with {args}; result: {result})")
            m = AIMessage(content="\n".join(lines), id=m.id, name=m.name)
        out.append(m)
    return out


def valid_history(messages: Sequence[AnyMessage]) -> list[BaseMessage]:
    """A copy of `messages` that every provider accepts.

    - system messages are merged into one, first;
    - every tool call (including one whose arguments did not parse) is followed by exactly one
      result, in call order (a missing result is filled in with `MISSING_RESULT`, a duplicate
      dropped);
    - results without a matching call are dropped;
    - an AI message with neither text nor tool calls gets placeholder text.
    """
    if _is_valid(messages):
        return list(messages)
    systems = [m for m in messages if isinstance(m, SystemMessage)]
    results: dict[str, ToolMessage] = {}
    for m in messages:
        if isinstance(m, ToolMessage):
            results.setdefault(m.tool_call_id, m)
    out: list[BaseMessage] = []
    if systems:
        out.append(SystemMessage(content="\n\n".join(s.text for s in systems)))
    for m in messages:
        if isinstance(m, SystemMessage | ToolMessage):
            continue
        if isinstance(m, AIMessage):
            if not m.tool_calls and not m.invalid_tool_calls and not m.content:
                m = m.model_copy(update={"content": "(no answer)"})
            out.append(m)
            for call_id, name in _calls(m):
                found = results.pop(call_id, None)
                out.append(
                    found
                    or ToolMessage(
                        content=MISSING_RESULT, tool_call_id=call_id, name=name, status="error"
                    )
                )
            continue
        out.append(m)
    return out


def _is_valid(messages: Sequence[AnyMessage]) -> bool:
    """Fast path: one pass, no copies, for the common already-valid history."""
    expected: list[str] = []
    for i, m in enumerate(messages):
        if isinstance(m, ToolMessage):
            if not expected or m.tool_call_id != expected[0]:
                return False
            expected.pop(0)
            continue
        if expected:
            return False
        if isinstance(m, SystemMessage):
            if i != 0:
                return False
        elif isinstance(m, AIMessage):
            if not m.tool_calls and not m.invalid_tool_calls and not m.content:
                return False
            expected = [call_id for call_id, _ in _calls(m)]
    return not expected


def _calls(message: AIMessage) -> list[tuple[str, str]]:
    """`(id, name)` of every call a provider sees: unparsable ones first, then valid ones."""
    invalid = [(c.get("id") or "", c.get("name") or "") for c in message.invalid_tool_calls]
    return [*invalid, *((c.get("id") or "", c["name"]) for c in message.tool_calls)]


def earlier_turns(messages: Sequence[BaseMessage], most: int = 6) -> list[BaseMessage]:
    """The conversation before the current task, as text turns (the last `most`).

    Its users' tasks and the assistant's final answers, without tool turns, starting with a
    user's task. What a model asked about the current task (the planner, `verify`'s judge)
    needs to read a follow-up ("and order B2?") without the earlier tasks' tool calls. An
    answer with a call whose arguments did not parse is a tool turn too: providers see the
    call, and its result is left out.
    """
    turns: list[BaseMessage] = [
        m
        for m in messages
        if starts_task(m) or (isinstance(m, AIMessage) and not _calls(m) and m.text)
    ][-most:]
    while turns and not starts_task(turns[0]):
        turns.pop(0)
    return turns


def pending_tool_calls(messages: Sequence[AnyMessage]) -> tuple[int, list[ToolCall]]:
    """The last AI message's index and its tool calls that have no result yet."""
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if isinstance(m, AIMessage):
            answered = {t.tool_call_id for t in messages[i + 1 :] if isinstance(t, ToolMessage)}
            return i, [tc for tc in m.tool_calls if tc.get("id") not in answered]
    return -1, []


def in_call_order(messages: Sequence[AnyMessage], results: Sequence[BaseMessage]) -> list[Any]:
    """The update that adds `results` to the last AI message's answers, all in call order.

    A node that answers some calls of a batch (`human_review` a rejected one) writes before the
    node that answers the rest (`execute_tools`, `respond`); appended as they are, the stored
    results would not follow the AI message's `tool_calls`. When they would not, the stored
    answers are removed and written again (under new ids, as LangGraph's `add_messages` keeps
    a re-sent id in its old place) together with `results`, in the model's call order.
    """
    index = next(
        (i for i in range(len(messages) - 1, -1, -1) if isinstance(messages[i], AIMessage)), -1
    )
    stored = [m for m in messages[index + 1 :] if isinstance(m, ToolMessage)]
    if index < 0 or not stored or not results:
        return list(results)
    ai = messages[index]
    assert isinstance(ai, AIMessage)
    order = {call_id: n for n, (call_id, _) in enumerate(_calls(ai))}
    answers: list[BaseMessage] = [*stored, *results]
    ranked = sorted(
        answers,
        key=lambda m: (
            order.get(m.tool_call_id, len(order)) if isinstance(m, ToolMessage) else len(order)
        ),
    )
    in_order = all(a is b for a, b in zip(ranked, answers, strict=True))
    if in_order or len(stored) + index + 1 != len(messages) or not all(m.id for m in stored):
        return list(results)  # already in order, or not only stored results after the AI
    removed = [RemoveMessage(id=m.id) for m in stored if m.id]
    fresh = {id(m) for m in stored}
    return [
        *removed,
        *(m.model_copy(update={"id": None}) if id(m) in fresh else m for m in ranked),
    ]


MALFORMED_TURNS = 3
"""Turns in a row of only malformed tool calls after which the model is misbehaving."""


def invalid_call_answers(answer: AIMessage) -> list[ToolMessage]:
    """An `invalid_args` answer to each of `answer`'s malformed tool calls (`invalid_tool_calls`).

    Providers count these as tool calls: each is answered, and the model may try again.
    """
    return [
        ToolMessage(
            content=f"Error: the arguments for {call.get('name') or 'this tool'} were not valid "
            f"JSON ({call.get('error') or 'could not parse'}). Call the tool again with a JSON "
            "object of arguments.",
            tool_call_id=call.get("id") or "",
            name=call.get("name") or "",
            status="error",
            response_metadata={"keel_status": "invalid_args"},
        )
        for call in answer.invalid_tool_calls
    ]


def malformed_stop(history: Sequence[BaseMessage], model: str) -> Outcome | None:
    """The run's end when an answer of only malformed tool calls makes `MALFORMED_TURNS` in a row.

    `history` is the thread before that answer. A model that keeps sending arguments that are
    not JSON would otherwise go round until the step limit; the run ends as `error` with a
    `ModelBehaviorError` (error category `model:ModelBehaviorError`). The same rule for
    `build_agent` and for keel's middleware under `create_agent`.
    """
    turns = 1
    for message in reversed(history):
        if isinstance(message, ToolMessage):
            continue
        if not isinstance(message, AIMessage) or message.tool_calls:
            break
        if not message.invalid_tool_calls:
            break
        turns += 1
    if turns < MALFORMED_TURNS:
        return None
    error = ModelBehaviorError(
        model, f"sent only malformed tool calls (arguments not valid JSON) {turns} turns in a row"
    )
    return outcome.failed(
        f"model call failed after {turns} attempt(s): ModelBehaviorError: {error}"
    )
