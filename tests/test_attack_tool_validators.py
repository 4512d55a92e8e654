"""A tool whose own argument check has a bug, fed arguments that trip it by a model.

pydantic turns only `ValueError` / `AssertionError` raised in a validator into a validation
error; anything else (a division by an argument that is 0, a `KeyError`) went through keel's
argument check (the schema check, the ledger's digest, the approval digests all read the
arguments through it) and ended the run in a bare traceback, on arguments the model chose. The
call is answered `invalid_args` saying so, the tool never runs on them, the run goes on.
"""

from __future__ import annotations

from typing import Annotated, Any

from langchain_core.messages import AIMessage, ToolCall, ToolMessage
from pydantic import AfterValidator

from keel import Ledger, Persistence, RunContext, build_agent, tool
from keel.evals import ScriptedChatModel
from keel.guards import Policy, Rule

WHO = RunContext(user_id="u1", tenant_id="acme", roles=("support",))


def _per_unit(n: int) -> int:
    if 100 // n > 100:  # the developer's bug: an argument of 0 divides by zero
        raise ValueError("too small")
    return n


def _shop(paid: list[int]) -> Any:
    @tool(risk="write")
    def pay(n: Annotated[int, AfterValidator(_per_unit)]) -> str:
        """Pay n units."""
        paid.append(n)
        return f"paid {n}"

    return pay


def _turn() -> AIMessage:
    calls = [ToolCall(name="pay", args={"n": n}, id=None) for n in (0, 5)]
    return AIMessage("", tool_calls=calls)


def test_a_validator_that_crashes_on_the_models_arguments_answers_that_call(db_url: str) -> None:
    paid: list[int] = []
    ledger = Ledger(db_url)
    model = ScriptedChatModel(script=[_turn(), "Paid what I could."], fresh_ids=True)
    with Persistence(db_url).checkpointer() as saver:
        agent = build_agent(model, [_shop(paid)], ledger=ledger, checkpointer=saver)
        done = agent.invoke(
            {"messages": [("user", "pay 0 and 5")]},
            {"configurable": {"thread_id": "t"}},
            context=WHO,
        )
    ledger.close()
    assert done["outcome"]["terminated_reason"] == "completed", done["outcome"]
    assert paid == [5]
    answers = [m for m in done["messages"] if isinstance(m, ToolMessage)]
    (tripped,) = [m for m in answers if "ZeroDivisionError" in m.text]
    assert tripped.status == "error" and "own check of these arguments failed" in tripped.text


def test_a_call_under_review_whose_validator_crashes_is_answered_without_asking(
    db_url: str,
) -> None:
    paid: list[int] = []
    policy = Policy(rules=(Rule(role="support", tool="pay", action="ask", reason="money"),))
    model = ScriptedChatModel(
        script=[AIMessage("", tool_calls=[ToolCall(name="pay", args={"n": 0}, id=None)]), "No."],
        fresh_ids=True,
    )
    with Persistence(db_url).checkpointer() as saver:
        agent = build_agent(model, [_shop(paid)], policy=policy, checkpointer=saver)
        done = agent.invoke(
            {"messages": [("user", "pay 0")]}, {"configurable": {"thread_id": "t"}}, context=WHO
        )
    assert done["outcome"]["terminated_reason"] == "completed", done["outcome"]  # no pause
    assert paid == []
