"""The thread a run leaves when it does not finish, and the next task on it.

A run stopped mid-step (Ctrl-C in a tool, an `ainvoke` task cancelled, its process SIGKILLed,
its checkpointer failing) leaves an AI message whose tool calls have no answer, and nothing
waits for a human. Real providers reject such a history (OpenAI: "An assistant message with
'tool_calls' must be followed by tool messages responding to each 'tool_call_id'"). The next
message on the thread must find each call answered exactly once before it, with what keel
knows (its result recorded in the ledger, "outcome unknown" when it started, else `not_run`),
audited, never run again; and the stopped run has a run record.

The model mints a fresh id for every tool call, as real models do, and refuses a malformed
history (`strict_history`, on by default, as OpenAI's API does).
"""

from __future__ import annotations

import asyncio
import signal
import textwrap
from pathlib import Path
from typing import Any

import pytest
from forking import ForkServer
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage

from keel import AuditLog, Ledger, Persistence, RunContext, RunLog, build_agent, tool
from keel.evals import ScriptedChatModel, call
from keel.evals.scripted import malformed, needs_tools
from keel.history import valid_history

CTX = RunContext(user_id="u1", tenant_id="acme")
FIRST = {"messages": [("user", "refund order A1")]}
SECOND = {"messages": [("user", "never mind; where is order B2?")]}
UNKNOWN = "Outcome unknown: this call started"
NOT_RUN = "Not run: the run that asked for it stopped"


def _model() -> ScriptedChatModel:
    return ScriptedChatModel(
        script=[call("refund", order_id="A1"), "B2 ships tomorrow.", "Anything else?"],
        fresh_ids=True,
    )


def _cfg(thread: str = "t1") -> dict[str, Any]:
    return {"configurable": {"thread_id": thread}}


def _answers(messages: list[BaseMessage], call_id: str) -> list[ToolMessage]:
    return [m for m in messages if isinstance(m, ToolMessage) and m.tool_call_id == call_id]


def _left_call(messages: list[BaseMessage]) -> str:
    """The id of the first turn's call (the one the stopped run left)."""
    first = next(m for m in messages if isinstance(m, AIMessage) and m.tool_calls)
    return str(first.tool_calls[0]["id"])


def _assert_next_task(model: ScriptedChatModel, messages: list[BaseMessage], start: str) -> str:
    """The next task's model input and the saved thread answer the left call once, first.

    Returns the answer's text.
    """
    seen = model.calls[-1]
    assert malformed(seen) is None, seen
    assert valid_history(messages) == list(messages), "the saved thread is malformed"
    call_id = _left_call(messages)
    answers = _answers(messages, call_id)
    assert len(answers) == 1, answers
    answer = answers[0]
    assert answer.content.startswith(start), answer.content
    index = messages.index(answer)
    assert isinstance(messages[index + 1], HumanMessage), "answered after the next message"
    read = _answers(seen, call_id)  # what the model read: a tool-less agent reads it as text
    if read:
        assert read[0].content == answer.content
    else:  # Anthropic refuses tool blocks in a request without tools (needs_tools)
        assert needs_tools(seen) is None, seen
        assert any(str(answer.content) in m.text for m in seen if isinstance(m, AIMessage))
    return str(answer.content)


def _audited(ledger: Ledger, call_id: str) -> list[tuple[str, str]]:
    return [(r.decision, r.status) for r in AuditLog(ledger).query() if r.tool_call_id == call_id]


def _runs(ledger: Ledger) -> list[tuple[str, str, str]]:
    return [(r.status, r.terminated_reason, r.detail) for r in RunLog(ledger).query()]


# -- 1. Ctrl-C inside a tool (sync) ---------------------------------------------------------


