"""The tool contract: `@tool`, `ToolSpec` defaults and validation, and `ToolRegistry`."""

from __future__ import annotations

import asyncio
import re
import sys
import threading
from typing import Annotated

import pytest
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import InjectedToolArg, InjectedToolCallId, StructuredTool
from langchain_core.tools import tool as lc_tool
from langgraph.prebuilt import InjectedState

from keel import RunContext, build_agent
from keel.errors import UserError
from keel.evals import ScriptedChatModel, call
from keel.guards import Policy, Rule
from keel.tools import KeelTool, ToolRegistry, ToolSpec, spec_of, tool


def order_resource(args: dict[str, object]) -> str:
    return f"orders/{args['order_id']}"


# -- @tool ----------------------------------------------------------------------------------


def test_tool_with_options_builds_a_keel_tool_carrying_the_spec() -> None:
    @tool(
        name="refund",
        version="3",
        risk="destructive",
        timeout=5,
        retries=0,
        retry_wait=0.5,
        resource=order_resource,
    )
    def issue_refund(order_id: str, amount: float) -> str:
        """Refund an order."""
        return f"refunded {amount} on {order_id}"

    assert isinstance(issue_refund, KeelTool)
    assert issue_refund.name == "refund"
    assert issue_refund.description == "Refund an order."
    assert issue_refund.spec == ToolSpec(
        version="3",
        risk="destructive",
        side_effects=True,
        timeout=5,
        retries=0,
        retry_wait=0.5,
        requires_approval=True,
        resource=order_resource,
    )
    assert issue_refund.metadata == {"keel_version": "3", "keel_risk": "destructive"}
    assert issue_refund.spec.resource_of({"order_id": "A1", "amount": 2}) == "orders/A1"
    assert spec_of(issue_refund) is issue_refund.spec
    # It is still an ordinary LangChain tool.
    assert issue_refund.invoke({"order_id": "A1", "amount": 2.5}) == "refunded 2.5 on A1"
    assert set(issue_refund.tool_call_schema.model_json_schema()["properties"]) == {
        "order_id",
        "amount",
    }


def test_bare_tool_decorator_gives_a_read_only_tool_with_defaults() -> None:
    @tool
    def lookup(order_id: str) -> str:
        """Look up an order."""
        return order_id

    assert isinstance(lookup, KeelTool)
    assert lookup.name == "lookup"
    assert lookup.spec == ToolSpec()
    assert lookup.spec.risk == "read"
    assert lookup.spec.side_effects is False
    assert lookup.spec.requires_approval is False
    assert lookup.spec.timeout == 30.0
    assert lookup.spec.resource_of({"order_id": "A1"}) == "*"


async def test_async_function_becomes_an_async_tool() -> None:
    @tool
    async def lookup(order_id: str) -> str:
        """Look up an order."""
        return f"order {order_id}"

    assert lookup.coroutine is not None
    assert lookup.func is None
    assert await lookup.ainvoke({"order_id": "A1"}) == "order A1"


@pytest.mark.parametrize("doc", [None, "", "   \n  "])
def test_tool_without_a_docstring_is_a_user_error(doc: str | None) -> None:
    def lookup(order_id: str) -> str:
        return order_id

    lookup.__doc__ = doc
    with pytest.raises(UserError) as excinfo:
        tool(lookup)
    assert str(excinfo.value) == (
        "Tool 'lookup' has no docstring; the model needs a description. "
        "Add a docstring saying what the tool does."
    )


def test_missing_docstring_message_uses_the_given_name() -> None:
    def lookup(order_id: str) -> str:
        return order_id

    with pytest.raises(UserError, match=r"^Tool 'find_order' has no docstring"):
        tool(name="find_order")(lookup)


def test_tool_options_are_validated_when_decorating() -> None:
    with pytest.raises(UserError, match=r"ToolSpec\.timeout"):

        @tool(timeout=0)
        def lookup(order_id: str) -> str:
            """Look up an order."""
            return order_id


