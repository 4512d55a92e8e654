"""Attacks on "Durable side effects" (README) with arguments spelled anew after a crash.

A process is SIGKILLed right after a refund's effect, before its record. The model names
every call anew, and may spell the same arguments differently (`10.0` for an `int` 10, `"10"`,
a default sent); keel reads them as the tool does (`keel.tools._args.as_called`).

- The orphan (`durability="exit"`: nothing of the run was saved, the ledger's `started` row
  is the refund's only trace; the thread is sent again). The orphaned row was adopted by the
  next call of the same tool whatever its arguments: a refund of 20 took over the lost refund
  of 10, its row then named 20, the human was asked "did this happen?" about a refund of 20
  that never ran, and the refund of 10's arguments were gone. Only a call of the same
  arguments is the lost request; another call runs, and the orphan waits for its own. An
  orphan no call asks for again stayed `started` for good, and nothing said the refund may
  have happened: the next run end audits it once (`orphaned`), and a later match still adopts it.
- The left-behind repeat (a turn asking for the refund twice, spelled two ways; the next task
  is a new message). The repeat, never claimed, was answered "Not run ... keel does not run
  it now" beside its primary's "outcome unknown": the pending-answer code compared arguments
  as spelled. It follows its primary's answer, as it does when spelled alike.
- Time travel to before the model's turn (no crash): the model asks again for the refund it
  made, spelled `10.0`; the ledger's digest, of the arguments as spelled, did not find the
  call the fork left behind, and the refund ran a second time. It gets the recorded result.

Real parts: SQLite files and a PostgreSQL database (checkpointer and ledger), a real process
killed by SIGKILL; the model is keel's `ScriptedChatModel` with fresh tool-call ids.
"""

from __future__ import annotations

import asyncio
import json
import textwrap
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from forking import ForkServer
from langchain_core.messages import AIMessage, BaseMessage, ToolCall, ToolMessage
from langgraph.types import Command

from keel import Ledger, Persistence, RunContext, build_agent, tool
from keel.app.cli import main
from keel.approvals import call_digest
from keel.db.audit import AuditLog, AuditRecord
from keel.db.idempotency import claim_flow
from keel.db.runs import RunLog
from keel.evals import ScriptedChatModel, call
from keel.graphs import FINISH, Route, build_supervisor

CTX = RunContext(user_id="u1")
THREAD: Any = {"configurable": {"thread_id": "t1"}}

CHILD = textwrap.dedent(
    """
    import asyncio, json, os, signal, sys

    from langchain_core.messages import AIMessage, ToolCall

    from keel import Ledger, Persistence, RunContext, build_agent, tool
    from keel.evals import ScriptedChatModel

    url, effects, driver, durability, spelled = sys.argv[1:]
    calls = [ToolCall(name="issue_refund", args=a, id=None) for a in json.loads(spelled)]
    model = ScriptedChatModel(script=[AIMessage("", tool_calls=calls)], fresh_ids=True)
    sent = ({"messages": [("user", "refund A1")]}, {"configurable": {"thread_id": "t1"}})
    how = {"context": RunContext(user_id="u1"), "durability": durability}


    def refund(order_id: str, amount: int, note: str | None = None) -> str:
        "Refund an order."
        with open(effects, "a") as f:
            print("refund", amount, file=f, flush=True)
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)  # after the effect, before its record


    async def arefund(order_id: str, amount: int, note: str | None = None) -> str:
        "Refund an order."
        return refund(order_id, amount, note)


    chosen = tool(risk="write", name="issue_refund")(refund if driver == "sync" else arefund)


    async def main():
        async with Persistence(url).acheckpointer() as saver:
            agent = build_agent(model, [chosen], checkpointer=saver, ledger=Ledger(url))
            await agent.ainvoke(*sent, **how)


    if driver == "sync":
        with Persistence(url).checkpointer() as saver:
            agent = build_agent(model, [chosen], checkpointer=saver, ledger=Ledger(url))
            agent.invoke(*sent, **how)
    else:
        asyncio.run(main())
    """
)


