"""Attacks by a stuttering model: the same side-effecting call several times in ONE turn.

Real models do it (lmstudio-bug-tracker#1756: 9 identical `bash_exec` calls in one message;
openai/codex#27759), each copy under a fresh tool-call id, so keel's ledger, keyed by the id,
saw a new call each time: two refunds, two approvals asked for the same thing. Now a call of a
side-effecting tool with the same name and canonical arguments as an earlier call of its turn
is a duplicate: never gated, asked about, claimed or run, answered with the first call's answer
(`response_metadata["keel_duplicate_of"]`), audited as `duplicate`. Real ledgers (SQLite and
PostgreSQL), real checkpointers, scripted models minting fresh ids as real ones do; each tool
counts what really ran. The crash case SIGKILLs a real process right after the effect.
"""

from __future__ import annotations

import asyncio
import json
import signal
import textwrap
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
from forking import ForkServer
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, ToolCall, ToolMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command

from keel import Ledger, Persistence, RunContext, build_agent, tool
from keel.db.audit import AuditLog, AuditRecord
from keel.db.ledger import Flow, Row
from keel.evals import ScriptedChatModel
from keel.guards import PermissionMiddleware, Policy, Rule

CTX = RunContext(user_id="u1", roles=("support",))
REFUND = {"order_id": "A1", "amount": 10}
REPEATS = "(This call repeats call {} of the same turn: it did not run again. That call's result:) "
ROOT = Path(__file__).resolve().parents[1]


def turn(*calls: tuple[str, dict[str, Any]]) -> AIMessage:
    """One model turn asking for `calls` (ids minted by the model: `fresh_ids=True`)."""
    return AIMessage(
        content="", tool_calls=[ToolCall(name=n, args=dict(a), id=None) for n, a in calls]
    )


def refunds(n: int, args: dict[str, Any] = REFUND) -> AIMessage:
    return turn(*[("issue_refund", args)] * n)


class Shop:
    """The outside world: every refund that really ran."""

    def __init__(self) -> None:
        self.refunded: list[dict[str, Any]] = []

    def tools(self) -> list[Any]:
        @tool(risk="write")
        def issue_refund(order_id: str, amount: int) -> str:
            """Refund `amount` on an order."""
            self.refunded.append({"order_id": order_id, "amount": amount})
            return f"refund #{len(self.refunded)}: {amount} on {order_id}"

        @tool
        def lookup_order(order_id: str) -> str:
            """Look an order up."""
            return f"order {order_id}: delivered"

        return [issue_refund, lookup_order]


def policy(action: str) -> Policy:
    return Policy(
        rules=(
            Rule(tool="issue_refund", action=action),  # type: ignore[arg-type]
            Rule(tool="lookup_order", action="allow"),
        ),
        loop=None,
    )


def model(*script: Any) -> ScriptedChatModel:
    return ScriptedChatModel(script=[*script, "Done."], fresh_ids=True)


def answers(messages: Sequence[Any], ai: AIMessage) -> list[ToolMessage]:
    """The tool results of `ai`'s calls, in call order."""
    ids = [c["id"] for c in ai.tool_calls]
    found = {m.tool_call_id: m for m in messages if isinstance(m, ToolMessage)}
    return [found[i] for i in ids]


def last_turn(messages: Sequence[Any]) -> AIMessage:
    return next(m for m in messages if isinstance(m, AIMessage) and m.tool_calls)


def claimed(thread: str) -> Flow[list[Row]]:
    return (
        yield (
            "SELECT tool_call_id, state FROM keel_tool_calls WHERE thread_id = ? ORDER BY 1",
            (thread,),
        )
    )


def tool_audit(ledger: Ledger, thread: str) -> list[AuditRecord]:
    return [r for r in AuditLog(ledger).query(thread=thread) if r.kind == "tool"]


