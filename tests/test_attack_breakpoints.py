"""A caller's breakpoints: `interrupt_before` / `interrupt_after` passed to a run.

LangGraph stops such a run between nodes with no interrupt and nothing written but the
checkpoint, so a keel run paused there returned `outcome` None and had no run record: it ended
with no outcome and no reason. It now ends `interrupted / breakpoint` (in `invoke`'s result,
the `values` chunk that ends a stream, and its run record); `invoke(None, config)` continues
it, and a new message drops its pending calls as for any stopped run (audited `not_run`).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage

from keel import Ledger, Persistence, build_agent, tool
from keel.db.audit import AuditLog
from keel.db.runs import RunLog
from keel.evals import ScriptedChatModel, call

SENT: list[int] = []


@tool(risk="write")
def send(x: int) -> str:
    """Send x (a side effect)."""
    SENT.append(x)
    return f"sent {x}"


@pytest.fixture
def world(db_url: str) -> Iterator[tuple[Any, Ledger]]:
    SENT.clear()
    ledger = Ledger(db_url)
    with Persistence(db_url).checkpointer() as saver:
        script = [call("send", x=1), "done", "second answer"]
        agent = build_agent(
            ScriptedChatModel(script=script), [send], ledger=ledger, checkpointer=saver
        )
        yield agent, ledger
    ledger.close()


def _records(ledger: Ledger) -> list[tuple[str, str]]:
    return sorted((r.status, r.terminated_reason) for r in RunLog(ledger).query())


CONFIG: Any = {"configurable": {"thread_id": "t"}}
GO = {"messages": [("user", "go")]}


def test_a_run_paused_at_a_callers_breakpoint_says_so_and_is_recorded(
    world: tuple[Any, Ledger],
) -> None:
    agent, ledger = world
    paused = agent.invoke(GO, CONFIG, interrupt_before=["execute_tools"])
    result = paused["outcome"]
    assert (result["status"], result["terminated_reason"]) == ("interrupted", "breakpoint")
    assert "interrupt_before=['execute_tools']" in result["detail"]
    assert "invoke(None, config)" in result["detail"]
    assert SENT == [] and _records(ledger) == [("interrupted", "breakpoint")]
    # continued: the call runs once, and the same record now says how the run ended
    done = agent.invoke(None, CONFIG)
    assert done["outcome"]["terminated_reason"] == "completed"
    assert SENT == [1] and _records(ledger) == [("success", "completed")]


def test_a_new_message_on_a_thread_paused_at_a_breakpoint_drops_its_calls_audited(
    world: tuple[Any, Ledger],
) -> None:
    agent, ledger = world
    agent.invoke(GO, CONFIG, interrupt_before=["execute_tools"])
    done = agent.invoke({"messages": [("user", "never mind")]}, CONFIG)
    assert done["outcome"]["terminated_reason"] == "completed"
    assert SENT == []
    assert [(a.decision, a.tool) for a in AuditLog(ledger).query()] == [("not_run", "send")]
    assert _records(ledger) == [("stopped", "cancelled"), ("success", "completed")]


@pytest.mark.parametrize("modes", [["values"], ["updates"], ["updates", "values"]])
def test_a_stream_paused_at_a_breakpoint_ends_with_the_outcome_in_values(
    world: tuple[Any, Ledger], modes: list[str]
) -> None:
    agent, ledger = world
    chunks = list(agent.stream(GO, CONFIG, interrupt_after=["call_model"], stream_mode=modes))
    assert {mode for mode, _ in chunks} == set(modes)  # no chunk of a mode it did not ask for
    if "values" in modes:
        assert chunks[-1][0] == "values"
        assert chunks[-1][1]["outcome"]["terminated_reason"] == "breakpoint"
    # the caller asked for no states: the record still says it
    assert _records(ledger) == [("interrupted", "breakpoint")]


def test_ainvoke_paused_at_a_breakpoint_says_so(db_url: str) -> None:
    SENT.clear()

    async def main() -> tuple[Any, Any, list[tuple[str, str]]]:
        ledger = Ledger(db_url)
        async with Persistence(db_url).acheckpointer() as saver:
            script = [call("send", x=1), "done"]
            agent = build_agent(
                ScriptedChatModel(script=script), [send], ledger=ledger, checkpointer=saver
            )
            paused = await agent.ainvoke(GO, CONFIG, interrupt_after=["call_model"])
            assert _records(ledger) == [("interrupted", "breakpoint")]
            done = await agent.ainvoke(None, CONFIG)
            records = _records(ledger)
        await ledger.aclose()
        return paused, done, records

    paused, done, records = asyncio.run(main())
    assert paused["outcome"]["terminated_reason"] == "breakpoint"
    assert done["outcome"]["terminated_reason"] == "completed" and SENT == [1]
    assert records == [("success", "completed")]


def test_a_breakpoint_the_run_never_reaches_changes_nothing(world: tuple[Any, Ledger]) -> None:
    agent, ledger = world
    done = agent.invoke(GO, CONFIG, interrupt_before=["human_review"])
    assert done["outcome"]["terminated_reason"] == "completed" and SENT == [1]
    assert _records(ledger) == [("success", "completed")]


@pytest.mark.parametrize("driver", ["sync", "async"])
@pytest.mark.parametrize("where", ["interrupt_before", "interrupt_after"])
def test_get_state_of_a_thread_paused_at_a_breakpoint_says_so(
    db_url: str, driver: str, where: str
) -> None:
    """`invoke` said `interrupted / breakpoint`, and `get_state` of the same thread said
    `outcome` None: the saved checkpoint alone is the one a run in flight leaves before its
    step. The run's record (`breakpoint`, written at the pause) and no run holding the thread
    tell it; `get_state` says what `invoke` said, and once continued, how the run ended."""
    SENT.clear()
    stop = {where: ["execute_tools" if where == "interrupt_before" else "call_model"]}

    async def main() -> tuple[Any, Any, Any, Any]:
        ledger = Ledger(db_url)
        try:
            if driver == "sync":
                with Persistence(db_url).checkpointer() as saver:
                    agent = build_agent(
                        ScriptedChatModel(script=[call("send", x=1), "done"]), [send],
                        ledger=ledger, checkpointer=saver,
                    )  # fmt: skip
                    paused = agent.invoke(GO, CONFIG, **stop)["outcome"]
                    read = agent.get_state(CONFIG)
                    agent.invoke(None, CONFIG)
                    return paused, read.values["outcome"], read.next, agent.get_state(CONFIG)
            async with Persistence(db_url).acheckpointer() as asaver:
                agent = build_agent(
                    ScriptedChatModel(script=[call("send", x=1), "done"]), [send],
                    ledger=ledger, checkpointer=asaver,
                )  # fmt: skip
                paused = (await agent.ainvoke(GO, CONFIG, **stop))["outcome"]
                read = await agent.aget_state(CONFIG)
                await agent.ainvoke(None, CONFIG)
                return paused, read.values["outcome"], read.next, await agent.aget_state(CONFIG)
        finally:
            await ledger.aclose()

    paused, read, next_nodes, done = asyncio.run(main())
    assert read == paused and paused["terminated_reason"] == "breakpoint", read
    assert next_nodes == ("execute_tools",)  # the node still to run
    assert done.values["outcome"]["terminated_reason"] == "completed" and SENT == [1]
    readme = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())
    assert "`get_state` says so too when the agent has a ledger" in readme


def test_get_state_of_a_run_continued_past_a_breakpoint_and_in_flight_says_none(
    db_url: str,
) -> None:
    """The run continued from its breakpoint blocks in its tool; its record still says
    `breakpoint`, and its latest checkpoint is the one it paused at. `get_state` read in this
    process (the thread's lock) and by another agent object on the same databases, as another
    process would (the thread's lease in the ledger), says `outcome` None: the run is in
    flight. Once it ends, the state says how."""
    entered, release = threading.Event(), threading.Event()

    @tool(risk="write")
    def slow_send(x: int) -> str:
        """Send x, slowly."""
        entered.set()
        release.wait(30)
        return f"sent {x}"

    def agent_on(saver: Any, ledger: Ledger) -> Any:
        script = ScriptedChatModel(script=[call("slow_send", x=1), "done"])
        return build_agent(script, [slow_send], ledger=ledger, checkpointer=saver)

    ledger, other_ledger = Ledger(db_url), Ledger(db_url)
    try:
        with (
            Persistence(db_url).checkpointer() as saver,
            Persistence(db_url).checkpointer() as other_saver,
        ):
            agent, other = agent_on(saver, ledger), agent_on(other_saver, other_ledger)
            agent.invoke(GO, CONFIG, interrupt_before=["execute_tools"])
            assert other.get_state(CONFIG).values["outcome"]["terminated_reason"] == "breakpoint"
            running = threading.Thread(target=agent.invoke, args=(None, CONFIG))
            running.start()
            try:
                assert entered.wait(30)
                assert _records(ledger) == [("interrupted", "breakpoint")]  # as it paused
                assert agent.get_state(CONFIG).values.get("outcome") is None
                assert other.get_state(CONFIG).values.get("outcome") is None
            finally:
                release.set()
                running.join(30)
            done = other.get_state(CONFIG).values["outcome"]
    finally:
        ledger.close()
        other_ledger.close()
    assert done["terminated_reason"] == "completed", done


def test_aget_state_of_a_run_continued_past_a_breakpoint_and_in_flight_says_none(
    db_url: str,
) -> None:
    """`test_get_state_of_a_run_continued_past_a_breakpoint_and_in_flight_says_none`, async:
    the continued run is a task of the loop `aget_state` reads from."""
    entered, release = asyncio.Event(), asyncio.Event()

    @tool(risk="write")
    async def slow_send(x: int) -> str:
        """Send x, slowly."""
        entered.set()
        await release.wait()
        return f"sent {x}"

    def agent_on(saver: Any, ledger: Ledger) -> Any:
        script = ScriptedChatModel(script=[call("slow_send", x=1), "done"])
        return build_agent(script, [slow_send], ledger=ledger, checkpointer=saver)

    async def main() -> tuple[Any, Any, Any]:
        ledger, other_ledger = Ledger(db_url), Ledger(db_url)
        try:
            async with (
                Persistence(db_url).acheckpointer() as saver,
                Persistence(db_url).acheckpointer() as other_saver,
            ):
                agent, other = agent_on(saver, ledger), agent_on(other_saver, other_ledger)
                await agent.ainvoke(GO, CONFIG, interrupt_before=["execute_tools"])
                running = asyncio.create_task(agent.ainvoke(None, CONFIG))
                try:
                    await asyncio.wait_for(entered.wait(), 30)
                    mine = (await agent.aget_state(CONFIG)).values.get("outcome")
                    theirs = (await other.aget_state(CONFIG)).values.get("outcome")
                finally:
                    release.set()
                    await running
                return mine, theirs, (await other.aget_state(CONFIG)).values["outcome"]
        finally:
            await ledger.aclose()
            await other_ledger.aclose()

    mine, theirs, done = asyncio.run(main())
    assert (mine, theirs) == (None, None)
    assert done["terminated_reason"] == "completed", done


def test_get_state_says_none_where_a_breakpoint_cannot_be_told(db_url: str) -> None:
    """Pinned: without a ledger there is no record of the pause and no lease to ask whether
    another process runs the thread, so `get_state` keeps the saved `outcome` None. So does a
    state update written at the pause (its checkpoint is newer than the record), and a read of
    an earlier checkpoint."""
    with Persistence(db_url).checkpointer() as saver:
        bare = build_agent(
            ScriptedChatModel(script=[call("send", x=1)]), [send], checkpointer=saver
        )
        paused = bare.invoke(
            GO, {"configurable": {"thread_id": "bare"}}, interrupt_before=["execute_tools"]
        )
        assert paused["outcome"]["terminated_reason"] == "breakpoint"
        assert bare.get_state({"configurable": {"thread_id": "bare"}}).values.get("outcome") is None

        ledger = Ledger(db_url)
        try:
            model = ScriptedChatModel(script=[call("send", x=1)])
            agent = build_agent(model, [send], ledger=ledger, checkpointer=saver)
            agent.invoke(GO, CONFIG, interrupt_before=["execute_tools"])
            at_pause = agent.get_state(CONFIG)
            assert at_pause.values["outcome"]["terminated_reason"] == "breakpoint"
            assert (
                agent.get_state(at_pause.config).values.get("outcome") is None
            )  # by checkpoint_id
            agent.update_state(
                CONFIG, {"messages": [AIMessage("edited", id="e")]}, as_node="call_model"
            )
            assert agent.get_state(CONFIG).values.get("outcome") is None
        finally:
            ledger.close()
