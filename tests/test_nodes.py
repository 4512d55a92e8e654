"""keel's nodes, one section each, run through `build_agent` or a tiny `StateGraph`.

Runs go through both drivers (`invoke` and `ainvoke`) where the node has two code paths.
Every run of an agent graph goes through `run()`, which also asserts the final state has an
`outcome`: a keel run never ends without one.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, get_args
from unittest.mock import ANY

import pytest
from langchain_core.messages import (
    AIMessage,
    AnyMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolCall,
    ToolMessage,
)
from langchain_core.tools import StructuredTool, ToolException
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, RetryPolicy, interrupt
from typing_extensions import TypedDict

from keel import Price, PriceTable, RunContext, UserError, build_agent, outcome, tool
from keel.approvals import Grants, approval_digest
from keel.evals import ScriptedChatModel, call
from keel.graphs.agent import route_after_verify
from keel.guards.gate import GateDecision
from keel.nodes import ToolStatus, call_model, execute_tools, respond, valid_history, verify
from keel.nodes.plan import PLAN_PROMPT, TOOLS_PROMPT
from keel.nodes.verify import JUDGE_PROMPT
from keel.outcome import MAX_DETAIL
from keel.state import AgentState
from keel.tools import RegisteredTool, ToolRegistry

CTX = RunContext(user_id="u1", tenant_id="acme", roles=("support",))
TOOL_STATUSES = set(get_args(ToolStatus))


@pytest.fixture(params=["invoke", "ainvoke"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def run(
    graph: Any,
    payload: Any,
    mode: str,
    *,
    thread: str | None = None,
    context: RunContext = CTX,
    **config: Any,
) -> dict[str, Any]:
    """Run a compiled keel graph to its end (or its interrupt) with the chosen driver."""
    if thread is not None:
        config.setdefault("configurable", {})["thread_id"] = thread
    if mode == "invoke":
        final = graph.invoke(payload, config or None, context=context)
    else:
        final = await graph.ainvoke(payload, config or None, context=context)
    assert final.get("outcome") is not None, "every keel run ends with an outcome"
    return dict(final)


def user(text: str) -> dict[str, Any]:
    return {"messages": [("user", text)]}


def tool_messages(final: Mapping[str, Any]) -> list[ToolMessage]:
    return [m for m in final["messages"] if isinstance(m, ToolMessage)]


def last_ai(final: Mapping[str, Any]) -> AIMessage:
    message = final["messages"][-1]
    assert isinstance(message, AIMessage)
    return message


def assert_valid(messages: Sequence[AnyMessage]) -> None:
    assert valid_history(messages) == list(messages)


@tool
def lookup(q: str) -> str:
    """Look something up."""
    return f"found {q}"


# ===========================================================================================
# call_model
# ===========================================================================================


async def test_call_model_accounts_tokens_and_dollars(mode: str) -> None:
    model = ScriptedChatModel(script=[call("lookup", q="A1"), "A1 shipped."])
    prices = PriceTable(
        {"scripted": Price(input_per_mtok=1, output_per_mtok=2)}, include_defaults=False
    )
    agent = build_agent(model, [lookup], prices=prices)
    final = await run(agent, user("where is A1?"), mode)

    answers = [m for m in final["messages"] if isinstance(m, AIMessage)]
    assert len(answers) == 2
    tokens_in = sum(m.usage_metadata["input_tokens"] for m in answers)  # type: ignore[index]
    tokens_out = sum(m.usage_metadata["output_tokens"] for m in answers)  # type: ignore[index]
    assert tokens_in > 0
    assert tokens_out > 0
    usage = dict(final["usage"])
    assert usage.pop("usd") == pytest.approx(tokens_in * 1e-6 + tokens_out * 2e-6)
    assert usage == {
        "input_tokens": tokens_in,
        "output_tokens": tokens_out,
        "model_calls": 2,
        "tool_calls": 1,
        "steps": 3,
    }
    assert final["outcome"] == {
        "status": "success",
        "terminated_reason": "completed",
        "detail": "final answer given",
    }


def test_call_model_unknown_price_counts_zero_and_warns_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = ScriptedChatModel(script=["a", "b"], model_name="my-local-model")
    agent = build_agent(model, prices=PriceTable({}, include_defaults=False))
    with caplog.at_level(logging.WARNING, logger="keel.pricing"):
        first = agent.invoke(user("hi"), context=CTX)
        agent.invoke(user("again"), context=CTX)
    assert first["outcome"] is not None
    assert first["usage"]["usd"] == 0.0
    warnings = [r.getMessage() for r in caplog.records if r.name == "keel.pricing"]
    assert warnings == [
        "keel has no price for model 'my-local-model': its calls are counted as $0. "
        "Add it with PriceTable({'my-local-model': Price(input_per_mtok=…, output_per_mtok=…)})."
    ]


FAST_RETRY = RetryPolicy(max_attempts=3, initial_interval=0.01, jitter=False)


async def test_call_model_retries_a_transient_error_then_ends_the_run(mode: str) -> None:
    attempts: list[int] = []

    def unreachable(messages: Sequence[BaseMessage]) -> str:
        attempts.append(len(messages))
        raise ConnectionError("provider unreachable")

    agent = build_agent(ScriptedChatModel(script=[unreachable]), model_retry=FAST_RETRY)
    final = await run(agent, user("hi"), mode)  # no exception escapes

    assert len(attempts) == 3
    detail = "model call failed after 3 attempt(s): ConnectionError: provider unreachable"
    assert final["outcome"] == {"status": "error", "terminated_reason": "error", "detail": detail}
    answer = last_ai(final)
    assert answer.content == f"I had to stop before finishing (error): {detail}."
    assert answer.response_metadata == {"keel_partial": True}
    assert "model_calls" not in final.get("usage", {}), "failed calls are not billed"


async def test_call_model_recovers_when_a_retry_succeeds(mode: str) -> None:
    attempts: list[int] = []

    def flaky(messages: Sequence[BaseMessage]) -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("blip")
        return "fine"

    agent = build_agent(ScriptedChatModel(script=[flaky]), model_retry=FAST_RETRY)
    final = await run(agent, user("hi"), mode)
    assert len(attempts) == 2
    assert final["outcome"]["terminated_reason"] == "completed"
    assert last_ai(final).content == "fine"
    assert final["usage"]["model_calls"] == 1


async def test_call_model_does_not_retry_a_programming_error(mode: str) -> None:
    attempts: list[int] = []

    def buggy(messages: Sequence[BaseMessage]) -> str:
        attempts.append(1)
        raise ValueError("bad request")

    agent = build_agent(ScriptedChatModel(script=[buggy]), model_retry=FAST_RETRY)
    final = await run(agent, user("hi"), mode)
    assert len(attempts) == 1
    assert final["outcome"]["detail"] == (
        "model call failed after 1 attempt(s): ValueError: bad request"
    )


async def test_before_model_check_stops_the_run_with_a_partial_answer(mode: str) -> None:
    contexts: list[RunContext] = []
    limit = outcome.stopped("budget_exceeded", "budget: one model call per run")

    def one_call(state: AgentState, context: RunContext) -> Any:
        contexts.append(context)
        return limit if (state.get("usage") or {}).get("model_calls", 0) >= 1 else None

    model = ScriptedChatModel(script=[call("lookup", q="A1"), "never said"])
    agent = build_agent(model, [lookup], before_model=[one_call])
    final = await run(agent, user("where is A1?"), mode)

    assert final["outcome"] == limit
    assert len(model.calls) == 1, "the stopped turn never reached the model"
    assert contexts == [CTX, CTX]
    answer = last_ai(final)
    assert answer.content == (
        "I had to stop before finishing (budget_exceeded): budget: one model call per run.\n"
        "What I found so far:\n"
        "- lookup: found A1"
    )
    assert answer.response_metadata == {"keel_partial": True}
    assert_valid(final["messages"])


async def test_before_model_check_can_stop_the_first_turn(mode: str) -> None:
    model = ScriptedChatModel(script=["never said"])
    denied = outcome.stopped("denied", "user u1 is suspended")
    agent = build_agent(model, before_model=[lambda state, context: denied])
    final = await run(agent, user("hi"), mode)
    assert final["outcome"] == denied
    assert model.calls == []
    assert last_ai(final).content == (
        "I had to stop before finishing (denied): user u1 is suspended."
    )


def suspended_lookup(state: Any, context: Any) -> Any:
    """A before_model check with a bug: its lookup fails."""
    raise KeyError("u1")


def no_profanity(answer: str, state: Any) -> str | None:
    """A verify check with a bug."""
    raise ValueError("word list missing")


@pytest.mark.parametrize(
    ("options", "detail"),
    [
        (
            {"before_model": [suspended_lookup]},
            "the before_model check suspended_lookup raised KeyError: 'u1'",
        ),
        (
            {"checks": [no_profanity]},
            "the check no_profanity raised ValueError: word list missing",
        ),
    ],
    ids=["before_model", "checks"],
)
async def test_your_check_that_raises_ends_the_run_with_an_error_outcome(
    options: dict[str, Any], detail: str, mode: str
) -> None:
    """Your own check is code too: when it raises, the run ends as `error`, naming the check,
    with the partial answer, not as the check's bare exception."""
    model = ScriptedChatModel(script=["An answer."])
    agent = build_agent(model, **options)
    final = await run(agent, user("hi"), mode)
    assert final["outcome"] == {"status": "error", "terminated_reason": "error", "detail": detail}
    assert last_ai(final).content.startswith("I had to stop before finishing (error)")


