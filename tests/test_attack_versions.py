"""Attacks on `keel report --by version`: a row per version, and only old records unversioned.

README: records written before schema version 6 group as `unversioned`. So a record written
now must never land there: not a run refused by admission control (a canary's refused runs
belong to the version that would have served them), and not a version a user labelled
"unversioned" (which would be merged with the old records).
"""

from __future__ import annotations

from typing import Any

import pytest

from keel import Ledger, RunContext, UserError, build_agent
from keel.app.report import UNVERSIONED, by_version
from keel.db.runs import RunLog
from keel.evals import ScriptedChatModel
from keel.guards import Admission, AdmissionPolicy, Policy


def test_a_refused_run_is_recorded_under_the_version_that_refused_it(db_url: str) -> None:
    ledger = Ledger(db_url)
    caps = AdmissionPolicy(tenant_running=1)
    agent = build_agent(
        ScriptedChatModel(script=["Hello."]),
        policy=Policy(admission=caps),
        ledger=ledger,
        version="v2",
    )
    acme = RunContext(user_id="u1", tenant_id="acme")
    busy = Admission(ledger, caps).acquire(acme)
    refused = agent.invoke({"messages": [("user", "hi")]}, context=acme)
    assert refused["outcome"]["terminated_reason"] == "overloaded"
    Admission(ledger, caps).release(busy)
    agent.invoke({"messages": [("user", "hi")]}, context=acme)
    runs = RunLog(ledger).query()
    assert sorted(r.terminated_reason for r in runs) == ["completed", "overloaded"]
    assert {r.version for r in runs} == {"v2"}
    assert {r.model for r in runs} == {"scripted"}
    (row,) = by_version(runs)
    assert (row.version, row.runs, row.outcomes) == ("v2", 2, {"completed": 1, "overloaded": 1})
    ledger.close()


@pytest.mark.parametrize("label", [UNVERSIONED, " unversioned ", "Unversioned"])
def test_the_unversioned_group_cannot_be_claimed_by_a_label(label: Any) -> None:
    with pytest.raises(UserError, match="unversioned"):
        build_agent(ScriptedChatModel(script=["hi"]), version=label)
