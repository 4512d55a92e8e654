"""Standing approvals: "always allow this tool (optionally with these args) in this thread".

The pure check first (expiry, exact arguments, policy binding, a rejection wins), then the
agent on SQLite and PostgreSQL checkpoints: a standing approval skips later reviews, a
`same_args` one asks again for other arguments, an expired one asks again, and a call a human
rejected never runs, standing approval or not.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest
from langchain_core.messages import ToolMessage
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.types import Command

from keel import AuditLog, Ledger, Persistence, RunContext, RunLog, UserError, build_agent, tool
from keel.approvals import approval_digest
from keel.evals import ScriptedChatModel, call
from keel.guards import Policy, Rule
from keel.guards.standing import Always, covering, standing_approval
from keel.state import Approval

SUPPORT = RunContext(user_id="u1", tenant_id="acme", roles=("support",))
POLICY = Policy(
    name="support",
    rules=(Rule(role="support", tool="issue_refund", action="ask", reason="refunds"),),
)
P = "support@1"

# -- the pure check ----------------------------------------------------------------------------


def test_a_tool_wide_standing_approval_covers_any_arguments_until_it_expires() -> None:
    key, record = standing_approval(
        Always(ttl_seconds=60), "refund", {"a": 1}, P, "c1", version="1", now=100
    )
    approvals = {key: record}
    assert record["expires_at"] == 160
    assert covering(approvals, "refund", {"a": 2}, P, version="1", now=159) == record
    assert covering(approvals, "refund", {"a": 2}, P, version="1", now=160) is None  # expired
    assert (
        covering(approvals, "refund", {"a": 2}, "support@2", version="1", now=120) is None
    )  # new policy
    assert covering(approvals, "other", {"a": 1}, P, version="1", now=120) is None


def test_a_same_args_standing_approval_covers_only_those_arguments() -> None:
    always = Always(ttl_seconds=60, same_args=True)
    key, record = standing_approval(
        always, "refund", {"a": 1, "b": 2}, P, "c1", version="1", now=100
    )
    assert covering({key: record}, "refund", {"b": 2, "a": 1}, P, version="1", now=120) == record
    assert covering({key: record}, "refund", {"a": 1, "b": 3}, P, version="1", now=120) is None


def test_a_rejection_of_the_exact_call_wins_over_a_standing_approval() -> None:
    key, record = standing_approval(Always(), "refund", {"a": 1}, P, "c1", version="1", now=100)
    digest = approval_digest("refund", {"a": 9}, P, version="1")
    rejected: Approval = {
        "digest": digest,
        "tool": "refund",
        "tool_call_id": "c0",
        "decision": "rejected",
    }
    approvals = {key: record, digest: rejected}
    assert covering(approvals, "refund", {"a": 9}, P, version="1", now=120) is None
    assert covering(approvals, "refund", {"a": 1}, P, version="1", now=120) == record


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"scope": "tenant"}, "'always.scope' must be 'thread' or 'user', got 'tenant'."),
        ({"ttl_seconds": 0}, "'always.ttl_seconds' must be a finite number > 0, got 0."),
        ({"same_args": "yes"}, "'always.same_args' must be true or false, got 'yes'."),
        (
            {"ttl": 5},
            "'always' must be true or {'scope': 'thread', 'ttl_seconds': 3600, "
            "'same_args': False}, got {'ttl': 5}.",
        ),
    ],
)
def test_always_is_validated(raw: Any, message: str) -> None:
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        Always.parse(raw)


# -- end to end --------------------------------------------------------------------------------


class Refunds:
    def __init__(self) -> None:
        self.done: list[tuple[str, float]] = []

    def tools(self) -> list[Any]:
        @tool(risk="write")
        def issue_refund(order_id: str, amount: float) -> str:
            """Refund an order."""
            self.done.append((order_id, amount))
            return f"refunded {amount:g} on {order_id}"

        return [issue_refund]


@contextmanager
def agent_for(
    db_url: str, script: list[Any], shop: Refunds, ledger: Ledger | None = None
) -> Iterator[Any]:
    saver: BaseCheckpointSaver[Any]
    with Persistence(db_url).checkpointer() as saver:
        model = ScriptedChatModel(script=script)
        yield build_agent(model, shop.tools(), policy=POLICY, checkpointer=saver, ledger=ledger)


def ask(agent: Any, text: str, thread: str = "t", who: RunContext = SUPPORT) -> dict[str, Any]:
    result: dict[str, Any] = agent.invoke(
        {"messages": [("user", text)]}, {"configurable": {"thread_id": thread}}, context=who
    )
    return result


def answer(agent: Any, resume: Any, thread: str = "t") -> dict[str, Any]:
    result: dict[str, Any] = agent.invoke(
        Command(resume=resume), {"configurable": {"thread_id": thread}}, context=SUPPORT
    )
    return result


def refund(order: str, amount: float) -> Any:
    return call("issue_refund", order_id=order, amount=amount)


def test_always_allow_skips_later_reviews_in_the_thread(db_url: str) -> None:
    shop = Refunds()
    script = [refund("A1", 10), refund("A2", 20), "done", refund("A3", 30), "done again"]
    with agent_for(db_url, script, shop) as agent:
        assert ask(agent, "refund A1 and A2")["outcome"]["status"] == "interrupted"
        done = answer(agent, {"type": "approve", "always": {"ttl_seconds": 600}})
        assert done["outcome"]["terminated_reason"] == "completed"
        assert shop.done == [("A1", 10), ("A2", 20)]  # A2 was not asked about
        later = ask(agent, "and A3")
        assert later["outcome"]["terminated_reason"] == "completed"
        assert shop.done == [("A1", 10), ("A2", 20), ("A3", 30)]
        # another thread asks again
        assert ask(agent, "refund A1", thread="other")["outcome"]["status"] == "interrupted"


def test_same_args_asks_again_for_other_arguments(db_url: str) -> None:
    shop = Refunds()
    script = [refund("A1", 10), refund("A1", 10), refund("A1", 99), "done"]
    with agent_for(db_url, script, shop) as agent:
        ask(agent, "refund A1")
        always = {"ttl_seconds": 600, "same_args": True}
        paused = answer(agent, {"type": "approve", "always": always})
        assert shop.done == [("A1", 10), ("A1", 10)]
        assert paused["outcome"]["status"] == "interrupted"
        (request,) = paused["__interrupt__"][0].value
        assert request["action_request"]["args"] == {"order_id": "A1", "amount": 99}


def test_an_expired_standing_approval_asks_again(tmp_path: Any) -> None:
    shop = Refunds()
    with agent_for(
        f"sqlite:///{tmp_path}/keel.db", [refund("A1", 1), "ok", refund("A2", 2)], shop
    ) as agent:
        ask(agent, "refund A1")
        answer(agent, {"type": "approve", "always": {"ttl_seconds": 0.2}})
        time.sleep(0.25)
        assert ask(agent, "refund A2")["outcome"]["status"] == "interrupted"
        assert shop.done == [("A1", 1)]


def test_a_rejected_call_never_runs_even_under_a_standing_approval(db_url: str) -> None:
    shop = Refunds()
    script = [refund("BIG", 5000), "ok", refund("A1", 10), refund("BIG", 5000), "done"]
    with agent_for(db_url, script, shop) as agent:
        ask(agent, "refund BIG")
        rejected = answer(agent, {"type": "reject", "message": "too large"})
        assert rejected["outcome"]["terminated_reason"] == "rejected"
        ask(agent, "then refund A1")
        final = answer(agent, {"type": "approve", "always": True})
        assert shop.done == [("A1", 10)]
        last = [m for m in final["messages"] if isinstance(m, ToolMessage)][-1]
        assert last.response_metadata["keel_status"] == "rejected"
        assert final["outcome"]["terminated_reason"] == "completed"


def test_always_goes_only_with_approve_or_edit(tmp_path: Any) -> None:
    shop = Refunds()
    with agent_for(f"sqlite:///{tmp_path}/keel.db", [refund("A1", 1), "ok"], shop) as agent:
        ask(agent, "refund A1")
        with pytest.raises(UserError, match=r"^'always' goes with an 'approve' or 'edit' response"):
            answer(agent, {"type": "reject", "always": True})
        done = answer(agent, {"type": "approve"})  # the bad answer did not stick
        assert done["outcome"]["terminated_reason"] == "completed"


# -- user scope: kept in the ledger ------------------------------------------------------------


def test_a_user_scoped_approval_holds_in_the_users_other_threads(db_url: str) -> None:
    shop = Refunds()
    ledger = Ledger(db_url)
    always = {"scope": "user", "ttl_seconds": 600}
    with agent_for(db_url, [refund("A1", 10), "ok"], shop, ledger) as agent:
        ask(agent, "refund A1", thread="first")
        answer(agent, {"type": "approve", "always": always}, thread="first")
        assert shop.done == [("A1", 10)]
        other = ask(agent, "refund A1 again", thread="second")  # a new thread, the same user
        assert other["outcome"]["terminated_reason"] == "completed"
        assert shop.done == [("A1", 10), ("A1", 10)]
        colleague = RunContext(user_id="u2", tenant_id="acme", roles=("support",))
        theirs = ask(agent, "refund A1", thread="third", who=colleague)
        assert theirs["outcome"]["status"] == "interrupted"  # not another user's approval
    ledger.close()


async def test_a_user_scoped_approval_async(db_url: str) -> None:
    shop = Refunds()
    ledger = Ledger(db_url)
    always = {"scope": "user", "ttl_seconds": 600}
    script = [refund("A1", 10), "ok"]
    async with Persistence(db_url).acheckpointer() as saver:
        agent = build_agent(
            ScriptedChatModel(script=script),
            shop.tools(),
            policy=POLICY,
            checkpointer=saver,
            ledger=ledger,
        )

        async def go(payload: Any, thread: str) -> dict[str, Any]:
            config = {"configurable": {"thread_id": thread}}
            out: dict[str, Any] = await agent.ainvoke(payload, config, context=SUPPORT)
            return out

        await go({"messages": [("user", "refund A1")]}, "first")
        await go(Command(resume={"type": "approve", "always": always}), "first")
        other = await go({"messages": [("user", "refund A1 again")]}, "second")
    assert other["outcome"]["terminated_reason"] == "completed"
    assert shop.done == [("A1", 10), ("A1", 10)]
    await ledger.aclose()


def test_a_user_scoped_approval_needs_the_ledger(tmp_path: Any) -> None:
    shop = Refunds()
    with agent_for(f"sqlite:///{tmp_path}/keel.db", [refund("A1", 1), "ok"], shop) as agent:
        ask(agent, "refund A1")
        with pytest.raises(UserError) as info:
            answer(agent, {"type": "approve", "always": {"scope": "user"}})
        assert str(info.value) == (
            "A standing approval with scope 'user' is kept in the ledger: pass "
            "build_agent(..., ledger=keel.Ledger(url)), or use scope 'thread'."
        )
        assert shop.done == []
        answer(agent, {"type": "approve"})  # the refused answer did not stick
        assert shop.done == [("A1", 1)]


def _served(thread: str, user: str, roles: list[str], owner: str | None = None) -> Any:
    """A run's config as LangGraph's server builds it under keel's auth (`keel.identity`).

    The authenticated user rides in `configurable` (LangGraph makes it `runtime.server_info`);
    the metadata is what keel's auth stamped: the thread's owner, and on a review run the
    reviewer.
    """
    who = SimpleNamespace(
        identity=user, tenant_id="acme", roles=roles, policy="support", permissions=[]
    )
    metadata = {"keel_tenant": "acme", "keel_owner": owner or user, "keel_roles": ["support"]}
    if owner is not None:
        metadata["keel_reviewer"] = user
    return {
        "configurable": {"thread_id": thread, "langgraph_auth_user": who},
        "metadata": metadata,
    }


def test_a_reviewers_standing_approval_stands_in_the_thread_they_answered(db_url: str) -> None:
    """Found by audit: a reviewer answering another user's thread could give a user-scoped
    standing approval, kept in the ledger in the owner's name (it allowed the tool in all the
    owner's threads, ones the reviewer never saw), and a standing approval named nobody as who
    gave it. A reviewer's stands in the thread they answered and names them."""
    shop = Refunds()
    ledger = Ledger(db_url)
    script = [refund("A1", 10), refund("A2", 20), "done", refund("A3", 30), "ok"]
    with agent_for(db_url, script, shop, ledger) as agent:
        agent.invoke({"messages": [("user", "refund A1 and A2")]}, _served("t", "u1", ["support"]))
        carol = _served("t", "carol", ["reviewer"], owner="u1")
        user_wide = {"type": "approve", "always": {"scope": "user", "ttl_seconds": 600}}
        with pytest.raises(UserError, match=r"^A reviewer's standing approval stands in the"):
            agent.invoke(Command(resume=user_wide), carol)
        assert shop.done == []  # the refused answer did not stick
        here = {"type": "approve", "always": {"ttl_seconds": 600}}
        done = agent.invoke(Command(resume=here), carol)
        assert done["outcome"]["terminated_reason"] == "completed"
        assert shop.done == [("A1", 10), ("A2", 20)]  # A2: the standing approval, in this thread
        standing = [a for k, a in done["approvals"].items() if k.startswith("always/")]
        assert [(a["scope"], a.get("reviewer")) for a in standing] == [("thread", "carol")]
        approvers = {r.approver for r in AuditLog(ledger).query() if r.kind == "approval"}
        assert approvers == {"carol"}
        # nothing stands for the owner elsewhere
        other = _served("t2", "u1", ["support"])
        paused = agent.invoke({"messages": [("user", "refund A3")]}, other)
        assert paused["outcome"]["status"] == "interrupted"
    ledger.close()


