"""`ChaosChatModel`: wrap a chat model and inject the failures production sees, with a seed.

Faults, one at most per call, drawn at the rates of a `ChaosPolicy`:

- `timeout`: raises `TimeoutError` (after sleeping `ChaosPolicy.timeout_after` seconds);
- `rate_limit`: raises `ChaosRateLimitError` (HTTP 429 with a `Retry-After` header);
- `server_error`: raises `ChaosServerError` (HTTP 500 or 503);
- `malformed_tool_call`: answers with a tool call whose arguments are not valid JSON, in
  `AIMessage.invalid_tool_calls`, the way LangChain reports a provider's broken JSON;
- `unknown_tool`: calls a tool that does not exist;
- `repeated_call`: repeats the previous turn's tool calls, same names and arguments (a loop).

Before any draw, a history a provider refuses is refused with a `ValueError`, as a 400
(`keel.evals.scripted.check_history`; off with `strict_history=False`): a fault that answers
without the wrapped model does not hide it.

Faults are drawn from one seeded generator in call order: the same seed and the same sequence
of calls inject the same faults. One instance is safe to share between threads and concurrent
runs (draws are locked), but which run gets which fault then depends on scheduling; give each
run its own instance (and seed) to make every run reproducible.
"""

from __future__ import annotations

import json
import random
import threading
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    InvalidToolCall,
    ToolCall,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableBinding
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import PrivateAttr, SkipValidation

from keel._drive import Op, Steps, adrive, drive, sleep
from keel.errors import UserError
from keel.evals.scripted import check_history
from keel.local_model import last_chunk
from keel.models import model_name_of

__all__ = [
    "ChaosChatModel",
    "ChaosFault",
    "ChaosPolicy",
    "ChaosRateLimitError",
    "ChaosResponse",
    "ChaosServerError",
    "FaultKind",
]

FaultKind = Literal[
    "timeout",
    "rate_limit",
    "server_error",
    "malformed_tool_call",
    "unknown_tool",
    "repeated_call",
]
"""The faults `ChaosChatModel` injects (the names of `ChaosPolicy`'s rate fields)."""

_FAULTS: tuple[FaultKind, ...] = (
    "timeout",
    "rate_limit",
    "server_error",
    "malformed_tool_call",
    "unknown_tool",
    "repeated_call",
)
_PRIVATE = "keel_chaos_"  # prefix of the binding kwargs meant for the wrapper, not the model


