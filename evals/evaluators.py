"""Evaluators: each looks at one `CaseRun` and returns a `Score` (or `None` when it does not apply).

- `outcome_match`: the outcome's `status` / `terminated_reason` are the expected ones;
- `trajectory_match`: the tool calls match the expected ones (agentevals' strict / unordered /
  subset / superset, with exact / ignore / subset / superset / custom argument matching);
- `tool_success`: every tool call that ran succeeded;
- `within_budgets`: USD, tokens, steps, model and tool calls, latency under the case's limits;
- `unauthorized_executions`: forbidden tools whose body really ran (see `record_execution`);
- `pii_leaks`: PII in the run's answers;
- `ended_validly`: the run ended with an outcome and a history every provider accepts;
- `RubricJudge(model)`: an LLM judge (openevals) scores the answer against the case's rubric.

An evaluator is any callable `f(run) -> Score | None`, sync or async.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, ToolCall

from keel.errors import SetupError, UserError
from keel.evals.results import CaseRun, Score, ToolStep
from keel.evals.suite import TrajectoryMatch
from keel.history import valid_history
from keel.models import resolve_model
from keel.pricing import PriceTable
from keel.redact import find_pii

__all__ = [
    "Evaluator",
    "RubricJudge",
    "default_evaluators",
    "ended_validly",
    "evaluate",
    "match_trajectory",
    "outcome_match",
    "pii_leaks",
    "tool_success",
    "trajectory_match",
    "unauthorized_executions",
    "within_budgets",
]

Evaluator = Callable[[CaseRun], "Score | Awaitable[Score | None] | None"]
"""Looks at a run and returns a `Score`, or `None` when the case asks nothing of it."""

_INSTALL = "pip install 'langgraph-keel[evals]'"


def outcome_match(run: CaseRun) -> Score | None:
    """The outcome's `status` and `terminated_reason` are the case's expected ones."""
    expect = run.case.expect
    wanted = {"status": expect.status, "terminated_reason": expect.terminated_reason}
    wanted = {k: v for k, v in wanted.items() if v is not None}
    if not wanted:
        return None
    got = {k: run.outcome.get(k) for k in wanted}
    return Score("outcome", got == wanted, detail="" if got == wanted else f"{got} != {wanted}")


async def match_trajectory(
    actual: Sequence[ToolCall | ToolStep], expected: TrajectoryMatch
) -> bool:
    """Whether `actual` tool calls match `expected`, with agentevals' trajectory match.

    Each call is compared as one assistant turn, so parallel calls and sequential calls of the
    same tools compare equal; `strict` checks the order, `unordered` the multiset, `subset`
    that no call falls outside the expected ones, `superset` that all expected calls were made.

    Raises:
        SetupError: agentevals is not installed.
    """
    try:
        from agentevals.trajectory.match import create_async_trajectory_match_evaluator
    except ImportError as exc:  # pragma: no cover - the `evals` extra is a dev dependency
        raise SetupError(f"Trajectory matching uses agentevals: {_INSTALL}.") from exc
    evaluator = create_async_trajectory_match_evaluator(
        trajectory_match_mode=expected.mode,
        tool_args_match_mode=expected.args,
        tool_args_match_overrides=dict(expected.overrides) or None,
    )
    result = await evaluator(outputs=_turns(actual), reference_outputs=_turns(expected.calls))
    return bool(result["score"])


def _turns(calls: Sequence[ToolCall | ToolStep]) -> list[AIMessage]:
    out = []
    for i, c in enumerate(calls):
        name, args = (c.name, c.args) if isinstance(c, ToolStep) else (c["name"], c["args"])
        call = ToolCall(name=name, args=dict(args), id=f"call_{i}")
        out.append(AIMessage(content="", tool_calls=[call]))
    return out


async def trajectory_match(run: CaseRun) -> Score | None:
    """The run's tool calls match the case's expected trajectory (see `match_trajectory`)."""
    expected = run.case.expect.trajectory
    if expected is None:
        return None
    ok = await match_trajectory(run.trajectory, expected)
    got = [t.name for t in run.trajectory]
    want = [c["name"] for c in expected.calls]
    return Score("trajectory", ok, detail="" if ok else f"{expected.mode}: {got} vs {want}")


def tool_success(run: CaseRun) -> Score | None:
    """Every tool call of the run succeeded (value: the share that did)."""
    if not run.case.expect.tools_succeed:
        return None
    if not run.trajectory:
        return Score("tool_success", True, 1.0)
    failed = [f"{t.name}: {t.status}" for t in run.trajectory if t.status != "success"]
    share = 1 - len(failed) / len(run.trajectory)
    return Score("tool_success", not failed, share, "; ".join(failed))


def within_budgets(run: CaseRun) -> Score | None:
    """USD, tokens, steps, model and tool calls and latency are within the case's budgets.

    A usd budget fails, rather than passes at $0, when the run spent nothing and answered with
    a model keel's price table does not know: its calls were never priced.
    """
    limits = run.case.budgets.limits()
    if not limits:
        return None
    usage = run.usage
    tokens_in, tokens_out = int(usage.get("input_tokens", 0)), int(usage.get("output_tokens", 0))
    spent = {
        "usd": float(usage.get("usd", 0.0)),
        "input_tokens": tokens_in,
        "output_tokens": tokens_out,
        "total_tokens": tokens_in + tokens_out,
        "steps": run.steps,
        "model_calls": int(usage.get("model_calls", 0)),
        "tool_calls": int(usage.get("tool_calls", 0)),
        "latency_seconds": run.latency,
    }
    over = [f"{k} {spent[k]:g} > {v:g}" for k, v in limits.items() if spent[k] > v]
    unpriced = _unpriced_models(run) if "usd" in limits and not spent["usd"] else []
    if unpriced:
        over.append(
            f"usd unknown: keel has no price for {', '.join(map(repr, unpriced))} (its calls "
            "counted $0); price it with `keel eval --price MODEL=IN,OUT` (or PriceTable in "
            "the graph factory)"
        )
    return Score("budgets", not over, detail="; ".join(over))


def _unpriced_models(run: CaseRun) -> list[str]:
    """The models the run's answers name that keel's price table does not know.

    None when it knows the model the run called (`run.model`): answers under another name (a
    dated or routed one, Ollama's bare names) are priced as that model, as `usage_of` does.
    """
    table = run.prices or PriceTable()
    if run.model and table.price_of(run.model) is not None:
        return []
    names = {
        str(m.response_metadata.get("model_name") or "")
        for m in run.messages
        if isinstance(m, AIMessage)
        and m.usage_metadata
        and not m.response_metadata.get("keel_partial")
    }
    return sorted(n for n in names if n and table.price_of(n) is None)


def unauthorized_executions(run: CaseRun) -> Score | None:
    """Count executions of the case's forbidden tools (what really ran, not what was said)."""
    forbidden = set(run.case.expect.forbidden_tools)
    if not forbidden:
        return None
    ran = [e.tool for e in run.executions if e.tool in forbidden]
    unknown = sorted(forbidden - set(run.tools)) if run.tools is not None else []
    if unknown:  # a typo would count nothing, and pass, forever
        return Score(
            "unauthorized_executions",
            False,
            float(len(ran)),
            f"forbidden_tools names {', '.join(unknown)}, which no tool of the agent is called "
            f"(its tools: {', '.join(sorted(run.tools or ())) or 'none'}); fix the name in the "
            "case",
        )
    return Score("unauthorized_executions", not ran, float(len(ran)), ", ".join(ran))


def pii_leaks(run: CaseRun) -> Score | None:
    """Count PII found in the run's answers (AI texts and the outcome's detail)."""
    if not run.case.expect.no_pii:
        return None
    texts = [str(m.text) for m in run.messages if isinstance(m, AIMessage)]
    texts.append(str(run.outcome.get("detail") or ""))
    found = [f"{m.kind}" for text in texts for m in find_pii(text)]
    return Score("pii_leaks", not found, float(len(found)), ", ".join(found))


def ended_validly(run: CaseRun) -> Score | None:
    """The run ended with an outcome (no bare exception) and a provider-valid history."""
    if not run.case.expect.valid_history:
        return None
    problems = []
    if run.raised is not None:
        problems.append(f"raised {run.raised}")
    if not run.outcome.get("status") or run.outcome.get("status") == "interrupted":
        problems.append(f"no final outcome ({run.outcome or 'none'})")
    repaired = valid_history(run.messages)  # type: ignore[arg-type]
    if len(repaired) != len(run.messages) or any(
        a is not b for a, b in zip(repaired, run.messages, strict=True)
    ):
        problems.append("the history is not valid for every provider")
    return Score("ended_validly", not problems, detail="; ".join(problems))


RUBRIC_PROMPT = """You grade an AI agent's final answer against a rubric.

<rubric>
{rubric}
</rubric>

<conversation>
{inputs}
</conversation>

<answer>
{outputs}
</answer>

Does the answer meet every point of the rubric?"""


class RubricJudge:
    """An LLM judge (openevals' `create_async_llm_as_judge`) scoring answers against rubrics.

    Works with any LangChain chat model that supports structured output; in tests, keel's
    `ScriptedChatModel(structured={"score": {"reasoning": ..., "score": True}})`.

    Args:
        model: The judge: a chat model or a model string.
        prompt: The grading prompt, with `{rubric}`, `{inputs}` and `{outputs}`.
    """

    def __init__(self, model: str | BaseChatModel, *, prompt: str = RUBRIC_PROMPT) -> None:
        self.model = resolve_model(model)
        self.prompt = prompt

    async def __call__(self, run: CaseRun) -> Score | None:
        """Score the run's answer, or `None` if the case has no rubric."""
        rubric = run.case.rubric
        if rubric is None:
            return None
        try:
            from openevals.llm import create_async_llm_as_judge
        except ImportError as exc:  # pragma: no cover - the `evals` extra is a dev dependency
            raise SetupError(f"The rubric judge uses openevals: {_INSTALL}.") from exc
        judge = create_async_llm_as_judge(
            prompt=self.prompt.replace("{rubric}", rubric), judge=self.model, feedback_key="rubric"
        )
        inputs = "\n".join(f"{role}: {text}" for role, text in run.case.messages)
        try:
            result: Any = await judge(inputs=inputs, outputs=run.answer)
        except (UserError, SetupError):
            raise
        except Exception as exc:  # the judge failed or its verdict did not parse: a failed score
            return _unjudged(f"the judge gave no verdict: {type(exc).__name__}: {exc}")
        verdict = result.get("score") if isinstance(result, Mapping) else None
        if not isinstance(verdict, bool):
            return _unjudged(f"the judge's verdict is not a true/false score: {result!r}")
        comment = _clipped(str(result.get("comment") or ""))
        return Score("rubric", verdict, float(verdict), comment)


_DETAIL_CHARS = 2000
"""The longest judge comment a score keeps (reports show every score's detail)."""


def _clipped(text: str) -> str:
    if len(text) <= _DETAIL_CHARS:
        return text
    return f"{text[:_DETAIL_CHARS]}... ({len(text) - _DETAIL_CHARS} more characters)"


def _unjudged(why: str) -> Score:
    """A rubric the judge did not answer: failed, never passed unjudged."""
    return Score("rubric", False, detail=_clipped(f"{why} (the rubric counts as failed)"))


def no_judge(run: CaseRun) -> Score | None:
    """A rubric with no judge model fails rather than passing unjudged."""
    if run.case.rubric is None:
        return None
    return Score(
        "rubric", False, detail="no judge model: pass --judge MODEL or set `judge:` in the suite"
    )


def default_evaluators(judge: str | BaseChatModel | None = None) -> list[Evaluator]:
    """Every built-in evaluator; rubrics are judged by `judge` (and fail without one)."""
    rubric: Evaluator = RubricJudge(judge) if judge is not None else no_judge
    return [
        outcome_match,
        trajectory_match,
        tool_success,
        within_budgets,
        unauthorized_executions,
        pii_leaks,
        ended_validly,
        rubric,
    ]


async def evaluate(run: CaseRun, evaluators: Sequence[Evaluator]) -> list[Score]:
    """Run `evaluators` on `run` (sync or async), keeping the scores that apply.

    An evaluator that raises fails its score (named after it, the error as the detail): one
    broken evaluator costs the run that score, not the suite its results.
    """
    scores = []
    for evaluator in evaluators:
        try:
            result = evaluator(run)
            if inspect.isawaitable(result):
                result = await result
        except (UserError, SetupError):
            raise
        except Exception as exc:
            name = getattr(evaluator, "__name__", type(evaluator).__name__)
            result = Score(name, False, detail=_clipped(f"raised {type(exc).__name__}: {exc}"))
        if result is not None:
            scores.append(result)
    return scores
