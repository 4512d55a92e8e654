"""One rule for what a tool's circuit breaker counts, in both ways of guarding an agent.

`keel.guards.ToolGuard` owns it: handed a call's keel status (`keel_status`), it counts the
call as a success, a failure or not at all. `build_agent`'s tool node (`policy.tool_breaker`)
and `CircuitBreakerMiddleware(tool=...)` around `create_agent` both hand it the status, and
this table checks they count each status alike. The breaker is shared by every thread through
the ledger, so a call the tool never ran (refused, rejected, arguments that did not fit, a
tool that does not exist, a twin of another call) must not count: a model told by an injection
to make such calls again and again would make the tool unavailable to every other user.

Each scenario runs with the tool's breaker half-open (one failure opened it, the cooldown
passed): a success then counts one success, a failure opens it again, and an uncounted call
leaves it as it was. Real SQLite and PostgreSQL ledgers.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import pytest
from langchain.agents import create_agent
from langchain.tools import ToolRuntime
from langchain_core.messages import AIMessage, ToolCall, ToolMessage
from langchain_core.tools import ToolException
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command

from keel import Ledger, RunContext, build_agent, tool
from keel.evals import ScriptedChatModel
from keel.guards import (
    BreakerPolicy,
    Budget,
    BudgetMiddleware,
    CircuitBreaker,
    CircuitBreakerMiddleware,
    InputGuardMiddleware,
    PermissionMiddleware,
    Policy,
    Rule,
    ToolGuard,
)
from keel.guards.breaker import BreakerState
from keel.nodes.execute_tools import ToolStatus
from keel.tools._duplicates import DUPLICATE_KEY

BREAKER = BreakerPolicy(failure_threshold=1, cooldown_seconds=0.05, success_threshold=5)
RULES = (
    Rule(role="support", tool="lookup_order", action="allow"),
    Rule(role="support", tool="flaky", action="allow"),
    Rule(role="support", tool="issue_refund", action="ask", reason="refunds need a manager"),
)
CTX = RunContext(user_id="u1", roles=("support",))


@tool
def lookup_order(order_id: str, n: int = 1) -> str:
    """Look an order up."""
    if order_id == "huge":  # more than the input guard lets the model read: blocked
        return "x" * 60_000
    return f"order {order_id}: shipped"


@tool
def flaky(order_id: str) -> str:
    """Fail."""
    raise RuntimeError("the backend is down")


@tool(risk="write")
def issue_refund(order_id: str, amount: int) -> str:
    """Refund an order."""
    return f"refunded {amount} on {order_id}"


@tool(risk="write")
def wipe(order_id: str) -> str:
    """Wipe an order (no rule allows it: denied)."""
    return "wiped"


TOOLS = [lookup_order, flaky, issue_refund, wipe]


@dataclass(frozen=True)
class Case:
    status: str
    """The keel status the call ends with."""
    calls: tuple[tuple[str, dict[str, Any]], ...]
    breaker: str
    """The tool whose breaker is watched."""
    counted: str
    """What the breaker counted: `success`, `failure` or `nothing`."""
    resume: dict[str, Any] | None = None


REFUND = ("issue_refund", {"order_id": "A1", "amount": 10})
LOOKUP = ("lookup_order", {"order_id": "A1"})
LOOKUP_B = ("lookup_order", {"order_id": "B2"})
LOOKUP_C = ("lookup_order", {"order_id": "C3"})
BUDGET = Budget(tool_calls=2)
CASES = [
    Case("success", (("lookup_order", {"order_id": "A1"}),), "lookup_order", "success"),
    Case("error", (("flaky", {"order_id": "A1"}),), "flaky", "failure"),
    Case(
        "invalid_args",
        (("lookup_order", {"order_id": "A1", "n": "abc"}),),
        "lookup_order",
        "nothing",
    ),
    Case("unknown_tool", (("Lookup_Order", {"order_id": "A1"}),), "Lookup_Order", "nothing"),
    Case("denied", (("wipe", {"order_id": "A1"}),), "wipe", "nothing"),
    Case("rejected", (REFUND,), "issue_refund", "nothing", {"type": "reject"}),
    Case("respond", (REFUND,), "issue_refund", "nothing", {"type": "respond", "message": "no"}),
    # the twin is not run: the breaker counts the one call that ran, once
    Case("not_run", (REFUND, REFUND), "issue_refund", "success", {"type": "approve"}),
    # the tool ran and answered; the input guard withheld what it said: the tool did not fail
    Case("blocked", (("lookup_order", {"order_id": "huge"}),), "lookup_order", "success"),
    # the budget holds two tool calls: the third of the turn is not run
    Case("budget_stopped", (LOOKUP, LOOKUP_B, LOOKUP_C), "lookup_order", "2 successes"),
]


def _half_open(ledger: Ledger, key: str) -> None:
    breaker = CircuitBreaker(ledger, BREAKER)
    breaker.record(key, False)
    assert breaker.state(key).state == "open"
    time.sleep(BREAKER.cooldown_seconds * 2)
    breaker.before(key)
    assert breaker.state(key).state == "half_open"


def _counted(ledger: Ledger, key: str) -> str:
    state = CircuitBreaker(ledger, BREAKER).state(key)
    if state.state == "open":
        return "failure"
    assert state.state == "half_open", state
    return {0: "nothing", 1: "success"}.get(state.successes, f"{state.successes} successes")


def _script(case: Case) -> ScriptedChatModel:
    turn = AIMessage(
        content="", tool_calls=[ToolCall(name=n, args=dict(a), id=None) for n, a in case.calls]
    )
    return ScriptedChatModel(script=[turn, "Done."], fresh_ids=True)


def _statuses(result: dict[str, Any]) -> list[str]:
    """Each tool answer's keel status; a twin's `not_run` (`build_agent` answers a twin with the
    answer of the call it repeats, `keel_duplicate_of` naming it)."""
    return [
        "not_run"
        if DUPLICATE_KEY in m.response_metadata
        else m.response_metadata.get("keel_status", m.status)
        for m in result["messages"]
        if isinstance(m, ToolMessage)
    ]


def _run(graph: Any, case: Case) -> list[str]:
    config: Any = {"configurable": {"thread_id": uuid.uuid4().hex}}
    try:
        result = graph.invoke({"messages": [("user", "go")]}, config, context=CTX)
    except RuntimeError as exc:  # create_agent's tool node lets a tool's error through
        assert case.status == "error" and "the backend is down" in str(exc)
        return ["error"]
    if case.resume is not None:
        result = graph.invoke(Command(resume=case.resume), config, context=CTX)
    assert "__interrupt__" not in result
    return _statuses(result)


def _keel_agent(ledger: Ledger, case: Case) -> list[str]:
    policy = Policy(rules=RULES, tool_breaker=BREAKER, budget=BUDGET)
    agent = build_agent(
        _script(case), TOOLS, policy=policy, ledger=ledger, checkpointer=InMemorySaver()
    )
    return _run(agent, case)


def _middleware_agent(ledger: Ledger, case: Case) -> list[str]:
    agent = create_agent(
        _script(case),
        TOOLS,
        middleware=[
            CircuitBreakerMiddleware(ledger, tool=BREAKER),
            BudgetMiddleware(BUDGET),
            PermissionMiddleware(Policy(rules=RULES)),
            InputGuardMiddleware(),
        ],
        context_schema=RunContext,
        checkpointer=InMemorySaver(),
    )
    return _run(agent, case)


@pytest.mark.parametrize("case", CASES, ids=[c.status for c in CASES])
def test_both_ways_of_guarding_an_agent_count_each_status_alike(db_url: str, case: Case) -> None:
    ledger = Ledger(db_url)
    ledger.setup()
    key, counted = f"tool:{case.breaker}", {}
    try:
        for way, run in (("build_agent", _keel_agent), ("middleware", _middleware_agent)):
            _half_open(ledger, key)
            statuses = run(ledger, case)
            assert case.status in statuses, (way, statuses)
            counted[way] = _counted(ledger, key)
    finally:
        ledger.close()
    assert counted == {"build_agent": case.counted, "middleware": case.counted}


SPELLINGS = [
    "Lookup_Order",
    "lookup_order ",
    " lookup_order",
    "LOOKUP_ORDER",
    "\u0142ookup_order",  # ł
    "lookup_\u043erder",  # a Cyrillic o
    "lookup_order\u200b",  # a zero-width space
    "\uff4cookup_order",  # a fullwidth l
]


def test_parallel_calls_under_odd_spellings_of_a_tool_open_no_breaker(db_url: str) -> None:
    """The attack: a model (fresh ids each turn) calls a tool under spellings no tool has, in
    parallel, turn after turn. Nothing runs; each spelling's call counted as a failure under
    a breaker of its own (a ledger row per spelling a model makes up, each opened at the
    threshold); the real tool's breaker was untouched. None is kept now."""
    ledger = Ledger(db_url)
    ledger.setup()
    calls = [ToolCall(name=n, args={"order_id": "A1"}, id=None) for n in SPELLINGS]
    turn = AIMessage(content="", tool_calls=calls)
    agent = create_agent(
        ScriptedChatModel(script=[turn, turn, "Done."], fresh_ids=True),
        TOOLS,
        middleware=[
            CircuitBreakerMiddleware(ledger, tool=BreakerPolicy(failure_threshold=1)),
            PermissionMiddleware(Policy(rules=RULES)),
        ],
        context_schema=RunContext,
        checkpointer=InMemorySaver(),
    )
    try:
        config: Any = {"configurable": {"thread_id": "t"}}
        result = agent.invoke({"messages": [("user", "go")]}, config, context=CTX)
        assert _statuses(result) == ["unknown_tool"] * 2 * len(SPELLINGS)
        breaker = CircuitBreaker(ledger, BreakerPolicy(failure_threshold=1))
        for name in [*SPELLINGS, "lookup_order"]:
            assert breaker.state(f"tool:{name}") == BreakerState(), name
    finally:
        ledger.close()


