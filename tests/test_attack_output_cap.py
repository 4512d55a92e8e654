"""Attacks on the period budget's output cap: a model asked for an answer far longer than the
reserve, a model already capped lower, and a model with no cap field at all.

README ("Guards"): the answer is capped at the reserve (keel sets the model's own `max_tokens`,
`max_output_tokens`, `num_predict` or `max_new_tokens`), so an answer cannot cost more than was
reserved; a model with none of these fields is not capped, keel logs a warning, and its answer
is settled at what it billed. Real SQLite and PostgreSQL ledgers.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from keel import Ledger, Price, PriceTable, RunContext, build_agent
from keel.evals import ChaosChatModel, ScriptedChatModel
from keel.guards import PeriodBudget, Policy, Rule, SpendMeter

ALICE = RunContext(user_id="alice", tenant_id="acme")
PRICES = PriceTable({"scripted": Price(input_per_mtok=10.0, output_per_mtok=10.0)})
BUDGET = PeriodBudget(usd=1.0, reserve_output_tokens=50)
ESSAY = "word " * 5_000
"""An answer a hostile or verbose model would give: about 5,000 tokens, 100 times the reserve."""


def _run(ledger: Ledger, model: Any) -> Any:
    policy = Policy(rules=(Rule(action="allow"),), period_budgets=(BUDGET,), loop=None)
    agent = build_agent(model, [], policy=policy, ledger=ledger, prices=PRICES)
    return agent.invoke({"messages": [("user", "Write at length.")]}, context=ALICE)


def _spent(ledger: Ledger) -> float:
    return SpendMeter(ledger, [BUDGET], PRICES).spent(BUDGET, ALICE)[0]


@pytest.mark.parametrize("own_cap", [None, 10], ids=["uncapped", "capped-lower"])
def test_a_long_answer_is_cut_at_the_reserve_and_costs_no_more(
    db_url: str, own_cap: int | None
) -> None:
    ledger = Ledger(db_url)
    model = ScriptedChatModel(script=[ESSAY], max_tokens=own_cap)
    final = _run(ledger, model)
    assert final["outcome"]["terminated_reason"] == "completed"
    billed = model.answers[0].usage_metadata
    assert billed is not None
    assert billed["output_tokens"] == (own_cap or BUDGET.reserve_output_tokens)  # a lower cap kept
    assert final["usage"]["output_tokens"] == billed["output_tokens"]
    assert "warnings" not in final or not final["warnings"]
    assert _spent(ledger) == pytest.approx(final["usage"]["usd"])
    ledger.close()


def test_a_model_without_a_cap_field_is_warned_about_and_settled_at_what_it_billed(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = Ledger(db_url)
    scripted = ScriptedChatModel(script=[ESSAY])
    wrapped = ChaosChatModel(model=scripted)  # no fault, but no max_tokens of its own either
    with caplog.at_level(logging.WARNING):
        final = _run(ledger, wrapped)
    warned = {r.getMessage() for r in caplog.records if "no output cap" in r.getMessage()}
    assert warned == {
        "scripted has no output cap keel knows (max_tokens/max_output_tokens/num_predict/"
        "max_new_tokens): its answers are not capped at the period budget's "
        "reserve_output_tokens=50, so a long answer can spend more than was reserved"
    }  # (once per model call path call_model builds: with tools and without)
    assert final["outcome"]["terminated_reason"] == "completed"
    billed = scripted.answers[0].usage_metadata
    assert billed is not None and billed["output_tokens"] > 50 * BUDGET.reserve_output_tokens
    assert final["warnings"] == [
        "scripted answered past reserve_output_tokens=50: a period budget can be exceeded by "
        "what its calls bill past their reservations"
    ]
    assert _spent(ledger) == pytest.approx(final["usage"]["usd"])  # what it billed, not reserved
    ledger.close()