@pytest.mark.parametrize("recursion_limit", range(3, 16))
async def test_call_model_ends_cleanly_at_every_recursion_limit(
    recursion_limit: int, mode: str
) -> None:
    model = ScriptedChatModel(script=[call("lookup", q=str(i)) for i in range(50)])
    agent = build_agent(model, [lookup])
    final = await run(agent, user("loop forever"), mode, recursion_limit=recursion_limit)
    assert final["outcome"] == outcome.step_limit()
    assert final["outcome"]["terminated_reason"] == "budget_exceeded"
    assert last_ai(final).content.startswith(
        "I had to stop before finishing (budget_exceeded): step limit: the run reached "
        "LangGraph's recursion_limit;"
    )
    assert_valid(final["messages"])


@pytest.mark.parametrize("recursion_limit", [4, 5, 9])
async def test_verification_loop_ends_cleanly_at_the_recursion_limit(
    recursion_limit: int, mode: str
) -> None:
    model = ScriptedChatModel(script=[f"draft {i}" for i in range(50)])
    agent = build_agent(model, checks=[lambda answer, state: "never good"], max_revisions=100)
    final = await run(agent, user("hi"), mode, recursion_limit=recursion_limit)
    assert final["outcome"] == outcome.step_limit()


async def test_planning_agent_ends_cleanly_at_recursion_limit_3() -> None:
    model = ScriptedChatModel(
        script=[call("lookup", q=str(i)) for i in range(10)],
        structured={"Plan": {"steps": ["look up"]}},
    )
    agent = build_agent(model, [lookup], plan=True)
    final = await run(agent, user("hi"), "ainvoke", recursion_limit=3)
    assert final["outcome"] == outcome.step_limit()


def test_call_model_sends_the_system_prompt_first() -> None:
    model = ScriptedChatModel(script=["hello"])
    agent = build_agent(model, system_prompt="You are terse.")
    final = agent.invoke(user("hi"), context=CTX)
    assert final["outcome"]["status"] == "success"
    assert model.calls[0] == [
        SystemMessage(content="You are terse."),
        HumanMessage(content="hi", id=final["messages"][0].id),
    ]


def test_call_model_sends_at_most_one_system_message() -> None:
    model = ScriptedChatModel(script=["hello"])
    agent = build_agent(model, system_prompt="You are terse.")
    final = agent.invoke({"messages": [("system", "Answer in French."), ("user", "hi")]})
    assert final["outcome"]["status"] == "success"
    systems = [m for m in model.calls[0] if isinstance(m, SystemMessage)]
    assert len(systems) == 1
    assert isinstance(model.calls[0][0], SystemMessage)


# ===========================================================================================
# execute_tools
# ===========================================================================================


GRANTS = Grants.from_secret("test" * 4)


def sealed(approvals: dict[str, Any]) -> dict[str, Any]:
    """Approvals as keel's own nodes would have sealed them (thread-less run of `CTX`)."""
    run = GRANTS.for_run("", CTX)
    return {key: run.seal(key, approval) for key, approval in approvals.items()}


def approved_a1() -> dict[str, Any]:
    """A sealed approval of deleting order A1 (call c0)."""
    record = {"digest": DIGEST_A1, "tool": "delete_order", "tool_call_id": "c0"}
    return sealed({DIGEST_A1: {**record, "decision": "approved"}})


def tools_graph(*tools: Any, gate: Any = None, policy_version: str = "1") -> Any:
    """A graph of just `execute_tools`, to feed it a fabricated state."""
    kwargs: dict[str, Any] = {"policy_version": policy_version, "grants": GRANTS}
    if gate is not None:
        kwargs["gate"] = gate
    graph = StateGraph(AgentState, context_schema=RunContext)
    graph.add_node("execute_tools", execute_tools(ToolRegistry(tools), **kwargs))
    graph.add_edge(START, "execute_tools")
    graph.add_edge("execute_tools", END)
    return graph.compile()


def calling(*calls: tuple[str, dict[str, Any]]) -> AIMessage:
    return AIMessage(
        content="",
        tool_calls=[ToolCall(name=n, args=a, id=f"c{i}") for i, (n, a) in enumerate(calls)],
    )


async def run_tools(
    graph: Any, mode: str, *calls: tuple[str, dict[str, Any]], **state: Any
) -> tuple[list[ToolMessage], dict[str, Any]]:
    payload = {"messages": [HumanMessage(content="go"), calling(*calls)], **state}
    if mode == "invoke":
        final = graph.invoke(payload, context=CTX)
    else:
        final = await graph.ainvoke(payload, context=CTX)
    results = tool_messages(final)
    assert [m.tool_call_id for m in results] == [f"c{i}" for i in range(len(calls))]
    assert all(m.response_metadata["keel_status"] in TOOL_STATUSES for m in results)
    assert_valid(final["messages"])
    return results, final


def status(message: ToolMessage) -> str:
    return str(message.response_metadata["keel_status"])


