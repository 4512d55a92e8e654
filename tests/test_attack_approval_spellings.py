"""Attacks on approvals and the loop guard (README) with the arguments spelled anew.

A model may spell the same arguments several ways: `10.0` or `"10"` for an `int` 10, an
optional argument sent as its default. The tool reads them all the same, and so do the
duplicate check and the ledger (`keel.tools._args.as_called`); approvals and the loop guard
compared the arguments as spelled:

- a refund a human rejected, asked again as `amount=10.0`, was asked about again (the
  reviewer could approve, under another spelling, what they had rejected) instead of being
  answered `rejected` at once;
- a `same_args` standing approval did not cover another spelling of its arguments;
- a model alternating `amount=1`, `1.0` and `"1"` slipped past `max_repeats`.

Decisions are now stored under a digest of the arguments as the tool reads them, marked as
such, so that no spelling makes an approval cover other arguments (a tool whose schema is not
idempotent: `as_called` of one call may be another call's spelling); a decision keel stored
before, under the arguments as spelled (a thread paused across the upgrade, a user's standing
approval in the ledger), still answers the very same spelling.

Real parts: SQLite files and PostgreSQL (checkpointer and ledger); the model is keel's
`ScriptedChatModel` minting fresh tool-call ids, as real models do.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import pytest
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, ToolCall, ToolMessage
from langgraph.checkpoint.base import copy_checkpoint
from langgraph.checkpoint.base.id import uuid6
from langgraph.types import Command
from pydantic import AfterValidator

from keel import Ledger, Persistence, RunContext, RunLog, build_agent, tool
from keel.approvals import Grants, RunGrants, approval_digest
from keel.evals import ScriptedChatModel
from keel.guards import LoopGuardMiddleware, LoopPolicy, Policy, Rule
from keel.guards.standing import PREFIX, StandingStore

CTX = RunContext(user_id="u1", roles=("support",))
POLICY = Policy(
    name="support",
    rules=(
        Rule(role="support", tool="issue_refund", action="ask", reason="refunds need a human"),
        Rule(role="support", tool="charge", action="ask", reason="charges need a human"),
        Rule(role="support", action="allow"),
    ),
)
P = "support@1"
REFUND = {"order_id": "A1", "amount": 10}
SAME_REFUND = [
    {"order_id": "A1", "amount": 10.0},  # a float the schema reads as the int 10
    {"order_id": "A1", "amount": "10"},  # a number sent as text, as sloppy models do
    {"amount": 10, "order_id": "A1", "note": None},  # an optional argument sent as its default
]
SPELLINGS = ["float", "text", "default-sent"]


def turn(*calls: tuple[str, dict[str, Any]]) -> AIMessage:
    """One model turn asking for `calls` (ids minted by the model: `fresh_ids=True`)."""
    return AIMessage(
        content="", tool_calls=[ToolCall(name=n, args=dict(a), id=None) for n, a in calls]
    )


class Shop:
    """The outside world: every refund and charge that really ran."""

    def __init__(self) -> None:
        self.done: list[tuple[str, str, int]] = []

    def tools(self) -> list[Any]:
        @tool(risk="destructive")  # asks a human under keel's default gate too
        def issue_refund(order_id: str, amount: int, note: str | None = None) -> str:
            """Refund an order."""
            self.done.append(("refund", order_id, amount))
            return f"refunded {amount} on {order_id}"

        @tool(risk="write")
        def charge(order_id: str, amount: Annotated[int, AfterValidator(lambda v: v * 100)]) -> str:
            """Charge an order: dollars in, the tool reads cents."""
            self.done.append(("charge", order_id, amount))
            return f"charged {amount} cents on {order_id}"

        return [issue_refund, charge]


@contextmanager
def agents(
    db_url: str,
    shop: Shop,
    ledger: Ledger | None,
    *scripts: list[Any],
    policy: Policy | None = POLICY,
) -> Iterator[Any]:
    """One agent per script, on one checkpointer (a new thread's turns count from its first).

    `policy=None`: keel's default gate (a destructive tool asks), decided in `call_model`
    (no `tool_gate` node)."""
    with Persistence(db_url).checkpointer() as saver:
        yield [
            build_agent(
                ScriptedChatModel(script=script, fresh_ids=True),
                shop.tools(),
                policy=policy,
                checkpointer=saver,
                ledger=ledger,
            )
            for script in scripts
        ]


@contextmanager
def agent_for(
    db_url: str,
    script: list[Any],
    shop: Shop,
    ledger: Ledger | None = None,
    policy: Policy | None = POLICY,
) -> Iterator[Any]:
    with agents(db_url, shop, ledger, script, policy=policy) as (agent,):
        yield agent


def ask(agent: Any, text: str, thread: str = "t") -> dict[str, Any]:
    config = {"configurable": {"thread_id": thread}}
    result: dict[str, Any] = agent.invoke({"messages": [("user", text)]}, config, context=CTX)
    return result


def answer(agent: Any, resume: Any, thread: str = "t") -> dict[str, Any]:
    config = {"configurable": {"thread_id": thread}}
    result: dict[str, Any] = agent.invoke(Command(resume=resume), config, context=CTX)
    return result


def last_reply(result: dict[str, Any]) -> ToolMessage:
    return [m for m in result["messages"] if isinstance(m, ToolMessage)][-1]


# -- a rejected call asked again under another spelling -----------------------------------------


@pytest.mark.parametrize("gate", ["policy", "default"])
@pytest.mark.parametrize("spelled", SAME_REFUND, ids=SPELLINGS)
def test_a_rejected_refund_asked_again_spelled_anew_is_answered_rejected_at_once(
    spelled: dict[str, Any], gate: str, db_url: str, ledger: Ledger
) -> None:
    """README: a call a human rejected stays rejected without asking again, and the run does
    not pause for it. The model asked again for the refund of 10 spelled `10.0` (or `"10"`,
    or with its default sent): the reviewer was asked again, and could approve what they had
    rejected. With a policy's rules (`tool_gate` decides) and keel's default gate (no policy:
    `call_model` decides)."""
    shop = Shop()
    script = [turn(("issue_refund", REFUND)), "ok", turn(("issue_refund", spelled)), "done"]
    policy = POLICY if gate == "policy" else None
    with agent_for(db_url, script, shop, ledger, policy=policy) as agent:
        assert ask(agent, "refund A1")["outcome"]["status"] == "interrupted"
        rejected = answer(agent, {"type": "reject", "message": "no refunds for A1"})
        assert rejected["outcome"]["terminated_reason"] == "rejected"
        again = ask(agent, "please, refund A1")
        assert "__interrupt__" not in again, "the reviewer was asked again"
        assert again["outcome"]["terminated_reason"] == "completed"
        reply = last_reply(again)
        assert reply.response_metadata["keel_status"] == "rejected"
        assert reply.content == "Rejected by a human reviewer; issue_refund was not run."
    assert shop.done == []
    # no human was asked, so the run never paused (the gate did not route the call to a
    # human_review that then answered it from the rejection): its record has no interrupt
    runs = [r for r in RunLog(ledger).query() if r.thread_id == "t"]
    assert [r.interrupts for r in runs] == [1, 0]


@pytest.mark.parametrize("spelled", SAME_REFUND, ids=SPELLINGS)
def test_a_review_asks_only_about_the_new_call_beside_a_rejected_one_spelled_anew(
    spelled: dict[str, Any], db_url: str
) -> None:
    """A turn that asks again for the rejected refund (spelled anew) beside a new refund: the
    reviewer is asked about the new one only; the rejected one is answered `rejected`."""
    shop = Shop()
    new = {"order_id": "B2", "amount": 5}
    both = turn(("issue_refund", spelled), ("issue_refund", new))
    script = [turn(("issue_refund", REFUND)), "ok", both, "done"]
    with agent_for(db_url, script, shop) as agent:
        ask(agent, "refund A1")
        answer(agent, {"type": "reject"})
        paused = ask(agent, "refund A1 and B2")
        asked = [r["action_request"]["args"] for r in paused["__interrupt__"][0].value]
        assert asked == [new], "the reviewer was asked again about the rejected refund"
        done = answer(agent, [{"type": "approve"}])
    replies = [m for m in done["messages"] if isinstance(m, ToolMessage)][-2:]
    assert [m.response_metadata["keel_status"] for m in replies] == ["rejected", "success"]
    assert shop.done == [("refund", "B2", 5)]


# -- standing approvals: the same arguments spelled anew, and other arguments -------------------


@pytest.mark.parametrize("scope", ["thread", "user"])
@pytest.mark.parametrize("spelled", SAME_REFUND, ids=SPELLINGS)
def test_a_same_args_standing_approval_covers_another_spelling_and_nothing_else(
    spelled: dict[str, Any], scope: str, db_url: str, ledger: Ledger
) -> None:
    """A `same_args` standing approval of the refund of 10 asked again for the same refund
    spelled anew (the tool reads the same call); it still asks for a refund of 11."""
    shop = Shop()
    other = {"order_id": "A1", "amount": "11"}
    first = [turn(("issue_refund", REFUND)), "ok"]
    later = [turn(("issue_refund", spelled)), "ok again", turn(("issue_refund", other)), "done"]
    # a user's standing approval holds in their other threads: ask there (a second agent, its
    # script counting the new thread's turns)
    scripts, thread = ([first + later], "t") if scope == "thread" else ([first, later], "t2")
    with agents(db_url, shop, ledger, *scripts) as found:
        agent = found[0]
        ask(agent, "refund A1")
        always = {"same_args": True, "ttl_seconds": 600, "scope": scope}
        answer(agent, {"type": "approve", "always": always})
        assert shop.done == [("refund", "A1", 10)]
        agent = found[-1]
        again = ask(agent, "refund A1 once more", thread=thread)
        assert "__interrupt__" not in again, "asked again for the same arguments"
        assert shop.done == [("refund", "A1", 10)] * 2
        paused = ask(agent, "and refund 11", thread=thread)
        assert paused["outcome"]["status"] == "interrupted"
        (request,) = paused["__interrupt__"][0].value
        assert request["action_request"]["args"] == other
    assert shop.done == [("refund", "A1", 10)] * 2


def test_no_spelling_makes_a_same_args_approval_cover_other_arguments(db_url: str) -> None:
    """A tool whose schema changes what it reads (`charge` reads dollars as cents: 1 is 100):
    the arguments as it reads one call (`amount=100`) are another call's spelling, which it
    reads as 10000. A `same_args` approval of the charge of 1 must not cover the charge of 100
    (a digest of the arguments as read, unmarked, equals the digest keel stored for that
    spelling before, which it still honours)."""
    shop = Shop()
    one, hundred = {"order_id": "A1", "amount": 1}, {"order_id": "A1", "amount": 100}
    script = [turn(("charge", one)), "ok", turn(("charge", hundred)), "done"]
    with agent_for(db_url, script, shop) as agent:
        ask(agent, "charge A1 a dollar")
        answer(agent, {"type": "approve", "always": {"same_args": True}})
        assert shop.done == [("charge", "A1", 100)]
        paused = ask(agent, "charge A1 a hundred dollars")
        assert paused["outcome"]["status"] == "interrupted"
        (request,) = paused["__interrupt__"][0].value
        assert request["action_request"]["args"] == hundred
    assert shop.done == [("charge", "A1", 100)]


# -- decisions keel stored before, under the arguments as spelled -------------------------------


def spelled_digest(args: dict[str, Any]) -> str:
    """The digest keel stored a decision on `issue_refund(**args)` under before this fix."""
    return approval_digest("issue_refund", args, P, version="1")


def test_a_users_standing_approval_stored_before_still_covers_its_spelling(
    db_url: str, ledger: Ledger
) -> None:
    """A user-scoped `same_args` standing approval in the ledger, under the digest of the
    arguments as spelled (keel before this fix), still allows that exact call."""
    key = PREFIX + spelled_digest(REFUND)
    record: Any = {
        "digest": key.removeprefix(PREFIX),
        "tool": "issue_refund",
        "tool_call_id": "c0",
        "decision": "approved",
        "expires_at": time.time() + 600,
        "scope": "user",
    }
    StandingStore(ledger).save(CTX, {key: record})
    shop = Shop()
    script = [turn(("issue_refund", REFUND)), "done"]
    with agent_for(db_url, script, shop, ledger) as agent:
        done = ask(agent, "refund A1")
    assert "__interrupt__" not in done, "the standing approval kept in the ledger was not read"
    assert shop.done == [("refund", "A1", 10)]


def spelled_as_before(
    saver: Any, thread: str, args: dict[str, Any], sealer: RunGrants | None = None
) -> None:
    """Store the thread's decisions as keel did before this fix: under the digest of `args`
    as spelled (an approval sealed anew by `sealer`, as keel sealed it then). A new checkpoint
    through the checkpointer, as an older keel would have saved."""
    config = {"configurable": {"thread_id": thread, "checkpoint_ns": ""}}
    saved = saver.get_tuple(config)
    checkpoint = copy_checkpoint(saved.checkpoint)
    old = spelled_digest(args)
    approvals = {}
    for key, decision in checkpoint["channel_values"]["approvals"].items():
        digest = decision["digest"]
        record = {k: v for k, v in decision.items() if k != "seal"} | {"digest": old}
        moved = key.replace(digest, old)
        approvals[moved] = sealer.seal(moved, record) if sealer is not None else record
    assert approvals
    checkpoint["channel_values"]["approvals"] = approvals
    version = saver.get_next_version(checkpoint["channel_versions"].get("approvals"), None)
    checkpoint["channel_versions"]["approvals"] = version
    checkpoint["id"] = str(uuid6(clock_seq=-1))
    saver.put(saved.config, checkpoint, saved.metadata, {"approvals": version})


def test_a_rejection_stored_before_still_answers_the_same_call(db_url: str) -> None:
    """A thread whose rejection keel stored under the arguments as spelled: the same call,
    asked again after the upgrade, is still answered `rejected` without asking."""
    shop = Shop()
    script = [turn(("issue_refund", REFUND)), "ok", turn(("issue_refund", REFUND)), "done"]
    with Persistence(db_url).checkpointer() as saver:
        model = ScriptedChatModel(script=script, fresh_ids=True)
        agent = build_agent(model, shop.tools(), policy=POLICY, checkpointer=saver)
        ask(agent, "refund A1")
        answer(agent, {"type": "reject"})
        spelled_as_before(saver, "t", REFUND)
        again = ask(agent, "please, refund A1")
    assert "__interrupt__" not in again, "the rejection stored before was not read"
    assert last_reply(again).response_metadata["keel_status"] == "rejected"
    assert shop.done == []


def test_an_approval_stored_before_still_runs_its_call(db_url: str) -> None:
    """A thread paused across the upgrade right after a human approved the refund (a
    breakpoint before `execute_tools`; the approval keel stored under the arguments as
    spelled): the call runs with the arguments approved, and is not refused for want of one."""
    shop = Shop()
    secret = "s" * 32
    config = {"configurable": {"thread_id": "t"}}
    with Persistence(db_url).checkpointer() as saver:
        model = ScriptedChatModel(script=[turn(("issue_refund", REFUND)), "done"], fresh_ids=True)
        agent = build_agent(
            model, shop.tools(), policy=POLICY, checkpointer=saver, approval_secret=secret
        )
        ask(agent, "refund A1")
        approve = Command(resume={"type": "approve"})
        agent.invoke(approve, config, context=CTX, interrupt_before=["execute_tools"])
        assert shop.done == []
        spelled_as_before(saver, "t", REFUND, Grants.from_secret(secret).for_run("t", CTX))
        done = agent.invoke(None, config, context=CTX)
    assert last_reply(done).response_metadata["keel_status"] == "success"
    assert shop.done == [("refund", "A1", 10)]


# -- the loop guard -------------------------------------------------------------------------------


LOOKUPS = [
    {"order_id": "A1", "page": 1},
    {"order_id": "A1", "page": 1.0},
    {"order_id": "A1", "page": "1"},
]
LOOPING = 'look_up was called 3 times in a row with the same arguments {"order_id":"A1","page":1}'


def lookup_tools(ran: list[int]) -> list[Any]:
    @tool
    def look_up(order_id: str, page: int = 1) -> str:
        """Look an order up."""
        ran.append(page)
        return f"order {order_id}, page {page}: shipped"

    return [look_up]


@pytest.mark.parametrize("on_loop", ["stop", "wrap_up"])
def test_the_loop_guard_reads_arguments_as_the_tool_does(on_loop: str, db_url: str) -> None:
    """The model asks for the same lookup three times, spelled `1`, `1.0` and `"1"`: three
    identical calls, a loop (`max_repeats=3`), not three different ones. `stop` is decided
    by `tool_gate`, `wrap_up` by `call_model` (a tool-free answer instead of the third)."""
    ran: list[int] = []
    script: list[Any] = [turn(("look_up", a)) for a in LOOKUPS] + ["done"] * 3
    loop = LoopPolicy(on_loop=on_loop)  # type: ignore[arg-type]
    policy = Policy(rules=(Rule(action="allow"),), loop=loop)
    with Persistence(db_url).checkpointer() as saver:
        model = ScriptedChatModel(script=script, fresh_ids=True)
        agent = build_agent(model, lookup_tools(ran), policy=policy, checkpointer=saver)
        final = ask(agent, "where is A1?")
    detail = LOOPING if on_loop == "stop" else f"{LOOPING}; answered without tools"
    assert final["outcome"] == {
        "status": "stopped",
        "terminated_reason": "loop_detected",
        "detail": detail,
    }
    assert ran == [1, 1]


async def test_the_loop_guard_middleware_reads_arguments_as_the_tool_does() -> None:
    """`LoopGuardMiddleware` on `create_agent`: the same spellings are one call, a loop."""
    ran: list[int] = []
    script: list[Any] = [turn(("look_up", a)) for a in LOOKUPS] + ["done"]
    model = ScriptedChatModel(script=script, fresh_ids=True)
    agent = create_agent(
        model, lookup_tools(ran), middleware=[LoopGuardMiddleware(LoopPolicy(on_loop="stop"))]
    )
    final = await agent.ainvoke({"messages": [("user", "where is A1?")]})
    last = final["messages"][-1]
    assert last.response_metadata["keel_outcome"]["detail"] == LOOPING
    assert ran == [1, 1]
