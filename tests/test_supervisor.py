"""The supervisor of focused agents, in process on SQLite (and PostgreSQL for the approval round
trip): routing, results passed back, and the sub-agents' guards (policy, approvals, budget) kept
in force."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command

from keel import Persistence, RunContext, UserError, build_agent
from keel.app.demo import DEMO_TASK, DemoShop, demo_tools
from keel.evals import ScriptedChatModel, call
from keel.evals.demo import demo_model, demo_router_model, demo_support_model
from keel.graphs import FINISH, Route, build_supervisor
from keel.guards import Budget, Policy, Rule

CTX = RunContext(user_id="u1", tenant_id="acme", roles=("support",))
POLICY = Policy(
    name="support",
    rules=(
        Rule(role="support", tool="lookup_order", action="allow"),
        Rule(role="support", tool="search_policy", action="allow"),
        Rule(role="support", tool="issue_refund", resource="orders/*", action="ask"),
    ),
)


def _supervisor(shop: DemoShop, saver: Any, **billing: Any) -> Any:
    support = build_agent(demo_support_model(), demo_tools(shop), policy=POLICY, name="support")
    billing_agent = build_agent(
        billing.pop("model", demo_model()), demo_tools(shop), name="billing", **billing
    )
    return build_supervisor(
        {"support": support, "billing": billing_agent},
        demo_router_model(),
        descriptions={"support": "order lookups", "billing": "refunds"},
        checkpointer=saver,
    )


def _config(thread: str) -> Any:
    return {"configurable": {"thread_id": thread}}


def _answers(messages: Sequence[BaseMessage]) -> list[tuple[str | None, str]]:
    return [(m.name, m.text) for m in messages if isinstance(m, AIMessage)]


@pytest.mark.parametrize("decision", ["approve", "reject"])
async def test_sub_agent_approval_surfaces_and_resumes(db_url: str, decision: str) -> None:
    shop = DemoShop()
    async with Persistence(db_url).acheckpointer() as saver:
        sup = _supervisor(shop, saver, policy=POLICY)
        first = await sup.ainvoke({"messages": [("user", DEMO_TASK)]}, _config("t"), context=CTX)
        (request,) = first["__interrupt__"][0].value
        assert request["action_request"] == {
            "action": "issue_refund",
            "args": {"order_id": "A1001", "amount": 42.5, "reason": "arrived damaged"},
        }
        assert request["description"] == (
            "issue_refund on orders/A1001; a human must approve "
            "(rule: support | issue_refund | orders/* → ask)"
        )
        assert shop.refunds == []
        assert (await sup.aget_state(_config("t"))).next == ("billing",)

    # resume from a new saver, as a new process would
    async with Persistence(db_url).acheckpointer() as saver:
        sup = _supervisor(shop, saver, policy=POLICY)
        final = await sup.ainvoke(Command(resume=[{"type": decision}]), _config("t"), context=CTX)

    if decision == "approve":
        assert final["outcome"]["terminated_reason"] == "completed"
        assert shop.refunds == [("A1001", 42.5)]
        assert [name for name, _ in _answers(final["messages"])] == ["support", "billing"]
        assert final["usage"]["tool_calls"] == 4
        # 6 agent turns and the router's 3 decisions: every model call is counted
        assert final["usage"]["model_calls"] == 6 + 3
    else:
        assert final["outcome"] == {
            "status": "stopped",
            "terminated_reason": "rejected",
            "detail": "a human rejected the call to issue_refund",
        }
        assert shop.refunds == []
        assert final["messages"][-1].name == "billing"


def test_sync_invoke_and_sub_agent_policy_deny(tmp_path: Path) -> None:
    """A tool the sub-agent's policy does not allow is denied inside the supervisor too."""
    shop = DemoShop()
    billing = demo_model()
    strict = Policy(name="strict", rules=(Rule(role="support", tool="lookup_*", action="allow"),))
    with Persistence(f"sqlite:///{tmp_path}/keel.db").checkpointer() as saver:
        sup = _supervisor(shop, saver, policy=strict, model=billing)
        final = sup.invoke({"messages": [("user", DEMO_TASK)]}, _config("t"), context=CTX)
    assert "__interrupt__" not in final
    assert shop.refunds == []
    told = [m.text for m in billing.calls[-1] if m.type == "tool"]
    assert told[1:] == [
        "Not permitted: no rule allows search_policy on * for roles support; keel denies by "
        "default (rule: default deny).",
        "Not permitted: no rule allows issue_refund on orders/A1001 for roles support; keel "
        "denies by default (rule: default deny).",
    ]
    # the denials are answered, not the end of the run: the sub-agent's model went on
    assert final["outcome"]["terminated_reason"] == "completed"


