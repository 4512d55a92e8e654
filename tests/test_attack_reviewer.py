"""Attacks on the reviewer role: a reviewer's run on another user's thread only answers what waits.

`is_review_run` decides what a reviewer may start on another user's thread. A resume aimed at an
older checkpoint (LangGraph's time travel: `checkpoint_id` / `checkpoint` on the run) would
re-answer an approval the owner already settled (a rejected refund approved after all), and a
`multitask_strategy` of `interrupt` / `rollback` would cancel or delete the owner's run in
flight; neither is "resuming a waiting thread", so neither passes as a review run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from keel.app.server_config import CONFIG_ENV

E2E_CONFIG = Path(__file__).resolve().parent / "serve" / "keel-server.toml"


@pytest.fixture(autouse=True)
def served(monkeypatch: pytest.MonkeyPatch) -> None:
    """keel's auth reads the server config when imported."""
    monkeypatch.setenv(CONFIG_ENV, str(E2E_CONFIG))
    monkeypatch.setenv("KEEL_LEDGER_URL", "postgresql://nobody@127.0.0.1:1/unused")  # lazy


def is_review_run(run: Any) -> bool:
    from keel.app.auth import is_review_run as decide

    return decide(run)


KWARGS = (
    *("config", "command", "input", "interrupt_before", "interrupt_after", "context"),
    *("webhook", "durability", "checkpoint_during", "feedback_keys", "temporary"),
    *("stream_mode", "subgraphs", "resumable", "a_later_servers_field"),
)
"""The run's own fields, which LangGraph's server nests under `kwargs`."""


def _run(**extra: Any) -> dict[str, Any]:
    kwargs = {"input": None, "command": {"resume": {"type": "approve"}}, "config": {}}
    run: dict[str, Any] = {
        "thread_id": "t-owner",
        "assistant_id": "agent",
        "multitask_strategy": "enqueue",
        "if_not_exists": "reject",
        "kwargs": kwargs,
    }
    for key, value in extra.items():
        if key in KWARGS:
            kwargs[key] = value
        else:
            run[key] = value
    return run


def test_a_plain_resume_is_a_review_run() -> None:
    assert is_review_run(_run())
    assert is_review_run(_run(config={"configurable": {"thread_id": "t-owner"}}))
    # what LangGraph's server adds to every run's config
    server = {
        "langgraph_auth_user_id": "carol",
        "__request_start_time_ms__": 1,
        "__after_seconds__": 0,
    }
    assert is_review_run(_run(config={"configurable": server}))
    assert is_review_run(_run(multitask_strategy="reject"))


def test_a_resume_as_langgraph_server_hands_it_to_auth_is_a_review_run() -> None:
    """Every field LangGraph's server (langgraph-api 0.16) puts in a `create_run` value, as it
    fills them for `runs.create(thread_id, assistant, command={"resume": ...})`, with the
    reviewer's stream options: what a reviewer needs to answer and watch."""
    server = {"langgraph_auth_user_id": "carol", "__after_seconds__": 0}
    defaults = {
        "run_id": "1f0-run",
        "status": "pending",
        "metadata": {},
        "prevent_insert_if_inflight": False,
        "after_seconds": 0,
        "config": {"configurable": {"thread_id": "t-owner", **server}},
        "context": {"thread_id": "t-owner"},
        "interrupt_before": None,
        "interrupt_after": None,
        "webhook": None,
        "feedback_keys": None,
        "temporary": False,
        "checkpoint_during": True,
        "durability": "async",
    }
    assert is_review_run(_run(**defaults))
    watching = {"stream_mode": ["updates", "messages-tuple"], "subgraphs": True, "resumable": True}
    assert is_review_run(_run(**defaults, **watching))


@pytest.mark.parametrize(
    "extra",
    [
        {"config": {"configurable": {"checkpoint_id": "1f0-old"}}},
        {"config": {"configurable": {"checkpoint_ns": "", "checkpoint_id": "1f0-old"}}},
        {"config": {"configurable": {"checkpoint_map": {"": "1f0-old"}}}},
        # another of the tenant's agents would answer the owner's waiting call
        {"config": {"configurable": {"agent": "support"}}},
        {"config": {"configurable": {"keel_pending": "not_run"}}},
        # found by attack: `recursion_limit: 1` ended the owner's waiting thread as
        # stopped / budget_exceeded; any other setting is the reviewer's, for the owner's run
        {"config": {"recursion_limit": 1}},
        {"config": {"configurable": {}, "tags": ["x"], "run_name": "mine"}},
        {"config": {"max_concurrency": 1}},
        # a breakpoint would stop the owner's approved call before it runs, at no one's request
        {"interrupt_before": ["execute_tools"]},
        {"interrupt_after": "*"},
        {"multitask_strategy": "rollback"},
        {"multitask_strategy": "interrupt"},
        {"command": {"resume": {"type": "approve"}, "update": {"messages": []}}},
        {"command": {"resume": {"type": "approve"}, "goto": "execute_tools"}},
        {"input": {"messages": [["user", "hi"]]}},
        {"if_not_exists": "create"},
        {"thread_id": None},
        {"command": {"resume": None}},
        # found by review: run fields beside the answer, each the reviewer's setting for the
        # owner's run on the owner's thread
        {"webhook": "https://reviewer.example/hook"},  # the owner's output sent to them
        {"durability": "exit"},  # the owner's run checkpointed only at its end
        {"durability": "sync"},
        {"checkpoint_during": False},
        {"after_seconds": 3600},  # a resume scheduled for later, on the owner's thread
        {"feedback_keys": ["score"]},
        {"temporary": True},
        {"action": "interrupt"},
        {"action": "rollback"},
        {"status": "running"},
        {"if_not_exists": "other"},
        {"context": {"agent": "support"}},
        {"context": {"checkpoint_id": "1f0-old"}},
        {"a_later_servers_field": "set"},  # a field keel does not know: refused, not allowed
    ],
)
def test_anything_more_than_answering_what_waits_is_not(extra: dict[str, Any]) -> None:
    assert not is_review_run(_run(**extra))


def test_a_resume_at_the_settled_checkpoint_replays_the_owners_answer() -> None:
    """LangGraph (pinned): a resume aimed at the checkpoint that waited replays the answer
    recorded there (its pending writes), so even without the auth check a fork cannot overturn
    the owner's "no"; auth refuses such runs from reviewers anyway."""
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.types import Command

    from keel import RunContext, build_agent, tool
    from keel.evals import ScriptedChatModel, call
    from keel.guards import Policy, Rule

    refunded: list[float] = []

    @tool(side_effects=True, risk="write")
    def refund(amount: float) -> str:
        """Refund."""
        refunded.append(amount)
        return "refunded"

    agent = build_agent(
        ScriptedChatModel(script=[call("refund", amount=50.0), "ok", "ok"]),
        [refund],
        policy=Policy(rules=(Rule(action="ask", tool="refund"),)),
        checkpointer=InMemorySaver(),
    )
    owner = RunContext(user_id="owner", tenant_id="acme")
    config: Any = {"configurable": {"thread_id": "t-owner"}}
    agent.invoke({"messages": [("user", "refund me")]}, config, context=owner)
    waiting = agent.get_state(config).config
    agent.invoke(Command(resume={"type": "reject"}), config, context=owner)
    assert refunded == [] and not agent.get_state(config).interrupts
    forked = agent.invoke(Command(resume={"type": "approve"}), waiting, context=owner)
    assert refunded == []
    assert forked["outcome"]["terminated_reason"] == "rejected"
