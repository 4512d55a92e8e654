"""`build_agent` and `create_agent` with keel's middleware, same script, same tools, same policy.

Gaps between the paths, closed here:

- a model's tool arguments with keys JSON cannot write (a tuple, a frozenset, at any depth):
  `build_agent` stores them as JSON carries them (`keel.tools._args.json_args`), so the tool's
  schema answers `invalid_args` as for a provider's call and the checkpoint saves. Under
  `create_agent` they reached the checkpoint unchanged and the run ended in a `TypeError`
  (`AIMessage` not msgpack serializable), its thread unsaved. Every keel middleware's model
  hook (the content guards' too) now writes them as `build_agent` does, so any one of them
  is enough;
- a call the tool node answers without running the tool (no such tool, arguments its schema
  refuses) was marked `unknown_tool` / `invalid_args` only under a tool breaker; without the
  mark `BudgetMiddleware` counted it as a tool call that ran (`build_agent` does not), and a
  model's bad call spent the budget of the good one after it;
- an answer of only malformed tool calls (`invalid_tool_calls`) ended the middleware run
  `completed` with an empty answer; `build_agent` answers each `invalid_args`, asks again, and
  ends the third in a row as `error` (`ModelBehaviorError`);
- a tool that raised: `build_agent` answers the call `error`; `create_agent`'s `ToolNode`
  raised the error out of `invoke`;
- the audit log: `build_agent` writes a `tool` record per call and an `approval` record per
  human decision; `PermissionMiddleware` wrote none (it now writes both with `ledger=`).

Real PostgreSQL and SQLite checkpointers and ledgers; the model is keel's ScriptedChatModel
(under a ChaosChatModel that breaks every tool call, for the malformed answers).
"""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Callable
from typing import Annotated, Any

import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import AgentMiddleware
from langchain_core.messages import AIMessage, ToolCall, ToolMessage
from langgraph.types import Command
from pydantic import AfterValidator

from keel import Ledger, Persistence, RunContext, build_agent, tool
from keel.db.audit import AuditLog
from keel.evals import ChaosChatModel, ChaosPolicy, ScriptedChatModel, call
from keel.guards import (
    BreakerPolicy,
    Budget,
    BudgetMiddleware,
    CircuitBreakerMiddleware,
    LoopGuardMiddleware,
    PermissionMiddleware,
    Policy,
    Rule,
)
from keel.guards.content_middleware import InputGuardMiddleware, OutputGuardMiddleware
from keel.guards.middleware import outcome_of
from keel.history import MALFORMED_TURNS

CTX = RunContext(user_id="u1", roles=("support",))
ARGS = {"grid": {(1, 2): "x", (0, 0): "o"}, "notes": [{frozenset({"b", "a"}): 1}]}
READABLE = {"grid": {"[1,2]": "x", "[0,0]": "o"}, "notes": [{'["a","b"]': 1}]}
RULES = (Rule(role="*", tool="*", action="allow"),)


@tool
def place(grid: dict[tuple[int, int], str], notes: list[dict[frozenset[str], int]] = []) -> str:  # noqa: B006
    """Place marks on a grid."""
    return f"placed {sorted(grid)}"


@tool
def lookup(order_id: str, n: int = 1) -> str:
    """Look an order up."""
    return f"order {order_id}: shipped"


TOOLS = [place, lookup]


def _script(*turns: list[tuple[str, dict[str, Any]]]) -> ScriptedChatModel:
    script: list[Any] = [
        AIMessage(content="", tool_calls=[ToolCall(name=n, args=a, id=None) for n, a in t])
        for t in turns
    ]
    return ScriptedChatModel(script=[*script, "Done."], fresh_ids=True)


def _statuses(messages: list[Any]) -> list[str]:
    """Each tool answer's keel status, else its own (the middleware leaves a success unmarked)."""
    return [
        m.response_metadata.get("keel_status", m.status)
        for m in messages
        if isinstance(m, ToolMessage)
    ]


def _run(agent: Any) -> tuple[dict[str, Any], Any]:
    config: Any = {"configurable": {"thread_id": uuid.uuid4().hex}}
    result = agent.invoke({"messages": [("user", "go")]}, config, context=CTX)
    return result, agent.get_state(config).values["messages"]