def refunds_into(done: list[tuple[str, int, str | None]]) -> list[Any]:
    """The refund tool of this process (the next one): each refund that really ran, in `done`."""

    @tool(risk="write")
    def issue_refund(order_id: str, amount: int, note: str | None = None) -> str:
        """Refund an order."""
        done.append((order_id, amount, note))
        return f"refunded {amount} on {order_id}"

    return [issue_refund]


def killed_after_the_refund(
    driver: str,
    db_url: str,
    tmp_path: Path,
    durability: str = "exit",
    turn: Sequence[dict[str, Any]] = ({"order_id": "A1", "amount": 10},),
) -> Path:
    """Run `CHILD`, one turn asking for `turn`'s refunds, killed right after the first one's
    effect: the file that refund wrote.

    `durability="exit"` (the default): nothing of the run is saved before it ends, so the
    request dies with the process and the ledger's `started` row is all that is left of it.
    """
    effects = tmp_path / "effects.txt"
    (forks,) = _forks  # forked with keel imported (`tests/forking.py`), LangSmith off
    forks.killed_code(CHILD, db_url, str(effects), driver, durability, json.dumps(turn))
    assert effects.read_text().splitlines() == [f"refund {turn[0]['amount']}"]
    return effects


_forks: list[ForkServer] = []


@pytest.fixture(autouse=True)
def _forked(forks: ForkServer) -> Iterator[None]:
    """The session's fork server, for `killed_after_the_refund` (its callers need not name it)."""
    _forks.append(forks)
    yield
    _forks.remove(forks)


def rows(thread: str) -> Any:
    """The thread's ledger rows: `(tool_call_id, state, args_digest)`, oldest first."""
    found = yield (
        "SELECT tool_call_id, state, args_digest FROM keel_tool_calls WHERE thread_id = ? "
        "ORDER BY started_at",
        (thread,),
    )
    return [tuple(r) for r in found]


def digest(amount: int) -> str:
    """The ledger's digest of a refund on A1, its arguments as the tool reads them."""
    return call_digest("issue_refund", {"order_id": "A1", "amount": amount, "note": None}, "1")


def asked(result: dict[str, Any]) -> list[tuple[str | None, dict[str, Any]]]:
    """The run's "did this happen?" requests: `(kind, args)` each."""
    return [
        (r.get("kind"), r["action_request"]["args"])
        for i in result.get("__interrupt__") or []
        for r in i.value
    ]


def run(db_url: str, done: list[Any], script: list[Any], message: str, driver: str = "sync") -> Any:
    """Send `message` to the thread on a new agent (the next process) scripted by `script`.

    `driver="async"`: with `ainvoke`, on the async checkpointer and ledger.
    """
    ledger = Ledger(db_url)
    model = ScriptedChatModel(script=script, fresh_ids=True)
    if driver == "async":
        return asyncio.run(_arun(db_url, ledger, done, model, message))
    try:
        with Persistence(db_url).checkpointer() as saver:
            agent = build_agent(model, refunds_into(done), checkpointer=saver, ledger=ledger)
            return agent.invoke({"messages": [("user", message)]}, THREAD, context=CTX)
    finally:
        ledger.close()


async def _arun(db_url: str, ledger: Ledger, done: list[Any], model: Any, message: str) -> Any:
    try:
        async with Persistence(db_url).acheckpointer() as saver:
            agent = build_agent(model, refunds_into(done), checkpointer=saver, ledger=ledger)
            return await agent.ainvoke({"messages": [("user", message)]}, THREAD, context=CTX)
    finally:
        await ledger.aclose()


def ledger_rows(db_url: str) -> list[tuple[Any, ...]]:
    ledger = Ledger(db_url)
    try:
        found: list[tuple[Any, ...]] = ledger.run(rows("t1"))
        return found
    finally:
        ledger.close()


# spellings of the lost call's arguments as the tool reads them: 10, note=None
SAME = [
    {"order_id": "A1", "amount": 10},
    {"order_id": "A1", "amount": 10.0},
    {"order_id": "A1", "amount": "10", "note": None},
]


