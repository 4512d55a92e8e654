"""Attacks on dollar budgets through the price table: a limit that a model keel cannot price,
an odd usage report from a provider or a NaN limit must not turn into "no limit".

Each test plays an attacker (or an unlucky operator) against real parts: keel's agents and
graphs, LangChain's `create_agent` with keel's middleware, real SQLite / PostgreSQL ledgers for
the period budgets, keel's scripted models in the providers' place.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import ModelFallbackMiddleware
from langchain_core.messages import AIMessage, HumanMessage

from keel import Ledger, Price, PriceTable, RunContext, UserError, build_agent, tool
from keel.evals import ChaosChatModel, ChaosPolicy, ScriptedChatModel, call
from keel.graphs import build_supervisor
from keel.guards import (
    Budget,
    BudgetMiddleware,
    GuardedModel,
    ModelCallGuards,
    PeriodBudget,
    Policy,
    RateLimit,
    RateLimitMiddleware,
    Rule,
    SpendMeter,
    outcome_of,
    usage_from_messages,
)
from keel.guards.budget import usage_of
from keel.guards.spend import estimate_tokens
from keel.models import price_name_of

ALICE = RunContext(user_id="alice", tenant_id="acme")
ALLOW = (Rule(tool="lookup", action="allow"),)
MILLION = {"input_tokens": 1_000_000, "output_tokens": 1_000_000, "total_tokens": 2_000_000}
"""One call's usage: $12.50 on gpt-4o ($2.50 in, $10 out per 1M tokens)."""
GPT5 = PriceTable({"gpt-5": Price(input_per_mtok=1.25, output_per_mtok=10.0)})
"""gpt-5 priced: one MILLION call costs $11.25."""
CALLED: list[str] = []


@tool(risk="read")
def lookup(q: str) -> str:
    """Look up q."""
    CALLED.append(q)
    return "x" * 10


@pytest.fixture(autouse=True)
def _clear() -> None:
    CALLED.clear()


def _turn(i: int, usage: dict[str, Any] | None = None) -> AIMessage:
    """A scripted turn that calls `lookup` and reports `usage` (assigned as a provider's
    client may build it: not validated)."""
    message = call("lookup", q=str(i))
    message.usage_metadata = dict(MILLION) if usage is None else usage  # type: ignore[assignment]
    return message


def _model(name: str, turns: int = 5, **kwargs: Any) -> ScriptedChatModel:
    return ScriptedChatModel(
        script=[_turn(i) for i in range(turns)] + ["done"], model_name=name, **kwargs
    )


def _run(agent: Any) -> dict[str, Any]:
    result: dict[str, Any] = agent.invoke({"messages": [("user", "hi")]}, context=ALICE)
    return result


# -- 1. a dollar limit and a model keel has no price for: refused before anything runs --------


def test_the_issue_repro_an_unpriced_model_is_refused_under_a_run_budget() -> None:
    """The bug: gpt-5 (not in the table) ran 10M tokens to `success` at usd 0.0."""
    model = _model("gpt-5")
    policy = Policy(budget=Budget(usd=0.01), rules=ALLOW)
    with pytest.raises(UserError) as caught:
        build_agent(model, [lookup], policy=policy)
    message = str(caught.value)
    assert "no price for model 'gpt-5'" in message
    assert "the run budget's usd limit of 0.01" in message
    assert "prices=PriceTable({'gpt-5': Price(input_per_mtok=…, output_per_mtok=…)})" in message
    assert model.calls == [] and CALLED == []


def test_priced_with_prices_the_same_run_stops_at_its_dollar_limit() -> None:
    agent = build_agent(
        _model("gpt-5"), [lookup], policy=Policy(budget=Budget(usd=0.01), rules=ALLOW), prices=GPT5
    )
    final = _run(agent)
    assert final["outcome"]["terminated_reason"] == "budget_exceeded"
    assert final["outcome"]["detail"] == "Exceeded the usd limit of 0.01 (usd=11.25)"
    assert CALLED == []  # the first answer cost $11.25: its tool call is not run