def _keel(db_url: str, saver: Any, model: ScriptedChatModel, budget: Budget | None) -> Any:
    ledger = Ledger(db_url)
    ledger.setup()
    policy = Policy(rules=RULES, budget=budget)
    return build_agent(model, TOOLS, policy=policy, ledger=ledger, checkpointer=saver), ledger


def _middleware(
    saver: Any, model: ScriptedChatModel, middleware: list[AgentMiddleware[Any, Any, Any]]
) -> Any:
    return create_agent(
        model, TOOLS, middleware=middleware, context_schema=RunContext, checkpointer=saver
    )


def _stacks(ledger: Ledger) -> dict[str, Callable[[], list[AgentMiddleware[Any, Any, Any]]]]:
    return {
        "budget": lambda: [BudgetMiddleware(Budget(tool_calls=5))],
        "permission": lambda: [PermissionMiddleware(Policy(rules=RULES))],
        "model_breaker": lambda: [CircuitBreakerMiddleware(ledger, model=BreakerPolicy())],
        "loop_guard": lambda: [LoopGuardMiddleware()],
        "tool_breaker": lambda: [CircuitBreakerMiddleware(ledger, tool=BreakerPolicy())],
        "input_guard": lambda: [InputGuardMiddleware()],
        "output_guard": lambda: [OutputGuardMiddleware()],
    }


MODEL_HOOKED = [
    "budget",
    "permission",
    "model_breaker",
    "loop_guard",
    "input_guard",
    "output_guard",
]
TOOL_HOOKED = ["budget", "permission", "tool_breaker", "input_guard"]


@pytest.mark.parametrize("stack", MODEL_HOOKED)
def test_tuple_keys_reach_the_tool_as_in_build_agent_whichever_keel_middleware(
    db_url: str, stack: str
) -> None:
    with Persistence(db_url).checkpointer() as saver:
        agent, ledger = _keel(db_url, saver, _script([("place", ARGS)]), None)
        try:
            keel_result, keel_saved = _run(agent)
            middleware = _stacks(ledger)[stack]()
            result, saved = _run(_middleware(saver, _script([("place", ARGS)]), middleware))
        finally:
            ledger.close()
    assert keel_result["outcome"]["terminated_reason"] == "completed"
    assert outcome_of(result)["terminated_reason"] == "completed"
    # the checkpoint holds the arguments as JSON carries them, on both paths
    assert saved[1].tool_calls[0]["args"] == keel_saved[1].tool_calls[0]["args"] == READABLE
    (answer,) = [m for m in result["messages"] if isinstance(m, ToolMessage)]
    assert "grid.[1,2].[key]: Input should be a valid tuple" in answer.text
    if stack in TOOL_HOOKED:  # a middleware with a tool hook marks it as build_agent does
        assert _statuses(result["messages"]) == _statuses(keel_result["messages"])
        assert _statuses(result["messages"]) == ["invalid_args"]


BAD_CALLS = {
    "invalid_args": ("lookup", {"order_id": "A1", "n": "abc"}),
    "unknown_tool": ("Lookup", {"order_id": "A1"}),
}


@pytest.mark.parametrize("one_turn", [False, True], ids=["two_turns", "one_turn"])
@pytest.mark.parametrize("status", sorted(BAD_CALLS))
def test_a_call_the_tool_never_ran_spends_no_tool_call_budget_on_either_path(
    db_url: str, status: str, one_turn: bool
) -> None:
    """Budget of one tool call: a bad call, then a good one (in its own turn, or the same:
    the calls of a turn run in parallel, each counting the unanswered ones before it). The
    good one runs on both paths."""
    budget = Budget(tool_calls=1)
    good = ("lookup", {"order_id": "A1"})
    turns: tuple[list[tuple[str, dict[str, Any]]], ...] = (
        ([BAD_CALLS[status], good],) if one_turn else ([BAD_CALLS[status]], [good])
    )
    with Persistence(db_url).checkpointer() as saver:
        agent, ledger = _keel(db_url, saver, _script(*turns), budget)
        try:
            keel_result, _ = _run(agent)
        finally:
            ledger.close()
        middleware: list[AgentMiddleware[Any, Any, Any]] = [
            BudgetMiddleware(budget),
            PermissionMiddleware(Policy(rules=RULES)),
        ]
        result, _ = _run(_middleware(saver, _script(*turns), middleware))
    assert keel_result["outcome"]["terminated_reason"] == "completed"
    assert keel_result["usage"]["tool_calls"] == 1
    assert _statuses(keel_result["messages"]) == [status, "success"]
    assert outcome_of(result)["terminated_reason"] == "completed"
    assert _statuses(result["messages"]) == [status, "success"]


