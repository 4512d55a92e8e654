"""Side effects at most once: the idempotency ledger, on SQLite and PostgreSQL.

A "crash" here is a tool that raises `Crash` (a `BaseException` keel never catches)
after its effect: the run dies, the ledger row stays `started`, exactly as after a SIGKILL
(`tests/test_crash.py` kills real processes).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import pytest
from langchain_core.messages import AIMessage, ToolCall, ToolMessage
from langgraph.types import Command

from keel import AuditLog, Ledger, Persistence, RunContext, build_agent, tool
from keel.db.idempotency import claim_flow, finish_flow, records_flow, resolve_flow
from keel.errors import UserError
from keel.evals.scripted import ScriptedChatModel, call
from keel.guards import BreakerPolicy, CircuitBreaker, Policy, Rule
from keel.guards.resilience import ToolGuard
from keel.nodes.human_review import SETTLED_KEY

CTX = RunContext(user_id="u1")


class Crash(BaseException):
    """The process "dies": nothing after this point runs."""


class World:
    """The outside world a side-effecting tool changes: a list of effects."""

    def __init__(self) -> None:
        self.effects: list[str] = []
        self.crash_next = False

    def charge(self, amount: int) -> str:
        self.effects.append(f"charged {amount}")
        if self.crash_next:
            self.crash_next = False
            raise Crash  # the process "dies" after the effect, before the record
        return f"charged {amount} (#{len(self.effects)})"


def charge_tool(world: World, **spec: Any) -> Any:
    @tool(risk="write", **spec)
    def charge(amount: int) -> str:
        """Charge the customer."""
        return world.charge(amount)

    return charge


def agent_for(
    world: World, saver: Any, ledger: Ledger | None, *, fresh_ids: bool = True, **spec: Any
) -> Any:
    model = ScriptedChatModel(script=[call("charge", amount=5), "Done."], fresh_ids=fresh_ids)
    return build_agent(model, [charge_tool(world, **spec)], checkpointer=saver, ledger=ledger)


@contextmanager
def stack(db_url: str) -> Iterator[tuple[Any, Ledger]]:
    ledger = Ledger(db_url)
    try:
        with Persistence(db_url).checkpointer() as saver:
            yield saver, ledger
    finally:
        ledger.close()


@asynccontextmanager
async def astack(db_url: str) -> AsyncIterator[tuple[Any, Ledger]]:
    ledger = Ledger(db_url)
    try:
        async with Persistence(db_url).acheckpointer() as saver:
            yield saver, ledger
    finally:
        await ledger.aclose()


def thread(name: str) -> dict[str, Any]:
    return {"configurable": {"thread_id": name}}


def tool_messages(state: dict[str, Any]) -> list[ToolMessage]:
    return [m for m in state["messages"] if isinstance(m, ToolMessage)]


# -- the flows ------------------------------------------------------------------------------


def test_claim_states(db_url: str) -> None:
    ledger = Ledger(db_url)
    try:
        key = ("t", "c1", "charge", "d1")
        assert ledger.run(claim_flow(*key)).action == "run"
        again = ledger.run(claim_flow(*key))
        assert again.action == "unknown" and again.record is not None
        assert again.record.state == "started" and again.record.attempts == 1
        assert ledger.run(claim_flow("t", "c1", "charge", "other")).action == "conflict"
        rerun = ledger.run(claim_flow(*key, rerun_unknown=True))
        assert rerun.action == "run"
        ledger.run(finish_flow("t", "c1", "completed", {"content": "ok", "keel_status": "success"}))
        done = ledger.run(claim_flow(*key))
        assert done.action == "recorded" and done.record is not None
        assert done.record.result == {"content": "ok", "keel_status": "success"}
        assert done.record.attempts == 2 and done.record.finished_at is not None
        # a settled call is not settled twice (a re-run of human_review after a crash)
        assert ledger.run(resolve_flow("t", "c1", "cleared")) is False
        assert set(ledger.run(records_flow("t", ["c1", "nope"]))) == {"c1"}
    finally:
        ledger.close()


@pytest.mark.parametrize(
    "known", [None, ("c0", "c1", "c2")], ids=["first-statement-insert", "orphan-check"]
)
def test_an_open_breaker_refuses_only_a_claim_that_would_run(db_url: str, known: Any) -> None:
    """The tool breaker is the claim's gate: open, a call that would run is refused and nothing
    is written (a later claim may run it); a call the ledger answers from its record, or one
    in doubt, is answered as before; cooled down, the claim half-opens the breaker with it."""
    ledger = Ledger(db_url)
    clock = [1000.0]
    breaker = CircuitBreaker(
        ledger, BreakerPolicy(failure_threshold=1, cooldown_seconds=30), clock=lambda: clock[0]
    )
    guard = ToolGuard(breaker)
    try:
        done = ("t", "c0", "charge", "d0")
        assert ledger.run(claim_flow(*done)).action == "run"
        ledger.run(finish_flow("t", "c0", "completed", {"content": "ok", "keel_status": "success"}))
        doubt = ("t", "c2", "charge", "d2")
        assert ledger.run(claim_flow(*doubt)).action == "run"  # started, never finished
        breaker.record("tool:charge", ok=False)  # opens at t=1000
        clock[0] = 1010.0

        fresh = ("t", "c1", "charge", "d1")
        refused = ledger.run(claim_flow(*fresh, known=known, gate=guard.gate("charge")))
        assert refused.action == "refused" and refused.refusal is not None
        assert (
            "charge is unavailable" in refused.refusal
            and "open for another 20 s" in refused.refusal
        )
        assert set(ledger.run(records_flow("t", ["c1"]))) == set()  # nothing claimed
        recorded = ledger.run(claim_flow(*done, known=known, gate=guard.gate("charge")))
        assert recorded.action == "recorded"
        unknown = ledger.run(claim_flow(*doubt, known=known, gate=guard.gate("charge")))
        assert unknown.action == "unknown"
        rerun = ledger.run(claim_flow(*doubt, rerun_unknown=True, gate=guard.gate("charge")))
        assert rerun.action == "refused"
        assert ledger.run(records_flow("t", ["c2"]))["c2"].attempts == 1  # not started again

        clock[0] = 1031.0  # cooled down: the claim runs, and half-opens the breaker with it
        claimed = ledger.run(claim_flow(*fresh, known=known, gate=guard.gate("charge")))
        assert claimed.action == "run"
        assert breaker.state("tool:charge").state == "half_open"
        assert set(ledger.run(records_flow("t", ["c1"]))) == {"c1"}
    finally:
        ledger.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_an_open_tool_breaker_leaves_a_side_effecting_call_unclaimed(
    db_url: str, mode: str
) -> None:
    """In a run: the call is answered `unavailable`, the tool never runs, the ledger holds no
    row for it (so a resume or replay may run it once the breaker closes), and the run goes on."""
    world = World()
    ledger = Ledger(db_url)
    policy = Policy(rules=(Rule(action="allow"),), tool_breaker=BreakerPolicy(failure_threshold=1))
    CircuitBreaker(ledger, policy.tool_breaker).record("tool:charge", ok=False)
    model = ScriptedChatModel(script=[call("charge", amount=5), "Could not charge."])
    task, config = {"messages": [("user", "charge")]}, {"configurable": {"thread_id": "t"}}
    if mode == "sync":
        with Persistence(db_url).checkpointer() as saver:
            agent = build_agent(
                model, [charge_tool(world)], policy=policy, ledger=ledger, checkpointer=saver
            )
            result = agent.invoke(task, config, context=CTX)
    else:

        async def arun() -> Any:
            async with Persistence(db_url).acheckpointer() as saver:
                agent = build_agent(
                    model, [charge_tool(world)], policy=policy, ledger=ledger, checkpointer=saver
                )
                try:
                    return await agent.ainvoke(task, config, context=CTX)
                finally:
                    await ledger.aclose()  # its async pool belongs to this loop

        result = asyncio.run(arun())
    (reply,) = [m for m in result["messages"] if isinstance(m, ToolMessage)]
    assert reply.response_metadata["keel_status"] == "unavailable"
    assert world.effects == []
    ledger.close()  # (closed already under ainvoke: its async pool belonged to that loop)
    after = Ledger(db_url)
    assert after.run(records_flow("t", [reply.tool_call_id])) == {}
    after.close()
    assert result["outcome"]["terminated_reason"] == "completed"


async def test_concurrent_claims_run_once(db_url: str) -> None:
    ledger = Ledger(db_url)
    try:
        claims = await asyncio.gather(
            *(ledger.arun(claim_flow("t", "c1", "charge", "d")) for _ in range(8))
        )
        assert sorted(c.action for c in claims) == ["run"] + ["unknown"] * 7
    finally:
        await ledger.aclose()


@pytest.mark.parametrize("breaker_open", [True, False], ids=["open", "closed"])
async def test_concurrent_gated_claims_run_once_or_not_at_all(
    db_url: str, breaker_open: bool
) -> None:
    """Eight claims of one new call at once, each with the tool breaker as its gate: open, all
    are refused and no row is left; closed, one runs and the others find it started."""
    ledger = Ledger(db_url)
    breaker = CircuitBreaker(ledger, BreakerPolicy(failure_threshold=1, cooldown_seconds=600))
    if breaker_open:
        await breaker.arecord("tool:charge", ok=False)
    guard = ToolGuard(breaker)
    try:
        claims = await asyncio.gather(
            *(
                ledger.arun(
                    claim_flow("t", "c1", "charge", "d", known=(), gate=guard.gate("charge"))
                )
                for _ in range(8)
            )
        )
        actions = sorted(c.action for c in claims)
        rows = await ledger.arun(records_flow("t", ["c1"]))
        if breaker_open:
            assert actions == ["refused"] * 8 and rows == {}
        else:
            assert actions == ["run"] + ["unknown"] * 7 and rows["c1"].attempts == 1
    finally:
        await ledger.aclose()


# -- the agent ------------------------------------------------------------------------------


def test_crash_after_the_effect_asks_did_this_happen(db_url: str) -> None:
    world = World()
    world.crash_next = True
    with stack(db_url) as (saver, ledger):
        agent = agent_for(world, saver, ledger)
        with pytest.raises(Crash):
            agent.invoke({"messages": [("user", "pay")]}, thread("t1"), context=CTX)
        state = agent.invoke(None, thread("t1"), context=CTX)  # resume after the "crash"
        assert world.effects == ["charged 5"]  # not repeated
        assert state["outcome"]["status"] == "interrupted"
        [request] = state["__interrupt__"][0].value
        assert request["kind"] == "outcome_unknown"
        assert request["action_request"] == {"action": "charge", "args": {"amount": 5}}
        assert request["description"].startswith("Did this happen? charge started at ")
        state = agent.invoke(Command(resume={"type": "approve"}), thread("t1"), context=CTX)
    assert world.effects == ["charged 5"]
    assert state["outcome"]["terminated_reason"] == "completed"
    [reply] = tool_messages(state)
    assert reply.content == "A human reviewer confirmed that charge took effect."
    assert reply.response_metadata == {"keel_status": "success", "keel_ledger": "recorded"}


@pytest.mark.parametrize(
    ("answer", "effects", "reason", "reply", "decision"),
    [
        ({"type": "run_again", "reviewer": "ops"}, 2, "completed", "charged 5 (#2)", "run_again"),
        (
            {"type": "reject", "message": "refunded by hand", "reviewer": "ops"},
            1,
            "rejected",
            "Rejected by a human reviewer: refunded by hand; charge was not run again.",
            "rejected",
        ),
        (
            {"type": "respond", "message": "charge id ch_9", "reviewer": "ops"},
            1,
            "completed",
            "charge id ch_9",
            "responded",
        ),
        (
            {"type": "approve", "reviewer": "ops"},
            1,
            "completed",
            "A human reviewer confirmed that charge took effect.",
            "approved",
        ),
    ],
    ids=["run_again", "reject", "respond", "approve"],
)
async def test_resolving_an_unknown_outcome(
    db_url: str, answer: dict[str, Any], effects: int, reason: str, reply: str, decision: str
) -> None:
    world = World()
    world.crash_next = True
    async with astack(db_url) as (saver, ledger):
        agent = agent_for(world, saver, ledger)
        with pytest.raises(Crash):
            await agent.ainvoke({"messages": [("user", "pay")]}, thread("t1"), context=CTX)
        state = await agent.ainvoke(None, thread("t1"), context=CTX)
        assert state["__interrupt__"][0].value[0]["kind"] == "outcome_unknown"
        state = await agent.ainvoke(Command(resume=answer), thread("t1"), context=CTX)
        assert len(world.effects) == effects
        assert state["outcome"]["terminated_reason"] == reason
        assert [m.content for m in tool_messages(state)] == [reply]
        # every answer is a human decision: audited once, the reviewer named
        (human,) = [r for r in await AuditLog(ledger).aquery() if r.kind == "approval"]
        assert (human.tool, human.decision, human.approver) == ("charge", decision, "ops")
        assert human.args == {"amount": 5}
        assert human.result == ("" if decision == "run_again" else reply)
        # what the audit read is no state channel: LangGraph drops it, nothing saves it
        assert SETTLED_KEY not in (await agent.aget_state(thread("t1"))).values
        # replaying the thread from its start runs nothing again
        history = [s async for s in agent.aget_state_history(thread("t1"))]
        first = history[-1].config
        await agent.ainvoke(None, first, context=CTX)
    assert len(world.effects) == effects


def test_edit_is_refused_for_an_unknown_outcome(tmp_path: Any) -> None:
    world = World()
    world.crash_next = True
    with stack(f"sqlite:///{tmp_path}/k.db") as (saver, ledger):
        agent = agent_for(world, saver, ledger)
        with pytest.raises(Crash):
            agent.invoke({"messages": [("user", "pay")]}, thread("t1"), context=CTX)
        agent.invoke(None, thread("t1"), context=CTX)
        with pytest.raises(UserError, match="cannot be edited: answer 'approve'"):
            agent.invoke(
                Command(resume={"type": "edit", "args": {"amount": 1}}), thread("t1"), context=CTX
            )


def test_replay_returns_the_recorded_result(db_url: str) -> None:
    world = World()
    with stack(db_url) as (saver, ledger):
        agent = agent_for(world, saver, ledger)
        state = agent.invoke({"messages": [("user", "pay")]}, thread("t1"), context=CTX)
        assert [m.content for m in tool_messages(state)] == ["charged 5 (#1)"]
        # time travel: re-execute from the checkpoint just before execute_tools ran
        before = next(
            s for s in agent.get_state_history(thread("t1")) if s.next == ("execute_tools",)
        )
        replayed = agent.invoke(None, before.config, context=CTX)
    assert world.effects == ["charged 5"]
    [reply] = tool_messages(replayed)
    assert reply.content == "charged 5 (#1)"
    assert reply.response_metadata["keel_ledger"] == "recorded"


def test_a_failed_call_is_recorded_and_not_retried(tmp_path: Any) -> None:
    attempts: list[int] = []

    @tool(risk="write")
    def charge(amount: int) -> str:
        """Charge the customer."""
        attempts.append(amount)
        raise RuntimeError("card declined")

    model = ScriptedChatModel(script=[call("charge", amount=5), "Sorry."])
    with stack(f"sqlite:///{tmp_path}/k.db") as (saver, ledger):
        agent = build_agent(model, [charge], checkpointer=saver, ledger=ledger)
        agent.invoke({"messages": [("user", "pay")]}, thread("t1"), context=CTX)
        before = next(
            s for s in agent.get_state_history(thread("t1")) if s.next == ("execute_tools",)
        )
        state = agent.invoke(None, before.config, context=CTX)
    assert attempts == [5]
    [reply] = tool_messages(state)
    assert reply.content == "Error: charge failed: RuntimeError: card declined"
    assert reply.status == "error"


def test_idempotent_tool_runs_again_after_a_crash(tmp_path: Any) -> None:
    world = World()
    world.crash_next = True
    with stack(f"sqlite:///{tmp_path}/k.db") as (saver, ledger):
        agent = agent_for(world, saver, ledger, idempotent=True)
        with pytest.raises(Crash):
            agent.invoke({"messages": [("user", "pay")]}, thread("t1"), context=CTX)
        state = agent.invoke(None, thread("t1"), context=CTX)
    assert world.effects == ["charged 5", "charged 5"]
    assert state["outcome"]["terminated_reason"] == "completed"


@pytest.mark.parametrize("happened", [True, False])
async def test_reconcile_settles_an_unknown_outcome(tmp_path: Any, happened: bool) -> None:
    world = World()
    world.crash_next = True
    seen: list[dict[str, Any]] = []

    async def reconcile(args: dict[str, Any]) -> str | None:
        seen.append(args)
        return "found charge of 5" if happened else None

    async with astack(f"sqlite:///{tmp_path}/k.db") as (saver, ledger):
        agent = agent_for(world, saver, ledger, reconcile=reconcile)
        with pytest.raises(Crash):
            await agent.ainvoke({"messages": [("user", "pay")]}, thread("t1"), context=CTX)
        state = await agent.ainvoke(None, thread("t1"), context=CTX)
    assert seen == [{"amount": 5}]
    assert state["outcome"]["terminated_reason"] == "completed"
    [reply] = tool_messages(state)
    assert reply.content == ("found charge of 5" if happened else "charged 5 (#2)")
    assert len(world.effects) == (1 if happened else 2)


def test_without_a_ledger_a_crash_repeats_the_effect(tmp_path: Any) -> None:
    """Pins LangGraph's own behaviour: a resumed node runs from its top, effects and all."""
    world = World()
    world.crash_next = True
    with Persistence(f"sqlite:///{tmp_path}/k.db").checkpointer() as saver:
        agent = agent_for(world, saver, None)
        with pytest.raises(Crash):
            agent.invoke({"messages": [("user", "pay")]}, thread("t1"), context=CTX)
        agent.invoke(None, thread("t1"), context=CTX)
    assert world.effects == ["charged 5", "charged 5"]


