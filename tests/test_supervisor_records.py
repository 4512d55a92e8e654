"""A supervisor's own run records itself, as a keel agent's run does (README, Observability).

With a ledger, `build_supervisor` wrote no record of its runs: only its sub-agents wrote theirs
(under the supervisor's thread). A supervisor run stopped by Ctrl-C in a sub-agent's tool,
cancelled, or ended by a storage failure left no record at all, and `keel report` never saw
the router's calls or a supervisor that stopped on its own (max_handoffs, a failing router).

And what such a stopped run leaves in the ledger (a call `started`, never finished) is the
agent's that started it: not taken for the lost request of the agent's next task; the
supervisor thread's next message audits it (README, Durable side effects).
"""

from __future__ import annotations

import asyncio
import signal
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from forking import ForkServer
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langgraph.types import Command

from keel import AuditLog, Ledger, Persistence, RunContext, RunLog, build_agent, outcome, tool
from keel.app.report import by_version
from keel.approvals import call_digest
from keel.db.runs import RunRecord, run_record
from keel.evals import ScriptedChatModel, call
from keel.graphs import FINISH, Route, build_supervisor

CTX = RunContext(user_id="u1", tenant_id="acme")
CFG: Any = {"configurable": {"thread_id": "s1"}}


def _router(messages: Sequence[BaseMessage]) -> Route:
    """Hands the user's message to billing, and finishes once billing answered."""
    last = messages[-1]
    return Route(agent=FINISH if last.type == "ai" else "billing", task=last.text)


def _billing_model() -> ScriptedChatModel:
    """Refunds the order the task names, then says so."""
    return ScriptedChatModel(
        script=[
            lambda ms: call("refund", order_id=ms[-1].text.split()[-1]),
            lambda ms: f"done: {ms[0].text}",
        ],
        fresh_ids=True,
    )


def _records(ledger: Ledger, graph: str = "keel_supervisor") -> list[RunRecord]:
    return [r for r in RunLog(ledger).query() if r.graph == graph]


def _supervisor(tools: list[Any], ledger: Ledger, saver: Any) -> Any:
    billing = build_agent(_billing_model(), tools, ledger=ledger)
    return build_supervisor({"billing": billing}, _router, ledger=ledger, checkpointer=saver)


UNKNOWN = "Outcome unknown: this call started"


def _left_audit(ledger: Ledger) -> list[tuple[Any, ...]]:
    """The audit records of calls a stopped run left (decision `not_run`)."""
    return [
        (r.tool, r.args, r.status, r.result[: len(UNKNOWN)], r.thread_id, r.user_id, r.tenant_id)
        for r in AuditLog(ledger).query()
        if r.decision == "not_run"
    ]


A1_UNKNOWN = ("refund", {"order_id": "A1"}, "not_run", UNKNOWN, "s1", "u1", "acme")


@tool(risk="write", name="refund")
def refund(order_id: str) -> str:
    """Refund an order."""
    return f"refunded {order_id}"


def test_a_supervisor_run_records_itself_with_its_own_usage(db_url: str) -> None:
    """Each supervisor run has its record (graph, status, its own usage), beside its agents'."""
    ledger = Ledger(db_url)
    try:
        with Persistence(db_url).checkpointer() as saver:
            sup = _supervisor([refund], ledger, saver)
            for order in ("A1", "B2"):
                done = sup.invoke({"messages": [("user", f"refund {order}")]}, CFG, context=CTX)
                assert done["outcome"]["terminated_reason"] == "completed", done["outcome"]
        runs = _records(ledger)
        agents = _records(ledger, "keel_agent")
    finally:
        ledger.close()
    assert [(r.status, r.terminated_reason) for r in runs] == [("success", "completed")] * 2
    assert {r.thread_id for r in runs} == {"s1"} and {r.user_id for r in runs} == {"u1"}
    # each run's own usage (its agent's two model calls), not the thread's total, and not
    # less the thread's last record (a sub-agent's)
    assert [(r.model_calls, r.tool_calls) for r in agents] == [(2, 1), (2, 1)]
    assert [r.model_calls for r in runs] == [2, 2]
    assert runs[0].input_tokens == agents[0].input_tokens > 0