ASK_DENY_RULES = (
    Rule(role="support", tool="lookup", action="ask", reason="lookups need a manager"),
    Rule(role="support", tool="place", action="deny", reason="no placing"),
)


@pytest.mark.parametrize(
    "call",
    [("lookup", {"order_id": "A1", "n": "abc"}), ("place", {"grid": {"a": "x"}})],
    ids=["ask", "deny"],
)
def test_arguments_that_do_not_fit_are_answered_before_the_rules_on_both_paths(
    db_url: str, call: tuple[str, dict[str, Any]]
) -> None:
    """`build_agent` answers `invalid_args` before any rule: no human is asked about a call
    that cannot run, and a deny does not hide what the model must fix. The middleware asked a
    human (an `ask` rule) or answered `denied` (a `deny` rule)."""
    with Persistence(db_url).checkpointer() as saver:
        ledger = Ledger(db_url)
        ledger.setup()
        try:
            policy = Policy(rules=ASK_DENY_RULES)
            agent = build_agent(
                _script([call]), TOOLS, policy=policy, ledger=ledger, checkpointer=saver
            )
            keel_result, _ = _run(agent)
        finally:
            ledger.close()
        middleware: list[AgentMiddleware[Any, Any, Any]] = [PermissionMiddleware(policy)]
        result, _ = _run(_middleware(saver, _script([call]), middleware))
    assert keel_result["outcome"]["terminated_reason"] == "completed"
    assert _statuses(keel_result["messages"]) == ["invalid_args"]
    assert "__interrupt__" not in result
    assert outcome_of(result)["terminated_reason"] == "completed"
    assert _statuses(result["messages"]) == ["invalid_args"]


def test_calls_a_model_named_alike_get_the_ids_build_agent_gives_them(db_url: str) -> None:
    """Two calls of a turn under one id, the second turn reusing it: `build_agent` renames them
    (`unique_ids`) before anything reads the answer; the middleware answered both under one id
    (a resume or a rejection keyed by it could not tell them apart)."""
    twice = [ToolCall(name="lookup", args={"order_id": o}, id="c1") for o in ("A", "B")]
    again = [ToolCall(name="lookup", args={"order_id": "C"}, id="c1")]
    turns = [AIMessage(content="", tool_calls=twice), AIMessage(content="", tool_calls=again)]

    def model() -> ScriptedChatModel:
        return ScriptedChatModel(script=[*turns, "Done."], fresh_ids=False)

    with Persistence(db_url).checkpointer() as saver:
        ledger = Ledger(db_url)
        ledger.setup()
        try:
            policy = Policy(rules=RULES)
            agent = build_agent(model(), TOOLS, policy=policy, ledger=ledger, checkpointer=saver)
            keel_result, _ = _run(agent)
        finally:
            ledger.close()
        middleware: list[AgentMiddleware[Any, Any, Any]] = [BudgetMiddleware(Budget())]
        result, saved = _run(_middleware(saver, model(), middleware))

    def answered(messages: list[Any]) -> list[tuple[str, str]]:
        return [(m.tool_call_id, m.text) for m in messages if isinstance(m, ToolMessage)]

    expected = [
        ("c1", "order A: shipped"),
        ("c1_2", "order B: shipped"),
        ("c1_3", "order C: shipped"),
    ]
    assert answered(keel_result["messages"]) == expected
    assert answered(result["messages"]) == expected
    calls = [c["id"] for m in saved if isinstance(m, AIMessage) for c in m.tool_calls]
    assert calls == ["c1", "c1_2", "c1_3"]  # the checkpoint holds the renamed calls


