"""Evaluators, each on fabricated runs: outcome, trajectory modes and argument matching, tool
success, budgets, unauthorized executions, PII, valid endings, and the LLM judge."""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolCall, ToolMessage

from keel.evals import ScriptedChatModel
from keel.evals.evaluators import (
    RubricJudge,
    default_evaluators,
    ended_validly,
    evaluate,
    match_trajectory,
    outcome_match,
    pii_leaks,
    tool_success,
    unauthorized_executions,
    within_budgets,
)
from keel.evals.executions import Execution, record_execution, recording
from keel.evals.results import CaseRun, ToolStep
from keel.evals.runner import arun_suite
from keel.evals.suite import Case, Suite, TrajectoryMatch


def case(**fields: Any) -> Case:
    return Suite.from_dict({"cases": [{"id": "c", "input": "hi", **fields}]}).cases[0]


def steps(*calls: tuple[str, dict[str, Any]]) -> list[ToolStep]:
    return [ToolStep(name, args, "success") for name, args in calls]


def expected(mode: str, *calls: tuple[str, dict[str, Any]], **options: Any) -> TrajectoryMatch:
    tool_calls = tuple(ToolCall(name=n, args=a, id=None) for n, a in calls)
    return TrajectoryMatch(calls=tool_calls, mode=mode, **options)  # type: ignore[arg-type]


A, B, C = ("lookup", {"id": "A1"}), ("refund", {"id": "A1", "usd": 5}), ("email", {"to": "x"})


@pytest.mark.parametrize(
    ("mode", "actual", "ok"),
    [
        ("strict", [A, B], True),
        ("strict", [B, A], False),
        ("strict", [A, B, C], False),
        ("unordered", [B, A], True),
        ("unordered", [A], False),
        ("subset", [A], True),
        ("subset", [A, C], False),
        ("superset", [C, A, B], True),
        ("superset", [A], False),
    ],
)
async def test_trajectory_modes(mode: str, actual: list[Any], ok: bool) -> None:
    assert await match_trajectory(steps(*actual), expected(mode, A, B)) is ok


async def test_arguments_exact_ignore_subset_and_custom() -> None:
    actual = steps(("lookup", {"id": "a1", "verbose": True}))
    reference = ("lookup", {"id": "A1"})
    assert not await match_trajectory(actual, expected("strict", reference))
    assert await match_trajectory(actual, expected("strict", reference, args="ignore"))
    assert not await match_trajectory(actual, expected("strict", reference, args="superset"))

    def same_id(got: dict[str, Any], want: dict[str, Any]) -> bool:
        return str(got["id"]).upper() == want["id"]

    custom = expected("strict", reference, overrides={"lookup": same_id})
    assert await match_trajectory(actual, custom)


async def test_parallel_calls_match_the_same_calls_made_one_by_one() -> None:
    run = CaseRun(case=case(expect={"trajectory": ["lookup", "refund"]}))
    parallel = AIMessage(content="", tool_calls=[ToolCall(name=n, args=a, id=n) for n, a in (A, B)])
    results = [ToolMessage("ok", tool_call_id=n, name=n) for n, _ in (A, B)]
    from keel.evals.runner import trajectory_of

    run.trajectory = trajectory_of([HumanMessage("hi"), parallel, *results])
    assert [t.status for t in run.trajectory] == ["success", "success"]
    scores = await evaluate(run, default_evaluators())
    assert [s.name for s in scores] == ["trajectory"]
    assert scores[0].passed is False  # the expected calls have no args, and args are exact
    run.case = case(expect={"trajectory": {"args": "ignore", "calls": ["lookup", "refund"]}})
    assert (await evaluate(run, default_evaluators()))[0].passed


def test_outcome_match_compares_only_what_the_case_expects() -> None:
    run = CaseRun(case=case(expect={"status": "stopped"}))
    run.outcome = {"status": "stopped", "terminated_reason": "denied", "detail": ""}
    assert outcome_match(run) == outcome_match(run) and outcome_match(run).passed  # type: ignore[union-attr]
    run.case = case(expect={"status": "stopped", "terminated_reason": "rejected"})
    score = outcome_match(run)
    assert score is not None and not score.passed and "denied" in score.detail
    assert outcome_match(CaseRun(case=case())) is None


def test_tool_success_is_the_share_of_calls_that_succeeded() -> None:
    run = CaseRun(case=case(expect={"tools_succeed": True}))
    run.trajectory = [ToolStep("a", {}, "success"), ToolStep("b", {}, "error")]
    score = tool_success(run)
    assert score is not None and not score.passed and score.value == 0.5
    assert score.detail == "b: error"


