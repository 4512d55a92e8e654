"""`keel report`: what the run records say about an agent, checked against SLO objectives.

`build_report(records, scores)` is pure: success rate, latency percentiles, cost per request and
per user, tool success rates, error categories, the human-intervention rate, steps per task and
satisfaction (the mean feedback score, `RunLog.scores`). `by_version` compares the agent
versions that served the runs (`keel report --by version`, see `keel.versions`).
`Objective`s (from a TOML or YAML file, `load_objectives`) are checked by `breaches`;
`render_html` writes a self-contained page with inline SVG charts (no scripts, no CDN).
"""

from __future__ import annotations

import html
import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from keel._data_files import load_data_file
from keel.db.runs import RunRecord
from keel.errors import UserError

__all__ = [
    "Objective",
    "Report",
    "VersionStats",
    "breaches",
    "build_report",
    "by_version",
    "load_objectives",
    "percentile",
    "render_html",
    "render_text",
    "render_versions",
]

METRICS = (
    "runs",
    "success_rate",
    "latency_p50",
    "latency_p95",
    "latency_p99",
    "cost_per_request",
    "tool_success_rate",
    "intervention_rate",
    "steps_per_task",
)
"""The report's scalar metrics, the names an `Objective` may use."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Report:
    """Aggregates over finished runs (runs paused for a human are counted in `waiting`)."""

    runs: int
    """Finished runs."""
    waiting: int
    """Runs paused for a human at the time of the report."""
    success_rate: float
    """Share of finished runs that completed."""
    latency_p50: float
    """Median seconds per run."""
    latency_p95: float
    """95th percentile seconds per run."""
    latency_p99: float
    """99th percentile seconds per run."""
    cost_per_request: float
    """Mean USD per run."""
    total_usd: float
    """USD over all runs."""
    tool_success_rate: float
    """Share of tool calls that did not fail (1.0 without tool calls)."""
    intervention_rate: float
    """Share of runs a human was asked about."""
    steps_per_task: float
    """Mean node steps per run."""
    cost_per_user: dict[str, float] = field(default_factory=dict)
    """USD per user."""
    tools: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per tool: calls, failures, success rate."""
    error_categories: dict[str, int] = field(default_factory=dict)
    """Runs per error category (completed runs are not counted)."""
    satisfaction: float | None = None
    """The mean feedback score on these runs (`None`: no scored feedback)."""
    feedback: int = 0
    """How many feedback scores `satisfaction` is the mean of."""

    def to_dict(self) -> dict[str, Any]:
        """The report as a JSON-able dict."""
        return asdict(self)


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0 to 100) of `values`, linearly interpolated; 0.0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def build_report(
    records: Sequence[RunRecord], scores: Mapping[str, Sequence[float]] | None = None
) -> Report:
    """The report over `records` (`RunLog.query`) and their feedback `scores` (`RunLog.scores`)."""
    done = [r for r in records if r.status != "interrupted"]
    n = len(done)
    latency = [r.latency_s for r in done]
    per_user: dict[str, float] = defaultdict(float)
    tools: dict[str, dict[str, float]] = {}
    for r in done:
        per_user[r.user_id or "-"] += r.usd
        for name, counts in r.tools.items():
            entry = tools.setdefault(name, {"calls": 0, "failures": 0})
            entry["calls"] += counts.get("calls", 0)
            entry["failures"] += counts.get("failures", 0)
    for entry in tools.values():
        entry["success_rate"] = 1 - entry["failures"] / entry["calls"] if entry["calls"] else 1.0
    calls = sum(e["calls"] for e in tools.values())
    failures = sum(e["failures"] for e in tools.values())
    total = sum(r.usd for r in done)
    given = _scores(records, scores)
    return Report(
        runs=n,
        waiting=len(records) - n,
        success_rate=_share(sum(r.status == "success" for r in done), n),
        latency_p50=percentile(latency, 50),
        latency_p95=percentile(latency, 95),
        latency_p99=percentile(latency, 99),
        cost_per_request=total / n if n else 0.0,
        total_usd=total,
        tool_success_rate=1 - failures / calls if calls else 1.0,
        intervention_rate=_share(sum(r.interrupts > 0 for r in done), n),
        steps_per_task=sum(r.steps for r in done) / n if n else 0.0,
        cost_per_user=dict(sorted(per_user.items())),
        tools=dict(sorted(tools.items())),
        error_categories=dict(Counter(r.error_category for r in done if r.error_category)),
        satisfaction=sum(given) / len(given) if given else None,
        feedback=len(given),
    )


