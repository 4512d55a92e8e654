"""A thread is its first user's: another identity may not read, answer or continue it.

An app that takes `thread_id` from its client (the usual web app: `POST /chat {thread_id, text}`)
passes keel the user it authenticated as `RunContext` and the thread id the client chose. A
hostile client that sends another user's thread id must get nothing: not the thread's history
in the run's result, not an approval answered in the owner's name, not the owner's pending call
dropped. Real checkpointers (SQLite and PostgreSQL), a scripted model minting fresh call ids.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
from langchain_core.messages import ToolMessage
from langgraph.types import Command

from keel import Ledger, Persistence, RunContext, build_agent, tool
from keel.errors import UserError
from keel.evals import ScriptedChatModel, call
from keel.graphs._owner import OWNER_METADATA
from keel.guards import Policy, Rule

ALICE = RunContext(user_id="alice", tenant_id="acme")
BOB = RunContext(user_id="bob", tenant_id="acme")
EVE = RunContext(user_id="alice", tenant_id="evil")  # the same user id in another tenant
REVIEWER = RunContext(user_id="rita", tenant_id="acme", roles=("reviewer",))
FOREIGN_REVIEWER = RunContext(user_id="rita", tenant_id="evil", roles=("reviewer",))
SECRET = "My card ends in 4242 and I live at 1 Elm St."
POLICY = Policy(
    rules=(
        Rule(tool="lookup_order", action="allow"),
        Rule(tool="issue_refund", action="ask"),
    )
)
CONFIG = {"configurable": {"thread_id": "t-1"}}


class Shop:
    def __init__(self) -> None:
        self.refunds: list[dict[str, Any]] = []

    def tools(self) -> list[Any]:
        @tool(risk="write")
        def issue_refund(order_id: str, amount: int) -> str:
            """Refund an order."""
            self.refunds.append({"order_id": order_id, "amount": amount})
            return f"refunded {amount} on {order_id}"

        @tool(risk="read")
        def lookup_order(order_id: str) -> str:
            """Look up an order."""
            return f"order {order_id}: shipped"

        return [issue_refund, lookup_order]


def script() -> list[Any]:
    return [
        "Noted.",
        call("issue_refund", order_id="A1", amount=30),
        "Refunded.",
        "Anything else?",
        "Sure.",
        "Again.",
    ]


@pytest.fixture
def shop(db_url: str) -> Iterator[tuple[Any, Shop]]:
    shop = Shop()
    with Persistence(db_url).checkpointer() as saver:
        model = ScriptedChatModel(script=script())
        yield build_agent(model, shop.tools(), policy=POLICY, checkpointer=saver), shop


def waiting(agent: Any) -> None:
    """Alice tells the agent a secret, then asks for a refund that waits for approval."""
    agent.invoke({"messages": [("user", SECRET)]}, CONFIG, context=ALICE)
    agent.invoke({"messages": [("user", "Refund A1, 30.")]}, CONFIG, context=ALICE)
    assert agent.get_state(CONFIG).interrupts


def checkpoints(agent: Any) -> int:
    return len(list(agent.checkpointer.list(CONFIG)))


@pytest.mark.parametrize("intruder", [BOB, EVE, RunContext()], ids=["same-tenant", "other", "anon"])
def test_another_user_cannot_continue_or_read_a_thread(shop: Any, intruder: RunContext) -> None:
    agent, _ = shop
    agent.invoke({"messages": [("user", SECRET)]}, CONFIG, context=ALICE)
    before = checkpoints(agent)
    with pytest.raises(UserError, match="belongs to another user") as refused:
        agent.invoke({"messages": [("user", "What did I say?")]}, CONFIG, context=intruder)
    said = str(refused.value)  # names neither the owner nor anything of the thread's
    assert SECRET not in said and "'acme'" not in said.replace(f"'{intruder.tenant_id}'", "")
    assert "'alice'" not in said.replace(f"'{intruder.user_id}'", "")
    with pytest.raises(UserError, match="belongs to another user"):
        list(agent.stream({"messages": [("user", "hi")]}, CONFIG, context=intruder))
    assert checkpoints(agent) == before  # nothing written
    # the owner carries on as before
    result = agent.invoke({"messages": [("user", "Refund A1, 30.")]}, CONFIG, context=ALICE)
    assert result["messages"][0].content == SECRET


def test_another_user_cannot_answer_the_owners_approval(shop: Any) -> None:
    agent, store = shop
    waiting(agent)
    for answer in ({"type": "approve"}, {"type": "reject"}):
        with pytest.raises(UserError, match="belongs to another user"):
            agent.invoke(Command(resume=answer), CONFIG, context=BOB)
    with pytest.raises(UserError, match="belongs to another user"):
        agent.invoke(None, CONFIG, context=BOB)
    # nor drop it with a new message of their own
    dropping = {"configurable": {**CONFIG["configurable"], "keel_pending": "not_run"}}
    with pytest.raises(UserError, match="belongs to another user"):
        agent.invoke({"messages": [("user", "never mind")]}, dropping, context=BOB)
    assert store.refunds == [] and agent.get_state(CONFIG).interrupts
    result = agent.invoke(Command(resume={"type": "approve"}), CONFIG, context=ALICE)
    assert store.refunds == [{"order_id": "A1", "amount": 30}]
    assert isinstance(result["messages"][-2], ToolMessage)


def test_a_reviewer_of_the_tenant_may_answer_but_not_take_over(shop: Any) -> None:
    agent, store = shop
    waiting(agent)
    with pytest.raises(UserError, match="belongs to another user"):
        agent.invoke(Command(resume={"type": "approve"}), CONFIG, context=FOREIGN_REVIEWER)
    agent.invoke(Command(resume={"type": "approve"}), CONFIG, context=REVIEWER)
    assert store.refunds == [{"order_id": "A1", "amount": 30}]
    # the thread is still Alice's: the reviewer may not send it a task, Alice may
    with pytest.raises(UserError, match="belongs to another user"):
        agent.invoke({"messages": [("user", "Refund it again.")]}, CONFIG, context=REVIEWER)
    agent.invoke({"messages": [("user", "Thanks.")]}, CONFIG, context=ALICE)
    with pytest.raises(UserError, match="belongs to another user"):
        agent.invoke({"messages": [("user", "hi")]}, CONFIG, context=BOB)


def test_a_state_update_keeps_the_owner(shop: Any) -> None:
    agent, _ = shop
    agent.invoke({"messages": [("user", SECRET)]}, CONFIG, context=ALICE)
    agent.update_state(CONFIG, {"messages": [("ai", "An operator's note.")]})
    assert agent.checkpointer.get_tuple(CONFIG).metadata[OWNER_METADATA] == '["acme", "alice"]'
    with pytest.raises(UserError, match="belongs to another user"):
        agent.invoke({"messages": [("user", "hi")]}, CONFIG, context=BOB)
    agent.invoke({"messages": [("user", "Refund A1, 30.")]}, CONFIG, context=ALICE)


def test_an_unstamped_thread_is_adopted_by_its_next_run(shop: Any) -> None:
    """A thread saved before keel stamped owners (here: made by a state update) is adopted."""
    agent, _ = shop
    agent.update_state(CONFIG, {"messages": [("ai", "Written before owners were stamped.")]})
    assert OWNER_METADATA not in agent.checkpointer.get_tuple(CONFIG).metadata
    agent.invoke({"messages": [("user", SECRET)]}, CONFIG, context=ALICE)
    with pytest.raises(UserError, match="belongs to another user"):
        agent.invoke({"messages": [("user", "hi")]}, CONFIG, context=BOB)


def test_runs_without_an_identity_keep_working(shop: Any) -> None:
    """An app that passes no `RunContext` runs every thread as the default identity."""
    agent = build_agent(
        ScriptedChatModel(script=["1", "2", "3"]), [], checkpointer=shop[0].checkpointer
    )
    agent.invoke({"messages": [("user", "one")]}, CONFIG)
    agent.invoke({"messages": [("user", "two")]}, CONFIG)
    agent.invoke({"messages": [("user", "three")]}, CONFIG, context={"user_id": "anonymous"})


def test_reads_with_an_identity_are_the_owners(shop: Any) -> None:
    """`get_state` / `get_state_history` given the reader's `context` check the owner."""
    agent, _ = shop
    waiting(agent)
    first = list(agent.get_state_history(CONFIG))[-1].config  # an older checkpoint, by id
    for intruder in (BOB, EVE, FOREIGN_REVIEWER, {"user_id": "bob", "tenant_id": "acme"}):
        for at in (CONFIG, first):
            with pytest.raises(UserError, match="belongs to another user") as refused:
                agent.get_state(at, context=intruder)
            said, who = (
                str(refused.value),
                RunContext(**intruder) if isinstance(intruder, dict) else intruder,
            )
            assert SECRET not in said and "'acme'" not in said.replace(f"'{who.tenant_id}'", "")
            assert "'alice'" not in said.replace(f"'{who.user_id}'", "")
            with pytest.raises(UserError, match="belongs to another user"):
                agent.get_state(at, subgraphs=True, context=intruder)
        with pytest.raises(UserError, match="belongs to another user"):
            agent.get_state_history(CONFIG, context=intruder)  # refused when called
    mine = agent.get_state(CONFIG, context=ALICE)
    assert mine.values["messages"][0].content == SECRET and mine.interrupts
    assert len(list(agent.get_state_history(CONFIG, limit=2, context=ALICE))) == 2
    assert agent.get_state(CONFIG, context=REVIEWER).interrupts  # reviews what waits
    assert agent.get_state({"configurable": {"thread_id": "new"}}, context=BOB).values == {}
    assert agent.get_state(CONFIG).values == mine.values  # no context: the app's own read