# -- config ------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class ChaosPolicy:
    """How often each fault is injected (a probability per model call) and the seed.

    At most one fault is injected per call, so the rates must add up to at most 1.

    Example:
        ```python
        ChaosPolicy(rate_limit=0.1, server_error=0.1, malformed_tool_call=0.1, seed=7)
        ChaosPolicy.uniform(0.3, seed=7)  # 30% of calls fail, 5% for each of the 6 faults
        ```
    """

    timeout: float = 0.0
    """Rate of calls that raise `TimeoutError`."""
    rate_limit: float = 0.0
    """Rate of calls that raise `ChaosRateLimitError` (429 with `Retry-After`)."""
    server_error: float = 0.0
    """Rate of calls that raise `ChaosServerError` (500 or 503)."""
    malformed_tool_call: float = 0.0
    """Rate of calls answered with a tool call whose arguments are not valid JSON."""
    unknown_tool: float = 0.0
    """Rate of calls answered with a call to a tool that does not exist."""
    repeated_call: float = 0.0
    """Rate of calls answered with the previous turn's tool calls again (a loop). A call with
    no previous tool call in its conversation gets no fault instead."""
    seed: int = 0
    """Seeds the draws: the same seed and sequence of calls inject the same faults."""
    retry_after: float = 1.0
    """Seconds in the `Retry-After` header of injected 429s."""
    timeout_after: float = 0.0
    """Seconds an injected timeout sleeps before raising (a hung call); 0 raises at once."""

    def __post_init__(self) -> None:
        for name in _FAULTS:
            rate = getattr(self, name)
            if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate <= 1:
                raise UserError(f"ChaosPolicy.{name} must be between 0 and 1, got {rate!r}.")
        if self.total > 1 + 1e-9:
            raise UserError(
                f"ChaosPolicy rates add up to {self.total:g}; at most one fault is injected per "
                "call, so they must add up to at most 1."
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise UserError(f"ChaosPolicy.seed must be an int, got {self.seed!r}.")
        for option in ("retry_after", "timeout_after"):
            value = getattr(self, option)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise UserError(f"ChaosPolicy.{option} must be 0 or more (seconds), got {value!r}.")

    @property
    def total(self) -> float:
        """The probability that a call gets some fault."""
        return float(sum(getattr(self, name) for name in _FAULTS))

    @classmethod
    def uniform(cls, rate: float, *, seed: int = 0, **options: float) -> ChaosPolicy:
        """A policy where `rate` of all calls fail, split evenly between the six faults."""
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate <= 1:
            raise UserError(f"ChaosPolicy.uniform(rate=...) must be between 0 and 1, got {rate!r}.")
        each = rate / len(_FAULTS)
        return cls(**dict.fromkeys(_FAULTS, each), seed=seed, **options)


# -- errors that look like a provider's ------------------------------------------------------


class _Headers(Mapping[str, str]):
    """Case-insensitive, read-only HTTP headers (as `httpx.Headers` reads)."""

    def __init__(self, items: Mapping[str, str]) -> None:
        self._items = {k.lower(): v for k, v in items.items()}

    def __getitem__(self, key: str) -> str:
        return self._items[key.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


@dataclass(frozen=True, slots=True)
class ChaosResponse:
    """The HTTP response an injected error carries, like `openai.APIStatusError.response`."""

    status_code: int
    """The HTTP status."""
    headers: Mapping[str, str]
    """Case-insensitive headers: `response.headers["retry-after"]`."""


class ChaosRateLimitError(Exception):
    """An injected HTTP 429, shaped like the providers' rate-limit errors.

    Read the wait like from `openai.RateLimitError` / `anthropic.RateLimitError`:
    `exc.response.headers["retry-after"]` (seconds, as a string), or `exc.retry_after`.
    """

    status_code = 429

    def __init__(self, retry_after: float, message: str | None = None) -> None:
        self.retry_after = retry_after
        """Seconds the provider asks to wait before the next call."""
        self.response = ChaosResponse(429, _Headers({"retry-after": f"{retry_after:g}"}))
        """The HTTP response, with the `Retry-After` header."""
        super().__init__(
            message
            or f"Error code: 429 - rate limit exceeded (injected); retry after {retry_after:g} s"
        )


class ChaosServerError(Exception):
    """An injected HTTP 5xx (500 internal error or 503 overloaded), shaped like providers'."""

    def __init__(self, status_code: int, message: str | None = None) -> None:
        self.status_code = status_code
        """The HTTP status: 500 or 503."""
        self.response = ChaosResponse(status_code, _Headers({}))
        """The HTTP response."""
        reason = "service unavailable" if status_code == 503 else "internal server error"
        super().__init__(message or f"Error code: {status_code} - {reason} (injected)")


# -- the record of what was injected ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChaosFault:
    """One injected fault: on which call (counting from 0), which kind, and what it did."""

    call: int
    """The model call's index, in the order calls reached this model."""
    kind: FaultKind
    """The fault."""
    detail: str
    """What was injected, e.g. the tool name or the status code."""


@dataclass(frozen=True, slots=True)
class _Draw:
    call: int
    kind: FaultKind | None
    pick: float  # a second uniform number, for choices within a fault


@dataclass(frozen=True, slots=True)
class _Step:
    """What one call does: raise `error` (after `hang` s), answer `answer`, or ask `inner`."""

    draw: _Draw
    inner: Runnable[LanguageModelInput, BaseMessage]
    tools: tuple[str, ...]
    error: Exception | None
    hang: float
    answer: AIMessage | None


# -- the wrapper -------------------------------------------------------------------------------


class ChaosChatModel(BaseChatModel):
    """A chat model that wraps another and injects faults at the rates of a `ChaosPolicy`.

    `bind_tools` delegates to the wrapped model's binding; `invoke`, `ainvoke`, `stream` and
    `astream` go through the wrapper. Every injected fault is recorded in `faults`.

    Example:
        ```python
        from keel.evals import ChaosChatModel, ChaosPolicy, ScriptedChatModel, call

        inner = ScriptedChatModel(script=[call("lookup", q="x"), "done"])
        model = ChaosChatModel(model=inner, policy=ChaosPolicy.uniform(0.3, seed=1))
        ```
    """

    model: SkipValidation[BaseChatModel]
    """The wrapped model (normally a `keel.evals.ScriptedChatModel`)."""
    policy: SkipValidation[ChaosPolicy] = ChaosPolicy()
    """Fault rates and the seed."""
    strict_history: bool = True
    """Refuse a malformed history as a provider does, whatever the wrapped model does and
    before any fault is drawn (see `ScriptedChatModel.strict_history`); `False` only for a test
    that gives the model a broken history on purpose."""
    keel_test_double: bool = True
    """Marks this wrapper as allowed while real model requests are forbidden. The wrapped model
    is still checked: wrapping a real model in tests raises."""

    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _rng: random.Random | None = PrivateAttr(default=None)
    _calls: int = PrivateAttr(default=0)
    _faults: list[ChaosFault] = PrivateAttr(default_factory=list)

    @property
    def faults(self) -> list[ChaosFault]:
        """Every fault injected so far, in order (a copy)."""
        with self._lock:
            return list(self._faults)

    @property
    def calls(self) -> int:
        """How many calls drew a fault or none.

        A history refused as malformed, before any draw, is not counted (nor does it move
        the seeded sequence of faults).
        """
        return self._calls

    @property
    def model_name(self) -> str:
        """The wrapped model's name (what the price table prices calls by)."""
        return model_name_of(self.model)

    @property
    def _llm_type(self) -> str:
        return "keel-chaos"

    def bind_tools(
        self,
        tools: Sequence[Any],
        *,
        tool_choice: str | dict[str, Any] | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools through the wrapped model's `bind_tools`; calls still go through chaos."""
        if tool_choice is not None:
            kwargs["tool_choice"] = tool_choice
        inner = self.model.bind_tools(tools, **kwargs)
        names = tuple(convert_to_openai_tool(t)["function"]["name"] for t in tools)
        if isinstance(inner, RunnableBinding) and inner.bound is self.model:
            return self.bind(**inner.kwargs, keel_chaos_tools=names)
        return self.bind(keel_chaos_bound=inner, keel_chaos_tools=names)

    # -- the decision both drivers share -------------------------------------------------

    def _draw(self) -> _Draw:
        with self._lock:
            if self._rng is None:
                self._rng = random.Random(self.policy.seed)
            call = self._calls
            self._calls += 1
            roll, pick = self._rng.random(), self._rng.random()
        edge = 0.0
        for kind in _FAULTS:
            edge += getattr(self.policy, kind)
            if roll < edge:
                return _Draw(call, kind, pick)
        return _Draw(call, None, pick)

    def _record(self, draw: _Draw, kind: FaultKind, detail: str) -> None:
        with self._lock:
            self._faults.append(ChaosFault(draw.call, kind, detail))

    def _error(self, draw: _Draw) -> Exception | None:
        """The exception an error fault raises (recorded), or None for other draws."""
        if draw.kind == "timeout":
            self._record(draw, "timeout", f"timed out after {self.policy.timeout_after:g} s")
            return TimeoutError(
                f"Request timed out (injected by ChaosChatModel, call {draw.call})."
            )
        if draw.kind == "rate_limit":
            self._record(draw, "rate_limit", f"429, retry-after {self.policy.retry_after:g}")
            return ChaosRateLimitError(self.policy.retry_after)
        if draw.kind == "server_error":
            status = 503 if draw.pick < 0.5 else 500
            self._record(draw, "server_error", str(status))
            return ChaosServerError(status)
        return None

    def _replacement(
        self, draw: _Draw, messages: Sequence[BaseMessage], tools: Sequence[str]
    ) -> AIMessage | None:
        """The made-up answer of an `unknown_tool` or `repeated_call` fault, or None."""
        if draw.kind == "unknown_tool":
            base = tools[int(draw.pick * len(tools))] if tools else "lookup"
            name = next(n for n in (f"{base}_v{i}" for i in range(2, 100)) if n not in tools)
            self._record(draw, "unknown_tool", name)
            call = ToolCall(name=name, args={}, id=self._call_id(draw, 0))
            return self._stamp(AIMessage(content="", tool_calls=[call]))
        if draw.kind == "repeated_call":
            previous = next(
                (m for m in reversed(messages) if isinstance(m, AIMessage) and m.tool_calls), None
            )
            if previous is None:
                return None
            calls = [
                ToolCall(name=tc["name"], args=dict(tc["args"]), id=self._call_id(draw, i))
                for i, tc in enumerate(previous.tool_calls)
            ]
            self._record(draw, "repeated_call", ", ".join(tc["name"] for tc in calls))
            return self._stamp(AIMessage(content="", tool_calls=calls))
        return None

    def _malformed(self, draw: _Draw, answer: AIMessage, tools: Sequence[str]) -> AIMessage:
        """`answer` with its tool calls' arguments broken (or a new broken call)."""
        calls = answer.tool_calls or [
            ToolCall(name=tools[0] if tools else "lookup", args={"query": "x"}, id=None)
        ]
        broken = [
            InvalidToolCall(
                type="invalid_tool_call",
                name=tc["name"],
                args=_broken_json(tc["args"]),
                id=tc.get("id") or self._call_id(draw, i),
                error="Function arguments are not valid JSON (injected by ChaosChatModel).",
            )
            for i, tc in enumerate(calls)
        ]
        self._record(draw, "malformed_tool_call", ", ".join(tc["name"] or "" for tc in broken))
        return answer.model_copy(update={"tool_calls": [], "invalid_tool_calls": broken})

    def _call_id(self, draw: _Draw, index: int) -> str:
        """The id of a call the fault makes up: fresh when the wrapped model gives fresh ids."""
        if getattr(self.model, "fresh_ids", False):
            return f"chaos_{uuid.uuid4().hex[:24]}"
        return f"chaos_{draw.call}_{index}"

    def _stamp(self, message: AIMessage) -> AIMessage:
        message.usage_metadata = UsageMetadata(input_tokens=1, output_tokens=1, total_tokens=2)
        message.response_metadata = {"model_name": self.model_name, "keel_chaos": True}
        return message

    def _step(self, messages: Sequence[BaseMessage], kwargs: dict[str, Any]) -> _Step:
        """Draw this call's fault and say what to do; the wrapper's kwargs leave `kwargs`."""
        own = {
            k.removeprefix(_PRIVATE): kwargs.pop(k) for k in list(kwargs) if k.startswith(_PRIVATE)
        }
        tools: tuple[str, ...] = own.get("tools", ())
        if self.strict_history:
            check_history(messages)  # a 400 comes before any fault: the request is refused
        draw = self._draw()
        error = self._error(draw)
        hang = self.policy.timeout_after if draw.kind == "timeout" else 0.0
        answer = None if error else self._replacement(draw, messages, tools)
        return _Step(draw, own.get("bound") or self.model, tools, error, hang, answer)

    def _finish(self, step: _Step, message: BaseMessage) -> AIMessage:
        """The wrapped model's answer, broken if this call's fault is a malformed tool call."""
        if not isinstance(message, AIMessage):
            raise TypeError(
                f"The wrapped model returned {type(message).__name__}, not an AIMessage."
            )
        if step.draw.kind == "malformed_tool_call":
            return self._malformed(step.draw, message, step.tools)
        return message

    def _answer(
        self, step: _Step, messages: list[BaseMessage], stop: list[str] | None, kwargs: Any
    ) -> Steps[AIMessage]:
        """This call's whole answer: its fault (after its hang), or the (broken) model's answer."""
        if step.error is not None:
            yield sleep(step.hang)
            raise step.error
        invoke = partial(step.inner.invoke, messages, stop=stop, **kwargs)
        ainvoke = partial(step.inner.ainvoke, messages, stop=stop, **kwargs)
        return step.answer or self._finish(step, (yield Op(invoke, ainvoke)))

    def _streams(self, step: _Step) -> bool:
        """Whether the wrapped model's stream is passed on (no fault of this call changes it)."""
        return (
            step.error is None and step.answer is None and step.draw.kind != "malformed_tool_call"
        )

    # -- drivers: the same steps (`_answer`), each a few lines -------------------------------

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        answer = drive(self._answer(self._step(messages, kwargs), messages, stop, kwargs))
        return ChatResult(generations=[ChatGeneration(message=answer)])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        answer = await adrive(self._answer(self._step(messages, kwargs), messages, stop, kwargs))
        return ChatResult(generations=[ChatGeneration(message=answer)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        step = self._step(messages, kwargs)
        if self._streams(step):
            for chunk in step.inner.stream(messages, stop=stop, **kwargs):
                yield ChatGenerationChunk(message=_chunk_of(chunk))
            return
        yield _as_chunk(drive(self._answer(step, messages, stop, kwargs)))

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        step = self._step(messages, kwargs)
        if self._streams(step):
            async for chunk in step.inner.astream(messages, stop=stop, **kwargs):
                yield ChatGenerationChunk(message=_chunk_of(chunk))
            return
        yield _as_chunk(await adrive(self._answer(step, messages, stop, kwargs)))


def _broken_json(args: Mapping[str, Any]) -> str:
    """`args` as JSON with a trailing comma: `{"order_id": "A1",}`.

    Neither `json.loads` nor LangChain's partial-JSON parser (used on streamed tool-call chunks)
    accepts it, so the call lands in `invalid_tool_calls` whether the model streams or not.
    A truncated string would not: the partial parser completes `{"order_id": "A` silently.
    """
    return (json.dumps(dict(args)) if args else "{}")[:-1] + ",}"


def _as_chunk(message: AIMessage) -> ChatGenerationChunk:
    """One streamed chunk carrying `message` (tool calls as chunks, as providers stream them)."""
    chunk = last_chunk(message, message.content, invalid_as_chunks=True, id=message.id)
    return ChatGenerationChunk(message=chunk)


def _chunk_of(message: BaseMessage) -> AIMessageChunk:
    if isinstance(message, AIMessageChunk):
        return message
    raise TypeError(f"The wrapped model streamed {type(message).__name__}, not an AIMessageChunk.")
