"""Attacks on the orphan report (README, Durable side effects: "An orphan no call asks for
again is audited").

A process is SIGKILLed right after a refund's effect, before its record: the ledger's row
stays `started`. When the model's request for it was lost too (`durability="exit"`), no later
call asks for it by its id: it is an orphan, audited once (`orphaned`) at a run end, and
noted in that run's record. Where the report went missing or wrong:

- A run that paused for an approval after reporting an orphan, then resumed: the final
  record of the run (the same row) lost the note; `keel report` showed a clean run.
- A supervisor whose router finished without handing the task to the agent that crashed (or
  handed it to a read-only one) reported nothing: only an agent with side-effecting tools
  looked. And the supervisor, reporting, must not take an agent's call that waits for a
  human in the agent's own conversation for an orphan.
- A run that ends through `Observer.ending_flow` (recorded by the next message, after it was
  killed itself) reported nothing: a thread whose runs keep being killed never told.
- Time travel: a fork from before the model's turn leaves a killed call on the abandoned
  branch. Asked for again on the fork it is adopted ("did this happen?"), not run twice;
  otherwise it is reported once, as left on the abandoned branch.
- Cost: the report was a ledger transaction of its own at each run end, and the orphan's
  arguments, redacted as the ledger stored them, were redacted again (arguments and result).

Real parts: SQLite files and a PostgreSQL database (checkpointer and ledger), real processes
killed by SIGKILL; the model is keel's `ScriptedChatModel` with fresh tool-call ids.
"""

from __future__ import annotations

import asyncio
import json
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from forking import ForkServer
from langchain_core.messages import AIMessage, BaseMessage
from langgraph.types import Command

import keel.db.audit
import keel.db.runs
import keel.observe.observer
from keel import Ledger, Persistence, RunContext, build_agent, tool
from keel.db.audit import AuditLog, AuditRecord
from keel.db.runs import RunLog, RunRecord
from keel.evals import ScriptedChatModel, call
from keel.graphs import FINISH, Route, build_supervisor

CTX = RunContext(user_id="u1")
LOST = {"order_id": "A1", "amount": 10, "note": "mail bob@example.com"}

CHILD = textwrap.dedent(
    """
    import json, os, signal, sys

    from langchain_core.messages import AIMessage, ToolCall

    from keel import Ledger, Persistence, RunContext, build_agent, tool
    from keel.evals import ScriptedChatModel
    from keel.graphs import FINISH, Route, build_supervisor

    url, effects, graph, durability, message, args = sys.argv[1:]
    calls = [ToolCall(name="issue_refund", args=json.loads(args), id=None)]
    # the same turn whatever came before in the thread (a turn is picked by the AI messages)
    model = ScriptedChatModel(script=[AIMessage("", tool_calls=calls)] * 4, fresh_ids=True)


    def crash_after(amount):
        with open(effects, "a") as f:
            print("refund", amount, file=f, flush=True)
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)  # after the effect, before its record


    @tool(risk="write")
    def issue_refund(order_id: str, amount: int, note: str | None = None) -> str:
        "Refund an order (the process dies right after)."
        return crash_after(amount)


    def router(messages):
        last = messages[-1]
        return Route(agent="billing" if last.type == "human" else FINISH, task=last.text)


    with Persistence(url).checkpointer() as saver:
        ledger = Ledger(url)
        if graph == "agent":
            built = build_agent(model, [issue_refund], checkpointer=saver, ledger=ledger)
            thread = "t1"
        else:
            billing = build_agent(model, [issue_refund], ledger=ledger)
            built = build_supervisor(
                {"billing": billing}, router, ledger=ledger, checkpointer=saver
            )
            thread = "s1"
        built.invoke(
            {"messages": [("user", message)]},
            {"configurable": {"thread_id": thread}},
            context=RunContext(user_id="u1"),
            durability=durability,
        )
    """
)


def killed(
    forks: ForkServer,
    db_url: str,
    tmp_path: Path,
    *,
    graph: str = "agent",
    durability: str = "exit",
    message: str = "refund A1",
    args: dict[str, Any] = LOST,
) -> None:
    """A process (of `forks`, keel imported) that runs `graph` on `message`, its model asking
    for a refund of `args`, killed right after the refund's effect (before its record)."""
    effects = tmp_path / "effects.txt"
    forks.killed_code(CHILD, db_url, str(effects), graph, durability, message, json.dumps(args))
    assert effects.read_text().splitlines()[-1] == f"refund {args['amount']}"