def assert_shared(messages: Sequence[Any], ai: AIMessage, status: str) -> None:
    """Every call of `ai` answered; the repeats with the first one's answer, marked."""
    first, *rest = answers(messages, ai)
    assert first.response_metadata["keel_status"] == status
    assert "keel_duplicate_of" not in first.response_metadata
    for dupe in rest:
        assert dupe.text == REPEATS.format(first.tool_call_id) + first.text
        assert dupe.response_metadata["keel_status"] == status
        assert dupe.response_metadata["keel_duplicate_of"] == first.tool_call_id
        assert dupe.status == first.status


THREAD: Any = {"configurable": {"thread_id": "t1"}}


@contextmanager
def shop_agent(
    db_url: str, ledger: Ledger, script: AIMessage, rules: str | Policy = "allow"
) -> Iterator[tuple[Any, Shop]]:
    """An agent on a real checkpointer and ledger whose model asks for `script` once."""
    shop = Shop()
    held = rules if isinstance(rules, Policy) else policy(rules)
    with Persistence(db_url).checkpointer() as saver:
        yield (
            build_agent(
                model(script), shop.tools(), policy=held, ledger=ledger, checkpointer=saver
            ),
            shop,
        )


@asynccontextmanager
async def ashop_agent(
    db_url: str, ledger: Ledger, script: AIMessage, rules: str = "allow"
) -> AsyncIterator[tuple[Any, Shop]]:
    shop = Shop()
    async with Persistence(db_url).acheckpointer() as saver:
        yield (
            build_agent(
                model(script), shop.tools(), policy=policy(rules), ledger=ledger, checkpointer=saver
            ),
            shop,
        )


def asked_turn(agent: Any) -> tuple[AIMessage, list[dict[str, Any]]]:
    """Start the run; the turn it paused on and the review requests it shows."""
    agent.invoke({"messages": [("user", "refund A1")]}, THREAD, context=CTX)
    state = agent.get_state(THREAD)
    return last_turn(state.values["messages"]), [r for i in state.interrupts for r in i.value]


# -- allow: one execution, every call answered, the audit shows what the model asked -------


@pytest.mark.parametrize("n", [2, 3])
def test_identical_refunds_in_one_turn_run_once_sync(n: int, db_url: str, ledger: Ledger) -> None:
    with shop_agent(db_url, ledger, refunds(n)) as (agent, shop):
        result = agent.invoke({"messages": [("user", "refund A1")]}, THREAD, context=CTX)
    assert result["outcome"]["terminated_reason"] == "completed"
    assert shop.refunded == [REFUND]  # main today: n refunds
    ai = last_turn(result["messages"])
    assert len({c["id"] for c in ai.tool_calls}) == n  # fresh ids, as real models give
    assert_shared(result["messages"], ai, "success")
    primary = ai.tool_calls[0]["id"]
    assert ledger.run(claimed("t1")) == [(primary, "completed")]  # repeats never claimed
    records = tool_audit(ledger, "t1")
    assert [(r.tool_call_id, r.decision, r.status) for r in records] == [
        (c["id"], "allow" if i == 0 else "duplicate", "success")
        for i, c in enumerate(ai.tool_calls)
    ]
    assert all(f"duplicate of call {primary}" in r.result for r in records[1:])
    assert all(r.args == REFUND for r in records)


@pytest.mark.parametrize("n", [2, 3])
async def test_identical_refunds_in_one_turn_run_once_async(
    n: int, db_url: str, ledger: Ledger
) -> None:
    """Under `ainvoke` a turn's calls run concurrently: a repeat must not race its primary."""
    async with ashop_agent(db_url, ledger, refunds(n)) as (agent, shop):
        result = await agent.ainvoke(
            {"messages": [("user", "refund A1")]}, THREAD, context=CTX, durability="async"
        )
    assert result["outcome"]["terminated_reason"] == "completed"
    assert shop.refunded == [REFUND]
    ai = last_turn(result["messages"])
    assert_shared(result["messages"], ai, "success")
    assert await ledger.arun(claimed("t1")) == [(ai.tool_calls[0]["id"], "completed")]
    records = [r for r in await AuditLog(ledger).aquery(thread="t1") if r.kind == "tool"]
    assert [r.decision for r in records] == ["allow"] + ["duplicate"] * (n - 1)