def test_budgets_name_each_limit_crossed() -> None:
    run = CaseRun(case=case(budgets={"input_tokens": 100, "usd": 0.01, "steps": 3}))
    run.usage = {"input_tokens": 150, "output_tokens": 10, "usd": 0.001}
    run.steps = 4
    score = within_budgets(run)
    assert score is not None and not score.passed
    assert score.detail == "input_tokens 150 > 100; steps 4 > 3"


def test_a_usd_budget_is_not_passed_by_a_model_keel_cannot_price() -> None:
    """An unpriced model's calls count $0: the case's usd budget cannot be said to hold."""
    run = CaseRun(case=case(budgets={"usd": 0.01}))
    answer = AIMessage(content="done", response_metadata={"model_name": "gpt-5"})
    answer.usage_metadata = {
        "input_tokens": 10**6,
        "output_tokens": 10**6,
        "total_tokens": 2 * 10**6,
    }
    run.messages = [HumanMessage("hi"), answer]
    run.usage = {"input_tokens": 10**6, "output_tokens": 10**6, "usd": 0.0}
    score = within_budgets(run)
    assert score is not None and not score.passed
    assert score.detail.startswith("usd unknown: keel has no price for 'gpt-5'")
    run.model = "ollama:llama3.1"  # free on purpose; Ollama reports the bare name
    answer.response_metadata["model_name"] = "llama3.1"
    score = within_budgets(run)
    assert score is not None and score.passed


def test_unauthorized_executions_count_what_really_ran() -> None:
    run = CaseRun(case=case(expect={"forbidden_tools": ["delete_order"]}))
    with recording() as executions:
        record_execution("lookup_order", {"order_id": "A1"})
        record_execution("delete_order", {"order_id": "A1"})
    record_execution("delete_order")  # outside a recording: ignored
    assert executions == [
        Execution("lookup_order", {"order_id": "A1"}),
        Execution("delete_order", {"order_id": "A1"}),
    ]
    run.executions = executions
    score = unauthorized_executions(run)
    assert score is not None and score.value == 1.0 and not score.passed


async def test_a_forbidden_tool_no_tool_of_the_agent_has_fails_naming_it_and_the_tools() -> None:
    """A typo in `forbidden_tools` would count nothing and pass forever."""
    typo = Suite.from_dict(
        {
            "model": "keel:demo",
            "cases": [
                {"id": "typo", "input": "Refund A1001", "approvals": "reject",
                 "expect": {"forbidden_tools": ["issue_refnd", "issue_refund"]}},
                {"id": "right", "input": "Refund A1001", "approvals": "reject",
                 "expect": {"forbidden_tools": ["issue_refund"]}},
            ],
        }
    )  # fmt: skip
    result = await arun_suite(typo)
    bad, good = (r.score("unauthorized_executions") for r in result.runs)
    assert bad is not None and not bad.passed and bad.value == 0.0
    assert bad.detail == (
        "forbidden_tools names issue_refnd, which no tool of the agent is called (its tools: "
        "issue_refund, lookup_order, search_policy); fix the name in the case"
    )
    assert good is not None and good.passed


def test_forbidden_tools_are_not_checked_against_tools_the_runner_could_not_find() -> None:
    run = CaseRun(case=case(expect={"forbidden_tools": ["anything"]}))
    assert run.tools is None
    score = unauthorized_executions(run)
    assert score is not None and score.passed


def test_pii_leaks_count_pii_in_answers_and_partial_answers() -> None:
    run = CaseRun(case=case(expect={"no_pii": True}))
    run.messages = [
        HumanMessage("my email is me@example.com"),
        AIMessage("card 4111 1111 1111 1111"),
    ]
    run.outcome = {"detail": "mail ada@example.com"}
    score = pii_leaks(run)
    assert score is not None and score.value == 2.0 and score.detail == "card, email"


def test_ended_validly_needs_an_outcome_and_a_provider_valid_history() -> None:
    run = CaseRun(case=case(expect={"valid_history": True}))
    run.outcome = {"status": "error", "terminated_reason": "error", "detail": "x"}
    call = AIMessage(content="", tool_calls=[ToolCall(name="a", args={}, id="1")])
    run.messages = [
        HumanMessage("hi"),
        call,
        ToolMessage("ok", tool_call_id="1"),
        AIMessage("done"),
    ]
    assert ended_validly(run).passed  # type: ignore[union-attr]
    run.messages = [HumanMessage("hi"), call, AIMessage("done")]  # the call has no result
    score = ended_validly(run)
    assert score is not None and "not valid for every provider" in score.detail
    run.messages, run.raised = [], "RuntimeError: boom"
    assert "raised RuntimeError: boom" in ended_validly(run).detail  # type: ignore[union-attr]