def test_sub_agent_budget_stops_the_supervisor(tmp_path: Path) -> None:
    shop = DemoShop()
    tight = Policy(name="tight", rules=POLICY.rules, budget=Budget(model_calls=1))
    with Persistence(f"sqlite:///{tmp_path}/keel.db").checkpointer() as saver:
        sup = _supervisor(shop, saver, policy=tight)
        final = sup.invoke({"messages": [("user", DEMO_TASK)]}, _config("t"), context=CTX)
    assert final["outcome"]["status"] == "stopped"
    assert final["outcome"]["terminated_reason"] == "budget_exceeded"
    assert shop.refunds == []
    assert final["messages"][-1].name == "billing"


def test_max_handoffs_ends_the_run() -> None:
    again = build_agent(ScriptedChatModel(script=["done"] * 10))
    sup = build_supervisor({"a": again}, lambda messages: Route(agent="a"), max_handoffs=2)
    final = sup.invoke({"messages": [("user", "go")]})
    assert final["outcome"] == {
        "status": "stopped",
        "terminated_reason": "budget_exceeded",
        "detail": "the supervisor handed off 2 times (max_handoffs=2)",
    }


def test_a_failing_router_ends_the_run_with_an_error_outcome() -> None:
    sup = build_supervisor(
        {"a": build_agent(ScriptedChatModel(script=["x"]))}, lambda m: Route(agent="zed")
    )
    final = sup.invoke({"messages": [("user", "go")]})
    assert final["outcome"] == {
        "status": "error",
        "terminated_reason": "error",
        "detail": "the supervisor's router failed: The supervisor's router chose 'zed'; the "
        "agents are ['a'] (or FINISH).",
    }
    broken = build_supervisor({"a": build_agent(ScriptedChatModel(script=["x"]))}, _raise)
    assert broken.invoke({"messages": [("user", "go")]})["outcome"]["detail"] == (
        "the supervisor's router failed: RuntimeError: model down"
    )


def _raise(messages: Sequence[BaseMessage]) -> Route:
    raise RuntimeError("model down")


def test_finish_without_handoff_answers_with_the_routers_text() -> None:
    sup = build_supervisor(
        {"a": build_agent(ScriptedChatModel(script=["x"]))},
        lambda m: Route(agent=FINISH, task="Nothing to do."),
    )
    final = sup.invoke({"messages": [("user", "hi")]})
    assert final["outcome"]["terminated_reason"] == "completed"
    assert final["outcome"]["detail"] == "Nothing to do."


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"agents": {}}, "build_supervisor(agents=...) must map agent names to keel agents."),
        ({"agents": {"FINISH": None}}, "Agent name 'FINISH' is reserved; rename it."),
        ({"max_handoffs": 0}, "build_supervisor(max_handoffs=...) must be 1 or more, got 0."),
    ],
)
def test_bad_arguments_say_what_to_fix(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"agents": {"a": build_agent(ScriptedChatModel(script=["x"]))}}
    args.update(kwargs)
    with pytest.raises(UserError) as caught:
        build_supervisor(args.pop("agents"), lambda m: Route(agent=FINISH), **args)
    assert str(caught.value) == message


def test_model_router_uses_structured_route_output() -> None:
    def route(messages: Sequence[BaseMessage]) -> dict[str, str]:
        done = any(isinstance(m, AIMessage) and m.name == "a" for m in messages)
        return {"agent": FINISH if done else "a", "task": "look it up"}

    router = ScriptedChatModel(structured={"Route": route})
    agent = build_agent(ScriptedChatModel(script=[call("lookup", q="x"), "found it"]), [_lookup])
    final = build_supervisor({"a": agent}, router).invoke({"messages": [("user", "find x")]})
    assert _answers(final["messages"]) == [("a", "found it")]
    system = router.calls[0][0].text
    assert system.startswith("You are a supervisor.") and "- a" in system