def told(db_url: str, thread: str = "t1") -> tuple[list[AuditRecord], list[RunRecord]]:
    """The thread's `orphaned` audit records, and the run records, oldest first."""
    ledger = Ledger(db_url)
    try:
        return AuditLog(ledger).query(thread=thread, decision="orphaned"), RunLog(ledger).query()
    finally:
        ledger.close()


def started(db_url: str, thread: str = "t1") -> list[str]:
    """The ids of the thread's `started` ledger rows, oldest first."""

    def rows() -> Any:
        found = yield (
            "SELECT tool_call_id FROM keel_tool_calls WHERE thread_id = ? AND state = 'started' "
            "ORDER BY started_at",
            (thread,),
        )
        return [r[0] for r in found]

    ledger = Ledger(db_url)
    try:
        found: list[str] = ledger.run(rows())
        return found
    finally:
        ledger.close()


def refunds(done: list[Any]) -> list[Any]:
    """This process's refund (each that really ran goes to `done`) and an approved cancel."""

    @tool(risk="write")
    def issue_refund(order_id: str, amount: int, note: str | None = None) -> str:
        """Refund an order."""
        done.append(("refund", order_id, amount))
        return f"refunded {amount} on {order_id}"

    @tool(risk="write", requires_approval=True)
    def cancel_order(order_id: str) -> str:
        """Cancel an order (a human approves it first)."""
        done.append(("cancel", order_id))
        return f"cancelled {order_id}"

    return [issue_refund, cancel_order]


def agent_run(db_url: str, done: list[Any], script: list[Any], sent: Any) -> Any:
    """Thread t1's next run (`sent`: its input, None to resume) on an agent of `refunds(done)`
    in this process, the model answering `script`."""
    model = ScriptedChatModel(script=script, fresh_ids=True)
    ledger = Ledger(db_url)
    try:
        with Persistence(db_url).checkpointer() as saver:
            agent = build_agent(model, refunds(done), checkpointer=saver, ledger=ledger)
            return agent.invoke(sent, {"configurable": {"thread_id": "t1"}}, context=CTX)
    finally:
        ledger.close()


NOTE = "(orphaned: issue_refund {} started and never finished"


# -- 1. a run that pauses after the report, then resumes ---------------------------------------


def test_the_orphan_note_of_a_paused_run_stays_in_its_record_when_it_resumes_and_ends(
    forks: ForkServer, db_url: str, tmp_path: Path
) -> None:
    """The run after the crash pauses for an approval (its record: `interrupted`, noting the
    orphan its pause reported), is resumed and ends. The same row was rewritten with the
    resumed run's detail, and the note was gone: the run's final record said nothing of a
    refund that may have happened. It keeps the note."""
    killed(forks, db_url, tmp_path)
    (lost_id,) = started(db_url)
    done: list[Any] = []
    model = ScriptedChatModel(script=[call("cancel_order", order_id="A1"), "Cancelled."])
    config: Any = {"configurable": {"thread_id": "t1"}}
    ledger = Ledger(db_url)
    try:
        with Persistence(db_url).checkpointer() as saver:
            agent = build_agent(model, refunds(done), checkpointer=saver, ledger=ledger)
            paused = agent.invoke({"messages": [("user", "cancel A1")]}, config, context=CTX)
            assert paused["outcome"]["status"] == "interrupted"
            (at_pause,) = [r for r in RunLog(ledger).query() if r.graph == "keel_agent"]
            assert NOTE.format(lost_id) in at_pause.detail
            ended = agent.invoke(Command(resume={"type": "approve"}), config, context=CTX)
    finally:
        ledger.close()
    assert ended["outcome"]["terminated_reason"] == "completed", ended["outcome"]
    assert done == [("cancel", "A1")]
    (orphaned,), runs = told(db_url)
    (final,) = [r for r in runs if r.graph == "keel_agent"]
    assert (final.run_key, final.status) == (at_pause.run_key, "success")
    assert NOTE.format(lost_id) in final.detail
    assert final.detail.count("(orphaned:") == 1
    assert orphaned.tool_call_id == lost_id


# -- 2. a supervisor -------------------------------------------------------------------------