@pytest.mark.parametrize("args", SAME, ids=["as-lost", "float", "str-and-default"])
@pytest.mark.parametrize("driver", ["sync", "async"])
def test_the_lost_refund_asked_again_under_a_fresh_id_is_asked_about_not_run_twice(
    driver: str, args: dict[str, Any], db_url: str, tmp_path: Path
) -> None:
    """The model asks for the lost refund again, however it spells its arguments: the call
    adopts the orphan's row and asks "did this happen?"; it never runs a second time."""
    effects = killed_after_the_refund(driver, db_url, tmp_path)
    (lost,) = ledger_rows(db_url)
    assert lost[1:] == ("started", digest(10))
    done: list[Any] = []
    paused = run(db_url, done, [call("issue_refund", **args), "Done."], "refund A1")
    assert done == []
    assert effects.read_text().splitlines() == ["refund 10"]
    assert asked(paused) == [("outcome_unknown", args)]
    (request,) = paused["__interrupt__"][0].value
    assert ledger_rows(db_url) == [(request["tool_call_id"], "started", digest(10))]


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_a_refund_of_other_arguments_runs_and_leaves_the_lost_one_its_own(
    driver: str, db_url: str, tmp_path: Path
) -> None:
    """The attack: after the crash the model asks for a refund of 20. It adopted the lost
    refund of 10's row: "did this happen?" about a refund of 20 that never ran, the row's
    digest overwritten with 20's, the refund of 10 forgotten. It runs; the orphan keeps its
    arguments and is what a later refund of 10 is asked about."""
    effects = killed_after_the_refund(driver, db_url, tmp_path)
    (lost,) = ledger_rows(db_url)
    done: list[Any] = []
    script = [
        call("issue_refund", order_id="A1", amount=20),
        "Refunded 20.",
        call("issue_refund", order_id="A1", amount=10.0),  # the lost one, asked for again
        "Done.",
    ]  # the model's turns in the thread: a turn is picked by the AI messages before it
    other = run(db_url, done, script, "refund 20 on A1")
    assert other["outcome"]["terminated_reason"] == "completed", other["outcome"]
    assert done == [("A1", 20, None)]
    (answer,) = [m for m in other["messages"] if isinstance(m, ToolMessage)]
    assert answer.text == "refunded 20 on A1"
    after = ledger_rows(db_url)
    assert after[0] == lost  # still started, under its own id, with its own arguments
    assert after[1][1:] == ("completed", digest(20))
    # the lost refund of 10, asked for again: "did this happen?" about it, not run
    again = run(db_url, done, script, "and the 10?")
    assert asked(again) == [("outcome_unknown", {"order_id": "A1", "amount": 10.0})]
    assert done == [("A1", 20, None)]
    assert effects.read_text().splitlines() == ["refund 10"]
    (request,) = again["__interrupt__"][0].value
    assert ledger_rows(db_url)[0] == (request["tool_call_id"], "started", digest(10))


async def test_an_approved_lost_refund_is_recorded_done_and_the_other_still_ran(
    db_url: str, tmp_path: Path
) -> None:
    """The whole story, answered: the refund of 20 ran, the lost refund of 10 asked again
    is approved ("it happened") and recorded done; each refund happened once."""
    effects = killed_after_the_refund("async", db_url, tmp_path)
    done: list[Any] = []
    script = [
        call("issue_refund", order_id="A1", amount=20),
        call("issue_refund", order_id="A1", amount=10),
        "Done.",
    ]
    ledger = Ledger(db_url)
    try:
        async with Persistence(db_url).acheckpointer() as saver:
            model = ScriptedChatModel(script=script, fresh_ids=True)
            agent = build_agent(model, refunds_into(done), checkpointer=saver, ledger=ledger)
            paused = await agent.ainvoke({"messages": [("user", "refund A1")]}, THREAD, context=CTX)
            assert asked(paused) == [("outcome_unknown", {"order_id": "A1", "amount": 10})]
            finished = await agent.ainvoke(Command(resume={"type": "approve"}), THREAD, context=CTX)
        found = await ledger.arun(rows("t1"))
    finally:
        await ledger.aclose()
    assert finished["outcome"]["terminated_reason"] == "completed", finished["outcome"]
    assert done == [("A1", 20, None)]
    assert effects.read_text().splitlines() == ["refund 10"]
    assert sorted(r[1:] for r in found) == sorted(
        [("completed", digest(20)), ("completed", digest(10))]
    )


