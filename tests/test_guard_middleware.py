"""keel's guards as LangChain middleware: each one end to end in `create_agent`.

The agents are LangChain's own (`langchain.agents.create_agent`), the model is keel's
`ScriptedChatModel` (or `ChaosChatModel` around it), the ledger is real SQLite / PostgreSQL.
"""

from __future__ import annotations

import asyncio
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain.agents import create_agent
from langchain.agents.middleware import (
    AgentMiddleware,
    HumanInTheLoopMiddleware,
    ModelFallbackMiddleware,
)
from langchain_core.messages import AIMessage, HumanMessage, InvalidToolCall, ToolMessage
from langchain_core.tools import ToolException
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command

from keel import Ledger, RunContext, UserError
from keel.evals import ChaosChatModel, ChaosPolicy, ChaosServerError, ScriptedChatModel, call
from keel.guards import (
    BreakerPolicy,
    Budget,
    BudgetMiddleware,
    CircuitBreakerMiddleware,
    LoopGuardMiddleware,
    LoopPolicy,
    PermissionMiddleware,
    Policy,
    RateLimit,
    RateLimitMiddleware,
    Rule,
    outcome_of,
    usage_from_messages,
)
from keel.pricing import PriceTable
from keel.tools import tool

SUPPORT = RunContext(user_id="u1", tenant_id="acme", roles=("support",))
RUNS: list[str] = []


@tool
def lookup_order(order_id: str) -> str:
    """Look up an order."""
    RUNS.append(f"lookup_order {order_id}")
    return f"order {order_id}: shipped"


@tool
def issue_refund(order_id: str, amount: float) -> str:
    """Refund an order."""
    RUNS.append(f"issue_refund {order_id} {amount:g}")
    return f"refunded {amount:g} on {order_id}"


@tool
def delete_account(user: str) -> str:
    """Delete a user's account."""
    RUNS.append(f"delete_account {user}")
    return "deleted"


TOOLS = [lookup_order, issue_refund, delete_account]
POLICY = Policy(
    rules=(
        Rule(role="support", tool="lookup_*", action="allow"),
        Rule(role="support", tool="issue_refund", action="ask", reason="refunds need a manager"),
    )
)


@pytest.fixture(autouse=True)
def _clear_runs() -> None:
    RUNS.clear()


def agent(
    script: list[Any], middleware: list[AgentMiddleware[Any, Any, Any]], **kwargs: Any
) -> Any:
    model = kwargs.pop("model", None) or ScriptedChatModel(model_name="m", script=script)
    return create_agent(model, TOOLS, middleware=middleware, context_schema=RunContext, **kwargs)


def run(graph: Any, thread: str = "t", resume: Any = None) -> dict[str, Any]:
    payload: Any = (
        Command(resume=resume) if resume is not None else {"messages": [("user", "help with A1")]}
    )
    result: dict[str, Any] = graph.invoke(
        payload, {"configurable": {"thread_id": thread}}, context=SUPPORT
    )
    return result


def tool_messages(result: dict[str, Any]) -> list[ToolMessage]:
    return [m for m in result["messages"] if isinstance(m, ToolMessage)]


# -- budget ------------------------------------------------------------------------------------


def test_budget_middleware_stops_at_the_model_call_limit() -> None:
    script = [call("lookup_order", order_id="A1"), call("lookup_order", order_id="A2"), "done"]
    result = run(agent(script, [BudgetMiddleware(Budget(model_calls=2))]))
    assert outcome_of(result) == {
        "status": "stopped",
        "terminated_reason": "budget_exceeded",
        "detail": "Exceeded the model_calls limit of 2 (model_calls=2)",
    }
    # as in keel's execute_tools: with the model calls spent, no model could read a result
    assert RUNS == ["lookup_order A1"]
    assert tool_messages(result)[-1].response_metadata["keel_status"] == "budget_stopped"
    assert result["messages"][-1].content == (
        "Stopped (budget_exceeded): Exceeded the model_calls limit of 2 (model_calls=2)."
    )