@pytest.mark.parametrize(
    "config",
    [
        None,
        {"configurable": {"thread_id": "t1"}},
    ],
    ids=["no-thread-id", "thread-id-without-checkpointer"],
)
def test_without_a_thread_every_run_makes_its_own_side_effect(db_url: str, config: Any) -> None:
    """No checkpointer: each run starts from nothing, and tool-call ids need not be unique (this
    model names its call `call_0_0` in every run, as some providers do). A ledger keyed without
    a thread would answer the second user's charge with the first user's recorded result."""
    world = World()
    ledger = Ledger(db_url)
    try:
        agent = agent_for(world, None, ledger, fresh_ids=False)  # call_0_0 in every run
        first = agent.invoke({"messages": [("user", "pay")]}, config, context=CTX)
        second = agent.invoke(
            {"messages": [("user", "pay")]}, config, context=RunContext(user_id="u2")
        )
        claimed = ledger.run(_claimed_rows())
    finally:
        ledger.close()
    assert world.effects == ["charged 5", "charged 5"]
    assert [m.content for m in tool_messages(first)] == ["charged 5 (#1)"]
    [reply] = tool_messages(second)
    assert reply.content == "charged 5 (#2)"
    assert reply.response_metadata == {"keel_status": "success"}
    assert claimed == 0, "without a thread there is nothing to resume: nothing is claimed"