@pytest.mark.parametrize(
    "where",
    ["fallback", "downgrade", "judge", "planner"],
)
def test_every_model_of_an_agent_must_have_a_price_under_a_dollar_limit(where: str) -> None:
    """The fallback, the cheaper model, the judge: each is a model call the limit must see."""
    priced = ScriptedChatModel(script=["done"])  # "scripted": in keel's table
    unpriced = ScriptedChatModel(
        script=["done"],
        model_name="house-model",
        structured={"JudgeVerdict": {"passed": True, "reason": "ok"}, "Plan": {"steps": ["a"]}},
    )
    options: dict[str, Any] = {
        "fallback": {"fallback_models": [unpriced]},
        "downgrade": {"downgrade_model": unpriced},
        "judge": {"judge": unpriced},
        "planner": {"plan": True},
    }[where]
    main = unpriced if where == "planner" else priced
    with pytest.raises(UserError, match="no price for model 'house-model'"):
        build_agent(main, [lookup], policy=Policy(budget=Budget(usd=1.0), rules=ALLOW), **options)


def test_the_supervisor_router_must_have_a_price_under_a_dollar_limit() -> None:
    worker = build_agent(ScriptedChatModel(script=["done"]))
    router = ScriptedChatModel(model_name="router-x", structured={"Route": {"agent": "FINISH"}})
    policy = Policy(budget=Budget(usd=0.5))
    with pytest.raises(UserError, match=r"no price for model 'router-x'.*usd limit of 0\.5"):
        build_supervisor({"worker": worker}, router, policy=policy)
    prices = PriceTable({"router-x": Price(input_per_mtok=1.0, output_per_mtok=1.0)})
    build_supervisor({"worker": worker}, router, policy=policy, prices=prices)  # priced: fine


def test_a_guarded_model_refuses_an_unpriced_model_under_its_budget() -> None:
    with pytest.raises(UserError, match="no price for model 'gpt-5'"):
        GuardedModel([_model("gpt-5")], guards=ModelCallGuards(budget=Budget(usd=1.0)))
    GuardedModel([_model("gpt-5")], guards=ModelCallGuards(budget=Budget(usd=1.0), prices=GPT5))


def test_a_period_budget_in_dollars_refuses_an_unpriced_model(db_url: str) -> None:
    """An unpriced model reserved $0 per call: the per-user cap held nobody, concurrently or not."""
    ledger = Ledger(db_url)
    try:
        policy = Policy(rules=ALLOW, period_budgets=(PeriodBudget(usd=1.0),))
        with pytest.raises(UserError) as caught:
            build_agent(_model("gpt-5"), [lookup], policy=policy, ledger=ledger)
        assert "no price for model 'gpt-5'" in str(caught.value)
        assert "the user monthly usd budget of 1" in str(caught.value)
        # priced, the same budget stops the second call (the first cost $11.25)
        agent = build_agent(_model("gpt-5"), [lookup], policy=policy, ledger=ledger, prices=GPT5)
        final = _run(agent)
        assert final["outcome"]["terminated_reason"] == "budget_exceeded"
        assert final["outcome"]["detail"].startswith("Exceeded the user monthly usd budget of 1")
    finally:
        ledger.close()


def test_the_spend_meter_refuses_to_reserve_an_unpriced_model(db_url: str) -> None:
    """Used on its own, the meter does not reserve $0 for a model it cannot price."""
    ledger = Ledger(db_url)
    try:
        meter = SpendMeter(ledger, [PeriodBudget(usd=1.0)])
        refused = ledger.run(meter.reserve_input(1_000_000, ALICE, "gpt-5"))
        assert isinstance(refused, str) and "no price for model 'gpt-5'" in refused
        tokens_only = SpendMeter(ledger, [PeriodBudget(tokens=10_000_000)])
        held = ledger.run(tokens_only.reserve_input(1000, ALICE, "gpt-5"))
        assert not isinstance(held, str)  # no dollar limit: tokens are reserved as before
    finally:
        ledger.close()


