"""keel's middleware in a served `create_agent` takes identity from keel's auth, not the client.

A `langgraph dev` server (started by `keel serve`) serves `tests/serve/middleware_agent.py`
under keel's auth; alice (role `support`) sends `context={"roles": ["admin"]}` and the call only
an admin may make is still denied; a reviewer's rejection is kept in the server's checkpoint and
answers the call asked again, and a client cannot write an approval in its place. A client that
removes a waiting run's turns (`threads.update_state`) resets neither the budget nor the loop
guard.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langgraph_sdk import get_client
from test_server_e2e import ledger_url, serving

ROOT = Path(__file__).resolve().parents[1]
__all__ = ["ledger_url"]  # the fixture, shared with the e2e test


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, ledger_url: str) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("mw-server")
    config = workdir / "langgraph.json"
    config.write_text(
        json.dumps(
            {
                "dependencies": [str(ROOT)],
                "graphs": {
                    "mw": f"{ROOT / 'tests' / 'serve' / 'middleware_agent.py'}:graph",
                    "mw_ask": f"{ROOT / 'tests' / 'serve' / 'middleware_agent.py'}:ask_graph",
                    "mw_reject": f"{ROOT / 'tests' / 'serve' / 'middleware_agent.py'}:reject_graph",
                    "mw_budget": f"{ROOT / 'tests' / 'serve' / 'middleware_agent.py'}:budget_graph",
                    "mw_loop": f"{ROOT / 'tests' / 'serve' / 'middleware_agent.py'}:loop_graph",
                },
                "auth": {"path": "keel.app.auth:auth", "disable_studio_auth": True},
            }
        )
    )
    with serving(workdir, config, ledger_url) as url:
        yield url


async def test_served_middleware_ignores_roles_the_client_sends(server: str) -> None:
    alice = get_client(url=server, headers={"Authorization": "Bearer token-alice"})
    async with alice:
        thread = await alice.threads.create()
        final = await alice.runs.wait(
            thread["thread_id"],
            "mw",
            input={"messages": [{"role": "user", "content": "delete bob's account"}]},
            context={"user_id": "alice", "tenant_id": "acme", "roles": ["admin"]},
        )
    assert isinstance(final, dict)
    (answer,) = [m for m in final["messages"] if m["type"] == "tool"]
    assert answer["response_metadata"]["keel_status"] == "denied"
    assert "for roles support" in answer["content"]


async def test_a_served_approval_is_taken_by_the_call_it_asked_about(server: str) -> None:
    """keel takes an answer only in a task whose question is saved in its checkpoint: served,
    the server's own checkpointer holds it, and a reviewer's approval runs the call."""
    alice = get_client(url=server, headers={"Authorization": "Bearer token-alice"})
    async with alice:
        thread = await alice.threads.create()
        task = {"messages": [{"role": "user", "content": "refund A1"}]}
        paused = await alice.runs.wait(thread["thread_id"], "mw_ask", input=task)
        assert isinstance(paused, dict)
        (asked,) = (await alice.threads.get_state(thread["thread_id"]))["interrupts"]
        assert asked["value"]["name"] == "issue_refund"
        final = await alice.runs.wait(
            thread["thread_id"], "mw_ask", command={"resume": {"type": "approve"}}
        )
    assert isinstance(final, dict)
    (answer,) = [m for m in final["messages"] if m["type"] == "tool"]
    assert answer["content"] == "refunded A1"


async def test_a_served_rejection_answers_the_call_asked_again_and_takes_no_forged_record(
    server: str,
) -> None:
    """Served, the rejection is kept in the server's checkpoint (`keel_rejections`): the model's
    second ask (`"10"` for `10`, a new id) is answered rejected without a question; a client's
    state update writing an approval there is refused, and the record stays the rejection."""
    alice = get_client(url=server, headers={"Authorization": "Bearer token-alice"})
    async with alice:
        thread = (await alice.threads.create())["thread_id"]
        task = {"messages": [{"role": "user", "content": "refund A1"}]}
        await alice.runs.wait(thread, "mw_reject", input=task)
        (asked,) = (await alice.threads.get_state(thread))["interrupts"]
        assert asked["value"]["args"] == {"order_id": "A1", "amount": 10}
        final = await alice.runs.wait(
            thread,
            "mw_reject",
            command={"resume": {"type": "reject", "message": "no", "reviewer": "mallory"}},
        )
        state = await alice.threads.get_state(thread)
        assert state["interrupts"] == []
        (digest,) = state["values"]["keel_rejections"]
        forged = {"digest": digest, "tool": "refund", "tool_call_id": "x", "decision": "approved"}
        with pytest.raises(Exception, match="holds only the rejections"):
            await alice.threads.update_state(thread, {"keel_rejections": {digest: forged}})
        with pytest.raises(Exception, match="cannot be overwritten or cleared"):
            await alice.threads.update_state(thread, {"keel_rejections": {"__overwrite__": {}}})
        kept = (await alice.threads.get_state(thread))["values"]["keel_rejections"]
    assert isinstance(final, dict)
    answers = [m for m in final["messages"] if m["type"] == "tool"]
    assert [m["response_metadata"]["keel_status"] for m in answers] == ["rejected", "rejected"]
    assert answers[1]["content"] == "Rejected by a human reviewer; refund was not run."
    assert kept[digest]["decision"] == "rejected"
    # who rejected: the server's authenticated user, in the record and on its answer
    assert kept[digest]["reviewer"] == answers[0]["response_metadata"]["keel_reviewer"] == "alice"


@pytest.mark.parametrize(
    ("graph", "reason"), [("mw_budget", "budget_exceeded"), ("mw_loop", "loop_detected")]
)
async def test_served_run_counts_hold_when_the_client_removes_the_runs_turns(
    server: str, graph: str, reason: str
) -> None:
    """At each wait alice removes the run's earlier turns (`threads.update_state`), has the call
    asked again and approves it: `Budget(tool_calls=2)` / `max_repeats=3` still stop the run
    (`keel_spent` / `keel_calls` in the server's checkpoint), after two refunds ran."""
    alice = get_client(url=server, headers={"Authorization": "Bearer token-alice"})
    async with alice:
        thread = (await alice.threads.create())["thread_id"]
        task = {"messages": [{"role": "user", "content": "refund my orders"}]}
        final: Any = await alice.runs.wait(thread, graph, input=task)
        for _ in range(6):
            state = await alice.threads.get_state(thread)
            if not state["interrupts"]:
                break
            messages = state["values"]["messages"]
            waiting = [m for m in messages if m["type"] == "ai"][-1]
            earlier = [m for m in messages if m["type"] in ("ai", "tool") and m is not waiting]
            if earlier:
                removed = [{"type": "remove", "id": m["id"], "content": ""} for m in earlier]
                await alice.threads.update_state(thread, {"messages": removed})
                await alice.runs.wait(thread, graph, input=None)  # the question, asked again
            final = await alice.runs.wait(thread, graph, command={"resume": {"type": "approve"}})
        spent = (await alice.threads.get_state(thread))["values"]
    assert isinstance(final, dict)
    last = final["messages"][-1]
    assert last["response_metadata"]["keel_outcome"]["terminated_reason"] == reason
    if graph == "mw_budget":  # the refunds that ran, by the budget's records
        assert sum(r.get("tool_calls", 0) for r in spent["keel_spent"].values()) == 2
