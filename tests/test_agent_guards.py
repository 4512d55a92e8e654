"""`AgentGuards`: a policy fans out once, and the nodes receive the result whole.

Attacks: a careless user passes arguments of the wrong type (each must be a `UserError` naming
the argument, not a late `AttributeError` mid-run); a node built with single guard keywords
must behave as one built from `AgentGuards`; the policy's version beats `policy_version=`.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, ToolCall
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command

from keel import Ledger, RunContext, UserError, build_agent, tool
from keel.evals import ScriptedChatModel
from keel.guards import AgentGuards, Budget, LoopPolicy, Policy, Rule
from keel.guards.gate import GateDecision
from keel.guards.model_call import ModelCallGuards
from keel.nodes import execute_tools
from keel.tools import ToolRegistry

CTX = RunContext(user_id="u1", tenant_id="acme", roles=("support",))


@tool(risk="destructive")
def wipe(target: str) -> str:
    """Wipe a target."""
    return f"wiped {target}"


@tool
def peek(target: str) -> str:
    """Look at a target."""
    return f"saw {target}"


POLICY = Policy(
    name="shop",
    version="7",
    budget=Budget(usd=1.0),
    loop=LoopPolicy(on_loop="wrap_up"),
    rules=[Rule(tool="peek", action="allow"), Rule(tool="wipe", action="ask")],
)


def test_a_policy_fans_out_once_into_one_frozen_object(tmp_path: Path) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path}/l.db")
    guards = AgentGuards.from_policy(POLICY, ledger, policy_version="1", tools=["peek", "wipe"])
    assert guards.gated and guards.budget == POLICY.budget and guards.loop == POLICY.loop
    assert (guards.policy_name, guards.policy_version) == ("shop", "7")  # the policy's wins
    assert guards.policy_id(CTX) == "shop@7" and guards.policy_label == "shop@7"
    assert guards.ledger is ledger and guards.standing is not None
    assert guards.gate(peek_entry(), {"target": "x"}, CTX).action == "allow"
    assert guards.gate(wipe_entry(), {"target": "x"}, CTX).action == "ask"
    with pytest.raises(AttributeError):
        guards.gated = False  # type: ignore[misc]


def test_without_a_policy_the_defaults_ask_for_risky_tools_only() -> None:
    guards = AgentGuards.from_policy(None, None)
    assert not guards.gated and guards.loop is None and guards.budget is None
    assert guards.standing is None and guards.tool_guard is None
    assert guards.policy_id(CTX) == "default@1"
    assert guards.gate(wipe_entry(), {"target": "x"}, CTX).action == "ask"
    assert guards.gate(peek_entry(), {"target": "x"}, CTX).action == "allow"


def test_a_rule_naming_a_missing_tool_fails_when_the_guards_are_built() -> None:
    policy = Policy(rules=[Rule(tool="wipe_all", action="deny"), Rule(action="allow")])
    with pytest.raises(UserError, match="wipe_all"):
        AgentGuards.from_policy(policy, None, tools=["peek"])


def test_single_options_override_a_base_and_unknown_ones_are_refused() -> None:
    base = AgentGuards.from_policy(POLICY, None, tools=["peek", "wipe"])
    tighter = AgentGuards.of(base, budget=Budget(model_calls=1), policy_version="8")
    assert tighter.budget == Budget(model_calls=1) and tighter.policy_version == "8"
    assert base.budget == POLICY.budget, "the base is frozen and left as it was"
    assert tighter.model.retry == base.model.retry and tighter.gate is base.gate
    assert AgentGuards.of(None, gate=None).gated  # call_model(gate=None): a tool_gate decides
    with pytest.raises(UserError, match=r"Unknown guard option\(s\) \['polcy_version'\]"):
        AgentGuards.of(None, polcy_version="2")
    with pytest.raises(UserError, match="Unknown guard option"):
        execute_tools(ToolRegistry([peek]), gaet=None)  # type: ignore[call-arg]


def test_model_call_guards_are_shared_by_every_model_node() -> None:
    guards = AgentGuards.from_policy(POLICY, None, tools=["peek", "wipe"])
    assert isinstance(guards.model, ModelCallGuards) and guards.model.budget is POLICY.budget


BAD_ARGUMENTS: list[tuple[dict[str, Any], str]] = [
    ({"model_retry": 3}, "build_agent(model_retry=...) must be a langgraph.types.RetryPolicy"),
    ({"prices": {"gpt": 1}}, "build_agent(prices=...) must be a keel.PriceTable"),
    ({"policy_version": 2}, "build_agent(policy_version=...) must be a non-empty string"),
    ({"gate": "allow"}, "build_agent(gate=...) must be a Gate"),
    ({"store": "chroma"}, "build_agent(store=...) must be a LangGraph store"),
    ({"name": ""}, "build_agent(name=...) must be a non-empty string"),
    ({"fallback_models": 3}, "build_agent(fallback_models=...) must be a list"),
]


@pytest.mark.parametrize("model", [None, 3, ["openai:gpt-4o-mini"]])
def test_a_model_that_is_none_or_not_a_model_is_a_user_error(model: Any) -> None:
    # None reached `model._llm_type` (a bare AttributeError) while naming the agent's version
    with pytest.raises(UserError, match=r"^build_agent\(model=\.\.\.\) must be a chat model"):
        build_agent(model, [peek])


@pytest.mark.parametrize(("kwargs", "message"), BAD_ARGUMENTS)
def test_a_careless_argument_is_a_user_error_that_names_it(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(UserError) as raised:
        build_agent(ScriptedChatModel(script=["hi"]), [peek], **kwargs)
    assert str(raised.value).startswith(message)


async def test_nodes_built_from_guards_and_from_keywords_decide_alike() -> None:
    """A sloppy model asks twice (fresh ids); the gate's `ask` is honoured either way."""

    def asking(entry: Any, args: Any, ctx: Any) -> GateDecision:
        return GateDecision.ask("check it") if entry.name == "wipe" else GateDecision.allow()

    for kwargs in ({"gate": asking}, {}):
        script = [_calls(("peek", "a"), ("wipe", "b")), "done"]
        agent = build_agent(
            ScriptedChatModel(script=script), [peek, wipe], checkpointer=InMemorySaver(), **kwargs
        )
        config = {"configurable": {"thread_id": "t"}}
        first = await agent.ainvoke({"messages": [("user", "go")]}, config, context=CTX)
        assert [r["action_request"]["action"] for r in first["__interrupt__"][0].value] == ["wipe"]
        final = await agent.ainvoke(Command(resume={"type": "approve"}), config, context=CTX)
        assert final["outcome"]["terminated_reason"] == "completed"


def _calls(*calls: tuple[str, str]) -> AIMessage:
    tag = uuid.uuid4().hex[:6]
    return AIMessage(
        content="",
        tool_calls=[
            ToolCall(name=n, args={"target": t}, id=f"{tag}{i}") for i, (n, t) in enumerate(calls)
        ],
    )


def peek_entry() -> Any:
    return ToolRegistry([peek]).get("peek")


def wipe_entry() -> Any:
    return ToolRegistry([wipe]).get("wipe")


@pytest.mark.parametrize("messages", [1, [object()], [("robot", "hi")]])
async def test_unreadable_messages_are_a_user_error_not_langchains_error(messages: Any) -> None:
    agent = build_agent(ScriptedChatModel(script=["hi"]))
    for run in (agent.invoke, agent.ainvoke):
        with pytest.raises(UserError, match="The run's messages could not be read") as raised:
            result = run({"messages": messages}, context=CTX)
            if hasattr(result, "__await__"):
                await result
        assert "send {'messages': [('user', '...')]}" in str(raised.value)