def test_a_supervisors_records_name_its_version_as_an_agents_do(db_url: str) -> None:
    """`keel report --by version` grouped every supervisor run as `unversioned`: its records
    carried no version. They name one now: the label (or `auto-<digest>`), the router's model,
    the routing prompt's hash and each agent's version by name; a changed agent is a new
    supervisor version."""
    ledger = Ledger(db_url)
    try:
        billing = build_agent(_billing_model(), [refund], ledger=ledger, version="b1")
        router = ScriptedChatModel(
            structured={"Route": lambda ms: {"agent": "billing" if len(ms) < 3 else FINISH}},
            model_name="router-model",
        )
        labelled = build_supervisor({"billing": billing}, router, ledger=ledger, version="s1")
        labelled.invoke({"messages": [("user", "refund A1")]}, context=CTX)
        rebuilt = build_agent(_billing_model(), [refund], ledger=ledger, version="b2")
        for agent in (billing, billing, rebuilt):  # the same build twice, then a changed agent
            sup = build_supervisor({"billing": agent}, _router, ledger=ledger)
            sup.invoke({"messages": [("user", "refund A1")]}, context=CTX)
        runs = _records(ledger)
    finally:
        ledger.close()
    assert runs[0].version == "s1" and runs[0].model == "router-model"
    assert runs[0].tool_versions == {"billing": "b1"} and runs[0].prompt_hash != "none"
    auto = [r.version or "" for r in runs[1:]]
    assert auto[0] == auto[1] != auto[2] and all(v.startswith("auto-") for v in auto)
    assert runs[3].tool_versions == {"billing": "b2"}
    grouped = by_version(runs)
    assert [(v.version, v.runs) for v in grouped] == [("s1", 1), (auto[0], 2), (auto[2], 1)]


def test_an_agent_run_found_stopped_with_no_message_keeps_the_record_it_wrote(
    db_url: str,
) -> None:
    """The supervisor's checkpointer failed while its agent ran: the agent recorded its end
    (`completed`), but the agent's conversation was saved only as far as its input (no message:
    LangGraph's state at `__start__`). The thread's next message recorded that conversation as
    a second run, `cancelled`, under the same run id and keyed on no message (it happened in
    `tests/test_attack_run_records.py` about once in 15 runs). A run that recorded itself keeps
    its record; one that never did still gets one."""
    log = RunLog(Ledger(db_url))
    try:
        ran = {"thread_id": "s1", "graph": "keel_agent"}
        done = {
            "messages": [HumanMessage("refund A1", id="m1"), AIMessage("refunded")],
            "outcome": outcome.completed(),
        }
        log.write(run_record(done, run_id="R1", **ran))
        found = {"outcome": outcome.cancelled("stopped in __start__; found so")}
        for run_id in ("R1", "R2"):  # R1 recorded itself; R2 never did
            log.write(run_record(found, run_id=run_id, **ran), first_end=True)
        records = [(r.run_id, r.terminated_reason) for r in log.query()]
    finally:
        log.ledger.close()
    assert records == [("R1", "completed"), ("R2", "cancelled")]


def test_a_supervisor_paused_by_its_agent_is_recorded_interrupted_then_its_end(
    db_url: str,
) -> None:
    """A sub-agent's approval pauses the supervisor: its record says `interrupted`, and the
    same row says how the run ended once it is resumed."""
    ledger = Ledger(db_url)
    ask = tool(risk="write", name="refund", requires_approval=True)(refund.func)
    try:
        with Persistence(db_url).checkpointer() as saver:
            sup = _supervisor([ask], ledger, saver)
            paused = sup.invoke({"messages": [("user", "refund A1")]}, CFG, context=CTX)
            assert paused["__interrupt__"]
            (waiting,) = _records(ledger)
            done = sup.invoke(Command(resume=[{"type": "approve"}]), CFG, context=CTX)
            assert done["outcome"]["terminated_reason"] == "completed", done["outcome"]
        (ended,) = _records(ledger)
    finally:
        ledger.close()
    assert (waiting.status, waiting.interrupts) == ("interrupted", 1)
    assert (ended.run_key, ended.status, ended.interrupts) == (waiting.run_key, "success", 1)