def supervise(db_url: str, message: str | None) -> dict[str, Any]:
    """The supervisor thread's next run in this process: `message` (None: resume), its router
    handing a human's message to `billing` (which asks for a refund of 20), then finishing."""
    done: list[Any] = []
    model = ScriptedChatModel(
        script=[call("issue_refund", order_id="A1", amount=20), "Refunded."], fresh_ids=True
    )

    def router(messages: Sequence[BaseMessage]) -> Route:
        last = messages[-1]
        to = "billing" if last.type == "human" and "refund" in last.text else FINISH
        return Route(agent=to, task=last.text)

    config: Any = {"configurable": {"thread_id": "s1"}}
    sent = None if message is None else {"messages": [("user", message)]}
    ledger = Ledger(db_url)
    try:
        with Persistence(db_url).checkpointer() as saver:
            billing = build_agent(model, refunds(done)[:1], ledger=ledger)
            sup = build_supervisor({"billing": billing}, router, ledger=ledger, checkpointer=saver)
            result: dict[str, Any] = sup.invoke(sent, config, context=CTX)
            return result
    finally:
        ledger.close()


def test_a_supervisor_that_never_hands_the_task_to_the_crashed_agent_reports_its_orphan(
    forks: ForkServer, db_url: str, tmp_path: Path
) -> None:
    """The supervisor's agent is killed mid-refund (its request lost); the thread's next
    message is answered by the router alone. Only agents with side-effecting tools looked for
    orphans, at their own run ends: the supervisor's run end told nothing, and a refund that
    may have happened went unreported. It reports it, once."""
    killed(forks, db_url, tmp_path, graph="supervisor")
    (lost_id,) = started(db_url, "s1")
    result = supervise(db_url, "thanks, that is all")
    assert result["outcome"]["terminated_reason"] == "completed", result["outcome"]
    (orphaned,), runs = told(db_url, "s1")
    assert (orphaned.tool_call_id, orphaned.args) == (lost_id, {**LOST, "note": "mail [EMAIL]"})
    (noted,) = [r for r in runs if lost_id in r.detail]
    assert noted.graph == "keel_supervisor" and NOTE.format(lost_id) in noted.detail
    supervise(db_url, "anything else?")
    assert told(db_url, "s1")[0] == [orphaned]  # once


def test_a_supervisor_paused_on_its_agents_unknown_call_does_not_call_it_an_orphan(
    forks: ForkServer, db_url: str, tmp_path: Path
) -> None:
    """The agent is killed mid-refund after its request was saved (`durability="sync"`): the
    call is in the agent's conversation, not lost. Resumed, the agent asks "did this happen?"
    and the supervisor pauses with it. The call is `started` and its id in no message of the
    supervisor's own: its pause must not report it as an orphan (the agent's conversation
    holds it, and a human is being asked about it)."""
    killed(forks, db_url, tmp_path, graph="supervisor", durability="sync")
    (call_id,) = started(db_url, "s1")
    result = supervise(db_url, None)
    (interrupt,) = result["__interrupt__"]
    assert [r["tool_call_id"] for r in interrupt.value] == [call_id]
    orphaned, runs = told(db_url, "s1")
    assert orphaned == []
    assert not any("orphaned" in r.detail for r in runs)


# -- 3. a run recorded by the next message (`Observer.ending_flow`) -----------------------------


def test_an_orphan_is_reported_when_the_next_message_records_a_killed_run(
    forks: ForkServer, db_url: str, tmp_path: Path
) -> None:
    """The refund of 10 is orphaned (killed, its request lost); the next run asks for a
    refund of 20 and is killed too (its request saved); the next message records that run's
    end (`ending_flow`, with the `not_run` answer of its call) and is killed in its own refund.
    No run of the thread reached the route that records an end, and the orphan was never
    told. The record the next message writes reports it, in the same transaction."""
    killed(forks, db_url, tmp_path)
    (lost_id,) = started(db_url)
    killed(forks, db_url, tmp_path, durability="sync", message="refund 20 on A1", args=TWENTY)
    assert told(db_url)[0] == []
    killed(forks, db_url, tmp_path, durability="sync", message="and 30 on A1", args=THIRTY)
    (orphaned,), runs = told(db_url)
    assert (orphaned.tool_call_id, orphaned.status) == (lost_id, "unknown")
    (noted,) = [r for r in runs if lost_id in r.detail]
    assert NOTE.format(lost_id) in noted.detail
    assert noted.run_key.startswith("t1:") and noted.status != "interrupted"


TWENTY = {"order_id": "A1", "amount": 20}
THIRTY = {"order_id": "A1", "amount": 30}


