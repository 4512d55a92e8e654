"""Two runs on one thread at once: a user who sends twice, a web app that runs each request.

LangGraph lets both start from the same checkpoint, and the run that saves last makes the
thread, so the other run's messages vanish while its caller was told it succeeded. keel's
graphs run one at a time per thread: the second waits, then reads what the first left.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Annotated, Any

import pytest
from conftest import until
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, AnyMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import START, StateGraph
from langgraph.graph.message import add_messages
from typing_extensions import TypedDict

from keel import Ledger, Persistence, RunContext, tool
from keel.db.runs import RunLog
from keel.errors import UserError
from keel.evals import ScriptedChatModel, call
from keel.graphs import build_agent
from keel.guards import Policy, Rule

CTX = RunContext(user_id="u1", tenant_id="acme")
ASK = Policy(rules=[Rule(tool="lookup", action="allow"), Rule(tool="refund", action="ask")])


@tool(name="lookup")
def lookup(order: str) -> str:
    """Look an order up."""
    return f"order {order}: shipped"


@tool(name="refund", side_effects=True)
def refund(order: str) -> str:
    """Refund an order."""
    return f"refunded {order}"


def _texts(state: Any) -> list[str]:
    return [m.text for m in state.values["messages"]]


def _thread(name: str) -> dict[str, Any]:
    return {"configurable": {"thread_id": name}}


class _Chat(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


async def test_pin_langgraph_two_runs_on_one_thread_lose_one_runs_messages() -> None:
    """Pinned: LangGraph alone keeps only the history of the run that saved last."""

    async def slow_echo(state: _Chat) -> dict[str, Any]:
        await asyncio.sleep(0.2)
        return {"messages": [AIMessage(f"echo: {state['messages'][-1].text}")]}

    graph = StateGraph(_Chat).add_node("echo", slow_echo).add_edge(START, "echo")
    app = graph.compile(checkpointer=InMemorySaver())
    config = _thread("raw")
    await asyncio.gather(
        app.ainvoke({"messages": [("user", "first")]}, config),
        app.ainvoke({"messages": [("user", "second")]}, config),
    )
    kept = _texts(await app.aget_state(config))
    assert len(kept) == 2 and kept[0] in ("first", "second")  # one question and its answer


async def test_two_runs_sent_at_once_both_keep_their_messages(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'keel.db'}"
    ledger = Ledger(url)
    model = ScriptedChatModel(
        script=[call("lookup", order="A1"), "A1 shipped.", call("lookup", order="B2"), "B2 too."],
        latency=0.05,
        fresh_ids=True,
    )
    async with Persistence(url).acheckpointer() as saver:
        agent = build_agent(model, [lookup, refund], policy=ASK, ledger=ledger, checkpointer=saver)
        config = _thread("twice")
        first, second = await asyncio.gather(
            agent.ainvoke({"messages": [("user", "Where is A1?")]}, config, context=CTX),
            agent.ainvoke({"messages": [("user", "And B2?")]}, config, context=CTX),
        )
        texts = _texts(await agent.aget_state(config))
    assert first["outcome"]["status"] == second["outcome"]["status"] == "success"
    # one run after the other, the second reading the first's turns
    assert texts == [
        "Where is A1?", "", "order A1: shipped", "A1 shipped.",
        "And B2?", "", "order B2: shipped", "B2 too.",
    ]  # fmt: skip
    assert len(model.calls[2]) > len(model.calls[1])  # the second run saw the first's history
    assert sorted(r.terminated_reason for r in RunLog(ledger).query()) == [
        "completed",
        "completed",
    ]
    ledger.close()


def test_two_threads_of_a_process_invoking_one_thread_take_turns() -> None:
    model = ScriptedChatModel(script=["one", "two", "three", "four"], latency=0.05)
    agent = build_agent(model, [], checkpointer=InMemorySaver())
    config = _thread("threads")
    errors: list[BaseException] = []

    def ask(text: str) -> None:
        try:
            agent.invoke({"messages": [("user", text)]}, config, context=CTX)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=ask, args=(f"q{i}",)) for i in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=30)
    assert errors == []
    texts = _texts(agent.get_state(config))
    assert sorted(texts[0::2]) == ["q0", "q1", "q2", "q3"]
    assert texts[1::2] == ["one", "two", "three", "four"]


async def test_a_message_sent_while_the_first_run_is_on_its_way_to_an_approval_is_refused() -> None:
    """The second run is checked against the state the first left: a thread that now waits for
    a human refuses a new message (before, it started from the checkpoint before the pause,
    and its history replaced the waiting one's)."""
    model = ScriptedChatModel(script=[call("refund", order="A1"), "Sure."], latency=0.05)
    agent = build_agent(model, [lookup, refund], policy=ASK, checkpointer=InMemorySaver())
    config = _thread("waiting")
    first, second = await asyncio.gather(
        agent.ainvoke({"messages": [("user", "Refund A1.")]}, config, context=CTX),
        agent.ainvoke({"messages": [("user", "Hello?")]}, config, context=CTX),
        return_exceptions=True,
    )
    assert first["outcome"]["terminated_reason"] == "awaiting_approval"  # type: ignore[index]
    assert isinstance(second, UserError) and "waits for a human's answer" in str(second)
    state = await agent.aget_state(config)
    assert state.interrupts and "Hello?" not in _texts(state)


async def test_runs_on_other_threads_do_not_wait() -> None:
    slow = ScriptedChatModel(script=["slow"], latency=0.5)
    fast = ScriptedChatModel(script=["fast"])
    saver = InMemorySaver()
    slow_agent = build_agent(slow, [], checkpointer=saver)
    fast_agent = build_agent(fast, [], checkpointer=saver)
    done: list[str] = []

    async def run(agent: Any, thread: str) -> None:
        await agent.ainvoke({"messages": [("user", "hi")]}, _thread(thread), context=CTX)
        done.append(thread)

    await asyncio.gather(run(slow_agent, "a"), run(fast_agent, "b"))
    assert done == ["b", "a"]


def test_a_stream_left_half_read_and_closed_gives_the_thread_back() -> None:
    model = ScriptedChatModel(script=[call("lookup", order="A1"), "Shipped.", "Again."])
    agent = build_agent(model, [lookup, refund], policy=ASK, checkpointer=InMemorySaver())
    config = _thread("abandoned")
    chunks = agent.stream({"messages": [("user", "Where is A1?")]}, config, context=CTX)
    next(iter(chunks))
    chunks.close()  # the client went away
    finished = threading.Event()

    def later() -> None:
        agent.invoke({"messages": [("user", "Still there?")]}, config, context=CTX)
        finished.set()

    threading.Thread(target=later, daemon=True).start()
    assert finished.wait(timeout=10), "the thread stayed taken after its stream was closed"


class _ModelCalled(BaseCallbackHandler):
    """Set once a run's model call starts (the run holds its thread by then)."""

    def __init__(self) -> None:
        self.started = threading.Event()

    def on_chat_model_start(self, *args: Any, **kwargs: Any) -> None:
        self.started.set()


async def test_a_cancelled_run_gives_the_thread_back() -> None:
    """A run cancelled inside its model call gives its thread back at once: the next run on
    the thread ends long before the cancelled call (120 s) would have."""
    model = ScriptedChatModel(script=["never", "Hello again."], latency=120)
    agent = build_agent(model, [], checkpointer=InMemorySaver())
    called = _ModelCalled()
    config = {**_thread("cancelled"), "callbacks": [called]}
    task = asyncio.create_task(agent.ainvoke({"messages": [("user", "hi")]}, config, context=CTX))
    await until(called.started.is_set, "the run's model call")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    model.latency = 0
    result = await asyncio.wait_for(
        agent.ainvoke({"messages": [("user", "hi?")]}, _thread("cancelled"), context=CTX),
        timeout=60,
    )
    assert result["outcome"]["status"] == "success"


def test_a_tool_that_starts_a_run_on_its_own_thread_gets_an_error_not_a_deadlock() -> None:
    """A tool that runs the agent again on the thread it runs on, with a config of its own,
    would wait for the run that waits for it: a `UserError` says so instead."""
    saver = InMemorySaver()
    inner = build_agent(ScriptedChatModel(script=["inner"]), [], checkpointer=saver)

    @tool(name="ask_again")
    def ask_again(question: str) -> str:
        """Ask the agent again, on the same thread (a mistake)."""
        inner.invoke({"messages": [("user", question)]}, _thread("nested"), context=CTX)
        return "asked"

    model = ScriptedChatModel(script=[call("ask_again", question="hi"), "Done."])
    policy = Policy(rules=[Rule(tool="ask_again", action="allow")])
    outer = build_agent(model, [ask_again], policy=policy, checkpointer=saver)
    raised: list[BaseException] = []

    def run() -> None:
        try:
            outer.invoke({"messages": [("user", "go")]}, _thread("nested"), context=CTX)
        except BaseException as exc:
            raised.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive(), "the run waited for itself"
    assert len(raised) == 1 and isinstance(raised[0], UserError)
    assert "started another run on that thread" in str(raised[0])
    # and the thread is free again
    again = ScriptedChatModel(script=["Hello."])
    later = build_agent(again, [], checkpointer=saver)
    assert later.invoke({"messages": [("user", "hi")]}, _thread("nested"), context=CTX)


def test_a_run_started_while_reading_the_same_threads_stream_is_refused_not_stuck() -> None:
    model = ScriptedChatModel(script=["First.", "Second."])
    agent = build_agent(model, [], checkpointer=InMemorySaver())
    config = _thread("reading")
    raised: list[BaseException] = []

    def read_and_ask() -> None:
        for _ in agent.stream({"messages": [("user", "one")]}, config, context=CTX):
            try:
                agent.invoke({"messages": [("user", "two")]}, config, context=CTX)
            except UserError as exc:
                raised.append(exc)
            break

    worker = threading.Thread(target=read_and_ask, daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "the run waited for the stream its own caller reads"
    assert len(raised) == 1 and "is still going where this one starts" in str(raised[0])