def test_ctrl_c_in_a_sub_agents_tool_records_the_supervisor_run_cancelled(db_url: str) -> None:
    """KeyboardInterrupt in a tool of the supervisor's agent reaches the caller, and the
    supervisor's run is recorded `stopped/cancelled` (it had no record at all)."""

    @tool(risk="write", name="refund")
    def ctrl_c(order_id: str) -> str:
        """Refund an order (Ctrl-C lands while it runs)."""
        raise KeyboardInterrupt

    ledger = Ledger(db_url)
    try:
        with Persistence(db_url).checkpointer() as saver:
            sup = _supervisor([ctrl_c], ledger, saver)
            with pytest.raises(KeyboardInterrupt):
                sup.invoke({"messages": [("user", "refund A1")]}, CFG, context=CTX)
        (stopped,) = _records(ledger)
    finally:
        ledger.close()
    assert (stopped.status, stopped.terminated_reason) == ("stopped", "cancelled")
    assert "KeyboardInterrupt" in stopped.detail, stopped.detail
    assert (stopped.thread_id, stopped.user_id, stopped.tenant_id) == ("s1", "u1", "acme")


async def test_a_cancelled_supervisor_run_is_recorded(db_url: str) -> None:
    """An `ainvoke` task cancelled while a sub-agent's tool runs: recorded cancelled; the next
    message audits the agent's refund "outcome unknown" (see below)."""
    started = asyncio.Event()

    @tool(risk="write", name="refund")
    async def slow(order_id: str) -> str:
        """Refund an order (slowly the first time)."""
        if not started.is_set():
            started.set()
            await asyncio.sleep(30)
        return f"refunded {order_id}"

    ledger = Ledger(db_url)
    try:
        async with Persistence(db_url).acheckpointer() as saver:
            sup = _supervisor([slow], ledger, saver)
            run = asyncio.create_task(
                sup.ainvoke({"messages": [("user", "refund A1")]}, CFG, context=CTX)
            )
            await asyncio.wait_for(started.wait(), 30)
            run.cancel()
            with pytest.raises(asyncio.CancelledError):
                await run
            (stopped,) = await asyncio.to_thread(_records, ledger)
            done = await sup.ainvoke({"messages": [("user", "refund B2")]}, CFG, context=CTX)
        audited = await asyncio.to_thread(_left_audit, ledger)
        agents = await asyncio.to_thread(_records, ledger, "keel_agent")
    finally:
        await ledger.aclose()
    assert (stopped.status, stopped.terminated_reason) == ("stopped", "cancelled")
    assert "task was cancelled" in stopped.detail, stopped.detail
    assert done["outcome"]["terminated_reason"] == "completed", done["outcome"]
    assert audited == [A1_UNKNOWN]
    assert [(r.status, r.terminated_reason) for r in agents] == [
        ("stopped", "cancelled"),
        ("success", "completed"),
    ]


@pytest.mark.parametrize("driver", ["sync", "async"])
async def test_a_storage_failure_mid_run_ends_and_records_the_supervisor_run(
    db_url: str, tmp_path: Path, driver: str
) -> None:
    """The checkpointer's disk fails while a sub-agent's tool runs: the supervisor's run ends
    as `error/storage` (not a raw sqlite3 error) and is recorded so in the ledger."""
    ledger = Ledger(db_url)
    ckpt = f"sqlite:///{tmp_path}/checkpoints.db"
    try:
        if driver == "sync":
            with Persistence(ckpt).checkpointer() as saver:
                sup = _supervisor([_failing(saver)], ledger, saver)
                out = sup.invoke({"messages": [("user", "refund A1")]}, CFG, context=CTX)
        else:
            async with Persistence(ckpt).acheckpointer() as asaver:
                failing = _failing(asaver, asyncio.get_running_loop())
                sup = _supervisor([failing], ledger, asaver)
                out = await sup.ainvoke({"messages": [("user", "refund A1")]}, CFG, context=CTX)
        (failed,) = await asyncio.to_thread(_records, ledger)
    finally:
        await ledger.aclose()
    assert (out["outcome"]["status"], out["outcome"]["terminated_reason"]) == ("error", "storage")
    assert (failed.status, failed.terminated_reason, failed.error_category) == (
        "error",
        "storage",
        "storage",
    )
    assert failed.detail.startswith("storage failed"), failed.detail


def _failing(saver: Any, loop: asyncio.AbstractEventLoop | None = None) -> Any:
    """A refund whose run's checkpointer turns read-only as it runs (its disk fails).

    `loop`: the loop an async saver's connection runs on (the tool runs on a worker thread).
    """

    @tool(risk="write", name="refund")
    def refund_then_fail(order_id: str) -> str:
        """Refund an order."""
        flip = saver.conn.execute("PRAGMA query_only = ON")
        if loop is not None:
            asyncio.run_coroutine_threadsafe(flip, loop).result(timeout=10)
        return f"refunded {order_id}"

    return refund_then_fail


# -- a stopped agent's call is not the orphan of the agent's next task ------------------------


