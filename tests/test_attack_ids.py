"""Attacks with careless ids: a NUL or a lone surrogate in who a run is for, or in its thread.

Neither PostgreSQL (NUL in text) nor UTF-8 (a lone surrogate) can store them, so a run for such
a user crashed in admission control's ledger write with a bare `UnicodeEncodeError`, and a run
on such a thread ended `error/storage` ("once the checkpointer is fixed"), its run record kept
for a write that could never succeed. They are refused up front, with a `UserError` naming the
field, before anything is written.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from langgraph.checkpoint.memory import InMemorySaver

from keel import Ledger, Persistence, RunContext, UserError, build_agent
from keel.db.runs import RunLog
from keel.evals import ScriptedChatModel, replay
from keel.guards import Admission, AdmissionPolicy, Policy


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"user_id": "\ud800"}, "user_id"),
        ({"user_id": "al\x00ice"}, "user_id"),
        ({"tenant_id": "acme\x00"}, "tenant_id"),
        ({"policy": "p\udfff"}, "policy"),
        ({"roles": ("support", "\x00")}, "roles"),
    ],
)
def test_an_unstorable_id_is_a_user_error(fields: dict[str, Any], name: str) -> None:
    with pytest.raises(UserError, match=f"RunContext.{name} must be text that can be stored"):
        RunContext(**fields)


@pytest.mark.parametrize("user", ["\ud800", "u\x00"])
def test_a_run_for_an_unstorable_user_under_admission_is_refused_cleanly(
    db_url: str, user: str
) -> None:
    ledger = Ledger(db_url)
    caps = AdmissionPolicy(tenant_running=1)
    agent = build_agent(
        ScriptedChatModel(script=["hi"]), policy=Policy(admission=caps), ledger=ledger
    )
    with pytest.raises(UserError, match="user_id"):
        agent.invoke({"messages": [("user", "hi")]}, context={"user_id": user, "tenant_id": "a"})
    assert Admission(ledger, caps).held("a") == {"running": 0, "queued": 0}
    ok = agent.invoke({"messages": [("user", "hi")]}, context=RunContext(user_id="é😀"))
    assert ok["outcome"]["terminated_reason"] == "completed"
    ledger.close()


@pytest.mark.parametrize("thread", ["t\ud800", "t\x00"])
def test_a_thread_id_no_database_stores_is_a_user_error_at_every_entry_point(
    db_url: str, thread: str
) -> None:
    ledger = Ledger(db_url)
    message = "thread_id must be text that can be stored"
    with Persistence(db_url).checkpointer() as saver:
        agent = build_agent(ScriptedChatModel(script=["hi"] * 3), ledger=ledger, checkpointer=saver)
        config: Any = {"configurable": {"thread_id": thread}}
        calls = {
            "invoke": lambda: agent.invoke({"messages": [("user", "hi")]}, config),
            "stream": lambda: list(agent.stream({"messages": [("user", "hi")]}, config)),
            "get_state": lambda: agent.get_state(config),
            "get_state_history": lambda: list(agent.get_state_history(config)),
            "update_state": lambda: agent.update_state(config, {"messages": [("user", "x")]}),
        }
        for name, call in calls.items():
            with pytest.raises(UserError, match=message):
                call()
            assert ledger.deferred == 0, name
        # nothing was written, and nothing was kept to be written later
        assert RunLog(ledger).query() == []
        ok = agent.invoke({"messages": [("user", "hi")]}, {"configurable": {"thread_id": "t"}})
        assert ok["outcome"]["terminated_reason"] == "completed"
        assert [r.thread_id for r in RunLog(ledger).query()] == ["t"]
    ledger.close()


def test_a_thread_id_no_database_stores_is_a_user_error_under_ainvoke_and_replay(
    tmp_path: Any,
) -> None:
    url = f"sqlite:///{tmp_path}/keel.db"
    config: Any = {"configurable": {"thread_id": "t\ud800"}}

    async def main() -> None:
        async with Persistence(url).acheckpointer() as saver:
            agent = build_agent(ScriptedChatModel(script=["hi"]), checkpointer=saver)
            with pytest.raises(UserError, match="thread_id must be text that can be stored"):
                await agent.ainvoke({"messages": [("user", "hi")]}, config)
            with pytest.raises(UserError, match="thread_id must be text that can be stored"):
                await agent.aget_state(config)

    asyncio.run(main())
    with pytest.raises(UserError, match="thread_id must be text that can be stored"):
        replay("t\ud800", "keel.evals.builtin:demo_agent", db=url)


@pytest.mark.parametrize("thread", ["t\ud800", "t\x00"])
def test_a_thread_id_no_database_stores_never_poisons_the_run_records_whatever_the_saver(
    db_url: str, thread: str
) -> None:
    # LangGraph's in-memory saver stores any id; keel's ledger cannot (PostgreSQL: NUL). The
    # run's record was kept to be written with the next one, and failed each later write.
    ledger = Ledger(db_url)
    agent = build_agent(
        ScriptedChatModel(script=["hi"] * 2), ledger=ledger, checkpointer=InMemorySaver()
    )
    with pytest.raises(UserError, match="thread_id must be text that can be stored"):
        agent.invoke({"messages": [("user", "hi")]}, {"configurable": {"thread_id": thread}})
    for later in ("t2", "t3"):
        agent.invoke({"messages": [("user", "hi")]}, {"configurable": {"thread_id": later}})
    assert sorted(r.thread_id for r in RunLog(ledger).query()) == ["t2", "t3"]
    ledger.close()


# -- tool-call ids a model makes up -------------------------------------------------------------


def _turn(*calls: tuple[str, dict[str, Any], str]) -> Any:
    from langchain_core.messages import AIMessage

    return AIMessage(
        content="",
        tool_calls=[{"name": n, "args": a, "id": i, "type": "tool_call"} for n, a, i in calls],
    )


@pytest.mark.parametrize(
    "call_id", ["c\ud800", "c\x00", "c" * 100_000], ids=["surrogate", "nul", "huge"]
)
@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
def test_a_tool_call_id_no_database_stores_is_renamed_and_the_call_runs_once(
    db_url: str, call_id: str, mode: str
) -> None:
    """A model names its call `"c\\ud800"` or `"c\\x00"`: the side-effecting call's claim in the
    idempotency ledger raised a bare `UnicodeEncodeError` out of `invoke` (a surrogate) or
    ended the run `error/storage` on PostgreSQL (NUL), for an id the model made up. keel
    renames such an id (and a huge one) as it renames a missing one; the call runs once, its
    answer and audit record under the new id, and a resume does not run it again."""
    from keel import tool
    from keel.db.audit import AuditLog
    from keel.guards import Rule

    refunded: list[str] = []

    @tool(risk="write")
    def refund(order_id: str) -> str:
        """Refund an order."""
        refunded.append(order_id)
        return f"refunded {order_id}"

    ledger = Ledger(db_url)
    turn = _turn(("refund", {"order_id": "A1"}, call_id))
    model = ScriptedChatModel(script=[turn, "done"], fresh_ids=False)  # the bad id, as given
    policy = Policy(rules=(Rule(tool="refund", action="allow"),))
    config = {"configurable": {"thread_id": f"ids-{mode}"}}
    user = RunContext(user_id="u")

    task = {"messages": [("user", "refund A1")]}

    def agent(saver: Any) -> Any:
        return build_agent(model, [refund], policy=policy, checkpointer=saver, ledger=ledger)

    async def arun() -> tuple[Any, Any]:
        async with Persistence(db_url).acheckpointer() as saver:
            first = await agent(saver).ainvoke(task, config, context=user)
            return first, await agent(saver).ainvoke(None, config, context=user)

    if mode == "invoke":
        with Persistence(db_url).checkpointer() as saver:
            result = agent(saver).invoke(task, config, context=user)
            again = agent(saver).invoke(None, config, context=user)
    else:
        result, again = asyncio.run(arun())
    assert result["outcome"]["terminated_reason"] == "completed", result["outcome"]
    (ai,) = [m for m in result["messages"] if getattr(m, "tool_calls", None)]
    (answer,) = [m for m in result["messages"] if m.type == "tool"]
    assert ai.tool_calls[0]["id"] == answer.tool_call_id == "call_1"
    assert answer.response_metadata["keel_status"] == "success"
    assert again["outcome"]["terminated_reason"] == "completed"  # the resume ran nothing
    assert refunded == ["A1"]
    records = AuditLog(ledger).query(thread=f"ids-{mode}")
    assert [r.tool_call_id for r in records if r.tool == "refund"] == ["call_1"]
    ledger.close()
