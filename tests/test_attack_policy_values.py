"""Attacks on the policy's public constructors with values that are no limit.

A sloppy caller (or a config read from JSON, where every number may come out a float) writes
`Budget(model_calls=1.5)`, `True` for a count, NaN or infinity for a number of seconds or
dollars. Suite files refused non-whole counts; the Python constructors took them, and a run was
then held to 1.5 calls (stopping at the second), a breaker's NaN cooldown never ended, an
infinite lease never expired. Each constructor refuses such a value with a `UserError` naming
the field and what to pass, whether the value comes from Python or from a policy file.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from keel.errors import UserError
from keel.evals.suite import Budgets
from keel.guards import (
    AdmissionPolicy,
    BreakerPolicy,
    Budget,
    LoopPolicy,
    PeriodBudget,
    Policy,
    RateLimit,
)

COUNTS = ("steps", "model_calls", "tool_calls", "input_tokens", "output_tokens")
NOT_COUNTS = [1.5, 2.0, True, -1, 0, math.nan, math.inf, "3"]
NOT_AMOUNTS = [True, -1, 0, math.nan, math.inf, -math.inf, "0.5"]


@pytest.mark.parametrize("value", NOT_COUNTS, ids=repr)
@pytest.mark.parametrize("name", COUNTS)
def test_a_run_budget_count_must_be_a_whole_number(name: str, value: Any) -> None:
    with pytest.raises(UserError) as caught:
        Budget(**{name: value})
    assert str(caught.value) == (
        f"Budget.{name} is a count: a whole number greater than 0 (e.g. {name}=20), "
        f"or None to disable it; got {value!r}."
    )


@pytest.mark.parametrize("value", NOT_AMOUNTS, ids=repr)
@pytest.mark.parametrize("name", ["usd", "wall_seconds"])
def test_a_run_budget_amount_must_be_finite_and_positive(name: str, value: Any) -> None:
    with pytest.raises(UserError, match=rf"Budget\.{name} must be a finite number greater than 0"):
        Budget(**{name: value})


def test_a_run_budget_takes_whole_counts_and_fractional_amounts() -> None:
    budget = Budget(model_calls=20, input_tokens=10**9, usd=0.25, wall_seconds=1.5, soft_ratio=1)
    assert budget.limits()["model_calls"] == 20


@pytest.mark.parametrize("value", [True, math.nan, math.inf, 0, 1.5, "0.8"], ids=repr)
def test_the_soft_ratio_is_a_share_not_a_bool(value: Any) -> None:
    with pytest.raises(UserError, match=r"Budget\.soft_ratio must be a number in \(0, 1\]"):
        Budget(usd=1.0, soft_ratio=value)


def test_a_policy_file_value_is_refused_naming_the_section() -> None:
    with pytest.raises(UserError, match=r"In policy 'budget': Budget\.model_calls is a count"):
        Policy.from_dict({"budget": {"model_calls": 1.5}})


@pytest.mark.parametrize("value", [1.5, 2.0, True, -1, math.nan, math.inf, "3"], ids=repr)
@pytest.mark.parametrize("name", [*COUNTS, "total_tokens"])
def test_an_eval_budgets_count_must_be_a_whole_number(name: str, value: Any) -> None:
    with pytest.raises(UserError, match=rf"Budgets\.{name} is a count: a whole number >= 0"):
        Budgets(**{name: value})


@pytest.mark.parametrize("value", [True, -1, math.nan, math.inf, "1"], ids=repr)
@pytest.mark.parametrize("name", ["usd", "latency_seconds"])
def test_an_eval_budgets_amount_must_be_finite(name: str, value: Any) -> None:
    with pytest.raises(UserError, match=rf"Budgets\.{name} must be a number >= 0, got"):
        Budgets(**{name: value})


def test_eval_budgets_take_zero_and_whole_counts() -> None:
    assert Budgets(model_calls=0, usd=0.5, latency_seconds=2).limits() == {
        "model_calls": 0.0,
        "usd": 0.5,
        "latency_seconds": 2.0,
    }


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_repeats": 0}, "max_repeats must be a whole number, 2 or more"),
        ({"max_repeats": 1}, "max_repeats must be a whole number, 2 or more"),
        ({"max_repeats": -1}, "max_repeats must be a whole number, 2 or more"),
        ({"max_repeats": True}, "max_repeats must be a whole number, 2 or more"),
        ({"max_repeats": 3.0}, "max_repeats must be a whole number, 2 or more"),
        ({"max_cycles": 1}, "max_cycles must be 2 or more, or 0"),
        ({"max_cycles": False}, "max_cycles must be 2 or more, or 0"),  # was read as 0: off
        ({"max_cycles": 2.5}, "max_cycles must be 2 or more, or 0"),
    ],
    ids=repr,
)
def test_loop_policy_counts(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError, match=f"LoopPolicy.{message}"):
        LoopPolicy(**fields)


@pytest.mark.parametrize("value", [math.nan, math.inf, True, 0, -1, "30"], ids=repr)
@pytest.mark.parametrize("name", ["window_seconds", "cooldown_seconds"])
def test_breaker_seconds_are_finite(name: str, value: Any) -> None:
    with pytest.raises(UserError, match=rf"BreakerPolicy\.{name} must be a finite number"):
        BreakerPolicy(**{name: value})


@pytest.mark.parametrize("value", [1.5, True, 0, math.nan], ids=repr)
@pytest.mark.parametrize("name", ["failure_threshold", "success_threshold"])
def test_breaker_thresholds_are_whole(name: str, value: Any) -> None:
    with pytest.raises(UserError, match=rf"BreakerPolicy\.{name} must be a whole number"):
        BreakerPolicy(**{name: value})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"tokens": 1.5}, "tokens is a count"),
        ({"tokens": True}, "tokens is a count"),
        ({"tokens": math.inf}, "tokens is a count"),
        ({"usd": math.nan}, "usd must be a finite number"),
        ({"usd": 1, "reserve_output_tokens": 1.5}, "reserve_output_tokens is a count"),
        ({"usd": 1, "reserve_output_tokens": True}, "reserve_output_tokens is a count"),
        ({"usd": 1, "reserve_output_tokens": math.nan}, "reserve_output_tokens is a count"),
        ({"usd": 1, "reserve_output_tokens": None}, "reserve_output_tokens is a count"),
        ({"usd": 1, "reserve_output_tokens": -1}, "reserve_output_tokens is a count"),
        ({"usd": 1, "reserve_output_tokens": 0}, "reserve_output_tokens is a count"),
        ({"usd": 1, "reservation_ttl": math.inf}, "reservation_ttl must be a finite number"),
        ({"usd": 1, "reservation_ttl": True}, "reservation_ttl must be a finite number"),
    ],
    ids=repr,
)
def test_period_budget_values(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError, match=f"PeriodBudget.{message}"):
        PeriodBudget(**fields)


@pytest.mark.parametrize("value", [math.nan, math.inf, True, 0, "5"], ids=repr)
@pytest.mark.parametrize("name", ["queue_timeout_s", "lease_s", "retry_after_s"])
def test_admission_seconds_are_finite(name: str, value: Any) -> None:
    with pytest.raises(UserError, match=rf"AdmissionPolicy\.{name} must be a finite number"):
        AdmissionPolicy(**{name: value})


@pytest.mark.parametrize(
    "fields",
    [{"tenant_running": 1.5}, {"user_running": True}, {"user_queued": 0.5}, {"tenant_queued": -1}],
    ids=repr,
)
def test_admission_caps_are_whole(fields: dict[str, Any]) -> None:
    with pytest.raises(UserError, match=r"AdmissionPolicy\.\w+ must be a whole number"):
        AdmissionPolicy(**fields)


@pytest.mark.parametrize(
    "fields",
    [{"rpm": 1.5}, {"tpm": True}, {"rpm": math.inf}, {"rpm": 1, "max_wait": math.nan}],
    ids=repr,
)
def test_rate_limit_values(fields: dict[str, Any]) -> None:
    with pytest.raises(UserError, match=r"RateLimit\.\w+ must be"):
        RateLimit(**fields)
