"""A suite as pytest tests: one parametrized test per case, failing with the scores that failed.

Example:
    ```python
    import pytest
    from keel.evals import load_suite
    from keel.evals.testing import check_case, suite_cases

    SUITE = load_suite("evals/refunds.yaml")

    @pytest.mark.parametrize("case", suite_cases(SUITE))
    async def test_refunds(case):
        await check_case(SUITE, case)  # graph, model and judge from the suite
    ```
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from langchain_core.language_models import BaseChatModel

from keel.evals.evaluators import Evaluator
from keel.evals.results import CaseRun
from keel.evals.runner import GraphFactory, arun_suite
from keel.evals.suite import Case, Suite, load_suite

__all__ = ["CaseFailed", "check_case", "suite_cases"]


class CaseFailed(AssertionError):
    """A case's run failed some scores (pytest shows the message)."""

    def __init__(self, run: CaseRun) -> None:
        self.run = run
        """The failed run."""
        lines = [f"case {run.case.id!r} failed (outcome {run.outcome or 'none'}):"]
        if run.raised:
            lines.append(f"  raised {run.raised}")
        lines += [f"  {s.name}: {s.detail or 'failed'}" for s in run.scores if not s.passed]
        lines.append(f"  tools: {[t.name + ':' + t.status for t in run.trajectory]}")
        super().__init__("\n".join(lines))


def suite_cases(suite: Suite | str | Path) -> list[Any]:
    """`pytest.param(case, id=case.id)` for every case: the argument of `parametrize`."""
    import pytest  # only where pytest runs

    loaded = suite if isinstance(suite, Suite) else load_suite(suite)
    return [pytest.param(case, id=case.id) for case in loaded.cases]


async def check_case(
    suite: Suite,
    case: Case,
    graph: str | GraphFactory | None = None,
    *,
    model: str | BaseChatModel | None = None,
    judge: str | BaseChatModel | None = None,
    evaluators: list[Evaluator] | None = None,
) -> CaseRun:
    """Run one case of `suite` and score it; raise `CaseFailed` unless every score passed."""
    one = dataclasses.replace(suite, cases=(case,))
    result = await arun_suite(one, graph, model=model, judge=judge, evaluators=evaluators)
    (run,) = result.runs
    if not run.passed:
        raise CaseFailed(run)
    return run