def charges(*calls: tuple[int, str]) -> AIMessage:
    """A turn of `charge` calls under the ids the model chose."""
    return AIMessage(
        content="",
        tool_calls=[ToolCall(name="charge", args={"amount": a}, id=i) for a, i in calls],
    )


@pytest.mark.parametrize("amounts", [(5, 7), (5, 5)], ids=["other-args", "same-args"])
@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
async def test_two_calls_of_a_turn_under_one_id_each_run_once(
    db_url: str, mode: str, amounts: tuple[int, int]
) -> None:
    """A model names both charges of a turn `c1`. Keyed by `(thread, c1)`, the second was
    answered "conflict" (other arguments) or with the first one's result (the same), and both
    answers named `c1`. Renamed when the turn arrives, each is answered apart: with other
    arguments each runs once; with the same it is a repeat of the first (one charge, its answer
    shared: `keel.tools._duplicates`). A replay runs neither again."""
    world = World()
    first, second = amounts
    # the script's ids on purpose (a provider reusing one id): fresh ids would replace them
    model = ScriptedChatModel(
        script=[charges((first, "c1"), (second, "c1")), "Done."], fresh_ids=False
    )
    payload = {"messages": [("user", "pay twice")]}
    if mode == "invoke":
        with stack(db_url) as (saver, ledger):
            agent = build_agent(model, [charge_tool(world)], checkpointer=saver, ledger=ledger)
            state = agent.invoke(payload, thread("t1"), context=CTX)
            history = agent.get_state_history(thread("t1"))
            before = next(s for s in history if s.next == ("execute_tools",))
            replayed = agent.invoke(None, before.config, context=CTX)
    else:
        async with astack(db_url) as (saver, ledger):
            agent = build_agent(model, [charge_tool(world)], checkpointer=saver, ledger=ledger)
            state = await agent.ainvoke(payload, thread("t1"), context=CTX)
            history = [s async for s in agent.aget_state_history(thread("t1"))]
            before = next(s for s in history if s.next == ("execute_tools",))
            replayed = await agent.ainvoke(None, before.config, context=CTX)
    charged = {f"charged {first}", f"charged {second}"}  # the same charge twice is one
    assert sorted(world.effects) == sorted(charged)
    assert state["outcome"]["terminated_reason"] == "completed"
    request = next(m for m in state["messages"] if isinstance(m, AIMessage) and m.tool_calls)
    assert [tc["id"] for tc in request.tool_calls] == ["c1", "c1_2"]
    replies = tool_messages(state)
    assert [(m.tool_call_id, m.response_metadata["keel_status"]) for m in replies] == [
        ("c1", "success"),
        ("c1_2", "success"),
    ]
    assert [m.response_metadata.get("keel_duplicate_of") for m in replies] == [
        None,
        "c1" if first == second else None,
    ]
    again = tool_messages(replayed)
    assert [m.tool_call_id for m in again] == ["c1", "c1_2"]
    assert again[0].response_metadata.get("keel_ledger") == "recorded"
    if first == second:  # the repeat: the first one's recorded answer, shared
        assert again[1].response_metadata.get("keel_duplicate_of") == "c1"
        assert again[1].text == (
            "(This call repeats call c1 of the same turn: it did not run again. That call's "
            f"result:) {again[0].text}"
        )
    else:
        assert again[1].response_metadata.get("keel_ledger") == "recorded"


