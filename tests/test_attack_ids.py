"""Attacks with careless ids: a NUL or a lone surrogate in who a run is for.

Neither PostgreSQL (NUL in text) nor UTF-8 (a lone surrogate) can store them, so a run for such
a user crashed in admission control's ledger write with a bare `UnicodeEncodeError`. They are
refused up front, with a `UserError` naming the field, before anything is written.
"""

from __future__ import annotations

from typing import Any

import pytest

from keel import Ledger, RunContext, UserError, build_agent
from keel.evals import ScriptedChatModel
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