async def test_async_runs_are_refused_too(db_url: str) -> None:
    shop = Shop()
    async with Persistence(db_url).acheckpointer() as saver:
        agent = build_agent(ScriptedChatModel(script=script()), shop.tools(), policy=POLICY,
                            checkpointer=saver)  # fmt: skip
        await agent.ainvoke({"messages": [("user", SECRET)]}, CONFIG, context=ALICE)
        await agent.ainvoke({"messages": [("user", "Refund A1, 30.")]}, CONFIG, context=ALICE)
        with pytest.raises(UserError, match="belongs to another user"):
            await agent.ainvoke(Command(resume={"type": "approve"}), CONFIG, context=BOB)
        with pytest.raises(UserError, match="belongs to another user"):
            async for _ in agent.astream({"messages": [("user", "hi")]}, CONFIG, context=BOB):
                pass
        assert shop.refunds == []
        with pytest.raises(UserError, match="belongs to another user"):
            await agent.aget_state(CONFIG, context=BOB)
        with pytest.raises(UserError, match="belongs to another user"):
            async for _ in agent.aget_state_history(CONFIG, context=BOB):
                pass
        assert (await agent.aget_state(CONFIG, context=ALICE)).interrupts
        assert [s async for s in agent.aget_state_history(CONFIG, limit=1, context=ALICE)]
        await agent.ainvoke(Command(resume={"type": "approve"}), CONFIG, context=ALICE)
        assert shop.refunds == [{"order_id": "A1", "amount": 30}]
        await agent.aupdate_state(CONFIG, {"messages": [("ai", "An operator's note.")]})
        with pytest.raises(UserError, match="belongs to another user"):
            await agent.ainvoke({"messages": [("user", "hi")]}, CONFIG, context=BOB)