def test_calls_that_differ_in_any_argument_all_run(db_url: str, ledger: Ledger) -> None:
    other = {**REFUND, "amount": 11}
    script = turn(("issue_refund", REFUND), ("issue_refund", other), ("issue_refund", REFUND))
    with shop_agent(db_url, ledger, script) as (agent, shop):
        result = agent.invoke({"messages": [("user", "refund")]}, THREAD, context=CTX)
    assert shop.refunded == [REFUND, other]  # the third repeats the first
    first, second, third = answers(result["messages"], last_turn(result["messages"]))
    assert "keel_duplicate_of" not in second.response_metadata
    assert third.response_metadata["keel_duplicate_of"] == first.tool_call_id
    assert third.text == REPEATS.format(first.tool_call_id) + first.text
    assert first.text != second.text


SAME_REFUND = [
    {"order_id": "A1", "amount": 10.0},  # a float the schema reads as the int 10
    {"order_id": "A1", "amount": "10"},  # a number sent as text, as sloppy models do
    {"amount": 10, "order_id": "A1", "note": None},  # an optional argument sent as its default
]


@pytest.mark.parametrize("action", ["allow", "ask"])
@pytest.mark.parametrize("spelled", SAME_REFUND, ids=["float", "text", "default-sent"])
def test_a_repeat_spelled_differently_but_read_the_same_runs_once(
    spelled: dict[str, Any], action: str, db_url: str, ledger: Ledger
) -> None:
    """The attack: a stuttering model repeats the refund, the copy's arguments spelled
    differently (`10.0`, `"10"`, a default sent) but read by the tool's schema as the same
    call. The duplicate rule compared the raw JSON: both refunds ran (and `ask` asked twice)."""
    shop = Shop()
    tools = shop.tools()

    @tool(risk="write", name="issue_refund")
    def issue_refund(order_id: str, amount: int, note: str | None = None) -> str:
        """Refund `amount` on an order."""
        return str(tools[0].invoke({"order_id": order_id, "amount": amount}))

    script = turn(("issue_refund", REFUND), ("issue_refund", spelled))
    with Persistence(db_url).checkpointer() as saver:
        agent = build_agent(
            model(script),
            [issue_refund, tools[1]],
            policy=policy(action),
            ledger=ledger,
            checkpointer=saver,
        )
        ai, requests = asked_turn(agent)
        assert len(requests) == (action == "ask")  # one approval, not two
        if action == "ask":
            agent.invoke(Command(resume={"type": "approve"}), THREAD, context=CTX)
        result = agent.get_state(THREAD).values
    assert result["outcome"]["terminated_reason"] == "completed"
    assert shop.refunded == [REFUND]  # before the fix: two refunds of 10 on A1
    assert_shared(result["messages"], ai, "success")


def test_read_only_repeats_still_run() -> None:
    """The rule is for side effects: a read asked twice runs twice (a fresh look each time)."""
    looked: list[str] = []

    @tool
    def quote(symbol: str) -> str:
        """The latest quote."""
        looked.append(symbol)
        return f"{symbol}: {100 + len(looked)}"

    agent = build_agent(
        model(turn(("quote", {"symbol": "X"}), ("quote", {"symbol": "X"}))), [quote]
    )
    result = agent.invoke({"messages": [("user", "quote X")]}, context=CTX)
    assert looked == ["X", "X"]
    assert not any(
        "keel_duplicate_of" in m.response_metadata
        for m in result["messages"]
        if isinstance(m, ToolMessage)
    )


def test_without_a_ledger_or_thread_repeats_still_run_once() -> None:
    """The rule does not need the ledger: a stutter is one call whatever is configured."""
    shop = Shop()
    agent = build_agent(model(refunds(3)), shop.tools())
    result = agent.invoke({"messages": [("user", "refund A1")]}, context=CTX)
    assert shop.refunded == [REFUND]
    assert_shared(result["messages"], last_turn(result["messages"]), "success")


