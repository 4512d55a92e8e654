"""Rate limits, circuit breakers and fallbacks wired into the agent, on SQLite and PostgreSQL.

The pure fallback decision first (by error type), then real graphs over a real ledger, driven
by `ChaosChatModel`: a breaker goes closed → open → half-open → closed, a rate limit that runs
out ends the run (or moves to the fallback model), a provider 429 is retried after its
`Retry-After`, a timeout ends the run as `timeout`, and an open tool breaker degrades.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from pathlib import Path
from typing import Any

import pytest
from langchain_core.tools import ToolException
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import RetryPolicy

from keel import Ledger, RunContext, UserError, build_agent
from keel.evals import (
    ChaosChatModel,
    ChaosPolicy,
    ChaosRateLimitError,
    ChaosServerError,
    ScriptedChatModel,
    call,
)
from keel.guards import BreakerPolicy, Budget, CircuitBreaker, CircuitOpen, Policy, RateLimit, Rule
from keel.guards.fallback import Retry, after_failure
from keel.guards.ratelimit import RateLimited
from keel.tools import tool

ALLOW_ALL = (Rule(action="allow"),)
ONE_TRY = RetryPolicy(max_attempts=1)
TWO_TRIES = RetryPolicy(max_attempts=2, initial_interval=0.01, jitter=False)
QUESTION = {"messages": [("user", "where is A1?")]}


CONTEXT = RunContext(user_id="u1")


def _down(name: str) -> ChaosChatModel:
    """A model whose every call fails with a server error (an outage)."""
    scripted = ScriptedChatModel(model_name=name, script=["never"])
    return ChaosChatModel(model=scripted, policy=ChaosPolicy(server_error=1.0))


def _invoke(agent: Any, thread: str = "t") -> dict[str, Any]:
    result: dict[str, Any] = agent.invoke(
        QUESTION, {"configurable": {"thread_id": thread}}, context=CONTEXT
    )
    return result


# -- the decision, by error type (pure) --------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "attempt", "has_fallback", "expected"),
    [
        (ChaosRateLimitError(0.25), 1, True, Retry(0.25)),  # honours Retry-After
        (ChaosRateLimitError(0.25), 2, True, "fallback"),  # then the next model
        (ChaosRateLimitError(0.25), 2, False, "stop"),
        (ChaosServerError(503), 2, True, "fallback"),
        (ConnectionError("reset"), 2, True, "fallback"),
        (CircuitOpen("model:a", 10.0, retry_after=3.0), 1, True, "fallback"),
        (CircuitOpen("model:a", 10.0, retry_after=3.0), 1, False, "stop"),
        (RateLimited("rpm:model:a", 5, 2.0), 1, True, "fallback"),
        (TimeoutError("slow"), 2, True, "stop"),  # a timeout ends the run as timeout
        (ValueError("bad request"), 1, True, "stop"),  # a bug is not an outage
    ],
)
def test_after_failure_by_error_type(
    exc: Exception, attempt: int, has_fallback: bool, expected: object
) -> None:
    assert after_failure(exc, attempt, TWO_TRIES, has_fallback=has_fallback) == expected


def test_a_failure_that_opens_the_breaker_is_not_retried() -> None:
    outage = ChaosServerError(503)
    assert after_failure(outage, 1, TWO_TRIES, has_fallback=True, tripped=True) == "fallback"
    assert after_failure(outage, 1, TWO_TRIES, has_fallback=False, tripped=True) == "stop"


def test_the_failure_that_opens_the_breaker_moves_to_the_fallback_at_once(tmp_path: Path) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path}/keel.db")
    primary = _down("primary")
    backup = ScriptedChatModel(model_name="backup", script=["backup answer"])
    agent = build_agent(
        primary,
        policy=Policy(model_breaker=BreakerPolicy(failure_threshold=1, cooldown_seconds=60)),
        ledger=ledger,
        fallback_models=[backup],
        model_retry=RetryPolicy(max_attempts=3, initial_interval=5.0, jitter=False),
    )
    started = time.monotonic()
    result = _invoke(agent)
    assert result["messages"][-1].content == "backup answer"
    assert primary.calls == 1  # not retried: the retry would be refused by the open breaker
    assert time.monotonic() - started < 4.0  # and no 5 s backoff was waited
    ledger.close()


# -- policy fields -----------------------------------------------------------------------------


def test_policy_file_loads_rate_limits_and_breakers(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(
        "[[rate_limits]]\nrpm = 500\ntpm = 200000\n\n"
        '[[rate_limits]]\nrpm = 60\nscope = "tenant"\nmax_wait = 0\n\n'
        "[model_breaker]\nfailure_threshold = 3\ncooldown_seconds = 10\n\n"
        "[tool_breaker]\nfailure_threshold = 2\n",
        encoding="utf-8",
    )
    policy = Policy.from_file(path)
    assert policy.rate_limits == (
        RateLimit(rpm=500, tpm=200_000),
        RateLimit(rpm=60, scope="tenant", max_wait=0),
    )
    assert policy.model_breaker == BreakerPolicy(failure_threshold=3, cooldown_seconds=10)
    assert policy.tool_breaker == BreakerPolicy(failure_threshold=2)
    assert policy.ledger_features == ["rate_limits", "model_breaker", "tool_breaker"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"rate_limits": [{"rpm": 0}]},
            "In policy 'rate_limits[0]': RateLimit.rpm must be a whole number greater than 0, "
            "or None to disable it; got 0.",
        ),
        ({"rate_limits": {"rpm": 5}}, "Policy 'rate_limits' must be a list of tables/mappings."),
        (
            {"model_breaker": {"failures": 3}},
            "Unknown field(s) ['failures'] in policy 'model_breaker'; allowed: "
            "['cooldown_seconds', 'failure_threshold', 'success_threshold', 'window_seconds'].",
        ),
        (
            {"rate_limits": [{"rpm": 5}, {"tpm": 50}]},
            "Policy.rate_limits has two limits with the same scope and model glob; they would "
            "share buckets. Merge them into one RateLimit(rpm=..., tpm=...).",
        ),
    ],
)
def test_policy_rejects_bad_rate_limits_and_breakers(data: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        Policy.from_dict(data)


def test_policy_breaker_must_be_a_breaker_policy() -> None:
    with pytest.raises(UserError, match=r"^Policy\.tool_breaker must be a BreakerPolicy"):
        Policy(tool_breaker={"failure_threshold": 2})  # type: ignore[arg-type]


def test_a_policy_that_needs_the_ledger_says_so() -> None:
    policy = Policy(name="ops", rate_limits=(RateLimit(rpm=5),), model_breaker=BreakerPolicy())
    with pytest.raises(UserError) as info:
        build_agent(ScriptedChatModel(script=["hi"]), policy=policy)
    assert str(info.value) == (
        "Policy 'ops@1' has rate_limits, model_breaker, which are kept in the ledger: pass "
        "build_agent(..., ledger=keel.Ledger(url)) with the URL of your database."
    )


def test_fallback_models_are_validated() -> None:
    with pytest.raises(UserError, match=r"^build_agent\(fallback_models=\.\.\.\) must be a list"):
        build_agent(ScriptedChatModel(script=["hi"]), fallback_models="openai:gpt-4o")


# -- the model breaker's whole cycle in a real graph ----------------------------------------


@pytest.mark.parametrize("driver", ["invoke", "ainvoke"])
async def test_model_breaker_cycles_and_falls_back(
    db_url: str, driver: str, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = Ledger(db_url)
    breaker = BreakerPolicy(failure_threshold=2, cooldown_seconds=0.3, success_threshold=2)
    policy = Policy(rules=ALLOW_ALL, model_breaker=breaker)
    primary = ChaosChatModel(
        model=ScriptedChatModel(model_name="primary", script=[call("lookup", q="A1"), "primary"]),
        policy=ChaosPolicy(server_error=1.0, seed=3),
    )
    backup = ScriptedChatModel(model_name="backup", script=["backup answer"])

    @tool
    def lookup(q: str) -> str:
        """Look an order up."""
        return f"{q}: shipped"

    agent = build_agent(
        primary,
        [lookup],
        policy=policy,
        ledger=ledger,
        fallback_models=[backup],
        model_retry=TWO_TRIES,
        checkpointer=InMemorySaver() if driver == "ainvoke" else None,
    )

    async def run(thread: str) -> dict[str, Any]:
        config = {"configurable": {"thread_id": thread}}
        ctx = RunContext(user_id="u1")
        if driver == "ainvoke":
            out: dict[str, Any] = await agent.ainvoke(QUESTION, config, context=ctx)
            return out
        return _invoke(agent, thread)

    keys = CircuitBreaker(ledger, breaker)
    caplog.set_level(logging.WARNING, logger="keel.guards")
    # closed → open: both attempts on the primary fail with a 5xx; the backup answers
    first = await run("t1")
    assert first["outcome"]["terminated_reason"] == "completed"
    assert first["messages"][-1].content == "backup answer"
    assert [f.kind for f in primary.faults] == ["server_error", "server_error"]
    assert keys.state("model:primary").state == "open"
    # open: the primary is not even called; straight to the backup
    second = await run("t2")
    assert second["messages"][-1].content == "backup answer"
    assert primary.calls == 2
    # half-open after the cool-down, the provider is back: two successes close it
    await asyncio.sleep(0.35)
    primary.policy = ChaosPolicy()
    third = await run("t3")
    assert third["messages"][-1].content == "primary"
    assert keys.state("model:primary").state == "closed"
    transitions = [r.getMessage() for r in caplog.records if "circuit breaker" in r.getMessage()]
    assert transitions == [
        "circuit breaker model:primary: closed → open (2 failures within 60 s)",
        "circuit breaker model:primary: open → half_open (cool-down of 0.3 s over)",
        "circuit breaker model:primary: half_open → closed (2 successes while half-open)",
    ]
    await ledger.aclose()


def test_open_breaker_without_fallback_ends_the_run_with_an_outcome(tmp_path: Path) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path}/keel.db")
    breaker = BreakerPolicy(failure_threshold=1, cooldown_seconds=60)
    primary = _down("primary")
    agent = build_agent(
        primary,
        policy=Policy(model_breaker=breaker),
        ledger=ledger,
        model_retry=ONE_TRY,
    )
    assert _invoke(agent)["outcome"]["status"] == "error"
    result = _invoke(agent)
    assert result["outcome"]["terminated_reason"] == "error"
    assert re.fullmatch(
        r"model call failed after 1 attempt\(s\): CircuitOpen: Circuit breaker 'model:primary' "
        r"is open: calls fail fast until it half-opens in \d+\.\d\d s\. Fall back to another "
        r"model or tool, or retry after that\.",
        result["outcome"]["detail"],
    )
    assert primary.calls == 1
    ledger.close()


# -- rate limits -------------------------------------------------------------------------------


def test_exhausted_rate_limit_stops_or_moves_to_the_fallback(db_url: str) -> None:
    ledger = Ledger(db_url)
    limit = RateLimit(rpm=1, model="primary", max_wait=0)
    policy = Policy(rate_limits=(limit,))
    primary = ScriptedChatModel(model_name="primary", script=["primary answer"])
    alone = build_agent(primary, policy=policy, ledger=ledger, model_retry=ONE_TRY)
    assert _invoke(alone)["messages"][-1].content == "primary answer"
    stopped = _invoke(alone)
    assert stopped["outcome"]["status"] == "error"
    assert stopped["outcome"]["detail"].startswith(
        "model call failed after 1 attempt(s): RateLimited: Rate limit of 1 requests per minute "
        "reached for model:primary|primary (rpm:model:primary|primary): room in "
    )
    backup = ScriptedChatModel(model_name="backup", script=["backup answer"])
    chained = build_agent(
        primary, policy=policy, ledger=ledger, fallback_models=[backup], model_retry=ONE_TRY
    )
    result = _invoke(chained)
    assert result["outcome"]["terminated_reason"] == "completed"
    assert result["messages"][-1].content == "backup answer"
    assert len(primary.calls) == 1  # the limited model was never called again
    ledger.close()


def test_provider_429_waits_for_retry_after_then_falls_back() -> None:
    primary = ChaosChatModel(
        model=ScriptedChatModel(model_name="primary", script=["never"]),
        policy=ChaosPolicy(rate_limit=1.0, retry_after=0.2),
    )
    backup = ScriptedChatModel(model_name="backup", script=["backup answer"])
    agent = build_agent(
        primary,
        fallback_models=[backup],
        model_retry=RetryPolicy(max_attempts=2, initial_interval=5.0, jitter=False),
    )
    started = time.monotonic()
    result = _invoke(agent)
    waited = time.monotonic() - started
    assert result["messages"][-1].content == "backup answer"
    assert [f.kind for f in primary.faults] == ["rate_limit", "rate_limit"]
    assert 0.2 <= waited < 2.0  # the provider's Retry-After, not the 5 s backoff


def test_a_timeout_ends_the_run_as_timeout_even_with_fallbacks() -> None:
    primary = ChaosChatModel(
        model=ScriptedChatModel(model_name="primary", script=["never"]),
        policy=ChaosPolicy(timeout=1.0),
    )
    backup = ScriptedChatModel(model_name="backup", script=["backup answer"])
    agent = build_agent(primary, fallback_models=[backup], model_retry=ONE_TRY)
    result = _invoke(agent)
    assert result["outcome"]["terminated_reason"] == "timeout"
    assert result["outcome"]["detail"].startswith(
        "model call failed after 1 attempt(s): TimeoutError: Request timed out"
    )
    assert backup.calls == []


def test_fallback_chain_all_down_names_the_models_tried() -> None:
    def down(name: str) -> ChaosChatModel:
        return ChaosChatModel(
            model=ScriptedChatModel(model_name=name, script=["never"]),
            policy=ChaosPolicy(server_error=1.0, seed=1),
        )

    agent = build_agent(down("a"), fallback_models=[down("b")], model_retry=ONE_TRY)
    result = _invoke(agent)
    assert result["outcome"]["terminated_reason"] == "error"
    assert re.fullmatch(
        r"model call failed after 1 attempt\(s\): ChaosServerError: Error code: 50[03] - .* "
        r"\(fallback models tried, in order: a, b\)",
        result["outcome"]["detail"],
    )


# -- the tool breaker: graceful degradation ----------------------------------------------------


@pytest.mark.parametrize("driver", ["invoke", "ainvoke"])
async def test_open_tool_breaker_tells_the_model_and_the_run_goes_on(
    db_url: str, driver: str
) -> None:
    ledger = Ledger(db_url)
    runs: list[str] = []

    @tool
    def inventory(sku: str) -> str:
        """Check the stock of a product."""
        runs.append(sku)
        raise ToolException("inventory service returned 503")

    model = ScriptedChatModel(
        model_name="m", script=[call("inventory", sku="X"), call("inventory", sku="Y"), "done"]
    )
    policy = Policy(
        rules=ALLOW_ALL, tool_breaker=BreakerPolicy(failure_threshold=1, cooldown_seconds=60)
    )
    agent = build_agent(model, [inventory], policy=policy, ledger=ledger)
    config = {"configurable": {"thread_id": "t"}}
    result = (
        _invoke(agent)
        if driver == "invoke"
        else await agent.ainvoke(QUESTION, config, context=CONTEXT)
    )
    assert result["outcome"]["terminated_reason"] == "completed"
    assert runs == ["X"]  # the second call was never run
    failed, refused = (m for m in result["messages"] if m.type == "tool")
    assert failed.response_metadata["keel_status"] == "error"
    assert refused.response_metadata["keel_status"] == "unavailable"
    assert re.fullmatch(
        r"Error: inventory is unavailable \(it failed repeatedly; circuit breaker "
        r"'tool:inventory' is open for another \d+ s\) and was not run\. Continue without its "
        r"result, and tell the user what you could not look up or do\.",
        str(refused.content),
    )
    await ledger.aclose()


# -- model tiering: a cheaper model near the budget limit --------------------------------------


def test_downgrade_model_takes_over_past_the_soft_threshold() -> None:
    @tool
    def lookup(q: str) -> str:
        """Look an order up."""
        return f"{q}: shipped"

    primary = ScriptedChatModel(
        model_name="primary", script=[call("lookup", q="A1"), call("lookup", q="A2"), "never"]
    )
    cheap = ScriptedChatModel(model_name="cheap", script=["never", "never", "cheap answer"])
    policy = Policy(rules=ALLOW_ALL, budget=Budget(model_calls=4, soft_ratio=0.5))
    agent = build_agent(primary, [lookup], policy=policy, downgrade_model=cheap)
    result = _invoke(agent)
    assert result["outcome"]["terminated_reason"] == "completed"
    assert result["messages"][-1].content == "cheap answer"
    assert (len(primary.calls), len(cheap.calls)) == (2, 1)
    assert result["budget_warnings"] == [
        "model_calls at 50% of 4",
        "model downgraded to cheap near the budget limit",
    ]


def test_no_downgrade_by_default_and_it_needs_a_budget() -> None:
    with pytest.raises(UserError, match=r"^build_agent\(downgrade_model=\.\.\.\) switches"):
        build_agent(ScriptedChatModel(script=["hi"]), downgrade_model="openai:gpt-4o-mini")


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_failed_calls_refund_survives_a_fallback_whose_breaker_is_open(
    db_url: str, mode: str
) -> None:
    """The primary fails (its TPM estimate is refunded, deferred to the node's next ledger
    write); the fallback's breaker is open, which rolls back the transaction that carried the
    refund: the refund must still land, not vanish with the refusal."""
    ledger = Ledger(db_url)
    breaker = BreakerPolicy(failure_threshold=1, cooldown_seconds=600)
    CircuitBreaker(ledger, breaker).record("model:backup", ok=False)  # the backup is down
    limit = RateLimit(tpm=1_000_000, model="primary")
    primary = _down("primary")
    backup = ScriptedChatModel(model_name="backup", script=["backup answer"])
    agent = build_agent(
        primary,
        policy=Policy(rate_limits=(limit,), model_breaker=breaker),
        ledger=ledger,
        fallback_models=[backup],
        model_retry=ONE_TRY,
    )
    if mode == "sync":
        result = _invoke(agent)
    else:
        run = agent.ainvoke(QUESTION, {"configurable": {"thread_id": "t"}}, context=CONTEXT)
        result = asyncio.run(run)
    assert result["outcome"]["status"] == "error"
    assert "CircuitOpen" in result["outcome"]["detail"]
    assert backup.calls == []

    def tokens() -> Any:
        rows = yield "SELECT key, tokens FROM keel_rate_buckets", ()
        return dict(rows)

    ((key, left),) = ledger.run(tokens()).items()
    assert key.startswith("tpm:model:primary")
    assert left > 1_000_000 - 1, f"the failed call's estimate was not given back: {left}"
    ledger.close()
