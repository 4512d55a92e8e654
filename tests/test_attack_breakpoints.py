"""A caller's breakpoints: `interrupt_before` / `interrupt_after` passed to a run.

LangGraph stops such a run between nodes with no interrupt and nothing written but the
checkpoint, so a keel run paused there returned `outcome` None and had no run record: it ended
with no outcome and no reason. It now ends `interrupted / breakpoint` (in `invoke`'s result,
the `values` chunk that ends a stream, and its run record); `invoke(None, config)` continues
it, and a new message drops its pending calls as for any stopped run (audited `not_run`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

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