@pytest.mark.parametrize("amount", [7, 5], ids=["other-args", "same-args"])
def test_an_id_reused_in_a_later_task_of_the_thread_makes_its_own_call(
    db_url: str, amount: int
) -> None:
    """The model names its charge in the thread's second task `c1`, as in the first. The ledger
    answered it "conflict" (other arguments: not run) or with the first task's result (the
    same: not run, and reported as done). Renamed, it is a call of its own."""
    world = World()
    script = [charges((5, "c1")), "Done.", charges((amount, "c1")), "Done again."]
    with stack(db_url) as (saver, ledger):
        agent = build_agent(
            ScriptedChatModel(script=script, fresh_ids=False),  # reuses "c1" on purpose
            [charge_tool(world)],
            checkpointer=saver,
            ledger=ledger,
        )
        agent.invoke({"messages": [("user", "pay 5")]}, thread("t1"), context=CTX)
        state = agent.invoke({"messages": [("user", "pay again")]}, thread("t1"), context=CTX)
    assert world.effects == ["charged 5", f"charged {amount}"]
    replies = tool_messages(state)
    assert [(m.tool_call_id, m.content) for m in replies] == [
        ("c1", "charged 5 (#1)"),
        ("c1_2", f"charged {amount} (#2)"),
    ]
    assert replies[1].response_metadata == {"keel_status": "success"}