def _scores(
    records: Sequence[RunRecord], scores: Mapping[str, Sequence[float]] | None
) -> list[float]:
    scores = scores or {}
    return [s for r in records for s in scores.get(r.run_key, ())]


UNVERSIONED = "unversioned"
"""The version `by_version` files runs under whose records predate versions (schema < 6)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class VersionStats:
    """How one agent version did: `by_version`'s row."""

    version: str
    """`AgentVersion.id`: the label, or `auto-<digest>`."""
    runs: int
    """Finished runs."""
    success_rate: float
    """Share of finished runs that completed."""
    outcomes: dict[str, int]
    """Finished runs per `terminated_reason`."""
    cost_per_request: float
    """Mean USD per run."""
    total_usd: float
    """USD over its runs."""
    tokens_per_request: float
    """Mean input + output tokens per run."""
    steps_per_task: float
    """Mean node steps per run."""
    latency_p50: float
    """Median seconds per run."""
    satisfaction: float | None
    """Mean feedback score (`None`: none given)."""
    feedback: int
    """Feedback scores given."""
    models: list[str]
    """The models it ran on."""
    prompt_hashes: list[str]
    """Its system prompts' hashes."""
    policies: list[str]
    """Its policies (`name@version`)."""
    first_seen: float
    """When its first run ended (Unix time)."""


def by_version(
    records: Sequence[RunRecord], scores: Mapping[str, Sequence[float]] | None = None
) -> list[VersionStats]:
    """One `VersionStats` per agent version in `records`, oldest version first."""
    groups: dict[str, list[RunRecord]] = {}
    for r in sorted(records, key=lambda r: r.ended_at):
        groups.setdefault(r.version or UNVERSIONED, []).append(r)
    out = []
    for version, runs in groups.items():
        done = [r for r in runs if r.status != "interrupted"]
        n = len(done)
        given = _scores(runs, scores)
        out.append(
            VersionStats(
                version=version,
                runs=n,
                success_rate=_share(sum(r.status == "success" for r in done), n),
                outcomes=dict(Counter(r.terminated_reason for r in done)),
                cost_per_request=sum(r.usd for r in done) / n if n else 0.0,
                total_usd=sum(r.usd for r in done),
                tokens_per_request=(
                    sum(r.input_tokens + r.output_tokens for r in done) / n if n else 0.0
                ),
                steps_per_task=sum(r.steps for r in done) / n if n else 0.0,
                latency_p50=percentile([r.latency_s for r in done], 50),
                satisfaction=sum(given) / len(given) if given else None,
                feedback=len(given),
                models=sorted({r.model for r in runs if r.model}),
                prompt_hashes=sorted({r.prompt_hash for r in runs if r.prompt_hash}),
                policies=sorted({r.policy for r in runs if r.policy}),
                first_seen=runs[0].ended_at,
            )
        )
    return out


def _share(count: int, total: int) -> float:
    return count / total if total else 0.0


