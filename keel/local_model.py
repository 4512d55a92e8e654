"""`LocalChatModel`: a real chat model with no key and no network (llama.cpp over a GGUF file).

The model string `local:` (or `local:qwen2.5-coder-1.5b`, or just `local`) names it wherever
keel takes a model string. It needs the optional extra and the weights, installed once:

    pip install 'langgraph-keel[local]' && keel models install     # or: make local-model

Tool calls are asked for with a JSON schema as the response format (llama.cpp turns it into a
grammar, so the model can only write a valid choice): `oneOf` the bound tools, each
`{"name": <const>, "arguments": <the tool's parameters>}`, plus a `final_answer` branch when
the model may answer instead (`tool_choice` "auto"). The choice becomes an `AIMessage` with a
tool call (a fresh id) or a plain answer. `with_structured_output` forces its one schema.

One `llama_cpp.Llama` per file and settings is loaded per process and shared by every model
object and run; it is not thread-safe, so calls take turns on its lock. `ainvoke` runs the
call in a thread: the event loop is never blocked.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import threading
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    InvalidToolCall,
    SystemMessage,
    ToolCall,
    ToolMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.utils.function_calling import convert_to_openai_tool
from langchain_core.utils.json import parse_partial_json

from keel.errors import SetupError, UserError
from keel.model_files import INSTALL_HINT, local_model_file

__all__ = ["FINAL_ANSWER", "LocalChatModel", "last_chunk", "load_llama", "local_chat_model"]

FINAL_ANSWER = "final_answer"
"""The name of the branch by which the model answers instead of calling a tool."""
EXTRA_HINT = "pip install 'langgraph-keel[local]'"

TOOLS_PROMPT = """\
You can call these tools:
{tools}

