"""Identical side-effecting calls in one model turn run once and share the primary's result.

Real models stutter: one AI message may hold the same call several times, differing only by
their fresh tool-call ids. keel's ledger keys a call by its id, so each copy would be a new side
effect (two refunds), and an `ask` rule would ask a human twice for the same thing.

The rule: among the calls of ONE AI message, a call to a side-effecting tool
(`ToolSpec.side_effects`) with the same tool name and the same canonical arguments
(`keel.approvals.call_digest`: sorted-key JSON and the tool's version, of the arguments as the
tool's schema reads them, `keel.tools._args.as_called`) as an earlier call of
that message is a *duplicate* of the first such call, its *primary*. A duplicate is never
gated, asked about, claimed in the ledger or run: once its primary has an answer (a result, a
denial, a rejection, a human's reply, a recorded result after a resume), it is answered with
that answer's content and `keel_status`, marked `response_metadata[DUPLICATE_KEY] = primary
id`. Until then it waits with its primary (a call whose outcome is unknown, a review).

Read-only tools are left alone: a read may be asked twice on purpose (a fresh quote, a die
roll), running it twice is harmless, and the tool-call budget bounds its cost.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from langchain_core.messages import AnyMessage, ToolCall, ToolMessage

from keel.approvals import call_digest
from keel.tools._args import as_called
from keel.tools.spec import RegisteredTool

__all__ = ["DUPLICATE_KEY", "answer_duplicates", "duplicate_answer", "duplicates"]

DUPLICATE_KEY = "keel_duplicate_of"
"""`response_metadata` key of a duplicate's `ToolMessage`: the id of the call it repeats."""


def duplicates(
    calls: Sequence[ToolCall], tools: Callable[[str], RegisteredTool | None]
) -> dict[str, ToolCall]:
    """`{duplicate's id: its primary}` among `calls`, the tool calls of one AI message.

    `tools`: a tool by name (`ToolRegistry.get`). Only side-effecting tools with arguments that
    are an object count; a call without an id, or with its primary's id, is left as it is.
    """
    if len(calls) < 2:  # a lone call repeats none: no digest to take
        return {}
    first: dict[tuple[str, str], ToolCall] = {}
    out: dict[str, ToolCall] = {}
    for call in calls:
        entry = tools(call["name"])
        args, call_id = call.get("args"), call.get("id")
        if entry is None or not entry.spec.side_effects or not isinstance(args, dict):
            continue
        primary = first.setdefault(
            (entry.name, call_digest(entry.name, as_called(entry, args), entry.spec.version)), call
        )
        if call_id and primary is not call and primary.get("id") != call_id:
            out[call_id] = primary
    return out


def duplicate_answer(call: ToolCall, answer: ToolMessage) -> ToolMessage:
    """The answer to the duplicate `call`: its primary's `answer`, status and content.

    The content follows a note that says the call did not run again.
    """
    status = answer.response_metadata.get("keel_status", answer.status)
    # said to the model, so that one refund read twice is not reported as two
    note = (
        f"(This call repeats call {answer.tool_call_id} of the same turn: it did not run "
        "again. That call's result:) "
    )
    content: Any = (
        note + answer.content
        if isinstance(answer.content, str)
        else [{"type": "text", "text": note}, *answer.content]
    )
    return ToolMessage(
        content=content,
        artifact=answer.artifact,
        tool_call_id=call.get("id") or "",
        name=call["name"],
        status=answer.status,
        response_metadata={"keel_status": status, DUPLICATE_KEY: answer.tool_call_id},
    )


def answer_duplicates(
    calls: Sequence[ToolCall],
    dupes: Mapping[str, ToolCall],
    answers: Iterable[AnyMessage],
) -> list[ToolMessage]:
    """The answers of the duplicates among `calls` whose primary is answered in `answers`.

    `answers`: the primaries' answers (this step's and those already in the thread). A
    duplicate whose primary has no answer yet gets none (it waits with its primary).
    """
    by_id = {m.tool_call_id: m for m in answers if isinstance(m, ToolMessage)}
    out = []
    for call in calls:
        primary = dupes.get(call.get("id") or "")
        answer = by_id.get(primary.get("id") or "") if primary is not None else None
        if answer is not None:
            out.append(duplicate_answer(call, answer))
    return out
