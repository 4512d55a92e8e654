"""Storage that fails at the edges of a run: the ledger down while `human_review` takes a
reviewer's answers, a checkpointer that raises something other than a database error.

Real parts: a PostgreSQL ledger whose statements are killed mid-transaction
(`pg_terminate_backend`), real SQLite savers. README: "No run ends in a bare traceback: it ends
with an outcome and a reason."
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
from langchain_core.messages import AIMessage, ToolMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from langgraph.graph import START, StateGraph
from langgraph.types import Command
from test_storage_faults import InFlightKiller

from keel import Ledger, Persistence, RunContext, StorageError, build_agent, tool
from keel.db.runs import STORAGE_FAILED, RunLog
from keel.errors import UnserializableState
from keel.evals import ScriptedChatModel, call
from keel.graphs._protected import protected
from keel.guards import InputGuardPolicy, ModelDetector, PeriodBudget, Policy, Rule
from keel.pricing import Price, PriceTable
from keel.state import AgentState

CTX = RunContext(user_id="u1", tenant_id="acme")
PRICES = PriceTable(
    {
        "agent-model": Price(input_per_mtok=1.0, output_per_mtok=1.0),
        "judge-model": Price(input_per_mtok=1.0, output_per_mtok=1.0),
    }
)


def _review_agent(ledger: Ledger, saver: Any, world: list[str]) -> Any:
    """Two refunds that ask a human; the reviewer's text passes a model detector whose calls
    reserve the user's period budget in the ledger."""

    @tool(risk="write")
    def refund(order_id: str) -> str:
        """Refund an order."""
        world.append(order_id)
        return f"refunded {order_id}"

    judge = ScriptedChatModel(
        structured={"InjectionVerdict": {"injection": False, "reason": "plain"}},
        model_name="judge-model",
    )
    turn = call("refund", order_id="A1")
    turn.tool_calls.append({**turn.tool_calls[0], "args": {"order_id": "B2"}, "id": "second"})
    model = ScriptedChatModel(  # the second refund keeps its id: the test reads it by "second"
        script=[turn, "unused", "done again"], model_name="agent-model", fresh_ids=False
    )
    guard = InputGuardPolicy(detector=ModelDetector(model=judge), injection_action="block")
    policy = Policy(
        name="review",
        rules=(Rule(tool="refund", action="ask"),),
        input_guard=guard,
        period_budgets=(PeriodBudget(scope="user", period="month", usd=100),),
    )
    return build_agent(
        model, [refund], policy=policy, prices=PRICES, ledger=ledger, checkpointer=saver
    )


def _runner(agent: Any, config: Any, mode: str) -> Callable[[Any], Awaitable[Any]]:
    """Runs `agent` on the thread of `config` under `invoke` (in a worker thread: no event
    loop there, so a detector is called as under a plain `invoke`) or `ainvoke`."""

    async def run(payload: Any) -> Any:
        if mode == "ainvoke":
            return await agent.ainvoke(payload, config, context=CTX)
        return await asyncio.to_thread(agent.invoke, payload, config, context=CTX)

    return run