async def test_budget_middleware_stops_tool_calls_past_the_limit() -> None:
    script = [call("lookup_order", order_id="A1"), call("lookup_order", order_id="A2"), "done"]
    graph = agent(script, [BudgetMiddleware(Budget(tool_calls=1))])
    result = await graph.ainvoke({"messages": [("user", "hi")]}, context=SUPPORT)
    assert RUNS == ["lookup_order A1"]
    assert tool_messages(result)[-1].content == (
        "Not run: Exceeded the tool_calls limit of 1 (tool_calls=2)."
    )
    assert outcome_of(result)["terminated_reason"] == "budget_exceeded"


def test_budget_middleware_counts_only_the_current_run() -> None:
    script = [
        call("lookup_order", order_id="A1"),
        "one",
        call("lookup_order", order_id="A2"),
        "two",
    ]
    graph = agent(script, [BudgetMiddleware(Budget(model_calls=3))], checkpointer=InMemorySaver())
    first = run(graph, thread="two-runs")
    second = run(graph, thread="two-runs")  # 4 model calls on the thread, 2 in this run
    assert first["messages"][-1].content == "one"
    assert second["messages"][-1].content == "two"
    assert RUNS == ["lookup_order A1", "lookup_order A2"]


def test_budget_middleware_counts_dollars_from_usage_metadata() -> None:
    pricey = AIMessage(
        content="",
        tool_calls=[{"name": "lookup_order", "args": {"order_id": "A1"}, "id": "c1"}],
        usage_metadata={"input_tokens": 1_000_000, "output_tokens": 0, "total_tokens": 1_000_000},
    )
    model = ScriptedChatModel(model_name="gpt-4o", script=[pricey, "done"])
    result = run(agent([], [BudgetMiddleware(Budget(usd=2.0))], model=model))
    assert outcome_of(result)["detail"] == "Exceeded the usd limit of 2 (usd=2.5)"


def test_usage_from_messages_counts_only_calls_that_ran() -> None:
    ai = AIMessage(
        content="",
        tool_calls=[
            {"name": "a", "args": {}, "id": "1"},
            {"name": "b", "args": {}, "id": "2"},
        ],
        usage_metadata={"input_tokens": 1000, "output_tokens": 500, "total_tokens": 1500},
        response_metadata={"model_name": "gpt-4o"},
    )
    ran = ToolMessage(content="ok", tool_call_id="1")
    denied = ToolMessage(
        content="no", tool_call_id="2", response_metadata={"keel_status": "denied"}
    )
    usage = usage_from_messages([HumanMessage(content="hi"), ai, ran, denied], PriceTable())
    assert usage == {
        "input_tokens": 1000,
        "output_tokens": 500,
        "usd": pytest.approx(0.0075),
        "model_calls": 1,
        "steps": 2,
        "tool_calls": 1,
    }


# -- permissions -------------------------------------------------------------------------------


def test_permission_middleware_denies_by_default_and_allows_by_rule() -> None:
    script = [
        call("delete_account", user="bob"),
        call("lookup_order", order_id="A1"),
        "A1 shipped",
    ]
    result = run(agent(script, [PermissionMiddleware(POLICY)]))
    denied, allowed = tool_messages(result)
    assert denied.content == (
        "Not permitted: no rule allows delete_account on * for roles support; keel denies by "
        "default (rule: default deny)."
    )
    assert denied.response_metadata["keel_status"] == "denied"
    assert allowed.content == "order A1: shipped"
    assert RUNS == ["lookup_order A1"]
    assert outcome_of(result)["terminated_reason"] == "completed"


