"""Two users whose ids, joined, read the same never share what the ledger keeps per user.

The ledger keyed a user's period spend and standing approvals (and sealed approvals) by
`tenant/user` as joined text: user `b/c` of tenant `a` and user `c` of tenant `a/b` both read
`a/b/c`, so one's spend counted against the other's monthly budget and one's "always allow"
answered the other's calls. Ids are the app's (a sign-up form's user name, a tenant's slug), so
a `/` in one is no one's mistake. Real SQLite and PostgreSQL ledgers.
"""

from __future__ import annotations

from typing import Any

import pytest
from langgraph.types import Command
from test_standing_approvals import Refunds, agent_for, refund

from keel import Ledger, Price, PriceTable, RunContext, build_agent
from keel.evals import ScriptedChatModel
from keel.guards import PeriodBudget, Policy, SpendMeter

A_BC = RunContext(user_id="b/c", tenant_id="a", roles=("support",))
AB_C = RunContext(user_id="c", tenant_id="a/b", roles=("support",))
PRICES = PriceTable({"scripted": Price(input_per_mtok=1000.0, output_per_mtok=1000.0)})


def _run(agent: Any, text: str, thread: str, who: RunContext) -> dict[str, Any]:
    result: dict[str, Any] = agent.invoke(
        {"messages": [("user", text)]}, {"configurable": {"thread_id": thread}}, context=who
    )
    return result


@pytest.mark.parametrize(
    ("tenant", "user", "sep", "key"),
    [
        ("acme", "alice", "/", "acme/alice"),  # the key every existing database holds
        ("a", "b/c", "/", "a/b%2Fc"),
        ("a/b", "c", "/", "a%2Fb/c"),
        ("a%2Fb", "c", "/", "a%252Fb/c"),  # an id that reads like an escape stays apart
        ("a", "b:c", ":", "a:b%3Ac"),
    ],
)
def test_the_key_of_a_user_names_one_tenant_and_user(
    tenant: str, user: str, sep: str, key: str
) -> None:
    assert RunContext(user_id=user, tenant_id=tenant).key(sep) == key


def test_one_users_spend_is_not_anothers_whose_ids_join_alike(db_url: str) -> None:
    ledger = Ledger(db_url)
    budget = PeriodBudget(usd=100.0)
    agent = build_agent(
        ScriptedChatModel(script=["done"] * 2),
        [],
        policy=Policy(period_budgets=(budget,), loop=None),
        ledger=ledger,
        prices=PRICES,
    )
    assert _run(agent, "hello " * 50, "t1", A_BC)["outcome"]["terminated_reason"] == "completed"
    meter = SpendMeter(ledger, [budget], PRICES)
    assert meter.spent(budget, A_BC)[0] > 0
    assert meter.spent(budget, AB_C)[0] == 0
    ledger.close()


def test_a_users_standing_approval_does_not_answer_anothers_calls(db_url: str) -> None:
    shop = Refunds()
    ledger = Ledger(db_url)
    always = {"scope": "user", "ttl_seconds": 600}
    with agent_for(db_url, [refund("A1", 10), "ok", refund("A1", 10)], shop, ledger) as agent:
        assert _run(agent, "refund A1", "first", A_BC)["outcome"]["status"] == "interrupted"
        agent.invoke(
            Command(resume={"type": "approve", "always": always}),
            {"configurable": {"thread_id": "first"}},
            context=A_BC,
        )
        assert shop.done == [("A1", 10)]
        theirs = _run(agent, "refund A1", "second", AB_C)
        assert theirs["outcome"]["status"] == "interrupted"  # asks: not the other user's answer
        assert shop.done == [("A1", 10)]
    ledger.close()
