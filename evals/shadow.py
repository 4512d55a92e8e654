"""Shadow comparison: a candidate version beside the current one, side effects stubbed.

`ashadow(suite, graph, candidate)` runs a suite on the current graph factory and on a candidate
(another factory: a new system prompt, policy or graph; or the same factory with
`candidate_model`) and pairs their runs case by case: outcome, tool trajectory, cost and judge
score (the suite's own evaluators, rubric judge included). Every tool that is not declared
read-only (`RegisteredTool.read_only`: `write` and `destructive` tools, and plain functions and
LangChain tools, whose `read` is only a default) is stubbed on both sides: it answers a canned
result and its body never runs (`ShadowResult.stubbed` lists the calls); tools declared
read-only with keel's `tool(...)` run as usual.

`ashadow_threads(threads, candidate, db=URL, model=M)` does the same on stored threads: each is
replayed on the candidate (live with `model`, else from its cassette) and diffed with what was
recorded (`keel.evals.replay`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import ToolCall

from keel.errors import UserError
from keel.evals._sync import sync
from keel.evals.cassette import RecordedCall
from keel.evals.replay import ReplayDiff, areplay, outcomes_differ, step_key
from keel.evals.results import CaseRun, SuiteResult
from keel.evals.runner import GraphFactory, arun_suite
from keel.evals.suite import Suite
from keel.pricing import PriceTable
from keel.tools.registry import RegisteredTool
from keel.tools.stubs import StubAnswer, stubbing

__all__ = ["ShadowPair", "ShadowResult", "SideEffectStub", "ashadow", "ashadow_threads", "shadow"]


@dataclass(slots=True)
class SideEffectStub:
    """A tool stub that answers every call to a tool not declared read-only with `canned`."""

    canned: str = "(shadow run) {tool} was not run; assume it succeeded."
    """The answer; `{tool}` is replaced by the tool's name."""
    calls: list[RecordedCall] = field(default_factory=list)
    """The calls it answered (their tools never ran)."""

    def __call__(self, tool: RegisteredTool, call: ToolCall) -> StubAnswer | None:
        """A canned answer; `None` (run it) for a tool declared read-only (`tool.read_only`)."""
        if tool.read_only:
            return None
        content = self.canned.replace("{tool}", call["name"])
        self.calls.append(RecordedCall(call["name"], dict(call["args"]), content, "success"))
        return StubAnswer(content)


@dataclass(frozen=True, slots=True)
class ShadowPair:
    """One case's run on the current version and on the candidate."""

    baseline: CaseRun
    """The current version's run."""
    candidate: CaseRun
    """The candidate's run."""

    @property
    def compared(self) -> bool:
        """Whether the candidate ran the case (not when the case names its own `graph:`).

        A case's own graph wins over both factories: it ran on that graph on both sides.
        """
        return self.baseline.case.graph is None

    @property
    def outcome_changed(self) -> bool:
        """Whether `status` or `terminated_reason` differ."""
        return outcomes_differ(self.baseline.outcome, self.candidate.outcome)

    @property
    def trajectory_changed(self) -> bool:
        """Whether the tool calls (names, arguments, statuses, in order) differ."""
        a, b = self.baseline.trajectory, self.candidate.trajectory
        return [step_key(t) for t in a] != [step_key(t) for t in b]

    @property
    def usd_delta(self) -> float:
        """Candidate minus baseline cost, in USD."""
        return round(_usd(self.candidate) - _usd(self.baseline), 8)

    @property
    def judge_delta(self) -> float | None:
        """Candidate minus baseline rubric score, when both were judged."""
        a, b = self.baseline.score("rubric"), self.candidate.score("rubric")
        if a is None or b is None or a.value is None or b.value is None:
            return None
        return b.value - a.value

    @property
    def changed(self) -> bool:
        """Whether outcome, trajectory, pass/fail or judge score differ."""
        return (
            self.outcome_changed
            or self.trajectory_changed
            or self.baseline.passed != self.candidate.passed
            or bool(self.judge_delta)
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "case": self.baseline.case.id,
            "repeat": self.baseline.repeat,
            "compared": self.compared,
            "changed": self.changed,
            "outcome_changed": self.outcome_changed,
            "trajectory_changed": self.trajectory_changed,
            "usd_delta": self.usd_delta,
            "judge_delta": self.judge_delta,
            "baseline": self.baseline.to_dict(),
            "candidate": self.candidate.to_dict(),
        }


def _usd(run: CaseRun) -> float:
    return float(run.usage.get("usd", 0.0))