Reply with one JSON object and nothing else.
To call a tool: {{"name": "<tool name>", "arguments": {{...}}}}.
{answer}"""
ANSWER_BRANCH = (
    "To answer the user instead, only once the tools have done what the task needs (or when "
    "no tool fits): "
    f'{{"name": "{FINAL_ANSWER}", "arguments": {{"answer": "<your reply to the user>"}}}}.'
)
FORCED_PROMPT = """\
Reply with one JSON object and nothing else: the arguments of `{name}` ({description}).
Its JSON schema: {schema}"""


class LocalChatModel(BaseChatModel):
    """A LangChain chat model over `llama_cpp.Llama.create_chat_completion`; see the module.

    Example:
        ```python
        from keel import build_agent
        agent = build_agent("local:", tools)   # or LocalChatModel()
        ```
    """

    model_name: str = "local:qwen2.5-coder-1.5b"
    """The name keel prices (at $0) and reports."""
    model_path: str | None = None
    """The GGUF file (default: the named model in `keel.model_files.models_dir()`)."""
    n_ctx: int = 4096
    """Context window in tokens."""
    n_threads: int = 2
    """CPU threads for generation and prompt processing."""
    max_tokens: int = 512
    """The most tokens an answer may have (keel lowers it to a period budget's reserve)."""
    temperature: float = 0.0
    """0: greedy, the same answer every time."""
    seed: int = 0
    """The sampling seed (matters only above temperature 0)."""

    @property
    def _llm_type(self) -> str:
        return "keel-local-llama-cpp"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "n_ctx": self.n_ctx}

    def bind_tools(
        self,
        tools: Sequence[Any],
        *,
        tool_choice: str | dict[str, Any] | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools; `tool_choice` is `auto` (default), `any`/`required`, or a tool's name."""
        formatted = [convert_to_openai_tool(t)["function"] for t in tools]
        names = [f["name"] for f in formatted]
        choice = _tool_choice(tool_choice, names)
        kwargs.pop("ls_structured_output_format", None)
        return self.bind(keel_tools=formatted, keel_tool_choice=choice, **kwargs)

    # -- the request ---------------------------------------------------------------------

    def request(self, messages: Sequence[BaseMessage], **kwargs: Any) -> dict[str, Any]:
        """The `create_chat_completion` keyword arguments for `messages` and the bound tools."""
        tools: list[dict[str, Any]] = kwargs.get("keel_tools") or []
        choice: str = kwargs.get("keel_tool_choice") or "auto"
        offered = tools if choice in ("auto", "any") else [t for t in tools if t["name"] == choice]
        chat = _chat_messages(messages)
        request: dict[str, Any] = {
            "messages": chat,
            "temperature": self.temperature,
            "max_tokens": int(kwargs.get("max_tokens") or self.max_tokens),
            "seed": self.seed,
        }
        stop = kwargs.get("stop")
        if stop:
            request["stop"] = list(stop)
        if not offered:
            return request
        if len(offered) == 1 and choice != "auto":
            tool = offered[0]
            instruction = FORCED_PROMPT.format(
                name=tool["name"],
                description=tool.get("description") or tool["name"],
                schema=json.dumps(_parameters(tool)),
            )
            schema = _parameters(tool)
        else:
            instruction = TOOLS_PROMPT.format(
                tools="\n".join(_describe(t) for t in offered),
                answer=ANSWER_BRANCH if choice == "auto" else "You must call one of the tools.",
            )
            branches = [_branch(t["name"], _parameters(t)) for t in offered]
            if choice == "auto":
                answer = {"type": "object", "properties": {"answer": {"type": "string"}}}
                answer["required"] = ["answer"]
                branches.append(_branch(FINAL_ANSWER, answer))
            schema = {"oneOf": branches}
        request["messages"] = _with_system(chat, instruction)
        request["response_format"] = {"type": "json_object", "schema": schema}
        return request

    def _answer(self, text: str, usage: UsageMetadata, **kwargs: Any) -> AIMessage:
        tools: list[dict[str, Any]] = kwargs.get("keel_tools") or []
        choice: str = kwargs.get("keel_tool_choice") or "auto"
        meta = {"model_name": self.model_name}
        if not tools:
            return AIMessage(content=text, usage_metadata=usage, response_metadata=meta)
        forced = choice not in ("auto", "any")
        return _parsed(text, choice if forced else None, usage, meta)

    # -- drivers ---------------------------------------------------------------------------

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        request = self.request(messages, stop=stop, **kwargs)
        loaded = self._loaded()
        with loaded.lock:
            response = loaded.llama.create_chat_completion(**request)
        text = response["choices"][0]["message"].get("content") or ""
        counts = response.get("usage") or {}
        usage = _usage(counts.get("prompt_tokens", 0), counts.get("completion_tokens", 0))
        message = self._answer(text, usage, **kwargs)
        finish = response["choices"][0].get("finish_reason")
        message.response_metadata["finish_reason"] = finish
        return ChatResult(generations=[ChatGeneration(message=message)])

    # `_agenerate` is LangChain's own: `_generate` in the default executor (as `to_thread`).

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        request = self.request(messages, stop=stop, **kwargs)
        tools = bool(request.get("response_format"))
        answer = _AnswerStream() if tools else None
        loaded = self._loaded()
        text, pieces = "", 0
        with loaded.lock:
            for part in loaded.llama.create_chat_completion(**request, stream=True):
                delta = part["choices"][0]["delta"].get("content") or ""
                if not delta:
                    continue
                text += delta
                pieces += 1
                shown = delta if answer is None else answer.feed(text)
                if shown:
                    chunk = ChatGenerationChunk(message=AIMessageChunk(content=shown))
                    if run_manager:
                        run_manager.on_llm_new_token(shown, chunk=chunk)
                    yield chunk
            prompt_tokens = max(0, loaded.llama.n_tokens - pieces)
        usage = _usage(prompt_tokens, pieces)
        final = self._answer(text, usage, **kwargs)
        shown = text if answer is None else answer.shown
        yield ChatGenerationChunk(message=_last_chunk(final, shown=shown))

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        queue: asyncio.Queue[ChatGenerationChunk | BaseException | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def produce() -> None:
            try:
                for chunk in self._stream(messages, stop, None, **kwargs):
                    loop.call_soon_threadsafe(queue.put_nowait, chunk)
            except BaseException as exc:  # handed to the consumer, which raises it
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            else:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        worker = asyncio.ensure_future(asyncio.to_thread(produce))
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                if run_manager and item.message.content:
                    await run_manager.on_llm_new_token(str(item.message.content), chunk=item)
                yield item
        finally:
            await worker

    def _loaded(self) -> _Loaded:
        path = Path(self.model_path) if self.model_path else _default_path(self.model_name)
        return load_llama(path, n_ctx=self.n_ctx, n_threads=self.n_threads)


def local_chat_model(name: str = "", **fields: Any) -> LocalChatModel:
    """The local model named `name` (after `local:`; empty: the default), checked to be there.

    Raises:
        SetupError: the `local` extra (llama-cpp-python) or the model file is missing.
    """
    model_file = local_model_file(name)
    _require_llama_cpp()
    path = Path(fields.pop("model_path", None) or model_file.path())
    if not path.is_file():
        raise SetupError(
            f"The local model file {path} is missing. Install it once with `{INSTALL_HINT}` "
            "(or `make local-model`); set KEEL_MODELS_DIR if it lives elsewhere."
        )
    return LocalChatModel(model_name=f"local:{model_file.name}", model_path=str(path), **fields)


# -- the loaded model, one per process ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Loaded:
    llama: Any
    lock: threading.Lock


_loaded: dict[tuple[str, int, int], _Loaded] = {}
_loading = threading.Lock()


def load_llama(path: Path, *, n_ctx: int = 4096, n_threads: int = 2) -> _Loaded:
    """The process's `llama_cpp.Llama` for this file and settings, loaded on first use."""
    key = (str(path.resolve()), n_ctx, n_threads)
    with _loading:
        found = _loaded.get(key)
        if found is not None:
            return found
        llama_cpp = _require_llama_cpp()
        if not path.is_file():
            raise SetupError(
                f"The local model file {path} is missing. Install it with `{INSTALL_HINT}`."
            )
        llama = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            verbose=False,
        )
        if not _loaded:
            atexit.register(_close_all)
        found = _loaded[key] = _Loaded(llama, threading.Lock())
        return found


def _close_all() -> None:
    """Free the loaded models at exit, while llama.cpp's bindings still exist.

    Left to `Llama.__del__` at interpreter teardown, llama-cpp-python 0.3.36 finds its C
    functions already gone and prints `Exception ignored ... 'NoneType' object is not
    callable` after every process that loaded a model.
    """
    with _loading:
        models = list(_loaded.values())
        _loaded.clear()
    for model in models:
        with model.lock, contextlib.suppress(Exception):
            model.llama.close()


def _require_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:
        raise SetupError(
            f"The local model needs the `local` extra (llama-cpp-python): run `{EXTRA_HINT}` "
            f"and `{INSTALL_HINT}` (or `make local-model`, which does both). ({exc})"
        ) from exc
    return llama_cpp


def _default_path(model_name: str) -> Path:
    return local_model_file(model_name.removeprefix("local:")).path()


# -- schemas and prompts -----------------------------------------------------------------------


def _tool_choice(choice: str | dict[str, Any] | bool | None, names: list[str]) -> str:
    """`auto`, `any`, or one tool's name."""
    if choice is None or choice is False or choice in ("auto", "none"):
        return "auto"
    if choice is True or choice in ("any", "required"):
        return "any" if len(names) != 1 else names[0]
    if isinstance(choice, dict):
        choice = (choice.get("function") or {}).get("name") or choice.get("name")
    if isinstance(choice, str) and choice in names:
        return choice
    raise UserError(
        f"tool_choice must be 'auto', 'any' or one of the bound tools {names}, got {choice!r}."
    )


def _parameters(tool: Mapping[str, Any]) -> dict[str, Any]:
    params = dict(tool.get("parameters") or {"type": "object", "properties": {}})
    params.setdefault("type", "object")
    params.setdefault("properties", {})
    return params


def _branch(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": name}, "arguments": arguments},
        "required": ["name", "arguments"],
    }


def _describe(tool: Mapping[str, Any]) -> str:
    props = _parameters(tool)["properties"]
    args = ", ".join(f"{k}: {v.get('type', 'any')}" for k, v in props.items())
    return f"- {tool['name']}({args}): {tool.get('description') or ''}".rstrip(": ")


def _with_system(chat: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """The tool instructions first, then the caller's system text (its plan ends up last).

    Measured on the demo: with the plan *before* the tool list, the 1.5B model answered "I
    refunded it" without a tool; with the tool list first it calls the plan's current step.
    """
    if chat and chat[0]["role"] == "system":
        return [{"role": "system", "content": f"{text}\n\n{chat[0]['content']}"}, *chat[1:]]
    return [{"role": "system", "content": text}, *chat]


def _chat_messages(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """LangChain messages as llama.cpp chat messages; tool calls in the JSON the model writes."""
    system = [m.text for m in messages if isinstance(m, SystemMessage) and m.text]
    chat: list[dict[str, Any]] = (
        [{"role": "system", "content": "\n\n".join(system)}] if system else []
    )
    for m in messages:
        if isinstance(m, SystemMessage):
            continue
        if isinstance(m, AIMessage):
            calls = [json.dumps({"name": c["name"], "arguments": c["args"]}) for c in m.tool_calls]
            content = "\n".join([*([m.text] if m.text else []), *calls])
            chat.append({"role": "assistant", "content": content})
        elif isinstance(m, ToolMessage):
            chat.append({"role": "tool", "content": f"{m.name or 'tool'} returned: {m.text}"})
        elif isinstance(m, HumanMessage):
            chat.append({"role": "user", "content": m.text})
        else:
            chat.append({"role": "user", "content": m.text})
    return chat


# -- answers -----------------------------------------------------------------------------------


def _usage(prompt_tokens: int, completion_tokens: int) -> UsageMetadata:
    return UsageMetadata(
        input_tokens=int(prompt_tokens),
        output_tokens=int(completion_tokens),
        total_tokens=int(prompt_tokens) + int(completion_tokens),
    )


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _parsed(text: str, forced: str | None, usage: UsageMetadata, meta: dict[str, Any]) -> AIMessage:
    """The model's JSON as an answer, a tool call (fresh id), or an invalid tool call."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        bad = InvalidToolCall(
            type="invalid_tool_call",
            name=forced,
            args=text,
            id=_call_id(),
            error=f"the model's JSON did not parse ({exc}); it may have run out of tokens",
        )
        return AIMessage(
            content="", invalid_tool_calls=[bad], usage_metadata=usage, response_metadata=meta
        )
    if forced is not None:
        call = ToolCall(name=forced, args=value if isinstance(value, dict) else {}, id=_call_id())
        return AIMessage(
            content="", tool_calls=[call], usage_metadata=usage, response_metadata=meta
        )
    name = value.get("name") if isinstance(value, dict) else None
    args = value.get("arguments") if isinstance(value, dict) else None
    args = args if isinstance(args, dict) else {}
    if name == FINAL_ANSWER:
        answer = str(args.get("answer", ""))
        return AIMessage(content=answer, usage_metadata=usage, response_metadata=meta)
    call = ToolCall(name=str(name), args=args, id=_call_id())
    return AIMessage(content="", tool_calls=[call], usage_metadata=usage, response_metadata=meta)


class _AnswerStream:
    """Reads the growing JSON and returns the new part of a `final_answer`'s text."""

    def __init__(self) -> None:
        self.shown = ""

    def feed(self, text: str) -> str:
        partial = _partial(text)
        if not isinstance(partial, dict) or partial.get("name") != FINAL_ANSWER:
            return ""
        answer = (partial.get("arguments") or {}).get("answer")
        if not isinstance(answer, str) or not answer.startswith(self.shown):
            return ""
        new, self.shown = answer[len(self.shown) :], answer
        return new


def _partial(text: str) -> Any:
    try:
        return parse_partial_json(text)
    except (ValueError, TypeError):
        return None


def _last_chunk(final: AIMessage, *, shown: str) -> AIMessageChunk:
    """The stream's closing chunk: the tool calls, the usage, and any text not yet streamed."""
    rest = final.text[len(shown) :] if final.text.startswith(shown) else ""
    return last_chunk(final, rest, invalid_tool_calls=final.invalid_tool_calls)


def last_chunk(
    message: AIMessage, content: Any = "", *, invalid_as_chunks: bool = False, **fields: Any
) -> AIMessageChunk:
    """A stream's closing chunk for `message`: its tool calls as chunks, its usage and metadata.

    The chunk's text is `content` (what was not streamed before it); `invalid_as_chunks` adds
    the message's invalid tool calls as chunks after the valid ones (as a sloppy provider
    streams them); `fields` are more `AIMessageChunk` fields (`id=...`). keel's local model
    and its scripted and chaos models (`keel.evals`) stream through it.
    """
    calls: list[tuple[str | None, str | None, str | None]] = [
        (tc["name"], json.dumps(tc["args"]), tc["id"]) for tc in message.tool_calls
    ]
    if invalid_as_chunks:
        calls += [(tc["name"], tc["args"], tc["id"]) for tc in message.invalid_tool_calls]
    return AIMessageChunk(
        content=content,
        tool_call_chunks=[
            tool_call_chunk(name=name, args=args, id=id_, index=i)
            for i, (name, args, id_) in enumerate(calls)
        ],
        usage_metadata=message.usage_metadata,
        response_metadata=message.response_metadata,
        chunk_position="last",
        **fields,
    )