def test_the_rule_decides_every_status_keel_gives() -> None:
    """`ToolGuard.counts` over every keel status (`ToolStatus`): only a call the tool ran counts;
    a status keel does not know counts for nothing (it cannot open a shared breaker)."""
    expected = {"success": True, "blocked": True, "error": False, "timeout": False}
    assert {s: ToolGuard.counts(s) for s in get_args(ToolStatus)} == {
        s: expected.get(s) for s in get_args(ToolStatus)
    }
    assert ToolGuard.counts("made-up") is None and ToolGuard.counts(None) is None
    # a Command's several answers: a failure decides, then a success, then what there is
    assert ToolGuard.deciding(["denied", "success", "timeout"]) == "timeout"
    assert ToolGuard.deciding(["rejected", "success"]) == "success"
    assert ToolGuard.deciding(["rejected"]) == "rejected"
    assert ToolGuard.deciding([]) == "success"


@tool
def failing_lookup(order_id: str, runtime: ToolRuntime) -> str:
    """Look an order up (the backend answers with an error)."""
    raise ToolException("the backend is down")


failing_lookup.handle_tool_error = True  # the tool node answers the error as a message


def test_a_call_naming_an_injected_argument_that_ran_and_failed_counts_as_a_failure(
    tmp_path: Path,
) -> None:
    """The tool node replaces an injected argument a model names (`runtime`) and runs the tool:
    its failure is the tool's, counted as one (not taken for arguments that did not fit)."""
    ledger = Ledger(f"sqlite:///{tmp_path}/keel.db")
    ledger.setup()
    forged = ToolCall(name="failing_lookup", args={"order_id": "A1", "runtime": "x"}, id=None)
    agent = create_agent(
        ScriptedChatModel(script=[AIMessage(content="", tool_calls=[forged]), "Done."]),
        [failing_lookup],
        middleware=[CircuitBreakerMiddleware(ledger, tool=BreakerPolicy(failure_threshold=1))],
        checkpointer=InMemorySaver(),
    )
    try:
        result = agent.invoke({"messages": [("user", "go")]}, {"configurable": {"thread_id": "t"}})
        (answer,) = [m for m in result["messages"] if isinstance(m, ToolMessage)]
        assert answer.status == "error" and "the backend is down" in answer.text
        breaker = CircuitBreaker(ledger, BreakerPolicy(failure_threshold=1))
        assert breaker.state("tool:failing_lookup").state == "open"
    finally:
        ledger.close()
