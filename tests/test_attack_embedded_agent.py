"""A keel agent embedded in a user's own LangGraph graph: the parent's streams carry no answer
the output guard did not check.

keel's answer check (`keel.graphs._answers`) wraps the agent's own `stream`. A user who adds
the agent as a node of a plain `StateGraph` (or calls it inside a node of theirs) and streams
the parent never goes through it: with `stream_mode="messages"` and `subgraphs=True` LangGraph
relays the agent's model tokens to the parent's client as they arrive. Before, a card number
the model wrote reached that client raw (both embeddings, sync and async, `messages` alone or
with other modes); with an output guard `call_model` now asks its model with LangGraph's
`nostream` tag, so no `messages` stream relays its tokens, and the checked answer goes out
whole as `call_model` returns it. `updates` and `values` were never raw there: `call_model`
writes the checked answer.

`astream_events` is a stream of callbacks, not of the run: its `on_chat_model_stream` and
`on_chat_model_end` events carry the model's raw output whatever the graph does (README,
"output guard"); pinned here.

The only test double is the chat model (`keel.evals`).
"""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.runnables import RunnableConfig, RunnableLambda
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, MessagesState, StateGraph

from keel import Persistence, RunContext, build_agent
from keel.evals import ScriptedChatModel
from keel.graphs import FINISH, Route, build_supervisor
from keel.guards import Policy

CTX = RunContext(user_id="u1", tenant_id="acme", roles=("support",))
CARD, EMAIL = "4111 1111 1111 1111", "jane.doe@example.com"
RAW = (" 4111", EMAIL)
"""What no chunk may hold: the model streams word by word, so the card's first group (with the
space before it: a run's hex ids hold "4111" now and then, and failed a test one run in ~10)."""
INPUT = {"messages": [("user", "who am I?")]}


def _agent() -> Any:
    answer = f"Your card is {CARD}, mail {EMAIL} (ref {uuid.uuid4().hex})."
    model = ScriptedChatModel(script=[answer], fresh_ids=True)
    return build_agent(model, [], policy=Policy())


def embedded(graph: Any, embedding: str, checkpointer: Any) -> Any:
    """A user's graph with keel's `graph` as its `agent` node: added as it is (`node`), or
    called in a node of the user's (`called`)."""
    parent = StateGraph(MessagesState)
    if embedding == "node":
        parent.add_node("agent", graph)
    else:

        def ask(state: MessagesState, config: RunnableConfig) -> dict[str, Any]:
            out = graph.invoke({"messages": state["messages"]}, config, context=CTX)
            return {"messages": out["messages"][-1:]}

        async def aask(state: MessagesState, config: RunnableConfig) -> dict[str, Any]:
            out = await graph.ainvoke({"messages": state["messages"]}, config, context=CTX)
            return {"messages": out["messages"][-1:]}

        parent.add_node("agent", RunnableLambda(ask, afunc=aask))
    parent.add_edge(START, "agent")
    parent.add_edge("agent", END)
    return parent.compile(checkpointer=checkpointer)


def _parent(embedding: str) -> Any:
    return embedded(_agent(), embedding, InMemorySaver())


async def _chunks(parent: Any, drive: str, **kwargs: Any) -> list[Any]:
    config = {"configurable": {"thread_id": str(uuid.uuid4())}}
    if drive == "sync":
        return list(parent.stream(INPUT, config, context=CTX, **kwargs))
    return [c async for c in parent.astream(INPUT, config, context=CTX, **kwargs)]


def _raw(chunks: Any) -> list[str]:
    return [r for r in RAW if r in str(chunks)]


def _streamed(chunks: list[Any], subgraphs: bool, modes: Any) -> list[Any]:
    """The `(message, metadata)` payloads of the `messages` chunks."""
    out = []
    for chunk in chunks:
        parts = chunk[1:] if subgraphs else chunk
        mode, payload = parts if isinstance(modes, list) else ("messages", parts[-1])
        if mode == "messages":
            out.append(payload)
    return out


MODES = [
    "messages",
    "updates",
    "values",
    ["messages", "updates", "values"],
    ["debug", "tasks", "checkpoints", "custom"],
]


@pytest.mark.parametrize("subgraphs", [False, True], ids=["top", "subgraphs"])
@pytest.mark.parametrize("modes", MODES, ids=lambda m: "+".join(m) if isinstance(m, list) else m)
@pytest.mark.parametrize("drive", ["sync", "async"])
@pytest.mark.parametrize("embedding", ["node", "called"])
async def test_a_parent_graph_streams_no_unchecked_answer(
    embedding: str, drive: str, modes: Any, subgraphs: bool
) -> None:
    """Before: `messages` with `subgraphs=True` (alone or with other modes) sent the model's
    tokens raw, card and email, in all four embeddings and drives."""
    parent = _parent(embedding)
    chunks = await _chunks(parent, drive, stream_mode=modes, subgraphs=subgraphs)
    assert _raw(chunks) == []
    assert "[CARD]" in str(chunks), "the checked answer reaches the parent's client"
    if "messages" in modes and subgraphs:
        answers = [m for m, _ in _streamed(chunks, subgraphs, modes) if isinstance(m, AIMessage)]
        # the agent's answer streams whole, as its call_model checked it
        assert any("[CARD]" in m.text for m in answers)
        assert not any(isinstance(m, AIMessageChunk) for m in answers)