def test_a_denied_call_denies_its_repeats(db_url: str, ledger: Ledger) -> None:
    with shop_agent(db_url, ledger, refunds(3), "deny") as (agent, shop):
        result = agent.invoke({"messages": [("user", "refund")]}, THREAD, context=CTX)
    assert shop.refunded == []
    assert_shared(result["messages"], last_turn(result["messages"]), "denied")
    records = tool_audit(ledger, "t1")
    assert [(r.decision, r.status) for r in records] == [
        ("deny", "denied"), ("duplicate", "denied"), ("duplicate", "denied")
    ]  # fmt: skip


def test_with_the_default_loop_guard_three_repeats_stop_the_run_before_anything_runs(
    db_url: str, ledger: Ledger
) -> None:
    """The loop guard counts identical calls of one turn as repeats (`test_loop_guard`): the
    default `LoopPolicy(max_repeats=3)` ends the turn as `loop_detected`, and nothing runs."""
    guarded = Policy(rules=(Rule(tool="issue_refund", action="allow"),))  # default loop guard
    with shop_agent(db_url, ledger, refunds(3), guarded) as (agent, shop):
        result = agent.invoke({"messages": [("user", "refund")]}, THREAD, context=CTX)
    assert result["outcome"]["terminated_reason"] == "loop_detected"
    assert shop.refunded == []


# -- ask: one approval, the repeats follow its decision; no answer makes a repeat run ------


@pytest.mark.parametrize("form", ["one", "list", "by-id, the repeats approved too"])
def test_ask_asks_once_and_an_approval_runs_once(form: str, db_url: str, ledger: Ledger) -> None:
    with shop_agent(db_url, ledger, refunds(3), "ask") as (agent, shop):
        ai, requests = asked_turn(agent)
        primary, *repeats = [c["id"] for c in ai.tool_calls]
        assert [r["tool_call_id"] for r in requests] == [primary]  # one approval, not three
        approve = {"type": "approve", "reviewer": "alice"}
        resume: Any = {
            "one": approve,
            "list": [approve],
            # a client that answers the repeats' ids too: they are no requests, and never run
            "by-id, the repeats approved too": {i: approve for i in [primary, *repeats]},
        }[form]
        result = agent.invoke(Command(resume=resume), THREAD, context=CTX)
    assert result["outcome"]["terminated_reason"] == "completed"
    assert shop.refunded == [REFUND]
    assert_shared(result["messages"], ai, "success")
    assert ledger.run(claimed("t1")) == [(primary, "completed")]
    approvals = [r for r in AuditLog(ledger).query(thread="t1") if r.kind == "approval"]
    assert [(r.tool_call_id, r.decision) for r in approvals] == [(primary, "approved")]
    records = tool_audit(ledger, "t1")
    assert [(r.tool_call_id, r.decision) for r in records] == [
        (primary, "ask"), *((i, "duplicate") for i in repeats)
    ]  # fmt: skip


async def test_ask_asks_once_and_an_approval_runs_once_async(db_url: str, ledger: Ledger) -> None:
    async with ashop_agent(db_url, ledger, refunds(2), "ask") as (agent, shop):
        await agent.ainvoke({"messages": [("user", "refund")]}, THREAD, context=CTX)
        state = await agent.aget_state(THREAD)
        ai = last_turn(state.values["messages"])
        assert [r["tool_call_id"] for i in state.interrupts for r in i.value] == [
            ai.tool_calls[0]["id"]
        ]
        resume = {c["id"]: {"type": "approve"} for c in ai.tool_calls}
        result = await agent.ainvoke(Command(resume=resume), THREAD, context=CTX)
    assert shop.refunded == [REFUND]
    assert_shared(result["messages"], ai, "success")


