"""A client edits a `create_agent` run's messages while it waits, to reset keel's run counts.

`BudgetMiddleware` and `LoopGuardMiddleware` read the run's model calls, tool calls and repeats.
Read from the run's messages alone, a client that may update the thread's state reset them:
while a call waited for a human (`PermissionMiddleware`'s `ask`), it removed the run's earlier
AI and tool messages (`update_state`, or `Command(update=...)` beside the resume), or rewrote
their results as refused, and `Budget(tool_calls=2)` ran six refunds, `max_repeats=3` let the
same refund run six times. Found open, fixed: each middleware also keeps the run's records in a
private key only merges reach (`SPENT_KEY`, `CALLS_KEY`: `RunRecordsChannel`), written beside
the message it counts; the run's counts are the larger of the two, and an `Overwrite` of the
records is dropped, never raised (the thread stays readable). `build_agent` keeps its usage in
keel-owned state and refuses such edits of a waiting run (`graphs/_pending.py`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, BaseMessage, RemoveMessage, ToolMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command, Overwrite

from keel import Persistence
from keel.evals import ScriptedChatModel, call
from keel.guards import (
    Budget,
    BudgetMiddleware,
    LoopGuardMiddleware,
    LoopPolicy,
    PermissionMiddleware,
    Policy,
    Rule,
    outcome_of,
)
from keel.guards.middleware import CALLS_KEY, SPENT_KEY
from keel.state import RunContext
from keel.tools import tool

SUPPORT = RunContext(user_id="u1", tenant_id="acme", roles=("support",))
ASK = Policy(rules=(Rule(role="support", tool="issue_refund", action="ask"),))
APPROVE = {"type": "approve"}
CFG: dict[str, Any] = {"configurable": {"thread_id": "t"}}
WAITS = 6
"""Approvals a client gives at most: an unguarded run asks for a refund at every turn."""


def agent(guard: str, ran: list[str], saver: Any = None) -> Any:
    """An agent whose model asks for a refund at every turn, whatever the history says.

    `budget`: a new order each time, under `Budget(tool_calls=2)`; `loop`: the same order,
    under `LoopPolicy(max_repeats=3)`. A human is asked about each refund.
    """

    @tool(risk="write")
    def issue_refund(order_id: str) -> str:
        """Refund an order."""
        ran.append(order_id)
        return f"refunded {order_id}"

    orders = itertools.count()

    def turn(messages: Sequence[BaseMessage]) -> AIMessage:
        order = f"O{next(orders)}" if guard == "budget" else "A1"
        return call("issue_refund", order_id=order)

    middleware: Any = (
        BudgetMiddleware(Budget(tool_calls=2))
        if guard == "budget"
        else LoopGuardMiddleware(LoopPolicy(max_repeats=3, on_loop="stop"))
    )
    return create_agent(
        ScriptedChatModel(script=[turn] * 40),
        [issue_refund],
        middleware=[middleware, PermissionMiddleware(ASK)],
        context_schema=RunContext,
        checkpointer=saver or InMemorySaver(),
    )


def _earlier(messages: Sequence[BaseMessage]) -> tuple[list[BaseMessage], AIMessage]:
    """The run's AI and tool messages before the waiting turn, and the waiting turn."""
    waiting = [m for m in messages if isinstance(m, AIMessage)][-1]
    earlier = [m for m in messages if isinstance(m, AIMessage | ToolMessage) and m.id != waiting.id]
    return earlier, waiting


def _removed(messages: Sequence[BaseMessage]) -> list[Any]:
    return [RemoveMessage(id=str(m.id)) for m in _earlier(messages)[0]]


def _refused(messages: Sequence[BaseMessage]) -> list[Any]:
    """Each earlier tool result rewritten in place (its id) as a call the rules refused."""
    return [
        ToolMessage(
            "Not permitted.",
            id=m.id,
            tool_call_id=m.tool_call_id,
            status="error",
            response_metadata={"keel_status": "denied"},
        )
        for m in _earlier(messages)[0]
        if isinstance(m, ToolMessage)
    ]


def _by_update_state(graph: Any, edit: list[Any]) -> Any:
    graph.update_state(CFG, {"messages": edit})
    graph.invoke(None, CFG, context=SUPPORT)  # the update dropped the question: asked again
    return graph.invoke(Command(resume=APPROVE), CFG, context=SUPPORT)


def _beside_the_resume(graph: Any, edit: list[Any]) -> Any:
    return graph.invoke(Command(update={"messages": edit}, resume=APPROVE), CFG, context=SUPPORT)


def _records_overwritten(graph: Any, edit: list[Any]) -> Any:
    """The messages removed, and the records cleared (`Overwrite`, its JSON form) with them."""
    cleared = {"messages": edit, SPENT_KEY: Overwrite({}), CALLS_KEY: {"__overwrite__": {}}}
    graph.update_state(CFG, cleared)
    graph.invoke(None, CFG, context=SUPPORT)
    return graph.invoke(
        Command(update={SPENT_KEY: Overwrite({})}, resume=APPROVE), CFG, context=SUPPORT
    )


