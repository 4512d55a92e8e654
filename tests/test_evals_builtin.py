"""keel's built-in suites on keel's own agents: chaos (every run ends with an outcome and a
provider-valid history) and adversarial (no unauthorized execution, no leaked PII)."""

from __future__ import annotations

import dataclasses

import pytest
from langchain_core.language_models import BaseChatModel

from keel.evals import builtin_suite
from keel.evals.builtin import PENDING_ADVERSARIAL_CASES, adversarial_agent
from keel.evals.results import SuiteResult
from keel.evals.runner import arun_suite, run_suite
from keel.evals.suite import Expect
from keel.graphs.agent import Agent
from keel.guards.policy import Policy, Rule


@pytest.fixture(scope="module")
def adversarial() -> SuiteResult:
    return run_suite(builtin_suite("adversarial"), concurrency=4)


async def test_the_chaos_suite_ends_every_run_with_an_outcome_and_a_valid_history() -> None:
    result = await arun_suite(builtin_suite("chaos"), concurrency=4)
    assert result.pass_rate == 1.0, [(r.case.id, r.scores, r.raised) for r in result.failed()]
    reasons = {r.case.id: r.outcome["terminated_reason"] for r in result.runs}
    assert reasons["script-runs-out"] == "error" and reasons["loops"] == "loop_detected"
    statuses = {t.status for r in result.runs for t in r.trajectory}
    assert {"error", "timeout"} <= statuses  # the failing and the hanging tool really failed


async def test_adversarial_suite_no_unauthorized_execution_on_the_demo_agent(
    adversarial: SuiteResult,
) -> None:
    assert adversarial.total("unauthorized_executions") == 0
    assert all(r.raised is None and r.outcome for r in adversarial.runs)
    attempted = {t.name.strip().lower() for r in adversarial.runs for t in r.trajectory}
    assert {"export_customers", "delete_order", "issue_refund"} <= attempted
    odd = next(r for r in adversarial.runs if r.case.id == "odd-spellings-in-parallel")
    assert len(odd.trajectory) == 8 and not odd.executions


async def test_adversarial_suite_no_leaked_pii_on_the_demo_agent(adversarial: SuiteResult) -> None:
    assert adversarial.total("pii_leaks") == 0


async def test_the_adversarial_scores_catch_a_policy_that_lets_everything_run() -> None:
    def permissive(model: BaseChatModel) -> Agent:
        return adversarial_agent(model, Policy(rules=(Rule(action="allow"),)))

    suite = builtin_suite("adversarial")
    result = await arun_suite(suite, permissive)
    assert result.total("unauthorized_executions") == 3
    assert {e.tool for r in result.runs for e in r.executions} == {
        "export_customers",
        "lookup_order",
    }
    # destructive tools still ask a human, even under an allow-all policy; the suite rejects
    statuses = {t.status for r in result.runs for t in r.trajectory if t.name == "delete_order"}
    assert statuses == {"rejected"}


def test_forged_state_cases_are_listed_as_pending_not_faked() -> None:
    ids = {c.id for c in builtin_suite("adversarial").cases}
    assert PENDING_ADVERSARIAL_CASES and not ids & set(PENDING_ADVERSARIAL_CASES)


@pytest.mark.xfail(
    strict=True,
    reason="found by the adversarial suite: when a human rejects one call of a parallel batch, "
    "the results are stored out of call order (nodes/, not evals/)",
)
async def test_a_rejected_parallel_batch_stores_results_in_call_order() -> None:
    suite = builtin_suite("adversarial")
    (case,) = [c for c in suite.cases if c.id == "injection-in-tool-result"]
    case = dataclasses.replace(case, expect=Expect(valid_history=True))
    result = await arun_suite(dataclasses.replace(suite, cases=(case,)))
    assert result.pass_rate == 1.0, result.runs[0].scores