def test_reject_rejects_every_repeat_even_one_answered_approve(db_url: str, ledger: Ledger) -> None:
    """The attack: reject the call the human was shown, 'approve' its repeat's id."""
    with shop_agent(db_url, ledger, refunds(3), "ask") as (agent, shop):
        ai, _ = asked_turn(agent)
        primary, *repeats = [c["id"] for c in ai.tool_calls]
        resume = {primary: {"type": "reject", "message": "no"}}
        resume |= {i: {"type": "approve"} for i in repeats}
        result = agent.invoke(Command(resume=resume), THREAD, context=CTX)
        assert result["outcome"]["terminated_reason"] == "rejected"
        # and a resume after the rejection runs nothing either
        again = agent.invoke(None, THREAD, context=CTX)
    assert shop.refunded == []
    assert_shared(result["messages"], ai, "rejected")
    assert again["outcome"]["terminated_reason"] == "rejected"
    assert ledger.run(claimed("t1")) == []
    audit = AuditLog(ledger).query(thread="t1")
    assert [(r.kind, r.tool_call_id, r.decision, r.status) for r in audit if r.tool] == [
        ("approval", primary, "rejected", ""),
        *(("tool", i, "duplicate", "rejected") for i in repeats),
    ]


def test_an_edit_edits_the_repeats_and_runs_once(db_url: str, ledger: Ledger) -> None:
    edited = {**REFUND, "amount": 5}
    with shop_agent(db_url, ledger, refunds(2), "ask") as (agent, shop):
        asked_turn(agent)
        result = agent.invoke(Command(resume={"type": "edit", "args": edited}), THREAD, context=CTX)
    assert shop.refunded == [edited]
    ai = last_turn(result["messages"])
    assert [c["args"] for c in ai.tool_calls] == [edited, edited]
    assert_shared(result["messages"], ai, "success")


def test_a_human_reply_answers_the_repeats(db_url: str, ledger: Ledger) -> None:
    with shop_agent(db_url, ledger, refunds(2), "ask") as (agent, shop):
        asked_turn(agent)
        reply = {"type": "respond", "message": "refunded by hand"}
        result = agent.invoke(Command(resume=reply), THREAD, context=CTX)
    assert result["outcome"]["terminated_reason"] == "completed"
    assert shop.refunded == []
    assert_shared(result["messages"], last_turn(result["messages"]), "respond")


# -- a crash between the primary's effect and its record: the repeat does not run either ----

CHILD = textwrap.dedent(
    """
    import asyncio, os, signal, sys

    from langchain_core.messages import AIMessage, ToolCall

    from keel import Ledger, Persistence, RunContext, build_agent, tool
    from keel.evals import ScriptedChatModel

    url, effects, driver = sys.argv[1:]
    ctx = RunContext(user_id="u1")
    config = {"configurable": {"thread_id": "t1"}}
    args = {"order_id": "A1", "amount": 10}
    calls = [ToolCall(name="issue_refund", args=args, id=None) for _ in range(2)]
    model = ScriptedChatModel(script=[AIMessage(content="", tool_calls=calls)], fresh_ids=True)


    def refund():
        with open(effects, "a") as f:
            f.write("refund\\n")
            f.flush()
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)  # after the effect, before its record


    @tool(risk="write", name="issue_refund")
    def sync_refund(order_id: str, amount: int) -> str:
        "Refund an order."
        refund()


    @tool(risk="write", name="issue_refund")
    async def async_refund(order_id: str, amount: int) -> str:
        "Refund an order."
        refund()


    ledger = Ledger(url)
    if driver == "sync":
        with Persistence(url).checkpointer() as saver:
            agent = build_agent(model, [sync_refund], checkpointer=saver, ledger=ledger)
            agent.invoke({"messages": [("user", "refund A1")]}, config, context=ctx)
    else:
        async def main():
            async with Persistence(url).acheckpointer() as saver:
                agent = build_agent(model, [async_refund], checkpointer=saver, ledger=ledger)
                await agent.ainvoke(
                    {"messages": [("user", "refund A1")]}, config, context=ctx,
                    durability="async",
                )
        asyncio.run(main())
    """
)