async def test_unknown_tool_is_answered_with_the_valid_names(mode: str) -> None:
    @tool
    def other(x: str) -> str:
        """Other."""
        return x

    (result,), final = await run_tools(tools_graph(lookup, other), mode, ("lokup", {"q": "x"}))
    assert result.content == "Error: 'lokup' is not a valid tool, try one of ['lookup', 'other']."
    assert status(result) == "unknown_tool"
    assert result.status == "error"
    assert result.name == "lokup"
    assert final["usage"].get("tool_calls") == 0, "nothing ran"


async def test_unknown_tool_when_the_agent_has_no_tools(mode: str) -> None:
    (result,), _ = await run_tools(tools_graph(), mode, ("lookup", {"q": "x"}))
    assert result.content == (
        "Error: 'lookup' is not a valid tool, try one of [none: this agent has no tools]."
    )


async def test_invalid_arguments_never_execute_the_tool(mode: str) -> None:
    ran: list[tuple[int, int]] = []

    @tool
    def add(a: int, b: int) -> int:
        """Add two numbers."""
        ran.append((a, b))
        return a + b

    results, final = await run_tools(
        tools_graph(add),
        mode,
        ("add", {"a": 1}),
        ("add", {"a": "x", "b": 2}),
        ("add", {"a": 1, "b": 2}),
    )
    assert [m.content for m in results] == [
        "Error: invalid arguments for add: b: Field required. "
        "Fix the arguments and call the tool again.",
        "Error: invalid arguments for add: a: Input should be a valid integer, unable to parse "
        "string as an integer. Fix the arguments and call the tool again.",
        "3",
    ]
    assert [status(m) for m in results] == ["invalid_args", "invalid_args", "success"]
    assert ran == [(1, 2)]
    assert final["usage"] == {"tool_calls": 1, "steps": 1}


SLOW_CALL = 1.0
"""How long the timed-out tools below would run: the run must answer before they could end
(their timeout is 0.05 s; the wide gap is slack for a loaded CI machine)."""


async def test_timed_out_call_is_cancelled_under_ainvoke() -> None:
    finished = threading.Event()

    @tool(timeout=0.05)
    async def slow(q: str) -> str:
        """Slow."""
        await asyncio.sleep(SLOW_CALL)
        finished.set()
        return "late"

    start = time.perf_counter()
    (result,), _ = await run_tools(tools_graph(slow), "ainvoke", ("slow", {"q": "x"}))
    assert time.perf_counter() - start < SLOW_CALL, "the run waited for the timed-out call"
    assert result.content == "Error: slow did not finish within 0.05 s and was cancelled."
    assert status(result) == "timeout"
    await asyncio.sleep(start + SLOW_CALL + 0.3 - time.perf_counter())  # past its end
    assert not finished.is_set(), "the cancelled call must not go on running"


def test_timed_out_sync_call_is_answered_but_its_thread_is_abandoned() -> None:
    # Pinned, documented limitation: Python cannot cancel a thread, so under `invoke` the
    # run goes on without the call, and the call finishes in the background.
    finished = threading.Event()

    @tool(timeout=0.05)
    def slow(q: str) -> str:
        """Slow."""
        time.sleep(SLOW_CALL)
        finished.set()
        return "late"

    graph = tools_graph(slow)
    start = time.perf_counter()
    final = graph.invoke({"messages": [HumanMessage(content="go"), calling(("slow", {"q": "x"}))]})
    finished_then = finished.is_set()  # before the clock is read: unfinished if the run beat it
    assert time.perf_counter() - start < SLOW_CALL, "the run does not wait for the thread"
    (result,) = tool_messages(final)
    assert result.content == (
        "Error: slow did not finish within 0.05 s; its result will be ignored "
        "(under a sync invoke it may still finish in the background)."
    )
    assert status(result) == "timeout"
    assert not finished_then
    assert finished.wait(30), "the abandoned thread still runs to its end"


async def test_calls_of_one_turn_run_concurrently_under_ainvoke() -> None:
    """Each call waits until all three have started: run one after another, the first would
    wait alone (and time out, answering with an error instead of its argument). Before, three
    0.15 s sleeps had to end within 0.4 s, which a loaded CI machine could miss."""
    started: set[str] = set()  # a set: a retried call does not count twice
    all_started = asyncio.Event()

    @tool
    async def wait(q: str) -> str:
        """Wait for the others."""
        started.add(q)
        if len(started) == 3:
            all_started.set()
        await asyncio.wait_for(all_started.wait(), 30)
        return q

    results, _ = await run_tools(
        tools_graph(wait),
        "ainvoke",
        ("wait", {"q": "a"}),
        ("wait", {"q": "b"}),
        ("wait", {"q": "c"}),
    )
    assert [m.content for m in results] == ["a", "b", "c"]


async def test_read_only_tool_is_retried_until_it_succeeds(mode: str) -> None:
    attempts: list[str] = []

    @tool(retries=2, retry_wait=0)
    def flaky(q: str) -> str:
        """Flaky read."""
        attempts.append(q)
        if len(attempts) < 3:
            raise RuntimeError(f"blip {len(attempts)}")
        return "finally"

    (result,), final = await run_tools(tools_graph(flaky), mode, ("flaky", {"q": "x"}))
    assert attempts == ["x", "x", "x"]
    assert result.content == "finally"
    assert status(result) == "success"
    assert final["usage"] == {"tool_calls": 1, "steps": 1}


async def test_read_only_tool_gives_up_after_its_attempts(mode: str) -> None:
    attempts: list[str] = []

    @tool(retries=2, retry_wait=0)
    def broken(q: str) -> str:
        """Always fails."""
        attempts.append(q)
        raise RuntimeError("boom")

    (result,), _ = await run_tools(tools_graph(broken), mode, ("broken", {"q": "x"}))
    assert len(attempts) == 3
    assert result.content == "Error: broken failed after 3 attempts: RuntimeError: boom"
    assert status(result) == "error"
    assert result.status == "error"


@pytest.mark.parametrize("risk", ["write", "destructive"])
async def test_side_effecting_tool_runs_once(mode: str, risk: str) -> None:
    attempts: list[str] = []

    @tool(risk=risk, retries=2, retry_wait=0, requires_approval=False)  # type: ignore[call-overload]
    def charge(q: str) -> str:
        """Charge a card."""
        attempts.append(q)
        raise RuntimeError("gateway reset")

    (result,), _ = await run_tools(tools_graph(charge), mode, ("charge", {"q": "x"}))
    assert attempts == ["x"]
    assert result.content == "Error: charge failed: RuntimeError: gateway reset"
    assert status(result) == "error"


async def test_tool_exception_is_not_retried(mode: str) -> None:
    attempts: list[str] = []

    @tool(retries=2, retry_wait=0)
    def find(q: str) -> str:
        """Find."""
        attempts.append(q)
        raise ToolException(f"no order {q}")

    (result,), _ = await run_tools(tools_graph(find), mode, ("find", {"q": "Z9"}))
    assert attempts == ["Z9"]
    assert result.content == "Error: find failed: ToolException: no order Z9"
    assert status(result) == "error"


async def test_denied_call_never_runs_and_says_why(mode: str) -> None:
    ran: list[str] = []

    @tool
    def export(q: str) -> str:
        """Export data."""
        ran.append(q)
        return q

    def deny_exports(
        entry: RegisteredTool, args: Mapping[str, Any], context: RunContext
    ) -> GateDecision:
        return GateDecision.deny("exports are off for support", rule="no-exports")

    (result,), _ = await run_tools(
        tools_graph(export, gate=deny_exports), mode, ("export", {"q": "x"})
    )
    assert result.content == "Not permitted: exports are off for support (rule: no-exports)."
    assert status(result) == "denied"
    assert ran == []