# -- 4. time travel -----------------------------------------------------------------------------


def forked(db_url: str, done: list[Any], turn: AIMessage | str) -> tuple[Any, list[Any]]:
    """Fork the thread from before the killed run's model turn; the model answers `turn`.

    The fork's result, and the thread's next run (a new message, answered in words).
    """
    model = ScriptedChatModel(script=[turn, "Nothing else."], fresh_ids=True)
    config: Any = {"configurable": {"thread_id": "t1"}}
    ledger = Ledger(db_url)
    try:
        with Persistence(db_url).checkpointer() as saver:
            agent = build_agent(model, refunds(done), checkpointer=saver, ledger=ledger)
            before = [s for s in agent.get_state_history(config) if s.next == ("call_model",)]
            fork = agent.invoke(None, before[0].config, context=CTX)
            if fork.get("__interrupt__"):
                return fork, []
            later = agent.invoke({"messages": [("user", "anything else?")]}, config, context=CTX)
        return fork, [later]
    finally:
        ledger.close()


@pytest.mark.parametrize("waiting", [False, True], ids=["stopped", "asked-about"])
def test_a_call_killed_on_a_branch_a_fork_abandons_is_reported_once(
    forks: ForkServer, db_url: str, tmp_path: Path, waiting: bool
) -> None:
    """Killed mid-refund with its request saved (and, `asked-about`, resumed: the branch
    waits for a human's "did this happen?"); the user forks the thread from before the
    model's turn, and the model answers without asking for the refund. The killed call is in
    the abandoned branch only: no history the thread goes on with holds it, and no message
    answers it. It is reported once, as left behind (by a crash, or on an abandoned branch),
    not at each later run end."""
    killed(forks, db_url, tmp_path, durability="sync")
    (call_id,) = started(db_url)
    done: list[Any] = []
    if waiting:
        (interrupt,) = agent_run(db_url, done, ["-"], None)["__interrupt__"]
        assert [r["tool_call_id"] for r in interrupt.value] == [call_id]
        assert told(db_url)[0] == []
    fork, later = forked(db_url, done, "No refund after all.")
    assert fork["outcome"]["terminated_reason"] == "completed", fork["outcome"]
    assert later[0]["messages"][-1].text == "Nothing else."
    (orphaned,), runs = told(db_url)
    assert orphaned.tool_call_id == call_id
    assert "left on a branch" in orphaned.result
    assert [r for r in runs if call_id in r.detail] != []
    assert done == []


def test_a_call_killed_on_an_abandoned_branch_asked_for_on_the_fork_is_asked_about(
    forks: ForkServer, db_url: str, tmp_path: Path
) -> None:
    """The same, the model on the fork asking for the same refund again (a new id): the call
    adopts the abandoned branch's row and asks "did this happen?"; it never runs twice, and
    it is not reported as an orphan (the fork's history holds it now)."""
    killed(forks, db_url, tmp_path, durability="sync")
    done: list[Any] = []
    fork, _ = forked(db_url, done, call("issue_refund", **LOST))
    (interrupt,) = fork["__interrupt__"]
    ((kind, args),) = [(r.get("kind"), r["action_request"]["args"]) for r in interrupt.value]
    assert (kind, args) == ("outcome_unknown", LOST)
    assert done == []
    assert started(db_url) == [interrupt.value[0]["tool_call_id"]]
    assert told(db_url)[0] == []


# -- 5. cost ------------------------------------------------------------------------------------