@pytest.mark.postgres
@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
async def test_ledger_down_while_the_reviewers_text_is_screened_runs_no_approved_call(
    fresh_postgres_url: str, mode: str
) -> None:
    """The reviewer approves A1 and answers B2 with text; the ledger fails (its statement killed in
    each of its attempts) when the detector's call reserves the period budget. The node
    ends the run as `error`; the approved A1 does not go on to run in a run that failed (it
    did: the route after review sent only `stopped` runs to `respond`). The run says why, its
    record too, and the thread goes on once the ledger is back."""
    killer, world = InFlightKiller(fresh_postgres_url), []
    ledger = Ledger(fresh_postgres_url)
    try:
        agent = _review_agent(ledger, InMemorySaver(), world)
        config: Any = {"configurable": {"thread_id": f"review-down-{mode}"}}

        run = _runner(agent, config, mode)
        paused = await run({"messages": [("user", "refund both")]})
        requests = paused["__interrupt__"][0].value
        assert [r["action_request"]["args"]["order_id"] for r in requests] == ["A1", "B2"]
        killer.arm("keel_spend", times=3)  # each of the ledger's 3 attempts
        answers = [{"type": "approve"}, {"type": "respond", "message": "not B2"}]
        result = await run(Command(resume=answers))
        await asyncio.to_thread(killer.join)
        assert killer.killed == ["keel_spend"] * 3

        ended = result["outcome"]
        assert ended["status"] == "error" and ended["detail"].startswith(STORAGE_FAILED), ended
        assert world == []  # the approved call did not run
        replies = {m.tool_call_id: m for m in result["messages"] if isinstance(m, ToolMessage)}
        assert set(replies) == {r["tool_call_id"] for r in requests}  # the thread stays valid
        approved = replies[requests[0]["tool_call_id"]]
        assert approved.response_metadata["keel_status"] == "not_run"
        assert "not B2" not in replies["second"].text  # not screened: withheld (block)
        records = RunLog(ledger).query()
        assert [r.terminated_reason for r in records] == ["error"]
        assert records[0].detail.startswith(STORAGE_FAILED) and "keel_spend" in records[0].detail

        # the ledger is back: the thread takes the next message and completes
        again = await run({"messages": [("user", "and now?")]})
        assert again["outcome"]["terminated_reason"] == "completed", again["outcome"]
        assert world == []
        records = RunLog(ledger).query()
        assert [r.terminated_reason for r in records] == ["error", "completed"]
    finally:
        await ledger.aclose()


# -- a checkpointer that raises something other than a database error -------------------------

FINAL = "It was delivered."


def _holds_final(values: Any) -> bool:
    return any(getattr(m, "content", None) == FINAL for m in (values or {}).get("messages", []))


class BuggySaver(SqliteSaver):
    """A custom saver with a bug: it raises `error` when it stores the model's final answer
    (`put`, or `put_writes` with `on="put_writes"`): as a saver that cannot serialize a value."""

    def __init__(self, conn: Any, error: Exception, on: str = "put") -> None:
        super().__init__(conn)
        self.error, self.on, self.armed = error, on, True

    def put(self, config: Any, checkpoint: Any, metadata: Any, new_versions: Any) -> Any:
        if self.armed and self.on == "put" and _holds_final(checkpoint["channel_values"]):
            raise self.error
        return super().put(config, checkpoint, metadata, new_versions)

    def put_writes(self, config: Any, writes: Any, task_id: str, task_path: str = "") -> None:
        written = [
            m for c, v in writes if c == "messages" for m in (v if isinstance(v, list) else [v])
        ]
        if self.armed and self.on == "put_writes" and _holds_final({"messages": written}):
            raise self.error
        super().put_writes(config, writes, task_id, task_path)


def _answering_agent(saver: Any, ledger: Ledger) -> Any:
    @tool
    def lookup(order_id: str) -> str:
        """Look up an order."""
        return f"order {order_id}: delivered"

    model = ScriptedChatModel(script=[call("lookup", order_id="A1"), FINAL, FINAL])
    return build_agent(model, [lookup], checkpointer=saver, ledger=ledger)