@pytest.mark.parametrize("risk", ["write", "read"])
def test_ctrl_c_in_a_tool_then_a_new_message(tmp_path: Path, risk: str) -> None:
    """KeyboardInterrupt in a tool: the run is recorded cancelled, and the thread kept the AI
    message whose call never got an answer. The next message's model call read a made-up
    "the run stopped before it ran" although a side-effecting call had started (the ledger
    says `started`): a model told a refund did not happen asks for it again. Now the call is
    answered "outcome unknown" (a read, never claimed: `not_run`), saved before the new
    message, audited, never run again; the cancelled run keeps its own record."""
    ran: list[str] = []

    @tool(risk=risk, name="refund")
    def refund(order_id: str) -> str:
        """Refund an order."""
        ran.append(order_id)
        raise KeyboardInterrupt

    url = f"sqlite:///{tmp_path}/keel.db"
    ledger, model = Ledger(url), _model()
    with Persistence(url).checkpointer() as saver:
        agent = build_agent(model, [refund], ledger=ledger, checkpointer=saver)
        with pytest.raises(KeyboardInterrupt):
            agent.invoke(FIRST, _cfg(), context=CTX)
        done = agent.invoke(SECOND, _cfg(), context=CTX)
    assert done["outcome"]["terminated_reason"] == "completed", done["outcome"]
    assert done["messages"][-1].content == "B2 ships tomorrow."
    start = UNKNOWN if risk == "write" else NOT_RUN
    _assert_next_task(model, done["messages"], start)
    assert ran == ["A1"]
    call_id = _left_call(done["messages"])
    assert _audited(ledger, call_id) == [("not_run", "not_run")]
    (stopped, _, why), finished = _runs(ledger)
    assert (stopped, "KeyboardInterrupt" in why) == ("stopped", True), why  # its own end stands
    assert finished[:2] == ("success", "completed")


@tool(risk="write", name="refund")
def ctrl_c_refund(order_id: str) -> str:
    """Refund an order (Ctrl-C lands while it runs)."""
    raise KeyboardInterrupt


def _stopped_by_ctrl_c(model: ScriptedChatModel, saver: Any) -> Any:
    """An agent without a ledger whose first task Ctrl-C stopped in its tool."""
    agent = build_agent(model, [ctrl_c_refund], checkpointer=saver)
    with pytest.raises(KeyboardInterrupt):
        agent.invoke(FIRST, _cfg(), context=CTX)
    return agent


def test_no_ledger_answers_not_run(tmp_path: Path) -> None:
    """Without a ledger keel cannot know whether the call started: it says it did not run it
    now, and the thread is still one a provider takes."""
    model = _model()
    with Persistence(f"sqlite:///{tmp_path}/keel.db").checkpointer() as saver:
        done = _stopped_by_ctrl_c(model, saver).invoke(SECOND, _cfg(), context=CTX)
    text = _assert_next_task(model, done["messages"], NOT_RUN)
    assert "keel does not run it now" in text


def test_a_client_that_answers_the_left_call_itself_gets_no_second_answer(
    tmp_path: Path,
) -> None:
    """A client that sends the call's result with its message (a client-side tool) answers it:
    keel adds no answer of its own (two answers to one call are malformed too)."""
    model = _model()
    with Persistence(f"sqlite:///{tmp_path}/keel.db").checkpointer() as saver:
        agent = _stopped_by_ctrl_c(model, saver)
        call_id = _left_call(agent.get_state(_cfg()).values["messages"])
        mine = ToolMessage("refunded by the client", tool_call_id=call_id, name="refund")
        done = agent.invoke({"messages": [mine, ("user", "and B2?")]}, _cfg(), context=CTX)
    assert [m.content for m in _answers(done["messages"], call_id)] == ["refunded by the client"]
    assert malformed(model.calls[-1]) is None


# -- 2. an ainvoke task cancelled mid-tool ---------------------------------------------------