async def test_every_tool_message_has_a_keel_status(mode: str) -> None:
    @tool(retries=0)
    def boom(q: str) -> str:
        """Boom."""
        raise RuntimeError("x")

    @tool(risk="destructive")
    def drop(q: str) -> str:
        """Drop."""
        return q

    results, _ = await run_tools(
        tools_graph(lookup, boom, drop),
        mode,
        ("lookup", {"q": "a"}),
        ("nope", {}),
        ("lookup", {}),
        ("boom", {"q": "b"}),
        ("drop", {"q": "c"}),
    )
    assert [status(m) for m in results] == [
        "success",
        "unknown_tool",
        "invalid_args",
        "error",
        "needs_approval",
    ]


@pytest.mark.parametrize("limit", [None, 5.0])
async def test_a_timeout_error_raised_by_the_tool_is_an_ordinary_error(
    mode: str, limit: float | None
) -> None:
    @tool(timeout=limit, retries=0)
    def fetch(url: str) -> str:
        """Fetch a URL."""
        raise TimeoutError("socket timed out")

    (result,), _ = await run_tools(tools_graph(fetch), mode, ("fetch", {"url": "x"}))
    assert result.content == "Error: fetch failed: TimeoutError: socket timed out"
    assert status(result) == "error"


async def test_a_tool_that_handles_its_own_error_is_reported_as_an_error(mode: str) -> None:
    def find(q: str) -> str:
        raise ToolException(f"no order {q}")

    handled = StructuredTool.from_function(
        find, name="find", description="Find an order.", handle_tool_error=True
    )
    (result,), _ = await run_tools(tools_graph(handled), mode, ("find", {"q": "Z9"}))
    assert result.status == "error"
    assert status(result) == "error"


def test_hung_sync_calls_do_not_starve_later_calls() -> None:
    release = threading.Event()
    charged: list[int] = []

    @tool(timeout=0.02, retries=0)
    def hang(n: int) -> str:
        """Hang until released."""
        release.wait(5)
        return "late"

    @tool(risk="write", timeout=0.2)
    def charge(n: int) -> str:
        """Charge a card."""
        charged.append(n)
        return "charged"

    graph = tools_graph(hang, charge)
    try:
        hung = [("hang", {"n": i}) for i in range(32)]
        final = graph.invoke(
            {"messages": [HumanMessage(content="go"), calling(*hung, ("charge", {"n": 1}))]}
        )
        result = tool_messages(final)[-1]
        assert status(result) == "success", result.content
    finally:
        release.set()


# ===========================================================================================
# human_review and approvals
# ===========================================================================================


class Shop:
    def __init__(self) -> None:
        self.deleted: list[str] = []

    def tools(self) -> list[Any]:
        @tool(risk="destructive")
        def delete_order(order_id: str) -> str:
            """Delete an order for good."""
            self.deleted.append(order_id)
            return f"deleted {order_id}"

        return [delete_order, lookup]


DIGEST_A1 = approval_digest("delete_order", {"order_id": "A1"}, "default@1", version="1", read=True)


def review_agent(shop: Shop, *script: Any) -> Any:
    model = ScriptedChatModel(script=[call("delete_order", order_id="A1"), *(script or ["Done."])])
    return build_agent(model, shop.tools(), checkpointer=InMemorySaver())


async def start_review(mode: str, *script: Any) -> tuple[Shop, Any, dict[str, Any]]:
    shop = Shop()
    agent = review_agent(shop, *script)
    first = await run(agent, user("delete order A1"), mode, thread="t1")
    assert shop.deleted == [], "nothing runs before a human decides"
    return shop, agent, first


async def test_review_interrupt_payload(mode: str) -> None:
    _, agent, first = await start_review(mode)
    assert first["outcome"] == {
        "status": "interrupted",
        "terminated_reason": "awaiting_approval",
        "detail": "awaiting approval for delete_order",
    }
    (interrupt,) = first["__interrupt__"]
    call_id = first["messages"][1].tool_calls[0]["id"]
    assert interrupt.value == [
        {
            "action_request": {"action": "delete_order", "args": {"order_id": "A1"}},
            "config": {
                "allow_accept": True,
                "allow_edit": True,
                "allow_respond": True,
                "allow_ignore": True,
            },
            "description": "delete_order is a destructive tool and requires approval "
            "(rule: ToolSpec(requires_approval=True) on delete_order)",
            "tool_call_id": call_id,
            "digest": DIGEST_A1,
        }
    ]
    assert agent.get_state({"configurable": {"thread_id": "t1"}}).next == ("human_review",)


async def test_approve_runs_the_tool_exactly_once(mode: str) -> None:
    shop, agent, first = await start_review(mode)
    call_id = first["messages"][1].tool_calls[0]["id"]
    final = await run(
        agent, Command(resume={"type": "approve", "reviewer": "alice"}), mode, thread="t1"
    )
    assert shop.deleted == ["A1"]
    assert final["outcome"]["terminated_reason"] == "completed"
    assert final["approvals"] == {
        f"{DIGEST_A1}/{call_id}": {  # an approval is kept per call
            "digest": DIGEST_A1,
            "tool": "delete_order",
            "tool_call_id": call_id,
            "decision": "approved",
            "reviewer": "alice",
            "seal": ANY,  # keel's HMAC (keel.approvals.Grants)
        }
    }
    (result,) = tool_messages(final)
    assert (result.content, status(result)) == ("deleted A1", "success")
    assert last_ai(final).content == "Done."
    assert_valid(final["messages"])


async def test_edit_runs_the_edited_call_and_rewrites_the_request(mode: str) -> None:
    shop, agent, first = await start_review(mode)
    call_id = first["messages"][1].tool_calls[0]["id"]
    final = await run(
        agent, Command(resume={"type": "edit", "args": {"order_id": "B2"}}), mode, thread="t1"
    )
    assert shop.deleted == ["B2"]
    assert final["outcome"]["terminated_reason"] == "completed"
    request = final["messages"][1]
    assert isinstance(request, AIMessage)
    assert request.tool_calls == [
        {"name": "delete_order", "args": {"order_id": "B2"}, "id": call_id, "type": "tool_call"}
    ]
    assert len([m for m in final["messages"] if isinstance(m, AIMessage)]) == 2, (
        "replaced, not added"
    )
    digest_b2 = approval_digest(
        "delete_order", {"order_id": "B2"}, "default@1", version="1", read=True
    )
    assert list(final["approvals"]) == [f"{digest_b2}/{call_id}"]
    assert_valid(final["messages"])


async def test_reject_never_runs_the_tool_and_stops_the_run(mode: str) -> None:
    shop, agent, _ = await start_review(mode)
    final = await run(
        agent, Command(resume={"type": "reject", "message": "wrong order"}), mode, thread="t1"
    )
    assert shop.deleted == []
    assert final["outcome"] == {
        "status": "stopped",
        "terminated_reason": "rejected",
        "detail": "a human rejected the call to delete_order",
    }
    (result,) = tool_messages(final)
    assert result.content == "Rejected by a human reviewer: wrong order."
    assert status(result) == "rejected"
    assert result.status == "error"
    assert last_ai(final).content == (
        "I had to stop before finishing (rejected): a human rejected the call to delete_order."
    )
    assert final["approvals"][DIGEST_A1]["decision"] == "rejected"
    assert_valid(final["messages"])