def transactions(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A counter of `ledger`'s transactions (its reads outside one are not counted)."""
    count = [0]
    run = ledger._run

    def counted(flow: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("transaction", True):
            count[0] += 1
        return run(flow, *args, **kwargs)

    monkeypatch.setattr(ledger, "_run", counted)
    return count


def test_the_orphan_report_takes_no_transaction_of_its_own(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent with a side-effecting tool looks for orphans at each run end; the look was a
    ledger transaction of its own before the run record's. It joins the run record's: a run
    takes as many transactions as the same run of an agent whose tool only reads."""
    counts: dict[str, int] = {}
    ledger = Ledger(db_url)
    try:
        with Persistence(db_url).checkpointer() as saver:
            for thread, risk in (("r0", "read"), ("r1", "read"), ("r2", "write")):

                @tool(risk=risk, name="lookup")  # type: ignore[call-overload,misc]
                def lookup(order_id: str) -> str:
                    """Look an order up."""
                    return "shipped"

                model = ScriptedChatModel(script=["It shipped."])
                agent = build_agent(model, [lookup], checkpointer=saver, ledger=ledger)
                count = transactions(ledger, monkeypatch)
                config: Any = {"configurable": {"thread_id": thread}}
                agent.invoke({"messages": [("user", "where is A1?")]}, config, context=CTX)
                counts[thread] = count[0]  # r0: the ledger's first run (it sets the tables up)
                monkeypatch.undo()
    finally:
        ledger.close()
    assert counts["r2"] == counts["r1"], counts


def test_an_orphans_arguments_are_redacted_once_when_stored_not_again_when_reported(
    forks: ForkServer, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ledger stores a call's arguments redacted (`mail [EMAIL]`); the report redacted
    them again, as the audit record's arguments and inside its result. Reported, they are
    not walked by the redactor again (the stored text is the audit log's)."""
    killed(forks, db_url, tmp_path)
    walked: list[Any] = []
    for module in (keel.db.audit, keel.db.runs, keel.observe.observer):
        real = module.sanitize  # type: ignore[attr-defined]

        def spied(value: Any, *args: Any, _real: Any = real, **kwargs: Any) -> Any:
            if "mail [EMAIL]" in json.dumps(value, default=str):
                walked.append(value)
            return _real(value, *args, **kwargs)

        monkeypatch.setattr(module, "sanitize", spied)
    agent_run(db_url, [], ["Nothing to do."], {"messages": [("user", "hello")]})
    (orphaned,), _ = told(db_url)
    assert orphaned.args == {**LOST, "note": "mail [EMAIL]"}
    assert '"note": "mail [EMAIL]"' in orphaned.result
    assert walked == []


# -- 6. a run that ends outside its graph (cancelled, Ctrl-C, its checkpointer failing) ---------


def _stopping(how: str, saver: Any, running: asyncio.Event) -> Any:
    """A side-effecting tool that ends its run `how` as it runs (`running` set as it starts)."""

    @tool(risk="write", name="step")
    async def step(order_id: str) -> str:
        """Do the next step for an order."""
        running.set()
        await asyncio.sleep(60)  # cancelled meanwhile
        return f"stepped {order_id}"

    @tool(risk="write", name="step")
    def sync_step(order_id: str) -> str:
        """Do the next step for an order."""
        if how == "ctrl-c":
            raise KeyboardInterrupt
        saver.conn.execute("PRAGMA query_only = ON")  # the checkpointer's disk fails
        return f"stepped {order_id}"

    return step if how == "cancelled" else sync_step


@pytest.mark.parametrize("how", ["cancelled", "ctrl-c", "storage"])
async def test_a_run_that_ends_outside_its_graph_reports_the_threads_orphan(
    forks: ForkServer, db_url: str, tmp_path: Path, how: str
) -> None:
    """The refund is orphaned (killed, its request lost); the thread's next run ends where no
    route of its graph records it: its `ainvoke` task cancelled, Ctrl-C in its tool, or its
    checkpointer failing. Its record (written by keel around the graph) looked for no orphan:
    a thread whose runs keep ending so never told. It reports it, once, as a run end does."""
    killed(forks, db_url, tmp_path)
    (lost_id,) = started(db_url)
    model = ScriptedChatModel(script=[call("step", order_id="A1"), "Done."], fresh_ids=True)
    config: Any = {"configurable": {"thread_id": "t1"}}
    sent = {"messages": [("user", "next step on A1")]}
    ledger = Ledger(db_url)
    running = asyncio.Event()
    try:
        if how == "cancelled":
            async with Persistence(db_url).acheckpointer() as asaver:
                tools = [_stopping(how, asaver, running)]
                agent = build_agent(model, tools, checkpointer=asaver, ledger=ledger)
                run = asyncio.create_task(agent.ainvoke(sent, config, context=CTX))
                await asyncio.wait_for(running.wait(), 60)
                run.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await run
        else:
            ckpt = db_url if how == "ctrl-c" else f"sqlite:///{tmp_path}/checkpoints.db"
            with Persistence(ckpt).checkpointer() as saver:
                tools = [_stopping(how, saver, running)]
                agent = build_agent(model, tools, checkpointer=saver, ledger=ledger)
                if how == "ctrl-c":
                    with pytest.raises(KeyboardInterrupt):
                        agent.invoke(sent, config, context=CTX)
                else:
                    # saved as each step ends: the run ends on the failure, no route after it
                    out = agent.invoke(sent, config, context=CTX, durability="sync")
                    assert out["outcome"]["terminated_reason"] == "storage", out["outcome"]
    finally:
        await ledger.aclose()
    (orphaned,), runs = told(db_url)
    assert orphaned.tool_call_id == lost_id
    (noted,) = [r for r in runs if lost_id in r.detail]
    assert noted.terminated_reason == ("storage" if how == "storage" else "cancelled")
    assert NOTE.format(lost_id) in noted.detail


def test_a_run_whose_storage_fails_before_it_starts_reports_no_orphan_it_cannot_tell(
    forks: ForkServer, db_url: str, tmp_path: Path
) -> None:
    """Killed mid-refund with its request saved: the call is in the thread's history (a
    resume asks about it), not an orphan. The next message's checkpointer fails as it reads
    the thread (its connection closed): the run ends `storage` before it began, its state
    holds no message, so its record cannot tell the saved call from an orphan. It reports
    none (the thread's next run end looks, with its history)."""
    killed(forks, db_url, tmp_path, durability="sync")
    (call_id,) = started(db_url)
    model = ScriptedChatModel(script=["-"])
    ledger = Ledger(db_url)
    try:
        with Persistence(db_url).checkpointer() as saver:
            agent = build_agent(model, refunds([]), checkpointer=saver, ledger=ledger)
            saver.conn.close()
            sent = {"messages": [("user", "and now?")]}
            out = agent.invoke(sent, {"configurable": {"thread_id": "t1"}}, context=CTX)
    finally:
        ledger.close()
    assert out["outcome"]["terminated_reason"] == "storage", out["outcome"]
    assert "before the run started" in out["outcome"]["detail"]
    orphaned, runs = told(db_url)
    assert orphaned == [] and not any("orphaned" in r.detail for r in runs)
    assert [r.terminated_reason for r in runs] == ["storage"]
    assert started(db_url) == [call_id]  # still to be asked about on the thread's resume


# -- 7. a run's end recorded twice ----------------------------------------------------------------


def test_an_orphan_told_by_a_refused_second_record_of_a_run_end_is_noted_in_the_record_that_stands(
    forks: ForkServer, db_url: str, tmp_path: Path
) -> None:
    """The refund is orphaned (killed, its request lost). The thread's next run, on an agent
    whose tool only reads (it looks for no orphan), is stopped by Ctrl-C in its tool: its record
    says `cancelled`. The agent is redeployed with side-effecting tools, and the next message
    records the stopped run's end again (`ending_flow`, for the call it left): that record tells
    the orphan (its `orphaned` audit record is written) and is refused, the run's own record
    standing. Its note went with it: `keel audit` listed the orphan, and no run record said so.
    The record that stands keeps it."""
    killed(forks, db_url, tmp_path)
    (lost_id,) = started(db_url)

    @tool(risk="read", name="lookup")
    def ctrl_c(order_id: str) -> str:
        """Look an order up (Ctrl-C lands while it runs)."""
        raise KeyboardInterrupt

    config: Any = {"configurable": {"thread_id": "t1"}}
    ledger = Ledger(db_url)
    try:
        with Persistence(db_url).checkpointer() as saver:
            model = ScriptedChatModel(script=[call("lookup", order_id="A1")], fresh_ids=True)
            reads = build_agent(model, [ctrl_c], checkpointer=saver, ledger=ledger)
            with pytest.raises(KeyboardInterrupt):
                reads.invoke({"messages": [("user", "where is A1?")]}, config, context=CTX)
            (stopped,) = RunLog(ledger).query()
            assert "orphaned" not in stopped.detail
            model = ScriptedChatModel(script=["Hello."] * 3)
            writes = build_agent(model, refunds([]), checkpointer=saver, ledger=ledger)
            writes.invoke({"messages": [("user", "hello")]}, config, context=CTX)
    finally:
        ledger.close()
    (orphaned,), runs = told(db_url)
    assert orphaned.tool_call_id == lost_id
    (noted,) = [r for r in runs if lost_id in r.detail]
    assert (noted.run_key, noted.terminated_reason) == (stopped.run_key, "cancelled")
    assert noted.detail.count("(orphaned:") == 1


# -- 8. a ledger that refuses the report ----------------------------------------------------------


def _refusing_orphans(db_url: str, on: bool) -> None:
    """Make the ledger refuse (`on`), or take again, every `orphaned` audit record: a constraint
    it enforces (a trigger), which raises the driver's IntegrityError as a real refusal does."""
    if db_url.startswith("sqlite"):
        statements = (
            [
                "CREATE TRIGGER no_orphans BEFORE INSERT ON keel_audit "
                "WHEN NEW.decision = 'orphaned' BEGIN SELECT RAISE(ABORT, 'refused'); END"
            ]
            if on
            else ["DROP TRIGGER no_orphans"]
        )
    else:
        statements = (
            [
                "CREATE FUNCTION no_orphans() RETURNS trigger AS $$ BEGIN "
                "RAISE EXCEPTION 'refused' USING ERRCODE = 'check_violation'; END $$ "
                "LANGUAGE plpgsql",
                "CREATE TRIGGER no_orphans BEFORE INSERT ON keel_audit FOR EACH ROW "
                "WHEN (NEW.decision = 'orphaned') EXECUTE FUNCTION no_orphans()",
            ]
            if on
            else ["DROP TRIGGER no_orphans ON keel_audit"]
        )

    def flow() -> Any:
        for sql in statements:
            yield sql, ()

    ledger = Ledger(db_url)
    try:
        ledger.run(flow())
    finally:
        ledger.close()


def test_a_supervisor_whose_ledger_refuses_the_orphan_report_still_records_its_run(
    forks: ForkServer, db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The supervisor's agent is killed mid-refund (its request lost); the thread's next run is
    answered by the router alone, and its end reports the orphan with its run record, in one
    transaction. The ledger refuses the report for good (a constraint on the audit log): the
    write was dropped whole, and the run had no record at all. The run ends with its outcome,
    its record is written without the report (logged), and the orphan, still untold, is
    reported by the thread's next run end once the ledger takes it."""
    killed(forks, db_url, tmp_path, graph="supervisor")
    (lost_id,) = started(db_url, "s1")
    _refusing_orphans(db_url, True)
    result = supervise(db_url, "thanks, that is all")
    assert result["outcome"]["terminated_reason"] == "completed", result["outcome"]
    orphaned, runs = told(db_url, "s1")
    assert orphaned == []
    (first,) = [r for r in runs if r.graph == "keel_supervisor"]
    assert (first.status, first.terminated_reason) == ("success", "completed")
    assert "orphaned" not in first.detail
    assert "could not report orphaned calls" in caplog.text
    _refusing_orphans(db_url, False)
    supervise(db_url, "anything else?")
    (orphaned,), runs = told(db_url, "s1")
    assert orphaned.tool_call_id == lost_id
    (noted,) = [r for r in runs if lost_id in r.detail]
    assert noted.graph == "keel_supervisor" and noted.run_key != first.run_key


def test_a_ledger_refusing_the_orphan_report_of_a_run_found_stopped_does_not_block_the_thread(
    forks: ForkServer, db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The supervisor's agent is killed mid-refund twice: first its request lost (an orphan),
    then saved (its supervisor run found stopped by the next message, which records that run's
    end with the thread's orphans, in the transaction that answers the call it left). The
    ledger refuses the report for good: that transaction failed, and every message on the
    thread ended `storage failed before the run started`, for as long as the ledger refused.
    The message runs: the stopped run's end is recorded without the report (logged), the call
    it left answered, and a later run end reports the orphan once the ledger takes it."""
    killed(forks, db_url, tmp_path, graph="supervisor")
    (lost_id,) = started(db_url, "s1")
    killed(forks, db_url, tmp_path, graph="supervisor", durability="sync", args=TWENTY)
    _refusing_orphans(db_url, True)
    result = supervise(db_url, "thanks, that is all")
    assert result["outcome"]["terminated_reason"] == "completed", result["outcome"]
    orphaned, runs = told(db_url, "s1")
    assert orphaned == []
    stopped = [r for r in runs if r.graph == "keel_supervisor" and r.status == "stopped"]
    assert [r.terminated_reason for r in stopped] == ["cancelled"]
    assert "could not report orphaned calls" in caplog.text
    _refusing_orphans(db_url, False)
    supervise(db_url, "anything else?")
    (orphaned,), runs = told(db_url, "s1")
    assert orphaned.tool_call_id == lost_id
    assert [r.graph for r in runs if lost_id in r.detail] == ["keel_supervisor"]