def _ctrl_c_on(order: str, ran: list[str]) -> Any:
    @tool(risk="write", name="refund")
    def refund_once(order_id: str) -> str:
        """Refund an order (Ctrl-C lands while `order` is refunded)."""
        ran.append(order_id)
        if order_id == order:
            raise KeyboardInterrupt
        return f"refunded {order_id}"

    return refund_once


def test_after_ctrl_c_the_agents_next_task_is_not_asked_did_this_happen(db_url: str) -> None:
    """Ctrl-C stopped a supervisor's agent mid-refund (A1: its ledger row stays `started`).
    The next message hands the agent a new task, a new conversation with another refund (B2).
    keel's orphan rule took A1's row for B2's lost request (same tool, same thread, an id the
    new conversation does not hold), moved it to B2 and asked "did this happen?" about B2 with
    A1's start time: a false question, and an "approve" would have recorded B2 as done though
    it never ran. Now B2 runs; A1's row stays A1's.

    And A1's agent conversation is abandoned (each task starts a new one), so keel's left-behind
    rule, reading the supervisor's messages only, never saw A1: no audit record said what
    became of it. Now the next message audits it `not_run`, "outcome unknown" (it may have
    happened), with its arguments, once."""
    ran: list[str] = []
    ledger = Ledger(db_url)
    try:
        with Persistence(db_url).checkpointer() as saver:
            sup = _supervisor([_ctrl_c_on("A1", ran)], ledger, saver)
            with pytest.raises(KeyboardInterrupt):
                sup.invoke({"messages": [("user", "refund A1")]}, CFG, context=CTX)
            assert _left_audit(ledger) == []
            done = sup.invoke({"messages": [("user", "refund B2")]}, CFG, context=CTX)
            again = sup.invoke({"messages": [("user", "refund C3")]}, CFG, context=CTX)
        rows = ledger.run(_call_rows())
        audited = _left_audit(ledger)
        agents = _records(ledger, "keel_agent")
    finally:
        ledger.close()
    assert "__interrupt__" not in done, done["__interrupt__"]
    assert done["outcome"]["terminated_reason"] == "completed", done["outcome"]
    assert done["messages"][-1].text == "done: refund B2"
    assert again["outcome"]["terminated_reason"] == "completed", again["outcome"]
    assert ran == ["A1", "B2", "C3"]
    assert sorted(rows) == [("A1", "started"), ("B2", "completed"), ("C3", "completed")]
    assert audited == [A1_UNKNOWN]  # once: the next runs found nothing left
    # the agent's stopped run has its record too (it had none), once, with its own usage
    assert [(r.status, r.terminated_reason) for r in agents] == [
        ("stopped", "cancelled"),
        ("success", "completed"),
        ("success", "completed"),
    ]
    assert "calls to refund unanswered" in agents[0].detail, agents[0].detail
    assert "next message audited them" in agents[0].detail and agents[0].model_calls == 1
    assert (agents[0].thread_id, agents[0].user_id) == ("s1", "u1")
    assert len({r.run_key for r in agents}) == 3
    readme = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())
    assert "the supervisor thread's next message audits each of them the same way" in readme
    assert "agent's run it stopped is recorded `stopped/cancelled` then too" in readme


class _LosesTheRequest:
    """Wraps a saver so the agent's turn holding a tool call is never saved (its checkpoint and
    its step's writes): the process 'died' before they reached the database."""

    def __init__(self, saver: Any) -> None:
        self.saver = saver
        put, put_writes = saver.put, saver.put_writes

        def holds_a_call(config: Any, messages: Any) -> bool:
            subgraph = bool(config["configurable"].get("checkpoint_ns"))
            return subgraph and any(getattr(m, "tool_calls", None) for m in messages or [])

        def lossy_put(config: Any, checkpoint: Any, *args: Any) -> Any:
            if holds_a_call(config, checkpoint["channel_values"].get("messages")):
                return config
            return put(config, checkpoint, *args)

        def lossy_put_writes(config: Any, writes: Any, *args: Any) -> Any:
            sent = [v for c, v in writes if c == "messages"]
            if holds_a_call(config, [m for v in sent for m in (v if isinstance(v, list) else [v])]):
                return None
            return put_writes(config, writes, *args)

        saver.put, saver.put_writes = lossy_put, lossy_put_writes