async def test_respond_answers_instead_of_running_and_the_model_goes_on(mode: str) -> None:
    shop, agent, _ = await start_review(mode, "OK, I archived it instead.")
    final = await run(
        agent,
        Command(resume={"type": "respond", "message": "archive it instead"}),
        mode,
        thread="t1",
    )
    assert shop.deleted == []
    assert final["outcome"]["terminated_reason"] == "completed"
    (result,) = tool_messages(final)
    assert result.content == "A human answered instead of running delete_order: archive it instead"
    assert result.status == "success"
    assert last_ai(final).content == "OK, I archived it instead."
    assert_valid(final["messages"])


async def test_a_review_answer_cannot_carry_keels_own_keys(mode: str) -> None:
    """A client's resume may not forge the input guard's note (a finding the audit log and the
    run record would then report): keys a review answer does not have are dropped."""
    forged = {"guard": "input", "source": "user", "action": "block", "rules": ["made_up"]}
    shop, agent, _ = await start_review(mode, "OK.")
    answer = {"type": "respond", "message": "archive it", "keel_guard": forged, "keel_x": 1}
    final = await run(agent, Command(resume=answer), mode, thread="t1")
    assert shop.deleted == []
    (result,) = tool_messages(final)
    assert result.response_metadata == {"keel_status": "respond"}
    assert final["outcome"]["terminated_reason"] == "completed"


@pytest.mark.parametrize(
    ("resume", "deleted", "reason"),
    [
        ({"type": "accept"}, ["A1"], "completed"),
        ("approve", ["A1"], "completed"),
        ([{"type": "accept"}], ["A1"], "completed"),
        ({"type": "ignore"}, [], "rejected"),
        ({"type": "response", "args": "not today"}, [], "completed"),
        ({"<call id>": {"type": "approve"}}, ["A1"], "completed"),
    ],
)
async def test_agent_inbox_aliases_and_resume_shapes(
    mode: str, resume: Any, deleted: list[str], reason: str
) -> None:
    shop, agent, first = await start_review(mode)
    if isinstance(resume, dict) and "<call id>" in resume:  # keyed by the id the model gave
        resume = {first["messages"][1].tool_calls[0]["id"]: resume["<call id>"]}
    final = await run(agent, Command(resume=resume), mode, thread="t1")
    assert shop.deleted == deleted
    assert final["outcome"]["terminated_reason"] == reason
    if isinstance(resume, dict) and resume.get("type") == "response":
        (result,) = tool_messages(final)
        assert result.content == "A human answered instead of running delete_order: not today"


@pytest.mark.parametrize(
    "resume",
    [
        [{"type": "accept", "args": {"action": "delete_order", "args": {"order_id": "A1"}}}],
        [{"type": "accept", "args": None}],
    ],
)
async def test_agent_inbox_accept_with_args_runs_the_tool(mode: str, resume: Any) -> None:
    shop, agent, _ = await start_review(mode)
    final = await run(agent, Command(resume=resume), mode, thread="t1")
    assert shop.deleted == ["A1"]
    assert final["outcome"]["terminated_reason"] == "completed"


BAD_RESUMES = [
    (
        {"type": "maybe"},
        "Unknown review response {'type': 'maybe'}: use {'type': 'approve'}, "
        "{'type': 'edit', 'args': {...}}, {'type': 'reject', 'message': '...'} or "
        "{'type': 'respond', 'message': '...'}.",
    ),
    (
        [{"type": "approve"}, {"type": "approve"}],
        "human_review is waiting on 1 call(s) (delete_order) and got "
        "[{'type': 'approve'}, {'type': 'approve'}]. Resume with "
        "Command(resume=[{'type': 'approve'}, ...]) — one response per call, a dict keyed by "
        "tool_call_id, or one response for one call.",
    ),
    (
        {"type": "edit"},
        "An 'edit' response needs the new arguments: {'type': 'edit', 'args': {...}}.",
    ),
    (
        {"type": "respond"},
        "A 'respond' response needs text: {'type': 'respond', 'message': '...'}.",
    ),
]


@pytest.mark.parametrize(("bad", "message"), BAD_RESUMES)
async def test_bad_resume_is_a_user_error_and_loses_nothing(
    mode: str, bad: Any, message: str
) -> None:
    shop, agent, first = await start_review(mode)
    with pytest.raises(UserError) as excinfo:
        await run(agent, Command(resume=bad), mode, thread="t1")
    # LangGraph adds a note naming the task; the message itself is keel's.
    assert str(excinfo.value) == message
    state = agent.get_state({"configurable": {"thread_id": "t1"}})
    assert shop.deleted == []
    assert state.next == ("human_review",)
    assert state.values["messages"] == first["messages"]
    assert state.values["outcome"] == first["outcome"]
    assert state.values.get("approvals", {}) == {}


@pytest.mark.parametrize("bad", [bad for bad, _ in BAD_RESUMES[:2]])
async def test_thread_is_resumable_after_a_bad_resume(mode: str, bad: Any) -> None:
    shop, agent, _ = await start_review(mode)
    with pytest.raises(UserError):
        await run(agent, Command(resume=bad), mode, thread="t1")
    final = await run(agent, Command(resume={"type": "approve"}), mode, thread="t1")
    assert shop.deleted == ["A1"]
    assert final["outcome"]["terminated_reason"] == "completed"


class _Answer(TypedDict):
    answer: str


def test_langgraph_replays_a_consumed_resume_after_the_node_raised() -> None:
    """Pins the LangGraph behaviour that human_review works around (langgraph 1.2).

    Once `interrupt()` has returned a resume value, LangGraph stores it with the task, even
    when the node raises afterwards; a later `Command(resume=...)` does not replace it. A node
    must therefore reject a bad answer *before* `interrupt()` consumes it.
    """

    def ask(state: _Answer) -> dict[str, str]:
        answer = interrupt("yes or no?")
        if answer not in ("yes", "no"):
            raise ValueError(f"bad answer {answer!r}")
        return {"answer": answer}

    graph = (
        StateGraph(_Answer)
        .add_node("ask", ask)
        .add_edge(START, "ask")
        .add_edge("ask", END)
        .compile(checkpointer=InMemorySaver())
    )
    config: Any = {"configurable": {"thread_id": "t"}}
    graph.invoke({"answer": ""}, config)
    with pytest.raises(ValueError, match="bad answer 'maybe'"):
        graph.invoke(Command(resume="maybe"), config)
    with pytest.raises(ValueError, match="bad answer 'maybe'"):
        graph.invoke(Command(resume="yes"), config)  # the stale answer wins


async def test_an_approval_binds_to_the_exact_arguments(mode: str) -> None:
    shop = Shop()
    graph = tools_graph(*shop.tools())
    approved = approved_a1()
    (result,), _ = await run_tools(
        graph, mode, ("delete_order", {"order_id": "B2"}), approvals=approved
    )
    assert shop.deleted == []
    assert status(result) == "needs_approval"
    assert result.content == (
        "delete_order needs a human's approval for these exact arguments and has none; "
        "it was not run."
    )
    (result,), _ = await run_tools(
        graph, mode, ("delete_order", {"order_id": "A1"}), approvals=approved
    )
    assert status(result) == "success"
    assert shop.deleted == ["A1"]