@pytest.mark.parametrize("drive", ["sync", "async"])
async def test_a_node_streaming_the_agent_itself_sends_no_unchecked_answer(drive: str) -> None:
    """A node of the parent streams the agent (`messages`) and the parent streams `messages`:
    LangGraph relays the inner stream's model tokens to the parent's client too."""
    agent = _agent()

    def ask(state: MessagesState, config: RunnableConfig) -> dict[str, Any]:
        out = list(agent.stream(state, config, context=CTX, stream_mode="messages"))
        return {"messages": [m for m, _ in out if isinstance(m, AIMessage)][-1:]}

    async def aask(state: MessagesState, config: RunnableConfig) -> dict[str, Any]:
        out = [c async for c in agent.astream(state, config, context=CTX, stream_mode="messages")]
        return {"messages": [m for m, _ in out if isinstance(m, AIMessage)][-1:]}

    graph = StateGraph(MessagesState)
    graph.add_node("agent", RunnableLambda(ask, afunc=aask))
    graph.add_edge(START, "agent")
    parent = graph.compile(checkpointer=InMemorySaver())
    for subgraphs in (True, False):
        chunks = await _chunks(parent, drive, stream_mode="messages", subgraphs=subgraphs)
        assert _raw(chunks) == []
        assert "[CARD]" in str(chunks)


@pytest.mark.parametrize("embedding", ["node", "called"])
async def test_astream_events_carries_the_models_raw_output(embedding: str) -> None:
    """Pinned, as README states: `astream_events` streams callbacks, and a chat model's
    callbacks carry its output before any guard reads it (`on_chat_model_stream` and
    `on_chat_model_end`, `nostream` tag or not). The run's own events (`on_chain_*`) carry
    the checked answer only."""
    parent = _parent(embedding)
    config = {"configurable": {"thread_id": str(uuid.uuid4())}}
    events = [e async for e in parent.astream_events(INPUT, config, context=CTX, version="v2")]
    raw = {e["event"] for e in events if _raw(e)}
    assert raw == {"on_chat_model_stream", "on_chat_model_end"}
    assert any("[CARD]" in str(e) for e in events if e["event"] == "on_chain_end")


@pytest.mark.parametrize("subgraphs", [False, True], ids=["top", "subgraphs"])
@pytest.mark.parametrize("drive", ["sync", "async"])
@pytest.mark.parametrize("embedding", ["node", "own-thread"])
async def test_an_agent_on_its_own_checkpointer_in_a_parent_graph_streams_no_raw_answer(
    tmp_path: Path, embedding: str, drive: str, subgraphs: bool
) -> None:
    """The agent keeps its threads in keel's SQLite, not the parent's saver: added as a node,
    or called on a thread of its own (LangGraph then runs it as no task of the parent's).
    Before: with `subgraphs=True` the parent's `messages` stream sent the raw tokens."""
    url = f"sqlite:///{tmp_path}/keel.db"
    async with contextlib.AsyncExitStack() as stack:
        store = Persistence(url)
        if drive == "sync":
            saver = stack.enter_context(store.checkpointer())
        else:
            saver = await stack.enter_async_context(store.acheckpointer())
        answer = f"Your card is {CARD}, mail {EMAIL} (ref {uuid.uuid4().hex})."
        agent = build_agent(
            ScriptedChatModel(script=[answer], fresh_ids=True), [], policy=Policy(),
            checkpointer=saver,
        )  # fmt: skip
        own: Any = {"configurable": {"thread_id": f"child-{uuid.uuid4().hex}"}}

        def ask(state: MessagesState) -> dict[str, Any]:
            out = agent.invoke({"messages": state["messages"]}, own, context=CTX)
            return {"messages": out["messages"][-1:]}

        async def aask(state: MessagesState) -> dict[str, Any]:
            out = await agent.ainvoke({"messages": state["messages"]}, own, context=CTX)
            return {"messages": out["messages"][-1:]}

        graph = StateGraph(MessagesState)
        graph.add_node("agent", agent if embedding == "node" else RunnableLambda(ask, afunc=aask))
        graph.add_edge(START, "agent")
        parent = graph.compile(checkpointer=InMemorySaver())
        modes = ["messages", "updates", "values"]
        chunks = await _chunks(parent, drive, stream_mode=modes, subgraphs=subgraphs)
        assert _raw(chunks) == []
        assert "[CARD]" in str(chunks)


@pytest.mark.parametrize("drive", ["sync", "async"])
async def test_a_supervisors_stream_of_its_agents_sends_no_raw_answer(drive: str) -> None:
    """keel's supervisor holds its agents as subgraphs, and holds no output guard of its own:
    before, its `messages` stream with `subgraphs=True` sent the agent's raw tokens."""

    def router(messages: Any) -> Route:
        done = any(isinstance(m, AIMessage) for m in messages)
        return Route(agent=FINISH) if done else Route(agent="billing", task="bill me")

    agent = build_agent(
        ScriptedChatModel(script=[f"Card {CARD}, mail {EMAIL}."], fresh_ids=True), [],
        policy=Policy(), name="billing",
    )  # fmt: skip
    supervisor = build_supervisor({"billing": agent}, router, checkpointer=InMemorySaver())
    modes = ["messages", "updates", "values"]
    chunks = await _chunks(supervisor, drive, stream_mode=modes, subgraphs=True)
    assert _raw(chunks) == []
    assert "[CARD]" in str(chunks)


@pytest.mark.parametrize("embedding", ["node", "called"])
async def test_a_parent_graphs_v2_stream_parts_carry_no_raw_answer(embedding: str) -> None:
    """`version="v2"` stream parts, `messages` with `subgraphs=True`."""
    modes = ["messages", "updates", "values"]
    chunks = await _chunks(
        _parent(embedding), "async", stream_mode=modes, subgraphs=True, version="v2"
    )
    assert _raw(chunks) == []
    assert any(p["type"] == "messages" and "[CARD]" in str(p["data"]) for p in chunks)
