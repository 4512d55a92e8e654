"""`respond`: end a run that was cut short with a partial answer and the reason.

It makes no model call (the run may have stopped because the budget is spent). It answers any
tool call still waiting for a result, so the thread stays valid and can be resumed, and writes
the final message from what the run has so far.
"""

from __future__ import annotations

from typing import Any

from langchain_core.messages import AIMessage, AnyMessage, ToolMessage

from keel import outcome
from keel._node import RunnableCallable, make_node
from keel.guards.content import OutputGuardPolicy
from keel.guards.screening import checked_answer
from keel.history import in_call_order, pending_tool_calls
from keel.state import AgentState, Outcome, task_start

__all__ = ["partial_answer", "respond"]

_EXCERPT = 300


def respond(
    *, output_guard: OutputGuardPolicy | None = None, name: str = "respond"
) -> RunnableCallable:
    """A node that closes a cut-short run: pending calls answered, a partial answer given.

    Args:
        output_guard: Checks the partial answer before it is saved (it quotes the model's
            last answer and the tools' results).
        name: The node's name.
    """

    def run(state: AgentState) -> dict[str, Any]:
        result = state.get("outcome")
        if result is None or result["status"] not in ("stopped", "error"):
            # routed here by the step limit (see keel.graphs.agent), not by a node's decision
            result = outcome.step_limit()
        messages = state.get("messages") or []
        _, calls = pending_tool_calls(messages)
        answers = [
            ToolMessage(
                content=f"Not run: the run stopped ({result['terminated_reason']}).",
                tool_call_id=c.get("id") or "",
                name=c["name"],
                status="error",
                response_metadata={"keel_status": "not_run"},
            )
            for c in calls
        ]
        closing: list[AnyMessage] = in_call_order(messages, answers)
        partial = AIMessage(
            content=partial_answer(messages, result), response_metadata={"keel_partial": True}
        )
        answer, result = checked_answer(partial, output_guard, result)
        return {"messages": [*closing, answer], "outcome": result}

    async def arun(state: AgentState) -> dict[str, Any]:
        return run(state)

    return make_node(name, run, arun)


def partial_answer(messages: list[AnyMessage], result: Outcome) -> str:
    """The text a cut-short run ends with: why it stopped and what it found so far.

    Only the current task's messages count: a thread's earlier tasks found and answered other
    things.
    """
    lines = [f"I had to stop before finishing ({result['terminated_reason']}): {result['detail']}."]
    messages = messages[max(task_start(messages), 0) :]
    last_text = next(
        (m.text for m in reversed(messages) if isinstance(m, AIMessage) and m.text), ""
    )
    found = [
        f"- {m.name}: {_excerpt(m.text)}"
        for m in messages
        if isinstance(m, ToolMessage) and m.status == "success"
    ]
    if last_text:
        lines.append(f"My last answer so far: {_excerpt(last_text)}")
    if found:
        lines.append("What I found so far:\n" + "\n".join(found[-5:]))
    return "\n".join(lines)


def _excerpt(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _EXCERPT else text[: _EXCERPT - 1] + "…"