@dataclass(kw_only=True, slots=True)
class ShadowResult:
    """A suite run on the current version and on a candidate, paired by case."""

    baseline: SuiteResult
    """The current version's results."""
    candidate: SuiteResult
    """The candidate's results."""
    pairs: list[ShadowPair]
    """The runs, paired by case and repeat."""
    stubbed: dict[str, list[RecordedCall]]
    """Side-effecting calls answered by the stub, per side (`baseline`, `candidate`)."""

    def changed(self) -> list[ShadowPair]:
        """The pairs that differ."""
        return [p for p in self.pairs if p.changed]

    def summary(self) -> dict[str, Any]:
        """Pass rates, costs and the counts of differences."""
        return {
            "suite": self.baseline.suite,
            "baseline": self.baseline.graph,
            "candidate": self.candidate.graph,
            "runs": len(self.pairs),
            "not_compared": sorted({p.baseline.case.id for p in self.pairs if not p.compared}),
            "changed": len(self.changed()),
            "outcome_changed": sum(p.outcome_changed for p in self.pairs),
            "trajectory_changed": sum(p.trajectory_changed for p in self.pairs),
            "baseline_pass_rate": round(self.baseline.pass_rate, 4),
            "candidate_pass_rate": round(self.candidate.pass_rate, 4),
            "baseline_usd": self.baseline.summary()["usd"],
            "candidate_usd": self.candidate.summary()["usd"],
            "stubbed_calls": {side: len(calls) for side, calls in self.stubbed.items()},
            "side_effects_run": self.side_effects_run(),
        }

    def side_effects_run(self) -> int:
        """Bodies of stubbed (side-effecting) tools that ran anyway: 0 unless the stub failed."""
        names = {c.name for calls in self.stubbed.values() for c in calls}
        runs = [*self.baseline.runs, *self.candidate.runs]
        return sum(e.tool in names for r in runs for e in r.executions)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: the summary and every pair."""
        return {"summary": self.summary(), "pairs": [p.to_dict() for p in self.pairs]}


async def ashadow(
    suite: Suite,
    graph: str | GraphFactory | None = None,
    candidate: str | GraphFactory | None = None,
    *,
    model: str | BaseChatModel | None = None,
    candidate_model: str | BaseChatModel | None = None,
    judge: str | BaseChatModel | None = None,
    repeat: int = 1,
    concurrency: int = 4,
    prices: PriceTable | None = None,
) -> ShadowResult:
    """Run `suite` on `graph` and on `candidate`, side effects stubbed, and pair the runs.

    Args:
        suite: The suite.
        graph: The current graph factory (default: the suite's).
        candidate: The candidate's graph factory (default: `graph`, with `candidate_model`).
        model: A model for every case of the current version (default: the cases').
        candidate_model: A model for every case of the candidate (default: `model`).
        judge: The rubric judge's model (default: the suite's).
        repeat: Runs per case on each side.
        concurrency: Runs at once.
        prices: Prices for both sides' graph factories, as in `arun_suite`.

    Raises:
        UserError: no candidate (neither a graph factory nor a model), or an empty one.
    """
    for what, given in (("graph factory", candidate), ("model", candidate_model)):
        if isinstance(given, str) and not given.strip():  # it ran the current version twice
            raise UserError(f"The candidate's {what} is empty: name one, or leave it out (None).")
    if candidate is None and candidate_model is None:
        raise UserError("A shadow run needs a candidate: a graph factory and/or a candidate model.")
    options: dict[str, Any] = {"judge": judge, "repeat": repeat, "concurrency": concurrency}
    options["prices"] = prices
    stubs = {"baseline": SideEffectStub(), "candidate": SideEffectStub()}
    with stubbing(stubs["baseline"]):
        base = await arun_suite(suite, graph, model=model, **options)
    with stubbing(stubs["candidate"]):
        cand = await arun_suite(
            suite, candidate or graph, model=candidate_model or model, **options
        )
    if candidate is None:
        cand.graph = f"{cand.graph} (model {candidate_model})"
    pairs = [ShadowPair(a, b) for a, b in zip(base.runs, cand.runs, strict=True)]
    return ShadowResult(
        baseline=base,
        candidate=cand,
        pairs=pairs,
        stubbed={side: stub.calls for side, stub in stubs.items()},
    )


def shadow(suite: Suite, graph: str | GraphFactory | None = None, **options: Any) -> ShadowResult:
    """Sync entry point of `ashadow` (not from a running event loop: await `ashadow`)."""
    return sync("shadow", lambda: ashadow(suite, graph, **options))


async def ashadow_threads(
    threads: Sequence[str],
    candidate: str | GraphFactory,
    *,
    db: str | None = None,
    model: str | BaseChatModel | None = None,
    prices: PriceTable | None = None,
) -> list[ReplayDiff]:
    """Replay each stored thread on `candidate` (live with `model`, else from its cassette)."""
    live = model is not None
    return [
        await areplay(t, candidate, db=db, live=live, model=model, prices=prices) for t in threads
    ]
