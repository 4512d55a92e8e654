"""A tool that returns a LangGraph `Command`: what keel's `execute_tools` applies of it.

LangGraph's `ToolNode` applies a tool's `Command(update=..., goto=..., graph=...)` as the
node's own. keel applies only the part that cannot write what keel decides: the tool's
`ToolMessage` answering its own call, as `Command(update={"messages": [ToolMessage(...,
tool_call_id=...)]})`. Anything else is refused, and the call is answered with an error that
says what and why (the tool already ran; its own message, if any, is quoted):

- a state key other than `messages` (`outcome`, `usage`, `approvals`, `plan`, ...: keel's
  record of the run, which no caller, model or tool writes; see `keel.state.AgentInput`);
- a message other than the call's `ToolMessage` (a user or AI turn, a `RemoveMessage`): it
  would bypass the input guard, start a task or rewrite the thread's history;
- `goto`, `graph=Command.PARENT`, `resume`: keel routes its own graph.
"""

from __future__ import annotations

from typing import Any

from langchain_core.messages import ToolCall, ToolMessage, convert_to_messages
from langgraph.types import Command

__all__ = ["command_answer", "is_command"]


def is_command(result: Any) -> bool:
    """Whether a tool returned a `Command` (or a list holding one)."""
    return isinstance(result, Command) or (
        isinstance(result, list) and any(isinstance(r, Command) for r in result)
    )


def command_answer(call: ToolCall, result: Any) -> ToolMessage | str:
    """The call's `ToolMessage` from the tool's `Command`, or why keel refuses it."""
    if not isinstance(result, Command):
        return (
            "a list holding a Command (keel applies one Command that answers the call); keel's "
            "agent does not apply it (the tool ran)."
        )
    own, reason = _own_message(call, result)
    if reason is None:
        assert own is not None
        own.name = call["name"]
        return own
    quoted = f" Its message was: {own.content}" if own is not None and own.content else ""
    return f"{reason}; keel's agent does not apply it (the tool ran).{quoted}"


def _own_message(call: ToolCall, command: Command[Any]) -> tuple[ToolMessage | None, str | None]:
    """The `ToolMessage` answering `call` in the Command, and why keel refuses it (or None)."""
    if command.graph is not None:
        return None, "a Command to the parent graph (graph=Command.PARENT)"
    if command.goto:
        return None, f"a Command with goto={command.goto!r} (keel routes its own graph)"
    if command.resume is not None:
        return None, "a Command with resume (only a human's answer resumes a run)"
    try:
        updates = command._update_as_tuples()
        messages = [m for key, value in updates if key == "messages" for m in _as_list(value)]
        messages = list(convert_to_messages(messages))
    except (TypeError, ValueError, NotImplementedError) as exc:
        return None, f"a Command whose update keel cannot read ({exc})"
    call_id = call.get("id") or ""
    own = [m for m in messages if isinstance(m, ToolMessage) and m.tool_call_id == call_id]
    found = own[0] if len(own) == 1 else None
    others = sorted({k for k, _ in updates} - {"messages"})
    if others:
        names = ", ".join(repr(k) for k in others)
        return found, (
            f"a Command that writes {names}: only keel writes the agent's state; a tool may add "
            "its own ToolMessage"
        )
    if found is None or len(messages) != 1:
        return found, (
            "a Command whose update is not exactly the call's own ToolMessage "
            f'(Command(update={{"messages": [ToolMessage(..., tool_call_id={call_id!r})]}})): '
            "other messages would bypass the input guard or rewrite the thread's history"
        )
    return found, None


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]