def test_the_table_that_prices_the_answers_must_know_the_model_too(db_url: str) -> None:
    """The meter's table reserves; the guards' table prices the answer that settles."""
    ledger = Ledger(db_url)
    try:
        meter = SpendMeter(ledger, [PeriodBudget(usd=1.0)], GPT5)
        with pytest.raises(UserError, match="no price for model 'gpt-5'"):
            GuardedModel([_model("gpt-5")], guards=ModelCallGuards(meter=meter))
        GuardedModel([_model("gpt-5")], guards=ModelCallGuards(meter=meter, prices=GPT5))
    finally:
        ledger.close()


def test_without_a_dollar_limit_an_unpriced_model_still_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    policy = Policy(budget=Budget(model_calls=2), rules=ALLOW)
    final = _run(build_agent(_model("gpt-5"), [lookup], policy=policy))
    assert final["outcome"]["detail"] == "Exceeded the model_calls limit of 2 (model_calls=2)"
    assert final["usage"]["usd"] == 0.0
    assert "keel has no price for model 'gpt-5'" in caplog.text


@pytest.mark.parametrize("name", ["local:qwen2.5-coder-1.5b", "ollama:llama3.1:8b"])
def test_local_models_are_priced_at_zero_on_purpose(name: str) -> None:
    final = _run(build_agent(_model(name, turns=1), [lookup], policy=_allow(Budget(usd=0.01))))
    assert final["outcome"]["terminated_reason"] == "completed" and final["usage"]["usd"] == 0.0


class _Ollama(ScriptedChatModel):
    """keel's scripted model playing LangChain's ChatOllama (which names the model bare)."""

    @property
    def _llm_type(self) -> str:
        return "chat-ollama"


def test_an_ollama_model_named_without_its_prefix_is_free() -> None:
    model = _Ollama(script=["done"], model_name="llama3.1:8b")
    assert price_name_of(model) == "ollama:llama3.1:8b"
    final = _run(build_agent(model, [lookup], policy=_allow(Budget(usd=0.01))))
    assert final["outcome"]["terminated_reason"] == "completed"


def _allow(budget: Budget) -> Policy:
    return Policy(budget=budget, rules=ALLOW)


# -- 2. at run time: a reported name the table does not know ----------------------------------


def test_a_routed_model_name_is_priced_as_the_model_keel_called() -> None:
    """Providers report dated or routed names (`gpt-4o` answers as `gpt-4o-eu-2099`...)."""
    model = _model("gpt-4o")
    agent = build_agent(model, [lookup], policy=_allow(Budget(usd=1.0)))
    model.model_name = "acme-router/v7"  # what the provider now reports; keel still called gpt-4o
    final = _run(agent)
    assert model.answers[0].response_metadata["model_name"] == "acme-router/v7"
    assert final["outcome"]["detail"] == "Exceeded the usd limit of 1 (usd=12.5)"


def test_usage_of_prices_by_the_reported_then_the_called_name() -> None:
    table = PriceTable()
    answer = AIMessage(content="", response_metadata={"model_name": "acme-router/v7"})
    answer.usage_metadata = dict(MILLION)  # type: ignore[assignment]
    assert usage_of(answer, table, "gpt-4o")["usd"] == 12.5
    assert usage_of(answer, table, "gpt-5")["usd"] == 0.0  # no limit: $0, as before
    with pytest.raises(UserError, match=r"no price for model 'gpt-5'.*reported 'acme-router/v7'"):
        usage_of(answer, table, "gpt-5", usd_limit="the run budget's usd limit of 1")


# -- 3. create_agent with BudgetMiddleware: the model is met at its first call -----------------


