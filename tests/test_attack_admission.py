"""Attacks on admission control: a lease must come back however the run ends.

A client that disconnects (the run's task cancelled) while its run waits in the queue or while
it runs, a run that raises, and a run that pauses on an interrupt must each leave no running or
queued lease behind; otherwise the tenant's caps stay full until the lease expires
(`lease_s`, 300 s by default) and every later run is refused.
"""

from __future__ import annotations

import asyncio
from typing import Any

from test_admission import TASK, Gate, agent_for, one_running_one_queued, run, until

from keel import Ledger, RunContext, build_agent, tool
from keel.evals import ScriptedChatModel, call
from keel.guards import Admission, AdmissionPolicy, Policy, Rule


async def test_a_run_cancelled_while_queued_gives_its_queue_slot_back(ledger: Ledger) -> None:
    taken = await one_running_one_queued(ledger)
    gate, admission, first, queued = taken.gate, taken.admission, taken.first, taken.queued
    queued.cancel()  # the client went away while its run waited for a slot
    await asyncio.gather(queued, return_exceptions=True)
    assert await admission.aheld("acme") == {"running": 1, "queued": 0}
    gate.open.set()
    assert (await first)["outcome"]["terminated_reason"] == "completed"
    assert await admission.aheld("acme") == {"running": 0, "queued": 0}


async def test_a_run_cancelled_while_running_gives_its_slot_back(ledger: Ledger) -> None:
    gate = Gate()
    policy = AdmissionPolicy(tenant_running=1)
    agent = agent_for(ledger, policy, gate)
    admission = Admission(ledger, policy)
    task = asyncio.create_task(run(agent, 0))
    await until(lambda: gate.inside == 1, "the run to hold its slot")
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert await admission.aheld("acme") == {"running": 0, "queued": 0}
    gate.open.set()
    again = await run(agent, 1)  # the slot is free again
    assert again["outcome"]["terminated_reason"] == "completed"


async def test_a_run_abandoned_mid_stream_gives_its_slot_back(ledger: Ledger) -> None:
    gate = Gate()
    gate.open.set()
    policy = AdmissionPolicy(tenant_running=1)
    agent = agent_for(ledger, policy, gate)
    admission = Admission(ledger, policy)
    context = RunContext(user_id="u1", tenant_id="acme")
    stream = agent.astream(TASK, {"configurable": {"thread_id": "gone"}}, context=context)
    async for _ in stream:
        assert await admission.aheld("acme") == {"running": 1, "queued": 0}
        break  # the client stops reading
    await stream.aclose()
    assert await admission.aheld("acme") == {"running": 0, "queued": 0}


def test_a_sync_stream_abandoned_and_an_interrupted_run_give_their_slots_back(
    db_url: str,
) -> None:
    ledger = Ledger(db_url)
    policy = AdmissionPolicy(tenant_running=1)
    admission = Admission(ledger, policy)

    @tool(side_effects=True)
    def refund(amount: float) -> str:
        """Refund."""
        return "refunded"

    from langgraph.checkpoint.memory import InMemorySaver

    agent = build_agent(
        ScriptedChatModel(script=[call("refund", amount=5.0), "done"]),
        [refund],
        policy=Policy(rules=(Rule(action="ask", tool="refund"),), admission=policy),
        ledger=ledger,
        checkpointer=InMemorySaver(),
    )
    context = RunContext(user_id="u1", tenant_id="acme")
    paused = agent.invoke(TASK, {"configurable": {"thread_id": "p"}}, context=context)
    assert "__interrupt__" in paused
    assert admission.held("acme") == {"running": 0, "queued": 0}
    stream: Any = agent.stream(TASK, {"configurable": {"thread_id": "s"}}, context=context)
    next(stream)
    assert admission.held("acme") == {"running": 1, "queued": 0}
    stream.close()
    assert admission.held("acme") == {"running": 0, "queued": 0}
    ledger.close()
