"""Property: whatever a turn's tool calls do, `execute_tools` answers each exactly once.

Random batches mix calls that succeed, raise, raise `ToolException`, or outlive their timeout,
with invalid arguments, unknown tools, calls needing an approval nobody gave, and repeats of
the same arguments (a side-effecting one answered with its first call's answer, not run). Each
batch runs through the node under `ainvoke` (and `invoke` for some).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Literal, get_args

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_core.messages import AIMessage, HumanMessage, ToolCall, ToolMessage
from langchain_core.tools import ToolException
from langgraph.graph import END, START, StateGraph

from keel import RunContext
from keel.nodes import ToolStatus, execute_tools, valid_history
from keel.state import AgentState
from keel.tools import KeelTool, ToolRegistry, ToolSpec

Mode = Literal["ok", "raise", "tool_exception", "sleep"]
TIMEOUT = 0.2  # headroom: an "ok" call on a loaded 2-core machine can take tens of ms
STATUSES = set(get_args(ToolStatus))


def _behave(mode: str, n: int) -> str:
    if mode == "raise":
        raise RuntimeError(f"boom {n}")
    if mode == "tool_exception":
        raise ToolException(f"nope {n}")
    return f"ok {n}"


def act_sync(mode: Mode, n: int) -> str:
    """Act on n."""
    if mode == "sleep":
        time.sleep(TIMEOUT * 3)
    return _behave(mode, n)


async def act_async(mode: Mode, n: int) -> str:
    """Act on n."""
    if mode == "sleep":
        await asyncio.sleep(10)
    return _behave(mode, n)


def _tool(name: str, spec: ToolSpec) -> KeelTool:
    built = KeelTool.from_function(
        func=act_sync, coroutine=act_async, name=name, description="Act on n.", spec=spec
    )
    assert isinstance(built, KeelTool)
    return built


READ = _tool("act", ToolSpec(timeout=TIMEOUT, retries=1, retry_wait=0))
WRITE = _tool("act_write", ToolSpec(risk="write", timeout=TIMEOUT))
DESTRUCTIVE = _tool("act_destructive", ToolSpec(risk="destructive", timeout=TIMEOUT))


def _graph() -> Any:
    graph = StateGraph(AgentState, context_schema=RunContext)
    graph.add_node("execute_tools", execute_tools(ToolRegistry([READ, WRITE, DESTRUCTIVE])))
    graph.add_edge(START, "execute_tools")
    graph.add_edge("execute_tools", END)
    return graph.compile()


GRAPH = _graph()


def expected(name: str, args: dict[str, Any], driver: str) -> tuple[str, str | None]:
    """The keel_status a call must get, and its exact content where it is fixed."""
    if name not in ("act", "act_write", "act_destructive"):
        return "unknown_tool", None
    if args.get("mode") not in get_args(Mode) or not isinstance(args.get("n"), int):
        return "invalid_args", None
    if name == "act_destructive":
        return "needs_approval", None
    mode, n = args["mode"], args["n"]
    if mode == "ok":
        return "success", f"ok {n}"
    if mode == "sleep":
        if driver == "invoke":  # a thread cannot be cancelled: the result is ignored
            return "timeout", (
                f"Error: {name} did not finish within {TIMEOUT:g} s; its result will be ignored "
                "(under a sync invoke it may still finish in the background)."
            )
        return "timeout", f"Error: {name} did not finish within {TIMEOUT:g} s and was cancelled."
    if mode == "tool_exception":
        return "error", f"Error: {name} failed: ToolException: nope {n}"
    tries = " after 2 attempts" if name == "act" else ""
    return "error", f"Error: {name} failed{tries}: RuntimeError: boom {n}"


valid_args = st.fixed_dictionaries(
    {"mode": st.sampled_from(get_args(Mode)), "n": st.integers(0, 2)}
)
invalid_args = st.one_of(
    st.fixed_dictionaries({"mode": st.sampled_from(get_args(Mode))}),
    st.fixed_dictionaries({"n": st.integers(0, 2)}),
    st.fixed_dictionaries({"mode": st.sampled_from(["fly", ""]), "n": st.integers(0, 2)}),
    st.fixed_dictionaries({"mode": st.just("ok"), "n": st.sampled_from(["two", None, [1]])}),
)
calls = st.one_of(
    st.tuples(st.sampled_from(["act", "act", "act_write", "act_destructive"]), valid_args),
    st.tuples(st.sampled_from(["act", "act_write"]), invalid_args),
    st.tuples(st.sampled_from(["ask", "act_read", ""]), valid_args),
)


@st.composite
def batches(draw: st.DrawFn) -> list[tuple[str, dict[str, Any]]]:
    batch = draw(st.lists(calls, min_size=1, max_size=6))
    # Repeat some calls verbatim: same tool, same arguments, a different call id.
    repeats = draw(st.lists(st.integers(0, len(batch) - 1), max_size=2))
    return batch + [batch[i] for i in repeats]


@settings(
    deadline=None,
    max_examples=60,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(batch=batches(), driver=st.sampled_from(["ainvoke", "ainvoke", "invoke"]))
def test_every_tool_call_gets_exactly_one_tool_message(
    batch: list[tuple[str, dict[str, Any]]], driver: str
) -> None:
    ai = AIMessage(
        content="",
        tool_calls=[
            ToolCall(name=name, args=args, id=f"call_{i}") for i, (name, args) in enumerate(batch)
        ],
    )
    payload = {"messages": [HumanMessage(content="go", id="h"), ai]}
    context = RunContext(user_id="prop")
    if driver == "invoke":
        final = GRAPH.invoke(payload, context=context)
    else:
        final = asyncio.run(GRAPH.ainvoke(payload, context=context))

    messages = final["messages"]
    results = [m for m in messages if isinstance(m, ToolMessage)]
    # Exactly one answer per call, in call order, and nothing else.
    assert [m.tool_call_id for m in results] == [tc["id"] for tc in ai.tool_calls]
    assert len(messages) == 2 + len(batch)
    assert valid_history(messages) == messages

    # A repeat of a side-effecting call (same tool, same arguments) is its first one's answer,
    # never run (`keel.tools._duplicates`); a read runs again.
    first: dict[tuple[str, str], ToolMessage] = {}
    repeats = []
    for (name, args), message in zip(batch, results, strict=True):
        key = (name, json.dumps(args, sort_keys=True))
        primary = first.setdefault(key, message)
        repeat = name in ("act_write", "act_destructive") and primary is not message
        repeats.append(repeat)
        assert message.response_metadata.get("keel_duplicate_of") == (
            primary.tool_call_id if repeat else None
        )
        if repeat:
            assert message.text.endswith(f"That call's result:) {primary.text}")
    for (name, args), message, repeat in zip(batch, results, repeats, strict=True):
        keel_status = message.response_metadata["keel_status"]
        assert keel_status in STATUSES
        want_status, want_content = expected(name, args, driver)
        assert keel_status == want_status, (name, args, message.content)
        assert message.status == ("success" if want_status == "success" else "error")
        assert message.name == name
        if want_content is not None and not repeat:  # a repeat's text: checked above
            assert message.content == want_content

    ran = sum(
        expected(name, args, driver)[0] in ("success", "error", "timeout") and not repeat
        for (name, args), repeat in zip(batch, repeats, strict=True)
    )
    assert (final.get("usage") or {}).get("tool_calls", 0) == ran
