"""Attacks on the period budget's reservation with text that costs more tokens than it looks.

A period budget reserves each model call's cost before the call and holds concurrent runs of one
user to the budget only if the reserve covers what the provider bills. Byte-level tokenizers
(OpenAI's, Llama's, Qwen's) bill one token per digit, emoji or odd punctuation: measured with
keel's local model's own tokenizer (Qwen2.5), 4,000 random digits are 4,000 tokens and 2,000
emoji 2,000 tokens, where 4 characters a token reserved about 1,000 and 500. The scripted
provider here bills exactly what such a tokenizer bills at most: one token per UTF-8 byte.
Real SQLite and PostgreSQL ledgers.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from spend_runs import concurrent_runs, runs

from keel import Ledger, Price, PriceTable, RunContext, build_agent
from keel.evals import ScriptedChatModel
from keel.guards import PeriodBudget, Policy, RateLimit, SpendMeter
from keel.guards.spend import input_token_bound

ALICE = RunContext(user_id="alice", tenant_id="acme")
PRICES = PriceTable({"scripted": Price(input_per_mtok=10.0, output_per_mtok=10.0)})
"""$0.40 for a 40,000-token input."""
DIGITS = "".join(random.Random(7).choice("0123456789") for _ in range(40_000))
"""A user's message a byte-level tokenizer bills as 40,000 tokens (one per digit)."""


def _billed_per_byte(messages: Sequence[BaseMessage]) -> AIMessage:
    """The answer, billed as a byte-level tokenizer bills its input at most."""
    size = sum(len(str(m.content).encode("utf-8", "surrogatepass")) for m in messages)
    return AIMessage(
        content="ok",
        usage_metadata={"input_tokens": size, "output_tokens": 1, "total_tokens": size + 1},
    )


def _agent(ledger: Ledger, budget: PeriodBudget, *, limited: bool = False) -> object:
    """An agent under `budget`; `limited`: with rate limits too (they reserve in one transaction
    with the budget, another path)."""
    model = ScriptedChatModel(script=[_billed_per_byte])
    limits = (RateLimit(rpm=10_000, tpm=100_000_000),) if limited else ()
    policy = Policy(period_budgets=(budget,), rate_limits=limits, loop=None)
    return build_agent(model, [], policy=policy, ledger=ledger, prices=PRICES)


@pytest.mark.parametrize(
    "text",
    [DIGITS[:4000], "🙂🚀🔥💡" * 500, "我的订单在哪里" * 300, "a\ud800b\x00" * 500, "x" * 4000],
)
def test_the_reserve_covers_a_byte_level_tokenizers_count(text: str) -> None:
    asked = [HumanMessage(text)]
    assert input_token_bound(asked) >= len(text.encode("utf-8", "surrogatepass"))


@pytest.mark.parametrize("limited", [False, True])
def test_sequential_runs_of_digits_stop_at_the_monthly_budget(db_url: str, limited: bool) -> None:
    """Each run reserved a quarter of what its call cost: the third went past the budget."""
    ledger = Ledger(db_url)
    budget = PeriodBudget(usd=1.00, reserve_output_tokens=64)
    agent = _agent(ledger, budget, limited=limited)
    reasons = runs(agent, DIGITS, ALICE)
    spent_usd, _ = SpendMeter(ledger, [budget], PRICES).spent(budget, ALICE)
    assert spent_usd <= 1.00, reasons
    ledger.close()


@pytest.mark.postgres
async def test_concurrent_runs_of_digits_never_overspend(fresh_postgres_url: str) -> None:
    ledger = Ledger(fresh_postgres_url, pool_max_size=10)
    budget = PeriodBudget(usd=1.00, reserve_output_tokens=64)
    agent = _agent(ledger, budget)
    meter = SpendMeter(ledger, [budget], PRICES)
    spent_usd = await concurrent_runs(agent, DIGITS, ALICE, lambda: meter.spent(budget, ALICE)[0])
    assert spent_usd <= 1.00
    await ledger.aclose()