# -- SLO objectives ----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class Objective:
    """One SLO: a report metric held to a bound, e.g. `latency_p95 <= 2.0`."""

    metric: str
    """One of `keel.app.report.METRICS`."""
    bound: Literal["min", "max"]
    """`min`: the metric must be at least `target`; `max`: at most."""
    target: float
    """The bound's value."""

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise UserError(f"Unknown SLO metric {self.metric!r}; use one of {list(METRICS)}.")
        if self.bound not in ("min", "max"):
            raise UserError(f"SLO {self.metric}: the bound is 'min' or 'max', not {self.bound!r}.")

    def breach(self, report: Report) -> str | None:
        """Why `report` breaches this objective, or None when it is met.

        A period with no finished run has no rate, latency or cost to hold to a bound (the
        report shows 0 for them): only `runs` is checked then (`runs = { min = 1 }` alerts on
        a quiet period); `success_rate >= 0.95` over no runs is not breached.
        """
        if report.runs == 0 and self.metric != "runs":
            return None
        value = float(getattr(report, self.metric))
        ok = value >= self.target if self.bound == "min" else value <= self.target
        if ok:
            return None
        sign = ">=" if self.bound == "min" else "<="
        return f"{self.metric} is {value:.4g}, objective {sign} {self.target:g}"


def load_objectives(path: str | Path) -> list[Objective]:
    """Objectives from a TOML or YAML file: `[slo]` then `metric = {min = x}` or `{max = x}`.

    Example (TOML):
        ```toml
        [slo]
        success_rate = { min = 0.95 }
        latency_p95 = { max = 2.0 }
        ```
    """
    p = Path(path).expanduser()
    data = load_data_file(p, "SLO file")
    slo = data.get("slo") if isinstance(data, Mapping) else None
    if not isinstance(slo, Mapping) or not slo:
        raise UserError(
            f"SLO file {str(p)!r} needs an [slo] table, e.g. success_rate = {{ min = 0.95 }}."
        )
    out = []
    for metric, spec in slo.items():
        if not isinstance(spec, Mapping) or len(spec) != 1:
            raise UserError(
                f"SLO {metric!r} in {str(p)!r} must be {{ min = x }} or {{ max = x }}, "
                f"got {spec!r}."
            )
        ((bound, target),) = spec.items()
        if isinstance(target, bool) or not isinstance(target, int | float):
            raise UserError(f"SLO {metric!r} in {str(p)!r}: {bound} must be a number.")
        if not math.isfinite(target):  # NaN compares false both ways: always or never breached
            raise UserError(f"SLO {metric!r} in {str(p)!r}: {bound} must be finite, got {target}.")
        out.append(Objective(metric=metric, bound=bound, target=float(target)))
    return out


def breaches(report: Report, objectives: Sequence[Objective]) -> list[str]:
    """The objectives `report` breaches, each as a sentence."""
    return [b for b in (o.breach(report) for o in objectives) if b is not None]


# -- text and HTML -----------------------------------------------------------------------------


def render_text(report: Report) -> str:
    """The report as plain text for a terminal."""
    lines = [
        f"runs: {report.runs} finished, {report.waiting} waiting for a human",
        f"success rate: {report.success_rate:.1%}",
        f"latency p50 / p95 / p99: {report.latency_p50:.3f} / {report.latency_p95:.3f} / "
        f"{report.latency_p99:.3f} s",
        f"cost per request: ${report.cost_per_request:.6f} (total ${report.total_usd:.6f})",
        f"human-intervention rate: {report.intervention_rate:.1%}",
        f"steps per task: {report.steps_per_task:.1f}",
        f"tool success rate: {report.tool_success_rate:.1%}",
    ]
    lines += [
        f"  {name}: {t['calls']:g} calls, {t['failures']:g} failed ({t['success_rate']:.1%} ok)"
        for name, t in report.tools.items()
    ]
    if report.error_categories:
        lines.append("error categories:")
        lines += [f"  {k}: {v}" for k, v in sorted(report.error_categories.items())]
    if report.cost_per_user:
        lines.append("cost per user:")
        lines += [f"  {k}: ${v:.6f}" for k, v in report.cost_per_user.items()]
    lines.append(f"satisfaction: {_satisfaction(report.satisfaction, report.feedback)}")
    return "\n".join(lines)


def _satisfaction(mean: float | None, count: int) -> str:
    return "no feedback" if mean is None else f"{mean:.2f} (mean of {count} scores)"