async def test_the_async_hooks_store_and_mark_as_the_sync_ones(db_url: str) -> None:
    """`ainvoke`: tuple keys stored as JSON carries them, ids renamed, bad calls not counted."""
    calls = [
        ToolCall(name="place", args=ARGS, id="c1"),
        ToolCall(name="Lookup", args={"order_id": "A"}, id="c1"),  # reuses the thread's id
        ToolCall(name="lookup", args={"order_id": "B"}, id="c2"),
    ]
    turns = [AIMessage(content="", tool_calls=[c]) for c in calls]
    model = ScriptedChatModel(script=[*turns, "Done."], fresh_ids=False)
    middleware: list[AgentMiddleware[Any, Any, Any]] = [
        BudgetMiddleware(Budget(tool_calls=1)),
        PermissionMiddleware(Policy(rules=RULES)),
    ]
    config: Any = {"configurable": {"thread_id": uuid.uuid4().hex}}
    async with Persistence(db_url).acheckpointer() as saver:
        agent = _middleware(saver, model, middleware)
        result = await agent.ainvoke({"messages": [("user", "go")]}, config, context=CTX)
        saved = (await agent.aget_state(config)).values["messages"]
    assert outcome_of(result)["terminated_reason"] == "completed"
    answers = [m for m in result["messages"] if isinstance(m, ToolMessage)]
    assert [m.tool_call_id for m in answers[:2]] == ["c1", "c1_2"]
    assert _statuses(result["messages"]) == ["invalid_args", "unknown_tool", "success"]
    assert saved[1].tool_calls[0]["args"] == READABLE


def _fits_now(amount: int) -> int:
    """A check of the arguments that reads the world, and reads it otherwise each time: it
    refuses every reading but the tool's own (`BaseTool._parse_input`, as the tool node runs
    it), as "amount <= balance" would while a deposit lands between keel's reading and the
    tool's."""
    if not any(frame.function == "_parse_input" for frame in inspect.stack()):
        raise ValueError("amount exceeds the balance")
    return amount


RAN: list[int] = []


@tool
def transfer(amount: Annotated[int, AfterValidator(_fits_now)]) -> str:
    """Move money."""
    RAN.append(amount)
    return f"moved {amount}"


def test_a_call_whose_arguments_do_not_fit_never_reaches_the_tool_node_ungated(
    db_url: str,
) -> None:
    """`PermissionMiddleware` answers a call whose arguments its tool's schema refuses itself,
    before the rules: handed on to the tool node, ungated, a check that reads the world (it
    reads again there) let the call through, and a tool a deny rule forbids ran."""
    RAN.clear()
    policy = Policy(rules=(Rule(role="*", tool="transfer", action="deny"),))
    with Persistence(db_url).checkpointer() as saver:
        agent = create_agent(
            _script([("transfer", {"amount": 5})]),
            [transfer],
            middleware=[PermissionMiddleware(policy)],
            context_schema=RunContext,
            checkpointer=saver,
        )
        result, _ = _run(agent)
    assert RAN == []
    assert _statuses(result["messages"]) == ["invalid_args"]
    assert "amount exceeds the balance" in result["messages"][2].text


def test_langchain_tool_call_schema_drops_an_args_schema_s_validators() -> None:
    """Pinned LangChain behaviour: a tool made with `args_schema=` gets a `tool_call_schema`
    (what the model is shown) that copies the fields, not the model's validators, its config
    or its aliases. keel therefore reads such a tool's arguments with its `args_schema`
    (`keel.tools._args._reading`; `tests/test_attack_args_schema_validators.py`)."""
    from langchain_core.tools import tool as langchain_tool
    from pydantic import BaseModel, ConfigDict, Field, field_validator

    class Refund(BaseModel):
        model_config = ConfigDict(str_strip_whitespace=True)
        amount: int
        note: str = Field("", alias="memo")

        @field_validator("amount")
        @classmethod
        def _never(cls, amount: int) -> int:
            raise ValueError("refused")

    @langchain_tool(args_schema=Refund)
    def refund(amount: int, note: str = "") -> str:
        """Refund."""
        return "done"

    assert refund.tool_call_schema is not Refund
    read = refund.tool_call_schema.model_validate({"amount": 5, "note": " x "})  # type: ignore[union-attr]
    assert (read.amount, read.note) == (5, " x ")
    assert "memo" not in refund.tool_call_schema.model_json_schema()["properties"]  # type: ignore[union-attr]


def _chaos(script: list[Any]) -> ChaosChatModel:
    """Every answer's tool calls broken: arguments that are not JSON (`invalid_tool_calls`)."""
    scripted = ScriptedChatModel(script=script, fresh_ids=True)
    return ChaosChatModel(model=scripted, policy=ChaosPolicy(malformed_tool_call=1.0, seed=3))