def test_permission_middleware_asks_in_langchains_per_call_format() -> None:
    script = [call("issue_refund", order_id="A1", amount=20), "refunded"]
    graph = agent(script, [PermissionMiddleware(POLICY)], checkpointer=InMemorySaver())
    paused = run(graph)
    (pending,) = paused["__interrupt__"]
    (asked,) = [m for m in paused["messages"] if isinstance(m, AIMessage)]
    assert pending.value == {
        "type": "tool_approval",
        "tool_call_id": asked.tool_calls[0]["id"],
        "name": "issue_refund",
        "args": {"order_id": "A1", "amount": 20},
        "description": "refunds need a manager; a human must approve "
        "(rule: support | issue_refund | * → ask)",
    }
    assert RUNS == []
    result = run(graph, resume={"type": "approve"})
    assert RUNS == ["issue_refund A1 20"]
    assert outcome_of(result)["terminated_reason"] == "completed"


def test_permission_middleware_reject_and_edit() -> None:
    graph = agent(
        [call("issue_refund", order_id="A1", amount=20), "ok"],
        [PermissionMiddleware(POLICY)],
        checkpointer=InMemorySaver(),
    )
    run(graph, "rejected")
    result = run(graph, "rejected", resume={"type": "reject", "message": "too much"})
    assert tool_messages(result)[-1].content == "Rejected by a human reviewer: too much."
    run(graph, "edited")
    edited = {"name": "issue_refund", "args": {"order_id": "A1", "amount": 5}}
    run(graph, "edited", resume={"decisions": [{"type": "edit", "edited_action": edited}]})
    assert RUNS == ["issue_refund A1 5"]
    run(graph, "bad")
    with pytest.raises(UserError, match=r"^Unknown review decision \{'type': 'maybe'\}"):
        run(graph, "bad", resume={"type": "maybe"})


@tool
def slow_refund(order_id: str) -> str:
    """Refund an order (a long call the user stops with Ctrl-C)."""
    RUNS.append(f"slow_refund {order_id}")
    raise KeyboardInterrupt


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
@pytest.mark.parametrize("left", ["waiting_for_approval", "stopped_by_ctrl_c"])
def test_a_new_message_after_an_unanswered_call_gets_a_valid_history(left: str, mode: str) -> None:
    """A user who sends a new message instead of answering the approval (or after Ctrl-C
    stopped a tool) leaves the model's call without a result in the thread: OpenAI and
    Anthropic answer such a history with a 400 (keel's scripted model does the same). The
    middleware answers the call for the model, without saying it did not run, and runs
    nothing; the thread's next turn works."""
    first = call("lookup_order", order_id="A1")
    first.tool_calls.append(
        {**call("issue_refund" if left == "waiting_for_approval" else "slow_refund",
                order_id="A1", amount=20).tool_calls[0], "id": "refund-1"}
    )  # fmt: skip
    if left == "stopped_by_ctrl_c":
        first.tool_calls[1]["args"] = {"order_id": "A1"}
    model = ScriptedChatModel(model_name="m", script=[first, "Sure: the weather is fine."])
    policy = Policy(rules=(*POLICY.rules, Rule(tool="slow_refund", action="allow")))
    graph = create_agent(
        model, [*TOOLS, slow_refund], middleware=[PermissionMiddleware(policy)],
        context_schema=RunContext, checkpointer=InMemorySaver(),
    )  # fmt: skip
    config = {"configurable": {"thread_id": f"{left}-{mode}"}}

    def send(text: str) -> dict[str, Any]:
        payload = {"messages": [("user", text)]}
        if mode == "ainvoke":
            return dict(asyncio.run(graph.ainvoke(payload, config, context=SUPPORT)))
        return dict(graph.invoke(payload, config, context=SUPPORT))

    if left == "stopped_by_ctrl_c":
        with pytest.raises(KeyboardInterrupt):
            send("refund A1")
    else:
        assert send("refund A1")["__interrupt__"]
    result = send("Never mind. How is the weather?")
    assert result["messages"][-1].text == "Sure: the weather is fine."
    refunded = [r for r in RUNS if "refund" in r]
    assert refunded == ([] if left == "waiting_for_approval" else ["slow_refund A1"])
    refund_id = model.answers[0].tool_calls[1]["id"]  # the id the model gave the refund call
    (read,) = [
        m for m in model.calls[-1] if isinstance(m, ToolMessage) and m.tool_call_id == refund_id
    ]
    assert "may or may not have run" in read.text and read.status == "error"