async def test_an_approval_binds_to_the_policy(mode: str) -> None:
    shop = Shop()
    approved = approved_a1()
    newer_policy = tools_graph(*shop.tools(), policy_version="2")
    (result,), _ = await run_tools(
        newer_policy, mode, ("delete_order", {"order_id": "A1"}), approvals=approved
    )
    assert status(result) == "needs_approval"
    assert shop.deleted == []


async def test_a_rejection_is_final(mode: str) -> None:
    shop = Shop()
    rejected = {
        DIGEST_A1: {
            "digest": DIGEST_A1,
            "tool": "delete_order",
            "tool_call_id": "c0",
            "decision": "rejected",
        }
    }
    (result,), _ = await run_tools(
        tools_graph(*shop.tools()), mode, ("delete_order", {"order_id": "A1"}), approvals=rejected
    )
    assert status(result) == "rejected"
    assert result.content == "Rejected by a human reviewer; delete_order was not run."
    assert shop.deleted == []


def _named(calls: Sequence[tuple[str, dict[str, Any], str]]) -> AIMessage:
    """A turn whose tool calls carry the ids the model chose, not fresh ones."""
    return AIMessage(content="", tool_calls=[ToolCall(name=n, args=a, id=i) for n, a, i in calls])


async def test_two_calls_under_one_id_are_reviewed_and_approved_apart(mode: str) -> None:
    """A model names both deletions of a turn `c1`: an approval of `c1` must not cover the other.

    Keyed by the shared id, one "approve" approved both (and B2 ran, its arguments never
    approved). keel renames the second call before anything sees the turn, so the reviewer is
    asked about two calls, and a resume that answers only `c1` is refused.
    """
    shop = Shop()
    twice = _named(
        [("delete_order", {"order_id": "A1"}, "c1"), ("delete_order", {"order_id": "B2"}, "c1")]
    )
    model = ScriptedChatModel(script=[twice, "Done."], fresh_ids=False)  # one id, on purpose
    agent = build_agent(model, shop.tools(), checkpointer=InMemorySaver())
    first = await run(agent, user("delete A1 and B2"), mode, thread="t1")
    requests = first["__interrupt__"][0].value
    assert [(r["tool_call_id"], r["action_request"]["args"]) for r in requests] == [
        ("c1", {"order_id": "A1"}),
        ("c1_2", {"order_id": "B2"}),
    ]
    with pytest.raises(UserError, match="has no answer for 'c1_2'"):
        await run(agent, Command(resume={"c1": {"type": "approve"}}), mode, thread="t1")
    assert shop.deleted == []
    answers = {"c1": {"type": "approve"}, "c1_2": {"type": "respond", "message": "keep B2"}}
    final = await run(agent, Command(resume=answers), mode, thread="t1")
    assert shop.deleted == ["A1"]
    assert final["outcome"]["terminated_reason"] == "completed"
    results = tool_messages(final)
    assert [(m.tool_call_id, status(m)) for m in results] == [
        ("c1", "success"),
        ("c1_2", "respond"),
    ]
    assert_valid(final["messages"])


async def test_an_id_reused_in_a_later_turn_is_reviewed_again(mode: str) -> None:
    """A model names a later call like one a human approved: the approval stays with the first.

    An approval is kept under `digest/tool_call_id`; the same id and arguments in a later turn
    found it and ran without a review. The later call is renamed, and asked about again.
    """
    shop = Shop()
    again = _named([("delete_order", {"order_id": "A1"}, "c1")])
    model = ScriptedChatModel(script=[again, again, "Done."], fresh_ids=False)  # reused id
    agent = build_agent(model, shop.tools(), checkpointer=InMemorySaver())
    await run(agent, user("delete A1"), mode, thread="t1")
    second = await run(agent, Command(resume={"type": "approve"}), mode, thread="t1")
    assert shop.deleted == ["A1"]
    assert second["outcome"]["terminated_reason"] == "awaiting_approval"
    (request,) = second["__interrupt__"][0].value
    assert (request["tool_call_id"], request["action_request"]["args"]) == (
        "c1_2",
        {"order_id": "A1"},
    )
    final = await run(agent, Command(resume={"type": "reject"}), mode, thread="t1")
    assert shop.deleted == ["A1"]
    assert [m.tool_call_id for m in tool_messages(final)] == ["c1", "c1_2"]


# ===========================================================================================
# respond
# ===========================================================================================


async def test_respond_answers_pending_calls_so_history_stays_valid(mode: str) -> None:
    shop = Shop()
    two = AIMessage(
        content="",
        tool_calls=[
            ToolCall(name="delete_order", args={"order_id": "A1"}, id="d1"),
            ToolCall(name="delete_order", args={"order_id": "A2"}, id="d2"),
        ],
    )
    model = ScriptedChatModel(script=[two], fresh_ids=False)  # answers keyed by the script's ids
    agent = build_agent(model, shop.tools(), checkpointer=InMemorySaver())
    first = await run(agent, user("delete both"), mode, thread="t1")
    assert len(first["__interrupt__"][0].value) == 2
    final = await run(
        agent,
        Command(resume={"d1": {"type": "reject"}, "d2": {"type": "approve"}}),
        mode,
        thread="t1",
    )
    assert shop.deleted == []
    assert final["outcome"]["terminated_reason"] == "rejected"
    rejected, not_run = tool_messages(final)
    assert (rejected.tool_call_id, status(rejected)) == ("d1", "rejected")
    assert rejected.content == "Rejected by a human reviewer."
    assert not_run.tool_call_id == "d2"
    assert not_run.content == "Not run: the run stopped (rejected)."
    assert not_run.response_metadata == {"keel_status": "not_run"}
    assert not_run.status == "error"
    assert last_ai(final).response_metadata == {"keel_partial": True}
    assert_valid(final["messages"])


def _batch(*calls: tuple[str, dict[str, Any]]) -> AIMessage:
    """A parallel batch with fresh tool-call ids (a sloppy model never reuses them)."""
    tag = uuid.uuid4().hex[:8]
    return AIMessage(
        content="",
        tool_calls=[ToolCall(name=n, args=a, id=f"{tag}-{i}") for i, (n, a) in enumerate(calls)],
    )


@pytest.mark.parametrize("answer", ["reject", "respond"])
async def test_a_reviewed_call_before_an_allowed_one_keeps_the_results_in_call_order(
    mode: str, answer: str
) -> None:
    """human_review answers the later call first; the earlier call's result still comes first."""
    shop = Shop()
    batch = _batch(
        ("lookup", {"q": "A1"}), ("delete_order", {"order_id": "A1"}), ("lookup", {"q": "B"})
    )
    model = ScriptedChatModel(
        script=[batch, "done"], fresh_ids=False
    )  # answers keyed by the script's ids
    agent = build_agent(model, shop.tools(), checkpointer=InMemorySaver())
    await run(agent, user("look and delete"), mode, thread="t1")
    resume = {"type": answer, "message": "no"}
    final = await run(agent, Command(resume=resume), mode, thread="t1")
    ids = [m.tool_call_id for m in tool_messages(final)]
    assert ids == [tc["id"] for tc in batch.tool_calls]
    statuses = [status(m) for m in tool_messages(final)]
    if answer == "reject":
        assert statuses == ["not_run", "rejected", "not_run"]
    else:
        assert statuses == ["success", "respond", "success"]
        assert final["outcome"]["terminated_reason"] == "completed"
    assert shop.deleted == []
    assert_valid(final["messages"])


