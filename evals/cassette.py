"""Cassettes: a stored run's model answers and tool results, played back instead of the real ones.

`Cassette.from_thread(thread)` records, from a thread's checkpoints and its ledger records:
- every model answer (`AIMessage`, with its tool calls and usage), in order;
- every tool result that came from running a tool (`success`, `error`, `timeout`), with the
  call's name and arguments (a ledger record fills in a call whose result the history lacks);
- every human decision on an approval (a `rejected` call was rejected, others approved).

`cassette.model()` is a scripted model answering turn *k* (the number of AI messages already in
the conversation) with recorded answer *k*, so a replay from any checkpoint picks up where the
thread was. `cassette.tools()` is a tool stub (`keel.tools.stubbing`) that answers a call from
the first unused recorded result with the same name and arguments (by position, name and
arguments, never by tool-call id: a real model names its calls anew each time). A call the
cassette lacks runs for real only if its tool is declared read-only (`RegisteredTool.read_only`:
keel's `tool(...)` with `risk="read"`; a plain function or a LangChain tool is not, whatever it
does); any other is answered as not run, and listed in `stub.unrecorded`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ToolCall,
    ToolMessage,
    messages_from_dict,
    messages_to_dict,
)

from keel.errors import ScriptExhausted, UserError
from keel.evals.scripted import ScriptedChatModel
from keel.evals.stored import StoredThread
from keel.tools.registry import RegisteredTool
from keel.tools.stubs import StubAnswer

__all__ = [
    "Cassette",
    "CassetteModel",
    "CassetteTools",
    "RecordedCall",
    "canonical",
    "is_model_answer",
]

_RAN = ("success", "error", "timeout")
"""keel statuses of a tool call whose body ran (others were refused before running)."""


def is_model_answer(message: BaseMessage) -> TypeGuard[AIMessage]:
    """Whether `message` came from the model (not keel's `respond`, which ends a run early)."""
    return isinstance(message, AIMessage) and not message.response_metadata.get("keel_partial")


def canonical(args: Mapping[str, Any]) -> str:
    """Arguments as canonical JSON (sorted keys), the form calls are matched by."""
    return json.dumps(args, sort_keys=True, default=str)


@dataclass(frozen=True, slots=True)
class RecordedCall:
    """One tool call of the recorded run and its result."""

    name: str
    """The tool's name."""
    args: Mapping[str, Any]
    """The call's arguments."""
    content: str
    """The result the model saw."""
    status: str
    """keel's status (`success`, `error`, `timeout`, `rejected`, ...)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Cassette:
    """A run's recorded model answers and tool results."""

    answers: tuple[AIMessage, ...]
    """Every model answer of the thread, in order."""
    calls: tuple[RecordedCall, ...] = ()
    """Every tool call that ran (or was refused), in order, with its result."""
    model_name: str = "cassette"
    """The recorded model's name (prices the replayed answers as the recorded ones)."""
    plan: tuple[str, ...] = ()
    """The recorded plan's steps (the answer to a planner's structured `Plan` request)."""

    @classmethod
    def from_messages(
        cls, messages: Sequence[BaseMessage], ledger: Mapping[str, Any] | None = None
    ) -> Cassette:
        """Record a conversation; `ledger` maps tool-call ids to `CallRecord`s (optional)."""
        results = {m.tool_call_id: m for m in messages if isinstance(m, ToolMessage)}
        answers = tuple(m for m in messages if is_model_answer(m))
        calls = []
        for answer in answers:
            for tc in answer.tool_calls:
                recorded = _result(
                    tc, results.get(tc["id"] or ""), (ledger or {}).get(tc["id"] or "")
                )
                if recorded is not None:
                    calls.append(recorded)
        names = [str(a.response_metadata.get("model_name") or "") for a in answers]
        return cls(
            answers=answers,
            calls=tuple(calls),
            model_name=next((n for n in names if n), "cassette"),
        )

    @classmethod
    def from_thread(cls, thread: StoredThread) -> Cassette:
        """Record a stored thread (its final history, plan and its ledger's call records)."""
        cassette = cls.from_messages(thread.messages, thread.calls)
        steps = [
            s.get("description") for s in thread.values.get("plan") or () if isinstance(s, dict)
        ]
        return dataclasses.replace(cassette, plan=tuple(str(s) for s in steps if s))

    def to_json(self) -> str:
        """The cassette as JSON (LangChain's message dicts), to keep beside a test."""
        return json.dumps(
            {
                "answers": messages_to_dict(list(self.answers)),
                "calls": [dataclasses.asdict(c) for c in self.calls],
                "model_name": self.model_name,
                "plan": list(self.plan),
            },
            indent=2,
            default=str,
        )

    @classmethod
    def from_json(cls, text: str) -> Cassette:
        """A cassette saved with `to_json`.

        Raises:
            UserError: the text is not a saved cassette.
        """
        try:
            data = json.loads(text)
            answers = messages_from_dict(data["answers"])
            calls = tuple(RecordedCall(**c) for c in data.get("calls", ()))
        except (ValueError, KeyError, TypeError, RecursionError) as exc:  # too deep: recursion
            raise UserError(f"Not a saved cassette (Cassette.to_json): {exc}") from exc
        if not all(isinstance(a, AIMessage) for a in answers):
            raise UserError("Not a saved cassette: its answers must all be AI messages.")
        return cls(
            answers=tuple(a for a in answers if isinstance(a, AIMessage)),
            calls=calls,
            model_name=str(data.get("model_name") or "cassette"),
            plan=tuple(str(s) for s in data.get("plan") or ()),
        )

    def model(self) -> CassetteModel:
        """A fresh model that plays the recorded answers (turn k answers with answer k)."""
        structured = {"Plan": {"steps": list(self.plan)}} if self.plan else {}
        return CassetteModel(
            script=list(self.answers), structured=structured, model_name=self.model_name
        )

    def tools(self, *, canned: str | None = None) -> CassetteTools:
        """A fresh tool stub answering calls from the recorded results.

        Args:
            canned: The answer for a call the cassette lacks to a tool that is not declared
                read-only (default: an error saying it was not run).
        """
        return CassetteTools(list(self.calls), canned=canned)

    def decision(self, call: Mapping[str, Any]) -> str:
        """How a human answered the approval of a call like `call`: `approve` or `reject`."""
        for recorded in self.calls:
            if recorded.name == call.get("name") and canonical(recorded.args) == canonical(
                call.get("args") or {}
            ):
                return "reject" if recorded.status == "rejected" else "approve"
        return "approve"


def _result(call: ToolCall, message: ToolMessage | None, record: Any) -> RecordedCall | None:
    if message is not None:
        status = str(message.response_metadata.get("keel_status") or message.status)
        content = (
            message.content if isinstance(message.content, str) else json.dumps(message.content)
        )
        return RecordedCall(call["name"], dict(call["args"]), content, status)
    result = getattr(record, "result", None)
    if isinstance(result, Mapping):
        status = str(result.get("keel_status") or "success")
        return RecordedCall(call["name"], dict(call["args"]), str(result.get("content")), status)
    return None


class CassetteModel(ScriptedChatModel):
    """A scripted model over a cassette's answers; running out is `ScriptExhausted`, flagged."""

    model_name: str = "cassette"
    exhausted: bool = False
    """Whether the replayed graph asked for more answers than the cassette holds."""

    def _answer(self, messages: list[BaseMessage], **kwargs: Any) -> AIMessage:
        try:  # turn k is the k-th model answer: keel's own partial answers do not count
            return super()._answer([m for m in messages if not _partial(m)], **kwargs)
        except ScriptExhausted as exc:
            if kwargs.get("tool_choice"):  # a structured-output request the thread never made
                raise
            self.exhausted = True
            raise ScriptExhausted(
                f"The cassette ran out: it recorded {len(self.script)} model answers and the "
                "replayed graph asked for another. Replay live (`live=True` / `--live`) to let "
                "a model answer it."
            ) from exc


def _partial(message: BaseMessage) -> bool:
    return isinstance(message, AIMessage) and not is_model_answer(message)


@dataclass(slots=True)
class CassetteTools:
    """A tool stub (`keel.tools.stubbing`) answering calls from recorded results."""

    recorded: list[RecordedCall]
    """Recorded results not yet used, in order."""
    canned: str | None = None
    """The answer for a call the cassette lacks to a tool that is not declared read-only
    (default: a not-run error)."""
    answered: list[RecordedCall] = field(default_factory=list)
    """Calls answered from the cassette or canned (their tools never ran)."""
    unrecorded: list[RecordedCall] = field(default_factory=list)
    """Calls the cassette lacked to tools not declared read-only (answered, never run)."""

    def __call__(self, tool: RegisteredTool, call: ToolCall) -> StubAnswer | None:
        """The recorded answer, a canned one for an unrecorded call, or `None` (run it).

        Only a tool declared read-only (`RegisteredTool.read_only`) runs without a recording.
        """
        key = canonical(call["args"])
        for i, recorded in enumerate(self.recorded):
            if recorded.name == call["name"] and canonical(recorded.args) == key:
                if recorded.status not in _RAN:
                    continue  # refused when recorded: nothing to play back
                del self.recorded[i]
                self.answered.append(recorded)
                return StubAnswer(recorded.content, recorded.status)
        if tool.read_only:
            return None
        if self.canned is not None:
            answer = StubAnswer(self.canned)
        else:
            answer = StubAnswer(f"Not run: {_not_run(tool)} and this replay has no recorded "
                                "result for these arguments.", "error")  # fmt: skip
        stubbed = RecordedCall(call["name"], dict(call["args"]), answer.content, answer.status)
        self.unrecorded.append(stubbed)
        self.answered.append(stubbed)
        return answer


def _not_run(tool: RegisteredTool) -> str:
    """Why a replay does not run `tool` without a recording."""
    if tool.declared:
        return f"{tool.name} is not read-only (risk {tool.spec.risk!r})"
    return (
        f"{tool.name} is not declared read-only (declare it with keel's @tool(risk='read') to "
        "let a replay run it)"
    )