@pytest.mark.parametrize("on", ["put", "put_writes"])
@pytest.mark.parametrize(
    "error", [RuntimeError("saver bug"), TypeError("Object of type Widget is not serializable")]
)
def test_a_checkpointer_raising_a_non_storage_error_ends_the_run_with_an_outcome(
    tmp_path: Path, error: Exception, on: str
) -> None:
    """The model answered; saving that answer raised. The run ends with `error/storage` naming
    the exception (not a bare traceback), its record says so (not `completed`), and the thread
    resumes from its last saved checkpoint once the saver works."""
    ledger = Ledger(f"sqlite:///{tmp_path}/ledger.db")
    conn = sqlite3.connect(tmp_path / "k.db", check_same_thread=False)
    saver = BuggySaver(conn, error, on)
    agent = _answering_agent(saver, ledger)
    config: Any = {"configurable": {"thread_id": f"buggy-{on}"}}
    result = agent.invoke({"messages": [("user", "where is A1?")]}, config, context=CTX)
    ended = result["outcome"]
    assert (ended["status"], ended["terminated_reason"]) == ("error", "storage"), ended
    named = f"the checkpointer raised {type(error).__name__}: {error}"
    assert named in ended["detail"] and "not saved" in ended["detail"], ended
    assert [(r.terminated_reason, r.detail, r.model_calls) for r in RunLog(ledger).query()] == [
        ("storage", ended["detail"], 2)  # both its model calls: the answer it lost was paid for
    ]
    saver.armed = False  # fixed: the thread resumes from its last saved checkpoint
    done = agent.invoke(None, config, context=CTX)
    assert done["outcome"]["terminated_reason"] == "completed", done["outcome"]
    assert _holds_final(agent.get_state(config).values)
    # the same run, now ended: its record says so (the resume did not run the route that
    # records an end again: that ran before the failure, and its writes were saved)
    assert [r.terminated_reason for r in RunLog(ledger).query()] == ["completed"]
    ledger.close()


class AfterInputSaver(SqliteSaver):
    """Saves a run's input checkpoint (the input as LangGraph's raw write), then fails every
    checkpoint after it while armed."""

    armed = True

    def put(self, config: Any, checkpoint: Any, metadata: Any, new_versions: Any) -> Any:
        if self.armed and metadata.get("source") != "input":
            raise RuntimeError("saver bug")
        return super().put(config, checkpoint, metadata, new_versions)


def test_a_run_resumed_from_its_input_checkpoint_keeps_its_one_record(tmp_path: Path) -> None:
    """Only the run's input checkpoint was saved. Resumed, LangGraph applies the saved input
    again, and `add_messages` gave the user's message a new id: the run's record is keyed on
    that id, so the run had two records (`storage` under the first id, `completed` under the
    second). keel gives a caller's message its id before LangGraph sees it."""
    ledger = Ledger(f"sqlite:///{tmp_path}/ledger.db")
    saver = AfterInputSaver(sqlite3.connect(tmp_path / "k.db", check_same_thread=False))
    agent = _answering_agent(saver, ledger)
    config: Any = {"configurable": {"thread_id": "input-only"}}
    failed = agent.invoke({"messages": [("user", "where is A1?")]}, config, context=CTX)
    assert failed["outcome"]["terminated_reason"] == "storage", failed["outcome"]
    saver.armed = False
    done = agent.invoke(None, config, context=CTX)
    assert done["outcome"]["terminated_reason"] == "completed", done["outcome"]
    assert done["messages"][0].id == failed["messages"][0].id
    assert [r.terminated_reason for r in RunLog(ledger).query()] == ["completed"]
    ledger.close()


class BuggyAsyncSaver(AsyncSqliteSaver):
    """`BuggySaver` under `ainvoke`: `aput` raises when it stores the final answer."""

    armed = True

    async def aput(self, config: Any, checkpoint: Any, metadata: Any, new_versions: Any) -> Any:
        if self.armed and _holds_final(checkpoint["channel_values"]):
            raise RuntimeError("async saver bug")
        return await super().aput(config, checkpoint, metadata, new_versions)