async def test_respond_without_a_stop_reports_the_step_limit(mode: str) -> None:
    graph = StateGraph(AgentState, context_schema=RunContext)
    graph.add_node("respond", respond())
    graph.add_edge(START, "respond")
    graph.add_edge("respond", END)
    compiled = graph.compile()
    payload = {
        "messages": [HumanMessage(content="hi"), calling(("lookup", {"q": "x"}))],
        "outcome": None,
    }
    final = await run(compiled, payload, mode)
    assert final["outcome"] == outcome.step_limit()
    (pending,) = tool_messages(final)
    assert pending.content == "Not run: the run stopped (budget_exceeded)."
    assert_valid(final["messages"])


async def test_every_keel_status_a_run_writes_is_a_tool_status(mode: str) -> None:
    shop = Shop()
    two = AIMessage(
        content="",
        tool_calls=[
            ToolCall(name="delete_order", args={"order_id": "A1"}, id="d1"),
            ToolCall(name="delete_order", args={"order_id": "A2"}, id="d2"),
        ],
    )
    agent = build_agent(
        ScriptedChatModel(script=[two, "ok"]), shop.tools(), checkpointer=InMemorySaver()
    )
    written: set[str] = set()
    for thread, resume in [
        ("respond", [{"type": "respond", "message": "no"}, {"type": "respond", "message": "no"}]),
        ("not_run", [{"type": "reject"}, {"type": "approve"}]),
    ]:
        await run(agent, user("delete both"), mode, thread=thread)
        final = await run(agent, Command(resume=resume), mode, thread=thread)
        written |= {status(m) for m in tool_messages(final)}
    assert written == {"respond", "rejected", "not_run"}
    assert written <= TOOL_STATUSES


# ===========================================================================================
# verify
# ===========================================================================================


def no_drafts(answer: str, state: AgentState) -> str | None:
    return "it is still a draft." if "draft" in answer else None


async def test_failed_check_sends_feedback_and_the_revision_passes(mode: str) -> None:
    model = ScriptedChatModel(script=["a draft answer", "the final answer"])
    agent = build_agent(model, checks=[no_drafts])
    final = await run(agent, user("hi"), mode)

    assert final["outcome"] == {
        "status": "success",
        "terminated_reason": "completed",
        "detail": "answer verified",
    }
    assert final["verdicts"] == [
        {"passed": False, "reason": "it is still a draft.", "source": "no_drafts"},
        {"passed": True, "reason": "all checks passed", "source": "rules"},
    ]
    assert final["revisions"] == 1
    feedback = model.calls[1][-1]
    assert isinstance(feedback, HumanMessage)
    assert feedback.content == (
        "Your answer did not pass verification: it is still a draft. Revise your answer."
    )
    assert feedback.additional_kwargs == {"keel_verification": True}
    assert last_ai(final).content == "the final answer"


async def test_check_failing_every_time_ends_as_verification_failed(mode: str) -> None:
    model = ScriptedChatModel(script=["draft 1", "draft 2", "draft 3", "never"])
    agent = build_agent(model, checks=[no_drafts], max_revisions=2)
    final = await run(agent, user("hi"), mode)

    assert len(model.calls) == 3
    assert final["outcome"] == {
        "status": "stopped",
        "terminated_reason": "verification_failed",
        "detail": "it is still a draft.",
    }
    assert [v["passed"] for v in final["verdicts"]] == [False, False, False]
    assert last_ai(final).content == (
        "I had to stop before finishing (verification_failed): it is still a draft..\n"
        "My last answer so far: draft 3"
    )


async def test_a_judges_endless_reason_is_cut_in_the_outcome_and_the_partial_answer(
    mode: str,
) -> None:
    """A judge (a model: sloppy or hostile) writes a 300,000-character reason: the outcome's
    detail, which the run record, logs and the user's partial answer carry, keeps 2,000."""
    essay = "the answer is wrong because " * 10_000
    judge = ScriptedChatModel(structured={"JudgeVerdict": {"passed": False, "reason": essay}})
    agent = build_agent(
        ScriptedChatModel(script=["Paris is in Italy."]), judge=judge, max_revisions=0
    )
    final = await run(agent, user("Where is Paris?"), mode)

    detail = final["outcome"]["detail"]
    assert final["outcome"]["terminated_reason"] == "verification_failed"
    assert detail == f"{essay[:MAX_DETAIL]}… ({len(essay) - MAX_DETAIL} more characters)"
    assert len(last_ai(final).text) < MAX_DETAIL + 200


async def test_judge_fails_the_answer(mode: str) -> None:
    judge = ScriptedChatModel(structured={"JudgeVerdict": {"passed": False, "reason": "wrong"}})
    agent = build_agent(
        ScriptedChatModel(script=["Paris is in Italy."]), judge=judge, max_revisions=0
    )
    final = await run(agent, user("Where is Paris?"), mode)

    assert final["verdicts"] == [{"passed": False, "reason": "wrong", "source": "judge"}]
    assert final["outcome"] == {
        "status": "stopped",
        "terminated_reason": "verification_failed",
        "detail": "wrong",
    }
    (prompt,) = judge.calls
    assert prompt[0] == SystemMessage(content=JUDGE_PROMPT)
    assert prompt[1].content == (
        "Task:\nWhere is Paris?\n\nWhat the tools returned for this task:\n"
        "(no tool was called for this task)\n\nAnswer:\nParis is in Italy."
    )


async def test_judge_passes_the_answer_and_rules_run_first(mode: str) -> None:
    judge = ScriptedChatModel(structured={"JudgeVerdict": {"passed": True, "reason": "right"}})
    model = ScriptedChatModel(script=["a draft", "Paris is in France."])
    agent = build_agent(model, checks=[no_drafts], judge=judge)
    final = await run(agent, user("Where is Paris?"), mode)
    assert len(judge.calls) == 1, "the judge is not asked about an answer the rules failed"
    assert final["verdicts"][-1] == {"passed": True, "reason": "right", "source": "judge"}
    assert final["outcome"]["terminated_reason"] == "completed"


def escalating_graph(model: ScriptedChatModel) -> Any:
    graph = StateGraph(AgentState, context_schema=RunContext)
    graph.add_node("call_model", call_model(model))
    graph.add_node(
        "verify",
        verify(checks=[lambda answer, state: "too vague."], max_revisions=0, escalate=True),
    )
    graph.add_node("respond", respond())
    graph.add_edge(START, "call_model")
    graph.add_edge("call_model", "verify")
    to = ["call_model", "respond", "verify", END]  # an escalation asks in a step of its own
    graph.add_conditional_edges("verify", route_after_verify, to)
    graph.add_edge("respond", END)
    return graph.compile(checkpointer=InMemorySaver())


async def test_escalation_interrupts_and_a_human_approves(mode: str) -> None:
    graph = escalating_graph(ScriptedChatModel(script=["It depends."]))
    first = await run(graph, user("hi"), mode, thread="t1")
    assert first["__interrupt__"][0].value == {
        "type": "verification",
        "description": "The answer failed verification: too vague.",
        "answer": "It depends.",
        "config": {"allow_accept": True, "allow_respond": True, "allow_ignore": True},
    }
    assert first["outcome"] == {  # the run waits for a human, and says so
        "status": "interrupted",
        "terminated_reason": "awaiting_approval",
        "detail": "awaiting a human: the answer failed verification: too vague.",
    }
    final = await run(graph, Command(resume={"type": "approve"}), mode, thread="t1")
    assert final["outcome"] == {
        "status": "success",
        "terminated_reason": "completed",
        "detail": "answer approved by a human",
    }
    assert final["verdicts"] == [
        {"passed": False, "reason": "too vague.", "source": "<lambda>"},
        {"passed": True, "reason": "approved by a human", "source": "human"},
    ]