def resumed(agent: Any, ledger: Ledger, answer: str) -> tuple[AIMessage, list[Any], list[Row], Any]:
    """Resume the killed thread, then answer "did this happen?" with `answer`."""
    agent.invoke(None, THREAD, context=CTX)
    ai = last_turn(agent.get_state(THREAD).values["messages"])
    requests = [r for i in agent.get_state(THREAD).interrupts for r in i.value]
    rows = ledger.run(claimed("t1"))
    result = agent.invoke(Command(resume={"type": answer}), THREAD, context=CTX)
    return ai, requests, rows, result


async def aresumed(
    agent: Any, ledger: Ledger, answer: str
) -> tuple[AIMessage, list[Any], list[Row], Any]:
    await agent.ainvoke(None, THREAD, context=CTX)
    state = await agent.aget_state(THREAD)
    ai = last_turn(state.values["messages"])
    requests = [r for i in state.interrupts for r in i.value]
    rows = await ledger.arun(claimed("t1"))
    result = await agent.ainvoke(Command(resume={"type": answer}), THREAD, context=CTX)
    return ai, requests, rows, result


def killed_after_the_primary(forks: ForkServer, driver: str, db_url: str, tmp_path: Path) -> Path:
    """Run `CHILD` (killed right after the first refund), a process forked with keel imported
    (`tests/forking.py`, LangSmith off); the file its refund wrote."""
    effects = tmp_path / "effects.txt"
    proc = forks.start_code(CHILD, db_url, str(effects), driver, cwd=tmp_path)
    assert proc.finish() == -signal.SIGKILL, proc.output()[1][-2000:]
    return effects


@pytest.mark.parametrize("answer", ["approve", "reject"])
@pytest.mark.parametrize("driver", ["sync", "async"])
def test_sigkill_after_the_primary_ran_never_runs_its_repeat(
    driver: str, answer: str, db_url: str, tmp_path: Path, forks: ForkServer
) -> None:
    """Killed right after the first refund, before its record: on resume the human is asked
    "did this happen?" about that call only, and the repeat follows the answer, unrun."""
    effects = killed_after_the_primary(forks, driver, db_url, tmp_path)
    assert effects.read_text().splitlines() == ["refund"]
    shop = Shop()
    ledger = Ledger(db_url)
    try:
        if driver == "sync":
            with Persistence(db_url).checkpointer() as saver:
                agent = build_agent(
                    model(refunds(2)), shop.tools(), checkpointer=saver, ledger=ledger
                )  # turn 1 is the child's
                ai, requests, rows, result = resumed(agent, ledger, answer)
        else:

            async def main() -> Any:
                async with Persistence(db_url).acheckpointer() as saver:
                    agent = build_agent(
                        model(refunds(2)), shop.tools(), checkpointer=saver, ledger=ledger
                    )
                    return await aresumed(agent, ledger, answer)

            ai, requests, rows, result = asyncio.run(main())
        assert len(ai.tool_calls) == 2
        primary = ai.tool_calls[0]["id"]
        # "did this happen?" about the primary only: its repeat never started
        assert [(r["tool_call_id"], r.get("kind")) for r in requests] == [
            (primary, "outcome_unknown")
        ]
        assert rows == [(primary, "started")]
        settled = "completed" if answer == "approve" else "failed"
        assert ledger.run(claimed("t1")) == [(primary, settled)]  # the repeat: no row
    finally:
        ledger.close()
    status = "success" if answer == "approve" else "rejected"
    assert result["outcome"]["terminated_reason"] == (
        "completed" if answer == "approve" else "rejected"
    )
    assert shop.refunded == []  # nothing ran again on resume: not the primary, not its repeat
    assert effects.read_text().splitlines() == ["refund"]
    assert_shared(result["messages"], ai, status)
    assert json.dumps(answers(result["messages"], ai)[1].response_metadata) == json.dumps(
        {"keel_status": status, "keel_duplicate_of": primary}
    )


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_sigkill_after_the_primary_ran_then_a_new_message_answers_the_repeat_as_its_primary(
    driver: str, db_url: str, tmp_path: Path, forks: ForkServer
) -> None:
    """Killed right after the first refund; the next task is a new message, not a resume. The
    primary is answered "outcome unknown"; its repeat was never claimed, so it was answered
    "Not run: ... keel does not run it now" beside it, and the model read that one of two
    refunds did not happen (and asked for it again). It follows its primary's answer."""
    effects = killed_after_the_primary(forks, driver, db_url, tmp_path)
    shop = Shop()
    ledger = Ledger(db_url)
    try:
        with Persistence(db_url).checkpointer() as saver:
            agent = build_agent(
                ScriptedChatModel(script=["(the killed turn)", "Noted."], fresh_ids=True),
                shop.tools(),
                checkpointer=saver,
                ledger=ledger,
            )
            result = agent.invoke({"messages": [("user", "anything else?")]}, THREAD, context=CTX)
    finally:
        ledger.close()
    assert result["outcome"]["terminated_reason"] == "completed", result["outcome"]
    assert shop.refunded == []
    assert effects.read_text().splitlines() == ["refund"]
    ai = last_turn(result["messages"])
    first, repeat = answers(result["messages"], ai)
    assert first.text.startswith("Outcome unknown: this call started")
    assert repeat.text == REPEATS.format(first.tool_call_id) + first.text
    assert repeat.response_metadata == {
        "keel_status": "not_run",
        "keel_duplicate_of": first.tool_call_id,
    }