def _rename_table(db_url: str, old: str, new: str) -> None:
    """Break (or mend) the ledger's standing-approvals table from another connection."""
    statement = f"ALTER TABLE {old} RENAME TO {new}"
    if db_url.startswith("sqlite"):
        with sqlite3.connect(db_url.removeprefix("sqlite:///")) as conn:
            conn.execute(statement)
    else:
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(statement)


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_an_unreadable_standing_store_fails_closed_and_says_so(
    db_url: str, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    shop = Refunds()
    ledger = Ledger(db_url)
    always = {"scope": "user", "ttl_seconds": 600}
    script = [refund("A1", 10), "ok"]
    persistence = Persistence(db_url)
    async with AsyncExitStack() as stack:
        if mode == "sync":
            saver = stack.enter_context(persistence.checkpointer())
        else:
            saver = await stack.enter_async_context(persistence.acheckpointer())
        model = ScriptedChatModel(script=script)
        agent = build_agent(model, shop.tools(), policy=POLICY, checkpointer=saver, ledger=ledger)

        async def run(payload: Any, thread: str) -> dict[str, Any]:
            config = {"configurable": {"thread_id": thread}}
            if mode == "sync":
                out: dict[str, Any] = agent.invoke(payload, config, context=SUPPORT)
            else:
                out = await agent.ainvoke(payload, config, context=SUPPORT)
            return out

        await run({"messages": [("user", "refund A1")]}, "first")
        await run(Command(resume={"type": "approve", "always": always}), "first")
        assert shop.done == [("A1", 10)]
        _rename_table(db_url, "keel_standing_approvals", "keel_standing_gone")
        with caplog.at_level("ERROR", logger="keel.guards"):
            blind = await run({"messages": [("user", "refund A1 again")]}, "second")
        assert blind["outcome"]["status"] == "interrupted"  # asks a human: never allowed blind
        assert shop.done == [("A1", 10)]
        (warning,) = blind["warnings"]
        assert warning.startswith("standing approvals: could not be read (")
        assert "could not read standing approvals, so none apply" in caplog.text
        records = {r.thread_id: r for r in RunLog(ledger).query()}
        assert "degraded: standing approvals: could not be read" in records["second"].detail
        _rename_table(db_url, "keel_standing_gone", "keel_standing_approvals")
        control = await run({"messages": [("user", "refund A1 once more")]}, "third")
        assert control["outcome"]["terminated_reason"] == "completed"  # the store is back
        assert shop.done == [("A1", 10), ("A1", 10)]
        assert "warnings" not in control or control["warnings"] == []
    await ledger.aclose()