def test_an_agents_own_lost_request_is_still_asked_about_on_resume(db_url: str) -> None:
    """The orphan rule still holds inside a supervisor's agent: its turn asking for A1 was
    never saved, the refund started, the run stopped; resumed, the agent asks the model again
    (a new call id) and keel asks "did this happen?" instead of refunding A1 twice."""
    ran: list[str] = []
    ledger = Ledger(db_url)
    try:
        with Persistence(db_url).checkpointer() as saver:
            _LosesTheRequest(saver)
            sup = _supervisor([_ctrl_c_on("A1", ran)], ledger, saver)
            with pytest.raises(KeyboardInterrupt):
                sup.invoke(
                    {"messages": [("user", "refund A1")]}, CFG, context=CTX, durability="sync"
                )
            resumed = sup.invoke(None, CFG, context=CTX, durability="sync")
        rows = ledger.run(_call_rows())
    finally:
        ledger.close()
    (request,) = resumed["__interrupt__"][0].value
    assert (request["kind"], request["action_request"]["args"]) == (
        "outcome_unknown",
        {"order_id": "A1"},
    )
    assert ran == ["A1"]  # not refunded twice
    assert rows == [("A1", "started")]  # adopted by the call that repeats it


_ORDERS = {call_digest("refund", {"order_id": o}, "1"): o for o in ("A1", "B2", "C3")}
"""The order a ledger row's digest is of (the refund tool is version 1)."""


def _call_rows() -> Any:
    rows = yield ("SELECT args_digest, state, tool_call_id FROM keel_tool_calls", ())
    return [(_ORDERS.get(r[0], r[0]), r[1]) for r in rows]


# -- a supervisor run whose process was killed ------------------------------------------------

KILLED = textwrap.dedent(
    """
    import os, signal, sys
    from keel import Ledger, Persistence, RunContext, build_agent, tool
    from keel.evals import ScriptedChatModel, call
    from keel.graphs import FINISH, Route, build_supervisor

    url = sys.argv[1]

    @tool(risk="write", name="refund")
    def refund(order_id: str) -> str:
        \"\"\"Refund an order.\"\"\"
        os.kill(os.getpid(), signal.SIGKILL)

    model = ScriptedChatModel(script=[call("refund", order_id="A1")], fresh_ids=True)
    router = lambda ms: Route(agent=FINISH if ms[-1].type == "ai" else "billing", task="refund A1")
    with Persistence(url).checkpointer() as saver:
        ledger = Ledger(url)
        billing = build_agent(model, [refund], ledger=ledger)
        sup = build_supervisor({"billing": billing}, router, ledger=ledger, checkpointer=saver)
        sup.invoke({"messages": [("user", "refund A1")]}, {"configurable": {"thread_id": "s1"}},
                   context=RunContext(user_id="u1", tenant_id="acme"))
    """
)


def test_a_killed_supervisor_run_is_recorded_by_the_threads_next_message(
    db_url: str, tmp_path: Path, forks: ForkServer
) -> None:
    """SIGKILL while the supervisor's agent refunds: the process could write no record. The
    thread's next message records the killed run `stopped/cancelled` (none was written: a
    supervisor's messages hold no unanswered call for keel's left-behind rule to find). The
    process is forked with keel imported (`tests/forking.py`)."""
    proc = forks.start_code(KILLED, db_url, cwd=tmp_path)
    assert proc.finish() == -signal.SIGKILL, proc.output()[1][-2000:]
    ran: list[str] = []
    ledger = Ledger(db_url)
    try:
        assert _records(ledger) == []
        with Persistence(db_url).checkpointer() as saver:
            sup = _supervisor([_ctrl_c_on("-", ran)], ledger, saver)
            done = sup.invoke({"messages": [("user", "refund B2")]}, CFG, context=CTX)
        killed, finished = _records(ledger)
        audited = _left_audit(ledger)
        agents = [(r.status, r.terminated_reason) for r in _records(ledger, "keel_agent")]
    finally:
        ledger.close()
    assert done["outcome"]["terminated_reason"] == "completed", done["outcome"]
    assert ran == ["B2"]  # not asked "did this happen?" about A1's row either
    assert audited == [A1_UNKNOWN]  # what became of A1: it may have happened
    assert agents == [("stopped", "cancelled"), ("success", "completed")]  # A1's agent run too
    assert (killed.status, killed.terminated_reason) == ("stopped", "cancelled")
    assert "process ended" in killed.detail and "billing" in killed.detail, killed.detail
    assert (finished.status, killed.run_key != finished.run_key) == ("success", True)