EDITS: dict[str, tuple[Callable[[Sequence[BaseMessage]], list[Any]], Callable[..., Any]]] = {
    "none": (
        lambda messages: [],
        lambda g, edit: g.invoke(Command(resume=APPROVE), CFG, context=SUPPORT),
    ),
    "removed by update_state": (_removed, _by_update_state),
    "removed beside the resume": (_removed, _beside_the_resume),
    "results rewritten as refused": (_refused, _by_update_state),
    "removed, the records overwritten": (_removed, _records_overwritten),
}


def attacked(graph: Any, edit: str, task: str = "refund my orders") -> tuple[Any, int]:
    """Run `task`; at each wait, edit the run's messages as `edit` says and approve.

    The final result, and how many approvals the client gave.
    """
    written, send = EDITS[edit]
    result = graph.invoke({"messages": [("user", task)]}, CFG, context=SUPPORT)
    for given in range(WAITS):
        state = graph.get_state(CFG)
        if not state.next:
            return result, given
        result = send(graph, written(state.values["messages"]))
    return result, WAITS


@pytest.mark.parametrize("edit", EDITS)
def test_a_budget_holds_whatever_the_client_edits_while_the_run_waits(edit: str) -> None:
    """`Budget(tool_calls=2)`: two refunds run, the third is not run and the run stops."""
    ran: list[str] = []
    result, _ = attacked(agent("budget", ran), edit)
    assert ran == ["O0", "O1"]
    assert outcome_of(result)["terminated_reason"] == "budget_exceeded"


@pytest.mark.parametrize("edit", EDITS)
def test_the_loop_guard_holds_whatever_the_client_edits_while_the_run_waits(edit: str) -> None:
    """`max_repeats=3`: the third refund of A1 in a row is the loop; two ran."""
    ran: list[str] = []
    result, _ = attacked(agent("loop", ran), edit)
    assert ran == ["A1", "A1"]
    assert outcome_of(result)["terminated_reason"] == "loop_detected"


@pytest.mark.parametrize("guard", ["budget", "loop"])
def test_a_new_message_starts_a_new_run_and_removing_it_counts_more_not_less(guard: str) -> None:
    """A user message starts a run with its own budget and its own calls (as in `build_agent`).
    A client that removes it (and every turn of the thread) while the run waits moves the
    run's start back to the previous run's: the records count from there on, both runs'."""
    ran: list[str] = []
    graph = agent(guard, ran)
    attacked(graph, "none", "first")
    assert len(ran) == 2
    graph.invoke({"messages": [("user", "second")]}, CFG, context=SUPPORT)
    messages = graph.get_state(CFG).values["messages"]
    second = next(m for m in reversed(messages) if m.type == "human")
    edit = [RemoveMessage(id=str(second.id)), *_removed(messages)]  # and every earlier turn
    result = _by_update_state(graph, edit)
    # the budget: the first run's two refunds count, the waiting one is not run; the loop
    # guard: the waiting refund (no repeat in its own run) ran, the next is the fourth in a row
    assert len(ran) == (2 if guard == "budget" else 3)
    reason = "budget_exceeded" if guard == "budget" else "loop_detected"
    assert outcome_of(result)["terminated_reason"] == reason


def test_a_client_cannot_lower_a_record_and_an_overwrite_bricks_nothing() -> None:
    """A record written again under its key keeps the larger count; a run's
    `Command(update=...)` clearing the records is dropped (LangGraph saves it before applying
    it: a channel that raised would refuse every later read of the thread)."""
    ran: list[str] = []
    graph = agent("budget", ran)
    attacked(graph, "none")
    spent = graph.get_state(CFG).values[SPENT_KEY]
    lowered = {
        k: {**r, **{f: 0 for f in ("tool_calls", "model_calls") if f in r}}
        for k, r in spent.items()
    }
    graph.update_state(CFG, {SPENT_KEY: lowered})
    assert graph.get_state(CFG).values[SPENT_KEY] == spent
    graph.invoke(Command(update={SPENT_KEY: Overwrite({})}), CFG, context=SUPPORT)
    assert graph.get_state(CFG).values[SPENT_KEY] == spent
    assert graph.invoke({"messages": [("user", "again")]}, CFG, context=SUPPORT)["messages"]


@pytest.mark.parametrize("guard", ["budget", "loop"])
def test_the_records_hold_in_a_database_checkpoint(db_url: str, guard: str) -> None:
    """On LangGraph's SQLite and PostgreSQL savers (the records are read back in the order
    written, from the saved checkpoint), the run's turns removed at each wait."""
    ran: list[str] = []
    with Persistence(db_url).checkpointer() as saver:
        result, _ = attacked(agent(guard, ran, saver), "removed by update_state")
    assert ran == (["O0", "O1"] if guard == "budget" else ["A1", "A1"])
    reason = "budget_exceeded" if guard == "budget" else "loop_detected"
    assert outcome_of(result)["terminated_reason"] == reason
