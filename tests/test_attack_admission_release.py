"""Attack: the ledger fails while a run holds its lease; the run's own result must survive.

The lease is released after the run. When that release (or a renewal) cannot reach the ledger,
the slot comes free when the lease expires, as for a crashed process; the caller must still get
the run's outcome, not a storage error in its place.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from langgraph.checkpoint.memory import InMemorySaver

from keel import Ledger, RunContext, build_agent, tool
from keel.evals import ScriptedChatModel, call
from keel.guards import AdmissionPolicy, Policy, Rule


def _agent(tmp_path: Path) -> tuple[Any, Ledger]:
    db = tmp_path / "keel.db"
    ledger = Ledger(f"sqlite:///{db}")

    @tool
    def break_ledger() -> str:
        """Drop the admission leases table under the running agent."""
        with sqlite3.connect(db) as conn:
            conn.execute("DROP TABLE keel_admission_leases")
        return "dropped"

    agent = build_agent(
        ScriptedChatModel(script=[call("break_ledger"), "done"]),
        [break_ledger],
        policy=Policy(
            rules=(Rule(action="allow", tool="break_ledger"),),
            admission=AdmissionPolicy(tenant_running=2),
        ),
        ledger=ledger,
        checkpointer=InMemorySaver(),
    )
    return agent, ledger


def test_a_sync_run_keeps_its_outcome_when_its_lease_cannot_be_released(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    agent, ledger = _agent(tmp_path)
    result = agent.invoke(
        {"messages": [("user", "go")]},
        {"configurable": {"thread_id": "t"}},
        context=RunContext(user_id="u", tenant_id="acme"),
    )
    assert result["outcome"]["terminated_reason"] == "completed"
    assert "could not release admission lease" in caplog.text
    ledger.close()


async def test_an_async_run_keeps_its_outcome_when_its_lease_cannot_be_released(
    tmp_path: Path,
) -> None:
    agent, ledger = _agent(tmp_path)
    result = await agent.ainvoke(
        {"messages": [("user", "go")]},
        {"configurable": {"thread_id": "t"}},
        context=RunContext(user_id="u", tenant_id="acme"),
    )
    assert result["outcome"]["terminated_reason"] == "completed"
    await ledger.aclose()