async def test_a_cancelled_async_run_then_a_new_message(db_url: str) -> None:
    ran: list[str] = []
    started = asyncio.Event()

    @tool(risk="write", name="refund")
    async def refund(order_id: str) -> str:
        """Refund an order."""
        ran.append(order_id)
        started.set()
        await asyncio.sleep(30)
        return f"refunded {order_id}"

    ledger, model = Ledger(db_url), _model()
    try:
        async with Persistence(db_url).acheckpointer() as saver:
            agent = build_agent(model, [refund], ledger=ledger, checkpointer=saver)
            task = asyncio.create_task(agent.ainvoke(FIRST, _cfg(), context=CTX))
            await asyncio.wait_for(started.wait(), 30)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            done = await agent.ainvoke(SECOND, _cfg(), context=CTX)
        _assert_next_task(model, done["messages"], UNKNOWN)
        assert ran == ["A1"]
        call_id = _left_call(done["messages"])
        assert _audited(ledger, call_id) == [("not_run", "not_run")]
        (stopped, _, why), (finished, _, _) = _runs(ledger)
        assert (stopped, finished) == ("stopped", "success")
        assert "task was cancelled" in why, why
    finally:
        await ledger.aclose()


# -- 3. the process SIGKILLed mid-tool -------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from keel import Ledger, Persistence, RunContext, build_agent, tool
    from keel.evals import ScriptedChatModel, call

    url, effects, when, risk = sys.argv[1:5]

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    @tool(risk=risk, name="refund")
    def refund(order_id: str) -> str:
        \"\"\"Refund an order.\"\"\"
        with open(effects, "a") as f:
            f.write(order_id + "\\n")
        if when == "in the tool":
            die()
        return f"refunded {order_id}"

    model = ScriptedChatModel(script=[call("refund", order_id="A1")], fresh_ids=True)
    with Persistence(url).checkpointer() as saver:
        put_writes = saver.put_writes

        def dies_after_the_tool_step(config, writes, task_id, task_path=""):
            put_writes(config, writes, task_id, task_path)
            if any(channel == "messages" and "refunded" in str(value) for channel, value in writes):
                die()  # the tool step's writes are saved, the checkpoint after it is not

        if when == "before the checkpoint":
            saver.put_writes = dies_after_the_tool_step
        agent = build_agent(model, [refund], ledger=Ledger(url), checkpointer=saver)
        agent.invoke({"messages": [("user", "refund order A1")]},
                     {"configurable": {"thread_id": "t1", "run_id": "run-1"}},
                     context=RunContext(user_id="u1", tenant_id="acme"),
                     durability="sync")  # the model's turn is saved before a read runs too
    """
)


def _killed_mid_tool(
    forks: ForkServer, url: str, effects: Path, when: str = "in the tool", risk: str = "write"
) -> None:
    """A child process runs the first task and is SIGKILLed right after the refund (`when`:
    in the tool, or once the tool step's writes are saved, before its checkpoint). It is
    forked with keel imported (`tests/forking.py`)."""
    proc = forks.start_code(CHILD, url, str(effects), when, risk, cwd=effects.parent)
    assert proc.finish() == -signal.SIGKILL, proc.output()[1][-2000:]
    assert effects.read_text() == "A1\n"


async def _next_message(url: str, ledger: Ledger, model: Any, driver: str) -> Any:
    """The thread's next message, sent by a fresh agent (`invoke` or `ainvoke`)."""
    config = {"configurable": {"thread_id": "t1", "run_id": "run-2"}}  # as a server names it
    if driver == "async":
        async with Persistence(url).acheckpointer() as asaver:
            agent = build_agent(model, [], ledger=ledger, checkpointer=asaver)
            return await agent.ainvoke(SECOND, config, context=CTX)
    with Persistence(url).checkpointer() as saver:
        agent = build_agent(model, [], ledger=ledger, checkpointer=saver)
        return agent.invoke(SECOND, config, context=CTX)


@pytest.mark.parametrize("driver", ["sync", "async"])
async def test_sigkill_mid_tool_then_a_new_message_from_a_fresh_process(
    db_url: str, tmp_path: Path, forks: ForkServer, driver: str
) -> None:
    """The killed run wrote no run record (its process could not), and the next message's
    model read "the run stopped before it ran" about a refund that happened. Now: "outcome
    unknown", audited, the refund not repeated, and the killed run recorded `stopped/cancelled`
    by the next message, under its own run id (not the next run's)."""
    effects = tmp_path / "effects"
    _killed_mid_tool(forks, db_url, effects)
    ledger, model = Ledger(db_url), _model()
    try:
        done = await _next_message(db_url, ledger, model, driver)
        assert done["outcome"]["terminated_reason"] == "completed", done["outcome"]
        _assert_next_task(model, done["messages"], UNKNOWN)
        assert effects.read_text() == "A1\n"
        call_id = _left_call(done["messages"])
        assert _audited(ledger, call_id) == [("not_run", "not_run")]
        (stopped, reason, why), (finished, _, _) = _runs(ledger)
        assert (stopped, reason, finished) == ("stopped", "cancelled", "success")
        assert "process ended" in why and "refund" in why, why
        killed, finished_run = RunLog(ledger).query()
        assert (killed.model_calls, killed.tool_calls) == (1, 1)  # its own usage, its call
        # its own run id (its checkpoints name it), not the next run's: it had none
        assert (killed.run_id, finished_run.run_id) == ("run-1", "run-2")
        answered_by = {r.run_id for r in AuditLog(ledger).query() if r.tool_call_id == call_id}
        assert answered_by == {"run-2"}  # the run that answered the call
    finally:
        await ledger.aclose()


@pytest.mark.parametrize(
    ("risk", "driver"), [("read", "sync"), ("write", "sync"), ("read", "async")]
)
async def test_killed_before_the_checkpoint_after_its_tool_step(
    db_url: str, tmp_path: Path, forks: ForkServer, risk: str, driver: str
) -> None:
    """The tool step finished and its writes were saved, but the process died before the
    checkpoint after it. `get_state` shows the result (it applies the pending writes), so keel
    saw nothing left; LangGraph's run for a new message drops that step, result included: the
    model read a filler and the saved thread kept an unanswered call. Now the call is answered
    with the result its step saved (a read has no ledger record to fall back on)."""
    effects = tmp_path / "effects"
    _killed_mid_tool(forks, db_url, effects, "before the checkpoint", risk)
    ledger, model = Ledger(db_url), _model()
    try:
        done = await _next_message(db_url, ledger, model, driver)
        assert done["outcome"]["terminated_reason"] == "completed", done["outcome"]
        _assert_next_task(model, done["messages"], "refunded A1")
        assert effects.read_text() == "A1\n"
    finally:
        await ledger.aclose()


def test_sigkill_mid_tool_then_a_resume_asks_did_this_happen(
    db_url: str, tmp_path: Path, forks: ForkServer
) -> None:
    """A resume without new input keeps at most once: the call started, so a human is asked,
    and nothing runs again (no `not_run` answer either: nothing moved on)."""
    effects = tmp_path / "effects"
    _killed_mid_tool(forks, db_url, effects)
    ran: list[str] = []

    @tool(risk="write", name="refund")
    def refund(order_id: str) -> str:
        """Refund an order."""
        ran.append(order_id)
        return "refunded"

    ledger, model = Ledger(db_url), _model()
    try:
        with Persistence(db_url).checkpointer() as saver:
            agent = build_agent(model, [refund], ledger=ledger, checkpointer=saver)
            out = agent.invoke(None, _cfg(), context=CTX)
            waiting = agent.get_state(_cfg())
        assert out["outcome"]["status"] == "interrupted", out["outcome"]
        kinds = [r.get("kind") for i in waiting.interrupts for r in i.value]
        assert kinds == ["outcome_unknown"]
        assert ran == [] and model.calls == []
        assert not any(isinstance(m, ToolMessage) for m in out["messages"])
    finally:
        ledger.close()


# -- 4. the checkpointer failed after the call ran and was recorded ---------------------------


def test_a_call_recorded_before_the_checkpointer_failed_is_answered_with_its_result(
    tmp_path: Path,
) -> None:
    """The refund ran and its result is in the ledger, but the checkpoint after it failed
    (`error/storage`). The next message's model read "the run stopped before it ran": a model
    told that refunds again. Now it reads the recorded result, audited."""
    ran: list[str] = []
    ledger, model = Ledger(f"sqlite:///{tmp_path}/ledger.db"), _model()
    with Persistence(f"sqlite:///{tmp_path}/k.db").checkpointer() as saver:

        @tool(risk="write", name="refund")
        def refund(order_id: str) -> str:
            """Refund an order."""
            ran.append(order_id)
            saver.conn.execute("PRAGMA query_only = ON")  # the checkpointer's disk fails
            return f"refunded {order_id}"

        agent = build_agent(model, [refund], ledger=ledger, checkpointer=saver)
        first = agent.invoke(FIRST, _cfg(), context=CTX)
        assert first["outcome"]["terminated_reason"] == "storage", first["outcome"]
        saver.conn.execute("PRAGMA query_only = OFF")
        done = agent.invoke(SECOND, _cfg(), context=CTX)
    _assert_next_task(model, done["messages"], "refunded A1")
    assert ran == ["A1"]
    call_id = _left_call(done["messages"])
    answer = _answers(done["messages"], call_id)[0]
    assert answer.response_metadata["keel_ledger"] == "recorded"
    assert _audited(ledger, call_id) == [("allow", "success"), ("not_run", "success")]
    (failed, reason, _), (finished, _, _) = _runs(ledger)
    assert (failed, reason, finished) == ("error", "storage", "success")  # its end stands


# -- 5. cancelled before its first state was saved -------------------------------------------


async def test_a_run_cancelled_before_its_first_state_leaves_nothing_to_answer(
    tmp_path: Path,
) -> None:
    """Cancelled at once: nothing of it is saved or recorded, and the next run is the thread's
    first, with a clean record."""
    url = f"sqlite:///{tmp_path}/keel.db"
    ledger = Ledger(url)
    model = ScriptedChatModel(script=["Hello.", "Hi again."])
    try:
        async with Persistence(url).acheckpointer() as saver:
            agent = build_agent(model, [], ledger=ledger, checkpointer=saver)
            task = asyncio.create_task(agent.ainvoke(FIRST, _cfg(), context=CTX))
            await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            done = await agent.ainvoke(SECOND, _cfg(), context=CTX)
        assert done["outcome"]["terminated_reason"] == "completed"
        assert [m.type for m in done["messages"]] == ["human", "ai"]
        assert [r[:2] for r in _runs(ledger)] == [("success", "completed")]
    finally:
        await ledger.aclose()


# -- the scripted model refuses what providers refuse -----------------------------------------


def test_strict_scripted_model_refuses_a_history_a_provider_refuses() -> None:
    asked = AIMessage("", tool_calls=[{"name": "t", "args": {}, "id": "c1"}])
    answer = ToolMessage("ok", tool_call_id="c1")
    assert malformed([HumanMessage("hi"), asked, answer, HumanMessage("and?")]) is None
    assert "c1" in str(malformed([HumanMessage("hi"), asked, HumanMessage("and?")]))
    assert "c1" in str(malformed([HumanMessage("hi"), asked]))
    assert "c2" in str(malformed([HumanMessage("hi"), ToolMessage("x", tool_call_id="c2")]))
    assert malformed([asked, answer, answer]) is not None  # answered twice
    model = ScriptedChatModel(script=["fine"])  # strict by default
    with pytest.raises(ValueError, match="tool_call_id"):
        model.invoke([HumanMessage("hi"), asked, HumanMessage("and?")])
    assert model.calls == [[HumanMessage("hi"), asked, HumanMessage("and?")]]  # what was sent
    lenient = ScriptedChatModel(script=["-", "fine"], strict_history=False)
    assert lenient.invoke([asked]).content == "fine"