async def test_an_async_checkpointer_raising_a_non_storage_error_ends_with_an_outcome(
    tmp_path: Path,
) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path}/ledger.db")
    async with aiosqlite.connect(tmp_path / "k.db") as conn:
        agent = _answering_agent(BuggyAsyncSaver(conn), ledger)
        config: Any = {"configurable": {"thread_id": "abuggy"}}
        result = await agent.ainvoke({"messages": [("user", "where is A1?")]}, config, context=CTX)
        ended = result["outcome"]
        assert (ended["status"], ended["terminated_reason"]) == ("error", "storage"), ended
        assert "the checkpointer raised RuntimeError: async saver bug" in ended["detail"]
        # a stream without "values" has no place for a state: a StorageError carrying it
        with pytest.raises(StorageError) as raised:
            async for _ in agent.astream(
                {"messages": [("user", "again")]}, config, context=CTX, stream_mode="updates"
            ):
                pass
        assert raised.value.outcome is not None
        assert raised.value.outcome["terminated_reason"] == "storage"
        assert isinstance(raised.value.__cause__, RuntimeError)
    records = await RunLog(ledger).aquery()
    # each run's end is recorded as `storage`, once: the stream's record is the row its graph
    # wrote (`completed`) as it ended, though the caller streamed no state
    assert [r.terminated_reason for r in records] == ["storage", "storage"]
    await ledger.aclose()


async def test_an_async_run_resumed_after_its_answer_failed_to_save_records_its_end(
    tmp_path: Path,
) -> None:
    """`ainvoke(None)` resumes the run once the saver works: it completes, and its one record
    says so (it kept saying `storage`)."""
    ledger = Ledger(f"sqlite:///{tmp_path}/ledger.db")
    async with aiosqlite.connect(tmp_path / "k.db") as conn:
        saver = BuggyAsyncSaver(conn)
        agent = _answering_agent(saver, ledger)
        config: Any = {"configurable": {"thread_id": "aresumed"}}
        failed = await agent.ainvoke({"messages": [("user", "where is A1?")]}, config, context=CTX)
        assert failed["outcome"]["terminated_reason"] == "storage"
        saver.armed = False
        done = await agent.ainvoke(None, config, context=CTX)
        assert done["outcome"]["terminated_reason"] == "completed", done["outcome"]
    assert [r.terminated_reason for r in await RunLog(ledger).aquery()] == ["completed"]
    await ledger.aclose()


@pytest.mark.parametrize("stream_mode", ["updates", "messages", ["updates", "custom"]])
@pytest.mark.parametrize("flavour", ["stream", "astream"])
async def test_a_stream_without_values_that_fails_to_save_the_answer_has_one_run_record(
    tmp_path: Path, db_url: str, stream_mode: Any, flavour: str
) -> None:
    """The model answered and the graph recorded the run `completed` on its way out; then the
    checkpoint holding that answer failed to save. The run did not durably complete: its one
    record says `storage`, with the work it did (its tool call, both its model calls: the
    answer was paid for, though the state holding it was lost). It had two: the graph's
    `completed` and a second one the stream wrote keyed on no message (it streamed no state),
    with negative usage. The caller still gets only the modes it asked for."""
    ledger = Ledger(db_url)
    config: Any = {"configurable": {"thread_id": f"no-values-{flavour}"}}
    payload = {"messages": [("user", "where is A1?")]}
    seen: list[Any] = []
    async with aiosqlite.connect(tmp_path / "ak.db") as aconn:
        conn = sqlite3.connect(tmp_path / "k.db", check_same_thread=False)
        agent = _answering_agent(
            BuggySaver(conn, RuntimeError("saver bug"))
            if flavour == "stream"
            else BuggyAsyncSaver(aconn),
            ledger,
        )
        with pytest.raises(StorageError) as raised:
            if flavour == "stream":
                seen.extend(agent.stream(payload, config, context=CTX, stream_mode=stream_mode))
            else:
                async for chunk in agent.astream(
                    payload, config, context=CTX, stream_mode=stream_mode
                ):
                    seen.append(chunk)
        conn.close()
    assert raised.value.outcome is not None
    assert seen and all(_asked(chunk, stream_mode) for chunk in seen)
    records = await RunLog(ledger).aquery()
    assert [(r.status, r.terminated_reason) for r in records] == [("error", "storage")]
    (record,) = records
    assert record.detail == raised.value.outcome["detail"]
    assert record.tools == {"lookup": {"calls": 1, "failures": 0}} and record.model_calls == 2
    await ledger.aclose()