# -- ToolSpec -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"risk": "dangerous"},
            "ToolSpec.risk must be one of ['read', 'write', 'destructive'], got 'dangerous'.",
        ),
        *[
            (
                {"timeout": value},
                "ToolSpec.timeout must be a number of seconds greater than 0 and at most 86,400 "
                f"(a day), or None to wait as long as the tool takes; got {value!r}.",
            )
            # infinity, or 1e12 s, failed every sync call: "timestamp out of range for time_t"
            for value in (0, -1.5, float("nan"), float("inf"), 1e12, True, "5")
        ],
        *[
            (
                {"retries": value},
                f"ToolSpec.retries is a count: a whole number, 0 or more; got {value!r}.",
            )
            # a NaN or infinite count retried a failing tool forever (736 attempts in 3 s)
            for value in (-1, 1.5, float("nan"), float("inf"), True, "2")
        ],
        *[
            (
                {"retry_wait": value},
                "ToolSpec.retry_wait must be a finite number of seconds, 0 or more; "
                f"got {value!r}.",
            )
            for value in (-0.1, float("nan"), float("inf"), "0.2")
        ],
        ({"version": ""}, "ToolSpec.version must be a non-empty string, got ''."),
    ],
)
def test_toolspec_rejects_bad_values_naming_the_field(
    kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        ToolSpec(**kwargs)  # type: ignore[arg-type]


def test_toolspec_errors_are_value_errors_too() -> None:
    # UserError subclasses ValueError, so code catching ValueError keeps working.
    with pytest.raises(ValueError, match=r"^ToolSpec\.retries"):
        ToolSpec(retries=-1)


def test_toolspec_accepts_no_timeout_and_no_retries() -> None:
    spec = ToolSpec(timeout=None, retries=0, retry_wait=0)
    assert spec.timeout is None
    assert spec.attempts == 1


@pytest.mark.parametrize(
    ("risk", "side_effects", "requires_approval"),
    [
        ("read", False, False),
        ("write", True, False),
        ("destructive", True, True),
    ],
)
def test_defaults_follow_from_risk(risk: str, side_effects: bool, requires_approval: bool) -> None:
    spec = ToolSpec(risk=risk)  # type: ignore[arg-type]
    assert spec.side_effects is side_effects
    assert spec.requires_approval is requires_approval


def test_explicit_side_effects_and_approval_override_the_defaults() -> None:
    assert ToolSpec(risk="read", side_effects=True).side_effects is True
    assert ToolSpec(risk="write", side_effects=False).side_effects is False
    assert ToolSpec(risk="read", requires_approval=True).requires_approval is True
    assert ToolSpec(risk="destructive", requires_approval=False).requires_approval is False


@pytest.mark.parametrize(
    ("spec", "attempts"),
    [
        (ToolSpec(risk="read", retries=2), 3),
        (ToolSpec(risk="read", retries=0), 1),
        (ToolSpec(risk="read", retries=5), 6),
        (ToolSpec(risk="write", retries=5), 1),
        (ToolSpec(risk="destructive", retries=5), 1),
        (ToolSpec(risk="read", side_effects=True, retries=5), 1),
        (ToolSpec(risk="write", side_effects=False, retries=2), 3),
    ],
)
def test_side_effecting_tools_get_exactly_one_attempt(spec: ToolSpec, attempts: int) -> None:
    assert spec.attempts == attempts


def test_toolspec_is_immutable() -> None:
    spec = ToolSpec()
    with pytest.raises(AttributeError):
        spec.risk = "destructive"  # type: ignore[misc]


# -- ToolRegistry ---------------------------------------------------------------------------


def test_registry_rejects_two_tools_with_the_same_name() -> None:
    @tool
    def lookup(order_id: str) -> str:
        """Look up an order."""
        return order_id

    @tool(name="lookup")
    def other(order_id: str) -> str:
        """Look up something else."""
        return order_id

    with pytest.raises(UserError) as excinfo:
        ToolRegistry([lookup, other])
    assert str(excinfo.value) == (
        "Two tools are named 'lookup'; tool names must be unique. Rename one "
        "(e.g. @tool(name='...'))."
    )


def test_registry_rejects_non_callables() -> None:
    with pytest.raises(UserError) as excinfo:
        ToolRegistry([42])  # type: ignore[list-item]
    assert str(excinfo.value) == "Tools must be LangChain tools or functions, got int: 42."


def test_registry_wraps_plain_functions_as_read_only_keel_tools() -> None:
    def lookup(order_id: str) -> str:
        """Look up an order."""
        return f"order {order_id}"

    registry = ToolRegistry([lookup])
    entry = registry.get("lookup")
    assert entry is not None
    assert isinstance(entry.tool, KeelTool)
    assert entry.spec == ToolSpec()
    assert entry.tool.invoke({"order_id": "A1"}) == "order A1"


def test_registry_plain_function_without_docstring_is_a_user_error() -> None:
    def lookup(order_id: str) -> str:
        return order_id

    with pytest.raises(UserError, match=r"^Tool 'lookup' has no docstring"):
        ToolRegistry([lookup])


def test_registry_langchain_tools_get_the_read_only_default_spec() -> None:
    def search(query: str) -> str:
        return query

    plain = StructuredTool.from_function(search, name="search", description="Search.")
    registry = ToolRegistry([plain])
    entry = registry.get("search")
    assert entry is not None
    assert entry.tool is plain
    assert entry.spec == ToolSpec()


def test_registry_spec_argument_overrides_the_tools_own() -> None:
    @tool
    def lookup(order_id: str) -> str:
        """Look up an order."""
        return order_id

    registry = ToolRegistry()
    registry.add(lookup, ToolSpec(risk="destructive"))
    entry = registry.get("lookup")
    assert entry is not None
    assert entry.spec.requires_approval is True
    assert lookup.spec.risk == "read", "the tool itself is unchanged"


def test_registry_lookup_names_order_and_len() -> None:
    @tool
    def b_tool(x: str) -> str:
        """B."""
        return x

    @tool
    def a_tool(x: str) -> str:
        """A."""
        return x

    registry = ToolRegistry([b_tool, a_tool])
    assert registry.names == ["b_tool", "a_tool"]
    assert len(registry) == 2
    assert registry.tools == [b_tool, a_tool]
    assert [entry.name for entry in registry] == ["b_tool", "a_tool"]
    assert registry.get("missing") is None


def test_registry_describe_has_one_row_per_tool() -> None:
    @tool
    def lookup(order_id: str) -> str:
        """Look up an order."""
        return order_id

    @tool(risk="destructive", version="2", timeout=None)
    def delete_order(order_id: str) -> str:
        """Delete an order."""
        return order_id

    assert ToolRegistry([lookup, delete_order]).describe() == [
        {
            "name": "lookup",
            "version": "1",
            "risk": "read",
            "side_effects": False,
            "requires_approval": False,
            "timeout": 30.0,
            "description": "Look up an order.",
        },
        {
            "name": "delete_order",
            "version": "2",
            "risk": "destructive",
            "side_effects": True,
            "requires_approval": True,
            "timeout": None,
            "description": "Delete an order.",
        },
    ]


def test_an_async_tool_under_sync_invoke_is_a_user_error_not_retried() -> None:
    """Before: LangChain's NotImplementedError, retried three times, handed to the model."""
    from keel import build_agent
    from keel.evals import ScriptedChatModel, call

    calls: list[str] = []

    @tool(retries=2)
    async def lookup(order_id: str) -> str:
        """Look up an order."""
        calls.append(order_id)
        return f"order {order_id}"

    model = ScriptedChatModel(script=[call("lookup", order_id="A1"), "done"])
    agent = build_agent(model, [lookup])
    with pytest.raises(UserError, match="lookup is an async tool: run the agent with `ainvoke`"):
        agent.invoke({"messages": [("user", "look up A1")]})
    assert calls == []


def _exiting(body: str, timeout: float | None) -> KeelTool:
    """A tool that calls `sys.exit(3)`: a sync body or an async one."""
    if body == "async":

        @tool(name="bye", timeout=timeout)
        async def bye_async(x: int) -> str:
            """Leave."""
            sys.exit(3)

        return bye_async

    @tool(name="bye", timeout=timeout)
    def bye(x: int) -> str:
        """Leave."""
        sys.exit(3)

    return bye


@pytest.mark.parametrize("deadline", [None, 5.0], ids=["inline", "deadline"])
@pytest.mark.parametrize(
    ("mode", "body"),  # (an async tool runs under ainvoke only)
    [("invoke", "sync"), ("ainvoke", "sync"), ("ainvoke", "async")],
)
async def test_a_tool_that_calls_sys_exit_fails_its_call_and_the_run_ends_with_an_outcome(
    mode: str, body: str, deadline: float | None
) -> None:
    """Under `ainvoke` a SystemExit escaping a task stopped the event loop: the caller saw
    `CancelledError` (or the process its exit), and the run had no outcome."""
    agent = build_agent(
        ScriptedChatModel(script=[call("bye", x=1), "It failed."]),
        [_exiting(body, deadline)],
        policy=Policy(rules=(Rule(action="allow"),)),
    )
    task = {"messages": [("user", "leave")]}
    context = RunContext(user_id="u1")
    if mode == "invoke":
        result = await asyncio.to_thread(agent.invoke, task, context=context)
    else:
        result = await agent.ainvoke(task, context=context)
    [answer] = [m for m in result["messages"] if m.type == "tool"]
    assert answer.content == (
        "Error: bye failed: ToolExited: bye raised SystemExit(3): a tool may not end the process"
    )
    assert answer.response_metadata["keel_status"] == "error"  # not retried: one attempt
    assert result["outcome"]["terminated_reason"] == "completed"


@pytest.mark.parametrize("deadline", [None, 5.0], ids=["inline", "deadline"])
@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
async def test_a_langchain_tool_that_calls_sys_exit_fails_its_call_too(
    mode: str, deadline: float | None
) -> None:
    """A sync LangChain tool (no keel spec) in keel's agent, given a deadline or not."""
    from langchain_core.tools import tool as langchain_tool

    @langchain_tool
    def bye(x: int) -> str:
        """Leave."""
        sys.exit(3)

    registry = ToolRegistry()
    registry.add(bye, ToolSpec(timeout=deadline))
    agent = build_agent(
        ScriptedChatModel(script=[call("bye", x=1), "It failed."]),
        registry,
        policy=Policy(rules=(Rule(action="allow"),)),
    )
    task, context = {"messages": [("user", "leave")]}, RunContext(user_id="u1")
    if mode == "invoke":
        result = await asyncio.to_thread(agent.invoke, task, context=context)
    else:
        result = await agent.ainvoke(task, context=context)
    [answer] = [m.content for m in result["messages"] if m.type == "tool"]
    assert answer == (
        "Error: bye failed: ToolExited: bye raised SystemExit(3): a tool may not end the process"
    )
    assert result["outcome"]["terminated_reason"] == "completed"


def test_an_async_langchain_tool_that_calls_sys_exit_fails_its_call_and_the_loop_goes_on() -> None:
    """LangChain runs an async body in a task of its own: its `SystemExit` stopped the event
    loop (the caller saw `CancelledError`, `asyncio.run` the exit: a server's every run gone)."""
    seen: list[object] = []

    @lc_tool
    async def bye(x: int, config: RunnableConfig) -> str:
        """Leave."""
        seen.append(config["configurable"]["thread_id"])  # LangChain still hands it the config
        sys.exit(3)

    agent = build_agent(
        ScriptedChatModel(script=[call("bye", x=1), "It failed."], fresh_ids=True),
        [bye],
        policy=Policy(rules=(Rule(action="allow"),)),
    )
    outcome: list[object] = []

    async def run() -> None:  # a loop of its own, in a thread: a regression must not end pytest's
        result = await agent.ainvoke(
            {"messages": [("user", "leave")]}, {"configurable": {"thread_id": "t1"}},
            context=RunContext(user_id="u1"),
        )  # fmt: skip
        outcome.append(result)
        outcome.append(await asyncio.sleep(0, "the loop goes on"))

    def in_thread() -> None:
        try:
            asyncio.run(run())
        except BaseException as exc:  # what the test is about: a SystemExit
            outcome.append(exc)

    worker = threading.Thread(target=in_thread)
    worker.start()
    worker.join(60)
    result, after = outcome
    assert isinstance(result, dict), result
    [answer] = [m.content for m in result["messages"] if m.type == "tool"]
    assert answer == (
        "Error: bye failed: ToolExited: bye raised SystemExit(3): a tool may not end the process"
    )
    assert result["outcome"]["terminated_reason"] == "completed"
    assert after == "the loop goes on" and seen == ["t1"]
    assert not hasattr(bye.coroutine, "__wrapped__")  # the user's own tool is left as it was


def test_only_a_tool_someone_declared_read_only_is_read_only() -> None:
    """What a replay or shadow run may run without a recording (`RegisteredTool.read_only`)."""
    from langchain_core.tools import tool as langchain_tool

    from keel.tools.registry import registered

    def plain(x: int) -> str:
        """Plain."""
        return str(x)

    @langchain_tool
    def chain(x: int) -> str:
        """LangChain."""
        return str(x)

    @tool
    def looks(x: int) -> str:
        """keel, read by default."""
        return str(x)

    @tool(risk="write", side_effects=False)
    def notes(x: int) -> str:
        """keel, writes without side effects (like memory)."""
        return str(x)

    registry = ToolRegistry([plain, chain, looks, notes])
    assert {t.name: t.read_only for t in registry} == {
        "plain": False,
        "chain": False,
        "looks": True,
        "notes": False,
    }
    declared = ToolRegistry()
    declared.add(plain, ToolSpec(risk="read"))
    entry = declared.get("plain")
    assert entry is not None and entry.read_only and registered(entry.tool).read_only


class Secret(InjectedToolArg):
    """An injected argument some other runner fills (module level: a string annotation of a
    local class does not resolve)."""


def test_a_tool_needing_an_injection_keel_cannot_fill_is_refused_when_the_agent_is_built() -> None:
    # keel fills InjectedState, InjectedStore, ToolRuntime (tests/test_tool_injection.py) and
    # LangChain InjectedToolCallId; another required InjectedToolArg, or InjectedState of a
    # field AgentState lacks, would fail every call: the model could never use the tool
    @lc_tool
    def with_secret(x: int, secret: Annotated[str, Secret()]) -> str:
        """Needs a secret only another runner fills."""
        return str(x)

    @lc_tool
    def with_field(x: int, user: Annotated[str, InjectedState("user_name")]) -> str:
        """Needs a state field keel's agent does not have."""
        return str(x)

    @lc_tool
    def with_call_id(x: int, call_id: Annotated[str, InjectedToolCallId]) -> str:
        """Needs its call's id, which LangChain fills."""
        return f"{x} {call_id}"

    with pytest.raises(UserError, match=r"^Tool 'with_secret' takes 'secret', an injected "):
        build_agent(ScriptedChatModel(script=["hi"]), [with_secret])
    with pytest.raises(
        UserError, match=r"^Tool 'with_field' takes InjectedState of 'user_name', which keel's "
    ):
        build_agent(ScriptedChatModel(script=["hi"]), [with_field])
    agent = build_agent(
        ScriptedChatModel(script=[call("with_call_id", x=1), "done"]), [with_call_id]
    )
    done = agent.invoke({"messages": [("user", "go")]})
    assert done["messages"][2].content.startswith("1 call_")