# -- LangChain's create_agent with keel's PermissionMiddleware ------------------------------


def middleware_agent(script: AIMessage, action: str, shop: Shop) -> Any:
    return create_agent(
        model(script),
        shop.tools(),
        middleware=[PermissionMiddleware(policy(action))],
        context_schema=RunContext,
        checkpointer=InMemorySaver(),
    )


@pytest.mark.parametrize("action", ["allow", "ask"])
def test_permission_middleware_runs_a_repeated_call_once_and_asks_once(action: str) -> None:
    """`create_agent` runs each call as its own task: the repeat cannot share the first call's
    result, so it is answered `not_run` pointing to it, and never asked about nor run."""
    shop = Shop()
    agent = middleware_agent(refunds(3), action, shop)
    result = agent.invoke({"messages": [("user", "refund A1")]}, THREAD, context=CTX)
    if action == "ask":
        assert [i.value["tool_call_id"] for i in result["__interrupt__"]] == [
            last_turn(result["messages"]).tool_calls[0]["id"]
        ]  # one approval, not three
        result = agent.invoke(Command(resume={"type": "approve"}), THREAD, context=CTX)
    assert shop.refunded == [REFUND]
    first, *rest = answers(result["messages"], last_turn(result["messages"]))
    assert first.status == "success" and first.text == "refund #1: 10 on A1"
    for repeat in rest:
        assert repeat.response_metadata == {
            "keel_status": "not_run",
            "keel_duplicate_of": first.tool_call_id,
        }
        assert f"repeats call {first.tool_call_id}" in repeat.text


async def test_permission_middleware_runs_calls_with_other_arguments_and_reads_async() -> None:
    shop = Shop()
    other = {**REFUND, "amount": 11}
    script = turn(
        ("issue_refund", REFUND), ("issue_refund", other),
        ("lookup_order", {"order_id": "A1"}), ("lookup_order", {"order_id": "A1"}),
    )  # fmt: skip
    agent = middleware_agent(script, "allow", shop)
    result = await agent.ainvoke({"messages": [("user", "refund")]}, THREAD, context=CTX)
    assert shop.refunded == [REFUND, other]
    replies = answers(result["messages"], last_turn(result["messages"]))
    assert [m.status for m in replies] == ["success"] * 4
    assert not any("keel_duplicate_of" in m.response_metadata for m in replies)
