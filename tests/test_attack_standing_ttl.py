"""Attacks on a standing approval's lifetime: a `ttl_seconds` that is not a finite number.

NaN passed `ttl <= 0`: on SQLite the user-scoped record's write failed (a NaN REAL is stored as
NULL) and the run ended as a *storage* failure ("check the file and its disk"); on PostgreSQL the
record was kept, expiring at NaN (which sorts above every number there). An infinite one stood
for good, where the contract says it stands until it expires. A reviewer's bad answer is a
`UserError` before anything runs. Real SQLite and PostgreSQL ledgers and checkpointers.
"""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
from test_standing_approvals import Refunds, agent_for, answer, ask, refund

from keel import Ledger, UserError
from keel.guards.standing import Always


@pytest.mark.parametrize("ttl", [math.nan, math.inf, -math.inf])
def test_a_ttl_that_is_not_a_finite_span_is_refused(ttl: float) -> None:
    with pytest.raises(UserError, match=re.escape("'always.ttl_seconds' must be")):
        Always.parse({"ttl_seconds": ttl})


@pytest.mark.parametrize("ttl", [math.nan, math.inf])
def test_an_endless_user_scoped_approval_is_refused_before_anything_runs(
    db_url: str, ttl: float
) -> None:
    shop = Refunds()
    ledger = Ledger(db_url)
    always: dict[str, Any] = {"scope": "user", "ttl_seconds": ttl}
    with agent_for(db_url, [refund("A1", 10), "ok"], shop, ledger) as agent:
        ask(agent, "refund A1", thread="first")
        with pytest.raises(UserError, match="ttl_seconds"):
            answer(agent, {"type": "approve", "always": always}, thread="first")
        assert shop.done == []
        other = ask(agent, "refund A1 again", thread="second")
        assert other["outcome"]["status"] == "interrupted"  # nothing stands: it asks
    ledger.close()