async def test_escalation_asks_the_judge_once_and_counts_its_call(mode: str) -> None:
    """The judge's verdict is saved before the human is asked: the resume does not ask (and
    pay) the judge again, and the call it made counts in the run's usage."""
    judge = ScriptedChatModel(structured={"JudgeVerdict": {"passed": False, "reason": "wrong"}})
    model = ScriptedChatModel(script=["Paris is in Italy."])
    agent = build_agent(
        model, judge=judge, max_revisions=0, escalate=True, checkpointer=InMemorySaver()
    )
    first = await run(agent, user("Where is Paris?"), mode, thread="t1")
    assert first["outcome"]["terminated_reason"] == "awaiting_approval"
    assert first["usage"]["model_calls"] == 2, "the answer's call and the judge's"
    final = await run(agent, Command(resume={"type": "approve"}), mode, thread="t1")
    assert len(judge.calls) == 1
    assert final["usage"]["model_calls"] == 2
    assert final["outcome"]["detail"] == "answer approved by a human"


async def test_escalation_rejected_ends_as_verification_failed(mode: str) -> None:
    graph = escalating_graph(ScriptedChatModel(script=["It depends."]))
    await run(graph, user("hi"), mode, thread="t1")
    final = await run(graph, Command(resume={"type": "ignore"}), mode, thread="t1")
    assert final["outcome"] == {
        "status": "stopped",
        "terminated_reason": "verification_failed",
        "detail": "too vague.",
    }


# ===========================================================================================
# plan
# ===========================================================================================


def plans_by_node(chunks: Sequence[Mapping[str, Any]]) -> list[tuple[str, list[tuple[str, str]]]]:
    out = []
    for chunk in chunks:
        for node, update in chunk.items():
            if isinstance(update, Mapping) and "plan" in update:
                out.append((node, [(s["description"], s["status"]) for s in update["plan"]]))
    return out


async def stream_updates(graph: Any, payload: Any, mode: str) -> list[dict[str, Any]]:
    if mode == "invoke":
        return list(graph.stream(payload, stream_mode="updates", context=CTX))
    return [c async for c in graph.astream(payload, stream_mode="updates", context=CTX)]


async def test_plan_steps_advance_with_the_run(mode: str) -> None:
    model = ScriptedChatModel(
        script=[call("lookup", q="A1"), "A1 shipped."],
        structured={"Plan": {"steps": ["look up", "answer"]}},
    )
    agent = build_agent(model, [lookup], plan=True)
    chunks = await stream_updates(agent, user("where is A1?"), mode)

    assert plans_by_node(chunks) == [
        ("plan", [("look up", "in_progress"), ("answer", "pending")]),
        ("execute_tools", [("look up", "done"), ("answer", "in_progress")]),
        ("call_model", [("look up", "done"), ("answer", "done")]),
    ]
    final_outcome = [u["outcome"] for c in chunks for u in c.values() if u and "outcome" in u][-1]
    assert final_outcome["terminated_reason"] == "completed"

    planner_prompt, first_turn = model.calls[0], model.calls[1]
    # the planner is told the tools it may use, so that its steps are calls the agent can make
    tools_text = TOOLS_PROMPT.format(tools=f"- lookup: {lookup.description.splitlines()[0]}")
    assert planner_prompt[0] == SystemMessage(
        content=PLAN_PROMPT.format(max_steps=7) + "\n\n" + tools_text
    )
    assert [m.content for m in planner_prompt[1:]] == ["where is A1?"]
    assert first_turn[0] == SystemMessage(
        content="Your plan ([>] is the current step; do that step now):\n[>] 1. look up\n"
        "[ ] 2. answer"
    )


async def test_failed_step_marks_the_plan_and_triggers_a_replan(mode: str) -> None:
    plans = [["look up", "answer"], ["ask the user", "answer"]]
    asked: list[list[BaseMessage]] = []

    def planner(messages: list[BaseMessage]) -> dict[str, Any]:
        asked.append(messages)
        return {"steps": plans[len(asked) - 1]}

    @tool(retries=0)
    def find(q: str) -> str:
        """Find an order."""
        raise ToolException(f"no order {q}")

    model = ScriptedChatModel(
        script=[call("find", q="Z9"), "I could not find Z9; which order did you mean?"],
        structured={"Plan": planner},
    )
    agent = build_agent(model, [find], plan=True)
    chunks = await stream_updates(agent, user("where is Z9?"), mode)

    assert len(asked) == 2, "the planner is called again after the failure"
    assert plans_by_node(chunks) == [
        ("plan", [("look up", "in_progress"), ("answer", "pending")]),
        ("execute_tools", [("look up", "failed"), ("answer", "pending")]),
        ("plan", [("ask the user", "in_progress"), ("answer", "pending")]),
        ("call_model", [("ask the user", "done"), ("answer", "in_progress")]),
    ]
    replan_prompt = asked[1][0]
    assert replan_prompt == SystemMessage(
        content="A step of your plan failed: look up. Write a new plan for what remains of the "
        "task (at most 7 steps). Steps already done: none.\n\n"
        + TOOLS_PROMPT.format(tools="- find: Find an order.")
    )
    assert any(isinstance(m, ToolMessage) for m in asked[1]), "the replan sees what happened"


def test_the_replan_reads_a_history_every_provider_accepts() -> None:
    """The replanner sent the thread's history raw, while the agent's own turns send it repaired
    (`valid_history`): a history the agent copes with (here a transcript passed in with a call
    that has no result) made the replan a provider's 400, and the run went on, silently,
    without a new plan."""
    asked: list[list[BaseMessage]] = []

    def planner(messages: list[BaseMessage]) -> dict[str, Any]:
        asked.append(messages)
        return {"steps": ["look up", "answer"] if len(asked) == 1 else ["ask the user"]}

    @tool(retries=0)
    def find(q: str) -> str:
        """Find an order."""
        raise ToolException(f"no order {q}")

    orphan = AIMessage(content="", tool_calls=[{"name": "find", "args": {"q": "A1"}, "id": "old"}])
    model = ScriptedChatModel(
        script=["-", call("find", q="Z9"), "Which order did you mean?"],
        structured={"Plan": planner},
    )
    agent = build_agent(model, [find], plan=True)
    final = agent.invoke({"messages": [HumanMessage("A1?"), orphan, HumanMessage("where is Z9?")]})
    assert len(asked) == 2, "the replan was refused"
    assert [s["description"] for s in final["plan"]] == ["ask the user"]


async def test_planning_failure_does_not_stop_the_run(mode: str) -> None:
    model = ScriptedChatModel(script=["an answer without a plan"])  # no structured answer
    agent = build_agent(model, plan=True)
    final = await run(agent, user("hi"), mode)
    assert final["outcome"]["terminated_reason"] == "completed"
    assert final.get("plan") == []
    assert last_ai(final).content == "an answer without a plan"