def test_an_edited_call_is_checked_against_the_rules_again() -> None:
    policy = Policy(
        rules=(
            Rule(role="support", tool="issue_refund", resource="small", action="ask"),
            Rule(role="support", tool="issue_refund", action="deny", reason="large refund"),
        )
    )

    @tool(resource=lambda args: "small" if args["amount"] <= 50 else "large")
    def issue_refund(order_id: str, amount: float) -> str:
        """Refund an order."""
        RUNS.append(f"issue_refund {order_id} {amount:g}")
        return "refunded"

    graph = create_agent(
        ScriptedChatModel(script=[call("issue_refund", order_id="A1", amount=20), "ok"]),
        [issue_refund],
        middleware=[PermissionMiddleware(policy)],
        context_schema=RunContext,
        checkpointer=InMemorySaver(),
    )
    run(graph)
    edited = {"name": "issue_refund", "args": {"order_id": "A1", "amount": 500}}
    result = run(graph, resume={"type": "edit", "edited_action": edited})
    assert RUNS == []
    assert tool_messages(result)[-1].content == (
        "Not permitted: large refund (rule: support | issue_refund | * → deny)."
    )


# -- rate limits and breakers ------------------------------------------------------------------


def test_rate_limit_middleware_ends_the_run_when_the_wait_runs_out(db_url: str) -> None:
    ledger = Ledger(db_url)
    limits = [RateLimit(rpm=1, scope="tenant", max_wait=0)]
    graph = agent(["hello"], [RateLimitMiddleware(ledger, limits)])
    assert outcome_of(run(graph, "a"))["terminated_reason"] == "completed"
    result = outcome_of(run(graph, "b"))
    assert result["terminated_reason"] == "error"
    assert result["detail"].startswith(
        "model call refused: Rate limit of 1 requests per minute reached for tenant:acme "
        "(rpm:tenant:acme): room in "
    )
    ledger.close()


def test_breaker_middleware_fails_fast_then_falls_back(tmp_path: Path) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path}/keel.db")
    primary = ChaosChatModel(
        model=ScriptedChatModel(model_name="primary", script=["never"]),
        policy=ChaosPolicy(server_error=1.0),
    )
    breaker = BreakerPolicy(failure_threshold=1, cooldown_seconds=60)
    graph = agent([], [CircuitBreakerMiddleware(ledger, model=breaker)], model=primary)
    with pytest.raises(ChaosServerError):  # the provider's own error: LangChain's to handle
        run(graph, "a")
    result = outcome_of(run(graph, "b"))
    assert result["terminated_reason"] == "error"
    assert result["detail"].startswith(
        "model call refused: Circuit breaker 'model:primary' is open: calls fail fast"
    )
    assert primary.calls == 1
    backup = ScriptedChatModel(model_name="backup", script=["backup answer"])
    chained = agent(
        [],
        [
            ModelFallbackMiddleware(backup),
            CircuitBreakerMiddleware(ledger, model=breaker, exit_behavior="error"),
        ],
        model=primary,
    )
    answered = run(chained, "c")
    assert answered["messages"][-1].content == "backup answer"
    assert primary.calls == 1
    ledger.close()


