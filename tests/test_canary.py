"""The canary router: a stable share of users goes to the candidate, and its runs say so.

The split is checked on 1,000 synthetic users (share within tolerance, the same user always on
the same side, a larger share only adds users); the server factory is driven end to end with a
PostgreSQL ledger: a run served by the candidate is recorded as the candidate's version.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from langgraph.store.memory import InMemoryStore
from langgraph_sdk.runtime import _ExecutionRuntime
from test_server_config import User

from keel import Ledger, RunContext, SetupError
from keel.app.canary import bucket, serves_candidate
from keel.app.server_config import CONFIG_ENV, ServerConfig
from keel.db.audit import AuditLog
from keel.db.runs import RunLog
from keel.versions import prompt_hash

USERS = [f"user-{i}" for i in range(1000)]

CONFIG = """
ledger = "${{KEEL_LEDGER_URL}}"

[[users]]
token = "t"
user = "alice"
tenant = "acme"
roles = ["support"]

[tenants.acme.agents.billing]
model = "keel:demo-support"
system_prompt = "You look orders up."
tools = ["lookup_order"]
policy = {{ name = "support", rules = [{{ tool = "lookup_order", action = "allow" }}] }}
version = "v1"

[tenants.acme.agents.billing.canary]
{canary}
"""
CANARY = 'share = 0.5\nversion = "v2"\nsystem_prompt = "You look orders up, politely."'


@pytest.mark.parametrize("share", [0.05, 0.1, 0.3, 0.5, 0.9])
def test_a_share_of_synthetic_users_goes_to_the_candidate(share: float) -> None:
    chosen = [u for u in USERS if serves_candidate(u, share, "acme/billing")]
    assert abs(len(chosen) / len(USERS) - share) < 0.05
    # stable: asking again (as every request of the user does) gives the same side
    assert chosen == [u for u in USERS if serves_candidate(u, share, "acme/billing")]
    # growing the share only moves users to the candidate, never back
    wider = {u for u in USERS if serves_candidate(u, min(1.0, share + 0.1), "acme/billing")}
    assert set(chosen) <= wider


def test_buckets_are_uniform_and_differ_between_canaries() -> None:
    values = [bucket(u, "acme/billing") for u in USERS]
    assert all(0 <= v < 1 for v in values)
    deciles = [sum(int(v * 10) == d for v in values) for d in range(10)]
    assert min(deciles) > 60 and max(deciles) < 140
    other = {u for u in USERS if serves_candidate(u, 0.1, "acme/support")}
    mine = {u for u in USERS if serves_candidate(u, 0.1, "acme/billing")}
    assert other != mine, "two canaries must not pick the same users"
    assert not any(serves_candidate(u, 0.0, "x") for u in USERS)
    assert all(serves_candidate(u, 1.0, "x") for u in USERS)


def _runtime(user: str) -> Any:
    record = User(identity=user, tenant_id="acme", roles=["support"], policy="support")
    store = InMemoryStore()
    return _ExecutionRuntime(access_context="threads.create_run", user=record, store=store)


def test_the_factory_serves_the_candidate_and_records_its_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_postgres_url: str
) -> None:
    path = tmp_path / "server.toml"
    path.write_text(CONFIG.format(canary=CANARY), encoding="utf-8")
    monkeypatch.setenv(CONFIG_ENV, str(path))
    monkeypatch.setenv("KEEL_LEDGER_URL", fresh_postgres_url)
    from keel.app import server

    candidate_user = next(u for u in USERS if serves_candidate(u, 0.5, "acme/billing"))
    stable_user = next(u for u in USERS if not serves_candidate(u, 0.5, "acme/billing"))
    served = {u: server.agent({}, _runtime(u)) for u in (candidate_user, stable_user)}
    assert served[candidate_user] is not served[stable_user]
    assert served[candidate_user] is server.agent({}, _runtime(candidate_user))  # built once
    for user, agent in served.items():
        context = RunContext(user_id=user, tenant_id="acme", roles=("support",))
        result = agent.invoke(
            {"messages": [("user", "Where is order A1001?")]},
            {"configurable": {"thread_id": f"thread-{user}"}},
            context=context,
        )
        assert result["outcome"]["status"] in ("success", "stopped")

    ledger = Ledger(fresh_postgres_url)
    runs = {r.user_id: r for r in RunLog(ledger).query()}
    assert (runs[candidate_user].version, runs[stable_user].version) == ("v2", "v1")
    assert runs[candidate_user].prompt_hash == prompt_hash("You look orders up, politely.")
    assert runs[stable_user].prompt_hash == prompt_hash("You look orders up.")
    audit = AuditLog(ledger).query(user=candidate_user)
    assert audit and {r.version for r in audit} == {"v2"}
    ledger.close()


def test_a_canary_can_serve_another_agent(tmp_path: Path) -> None:
    text = CONFIG.format(canary='share = 0.2\nversion = "next"\nagent = "next"') + (
        '\n[tenants.acme.agents.next]\nmodel = "keel:demo"\ntools = ["lookup_order"]\n'
    )
    path = tmp_path / "server.toml"
    path.write_text(text.replace("${KEEL_LEDGER_URL}", "postgresql://x@127.0.0.1:1/x"))
    billing = ServerConfig.from_file(path).tenant("acme").agents["billing"]
    assert billing.canary is not None and billing.canary.share == 0.2
    candidate = billing.canary.candidate
    assert (candidate.model, candidate.version, candidate.name) == ("keel:demo", "next", "billing")
    assert billing.canary.candidate.policy is None  # the other agent's, as it is


@pytest.mark.parametrize(
    ("canary", "message"),
    [
        ('share = 1.5\nversion = "v2"\nmodel = "keel:demo"', "share must be a number from 0 to 1"),
        ('share = true\nversion = "v2"\nmodel = "keel:demo"', "share must be a number from 0 to 1"),
        ('share = 0.1\nmodel = "keel:demo"', 'needs version = "..."'),
        ('share = 0.1\nversion = "v1"\nmodel = "keel:demo"', "is the agent's own version"),
        ('share = 0.1\nversion = "v2"', "changes nothing"),
        ('share = 0.1\nversion = "v2"\nagent = "nope"', "must be another of the tenant's agents"),
        ('share = 0.1\nversion = "v2"\nagent = "billing"', "must be another of the tenant's"),
        ('share = 0.1\nversion = "v2"\ncolour = "red"', "unknown key(s) ['colour']"),
        ('share = 0.1\nversion = "v2"\nmodel = "keel:nope"', "is not a bundled model"),
    ],
)
def test_bad_canaries_say_what_to_fix(tmp_path: Path, canary: str, message: str) -> None:
    path = tmp_path / "server.toml"
    text = CONFIG.format(canary=canary).replace("${KEEL_LEDGER_URL}", "postgresql://x@h:1/x")
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SetupError, match=re.escape(message)):
        ServerConfig.from_file(path)
