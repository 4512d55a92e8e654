"""keel's structured-output calls (plan, route, verdicts) reach no `messages` stream.

The planner (`Plan`), the supervisor's router (`Route`), the judge (`JudgeVerdict`) and a
`ModelDetector` (`InjectionVerdict`) ask their model for structured output: a tool call whose
arguments are the decision. Those arguments restate what the model read (a plan the user's card
number, a judge's reason the answer it judged, a detector's reason the text it screened), and
the output guard never checks them: they are decisions keel reads, not answers. Measured before
the fix, with a scripted model whose structured answers carry a card number and an email, every
one of them reached the `messages` stream as a complete `AIMessageChunk` holding the raw card or
email, under an output guard or not, sync and async:

- keel's own agent stream (`messages`, `subgraphs=False`): `Plan` (node `plan`), `JudgeVerdict`
  (`verify`), `InjectionVerdict` (`input_guard`); keel's answer check held each until complete
  and sent it as it was (a turn that calls tools is not an answer);
- keel's own supervisor stream: `Route` (`route`), twice; with `subgraphs=True` the agent's
  three as well;
- a user's `StateGraph` that has the agent or the supervisor as a node, or calls it in a node,
  streamed with `subgraphs=True`: all of them (with `subgraphs=False`: none);
- a `ModelDetector` a user's node calls directly (`check_input`): `InjectionVerdict`.

`GuardedModel` now asks every structured call with LangGraph's `nostream` tag (`unstreamed`,
which `call_model` uses for its answers under an output guard), and `ModelDetector` its direct
call. The agent's answer streams as before: whole and checked under an output guard, token by
token without one. `astream_events` carries callbacks, raw output included (README): pinned.

Real SQLite checkpointing (`keel.Persistence`); the only test double is the chat model.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph import START, MessagesState, StateGraph
from test_attack_embedded_agent import CTX, embedded

from keel import Persistence, build_agent
from keel.evals import ScriptedChatModel
from keel.graphs import FINISH, build_supervisor
from keel.guards import InputGuardPolicy, ModelDetector, Policy, check_input

CARD, EMAIL = "4111 1111 1111 1111", "jane.doe@example.com"
INPUT = {"messages": [("user", f"Pay with {CARD} and mail the receipt to {EMAIL}.")]}
DECISIONS = {"Plan", "Route", "JudgeVerdict", "InjectionVerdict"}
MODES = ["messages", "updates", "values"]


def _model() -> ScriptedChatModel:
    """One scripted model for every call: its structured answers restate the user's PII."""
    return ScriptedChatModel(
        script=[f"Charged card {CARD}; receipt sent to {EMAIL}."],
        fresh_ids=True,
        structured={
            "Plan": {"steps": [f"charge card {CARD}", f"mail the receipt to {EMAIL}"]},
            "JudgeVerdict": {"passed": True, "reason": f"it says card {CARD} was charged"},
            "InjectionVerdict": {"injection": False, "reason": f"a payment request from {EMAIL}"},
            "Route": lambda messages: (
                {"agent": FINISH}
                if any(isinstance(m, AIMessage) and m.name for m in messages)
                else {"agent": "billing", "task": f"charge card {CARD}"}
            ),
        },
    )


def _agent(model: ScriptedChatModel, saver: Any, *, guarded: bool = True) -> Any:
    """keel's agent with a planner, a judge and a model injection detector (one model)."""
    policy = Policy(input_guard=InputGuardPolicy(detector=ModelDetector(model=model)))
    if not guarded:
        policy = Policy(input_guard=policy.input_guard, output_guard=None)
    return build_agent(
        model, [], policy=policy, plan=True, judge=model, checkpointer=saver, name="billing"
    )


def _target(target: str, model: ScriptedChatModel, saver: Any) -> Any:
    """The agent, or a supervisor (its router the same model) over it."""
    if target == "agent":
        return _agent(model, saver)
    return build_supervisor({"billing": _agent(model, None)}, model, checkpointer=saver)


@contextlib.asynccontextmanager
async def _saver(tmp_path: Path, drive: str) -> AsyncIterator[BaseCheckpointSaver[Any]]:
    store = Persistence(f"sqlite:///{tmp_path}/keel.db")
    if drive == "sync":
        with store.checkpointer() as saver:
            yield saver
    else:
        async with store.acheckpointer() as saver:
            yield saver


async def _stream(graph: Any, drive: str, subgraphs: bool, **kwargs: Any) -> list[Any]:
    """`(mode, payload)` of every chunk of a run streamed in `MODES`."""
    config = {"configurable": {"thread_id": uuid.uuid4().hex}}
    kw = {"stream_mode": MODES, "subgraphs": subgraphs, **kwargs}
    if drive == "sync":
        chunks = list(graph.stream(INPUT, config, context=CTX, **kw))
    else:
        chunks = [c async for c in graph.astream(INPUT, config, context=CTX, **kw)]
    return [c[1:] if subgraphs else c for c in chunks]


