"""A suite as a LangSmith experiment: `keel eval SUITE --langsmith`.

With a LangSmith key, `arun_experiment` uploads the suite's cases as a dataset (created once,
then reused by name: cases added to the suite are added to it), runs every case through
`langsmith.aevaluate` on the graph under test, and scores each run with keel's evaluators,
each wrapped as a LangSmith evaluator, so the experiment in LangSmith shows keel's scores per
case. The same runs come back as a `SuiteResult` for keel's local reports.

Without a key it refuses before anything touches the network (`UserError`).
"""

from __future__ import annotations

import asyncio
import inspect
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from langchain_core.language_models import BaseChatModel

from keel.errors import UserError
from keel.evals.evaluators import Evaluator, default_evaluators
from keel.evals.feedback import langsmith_key
from keel.evals.results import CaseRun, SuiteResult
from keel.evals.runner import (
    GraphFactory,
    _check_counts,
    _model_for,
    arun_case,
    graph_name,
    suite_factories,
)
from keel.evals.suite import Case, Suite
from keel.pricing import PriceTable
from keel.redact import sanitize

__all__ = ["arun_experiment", "dataset_name", "langsmith_evaluator"]


def dataset_name(suite: Suite) -> str:
    """The LangSmith dataset a suite is uploaded as: `keel-<suite name>`."""
    return f"keel-{suite.name}"


def _example(case: Case) -> dict[str, Any]:
    return {
        "inputs": {"case": case.id, "messages": [list(m) for m in case.messages]},
        "reference_outputs": {
            "status": case.expect.status,
            "terminated_reason": case.expect.terminated_reason,
            "rubric": case.rubric,
        },
        "metadata": {"case": case.id, "tags": list(case.tags)},
    }


def ensure_dataset(client: Any, suite: Suite, name: str) -> Any:
    """The dataset `name`, created when missing; cases it lacks are added (by case id)."""
    if client.has_dataset(dataset_name=name):
        dataset = client.read_dataset(dataset_name=name)
        known = {
            str((e.inputs or {}).get("case")) for e in client.list_examples(dataset_id=dataset.id)
        }
    else:
        description = f"keel eval suite {suite.name!r} ({len(suite.cases)} cases)"
        dataset = client.create_dataset(name, description=description)
        known = set()
    missing = [_example(c) for c in suite.cases if c.id not in known]
    if missing:
        client.create_examples(dataset_id=dataset.id, examples=missing)
    return dataset


def langsmith_evaluator(
    evaluator: Evaluator, runs: dict[str, CaseRun]
) -> Callable[[Any, Any], Awaitable[dict[str, Any]]]:
    """`evaluator` as a LangSmith evaluator of the runs `runs` holds (by the `keel_run` output)."""

    async def judge(run: Any, example: Any) -> dict[str, Any]:
        case_run = runs[str((run.outputs or {}).get("keel_run"))]
        score = evaluator(case_run)
        if inspect.isawaitable(score):
            score = await score
        if score is None:  # the case asks nothing of this evaluator
            return {"results": []}
        case_run.scores.append(score)
        value = f" (value {score.value:g})" if score.value is not None else ""
        return {"key": score.name, "score": float(score.passed), "comment": score.detail + value}

    judge.__name__ = judge.__qualname__ = getattr(evaluator, "__name__", type(evaluator).__name__)
    return judge


async def arun_experiment(
    suite: Suite,
    graph: str | GraphFactory | None = None,
    *,
    model: str | BaseChatModel | None = None,
    judge: str | BaseChatModel | None = None,
    evaluators: Sequence[Evaluator] | None = None,
    repeat: int = 1,
    concurrency: int = 4,
    dataset: str | None = None,
    experiment_prefix: str | None = None,
    client: Any = None,
    prices: PriceTable | None = None,
) -> tuple[SuiteResult, str]:
    """Run `suite` as a LangSmith experiment; returns keel's result and the experiment's name.

    Args:
        suite: The suite.
        graph: The graph factory (default: the suite's, else keel's demo agent).
        model: A model for every case.
        judge: The rubric judge's model.
        evaluators: keel evaluators (default: `default_evaluators(judge)`).
        repeat: Runs per case (LangSmith repetitions).
        concurrency: Runs at once.
        dataset: The dataset's name (default `keel-<suite>`), created or reused.
        experiment_prefix: The experiment's name prefix (default: the suite's name).
        client: A `langsmith.Client` (default: one for `LANGSMITH_ENDPOINT` and the key).
        prices: Prices for the graph factories, as in `arun_suite`.

    Raises:
        UserError: no LangSmith key (and no `client`): nothing is sent.
    """
    if client is None and not langsmith_key():
        raise UserError(
            "keel eval --langsmith runs the suite as a LangSmith experiment and needs "
            "LANGSMITH_API_KEY (and LANGSMITH_ENDPOINT for a self-hosted LangSmith). Without "
            "--langsmith the suite runs locally and nothing is sent."
        )
    _check_counts(repeat=repeat, concurrency=concurrency)
    from langsmith import aevaluate

    if client is None:
        from keel.observe.tracing import sanitizing_client

        client = sanitizing_client()
    factory, own = suite_factories(suite, graph, prices)  # before sending
    cases = {c.id: c for c in suite.cases}
    models = {c.id: _model_for(c, suite, model) for c in suite.cases}  # checked before sending
    name = dataset or dataset_name(suite)
    ensure_dataset(client, suite, name)
    runs: dict[str, CaseRun] = {}
    repeats: dict[str, int] = {}

    async def target(inputs: dict[str, Any]) -> dict[str, Any]:
        case = cases.get(str(inputs.get("case")))
        if case is None:
            raise UserError(
                f"The dataset {name!r} has a case {inputs.get('case')!r} the suite lacks."
            )
        index = repeats[case.id] = repeats.get(case.id, -1) + 1
        built = own[case.graph] if case.graph is not None else factory
        run = await arun_case(case, built, model=models[case.id], repeat=index, prices=prices)
        token = uuid.uuid4().hex
        runs[token] = run
        return sanitize({"keel_run": token, **run.to_dict()})

    scorers = evaluators or default_evaluators(judge or suite.judge)
    wrapped: list[Any] = [langsmith_evaluator(e, runs) for e in scorers]
    results = await aevaluate(
        target,
        data=name,
        evaluators=wrapped,
        experiment_prefix=experiment_prefix or suite.name,
        metadata={"suite": suite.name, "graph": graph_name(suite, graph)},
        max_concurrency=concurrency,
        num_repetitions=repeat,
        client=client,
    )
    async for _ in results:  # wait for every row (runs and their scores)
        pass
    await asyncio.to_thread(client.flush)  # langsmith sends scores from a background queue
    ordered = sorted(runs.values(), key=lambda r: (list(cases).index(r.case.id), r.repeat))
    return SuiteResult(
        suite=suite.name, runs=ordered, graph=graph_name(suite, graph)
    ), results.experiment_name