def render_versions(versions: Sequence[VersionStats]) -> str:
    """`by_version`'s rows as a plain-text table for a terminal."""
    if not versions:
        return "no runs"
    head = (
        f"{'version':<20} {'runs':>5} {'success':>8} {'$/run':>10} {'tokens':>8} {'steps':>6} "
        f"{'satisfaction':>13}  model / prompt / policy / outcomes"
    )
    lines = [head]
    for v in versions:
        sat = "-" if v.satisfaction is None else f"{v.satisfaction:.2f} ({v.feedback})"
        outcomes = ", ".join(f"{k}={n}" for k, n in sorted(v.outcomes.items()))
        lines.append(
            f"{v.version:<20} {v.runs:>5} {v.success_rate:>8.1%} {v.cost_per_request:>10.6f} "
            f"{v.tokens_per_request:>8.1f} {v.steps_per_task:>6.1f} {sat:>13}  "
            f"{'/'.join(v.models) or '-'} / {'/'.join(v.prompt_hashes) or '-'} / "
            f"{'/'.join(v.policies) or '-'} / {outcomes or '-'}"
        )
    return "\n".join(lines)


def _bars(title: str, values: Mapping[str, float], fmt: str = "{:.3g}") -> str:
    """A horizontal bar chart as inline SVG."""
    if not values:
        return f"<h2>{html.escape(title)}</h2><p>none</p>"
    top = max(values.values()) or 1.0
    row, width = 22, 360
    bars = []
    for i, (label, value) in enumerate(values.items()):
        y = i * row
        w = max(1.0, width * value / top)
        bars.append(
            f'<text x="0" y="{y + 15}" font-size="12">{html.escape(label)}</text>'
            f'<rect x="180" y="{y + 3}" width="{w:.1f}" height="16" fill="#4a7bd0"/>'
            f'<text x="{185 + w:.1f}" y="{y + 15}" font-size="12">'
            f"{html.escape(fmt.format(value))}</text>"
        )
    height = row * len(values)
    return (
        f"<h2>{html.escape(title)}</h2>"
        f'<svg xmlns="http://www.w3.org/2000/svg" width="640" height="{height}" '
        f'role="img" aria-label="{html.escape(title)}">{"".join(bars)}</svg>'
    )


def render_html(
    report: Report, breached: Sequence[str] = (), versions: Sequence[VersionStats] = ()
) -> str:
    """A self-contained HTML page: the figures, SLO breaches and inline SVG bar charts."""
    text = html.escape(render_text(report))
    if versions:
        text += "\n\n" + html.escape(render_versions(versions))
    slo = "".join(f"<li>{html.escape(b)}</li>" for b in breached)
    charts = [
        _bars(
            "Latency (s)",
            {"p50": report.latency_p50, "p95": report.latency_p95, "p99": report.latency_p99},
        ),
        _bars("Tool success rate", {k: t["success_rate"] for k, t in report.tools.items()}),
        _bars("Error categories (runs)", {k: float(v) for k, v in report.error_categories.items()}),
        _bars("Cost per user (USD)", report.cost_per_user, "{:.6f}"),
    ]
    if versions:
        charts.append(
            _bars("Success rate by version", {v.version: v.success_rate for v in versions})
        )
        rated = {v.version: v.satisfaction for v in versions if v.satisfaction is not None}
        charts.append(_bars("Satisfaction by version", rated, "{:.2f}"))
    return (
        '<!doctype html><html><head><meta charset="utf-8"><title>keel report</title>'
        "<style>body{font-family:sans-serif;margin:2em}pre{background:#f4f4f4;padding:1em}"
        ".breach{color:#b00}</style></head><body><h1>keel report</h1>"
        + (f'<h2 class="breach">SLO breaches</h2><ul class="breach">{slo}</ul>' if slo else "")
        + f"<pre>{text}</pre>"
        + "".join(charts)
        + "</body></html>"
    )