def told(db_url: str) -> tuple[list[Any], list[Any]]:
    """The thread's `orphaned` audit records, and its run records, oldest first."""
    ledger = Ledger(db_url)
    try:
        return AuditLog(ledger).query(thread="t1", decision="orphaned"), RunLog(ledger).query()
    finally:
        ledger.close()


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_an_orphan_no_call_asks_for_again_is_audited_once_and_a_match_still_adopts_it(
    driver: str, db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The model moves on after the crash (a refund of 20, then a plain answer): the lost
    refund of 10 stayed `started` for good and nothing said it may have happened. The first
    run end after the crash audits it (`orphaned`, its arguments redacted as the audit log
    redacts them) and says so in its run record; later run ends do not again. The row stays:
    the refund of 10 asked for later is still asked about, and never runs twice."""
    lost_args = {"order_id": "A1", "amount": 10, "note": "mail bob@example.com"}
    effects = killed_after_the_refund(driver, db_url, tmp_path, turn=[lost_args])
    ((lost_id, state, _),) = ledger_rows(db_url)
    assert state == "started"
    done: list[Any] = []
    script = [
        call("issue_refund", order_id="A1", amount=20),
        "Refunded 20.",
        "Nothing else.",
        call("issue_refund", **lost_args),  # the lost one, asked for again at last
        "Done.",
    ]  # the model's turns in the thread: a turn is picked by the AI messages before it
    moved_on = run(db_url, done, script, "refund 20 on A1", driver)
    assert moved_on["outcome"]["terminated_reason"] == "completed", moved_on["outcome"]
    (orphaned,), runs = told(db_url)
    assert (orphaned.kind, orphaned.status, orphaned.tool) == ("tool", "unknown", "issue_refund")
    assert orphaned.args == {"order_id": "A1", "amount": 10, "note": "mail [EMAIL]"}
    assert (orphaned.tool_call_id, orphaned.thread_id, orphaned.user_id) == (lost_id, "t1", "u1")
    assert "may or may not have happened" in orphaned.result
    (noted,) = [r for r in runs if lost_id in r.detail]
    assert f"(orphaned: issue_refund {lost_id} started and never finished" in noted.detail
    assert noted.run_key == runs[-1].run_key  # the run that ended first after the crash

    assert (
        run(db_url, done, script, "anything else?", driver)["messages"][-1].text == "Nothing else."
    )
    again = run(db_url, done, script, "and the 10?", driver)
    assert asked(again) == [("outcome_unknown", lost_args)]  # adopted: asked, not run
    assert done == [("A1", 20, None)]
    assert effects.read_text().splitlines() == ["refund 10"]
    (request,) = again["__interrupt__"][0].value
    assert ledger_rows(db_url)[0][:2] == (request["tool_call_id"], "started")
    still, runs = told(db_url)
    assert still == [orphaned]  # told once, not at each later run end
    assert [r.run_key for r in runs if lost_id in r.detail] == [noted.run_key]
    capsys.readouterr()
    assert main(["audit", "--decision", "orphaned", "--db", db_url]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert "orphaned:unknown" in line and "issue_refund" in line and "[EMAIL]" in line


async def test_a_row_recorded_under_the_arguments_as_spelled_is_still_that_call(
    ledger: Ledger,
) -> None:
    """Before this fix the ledger's digest was of the arguments as the model spelled them
    (no `note: None` filled in). A thread in flight across the upgrade keeps its rows: its
    call resumed under the same id is "did this happen?" (not a `conflict`, which would
    answer it "other arguments; not run" and leave its row `started` for good), and an
    orphan recorded so is still adopted by the same call."""
    spelled = call_digest("issue_refund", {"order_id": "A1", "amount": 10}, "1")
    assert (await ledger.arun(claim_flow("t1", "c1", "issue_refund", spelled))).action == "run"
    resumed = await ledger.arun(claim_flow("t1", "c1", "issue_refund", digest(10), spelled=spelled))
    assert resumed.action == "unknown"
    asked_again = claim_flow("t1", "c2", "issue_refund", digest(10), spelled=spelled, known=("c0",))
    adopted = await ledger.arun(asked_again)
    assert adopted.action == "unknown"
    assert adopted.record is not None and adopted.record.tool_call_id == "c2"


# -- a repeat in the killed turn, spelled anew, then a new message ----------------------------

SPELLED_ANEW = [
    {"order_id": "A1", "amount": 10.0},
    {"order_id": "A1", "amount": "10", "note": None},
]


@pytest.mark.parametrize("repeat", SPELLED_ANEW, ids=["float", "str-and-default"])
@pytest.mark.parametrize("driver", ["sync", "async"])
def test_a_repeat_spelled_anew_follows_its_primary_when_a_new_message_finds_it_left(
    driver: str, repeat: dict[str, Any], db_url: str, tmp_path: Path
) -> None:
    """The attack: a turn asks for the refund of 10 twice, the second time as `10.0` (or
    `"10"` with the default sent); killed right after the first refund, before its record;
    the next task is a new message. The first call is "outcome unknown"; the repeat, never
    claimed, was answered "Not run: ... keel does not run it now", so the model read that
    one refund did not happen. It is its primary's duplicate, and gets that answer."""
    turn = [{"order_id": "A1", "amount": 10}, repeat]
    durability = "sync" if driver == "sync" else "async"
    effects = killed_after_the_refund(driver, db_url, tmp_path, durability, turn)
    done: list[Any] = []
    model = ScriptedChatModel(script=["(the killed turn)", "Noted."], fresh_ids=True)
    ledger = Ledger(db_url)
    try:
        with Persistence(db_url).checkpointer() as saver:
            agent = build_agent(model, refunds_into(done), checkpointer=saver, ledger=ledger)
            result = agent.invoke({"messages": [("user", "anything else?")]}, THREAD, context=CTX)
    finally:
        ledger.close()
    assert result["outcome"]["terminated_reason"] == "completed", result["outcome"]
    assert done == []
    assert effects.read_text().splitlines() == ["refund 10"]
    (ai,) = [m for m in result["messages"] if isinstance(m, AIMessage) and m.tool_calls]
    assert [c["args"] for c in ai.tool_calls] == turn
    by_id = {m.tool_call_id: m for m in result["messages"] if isinstance(m, ToolMessage)}
    first, again = (by_id[c["id"]] for c in ai.tool_calls)
    assert first.text.startswith("Outcome unknown: this call started")
    assert again.text.endswith(first.text) and not again.text.startswith("Not run")
    assert again.response_metadata == {
        "keel_status": "not_run",
        "keel_duplicate_of": first.tool_call_id,
    }


def left_by_a_stopped_agent(
    db_url: str,
    turn: list[dict[str, Any]],
    name: str,
    agents: Callable[[Any, Ledger], dict[str, Any]],
    stopped: str,
    decision: str = "not_run",
    again: bool = False,
) -> list[AuditRecord]:
    """A supervisor's agents (`agents(model, ledger)`); `stopped`, on `model`, asks in one turn
    for the calls of tool `name` in `turn` and is stopped by Ctrl-C in the first; then a new
    message on the thread (`again`: handed to `stopped` too, which answers it). The thread's
    audit records of `decision`, oldest first."""
    calls = [ToolCall(name=name, args=a, id=None) for a in turn]

    def first_turn(messages: Sequence[BaseMessage]) -> AIMessage | str:
        asked = any(m.type == "human" and m.text == "refund A1" for m in messages)
        return AIMessage("", tool_calls=calls) if asked else "Nothing else."

    model = ScriptedChatModel(script=[first_turn, "Done."], fresh_ids=True)

    def router(messages: Sequence[BaseMessage]) -> Route:
        last = messages[-1]
        handed = last.text == "refund A1" or (again and last.text == "anything else?")
        return Route(agent=stopped if last.type == "human" and handed else FINISH, task=last.text)

    ledger = Ledger(db_url)
    config: Any = {"configurable": {"thread_id": "s1"}}
    try:
        with Persistence(db_url).checkpointer() as saver:
            built = agents(model, ledger)
            sup = build_supervisor(built, router, ledger=ledger, checkpointer=saver)
            with pytest.raises(KeyboardInterrupt):
                sup.invoke({"messages": [("user", "refund A1")]}, config, context=CTX)
            sup.invoke({"messages": [("user", "anything else?")]}, config, context=CTX)
        return AuditLog(ledger).query(thread="s1", decision=decision)
    finally:
        ledger.close()


def test_a_supervisors_agent_stopped_mid_turn_audits_its_repeat_as_its_primary(
    db_url: str,
) -> None:
    """The same in a supervisor's agent, stopped by Ctrl-C right after the first refund: the
    supervisor thread's next message audits the agent's calls (its conversation is no later
    run's). The repeat spelled `10.0` was audited "Not run: ... keel does not run it now"; it
    follows its primary's "outcome unknown", read with the agent's tools."""
    done: list[Any] = []

    @tool(risk="write")
    def issue_refund(order_id: str, amount: int, note: str | None = None) -> str:
        """Refund an order (Ctrl-C lands right after it)."""
        done.append((order_id, amount, note))
        raise KeyboardInterrupt

    turn = [{"order_id": "A1", "amount": 10}, {"order_id": "A1", "amount": 10.0}]

    def agents(model: Any, ledger: Ledger) -> dict[str, Any]:
        return {"billing": build_agent(model, [issue_refund], ledger=ledger)}

    left = left_by_a_stopped_agent(db_url, turn, "issue_refund", agents, "billing")
    audited = [(r.args, r.status, r.result) for r in left]
    assert done == [("A1", 10, None)]
    (first, again) = audited
    assert first[:2] == (turn[0], "not_run") and first[2].startswith("Outcome unknown")
    assert again[:2] == (turn[1], "not_run")
    assert again[2].startswith("(This call repeats call") and again[2].endswith(first[2])


def test_a_call_a_stopped_agent_left_is_told_once_not_again_as_an_orphan(db_url: str) -> None:
    """The agent's next task ends after the new message audited its stopped call "outcome
    unknown" (`not_run`): the call's row is still `started` and its id in no history the agent
    holds, but it was told of, and is not audited again as `orphaned`."""

    @tool(risk="write")
    def issue_refund(order_id: str, amount: int) -> str:
        """Refund an order (Ctrl-C lands right after it)."""
        raise KeyboardInterrupt

    def agents(model: Any, ledger: Ledger) -> dict[str, Any]:
        return {"billing": build_agent(model, [issue_refund], ledger=ledger)}

    turn = [{"order_id": "A1", "amount": 10}]
    args = (db_url, turn, "issue_refund", agents, "billing")
    assert left_by_a_stopped_agent(*args, decision="orphaned", again=True) == []
    ledger = Ledger(db_url)
    try:
        told = AuditLog(ledger).query(thread="s1", decision="not_run")
        runs = RunLog(ledger).query()
    finally:
        ledger.close()
    assert [(r.args, r.result[:15]) for r in told] == [(turn[0], "Outcome unknown")]
    assert [r.graph for r in runs if r.status == "success"].count("keel_agent") == 1  # it ended
    assert not any("orphaned" in r.detail for r in runs)


# the stopped agent's turn, and how its answers read: a call named by the agent's own `refund`
# (the `shop`'s: currency EUR unless given) is the same as, or another than, the call before it
TWO_REFUNDS = {
    "same-for-shop": (
        [{"order_id": "A1", "amount": 10}, {"order_id": "A1", "amount": 10, "currency": "EUR"}],
        "duplicate",
    ),
    "other-for-shop": (
        [{"order_id": "A1", "amount": 10, "currency": "USD"}, {"order_id": "A1", "amount": 10}],
        "not_run",
    ),
}


@pytest.mark.parametrize("turn, second", TWO_REFUNDS.values(), ids=TWO_REFUNDS.keys())
def test_a_stopped_agents_calls_are_read_with_its_own_tool_not_a_namesake_of_another_agent(
    db_url: str, turn: list[dict[str, Any]], second: str
) -> None:
    """Two agents of a supervisor each have a `refund`; `billing`'s reads a missing currency
    as USD, `shop`'s as EUR. `shop` is stopped by Ctrl-C right after its turn's first refund;
    the next message audits the turn's calls. They were read with the first agent's `refund`:
    a second call `shop` read as the first one's duplicate (never claimed, its answer the
    first's) was audited "Not run ... keel does not run it now", and a second call `shop` read
    as another refund (which never ran) was audited as a repeat of the first."""
    done: list[Any] = []

    @tool(risk="write", name="refund")
    def billing_refund(order_id: str, amount: int, currency: str = "USD") -> str:
        """Refund a billing charge."""
        done.append(("billing", order_id, amount, currency))
        return "refunded"

    @tool(risk="write", name="refund")
    def shop_refund(order_id: str, amount: int, currency: str = "EUR") -> str:
        """Refund a shop order (Ctrl-C lands right after it)."""
        done.append(("shop", order_id, amount, currency))
        raise KeyboardInterrupt

    def agents(model: Any, ledger: Ledger) -> dict[str, Any]:
        billing = build_agent(ScriptedChatModel(script=["-"]), [billing_refund], ledger=ledger)
        return {"billing": billing, "shop": build_agent(model, [shop_refund], ledger=ledger)}

    audited = left_by_a_stopped_agent(db_url, turn, "refund", agents, "shop")
    assert done == [("shop", "A1", 10, turn[0].get("currency", "EUR"))]  # once, never again
    first, again = audited
    assert (first.args, first.status) == (turn[0], "not_run")
    assert first.result.startswith("Outcome unknown")
    assert (again.args, again.status) == (turn[1], "not_run")
    if second == "duplicate":  # the first refund's answer: one refund, which may have happened
        assert again.result.startswith("(This call repeats call")
        assert again.result.endswith(first.result)
    else:  # another refund, which never ran
        assert again.result.startswith("Not run") and "repeats" not in again.result


# -- time travel: the model asks again, spelling the arguments anew ---------------------------


@pytest.mark.parametrize("fork", ["execute_tools", "call_model"])
def test_time_travel_gets_the_recorded_result_of_a_call_spelled_anew(
    db_url: str, fork: str
) -> None:
    """Forked from before the model's turn, the model asks again for the refund it made, as
    `10.0` this time, under a new id. The ledger's digest was of the arguments as spelled, so
    the call that ended under an id the fork left behind was not found and the refund ran a
    second time. The digest is of the arguments as the tool reads them: recorded."""
    done: list[Any] = []
    amounts = iter([10, 10.0])

    def turn(messages: Sequence[BaseMessage]) -> AIMessage:
        return call("issue_refund", order_id="A1", amount=next(amounts))

    ledger = Ledger(db_url)
    try:
        with Persistence(db_url).checkpointer() as saver:
            model = ScriptedChatModel(script=[turn, "Refunded."], fresh_ids=True)
            agent = build_agent(model, refunds_into(done), checkpointer=saver, ledger=ledger)
            agent.invoke({"messages": [("user", "refund A1")]}, THREAD, context=CTX)
            oldest = [s for s in agent.get_state_history(THREAD) if s.next == (fork,)][-1]
            replayed = agent.invoke(None, oldest.config, context=CTX)
    finally:
        ledger.close()
    assert replayed["outcome"]["terminated_reason"] == "completed", replayed["outcome"]
    assert done == [("A1", 10, None)]
    (answer,) = [m for m in replayed["messages"] if isinstance(m, ToolMessage)]
    assert (answer.text, answer.response_metadata.get("keel_ledger")) == (
        "refunded 10 on A1",
        "recorded",
    )