def test_breaker_middleware_degrades_a_failing_tool(tmp_path: Path) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path}/keel.db")
    attempts: list[str] = []

    @tool
    def inventory(sku: str) -> str:
        """Check stock."""
        attempts.append(sku)
        raise ToolException("inventory service returned 503")

    inventory.handle_tool_error = True  # LangChain's ToolNode re-raises a ToolException otherwise

    breaker = CircuitBreakerMiddleware(ledger, tool=BreakerPolicy(failure_threshold=1))
    graph = create_agent(
        ScriptedChatModel(script=[call("inventory", sku="X"), call("inventory", sku="Y"), "ok"]),
        [inventory],
        middleware=[breaker],
        context_schema=RunContext,
    )
    result = run(graph)
    assert attempts == ["X"]
    refused = tool_messages(result)[-1]
    assert refused.response_metadata["keel_status"] == "unavailable"
    assert str(refused.content).startswith("Error: inventory is unavailable")
    assert outcome_of(result)["terminated_reason"] == "completed"
    ledger.close()


def test_breaker_middleware_needs_a_breaker(tmp_path: Path) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path}/keel.db")
    with pytest.raises(UserError, match=r"^CircuitBreakerMiddleware needs model="):
        CircuitBreakerMiddleware(ledger)
    ledger.close()


# -- the loop guard ----------------------------------------------------------------------------


def test_loop_guard_middleware_stops_a_repeated_call() -> None:
    script = [call("lookup_order", order_id="A1")] * 3 + ["done"]
    result = run(agent(script, [LoopGuardMiddleware(LoopPolicy(max_repeats=3))]))
    assert RUNS == ["lookup_order A1", "lookup_order A1"]
    assert outcome_of(result) == {
        "status": "stopped",
        "terminated_reason": "loop_detected",
        "detail": "lookup_order was called 3 times in a row with the same arguments "
        '{"order_id":"A1"}',
    }


async def test_loop_guard_middleware_wraps_up_without_tools() -> None:
    def turn(messages: list[Any]) -> AIMessage | str:
        if "(keel loop guard)" in str(messages[-1].content):
            return "A1 shipped (wrapped up)"
        return call("lookup_order", order_id="A1")

    model = ScriptedChatModel(script=[turn] * 5)
    graph = agent([], [LoopGuardMiddleware(LoopPolicy(on_loop="wrap_up"))], model=model)
    result = await graph.ainvoke({"messages": [("user", "hi")]}, context=SUPPORT)
    assert result["messages"][-1].content == "A1 shipped (wrapped up)"
    assert outcome_of(result)["terminated_reason"] == "loop_detected"
    assert RUNS == ["lookup_order A1", "lookup_order A1"]


async def test_a_broken_call_in_the_middleware_wrap_up_answer_leaves_a_valid_thread() -> None:
    """The wrap-up answer comes with a call whose arguments did not parse. The middleware keeps
    it (and its text); LangChain's agent answers the call on the thread's next message, so the
    model never reads a call without a result (the strict scripted model would refuse it)."""
    broken = InvalidToolCall(type="invalid_tool_call", name="lookup_order", args="{", id="b")

    def turn(messages: list[Any]) -> AIMessage | str:
        if "(keel loop guard)" in str(messages[-1].content):
            return AIMessage(content="A1 shipped (wrapped up)", invalid_tool_calls=[broken])
        if messages[-1].content == "thanks":
            return "You are welcome."
        return call("lookup_order", order_id="A1")

    model = ScriptedChatModel(script=[turn] * 6)
    graph = agent(
        [], [LoopGuardMiddleware(LoopPolicy(on_loop="wrap_up"))], model=model,
        checkpointer=InMemorySaver(),
    )  # fmt: skip
    config = {"configurable": {"thread_id": "t"}}
    result = await graph.ainvoke({"messages": [("user", "hi")]}, config, context=SUPPORT)
    assert result["messages"][-1].content == "A1 shipped (wrapped up)"
    result = await graph.ainvoke({"messages": [("user", "thanks")]}, config, context=SUPPORT)
    assert result["messages"][-1].content == "You are welcome."


# -- property: through the middleware too, no denied call ever executes ------------------------

PROP_RUNS: list[tuple[str, str]] = []


