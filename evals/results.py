"""What an eval run produces: a `CaseRun` per case and repeat, its `Score`s, a `SuiteResult`."""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage

from keel.evals.executions import Execution
from keel.evals.suite import Case
from keel.pricing import PriceTable

__all__ = ["CaseRun", "Score", "SuiteResult", "ToolStep"]


@dataclass(frozen=True, slots=True)
class Score:
    """One evaluator's verdict on one run."""

    name: str
    """The evaluator (`outcome`, `trajectory`, `budgets`, `rubric`, ...)."""
    passed: bool
    """Whether the run passed this check."""
    value: float | None = None
    """A number behind the verdict (a count, a share, a judge's score), if any."""
    detail: str = ""
    """Why, in a sentence."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "name": self.name,
            "passed": self.passed,
            "value": self.value,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class ToolStep:
    """One tool call the model made, and how it ended."""

    name: str
    """The tool's name, as the model spelled it."""
    args: Mapping[str, Any]
    """The arguments the model gave."""
    status: str
    """keel's status for the call (`success`, `denied`, `rejected`, `error`, ...) or `missing`."""


@dataclass(kw_only=True, slots=True)
class CaseRun:
    """One run of one case: what came out, and the scores."""

    case: Case
    """The case that ran."""
    repeat: int = 0
    """Which repetition (0-based) of the case this is."""
    model: str = ""
    """The model's label."""
    outcome: dict[str, Any] = field(default_factory=dict)
    """The final `outcome` (`status`, `terminated_reason`, `detail`); empty if the run had none."""
    messages: list[BaseMessage] = field(default_factory=list)
    """The final conversation."""
    trajectory: list[ToolStep] = field(default_factory=list)
    """Every tool call the model made, in order."""
    usage: dict[str, Any] = field(default_factory=dict)
    """keel's usage record (tokens, USD, model and tool calls)."""
    steps: int = 0
    """Node executions (LangGraph updates) the run took, resumes included."""
    latency: float = 0.0
    """Wall-clock seconds."""
    executions: list[Execution] = field(default_factory=list)
    """Tool bodies that really ran (recorded by the eval graph's tools)."""
    tools: list[str] | None = None
    """The names of the graph's tools, when the runner could find them (a `build_agent` graph,
    a `ToolNode`); `None` when it could not."""
    raised: str | None = None
    """The exception that escaped the graph, if one did (a run should never end so)."""
    scores: list[Score] = field(default_factory=list)
    """The evaluators' verdicts."""
    prices: PriceTable | None = field(default=None, repr=False, compare=False)
    """The price table the run's graph was given (`keel eval --price`); None: keel's own."""

    @property
    def passed(self) -> bool:
        """Every score passed (and the run did not raise)."""
        return self.raised is None and all(s.passed for s in self.scores)

    @property
    def answer(self) -> str:
        """The last AI text of the run (empty if none)."""
        for message in reversed(self.messages):
            if isinstance(message, AIMessage) and message.text:
                return message.text
        return str(self.outcome.get("detail") or "")

    def score(self, name: str) -> Score | None:
        """The score named `name`, if it was evaluated."""
        return next((s for s in self.scores if s.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (messages left out; see the trajectory and answer)."""
        return {
            "case": self.case.id,
            "repeat": self.repeat,
            "model": self.model,
            "passed": self.passed,
            "outcome": self.outcome,
            "answer": self.answer,
            "trajectory": [
                {"name": t.name, "args": dict(t.args), "status": t.status} for t in self.trajectory
            ],
            "usage": self.usage,
            "steps": self.steps,
            "latency": round(self.latency, 6),
            "executions": [{"tool": e.tool, "args": dict(e.args)} for e in self.executions],
            "raised": self.raised,
            "scores": [s.to_dict() for s in self.scores],
        }


@dataclass(kw_only=True, slots=True)
class SuiteResult:
    """All runs of a suite, with the numbers a report shows."""

    suite: str
    """The suite's name."""
    runs: list[CaseRun]
    """Every case run, in case order then repeat order."""
    graph: str = ""
    """The graph factory the suite ran on."""

    @property
    def pass_rate(self) -> float:
        """Share of runs that passed (1.0 for no runs)."""
        return sum(r.passed for r in self.runs) / len(self.runs) if self.runs else 1.0

    def total(self, score: str) -> float:
        """The sum of a score's values over all runs (e.g. `unauthorized_executions`)."""
        return sum((s.value or 0.0) for r in self.runs if (s := r.score(score)) is not None)

    def failed(self) -> list[CaseRun]:
        """The runs that did not pass."""
        return [r for r in self.runs if not r.passed]

    def summary(self) -> dict[str, Any]:
        """Pass rate, counts, the sums of counted scores, and latency/cost percentiles."""
        latencies = sorted(r.latency for r in self.runs)
        counted = sorted({s.name for r in self.runs for s in r.scores if _is_count(s)})
        return {
            "suite": self.suite,
            "graph": self.graph,
            "runs": len(self.runs),
            "passed": sum(r.passed for r in self.runs),
            "pass_rate": round(self.pass_rate, 4),
            "totals": {name: self.total(name) for name in counted},
            "latency_p50": _quantile(latencies, 0.5),
            "latency_p95": _quantile(latencies, 0.95),
            "usd": round(sum(float(r.usage.get("usd", 0.0)) for r in self.runs), 6),
            "mean_steps": statistics.fmean([r.steps for r in self.runs]) if self.runs else 0.0,
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: the summary and every run."""
        return {"summary": self.summary(), "runs": [r.to_dict() for r in self.runs]}


_COUNTED = ("unauthorized_executions", "pii_leaks")


def _is_count(score: Score) -> bool:
    return score.name in _COUNTED


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    index = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return round(values[index], 6)