@pytest.mark.parametrize("driver", ["invoke", "ainvoke"])
async def test_the_router_reads_a_history_every_provider_accepts(driver: str) -> None:
    """The router was sent the supervisor's messages raw: a transcript passed in with a call
    that has no result (which keel's agents repair before their model calls) made the routing
    call a provider's 400, and the run ended as `error`."""

    def route(messages: Sequence[BaseMessage]) -> dict[str, str]:
        done = any(isinstance(m, AIMessage) and m.name == "a" for m in messages)
        return {"agent": FINISH if done else "a", "task": "look it up"}

    router = ScriptedChatModel(structured={"Route": route})
    agent = build_agent(ScriptedChatModel(script=["found it"]))
    orphan = AIMessage(content="", tool_calls=[{"name": "lookup", "args": {}, "id": "old"}])
    sup = build_supervisor({"a": agent}, router)
    payload = {"messages": [HumanMessage("x?"), orphan, HumanMessage("find x")]}
    final = sup.invoke(payload) if driver == "invoke" else await sup.ainvoke(payload)
    assert final["outcome"]["terminated_reason"] == "completed", final["outcome"]
    assert _answers(final["messages"])[-1] == ("a", "found it")


def _lookup(q: str) -> str:
    """Look something up."""
    return f"{q}: here"


def test_the_routers_run_budget_counts_only_the_current_run() -> None:
    def route(messages: Sequence[BaseMessage]) -> dict[str, str]:
        done = isinstance(messages[-1], AIMessage) and messages[-1].name == "a"
        return {"agent": FINISH if done else "a", "task": "look it up"}

    router = ScriptedChatModel(structured={"Route": route})
    agent = build_agent(ScriptedChatModel(script=["found it"] * 10), [_lookup])
    # each run: the router routes to `a`, then finishes (2 calls); two runs make 4
    rules = (Rule(tool="*", action="allow"),)
    tight = Policy(name="router", rules=rules, budget=Budget(model_calls=3))
    supervisor = build_supervisor({"a": agent}, router, policy=tight, checkpointer=InMemorySaver())
    first = supervisor.invoke({"messages": [("user", "find x")]}, _config("runs"), context=CTX)
    second = supervisor.invoke({"messages": [("user", "find y")]}, _config("runs"), context=CTX)
    assert first["outcome"]["terminated_reason"] == "completed", first["outcome"]
    assert second["outcome"]["terminated_reason"] == "completed", second["outcome"]
    assert len(router.calls) == 4


def test_a_route_that_spent_the_run_budget_is_not_followed() -> None:
    """The attack: the router's call spent the supervisor's dollar limit, yet its route was
    followed and the agent ran (its calls held only to its own policy); the budget stopped the
    run only at the next routing call. Now the route is checked as an agent's turn is: no agent
    is handed the task on a spent budget."""
    router = ScriptedChatModel(structured={"Route": lambda _: {"agent": "a", "task": "look"}})
    worker = ScriptedChatModel(script=["found it"])
    agent = build_agent(worker, [_lookup])
    policy = Policy(name="router", budget=Budget(usd=0.000001))
    supervisor = build_supervisor({"a": agent}, router, policy=policy)
    final = supervisor.invoke({"messages": [("user", "find x")]})
    assert final["outcome"]["terminated_reason"] == "budget_exceeded"
    detail = final["outcome"]["detail"]
    assert detail.startswith("Exceeded the usd limit of 1e-06 (usd=")
    assert detail.endswith("; no agent was handed the task")
    assert worker.calls == [] and len(router.calls) == 1 and final["usage"]["model_calls"] == 1
    roomy = Policy(name="router", budget=Budget(usd=1.0))  # within it, the route is followed
    worker = ScriptedChatModel(script=["found it"])
    router = ScriptedChatModel(structured={"Route": _once})
    final = build_supervisor({"a": build_agent(worker, [_lookup])}, router, policy=roomy).invoke(
        {"messages": [("user", "find x")]}
    )
    assert final["outcome"]["terminated_reason"] == "completed" and len(worker.calls) == 1


def _once(messages: Sequence[BaseMessage]) -> dict[str, str]:
    done = isinstance(messages[-1], AIMessage) and messages[-1].name == "a"
    return {"agent": FINISH if done else "a", "task": "look it up"}
