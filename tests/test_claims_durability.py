"""README's "What every run guarantees" and "Durable side effects", each tried the way it breaks.

The model here names every tool call with a fresh random id (`fresh_ids=True`), as real models
do; `tests/test_crash.py` adds real SIGKILLs.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from langchain_core.messages import AIMessage
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from langgraph.types import Command

from keel import Ledger, Persistence, RunContext, build_agent, tool
from keel.db.idempotency import claim_flow
from keel.evals import ScriptedChatModel, call

CTX = RunContext(user_id="u1")


def test_a_scripted_model_with_fresh_ids_names_each_call_anew() -> None:
    model = ScriptedChatModel(script=[call("charge", order_id="A1")], fresh_ids=True)
    first = model.invoke([("user", "charge A1")])
    again = model.invoke([("user", "charge A1")])
    assert isinstance(first, AIMessage) and isinstance(again, AIMessage)
    assert first.tool_calls[0]["args"] == again.tool_calls[0]["args"]
    assert first.tool_calls[0]["id"] != again.tool_calls[0]["id"]


# -- "a side-effecting call may run only once the message that requested it is durable" ------


class SlowSaver(SqliteSaver):
    """Saves each checkpoint 0.3 s late, as a busy database does."""

    def put(self, *args: Any, **kwargs: Any) -> Any:
        time.sleep(0.3)
        return super().put(*args, **kwargs)


class SlowAsyncSaver(AsyncSqliteSaver):
    async def aput(self, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0.3)
        return await super().aput(*args, **kwargs)


def _request_saved(saver: Any, thread: str) -> bool:
    """Whether the thread's saved checkpoint holds the model message with the tool call."""
    saved = saver.get_tuple({"configurable": {"thread_id": thread}})
    messages = saved.checkpoint["channel_values"].get("messages", []) if saved else []
    return any(getattr(m, "tool_calls", None) for m in messages)


def test_a_side_effect_runs_only_after_its_request_is_saved(tmp_path: Path) -> None:
    """keel's graphs save each checkpoint before the next step (LangGraph's default does not)."""
    seen: list[bool] = []
    with SqliteSaver.from_conn_string(str(tmp_path / "ckpt.db")) as base:
        saver = SlowSaver(base.conn)

        @tool(risk="write")
        def charge(order_id: str) -> str:
            """Charge an order."""
            seen.append(_request_saved(saver, "t1"))
            return "charged"

        model = ScriptedChatModel(script=[call("charge", order_id="A1"), "Done."], fresh_ids=True)
        ledger = Ledger(f"sqlite:///{tmp_path}/keel.db")
        agent = build_agent(model, [charge], checkpointer=saver, ledger=ledger)
        config: Any = {"configurable": {"thread_id": "t1"}}
        agent.invoke({"messages": [("user", "charge A1")]}, config, context=CTX)
        ledger.close()
    assert seen == [True]


async def test_under_async_durability_a_side_effect_waits_for_its_request(tmp_path: Path) -> None:
    """LangGraph server runs graphs with `durability="async"`: execute_tools waits itself."""
    seen: list[bool] = []
    async with AsyncSqliteSaver.from_conn_string(str(tmp_path / "ckpt.db")) as base:
        saver = SlowAsyncSaver(base.conn)

        @tool(risk="write")
        async def charge(order_id: str) -> str:
            """Charge an order."""
            saved = await saver.aget_tuple({"configurable": {"thread_id": "t1"}})
            messages = saved.checkpoint["channel_values"].get("messages", []) if saved else []
            seen.append(any(getattr(m, "tool_calls", None) for m in messages))
            return "charged"

        model = ScriptedChatModel(script=[call("charge", order_id="A1"), "Done."], fresh_ids=True)
        ledger = Ledger(f"sqlite:///{tmp_path}/keel.db")
        agent = build_agent(model, [charge], checkpointer=saver, ledger=ledger)
        config: Any = {"configurable": {"thread_id": "t1"}}
        await agent.ainvoke(
            {"messages": [("user", "charge A1")]}, config, context=CTX, durability="async"
        )
        await ledger.aclose()
    assert seen == [True]


# -- "a call found started but never finished ... is never silently repeated" ---------------


def test_an_orphaned_started_call_is_asked_about_before_the_tool_runs_again(db_url: str) -> None:
    """The process died mid-call before the checkpoint holding the call was saved: the thread
    has no trace of it, the model asks again under a new id, and the ledger's `started` row
    of that call (under the old id) must stop the tool and ask "did this happen?"."""
    runs: list[str] = []

    @tool(risk="write")
    def charge(order_id: str) -> str:
        """Charge an order."""
        runs.append(order_id)
        return f"charged {order_id}"

    ledger = Ledger(db_url)
    ledger.setup()
    # what the killed process left: a claim under an id the thread never saved
    assert ledger.run(claim_flow("t1", "call_lost", "charge", "d")).action == "run"
    model = ScriptedChatModel(script=[call("charge", order_id="A1"), "Done."], fresh_ids=True)
    with Persistence(db_url).checkpointer() as saver:
        agent = build_agent(model, [charge], checkpointer=saver, ledger=ledger)
        config: Any = {"configurable": {"thread_id": "t1"}}
        paused = agent.invoke({"messages": [("user", "charge A1")]}, config, context=CTX)
        assert runs == []
        assert paused["outcome"]["status"] == "interrupted"
        (request,) = paused["__interrupt__"][0].value
        assert request["kind"] == "outcome_unknown"
        assert request["tool_call_id"] != "call_lost"  # adopted by the call that repeats it
        done = agent.invoke(Command(resume={"type": "run_again"}), config, context=CTX)
    assert runs == ["A1"]
    assert done["outcome"]["terminated_reason"] == "completed"
    rows = ledger.run(_states("t1"))
    ledger.close()
    assert rows == ["completed"]


def _states(thread: str) -> Any:
    rows = yield ("SELECT state FROM keel_tool_calls WHERE thread_id = ?", (thread,))
    return [r[0] for r in rows]