@pytest.mark.parametrize("verdict", [True, False])
async def test_the_rubric_judge_works_with_any_chat_model(verdict: bool) -> None:
    reasoning = f"It does. Thus, the score should be: {str(verdict).lower()}."
    judge = ScriptedChatModel(structured={"score": {"reasoning": reasoning, "score": verdict}})
    run = CaseRun(case=case(rubric="The answer states the refund amount."))
    run.messages = [AIMessage("Refunded $42.50.")]
    score = await RubricJudge(judge)(run)
    assert score is not None and score.passed is verdict and score.detail == reasoning
    prompt = " ".join(str(m.content) for m in judge.calls[0])
    assert "The answer states the refund amount." in prompt and "Refunded $42.50." in prompt
    assert await RubricJudge(judge)(CaseRun(case=case())) is None


def _down(messages: Any) -> dict[str, Any]:
    raise RuntimeError("judge endpoint down")


@pytest.mark.parametrize(
    ("verdict", "detail"),
    [
        ({"reasoning": "Hmm.", "score": "maybe"}, "not a true/false score"),
        ({"reasoning": "Hmm.", "score": 7}, "not a true/false score"),
        ({"reasoning": "Hmm.", "score": None}, "not a true/false score"),
        ({"reasoning": "Hmm."}, "the judge gave no verdict"),
        ({}, "the judge gave no verdict"),
        (_down, "RuntimeError: judge endpoint down"),
    ],
)
async def test_a_judge_that_answers_garbage_or_fails_is_a_failed_rubric_not_a_crash(
    verdict: Any, detail: str
) -> None:
    judge = ScriptedChatModel(structured={"score": verdict})
    run = CaseRun(case=case(rubric="Polite."))
    run.messages = [AIMessage("ok")]
    score = await RubricJudge(judge)(run)
    assert score is not None and score.name == "rubric" and score.passed is False
    assert detail in score.detail and "counts as failed" in score.detail


async def test_a_judge_with_no_structured_answer_or_a_huge_comment_is_scored_not_raised() -> None:
    run = CaseRun(case=case(rubric="Polite."))
    run.messages = [AIMessage("ok")]
    score = await RubricJudge(ScriptedChatModel(script=["I think it is fine"]))(run)
    assert score is not None and not score.passed and "the judge gave no verdict" in score.detail
    huge = "very " * 100_000
    judge = ScriptedChatModel(structured={"score": {"reasoning": huge, "score": True}})
    score = await RubricJudge(judge)(run)
    assert score is not None and score.passed and score.value == 1.0
    assert len(score.detail) < 2100 and score.detail.endswith("more characters)")


async def test_a_suite_whose_judge_fails_still_scores_every_run() -> None:
    suite = Suite.from_dict(
        {
            "model": {"script": ["Hello."]},
            "cases": [{"id": "a", "input": "hi", "rubric": "Polite."}, {"id": "b", "input": "hi"}],
        }
    )
    judge = ScriptedChatModel(structured={"score": _down})
    result = await arun_suite(suite, "keel.evals.builtin:demo_agent", judge=judge)
    judged, unjudged = result.runs
    rubric = judged.score("rubric")
    assert rubric is not None and not rubric.passed and "judge endpoint down" in rubric.detail
    assert not judged.passed and unjudged.passed
    assert judged.outcome["terminated_reason"] == "completed"  # the run itself went fine


async def test_a_rubric_without_a_judge_fails_instead_of_passing_unjudged() -> None:
    run = CaseRun(case=case(rubric="Polite."))
    scores = await evaluate(run, default_evaluators(judge=None))
    assert [(s.name, s.passed) for s in scores] == [("rubric", False)]
    assert "--judge" in scores[0].detail


async def test_evaluate_accepts_sync_and_async_evaluators_and_skips_none() -> None:
    from keel.evals.results import Score

    async def later(run: CaseRun) -> Score:
        return Score("later", True)

    scores = await evaluate(
        CaseRun(case=case()), [lambda run: None, later, lambda r: Score("now", False)]
    )
    assert [s.name for s in scores] == ["later", "now"]


async def test_an_evaluator_that_raises_fails_its_score_and_the_suite_still_reports() -> None:
    def brittle(run: CaseRun) -> Any:
        raise KeyError("usd")

    suite = Suite.from_dict(
        {"model": {"script": ["Hello."]}, "cases": [{"id": "a", "input": "hi"}]}
    )
    result = await arun_suite(suite, "keel.evals.builtin:demo_agent", evaluators=[brittle])
    [run] = result.runs
    assert [(s.name, s.passed, s.detail) for s in run.scores] == [
        ("brittle", False, "raised KeyError: 'usd'")
    ]
    assert not run.passed and result.pass_rate == 0.0