def _claimed_rows() -> Any:
    rows = yield ("SELECT COUNT(*) FROM keel_tool_calls", ())
    return rows[0][0]


def test_build_agent_rejects_a_bad_ledger() -> None:
    with pytest.raises(UserError, match=r"build_agent\(ledger=...\) must be a keel.Ledger"):
        build_agent(ScriptedChatModel(script=["hi"]), ledger="sqlite:///x.db")  # type: ignore[arg-type]


def test_sync_reconcile_under_invoke_and_async_reconcile_refused(tmp_path: Any) -> None:
    world = World()
    world.crash_next = True

    async def areconcile(args: dict[str, Any]) -> str | None:
        return None

    with stack(f"sqlite:///{tmp_path}/k.db") as (saver, ledger):
        agent = agent_for(world, saver, ledger, reconcile=lambda args: f"found {args['amount']}")
        with pytest.raises(Crash):
            agent.invoke({"messages": [("user", "pay")]}, thread("t1"), context=CTX)
        state = agent.invoke(None, thread("t1"), context=CTX)
        assert [m.content for m in tool_messages(state)] == ["found 5"]
        world.crash_next = True
        agent = agent_for(world, saver, ledger, reconcile=areconcile)
        with pytest.raises(Crash):
            agent.invoke({"messages": [("user", "pay")]}, thread("t2"), context=CTX)
        with pytest.raises(UserError, match=r"charge's reconcile is async; run the agent with"):
            agent.invoke(None, thread("t2"), context=CTX)
    assert world.effects == ["charged 5", "charged 5"]
