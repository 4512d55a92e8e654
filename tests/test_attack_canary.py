"""Attacks on the canary router: the candidate is no way around the tenant's limits or choice.

A canary user must stay under the tenant's admission caps like everyone else; a client must
not pick the side it is served (assistant config / configurable); and the split must not
depend on the process (Python's per-process hash seed), or users would flip between replicas.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_canary import CANARY, CONFIG, USERS, _runtime

from keel import Ledger, RunContext
from keel.app.canary import serves_candidate
from keel.app.server_config import CONFIG_ENV
from keel.guards import Admission

ADMISSION = "\n[tenants.acme.admission]\ntenant_running = 1\nretry_after_s = 9\n"


def _serve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ledger_url: str, extra: str) -> None:
    path = tmp_path / "server.toml"
    path.write_text(CONFIG.format(canary=CANARY) + extra, encoding="utf-8")
    monkeypatch.setenv(CONFIG_ENV, str(path))
    monkeypatch.setenv("KEEL_LEDGER_URL", ledger_url)


def test_the_candidate_runs_under_the_tenants_admission_caps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_postgres_url: str
) -> None:
    _serve(tmp_path, monkeypatch, fresh_postgres_url, ADMISSION)
    from keel.app import server

    candidate_user = next(u for u in USERS if serves_candidate(u, 0.5, "acme/billing"))
    agent = server.agent({}, _runtime(candidate_user))
    admission = server.admission_of("acme")
    assert admission is not None
    ledger = Ledger(fresh_postgres_url)
    ledger.setup()
    busy = Admission(ledger, admission.policy).acquire(RunContext(user_id="x", tenant_id="acme"))
    assert busy.refused is None
    context = RunContext(user_id=candidate_user, tenant_id="acme", roles=("support",))
    result = agent.invoke(
        {"messages": [("user", "Where is order A1001?")]},
        {"configurable": {"thread_id": "canary-thread"}},
        context=context,
    )
    assert result["outcome"]["terminated_reason"] == "overloaded"
    Admission(ledger, admission.policy).release(busy)
    ledger.close()


@pytest.mark.parametrize(
    "configurable",
    [
        {"canary": False},
        {"version": "v1"},
        {"candidate": False},
        {"agent": "billing", "canary": "stable"},
        {"share": 0.0},
    ],
)
def test_a_client_cannot_pick_its_side(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fresh_postgres_url: str,
    configurable: dict[str, object],
) -> None:
    _serve(tmp_path, monkeypatch, fresh_postgres_url, "")
    from keel.app import server

    candidate_user = next(u for u in USERS if serves_candidate(u, 0.5, "acme/billing"))
    stable_user = next(u for u in USERS if not serves_candidate(u, 0.5, "acme/billing"))
    candidate = server.agent({}, _runtime(candidate_user))
    stable = server.agent({}, _runtime(stable_user))
    forged = {"configurable": configurable}
    assert server.agent(forged, _runtime(candidate_user)) is candidate
    assert server.agent(forged, _runtime(stable_user)) is stable


def test_the_split_is_the_same_in_every_process() -> None:
    script = (
        "from keel.app.canary import serves_candidate\n"
        "print(''.join('1' if serves_candidate(f'user-{i}', 0.3, 'acme/billing') else '0'"
        " for i in range(300)))"
    )
    here = "".join("1" if serves_candidate(u, 0.3, "acme/billing") else "0" for u in USERS[:300])
    for seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-P", "-c", script],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            cwd="/",
        )
        assert out.stdout.strip() == here


@pytest.mark.parametrize("user", ["", "\x00", "\ud800", "é" * 5000])
def test_odd_user_ids_land_on_a_side_without_raising(user: str) -> None:
    assert serves_candidate(user, 0.5, "acme/billing") in (True, False)
    assert serves_candidate(user, 0.5, "acme/billing") == serves_candidate(
        user, 0.5, "acme/billing"
    )


def test_a_reviewer_resuming_a_thread_gets_the_owners_side(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_postgres_url: str
) -> None:
    """A reviewer acts for the thread's owner: the owner's version must resume the thread."""
    from langgraph.store.memory import InMemoryStore
    from langgraph_sdk.runtime import _ExecutionRuntime
    from test_server_config import User

    from keel.identity import OWNER_KEY, REVIEWER_KEY, ROLES_KEY, TENANT_KEY

    _serve(tmp_path, monkeypatch, fresh_postgres_url, "")
    from keel.app import server

    on = [u for u in USERS if serves_candidate(u, 0.5, "acme/billing")]
    off = [u for u in USERS if not serves_candidate(u, 0.5, "acme/billing")]
    for owner, reviewer in ((on[0], off[0]), (off[1], on[1])):
        mine = server.agent({}, _runtime(owner))
        record = User(identity=reviewer, tenant_id="acme", roles=["reviewer"], policy="support")
        runtime = _ExecutionRuntime(
            access_context="threads.create_run", user=record, store=InMemoryStore()
        )
        stamped = {
            "metadata": {
                TENANT_KEY: "acme",
                OWNER_KEY: owner,
                REVIEWER_KEY: reviewer,
                ROLES_KEY: ["support"],
            }
        }
        assert server.agent(stamped, runtime) is mine
        # a stamp that is not this reviewer's (forged, or another tenant's) moves nothing
        forged = {"metadata": {**stamped["metadata"], REVIEWER_KEY: "someone-else"}}
        assert server.agent(forged, runtime) is server.agent({}, _runtime(reviewer))


@pytest.mark.parametrize("agent", [["billing"], {"name": "billing"}, 7, "", "billing\x00"])
def test_a_hostile_agent_name_in_configurable_is_a_user_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_postgres_url: str, agent: object
) -> None:
    from keel import UserError

    _serve(tmp_path, monkeypatch, fresh_postgres_url, "")
    from keel.app import server

    if agent == "":  # empty: the tenant's main agent, as with no name
        assert server.agent({"configurable": {"agent": agent}}, _runtime("u")) is not None
        return
    with pytest.raises(UserError, match="has no agent"):
        server.agent({"configurable": {"agent": agent}}, _runtime("u"))
