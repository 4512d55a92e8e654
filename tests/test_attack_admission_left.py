"""Attack: an admission lease left behind by a run of this process that no longer runs.

Ctrl-C while a run gives its slot back (or a release the ledger fails or refuses) leaves the
run's lease in `keel_admission_leases`. It used to hold the tenant's slot until it expired
(`lease_s`, 300 s): a tenant capped at one run was refused for five minutes, by the process
that had left it. A lease now names the run and process that hold it (`keel.guards.holders`,
as the thread leases do): one of this process whose run has ended is taken over at once; a
live run's lease, and another process's, are still respected.

Real parts: PostgreSQL and SQLite, real processes (forked with keel imported,
`tests/forking.py`) and a real SIGINT; the model is keel's `ScriptedChatModel`.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import eventually
from forking import ForkServer
from test_migrations import column_names, raw
from test_migrations import drive as drive_flow

from keel import Ledger, RunContext, build_agent
from keel.db.migrations import MIGRATIONS, migrate_flow
from keel.evals import ScriptedChatModel
from keel.guards import Admission, AdmissionPolicy, Policy

ACME = RunContext(user_id="u1", tenant_id="acme")

INTERRUPTED = r"""
import os, sys, time
from langgraph.checkpoint.memory import InMemorySaver
from keel import Ledger, RunContext, build_agent, tool
from keel.evals import ScriptedChatModel, call
from keel.guards import AdmissionPolicy, Policy, Rule

HELD = []

def wait_for(name):
    while not os.path.exists(name):
        time.sleep(0.01)

@tool
def hold() -> str:
    '''Hold the first run until the test says go.'''
    if not HELD:
        HELD.append(1)
        print("holding", flush=True)
        wait_for("go")
    return "held"

agent = build_agent(
    ScriptedChatModel(script=[call("hold"), "done"], fresh_ids=True),
    [hold],
    policy=Policy(rules=(Rule(action="allow", tool="hold"),),
                  admission=AdmissionPolicy(tenant_running=1)),
    ledger=Ledger(sys.argv[1]),
    checkpointer=InMemorySaver(),
)
ctx = RunContext(user_id="u1", tenant_id="acme")
try:
    agent.invoke({"messages": [("user", "one")]}, {"configurable": {"thread_id": "a"}}, context=ctx)
    print("not interrupted", flush=True)
except KeyboardInterrupt:
    print("interrupted", flush=True)
wait_for("again")  # the test let go of the lease's row
done = agent.invoke({"messages": [("user", "two")]}, {"configurable": {"thread_id": "b"}},
                    context=ctx)
print(done["outcome"]["terminated_reason"], flush=True)
"""


def _release_waiting(url: str) -> bool:
    """Whether a `DELETE` of an admission lease waits for a row lock (the run's release)."""
    with psycopg.connect(url, autocommit=True) as pg:
        rows = pg.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND query LIKE '%DELETE FROM keel_admission_leases%'"
        ).fetchone()
    return bool(rows and rows[0])


@pytest.mark.postgres
def test_ctrl_c_while_a_run_gives_its_slot_back_does_not_hold_the_slot(
    fresh_postgres_url: str, tmp_path: Path, forks: ForkServer
) -> None:
    """A process runs an agent capped at one run per tenant; as the run gives its slot back,
    Ctrl-C (a real SIGINT) lands in the release (held up on the lease's row, so that it lands
    there). The lease stays in the ledger, and the same process's next run of the tenant was
    refused (`overloaded`) for the lease's 300 s. Now it is admitted at once. (The process is
    forked with keel imported, `tests/forking.py`; it goes on when the test makes a file.)"""
    url = fresh_postgres_url
    proc = forks.start_code(INTERRUPTED, url, cwd=tmp_path)
    try:
        proc.wait_for_line("holding")
        with psycopg.connect(url) as lock:  # holds the lease's row until the interrupt
            (lease,) = lock.execute(
                "SELECT holder FROM keel_admission_leases FOR UPDATE"
            ).fetchall()
            assert str(lease[0]).split("/")[2] == str(proc.pid)  # the run names its process
            (tmp_path / "go").touch()
            eventually(lambda: _release_waiting(url), "the release")
            os.kill(proc.pid, signal.SIGINT)
            proc.wait_for_line("interrupted")
            lock.rollback()
        with psycopg.connect(url) as pg:  # the interrupted release left the lease behind
            left = pg.execute("SELECT state FROM keel_admission_leases").fetchall()
        assert left == [("running",)]
        (tmp_path / "again").touch()
        assert proc.wait() == 0, proc.output()
        assert proc.lines() == ["holding", "interrupted", "completed"]
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()


