"""Attacks on README's "What every run guarantees" and "Durable side effects" found open.

- A hostile client sends `Command()` (or `Command(resume=None)`, `Command(update={})`): a
  command that says nothing. LangGraph 1.2 fails on it inside its loop with a bare
  `UnboundLocalError` (`resume_is_map`) instead of its own `EmptyInputError`; keel refuses it
  as empty input, a `UserError`, before anything is written, and a waiting call still waits.
- A process running a turn of parallel side-effecting calls, one of them repeated, is
  SIGKILLed at a random moment, and the next task is a new message. The repeat (never claimed:
  a duplicate) was answered "Not run ... keel does not run it now" beside its primary's
  "outcome unknown" or recorded result (2 of 32 seeds; the deterministic case is in
  `test_attack_duplicate_calls.py`). It follows its primary's answer.
- README's time-travel example with a model that names each call anew: forked from before the
  model's turn, the invoice was sent again (deterministic ids hid it). It gets its record.

Real parts: SQLite files and a PostgreSQL database (checkpointer and ledger); the model is
keel's `ScriptedChatModel` with fresh tool-call ids, as real models mint them.
"""

from __future__ import annotations

import asyncio
import random
import signal
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from forking import ForkServer
from langchain_core.messages import AIMessage, ToolMessage
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


# -- a process SIGKILLed at a random moment of a turn of parallel calls, then a new message ----

