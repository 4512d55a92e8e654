"""`KeelTool`, the `tool` decorator and `ToolRegistry`: LangChain tools with a `ToolSpec`."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, overload

from langchain_core.callbacks import AsyncCallbackManagerForToolRun, CallbackManagerForToolRun
from langchain_core.messages import ToolCall
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import BaseTool, StructuredTool, ToolException
from pydantic import ConfigDict, PrivateAttr, SkipValidation

from keel.errors import UserError
from keel.tools.spec import Reconciler, RegisteredTool, ResourceExtractor, Risk, ToolSpec
from keel.tools.stubs import stub_answer, stub_message

__all__ = ["KeelTool", "RegisteredTool", "ToolRegistry", "spec_of", "tool"]


class ToolExited(ToolException):
    """A tool body raised `SystemExit` (`sys.exit()`): the call failed, the process goes on.

    Under `ainvoke` a `SystemExit` escaping a task stops the event loop itself, so every run
    on it ended with no outcome (its caller cancelled, or the process gone); it is the tool's
    failure.
    """

    def __init__(self, tool: str, exc: SystemExit) -> None:
        super().__init__(f"{tool} raised SystemExit({exc.code!r}): a tool may not end the process")
        self.tool = tool
        self.code = exc.code


class KeelTool(StructuredTool):
    """A LangChain `StructuredTool` that carries a keel `ToolSpec`.

    Whatever runs it (keel's `execute_tools`, LangGraph's `ToolNode`, a `create_agent` graph
    without keel's middleware, your code), a call made inside `keel.tools.stubbing` is first
    offered to the stub: a replay or shadow run never runs a side-effecting body. A body that
    raises `SystemExit` fails the call with `ToolExited` (sync or async alike).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)
    spec: SkipValidation[ToolSpec] = ToolSpec()
    """What keel must know to run this tool safely."""
    _declared: bool = PrivateAttr(default=True)
    """False for a plain function the registry turned into a tool: its spec is a default."""

    def run(self, tool_input: str | dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        """Run the tool, unless an active tool stub answers the call."""
        stubbed = self._stubbed(tool_input, kwargs.get("tool_call_id"))
        return stubbed if stubbed is not None else super().run(tool_input, *args, **kwargs)

    async def arun(self, tool_input: str | dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        """Run the tool, unless an active tool stub answers the call (async)."""
        stubbed = self._stubbed(tool_input, kwargs.get("tool_call_id"))
        return stubbed if stubbed is not None else await super().arun(tool_input, *args, **kwargs)

    def _run(
        self,
        *args: Any,
        config: RunnableConfig,
        run_manager: CallbackManagerForToolRun | None = None,
        **kwargs: Any,
    ) -> Any:
        try:
            return super()._run(*args, config=config, run_manager=run_manager, **kwargs)
        except SystemExit as exc:
            raise ToolExited(self.name, exc) from None

    async def _arun(
        self,
        *args: Any,
        config: RunnableConfig,
        run_manager: AsyncCallbackManagerForToolRun | None = None,
        **kwargs: Any,
    ) -> Any:
        try:  # LangChain runs this in a task of its own: SystemExit must not leave it
            return await super()._arun(*args, config=config, run_manager=run_manager, **kwargs)
        except SystemExit as exc:
            raise ToolExited(self.name, exc) from None

    def _stubbed(self, tool_input: str | dict[str, Any], call_id: str | None) -> Any:
        entry = registered(self)
        args = dict(tool_input) if isinstance(tool_input, dict) else {"input": tool_input}
        # the stub sees the model's arguments: never what ToolNode or keel injected
        args = {k: v for k, v in args.items() if k not in entry.injected.keys}
        call = ToolCall(name=self.name, args=args, id=call_id)
        answer = stub_answer(entry, call)
        if answer is None:
            return None
        return answer.content if call_id is None else stub_message(answer, call_id, self.name)


def _exit_fails(name: str, body: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """`body`, with a `SystemExit` it raises turned into the call's failure (`ToolExited`)."""

    @functools.wraps(body)  # LangChain reads the signature: a `RunnableConfig` parameter
    async def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return await body(*args, **kwargs)
        except SystemExit as exc:
            raise ToolExited(name, exc) from None

    return guarded


def spec_of(tool: BaseTool) -> ToolSpec:
    """The `ToolSpec` of a tool: its own for a `KeelTool`, the read-only default otherwise."""
    if isinstance(tool, KeelTool):
        return tool.spec
    return ToolSpec()


def registered(tool: BaseTool) -> RegisteredTool:
    """`tool` with its spec (`spec_of`), marked declared only when keel's `tool(...)` made it."""
    declared = isinstance(tool, KeelTool) and tool._declared
    return RegisteredTool(tool, spec_of(tool), declared=declared)


@overload
def tool(func: Callable[..., Any], /) -> KeelTool: ...


@overload
def tool(
    *,
    name: str | None = None,
    version: str = "1",
    risk: Risk = "read",
    side_effects: bool | None = None,
    timeout: float | None = 30.0,
    retries: int = 2,
    retry_wait: float = 0.2,
    requires_approval: bool | None = None,
    resource: ResourceExtractor | None = None,
    idempotent: bool = False,
    reconcile: Reconciler | None = None,
) -> Callable[[Callable[..., Any]], KeelTool]: ...


def tool(
    func: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    version: str = "1",
    risk: Risk = "read",
    side_effects: bool | None = None,
    timeout: float | None = 30.0,
    retries: int = 2,
    retry_wait: float = 0.2,
    requires_approval: bool | None = None,
    resource: ResourceExtractor | None = None,
    idempotent: bool = False,
    reconcile: Reconciler | None = None,
) -> KeelTool | Callable[[Callable[..., Any]], KeelTool]:
    """Turn a function (sync or async) into a `KeelTool`; the docstring is the description.

    Example:
        ```python
        @tool(risk="destructive", resource=lambda a: f"orders/{a['order_id']}")
        def issue_refund(order_id: str, amount: float) -> str:
            \"\"\"Refund an order.\"\"\"
            ...
        ```
    """
    spec = ToolSpec(
        version=version,
        risk=risk,
        side_effects=side_effects,
        timeout=timeout,
        retries=retries,
        retry_wait=retry_wait,
        requires_approval=requires_approval,
        resource=resource,
        idempotent=idempotent,
        reconcile=reconcile,
    )

    def build(fn: Callable[..., Any]) -> KeelTool:
        if not callable(fn):
            raise UserError(f"@tool decorates a function, got {fn!r}.")
        if not (fn.__doc__ or "").strip():
            raise UserError(
                f"Tool {name or fn.__name__!r} has no docstring; the model needs a description. "
                "Add a docstring saying what the tool does."
            )
        is_async = inspect.iscoroutinefunction(fn)
        built = KeelTool.from_function(
            func=None if is_async else fn,
            coroutine=fn if is_async else None,
            name=name or fn.__name__,
            spec=spec,
            metadata={"keel_version": spec.version, "keel_risk": spec.risk},
        )
        assert isinstance(built, KeelTool)
        return built

    return build(func) if func is not None else build


class ToolRegistry:
    """The tools an agent may call, by name, with their specs.

    Accepts keel tools, LangChain tools and plain functions (turned into read-only tools; a
    replay or shadow run still never runs them without a recording, since nobody declared them
    read-only: see `RegisteredTool.read_only`).
    """

    def __init__(self, tools: Iterable[BaseTool | Callable[..., Any]] = ()) -> None:
        self._tools: dict[str, RegisteredTool] = {}
        for item in tools:
            self.add(item)

    def add(self, item: BaseTool | Callable[..., Any], spec: ToolSpec | None = None) -> None:
        """Register a tool; `spec` overrides the tool's own."""
        if not isinstance(item, BaseTool):
            if not callable(item):
                raise UserError(
                    f"Tools must be LangChain tools or functions, got {type(item).__name__}: "
                    f"{item!r}."
                )
            item = tool(item)
            item._declared = spec is not None  # else its `read` is a default nobody chose
        elif isinstance(item, StructuredTool) and not isinstance(item, KeelTool) and item.coroutine:
            # LangChain runs an async body in a task of its own, where a `SystemExit` stops the
            # event loop (every run on it); keel's copy fails the call instead, as KeelTool does
            item = item.model_copy(update={"coroutine": _exit_fails(item.name, item.coroutine)})
        if item.name in self._tools:
            raise UserError(
                f"Two tools are named {item.name!r}; tool names must be unique. Rename one "
                "(e.g. @tool(name='...'))."
            )
        entry = registered(item)
        if spec is not None:
            entry = RegisteredTool(item, spec)
        self._tools[item.name] = entry

    def get(self, name: str) -> RegisteredTool | None:
        """The tool called `name`, or None."""
        return self._tools.get(name)

    @property
    def names(self) -> list[str]:
        """The registered tool names, in registration order."""
        return list(self._tools)

    @property
    def tools(self) -> list[BaseTool]:
        """The LangChain tools, to bind to a model."""
        return [entry.tool for entry in self._tools.values()]

    def __iter__(self) -> Iterator[RegisteredTool]:
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    def describe(self) -> list[dict[str, Any]]:
        """One row per tool with its metadata (for CLIs, audit and docs)."""
        return [
            {
                "name": entry.name,
                "version": entry.spec.version,
                "risk": entry.spec.risk,
                "side_effects": entry.spec.side_effects,
                "requires_approval": entry.spec.requires_approval,
                "timeout": entry.spec.timeout,
                "description": entry.tool.description,
            }
            for entry in self
        ]