def _prop_tool(name: str) -> Any:
    def act(id: str) -> str:
        """Act on a record."""
        PROP_RUNS.append((name, id))
        return "ok"

    return tool(name=name, resource=lambda a: f"{name}/{a['id']}")(act)


PROP_TOOLS = [_prop_tool("read_order"), _prop_tool("delete_user")]


@settings(
    deadline=None, max_examples=30, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    rules=st.lists(
        st.builds(
            Rule,
            action=st.sampled_from(["allow", "deny", "ask"]),
            role=st.sampled_from(["*", "support", "admin"]),
            tool=st.sampled_from(["*", "read_*", "delete_user", "nope"]),
            resource=st.sampled_from(["*", "read_order/1", "*/2", "delete_user/*"]),
        ),
        max_size=5,
    ),
    calls=st.lists(
        st.tuples(st.sampled_from(["read_order", "delete_user"]), st.sampled_from(["1", "2"])),
        min_size=1,
        max_size=4,
    ),
)
def test_no_denied_call_ever_executes_through_the_middleware(
    rules: list[Rule], calls: list[tuple[str, str]]
) -> None:
    PROP_RUNS.clear()
    turn = AIMessage(
        content="",
        tool_calls=[
            {"name": n, "args": {"id": r}, "id": f"c{i}"} for i, (n, r) in enumerate(calls)
        ],
    )
    graph = create_agent(
        ScriptedChatModel(script=[turn, "done"]),
        PROP_TOOLS,
        middleware=[PermissionMiddleware(Policy(rules=tuple(rules)))],
        context_schema=RunContext,
        checkpointer=InMemorySaver(),
    )

    def first_match(name: str, record: str) -> str:  # written out apart from PermissionMatrix
        for rule in rules:
            if (
                rule.role in ("*", "support")
                and fnmatchcase(name, rule.tool)
                and fnmatchcase(f"{name}/{record}", rule.resource)
            ):
                return rule.action
        return "deny"

    result = run(graph, "prop")
    for _ in range(len(calls)):  # a human approves whatever is asked, one call at a time
        if "__interrupt__" not in result:
            break
        answers = {i.id: {"type": "approve"} for i in result["__interrupt__"]}
        result = run(graph, "prop", resume=answers)
    allowed = sorted(c for c in calls if first_match(*c) != "deny")
    assert sorted(PROP_RUNS) == allowed
    statuses = [m.response_metadata.get("keel_status") for m in tool_messages(result)]
    assert statuses.count("denied") == len(calls) - len(allowed)


def test_pin_create_agent_reraises_a_tool_exception_by_default() -> None:
    """LangChain's ToolNode in `create_agent` re-raises a tool's `ToolException` unless the
    tool sets `handle_tool_error` (keel's `execute_tools` answers it with an error
    ToolMessage instead); LangGraph adds a "During task with name 'tools'" note to it.
    """

    @tool
    def flaky(sku: str) -> str:
        """Check stock."""
        raise ToolException("down")

    graph = create_agent(
        ScriptedChatModel(script=[call("flaky", sku="X"), "ok"]), [flaky], context_schema=RunContext
    )
    with pytest.raises(ToolException, match=r"^down\n"):
        run(graph)


def test_pin_create_agent_sends_a_call_left_waiting_to_the_model() -> None:
    """LangChain's own `HumanInTheLoopMiddleware` leaves a call that waited for approval
    unanswered when a new message comes instead, and `create_agent` sends that history to the
    model as it is (a provider's 400; keel's scripted model raises the same). Why
    `PermissionMiddleware` repairs the history it hands the model."""
    graph = agent(
        [call("issue_refund", order_id="A1", amount=20), "ok"],
        [HumanInTheLoopMiddleware(interrupt_on={"issue_refund": True})],
        checkpointer=InMemorySaver(),
    )
    assert run(graph, "waiting")["__interrupt__"]
    with pytest.raises(ValueError, match="must be followed by tool messages"):
        run(graph, "waiting")  # a new message, not an answer