@pytest.mark.parametrize("part", ["metadata", "configurable"])
def test_a_caller_cannot_write_the_owner_stamp(shop: Any, part: str) -> None:
    """LangGraph copies a config's strings into checkpoint metadata; keel's stamp wins."""
    agent, _ = shop
    forged = {**CONFIG, part: {**CONFIG.get(part, {}), OWNER_METADATA: '["acme", "bob"]'}}
    agent.update_state(forged, {"messages": [("ai", "A note.")]})
    assert OWNER_METADATA not in agent.checkpointer.get_tuple(CONFIG).metadata
    agent.invoke({"messages": [("user", SECRET)]}, forged, context=ALICE)
    assert agent.checkpointer.get_tuple(CONFIG).metadata[OWNER_METADATA] == '["acme", "alice"]'
    with pytest.raises(UserError, match="belongs to another user"):
        agent.invoke({"messages": [("user", "hi")]}, forged, context=BOB)


def test_a_deleted_threads_id_is_not_another_users_new_thread(db_url: str) -> None:
    """Found by attack (served: `tests/test_attack_served_client.py`): a thread deleted, its id
    reused by another user started a new thread that read the ledger's records of the old one as
    its own: bob's refund call, with the id alice's had, was answered with alice's recorded
    result and never ran. A deleted thread's id stays its owner's; the default identity's
    records name no one."""
    shop = Shop()
    refund = [call("issue_refund", order_id="A1", amount=30), "Refunded."]
    model = ScriptedChatModel(script=[*refund, *refund, "1", "2"])
    ledger = Ledger(db_url)
    with Persistence(db_url).checkpointer() as saver, contextlib.closing(ledger):
        agent = build_agent(model, shop.tools(), policy=POLICY, checkpointer=saver, ledger=ledger)
        agent.invoke({"messages": [("user", "Refund A1, 30.")]}, CONFIG, context=ALICE)
        agent.invoke(Command(resume={"type": "approve"}), CONFIG, context=ALICE)
        saver.delete_thread("t-1")
        for intruder in (BOB, EVE):
            with pytest.raises(UserError, match="belongs to another user"):
                agent.invoke({"messages": [("user", "Refund A1, 30.")]}, CONFIG, context=intruder)
        assert checkpoints(agent) == 0
        agent.invoke({"messages": [("user", "Refund A1, 30.")]}, CONFIG, context=ALICE)
        assert agent.get_state(CONFIG).interrupts  # the owner's new thread, asking again
        assert shop.refunds == [{"order_id": "A1", "amount": 30}]

        anonymous = {"configurable": {"thread_id": "t-2"}}
        agent.invoke({"messages": [("user", "one")]}, anonymous)
        saver.delete_thread("t-2")
        agent.invoke({"messages": [("user", "two")]}, anonymous, context=ALICE)
