"""recall / reflect / memory tools / working memory inside a real keel graph on a real Chroma."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import pytest
from conftest import Clock
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool as langchain_tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import InjectedStore, ToolNode
from langgraph.store.base import BaseStore
from langgraph.store.memory import InMemoryStore

from keel.errors import UserError
from keel.evals import ScriptedChatModel, call
from keel.memory import (
    ChromaStore,
    WorkingMemory,
    extract_lesson,
    memory_tools,
    recall,
    reflect,
    user_namespace,
)
from keel.memory.nodes import RECALL_ID
from keel.nodes import call_model, execute_tools
from keel.state import AgentState, RunContext
from keel.tools import tool

VOCAB = ["tea", "coffee", "berlin", "timezone", "cet", "secret", "weather", "remember", "dog"]


def vocab(texts: list[str]) -> list[list[float]]:
    return [[t.lower().count(w) + 0.05 for w in VOCAB] for t in texts]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ChromaStore]:
    index: Any = {"dims": len(VOCAB), "embed": vocab, "fields": ["text"]}
    with ChromaStore(path=tmp_path, index=index) as store:
        yield store


ALICE = RunContext(user_id="alice", tenant_id="acme")
BOB = RunContext(user_id="bob", tenant_id="acme")


def _graph(
    model: ScriptedChatModel, store: BaseStore, extra_tools: list[Any] = (), **recall_kw: Any
) -> Any:
    tools = [*memory_tools(), *extra_tools]
    g = StateGraph(AgentState, context_schema=RunContext)
    g.add_node("recall", recall(**recall_kw))
    g.add_node(
        "call_model", call_model(model, tools=_registry(tools), system_prompt="You are helpful.")
    )
    g.add_node("execute_tools", execute_tools(_registry(tools)))
    g.add_node("reflect", reflect())
    g.add_edge(START, "recall")
    g.add_edge("recall", "call_model")
    g.add_conditional_edges(
        "call_model",
        lambda s: "execute_tools" if s["messages"][-1].tool_calls else "reflect",
        ["execute_tools", "reflect"],
    )
    g.add_edge("execute_tools", "call_model")
    g.add_edge("reflect", END)
    return g.compile(store=store, checkpointer=InMemorySaver())


def _registry(tools: list[Any]) -> Any:
    from keel.tools import ToolRegistry

    return ToolRegistry(tools)


def _ask(graph: Any, text: str, ctx: RunContext, thread: str = "t1") -> dict[str, Any]:
    return graph.invoke(  # type: ignore[no-any-return]
        {"messages": [HumanMessage(text)]},
        config={"configurable": {"thread_id": thread}},
        context=ctx,
    )


def test_recall_puts_only_the_callers_memories_into_the_system_prompt(store: ChromaStore) -> None:
    store.put(user_namespace(ALICE), "tz", {"text": "Alice lives in Berlin, timezone CET"})
    store.put(user_namespace(BOB), "s", {"text": "Bob's secret: timezone PST"})
    model = ScriptedChatModel(script=["It is 10:00 CET."])
    result = _ask(_graph(model, store), "what timezone am I in?", ALICE)
    sent = model.calls[0]
    assert isinstance(sent[0], SystemMessage)
    assert sent[0].text.startswith("You are helpful.")
    assert "Alice lives in Berlin" in sent[0].text
    assert "Bob" not in sent[0].text
    assert (
        sum(isinstance(m, SystemMessage) for m in sent) == 1
    )  # merged first, as valid_history does
    assert [m.id for m in result["messages"] if isinstance(m, SystemMessage)] == [RECALL_ID]


def test_the_model_remembers_through_tools_scoped_to_the_caller(store: ChromaStore) -> None:
    model = ScriptedChatModel(
        script=[call("remember", text="Alice drinks tea, not coffee"), "Noted."]
    )
    result = _ask(_graph(model, store), "remember: I drink tea", ALICE)
    assert isinstance(result["messages"][-2], ToolMessage)
    assert [i.value["text"] for i in store.search(user_namespace(ALICE))] == [
        "Alice drinks tea, not coffee"
    ]
    assert store.search(user_namespace(BOB)) == []
    # recall_memories and forget see only the caller's memories
    key = store.search(user_namespace(ALICE))[0].key
    bob_model = ScriptedChatModel(
        script=[call("recall_memories", query="tea"), call("forget", memory_id=key), "ok"]
    )
    _ask(_graph(bob_model, store), "what do I drink?", BOB, thread="bob")
    answers = [m for m in bob_model.calls[-1] if isinstance(m, ToolMessage)]
    assert answers[0].text == "No memories match."
    assert "No memory with id" in answers[1].text
    assert len(store.search(user_namespace(ALICE))) == 1


@pytest.mark.parametrize("text", ["", "   ", "\n\t "])
def test_an_empty_memory_is_refused_with_a_message_the_model_can_act_on(
    store: ChromaStore, text: str
) -> None:
    model = ScriptedChatModel(script=[call("remember", text=text), "ok"])
    _ask(_graph(model, store), "remember nothing", ALICE)
    answer = [m for m in model.calls[-1] if isinstance(m, ToolMessage)][-1]
    assert answer.text.startswith("Nothing remembered: text is empty.")
    assert store.search(user_namespace(ALICE)) == []  # (a blank memory was stored)


def test_tools_ignore_identity_smuggled_into_arguments(store: ChromaStore) -> None:
    model = ScriptedChatModel(
        script=[
            call("remember", text="x", user_id="bob", namespace=["memories", "acme", "bob"]),
            "ok",
        ]
    )
    _ask(_graph(model, store), "hi", ALICE)
    assert store.search(user_namespace(BOB)) == []


def test_reflect_stores_a_lesson_and_the_next_turn_recalls_it(store: ChromaStore) -> None:
    model = ScriptedChatModel(
        script=[call("remember", text="Alice has a dog"), "Saved your dog.", "You have a dog."]
    )
    graph = _graph(model, store)
    _ask(graph, "remember my dog", ALICE)
    lessons = store.search(user_namespace(ALICE, "lessons"))
    assert len(lessons) == 1
    lesson = lessons[0].value
    assert lesson["asked"] == "remember my dog"
    assert lesson["status"] == "success" and lesson["tools_used"] == ["remember"]
    assert "Outcome: success (completed: final answer given) using remember." in lesson["text"]
    result = _ask(graph, "do I have a dog?", ALICE)
    recalled = [m for m in result["messages"] if m.id == RECALL_ID]
    assert len(recalled) == 1  # replaced, not piled up
    assert "Alice has a dog" in recalled[0].text and "[lessons]" in recalled[0].text
    assert len(store.search(user_namespace(ALICE, "lessons"))) == 2


def test_memory_without_an_identity_fails_closed(store: ChromaStore) -> None:
    graph = _graph(ScriptedChatModel(script=["hi"]), store)
    with pytest.raises(UserError, match=r"fails closed.*context=RunContext\(user_id"):
        graph.invoke(
            {"messages": [HumanMessage("hi")]}, config={"configurable": {"thread_id": "x"}}
        )
    with pytest.raises(UserError, match="fails closed"):
        _ask(graph, "hi", RunContext())  # the anonymous default is no identity
    with pytest.raises(UserError, match="compile the graph with store="):
        g = StateGraph(AgentState, context_schema=RunContext)
        g.add_node("recall", recall())
        g.add_edge(START, "recall")
        g.compile().invoke({"messages": [HumanMessage("hi")]}, context=ALICE)


def test_recall_stays_within_its_token_budget(store: ChromaStore) -> None:
    for i in range(30):
        store.put(user_namespace(ALICE), f"m{i}", {"text": f"Alice fact {i}: " + "tea " * 20})
    model = ScriptedChatModel(script=["ok"])
    _ask(_graph(model, store, limit=20, token_budget=120), "tea?", ALICE)
    text = model.calls[0][0].text.split("You are helpful.\n\n")[-1]
    assert len(text) // 4 + 1 <= 120 + 10
    assert text.count("- [memories]") >= 1


def test_recall_and_reflect_run_under_ainvoke(store: ChromaStore) -> None:
    store.put(user_namespace(ALICE), "tz", {"text": "timezone CET"})
    model = ScriptedChatModel(script=["CET"])
    graph = _graph(model, store)

    async def go() -> dict[str, Any]:
        return await graph.ainvoke(  # type: ignore[no-any-return]
            {"messages": [HumanMessage("timezone?")]},
            config={"configurable": {"thread_id": "a"}},
            context=ALICE,
        )

    asyncio.run(go())
    assert "timezone CET" in model.calls[0][0].text
    assert len(store.search(user_namespace(ALICE, "lessons"))) == 1


def test_user_namespaces_escape_periods_and_match_whole_labels() -> None:
    ns = user_namespace(RunContext(user_id="a.b@x.io", tenant_id="acme.corp"))
    assert ns == ("memories", "acme%2Ecorp", "a%2Eb@x%2Eio")
    assert user_namespace(RunContext(user_id="u", tenant_id="acme-corp"))[1] != "acme"


@pytest.mark.parametrize(
    "attacker",
    [
        RunContext(user_id="al%2Eice", tenant_id="acme.corp"),  # the victim's escaped label
        RunContext(user_id="al.ice", tenant_id="acme%2Ecorp"),
        RunContext(user_id="al%2Eice", tenant_id="acme%2Ecorp"),
    ],
    ids=["user", "tenant", "both"],
)
def test_an_id_spelled_as_anothers_escaped_label_never_reaches_their_memories(
    store: ChromaStore, attacker: RunContext
) -> None:
    """Escaping '.' as '%2E' must escape '%' too, or 'al%2Eice' would read 'al.ice'."""
    victim = RunContext(user_id="al.ice", tenant_id="acme.corp")
    store.put(user_namespace(victim), "s", {"text": "Alice's secret: timezone CET"})
    model = ScriptedChatModel(script=["I know nothing about you."])
    _ask(_graph(model, store), "what is my secret timezone?", attacker)
    assert "CET" not in model.calls[0][0].text
    assert user_namespace(attacker) != user_namespace(victim)
    # and what the run wrote (its lesson) went to the attacker's namespace only
    assert len(store.search(user_namespace(attacker, "lessons"))) == 1
    assert store.search(user_namespace(victim, "lessons")) == []


def test_an_injected_store_tool_of_langgraph_reads_a_chroma_store(store: ChromaStore) -> None:
    """LangGraph's ToolNode fills `InjectedStore` with the graph's store (keel's agent does too:
    `tests/test_tool_injection.py`)."""

    @langchain_tool
    def read_note(key: str, store: Annotated[BaseStore, InjectedStore()]) -> str:
        """Read a note."""
        item = store.get(("notes", "acme"), key)
        return str(item.value["text"]) if item else "no such note"

    store.put(("notes", "acme"), "n1", {"text": "the spare key is under the mat"})
    g = StateGraph(MessagesState)
    g.add_node("tools", ToolNode([read_note]))
    g.add_edge(START, "tools")
    asked = AIMessage("", tool_calls=[{"name": "read_note", "args": {"key": "n1"}, "id": "c1"}])
    result = g.compile(store=store).invoke({"messages": [asked]})
    assert result["messages"][-1].text == "the spare key is under the mat"


# Working memory --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["chroma", "in_memory"])
def test_working_memory_keys_expire_on_their_own_ttl(
    kind: str, tmp_path: Path, clock: Clock
) -> None:
    st: BaseStore = ChromaStore(path=tmp_path, clock=clock) if kind == "chroma" else InMemoryStore()
    wm = WorkingMemory(st, "thread-1", clock=clock)
    wm.set("short", {"draft": 1}, ttl=10)  # 600 s
    wm.set("long", [1, 2])  # the default, 60 minutes
    clock.now += 599
    assert wm.get("short") == {"draft": 1}
    clock.now += 2
    assert wm.get("short") is None and wm.get("short", "gone") == "gone"
    assert wm.items() == {"long": [1, 2]}
    assert WorkingMemory(st, "thread-2", clock=clock).items() == {}  # per thread
    wm.delete("long")
    assert wm.items() == {}


def test_working_memory_is_shared_by_tools_and_nodes_of_a_thread(store: ChromaStore) -> None:
    @tool
    def stash(note: str) -> str:
        """Keep a note for this conversation."""
        WorkingMemory.current().set("note", note, ttl=5)
        return "kept"

    seen: list[Any] = []

    def read_note(state: AgentState) -> dict[str, Any]:
        seen.append(WorkingMemory.current().get("note"))
        return {}

    model = ScriptedChatModel(script=[call("stash", note="draft v1"), "done"])
    tools = _registry([stash])
    g = StateGraph(AgentState, context_schema=RunContext)
    g.add_node("call_model", call_model(model, tools=tools))
    g.add_node("execute_tools", execute_tools(tools))
    g.add_node("read_note", read_note)
    g.add_edge(START, "call_model")
    g.add_conditional_edges(
        "call_model", lambda s: "execute_tools" if s["messages"][-1].tool_calls else "read_note"
    )
    g.add_edge("execute_tools", "call_model")
    g.add_edge("read_note", END)
    graph = g.compile(store=store)
    graph.invoke(
        {"messages": [HumanMessage("x")]},
        config={"configurable": {"thread_id": "w1"}},
        context=ALICE,
    )
    assert seen == ["draft v1"]
    assert WorkingMemory(store, "w2").get("note") is None


# Lessons (pure) ---------------------------------------------------------------------------------


def test_a_lesson_says_what_failed_and_why() -> None:
    state: AgentState = {
        "messages": [
            HumanMessage("refund order 7"),
            AIMessage("", tool_calls=[{"name": "refund", "args": {}, "id": "c1"}]),
            ToolMessage(
                "Error: payment API timeout", tool_call_id="c1", name="refund", status="error"
            ),
            AIMessage("I could not refund it."),
        ],
        "outcome": {"status": "stopped", "terminated_reason": "error", "detail": "refund failed"},
    }
    lesson = extract_lesson(state)
    assert lesson is not None and not lesson.worked
    assert lesson.errors == ("refund: Error: payment API timeout",)
    assert lesson.text() == (
        "Asked: refund order 7 Outcome: stopped (error: refund failed) using refund. "
        "Failed along the way: refund: Error: payment API timeout. "
        "Its answer then (did not work): I could not refund it."
    )
    # a lone surrogate from a model or a tool cannot keep the lesson out of the store
    odd: AgentState = {
        **state,
        "messages": [
            HumanMessage("refund order 7"),
            AIMessage("", tool_calls=[{"name": "re\ud800fund", "args": {}, "id": "c1"}]),
            ToolMessage("Error: \udfff", tool_call_id="c1", name="refund", status="error"),
            AIMessage("Done \ud800."),
        ],
    }
    odd_lesson = extract_lesson(odd)
    assert odd_lesson is not None
    assert odd_lesson.tools_used == ("re?fund",)
    assert odd_lesson.text().encode("utf-8")  # storable
    assert "Its answer then (did not work): Done ?." in odd_lesson.text()
    paused: AgentState = {
        **state,
        "outcome": {
            "status": "interrupted",
            "terminated_reason": "awaiting_approval",
            "detail": "",
        },
    }
    assert extract_lesson(paused) is None


# -- build_agent(memory=True) ------------------------------------------------------------------


def test_build_agent_memory_recalls_before_and_reflects_after_the_run(store: ChromaStore) -> None:
    from langgraph.types import Command

    from keel.graphs import build_agent

    @tool(risk="destructive")
    def refund(order: str) -> str:
        """Refund an order."""
        return f"refunded {order}"

    store.put(user_namespace(ALICE), "pref", {"text": "Alice wants refunds as store credit"})
    model = ScriptedChatModel(script=[call("refund", order="A1"), "Refunded as store credit."])
    agent = build_agent(
        model,
        [refund],
        store=store,
        memory=True,
        checkpointer=InMemorySaver(),
        system_prompt="You are a support agent.",
    )
    config = {"configurable": {"thread_id": "mem-1"}}
    paused = agent.invoke({"messages": [HumanMessage("refund A1")]}, config, context=ALICE)
    assert paused["outcome"]["status"] == "interrupted"
    assert "store credit" in model.calls[0][0].text  # recalled into the system prompt
    # waiting for a human is not the end of the run: no lesson yet
    assert store.search(user_namespace(ALICE, "lessons")) == []
    done = agent.invoke(Command(resume={"type": "approve"}), config, context=ALICE)
    assert done["outcome"]["terminated_reason"] == "completed"
    lessons = store.search(user_namespace(ALICE, "lessons"))
    assert [lesson.value["tools_used"] for lesson in lessons] == [["refund"]]
    assert store.search(user_namespace(BOB, "lessons")) == []


def test_build_agent_memory_reflects_on_a_run_that_was_stopped(store: ChromaStore) -> None:
    from keel.graphs import build_agent
    from keel.guards import Budget, Policy, Rule

    @tool
    def echo(x: int) -> str:
        """Echo."""
        return str(x)

    policy = Policy(budget=Budget(tool_calls=1), rules=(Rule(action="allow"),), loop=None)
    model = ScriptedChatModel(script=[call("echo", x=1), call("echo", x=2), "never"])
    agent = build_agent(model, [echo], store=store, memory=True, policy=policy)
    result = agent.invoke({"messages": [HumanMessage("echo twice")]}, context=ALICE)
    assert result["outcome"]["terminated_reason"] == "budget_exceeded"
    [lesson] = store.search(user_namespace(ALICE, "lessons"))
    assert lesson.value["status"] == "stopped"
    assert "budget_exceeded" in lesson.value["reason"]


def test_build_agent_memory_needs_a_bool_and_a_store() -> None:
    from keel.graphs import build_agent

    with pytest.raises(UserError, match=r"memory=\.\.\.\) must be True or False"):
        build_agent(ScriptedChatModel(script=["hi"]), memory="chroma")  # type: ignore[arg-type]
    agent = build_agent(ScriptedChatModel(script=["hi"]), memory=True)
    with pytest.raises(UserError, match="compile the graph with store="):
        agent.invoke({"messages": [HumanMessage("hi")]}, context=ALICE)