def _messages(chunks: list[Any]) -> list[tuple[BaseMessage, dict[str, Any]]]:
    return [payload for mode, payload in chunks if mode == "messages"]


def _decisions(chunks: list[Any]) -> list[tuple[str, str]]:
    """(schema, node) of each structured call's message a `messages` chunk carries."""
    found = []
    for message, meta in _messages(chunks):
        calls = [*getattr(message, "tool_calls", []), *getattr(message, "tool_call_chunks", [])]
        for call in calls:
            if call.get("name") in DECISIONS:
                found.append((str(call["name"]), str(meta.get("langgraph_node"))))
    return found


def _raw_ai(chunks: list[Any]) -> list[str]:
    """The AI messages of the `messages` chunks that hold the raw card number or email."""
    texts = [str(m) for m, _ in _messages(chunks) if isinstance(m, AIMessage)]
    return [t for t in texts if CARD in t or EMAIL in t]


def _asked(model: ScriptedChatModel) -> set[str]:
    """The structured calls the model answered (so the run made them)."""
    return {c["name"] for a in model.answers for c in a.tool_calls}


@pytest.mark.parametrize("drive", ["sync", "async"])
@pytest.mark.parametrize("embedding", ["own", "node", "called"])
@pytest.mark.parametrize("target", ["agent", "supervisor"])
async def test_no_messages_stream_carries_a_structured_call(
    tmp_path: Path, target: str, embedding: str, drive: str
) -> None:
    """Before: every structured call's complete message, raw card or email in its arguments,
    in keel's own `messages` stream and in a `subgraphs=True` parent's (see the module)."""
    model = _model()
    async with _saver(tmp_path, drive) as saver:
        if embedding == "own":
            graph = _target(target, model, saver)
        else:
            graph = embedded(_target(target, model, None), embedding, saver)
        for subgraphs in (False, True):
            chunks = await _stream(graph, drive, subgraphs)
            assert _decisions(chunks) == []
            assert _raw_ai(chunks) == []
            # the checked answer still reaches the client, whole
            assert any("[CARD]" in m.text for m, _ in _messages(chunks) if isinstance(m, AIMessage))
    routed = {"Route"} if target == "supervisor" else set()
    assert _asked(model) == {"Plan", "JudgeVerdict", "InjectionVerdict", *routed}


@pytest.mark.parametrize("drive", ["sync", "async"])
async def test_without_an_output_guard_the_answer_still_streams_token_by_token(
    tmp_path: Path, drive: str
) -> None:
    """Structured calls are unstreamed always, not only under an output guard; the answer
    (no guard: the user's choice of raw tokens) streams from `call_model` as it did."""
    model = _model()
    async with _saver(tmp_path, drive) as saver:
        parent = embedded(_agent(model, None, guarded=False), "node", saver)
        chunks = await _stream(parent, drive, True)
    assert _decisions(chunks) == []
    answer = [
        m
        for m, meta in _messages(chunks)
        if isinstance(m, AIMessageChunk) and meta["langgraph_node"] == "call_model"
    ]
    assert len(answer) > 3, "the answer streams word by word"
    assert "Charged card" in "".join(m.text for m in answer)
    assert _asked(model) == {"Plan", "JudgeVerdict", "InjectionVerdict"}


@pytest.mark.parametrize("drive", ["sync", "async"])
async def test_a_model_detector_called_in_a_users_node_is_not_streamed(
    tmp_path: Path, drive: str
) -> None:
    """Outside a keel run `ModelDetector` asks its model directly; in a user's node that
    screens text with it, the verdict reached the graph's `messages` stream before."""
    model = _model()
    policy = InputGuardPolicy(detector=ModelDetector(model=model))

    def screen(state: MessagesState) -> dict[str, Any]:
        verdict = check_input(str(state["messages"][-1].content), policy, source="user")
        return {"messages": [AIMessage(f"screened: {verdict.action}")]}

    graph = StateGraph(MessagesState)
    graph.add_node("screen", screen)
    graph.add_edge(START, "screen")
    async with _saver(tmp_path, drive) as saver:
        chunks = await _stream(graph.compile(checkpointer=saver), drive, False)
    assert _decisions(chunks) == []
    assert _raw_ai(chunks) == []
    assert any(m.text == "screened: allow" for m, _ in _messages(chunks))
    assert _asked(model) == {"InjectionVerdict"}


async def test_astream_events_still_carries_the_structured_calls(tmp_path: Path) -> None:
    """Pinned, as README states: `astream_events` streams callbacks, and `nostream` keeps no
    call out of them (tracing sees every decision)."""
    model = _model()
    async with _saver(tmp_path, "async") as saver:
        parent = embedded(_agent(model, None), "node", saver)
        config = {"configurable": {"thread_id": uuid.uuid4().hex}}
        events = [e async for e in parent.astream_events(INPUT, config, context=CTX, version="v2")]
    ended = [e["data"]["output"] for e in events if e["event"] == "on_chat_model_end"]
    names = {c["name"] for out in ended for c in getattr(out, "tool_calls", [])}
    assert names == {"Plan", "JudgeVerdict", "InjectionVerdict"}