async def test_a_live_runs_lease_of_this_process_is_respected(db_url: str) -> None:
    """A lease this process's run still holds (taken, not yet given back, not renewed) is not
    taken over: the tenant's next run waits for it, as before."""
    ledger = Ledger(db_url)
    try:
        caps = AdmissionPolicy(tenant_running=1)
        admission = Admission(ledger, caps)
        held = await admission.aacquire(ACME)
        assert held.refused is None
        agent = build_agent(
            ScriptedChatModel(script=["Hello."]), policy=Policy(admission=caps), ledger=ledger
        )
        refused = await agent.ainvoke({"messages": [("user", "hi")]}, context=ACME)
        assert refused["outcome"]["terminated_reason"] == "overloaded"
        assert admission.acquire(ACME).refused is not None
        assert await admission.aheld("acme") == {"running": 1, "queued": 0}
        await admission.arelease(held)
        done = await agent.ainvoke({"messages": [("user", "hi")]}, context=ACME)
        assert done["outcome"]["terminated_reason"] == "completed"
    finally:
        await ledger.aclose()


HOLDER = """
import sys, time
from keel import Ledger, RunContext
from keel.guards import Admission, AdmissionPolicy
admission = Admission(Ledger(sys.argv[1]), AdmissionPolicy(tenant_running=1))
lease = admission.acquire(RunContext(user_id="other", tenant_id="acme"))
print("leased" if lease.refused is None else lease.refused, flush=True)
time.sleep(600)  # a run still going, until the test kills its process
"""


def test_another_processs_lease_is_respected_until_it_expires(
    db_url: str, tmp_path: Path, forks: ForkServer
) -> None:
    """Only this process's own ended runs are told apart: another process's lease, whose run
    may well be going, still holds the tenant's slot (until it expires, or its process gives
    it back)."""
    proc = forks.start_code(HOLDER, db_url, cwd=tmp_path)
    ledger = Ledger(db_url)
    try:
        proc.wait_for_line("leased")
        admission = Admission(ledger, AdmissionPolicy(tenant_running=1))
        assert admission.acquire(ACME).refused is not None
        assert admission.held("acme") == {"running": 1, "queued": 0}
    finally:
        proc.kill()
        proc.wait()
        ledger.close()


def test_a_version_8_database_gains_the_lease_holder_and_keeps_its_leases(db_url: str) -> None:
    """The holder column reaches an existing ledger in place (migration 9). A lease an older
    keel wrote names no holder: it is respected until it expires, never taken over."""
    backend = "sqlite" if db_url.startswith("sqlite") else "postgres"
    with raw(db_url) as execute:  # what keel 8 set up, with a lease of a run still going
        assert drive_flow(execute, migrate_flow(backend, MIGRATIONS[:8])) == 8
        execute(
            "INSERT INTO keel_admission_leases VALUES (?, ?, ?, ?, ?, ?)",
            ("old", "acme", "u0", "running", time.time(), time.time() + 300),
        )
    assert "holder" not in column_names(db_url, "keel_admission_leases")
    ledger = Ledger(db_url)
    try:
        admission = Admission(ledger, AdmissionPolicy(tenant_running=2))
        assert admission.held("acme") == {"running": 1, "queued": 0}  # migrated on first use
        assert "holder" in column_names(db_url, "keel_admission_leases")
        lease = admission.acquire(ACME)
        assert lease.refused is None
        assert admission.acquire(ACME).refused is not None  # the old lease still counts
        with raw(db_url) as execute:
            rows = execute("SELECT id, holder FROM keel_admission_leases ORDER BY id")
        holders: dict[str, Any] = dict(rows)
        assert holders["old"] is None
        assert str(holders[lease.id]).endswith(f"/{os.getpid()}/{lease.id}")
        admission.release(lease)
    finally:
        ledger.close()