PARALLEL_CHILD = textwrap.dedent(
    """
    import asyncio, os, random, sys
    from langchain_core.messages import AIMessage, ToolCall
    from keel import Ledger, Persistence, RunContext, build_agent, tool
    from keel.evals import ScriptedChatModel

    url, world, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rng = random.Random(seed)

    @tool(risk="write")
    async def ship(parcel: str) -> str:
        \"\"\"Ship a parcel.\"\"\"
        print("shipping", flush=True)
        await asyncio.sleep(rng.uniform(0, 0.05))
        fd = os.open(world, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, (parcel + "\\n").encode())
        os.fsync(fd)
        os.close(fd)
        await asyncio.sleep(rng.uniform(0, 0.05))
        return f"shipped {parcel}"

    # a, b and a again: a stuttering model's parallel turn, fresh ids
    turn = AIMessage("", tool_calls=[ToolCall(name="ship", args={"parcel": p}, id=None)
                                     for p in ("a", "b", "a")])
    model = ScriptedChatModel(script=[turn, "Shipped."], fresh_ids=True, latency=0.01)

    async def main():
        async with Persistence(url).acheckpointer() as saver:
            agent = build_agent(model, [ship], ledger=Ledger(url), checkpointer=saver)
            print("ready", flush=True)
            await agent.ainvoke({"messages": [("user", "ship a and b")]},
                                {"configurable": {"thread_id": "t1"}},
                                context=RunContext(user_id="u1", tenant_id="acme"))
        print("finished", flush=True)

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("seed", range(4))
def test_sigkill_at_a_random_moment_of_a_parallel_turn_then_a_new_message(
    db_url: str, tmp_path: Path, seed: int, forks: ForkServer
) -> None:
    """A process runs a turn of parallel side-effecting calls (one repeated, fresh ids) under
    `ainvoke` and is SIGKILLed at a random moment; a fresh process sends the next message.
    Each effect happened at most once; every call of the turn is answered once, and a call
    whose effect happened is never told it did not run ("Not run: ...").

    Even seeds kill within 0.4 s of the process being ready (before the turn, often: on
    PostgreSQL the run takes longer to get there); odd ones within 0.1 s of the first call's
    start, among the effects."""
    world = tmp_path / "world"
    proc = forks.start_code(PARALLEL_CHILD, db_url, str(world), str(seed))
    try:
        proc.wait_for_line("ready" if seed % 2 == 0 else "shipping")
        window = 0.4 if seed % 2 == 0 else 0.1
        time.sleep(random.Random(seed).uniform(0.0, window))  # a random moment of the run
    finally:
        proc.kill()
    assert proc.wait() in (0, -signal.SIGKILL), proc.err.read_text()
    happened = world.read_text().split() if world.exists() else []
    ledger = Ledger(db_url)
    model = ScriptedChatModel(script=["Noted."] * 4, fresh_ids=True)

    async def next_message() -> Any:
        async with Persistence(db_url).acheckpointer() as saver:
            agent = build_agent(model, [], ledger=ledger, checkpointer=saver)
            return await agent.ainvoke(
                {"messages": [("user", "anything else?")]},
                {"configurable": {"thread_id": "t1"}},
                context=CTX,
            )

    try:
        done = asyncio.run(next_message())
    finally:
        ledger.close()
    after = world.read_text().split() if world.exists() else []
    print(f"seed {seed}: effects before the kill {happened}")
    assert after == happened  # nothing ran again
    assert sorted(after) == sorted(set(after)), after  # and nothing ran twice
    assert done["outcome"]["terminated_reason"] == "completed", done["outcome"]
    messages = done["messages"]
    answers: dict[str, list[ToolMessage]] = {}
    for m in messages:
        if isinstance(m, ToolMessage):
            answers.setdefault(m.tool_call_id, []).append(m)
    for ai in (m for m in messages if isinstance(m, AIMessage) and m.tool_calls):
        for c in ai.tool_calls:
            (answer,) = answers[c["id"]]  # exactly one answer each
            if c["args"]["parcel"] in after and "keel_duplicate_of" not in answer.response_metadata:
                assert not answer.text.startswith("Not run"), (after, c, answer)


# -- time travel with a model that names each call anew ---------------------------------------


@pytest.mark.parametrize("fork", ["execute_tools", "call_model"])
def test_time_travel_before_the_models_turn_gets_the_recorded_result(
    db_url: str, fork: str
) -> None:
    """The attack: README's time-travel example with a real model, which names every call
    anew. Forked from a checkpoint before the model's turn, the model asks again for the
    invoice it already sent, under an id the ledger has never seen: the invoice was sent again
    (with `call_<turn>_<i>` ids the ids matched and hid it). The call that ended under an id
    the fork left behind, same tool and arguments, gives its recorded result."""
    sent: list[str] = []

    @tool(risk="write")
    def send_invoice(order_id: str) -> str:
        """Email the invoice for an order."""
        sent.append(order_id)
        return f"invoice for {order_id} sent"

    script = [
        call("send_invoice", order_id="A1"),
        call("send_invoice", order_id="B2"),
        "Sent.",
        call("send_invoice", order_id="A1"),  # the next task: "send A1 again"
        "Sent again.",
    ]
    ledger = Ledger(db_url)
    config: Any = {"configurable": {"thread_id": "t"}}
    try:
        with Persistence(db_url).checkpointer() as saver:
            model = ScriptedChatModel(script=script, fresh_ids=True)
            agent = build_agent(model, [send_invoice], checkpointer=saver, ledger=ledger)
            agent.invoke({"messages": [("user", "invoice A1 and B2")]}, config, context=CTX)
            oldest = [s for s in agent.get_state_history(config) if s.next == (fork,)][-1]
            replayed = agent.invoke(None, oldest.config, context=CTX)
            # a repeat the model means (the first call is in the history) still runs
            again = agent.invoke({"messages": [("user", "send A1 again")]}, config, context=CTX)
    finally:
        ledger.close()
    assert replayed["outcome"]["terminated_reason"] == "completed"
    results = [m for m in replayed["messages"] if isinstance(m, ToolMessage)]
    assert [(m.text, m.response_metadata.get("keel_ledger")) for m in results] == [
        ("invoice for A1 sent", "recorded"),
        ("invoice for B2 sent", "recorded"),
    ]
    assert again["outcome"]["terminated_reason"] == "completed"
    assert sent == ["A1", "B2", "A1"]