def test_budget_middleware_does_not_call_an_unpriced_model_under_a_dollar_limit() -> None:
    model = _model("gpt-5")
    graph = create_agent(model, [lookup], middleware=[BudgetMiddleware(Budget(usd=0.01))])
    result = graph.invoke({"messages": [("user", "hi")]})
    stopped = outcome_of(result)
    assert stopped["status"] == "stopped" and stopped["terminated_reason"] == "budget_exceeded"
    assert "no price for model 'gpt-5'" in stopped["detail"]
    assert "prices=PriceTable" in stopped["detail"]
    assert model.calls == [] and CALLED == []


async def test_budget_middleware_priced_by_its_table_stops_at_the_limit() -> None:
    graph = create_agent(
        _model("gpt-5"), [lookup], middleware=[BudgetMiddleware(Budget(usd=0.01), prices=GPT5)]
    )
    result = await graph.ainvoke({"messages": [("user", "hi")]})
    assert outcome_of(result)["detail"] == "Exceeded the usd limit of 0.01 (usd=11.25)"
    assert CALLED == []


def test_budget_middleware_prices_an_answer_by_the_model_it_called() -> None:
    """Inside the budget, LangChain's fallback answers with a model reporting another name.

    The budget saw the call go to gpt-4o (priced): the answers, reported as `acme-router/v7`
    (not in the table), are priced as gpt-4o, by the model call and by the tool check alike.
    """
    down = ChaosChatModel(
        model=ScriptedChatModel(model_name="gpt-4o", script=["never"]),
        policy=ChaosPolicy(server_error=1.0),
    )
    routed = _model("acme-router/v7")
    graph = create_agent(
        down,
        [lookup],
        middleware=[BudgetMiddleware(Budget(usd=20.0)), ModelFallbackMiddleware(routed)],
    )
    result = graph.invoke({"messages": [("user", "hi")]})
    assert outcome_of(result)["detail"] == "Exceeded the usd limit of 20 (usd=25)"
    assert CALLED == ["0"]  # the second call's tool was refused: $25 spent
    assert result["messages"][1].response_metadata["keel_priced_as"] == "gpt-4o"


def test_usage_from_messages_under_a_limit_refuses_an_unpriced_answer() -> None:
    answer = AIMessage(content="hi", response_metadata={"model_name": "gpt-5"})
    answer.usage_metadata = dict(MILLION)  # type: ignore[assignment]
    with pytest.raises(UserError, match="no price for model"):
        usage_from_messages([answer], PriceTable(), usd_limit="the usd limit")
    marked = AIMessage(
        content="hi", response_metadata={"model_name": "gpt-5", "keel_priced_as": "gpt-4o"}
    )
    marked.usage_metadata = dict(MILLION)  # type: ignore[assignment]
    assert usage_from_messages([marked], PriceTable(), usd_limit="the usd limit")["usd"] == 12.5


# -- 4. odd usage reports: never lower the spend, never crash the run -------------------------

ODD = {
    "negative": {"input_tokens": -100_000_000, "output_tokens": -100_000_000},
    "none": {"input_tokens": None, "output_tokens": None},
    "missing": {},
    "text": {"input_tokens": "lots", "output_tokens": "12abc"},
    "nan": {"input_tokens": math.nan, "output_tokens": math.inf},
    "fraction": {"input_tokens": 1.5, "output_tokens": -0.5},
    "unicode": {"input_tokens": "\u00b2", "output_tokens": "\uff11\uff12"},  # ², fullwidth 12
}


@pytest.mark.parametrize("odd", sorted(ODD))
def test_an_odd_usage_report_never_lowers_the_run_spend(odd: str) -> None:
    """$12.50, then an odd report, then $12.50: a $20 budget refuses the third call's tool.

    Before the fix a negative count took $1,250 off the run's spend (the run went on to
    `success`), and `None`, text or NaN crashed it with a TypeError / ValueError.
    """
    script = [_turn(0), _turn(1, ODD[odd]), _turn(2), _turn(3), "done"]
    model = ScriptedChatModel(script=script, model_name="gpt-4o")
    final = _run(build_agent(model, [lookup], policy=_allow(Budget(usd=20.0))))
    assert final["outcome"]["terminated_reason"] == "budget_exceeded"
    assert CALLED == ["0", "1"]
    usage = final["usage"]
    assert usage["usd"] >= 25.0 and usage["input_tokens"] >= 2_000_000
    assert usage["output_tokens"] >= 2_000_000