def _both(
    db_url: str,
    model: Callable[[], Any],
    middleware: Callable[[Ledger], list[AgentMiddleware[Any, Any, Any]]],
    tools: list[Any] = TOOLS,
    policy: Policy | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The same script under `build_agent` and under `create_agent` with `middleware`."""
    policy = policy or Policy(rules=RULES)
    with Persistence(db_url).checkpointer() as saver:
        ledger = Ledger(db_url)
        ledger.setup()
        try:
            agent = build_agent(model(), tools, policy=policy, ledger=ledger, checkpointer=saver)
            keel_result, _ = _run(agent)
            mw_agent = create_agent(
                model(),
                tools,
                middleware=middleware(ledger),
                context_schema=RunContext,
                checkpointer=saver,
            )
            result, saved = _run(mw_agent)
        finally:
            ledger.close()
    assert [m.type for m in saved] == [m.type for m in result["messages"]]  # it saved
    return keel_result, result


@pytest.mark.parametrize("stack", MODEL_HOOKED)
def test_a_model_that_only_breaks_its_tool_calls_ends_as_a_model_behavior_error(
    db_url: str, stack: str
) -> None:
    """An answer of only malformed tool calls (`invalid_tool_calls`, no `tool_calls`) is no
    tool call to `create_agent`: the run ended `completed` with an empty answer. `build_agent`
    answers each `invalid_args` and asks again; at `MALFORMED_TURNS` in a row the run ends as
    `error` (a `ModelBehaviorError`). Now so does the middleware, under any keel middleware."""
    script = [call("lookup", order_id="A1")] * 5

    keel_result, result = _both(
        db_url, lambda: _chaos(script), lambda ledger: _stacks(ledger)[stack]()
    )
    expected = ["invalid_args"] * MALFORMED_TURNS
    assert _statuses(keel_result["messages"]) == expected
    assert _statuses(result["messages"]) == expected
    assert keel_result["outcome"]["terminated_reason"] == "error"
    stopped = outcome_of(result)
    assert stopped == keel_result["outcome"]  # the same outcome, the same detail
    assert "ModelBehaviorError" in stopped["detail"]
    assert "malformed tool calls" in stopped["detail"]


def test_after_an_after_model_hook_a_malformed_answer_ends_the_run_failed(db_url: str) -> None:
    """Pinned LangChain behaviour: an `after_model` hook (here LangChain's own human-in-the-loop
    middleware) runs between the model node and the agent's routing, and LangChain's `jump_to`
    a model hook sets is gone when the agent routes: the agent ends after the first malformed
    answer, its calls answered. `outcome_of` then says the run failed, not `completed`."""
    from langchain.agents.middleware import HumanInTheLoopMiddleware

    model = _chaos([call("lookup", order_id="A1")] * 5)
    middleware: list[AgentMiddleware[Any, Any, Any]] = [
        PermissionMiddleware(Policy(rules=RULES)),
        HumanInTheLoopMiddleware(interrupt_on={"lookup": False}),
    ]
    with Persistence(db_url).checkpointer() as saver:
        result, _ = _run(_middleware(saver, model, middleware))
    assert _statuses(result["messages"]) == ["invalid_args"]  # one turn: the jump was lost
    stopped = outcome_of(result)
    assert stopped["terminated_reason"] == "error"
    assert "only malformed tool calls (lookup" in stopped["detail"]


def test_a_model_that_recovers_from_malformed_calls_goes_on_on_both_paths(db_url: str) -> None:
    """Two malformed answers, then a good call: the model is told and asked again each time."""
    broken = [
        AIMessage(
            content="",
            invalid_tool_calls=[
                {
                    "type": "invalid_tool_call",
                    "name": "lookup",
                    "args": '{"order_id": "A1"',
                    "id": f"bad-{uuid.uuid4().hex[:8]}",
                    "error": "not valid JSON",
                }
            ],
        )
        for _ in range(MALFORMED_TURNS - 1)
    ]

    def model() -> ScriptedChatModel:
        script = [*broken, call("lookup", order_id="A1"), "Done."]
        return ScriptedChatModel(script=script, fresh_ids=True)

    keel_result, result = _both(
        db_url, model, lambda ledger: [PermissionMiddleware(Policy(rules=RULES))]
    )
    expected = ["invalid_args"] * (MALFORMED_TURNS - 1) + ["success"]
    assert _statuses(keel_result["messages"]) == expected
    assert _statuses(result["messages"]) == expected
    assert keel_result["outcome"]["terminated_reason"] == "completed"
    assert outcome_of(result)["terminated_reason"] == "completed"
    assert result["messages"][-1].text == keel_result["messages"][-1].text == "Done."
    told = next(m.text for m in result["messages"] if isinstance(m, ToolMessage))
    assert "were not valid JSON" in told


def test_a_malformed_call_beside_a_valid_one_is_answered_with_its_turn_on_both_paths(
    db_url: str,
) -> None:
    """A turn with a valid call and a malformed one: `build_agent` answers the malformed one
    `invalid_args` with the turn and runs the other. `create_agent` left it unanswered until its
    next model call answered it its own way (no keel status, another text)."""

    def model() -> ScriptedChatModel:
        turn = AIMessage(
            content="",
            tool_calls=[ToolCall(name="lookup", args={"order_id": "A1"}, id=None)],
            invalid_tool_calls=[
                {
                    "type": "invalid_tool_call",
                    "name": "lookup",
                    "args": '{"order_id": ',
                    "id": f"bad-{uuid.uuid4().hex[:8]}",
                    "error": "not valid JSON",
                }
            ],
        )
        return ScriptedChatModel(script=[turn, "Done."], fresh_ids=True)

    keel_result, result = _both(
        db_url, model, lambda ledger: [PermissionMiddleware(Policy(rules=RULES))]
    )
    assert _statuses(keel_result["messages"]) == ["invalid_args", "success"]
    assert _statuses(result["messages"]) == ["invalid_args", "success"]
    assert keel_result["outcome"]["terminated_reason"] == "completed"
    assert outcome_of(result)["terminated_reason"] == "completed"
    bad = next(m.text for m in result["messages"] if isinstance(m, ToolMessage))
    assert bad == next(m.text for m in keel_result["messages"] if isinstance(m, ToolMessage))


@tool
def explode(order_id: str) -> str:
    """Look an order up in a store that is on fire."""
    raise RuntimeError(f"store for {order_id} is on fire")


@pytest.mark.parametrize("stack", TOOL_HOOKED)
def test_a_tool_that_raises_is_answered_error_on_both_paths(db_url: str, stack: str) -> None:
    """`create_agent`'s `ToolNode` (default `handle_tool_errors`) raised a tool's error out of
    `invoke`, a bare traceback; `build_agent` answers the call `error` and the run goes on.
    Every keel middleware with a tool hook now answers it as `build_agent` does."""

    def model() -> ScriptedChatModel:
        return ScriptedChatModel(script=[call("explode", order_id="A1"), "Done."])

    keel_result, result = _both(
        db_url, model, lambda ledger: _stacks(ledger)[stack](), tools=[explode]
    )
    assert _statuses(keel_result["messages"]) == _statuses(result["messages"]) == ["error"]
    assert keel_result["outcome"]["terminated_reason"] == "completed"
    assert outcome_of(result)["terminated_reason"] == "completed"
    answer = next(m for m in result["messages"] if isinstance(m, ToolMessage))
    assert answer.text == "Error: explode failed: RuntimeError: store for A1 is on fire"
    assert "RuntimeError: store for A1 is on fire" in keel_result["messages"][2].text


AUDIT_RULES = (
    Rule(role="support", tool="lookup", action="allow"),
    Rule(role="support", tool="explode", action="allow"),
    Rule(role="*", tool="place", action="deny", reason="no placing"),
)


def _audited_both(
    db_url: str,
    policy: Policy,
    turn: list[tuple[str, dict[str, Any]]],
    tools: list[Any],
    kind: str,
    answers: tuple[dict[str, Any], dict[str, Any]] | None = None,
) -> tuple[list[str], list[list[Any]]]:
    """`build_agent` and `create_agent` with `PermissionMiddleware`, each on a thread of its
    own, make `turn` (the human's `answers`, by alice, resume each); their threads and `kind`
    audit records."""
    with Persistence(db_url).checkpointer() as saver:
        ledger = Ledger(db_url)
        ledger.setup()
        try:
            agents = (
                build_agent(_script(turn), tools, policy=policy, ledger=ledger, checkpointer=saver),
                create_agent(
                    _script(turn),
                    tools,
                    middleware=[PermissionMiddleware(policy, ledger=ledger)],
                    context_schema=RunContext,
                    checkpointer=saver,
                ),
            )
            threads = []
            for agent, answer in zip(agents, answers or (None, None), strict=True):
                config: Any = {"configurable": {"thread_id": uuid.uuid4().hex}}
                agent.invoke({"messages": [("user", "go")]}, config, context=CTX)
                if answer is not None:
                    resume = Command(resume={**answer, "reviewer": "alice"})
                    agent.invoke(resume, config, context=CTX)
                threads.append(config["configurable"]["thread_id"])
            audit = AuditLog(ledger)
            return threads, [[r for r in audit.query(thread=t) if r.kind == kind] for t in threads]
        finally:
            ledger.close()


def test_permission_middleware_audits_each_call_as_build_agent_does(db_url: str) -> None:
    """With a ledger, `PermissionMiddleware` writes one `tool` audit record per call it answers,
    as `build_agent` does: the rules' decision, the status, the rule, who, which thread."""
    policy = Policy(rules=AUDIT_RULES)
    turn = [
        ("lookup", {"order_id": "A1"}),
        ("place", {"grid": {}}),
        ("Lookup", {"order_id": "A1"}),
        ("explode", {"order_id": "B2"}),
        ("lookup", {"order_id": "A1", "n": "abc"}),
    ]
    tools = [*TOOLS, explode]
    threads, rows = _audited_both(db_url, policy, turn, tools, "tool")

    def seen(records: list[Any]) -> list[tuple[Any, ...]]:
        return sorted(
            (r.tool, r.decision, r.status, r.rule, r.user_id, r.policy, r.tool_version, r.args)
            for r in records
        )

    keel_rows, mw_rows = rows
    assert len(mw_rows) == len(turn)
    assert seen(mw_rows) == seen(keel_rows)
    assert {r.thread_id for r in mw_rows} == {threads[1]}
    assert sorted((r.tool, r.decision, r.status) for r in mw_rows) == [
        ("Lookup", "deny", "unknown_tool"),
        ("explode", "allow", "error"),
        ("lookup", "allow", "invalid_args"),
        ("lookup", "allow", "success"),
        ("place", "deny", "denied"),
    ]


REVIEWS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "approved": ({"type": "approve"}, {"type": "approve"}),
    "edited": (
        {"type": "edit", "args": {"order_id": "B2"}},
        {"type": "edit", "edited_action": {"name": "lookup", "args": {"order_id": "B2"}}},
    ),
    "rejected": ({"type": "reject", "message": "no"}, {"type": "reject", "message": "no"}),
    "responded": (
        {"type": "respond", "message": "A1 shipped"},
        {"type": "respond", "message": "A1 shipped"},
    ),
}
"""Each human decision, as `build_agent`'s resume and as `PermissionMiddleware`'s takes it."""


@pytest.mark.parametrize("decision", REVIEWS)
def test_permission_middleware_audits_a_humans_decision_as_build_agent_does(
    db_url: str, decision: str
) -> None:
    """With a ledger, `PermissionMiddleware` wrote a `tool` record per call and none of the
    human's decision; `build_agent` writes an `approval` record: the decision, the arguments
    (the edited ones for an edit), who decided, the reply. The middleware now writes it too."""
    policy = Policy(rules=(Rule(role="support", tool="lookup", action="ask"),))
    turn = [("lookup", {"order_id": "A1"})]
    threads, rows = _audited_both(db_url, policy, turn, TOOLS, "approval", REVIEWS[decision])

    def seen(records: list[Any]) -> list[tuple[Any, ...]]:
        return [
            (r.decision, r.tool, r.args, r.approver, r.result, r.user_id, r.policy, r.tool_version)
            for r in records
        ]

    keel_rows, mw_rows = rows
    assert seen(mw_rows) == seen(keel_rows)
    (row,) = mw_rows
    assert (row.decision, row.approver, row.thread_id) == (decision, "alice", threads[1])
    assert row.args == {"order_id": "B2" if decision == "edited" else "A1"}


async def test_the_async_hooks_ask_again_answer_errors_and_audit_as_the_sync_ones(
    ledger: Ledger,
) -> None:
    """`ainvoke`: a malformed answer is answered and asked again, a tool's error is answered
    `error`, and each call `PermissionMiddleware` answers is audited."""
    broken = AIMessage(
        content="",
        invalid_tool_calls=[
            {
                "type": "invalid_tool_call",
                "name": "explode",
                "args": "{",
                "id": None,
                "error": "not valid JSON",
            }
        ],
    )
    script: list[Any] = [broken, call("explode", order_id="A1"), "Done."]
    model = ScriptedChatModel(script=script, fresh_ids=True)
    policy = Policy(rules=AUDIT_RULES)
    config: Any = {"configurable": {"thread_id": uuid.uuid4().hex}}
    async with Persistence(ledger.url).acheckpointer() as saver:
        agent = create_agent(
            model,
            [explode],
            middleware=[PermissionMiddleware(policy, ledger=ledger)],
            context_schema=RunContext,
            checkpointer=saver,
        )
        result = await agent.ainvoke({"messages": [("user", "go")]}, config, context=CTX)
    assert outcome_of(result)["terminated_reason"] == "completed"
    assert _statuses(result["messages"]) == ["invalid_args", "error"]
    rows = await AuditLog(ledger).aquery(thread=config["configurable"]["thread_id"])
    assert [(r.tool, r.decision, r.status) for r in rows] == [("explode", "allow", "error")]


def test_an_audit_write_the_ledger_refuses_is_logged_and_the_run_goes_on(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A closed ledger refuses every write (`StorageError`): the call is answered and the run
    ends as it would have, the refusal logged."""
    closed = Ledger(db_url)
    closed.setup()
    closed.close()
    middleware: list[AgentMiddleware[Any, Any, Any]] = [
        PermissionMiddleware(Policy(rules=RULES), ledger=closed)
    ]
    with Persistence(db_url).checkpointer() as saver:
        result, _ = _run(_middleware(saver, _script([("lookup", {"order_id": "A1"})]), middleware))
    assert outcome_of(result)["terminated_reason"] == "completed"
    assert _statuses(result["messages"]) == ["success"]
    assert "could not write the audit record" in caplog.text


FLAKY: list[str] = []


@tool
def flaky(order_id: str) -> str:
    """Look an order up in a store that fails its first call."""
    FLAKY.append(order_id)
    if len(FLAKY) == 1:
        raise ConnectionError("store unreachable")
    return f"order {order_id}: shipped"


@pytest.mark.parametrize("inside", [True, False], ids=["retry_inside", "retry_around"])
def test_a_retry_middleware_sees_a_tool_s_error_only_inside_keel_s(inside: bool) -> None:
    """LangChain's `ToolRetryMiddleware` acts on a tool's exception: placed after keel's
    middleware (inside it) it retries the call; placed before (around it) it reads keel's
    `error` answer, and the call is not retried."""
    from langchain.agents.middleware import ToolRetryMiddleware

    FLAKY.clear()
    retry = ToolRetryMiddleware(max_retries=1, initial_delay=0, jitter=False)
    permission = PermissionMiddleware(Policy(rules=RULES))
    middleware: list[AgentMiddleware[Any, Any, Any]] = (
        [permission, retry] if inside else [retry, permission]
    )
    agent = create_agent(
        ScriptedChatModel(script=[call("flaky", order_id="A1"), "Done."]),
        [flaky],
        middleware=middleware,
        context_schema=RunContext,
    )
    result = agent.invoke({"messages": [("user", "go")]}, context=CTX)
    assert outcome_of(result)["terminated_reason"] == "completed"
    if inside:
        assert FLAKY == ["A1", "A1"]
        assert _statuses(result["messages"]) == ["success"]
    else:
        assert FLAKY == ["A1"]
        assert _statuses(result["messages"]) == ["error"]


def test_a_stubbed_run_writes_no_audit_record(db_url: str) -> None:
    """A replay or shadow run (`keel.tools.stubs.stubbing`) is `isolated()`: production's audit
    log gets no record of its calls, as under `build_agent`."""
    from keel.tools.stubs import StubAnswer, stubbing

    config: Any = {"configurable": {"thread_id": uuid.uuid4().hex}}
    with Persistence(db_url).checkpointer() as saver:
        ledger = Ledger(db_url)
        ledger.setup()
        try:
            agent = _middleware(
                saver,
                _script([("lookup", {"order_id": "A1"})]),
                [PermissionMiddleware(Policy(rules=RULES), ledger=ledger)],
            )
            with stubbing(lambda tool, call: StubAnswer("stubbed")):
                result = agent.invoke({"messages": [("user", "go")]}, config, context=CTX)
            rows = AuditLog(ledger).query(thread=config["configurable"]["thread_id"])
        finally:
            ledger.close()
    assert [m.text for m in result["messages"] if isinstance(m, ToolMessage)] == ["stubbed"]
    assert rows == []
