"""`ScriptedChatModel`: a deterministic chat model for tests, demos and benchmarks.

It answers from a script, one entry per agent turn. The turn is the number of `AIMessage`s
already in the conversation, so the model keeps no per-run state: one instance serves many
concurrent runs and resumed threads, and it answers the same way after a replay.

Like a provider, it refuses a malformed tool-call history (`malformed`) with a `ValueError`
unless `strict_history=False`: a test on it fails where OpenAI would answer 400. It also refuses,
as Anthropic does, a call without bound tools whose messages hold tool calls or results
(`needs_tools`).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ToolCall, ToolMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import Field, PrivateAttr

from keel.errors import ScriptExhausted
from keel.local_model import last_chunk
from keel.pricing import token_count

__all__ = [
    "ScriptExhausted",
    "ScriptedChatModel",
    "ScriptEntry",
    "call",
    "check_history",
    "malformed",
    "needs_tools",
    "say",
]

Responder = Callable[[Sequence[BaseMessage]], "AIMessage | str"]
ScriptEntry = AIMessage | str | Responder
"""One turn: a message, a final text, or a function of the conversation returning either."""


def say(text: str) -> AIMessage:
    """A scripted turn that answers with `text` (no tool calls)."""
    return AIMessage(content=text)


def call(name: str, args: Mapping[str, Any] | None = None, /, **more: Any) -> AIMessage:
    """A scripted turn that calls tool `name` with `args` (ids are assigned per turn)."""
    return AIMessage(
        content="", tool_calls=[ToolCall(name=name, args={**(args or {}), **more}, id=None)]
    )


class ScriptedChatModel(BaseChatModel):
    """A chat model that plays a script. Supports `bind_tools`, structured output and streaming.

    It refuses a history a provider refuses (see `strict_history`), by default.

    Example:
        ```python
        model = ScriptedChatModel(script=[call("lookup_order", order_id="A1"), "It shipped."])
        ```
    """

    script: list[Any] = Field(default_factory=list)
    """The turns, in order: `AIMessage`, `str`, or `f(messages) -> AIMessage | str`."""
    structured: dict[str, Any] = Field(default_factory=dict)
    """Answers for structured output, by schema name: a dict of fields or `f(messages) -> dict`."""
    latency: float = 0.0
    """Seconds each call takes (`asyncio.sleep` in async calls)."""
    fresh_ids: bool = True
    """Name every tool call with a new random id on every call, as real models do (a turn
    asked again after a crash or a retry gets different ids), replacing any id the script
    gave. On by default, so a test cannot lean on ids a real model would not repeat; `False`
    names calls `call_<turn>_<i>` (or keeps the script's id) for a test that needs stable ids."""
    model_name: str = "scripted"
    """The name the price table prices this model by."""
    bill_tool_schemas: bool = False
    """Count the bound tools' JSON schemas as input tokens, as providers bill them."""
    max_tokens: int | None = None
    """The most output tokens an answer may have, honoured as a provider does: a longer answer
    is cut to fit, reports at most this many output tokens and `finish_reason="length"`. A
    `max_tokens=` call argument (`model.bind(max_tokens=...)`) does the same."""
    ignores_max_tokens: bool = False
    """Play a provider that ignores the output cap: an answer is as long as the script says,
    `max_tokens` or not (for tests of what a period budget does with such a provider)."""
    report_usage: bool = True
    """Report each answer's `usage_metadata` (an estimate from its length when the script gave
    none). `False` plays a provider that reports no usage, as some OpenAI-compatible servers do
    when streaming."""
    strict_history: bool = True
    """Refuse a malformed history as OpenAI's API does (a 400): raise `ValueError` when an AI
    message's tool calls are not each answered by one `ToolMessage` before the next other
    message, or a `ToolMessage` answers no call (see `malformed`); and, as Anthropic's API
    does, when a call made without bound tools sends tool calls or results (see
    `needs_tools`). On by default, so a test fails where a provider would refuse what keel
    sends; `False` only for a test that gives the model a broken history on purpose."""
    keel_test_double: bool = True
    """Marks this model as allowed while real model requests are forbidden."""

    _calls: list[list[BaseMessage]] = PrivateAttr(default_factory=list)
    _answers: list[AIMessage] = PrivateAttr(default_factory=list)

    @property
    def calls(self) -> list[list[BaseMessage]]:
        """The messages of every call so far, in order."""
        return self._calls

    @property
    def answers(self) -> list[AIMessage]:
        """The answer of every call so far, in order (with the usage it reported)."""
        return self._answers

    @property
    def _llm_type(self) -> str:
        return "keel-scripted"

    def bind_tools(
        self,
        tools: Sequence[Any],
        *,
        tool_choice: str | dict[str, Any] | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools the way provider integrations do (OpenAI tool format)."""
        formatted = [convert_to_openai_tool(t) for t in tools]
        return self.bind(tools=formatted, tool_choice=tool_choice, **kwargs)

    # -- the one decision both drivers share ----------------------------------------------

    def _respond(self, messages: list[BaseMessage], **kwargs: Any) -> AIMessage:
        self._calls.append(list(messages))  # a refused call too: the test can read what was sent
        if self.strict_history:
            check_history(messages, tools=bool(kwargs.get("tools")))
        asked = () if self.ignores_max_tokens else (self.max_tokens, kwargs.get("max_tokens"))
        limits = [n for n in asked if n is not None]
        answer = _capped(self._answer(messages, **kwargs), min(limits) if limits else None)
        self._answers.append(answer)
        return answer

    def _answer(self, messages: list[BaseMessage], **kwargs: Any) -> AIMessage:
        structured = self._structured_answer(messages, kwargs)
        if structured is not None:
            return self._with_usage(structured, messages, kwargs)
        turn = sum(isinstance(m, AIMessage) for m in messages)
        if turn >= len(self.script):
            raise ScriptExhausted(
                f"ScriptedChatModel has {len(self.script)} turns but the conversation asks for "
                f"turn {turn + 1}. Add turns to `script` (or end it with a final text answer)."
            )
        entry = self.script[turn]
        if callable(entry) and not isinstance(entry, AIMessage):
            entry = entry(messages)
        message = AIMessage(content=entry) if isinstance(entry, str) else entry.model_copy()
        if message.tool_calls:
            message.tool_calls = [
                {**tc, "id": self._call_id(tc.get("id"), turn, i)}
                for i, tc in enumerate(message.tool_calls)
            ]
        return self._with_usage(message, messages, kwargs)

    def _call_id(self, given: str | None, turn: int, index: int) -> str:
        if self.fresh_ids:
            return f"call_{uuid.uuid4().hex[:24]}"
        return given or f"call_{turn}_{index}"

    def _structured_answer(
        self, messages: list[BaseMessage], kwargs: Mapping[str, Any]
    ) -> AIMessage | None:
        tools = kwargs.get("tools") or []
        if not kwargs.get("tool_choice") or len(tools) != 1:
            return None
        name = tools[0]["function"]["name"]
        if name not in self.structured:
            raise ScriptExhausted(
                f"ScriptedChatModel was asked for structured output {name!r} but `structured` "
                f"has only {sorted(self.structured)}. Add structured={{{name!r}: {{...}}}}."
            )
        answer = self.structured[name]
        args = answer(messages) if callable(answer) else answer
        turn = len(self._calls)
        return AIMessage(
            content="", tool_calls=[ToolCall(name=name, args=dict(args), id=f"structured_{turn}")]
        )

    def _with_usage(
        self, message: AIMessage, messages: list[BaseMessage], kwargs: Mapping[str, Any]
    ) -> AIMessage:
        if message.usage_metadata is None and self.report_usage:
            tokens_in = sum(len(str(m.content)) for m in messages) // 4 + 3 * len(messages)
            if self.bill_tool_schemas and kwargs.get("tools"):
                tokens_in += len(_json(kwargs["tools"])) // 4
            tokens_out = len(str(message.content)) // 4 + 20 * len(message.tool_calls) + 1
            message.usage_metadata = UsageMetadata(
                input_tokens=tokens_in,
                output_tokens=tokens_out,
                total_tokens=tokens_in + tokens_out,
            )
        message.response_metadata = {**message.response_metadata, "model_name": self.model_name}
        return message

    # -- drivers ---------------------------------------------------------------------------

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.latency:
            time.sleep(self.latency)
        return ChatResult(generations=[ChatGeneration(message=self._respond(messages, **kwargs))])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.latency:
            await asyncio.sleep(self.latency)
        return ChatResult(generations=[ChatGeneration(message=self._respond(messages, **kwargs))])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        if self.latency:
            time.sleep(self.latency)
        message = self._respond(messages, **kwargs)
        words = str(message.content).split(" ") if message.content else []
        for i, word in enumerate(words):
            text = word if i == 0 else " " + word
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=text, id=message.id))
            if run_manager:
                run_manager.on_llm_new_token(text, chunk=chunk)
            yield chunk
        yield ChatGenerationChunk(message=last_chunk(message, "", id=message.id))


def check_history(messages: Sequence[BaseMessage], *, tools: bool = True) -> None:
    """Raise `ValueError` where a provider answers 400.

    That is when `malformed(messages)` says why, or, for a call without bound tools
    (`tools=False`), `needs_tools(messages)` does.
    """
    problem = malformed(messages) or (None if tools else needs_tools(messages))
    if problem is not None:
        raise ValueError(f"Invalid messages (as a provider's 400 says): {problem}")


def malformed(messages: Sequence[BaseMessage]) -> str | None:
    """Why a chat provider would refuse `messages` as tool-call history, or `None`.

    OpenAI's rule: an assistant message with tool calls is followed by one tool message for
    each call (in any order) before any other message, and a tool message answers a call of
    the assistant message just before it. A call whose arguments did not parse
    (`invalid_tool_calls`) is a call too: LangChain sends it to OpenAI among `tool_calls`.
    """
    expected: list[str] = []
    for m in messages:
        if isinstance(m, ToolMessage):
            if m.tool_call_id not in expected:
                return (
                    f"a tool message answers tool_call_id {m.tool_call_id!r}, which the "
                    "assistant message before it does not ask for (or which has its answer)"
                )
            expected.remove(m.tool_call_id)
            continue
        if expected:
            break
        if isinstance(m, AIMessage):
            expected = [str(c.get("id")) for c in [*m.tool_calls, *m.invalid_tool_calls]]
    if expected:
        return (
            "an assistant message with 'tool_calls' must be followed by tool messages responding "
            f"to each 'tool_call_id'; these have none: {', '.join(expected)}"
        )
    return None


def needs_tools(messages: Sequence[BaseMessage]) -> str | None:
    """Why Anthropic would refuse `messages` sent without tools, or `None`.

    Anthropic's rule: a request whose messages hold `tool_use` or `tool_result` blocks (an AI
    message with tool calls, parsed or not, or a tool message) must define tools; a call
    made without `bind_tools` (a wrap-up answer, a summary) sends such turns as text instead.
    """
    for i, m in enumerate(messages):
        if isinstance(m, ToolMessage) or (
            isinstance(m, AIMessage) and (m.tool_calls or m.invalid_tool_calls)
        ):
            kind = "tool_result" if isinstance(m, ToolMessage) else "tool_use"
            return (
                f"requests which include `tool_use` or `tool_result` blocks must define tools; "
                f"message {i} is a {kind} and the call binds no tools"
            )
    return None


def _capped(message: AIMessage, limit: int | None) -> AIMessage:
    """`message` cut to `limit` output tokens (about 4 characters a token), as a provider does."""
    meta = message.usage_metadata
    output = token_count(meta.get("output_tokens")) if isinstance(meta, Mapping) else None
    if limit is None or meta is None or output is None or output <= limit:
        return message  # a count that is not one (a provider's odd usage) is passed on as is
    if isinstance(message.content, str):
        message.content = message.content[: max(0, limit - 1) * 4]
    tokens_in = meta.get("input_tokens")  # kept as the script gave it, odd or not
    total = tokens_in + limit if isinstance(tokens_in, int) else limit
    message.usage_metadata = UsageMetadata(
        input_tokens=tokens_in, output_tokens=limit, total_tokens=total
    )
    message.response_metadata = {**message.response_metadata, "finish_reason": "length"}
    return message


def _json(value: Any) -> str:
    return json.dumps(value)