@pytest.mark.parametrize("odd", sorted(ODD))
def test_an_odd_usage_report_is_counted_by_the_middleware(odd: str) -> None:
    script = [_turn(0), _turn(1, ODD[odd]), _turn(2), _turn(3), "done"]
    model = ScriptedChatModel(script=script, model_name="gpt-4o")
    graph = create_agent(model, [lookup], middleware=[BudgetMiddleware(Budget(usd=20.0))])
    result = graph.invoke({"messages": [("user", "hi")]})
    assert outcome_of(result)["terminated_reason"] == "budget_exceeded"
    assert CALLED == ["0", "1"]


@pytest.mark.parametrize("odd", ["negative", "none", "text"])
def test_an_odd_usage_report_never_refunds_a_rate_limit(db_url: str, odd: str) -> None:
    """TPM buckets are settled with what the answer reports: a negative count refilled the
    bucket (the next caller went over the limit), `None` or text crashed the run."""
    ledger = Ledger(db_url)
    try:
        estimate = estimate_tokens([HumanMessage("hi")])
        limit = RateLimit(tpm=estimate + estimate // 2, scope="tenant", max_wait=0)
        answer = AIMessage(content="hello")
        answer.usage_metadata = ODD[odd]  # type: ignore[assignment]
        model = ScriptedChatModel(script=[answer], model_name="gpt-4o")
        graph = create_agent(model, [lookup], middleware=[RateLimitMiddleware(ledger, [limit])])
        first = graph.invoke({"messages": [("user", "hi")]}, context=ALICE)
        assert outcome_of(first)["terminated_reason"] == "completed"
        second = outcome_of(graph.invoke({"messages": [("user", "hi")]}, context=ALICE))
        assert second["terminated_reason"] == "error"
        assert second["detail"].startswith("model call refused: Rate limit of")
    finally:
        ledger.close()


def test_an_odd_usage_report_never_lowers_a_period_budget(db_url: str) -> None:
    """The settle adds what the call cost: a negative report must not give a user money back."""
    ledger = Ledger(db_url)
    try:
        budget = PeriodBudget(usd=1000.0, reserve_output_tokens=2_000_000)
        policy = Policy(rules=ALLOW, period_budgets=(budget,))
        odd = ODD["negative"]
        model = ScriptedChatModel(script=[_turn(0), _turn(1, odd), "done"], model_name="gpt-4o")
        final = _run(build_agent(model, [lookup], policy=policy, ledger=ledger))
        assert final["outcome"]["terminated_reason"] == "completed"
        meter = SpendMeter(ledger, [budget])
        usd, tokens = meter.spent(budget, ALICE)
        assert usd >= 12.5 and tokens >= 2_000_000
    finally:
        ledger.close()


def test_price_table_cost_ignores_counts_that_are_not_counts() -> None:
    table = PriceTable()
    for odd in ODD.values():
        assert table.cost("gpt-4o", odd) == 0.0
    assert table.cost("gpt-4o", {"input_tokens": "1000000", "output_tokens": 0.0}) == 2.5


def test_a_huge_count_is_priced_without_overflowing() -> None:
    """10**400 tokens (or 5000 digits of text) crashed pricing: int too large for a float."""
    table = PriceTable()
    huge = {"input_tokens": 10**400, "output_tokens": "9" * 5000}
    assert table.cost("gpt-4o", huge) == (10**15 * 2.5 + 10**15 * 10.0) / 1e6
    answer = AIMessage(content="hi", response_metadata={"model_name": "gpt-4o"})
    answer.usage_metadata = huge  # type: ignore[assignment]
    assert usage_of(answer, table, "gpt-4o")["input_tokens"] == 10**15


# -- 5. NaN and infinity: every comparison with them is False ----------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_price_that_is_not_finite_is_refused(value: float) -> None:
    with pytest.raises(UserError, match="must be a finite number"):
        Price(input_per_mtok=value, output_per_mtok=1.0)
    with pytest.raises(UserError, match="must be a finite number"):
        Price(input_per_mtok=1.0, output_per_mtok=value)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_budget_limit_that_is_not_finite_is_refused(value: float) -> None:
    with pytest.raises(UserError, match=r"Budget\.usd must be a finite number greater than 0"):
        Budget(usd=value)
    with pytest.raises(UserError, match=r"Budget\.wall_seconds"):
        Budget(wall_seconds=value)
    with pytest.raises(UserError, match=r"PeriodBudget\.usd must be a finite number"):
        PeriodBudget(usd=value)
    # NaN: a hold that never expires
    with pytest.raises(UserError, match="reservation_ttl must be a finite number of seconds"):
        PeriodBudget(usd=1.0, reservation_ttl=value)


@pytest.mark.parametrize("text", ["nan", "inf", "+inf"])
def test_a_policy_file_with_a_nan_limit_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(f"[budget]\nusd = {text}\n")
    with pytest.raises(UserError, match=r"Budget\.usd must be a finite number greater than 0"):
        Policy.from_file(path)
    path.write_text(f'[[period_budgets]]\nscope = "user"\nusd = {text}\n')
    with pytest.raises(UserError, match=r"PeriodBudget\.usd must be a finite number"):
        Policy.from_file(path)


def test_a_nan_price_would_have_let_the_run_through() -> None:
    """What NaN did: every cost NaN, `NaN >= limit` False, the budget never stopped a run."""
    assert not (math.nan >= 0.01)  # the comparison check_budget makes
    with pytest.raises(UserError):
        PriceTable({"gpt-5": Price(input_per_mtok=math.nan, output_per_mtok=math.nan)})


# -- a longer name is not a cheaper model's snapshot ------------------------------------------


@pytest.mark.parametrize(
    ("name", "priced_as"),
    [
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("openai:gpt-4o-2024-08-06", "gpt-4o"),
        ("claude-3-5-haiku-20241022", "claude-3-5-haiku"),
        ("claude-3-5-haiku-latest", "claude-3-5-haiku"),
        ("claude-sonnet-4@20250514", "claude-sonnet-4"),
        ("gemini-2.5-pro-preview-05-06", "gemini-2.5-pro"),
        ("gemini-2.5-flash-001", "gemini-2.5-flash"),
    ],
)
def test_a_dated_snapshot_is_priced_as_its_model(name: str, priced_as: str) -> None:
    table = PriceTable()
    assert table.price_of(name) == table.price_of(priced_as) is not None


@pytest.mark.parametrize(
    "name",
    [
        "gpt-4o-realtime-preview",  # $5 / $20 a million tokens, twice gpt-4o's
        "gpt-4o-audio-preview",
        "o4-mini-deep-research",  # $2 / $8, not o4-mini's $1.10 / $4.40
        "claude-opus-4-5",  # $5 / $25: not Opus 4's price either
        "gemini-2.5-flash-lite",
        "gpt-4o-minimal",  # a made-up house model that starts with a known name
    ],
)
def test_a_longer_name_is_not_priced_as_the_model_it_starts_with(name: str) -> None:
    # priced by the longest known prefix, a dearer model ran under a dollar limit at a cheaper
    # one's price: the budget let through twice what it said
    assert PriceTable().price_of(name) is None
    policy = Policy(budget=Budget(usd=0.01), rules=ALLOW)
    with pytest.raises(UserError, match=f"no price for model {name!r}"):
        build_agent(_model(name), [lookup], policy=policy)


def test_gpt_4o_s_first_snapshot_has_its_own_dearer_price() -> None:
    table = PriceTable()
    assert table.price_of("gpt-4o-2024-05-13") == Price(input_per_mtok=5.0, output_per_mtok=15.0)
