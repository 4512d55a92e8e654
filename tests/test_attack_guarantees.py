"""Attacks on README's "What every run guarantees" and "Durable side effects" found open.

- A hostile client sends `Command()` (or `Command(resume=None)`, `Command(update={})`): a
  command that says nothing. LangGraph 1.2 fails on it inside its loop with a bare
  `UnboundLocalError` (`resume_is_map`) instead of its own `EmptyInputError`; keel refuses it
  as empty input, a `UserError`, before anything is written, and a waiting call still waits.

Real parts: SQLite files and a PostgreSQL database (checkpointer and ledger); the model is
keel's `ScriptedChatModel` with fresh tool-call ids, as real models mint them.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import START, StateGraph
from langgraph.types import Command
from typing_extensions import TypedDict

from keel import Ledger, Persistence, RunContext, UserError, build_agent, tool
from keel.db.audit import AuditLog
from keel.evals import ScriptedChatModel, call
from keel.guards import Policy, Rule

CTX = RunContext(user_id="u1", tenant_id="acme")
ASK = Policy(name="support", rules=(Rule(tool="issue_refund", action="ask"),))


class Shop:
    """The outside world: every refund that really ran."""

    def __init__(self) -> None:
        self.refunds: list[tuple[str, int, str | None]] = []

    def tools(self) -> list[Any]:
        @tool(risk="write")
        def issue_refund(order_id: str, amount: int, note: str | None = None) -> str:
            """Refund `amount` on an order."""
            self.refunds.append((order_id, amount, note))
            return f"refund #{len(self.refunds)}: {amount} on {order_id}"

        return [issue_refund]


SILENT = [Command(), Command(resume=None), Command(update={}), Command(update=[])]


class _Counter(TypedDict):
    n: int


def test_langgraph_fails_on_an_empty_command_with_a_bare_unbound_local_error() -> None:
    """Pinned LangGraph behaviour (1.2): an empty `Command` as input is not its own
    `EmptyInputError` but a crash in its loop. If this fails, LangGraph fixed it."""
    graph = StateGraph(_Counter)
    graph.add_node("add", lambda s: {"n": s["n"] + 1})
    graph.add_edge(START, "add")
    app = graph.compile(checkpointer=InMemorySaver())
    config: Any = {"configurable": {"thread_id": "t"}}
    app.invoke({"n": 0}, config)
    with pytest.raises(UnboundLocalError, match="resume_is_map"):
        app.invoke(Command(), config)


@pytest.mark.parametrize("entry", ["invoke", "stream", "ainvoke", "astream"])
async def test_a_command_that_says_nothing_is_a_user_error_and_the_call_still_waits(
    db_url: str, entry: str
) -> None:
    shop = Shop()
    ledger = Ledger(db_url)
    model = ScriptedChatModel(
        script=[call("issue_refund", order_id="A1", amount=5), "Refunded."], fresh_ids=True
    )
    config: Any = {"configurable": {"thread_id": "t"}}
    async with Persistence(db_url).acheckpointer() as saver:
        agent = build_agent(model, shop.tools(), policy=ASK, ledger=ledger, checkpointer=saver)

        async def send(payload: Any) -> Any:
            if entry == "invoke":
                return await asyncio.to_thread(agent.invoke, payload, config, context=CTX)
            if entry == "stream":
                chunks = agent.stream(payload, config, context=CTX, stream_mode="values")
                return await asyncio.to_thread(list, chunks)
            if entry == "ainvoke":
                return await agent.ainvoke(payload, config, context=CTX)
            return [c async for c in agent.astream(payload, config, context=CTX)]

        for payload in SILENT:  # on a thread that does not exist yet
            with pytest.raises(UserError, match=r"says nothing: it has no resume and no update"):
                await send(payload)
        paused = await agent.ainvoke({"messages": [("user", "refund A1")]}, config, context=CTX)
        assert paused["__interrupt__"]
        for payload in SILENT:
            with pytest.raises(UserError, match=r"invoke\(None, config\)"):
                await send(payload)
        state = await agent.aget_state(config)
        assert state.values["messages"] == paused["messages"]
        assert state.interrupts
        done = await agent.ainvoke(Command(resume={"type": "approve"}), config, context=CTX)
    records = AuditLog(ledger).query(thread="t")
    ledger.close()
    assert done["outcome"]["terminated_reason"] == "completed"
    assert shop.refunds == [("A1", 5, None)]
    assert [r.decision for r in records if r.kind == "tool"] == ["ask"]


def test_a_command_that_says_nothing_is_refused_without_a_checkpointer() -> None:
    agent = build_agent(ScriptedChatModel(script=["hi"]))
    for payload in SILENT:
        with pytest.raises(UserError, match="says nothing"):
            agent.invoke(payload, context=CTX)
