"""A LangChain `create_agent` with keel's `PermissionMiddleware`, served by the e2e test.

Only `admin` may delete accounts; the scripted model tries to, for whoever asks. `ask_graph`
asks a human about each refund (`support`), which the scripted model makes; `reject_graph`
asks for a refund again, spelled anew under a new id, after a human rejected it.
`budget_graph` and `loop_graph` ask for a refund at every turn, under a budget and a loop guard.
"""

from __future__ import annotations

import itertools
from typing import Any

from langchain.agents import create_agent
from langchain_core.tools import tool

from keel.evals import ScriptedChatModel, call
from keel.guards import (
    Budget,
    BudgetMiddleware,
    LoopGuardMiddleware,
    LoopPolicy,
    PermissionMiddleware,
    Policy,
    Rule,
)

DELETED: list[str] = []

POLICY = Policy(
    name="accounts",
    rules=(Rule(role="admin", tool="delete_account", action="allow"),),
)


@tool
def delete_account(user: str) -> str:
    """Delete a user's account."""
    DELETED.append(user)
    return f"deleted {user}"


def served(fn: Any, first: Any, policy: Policy) -> Any:
    """A `create_agent` whose scripted model makes the call `first`, then answers."""
    model = ScriptedChatModel(script=[first, "done"])
    return create_agent(model, tools=[fn], middleware=[PermissionMiddleware(policy)])


@tool
def issue_refund(order_id: str) -> str:
    """Refund an order."""
    return f"refunded {order_id}"


graph = served(delete_account, call("delete_account", user="bob"), POLICY)
ask_graph = served(
    issue_refund,
    call("issue_refund", order_id="A1"),
    Policy(rules=(Rule(role="support", tool="*", action="ask"),)),
)


@tool
def refund(order_id: str, amount: int) -> str:
    """Refund an amount on an order."""
    return f"refunded {amount} on {order_id}"


reject_graph = create_agent(
    ScriptedChatModel(
        script=[
            call("refund", order_id="A1", amount=10),
            call("refund", order_id="A1", amount="10"),
            "done",
        ],
        fresh_ids=True,
    ),
    tools=[refund],
    middleware=[
        PermissionMiddleware(Policy(rules=(Rule(role="support", tool="*", action="ask"),)))
    ],
)
"""Asks about a refund of 10, then (rejected) for it again spelled `"10"` under a new id."""


_ORDERS = itertools.count()


def _new_refund(messages: Any) -> Any:
    return call("issue_refund", order_id=f"O{next(_ORDERS)}")


def _same_refund(messages: Any) -> Any:
    return call("issue_refund", order_id="A1")


def _refunds(turn: Any, guard: Any) -> Any:
    """An agent whose model asks for a refund at every turn, a human asked about each."""
    ask = Policy(rules=(Rule(role="support", tool="*", action="ask"),))
    return create_agent(
        ScriptedChatModel(script=[turn] * 40),
        tools=[issue_refund],
        middleware=[guard, PermissionMiddleware(ask)],
    )


budget_graph = _refunds(_new_refund, BudgetMiddleware(Budget(tool_calls=2)))
"""A new refund at every turn, under `Budget(tool_calls=2)`."""
loop_graph = _refunds(_same_refund, LoopGuardMiddleware(LoopPolicy(max_repeats=3, on_loop="stop")))
"""The same refund at every turn, under `LoopPolicy(max_repeats=3)`."""