def test_a_nodes_own_exception_still_raises_as_it_is(tmp_path: Path) -> None:
    """Only what a saver raised is taken for a storage failure: a node's own exception raises
    out of a keel graph's `invoke` as before (with a saver at work in the same run), and so does
    keel's own error from the saver (a state the strict saver refuses says what to fix)."""

    def broken(state: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("node bug")

    graph = StateGraph(AgentState)
    graph.add_node("broken", broken)
    graph.add_edge(START, "broken")
    with Persistence(f"sqlite:///{tmp_path}/k.db").checkpointer() as saver:
        compiled = protected(graph.compile(checkpointer=saver))
        config: Any = {"configurable": {"thread_id": "node"}}
        with pytest.raises(RuntimeError, match="node bug"):
            compiled.invoke({"messages": [("user", "hi")]}, config)

        model = ScriptedChatModel(script=[AIMessage(FINAL, additional_kwargs={"w": Widget()})])
        agent = build_agent(model, [], checkpointer=saver)
        with pytest.raises(UnserializableState):
            agent.invoke({"messages": [("user", "hi")]}, config | {}, context=CTX)


def _asked(chunk: Any, stream_mode: Any) -> bool:
    """Whether `chunk` is one of the modes a stream asked for (no `values`: no state)."""
    if isinstance(stream_mode, list):
        return isinstance(chunk, tuple) and chunk[0] in stream_mode
    if stream_mode == "messages":
        return isinstance(chunk, tuple) and len(chunk) == 2
    return isinstance(chunk, dict) and "messages" not in chunk  # {node: update}


class Widget:
    """A value no checkpoint can store."""


@pytest.mark.postgres
@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
async def test_ledger_down_while_a_standing_approval_is_kept_runs_nothing_until_resumed(
    fresh_postgres_url: str, mode: str
) -> None:
    """The reviewer approves with a user-wide standing approval; keeping it in the ledger fails
    (each attempt killed). The run ends with an outcome (`storage`) and a record saying so,
    the approved call has not run, and `invoke(None, config)` once the ledger is back takes up
    the same answer: the call runs once."""
    killer, world = InFlightKiller(fresh_postgres_url), []
    ledger = Ledger(fresh_postgres_url)
    try:

        @tool(risk="write")
        def refund(order_id: str) -> str:
            """Refund an order."""
            world.append(order_id)
            return f"refunded {order_id}"

        model = ScriptedChatModel(script=[call("refund", order_id="A1"), "done"])
        policy = Policy(name="standing", rules=(Rule(tool="refund", action="ask"),))
        agent = build_agent(
            model, [refund], policy=policy, ledger=ledger, checkpointer=InMemorySaver()
        )
        config: Any = {"configurable": {"thread_id": f"standing-{mode}"}}

        run = _runner(agent, config, mode)
        paused = await run({"messages": [("user", "refund A1")]})
        assert paused["__interrupt__"]
        killer.arm("keel_standing_approvals", times=3)
        answer = {"type": "approve", "always": {"scope": "user", "ttl_seconds": 600}}
        result = await run(Command(resume=answer))
        await asyncio.to_thread(killer.join)
        assert killer.killed == ["keel_standing_approvals"] * 3
        ended = result["outcome"]
        assert (ended["status"], ended["terminated_reason"]) == ("error", "storage"), ended
        assert "the ledger at" in ended["detail"] and "lost the connection" in ended["detail"]
        assert world == []
        assert RunLog(ledger).query()[-1].terminated_reason == "storage"

        done = await run(None)  # the ledger is back: the same answer is taken up
        assert done["outcome"]["terminated_reason"] == "completed", done["outcome"]
        assert world == ["A1"]
    finally:
        await ledger.aclose()
