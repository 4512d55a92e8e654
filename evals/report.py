"""Results as files: `results.json`, `results.md` and a self-contained `report.html`.

The HTML report has no script and loads nothing: a summary, the per-case table, and success,
cost, steps and latency distributions drawn as inline SVG.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Sequence
from html import escape
from pathlib import Path

from keel.errors import UserError
from keel.evals.results import CaseRun, SuiteResult

__all__ = [
    "default_out",
    "render_html",
    "render_markdown",
    "results_folder",
    "write_report",
    "write_text",
]


def default_out(name: str, prefix: str = "") -> Path:
    """`.keel/evals/<prefix><name>`, where a suite's results go without `--out`.

    The name comes from a suite file, so it is made one plain folder name: a name like
    `../../etc` or `/tmp/x` cannot put the reports anywhere else.
    """
    folder = re.sub(r"[^\w.-]+", "_", f"{prefix}{name}").strip("._") or "suite"
    return Path(".keel") / "evals" / folder


def results_folder(out: Path) -> Path:
    """Make the results folder `out` (before a run, so no run's results are lost at the end).

    Raises:
        UserError: `out` cannot be a folder (a file is there, no permission), and the fix.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"cannot write the results into {str(out)!r} ({exc.strerror or exc}); pass --out a "
            "folder that can be created."
        ) from None
    return out


def write_report(result: SuiteResult, out_dir: str | Path) -> dict[str, Path]:
    """Write `results.json`, `results.md` and `report.html` into `out_dir`; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "results.json",
        "markdown": out / "results.md",
        "html": out / "report.html",
    }
    write_text(paths["json"], json.dumps(result.to_dict(), indent=2, default=str) + "\n")
    write_text(paths["markdown"], render_markdown(result))
    write_text(paths["html"], render_html(result))
    return paths


def write_text(path: Path, text: str) -> None:
    """Write UTF-8 whatever the locale; a lone surrogate (a model's, a case's) is escaped."""
    path.write_text(text, encoding="utf-8", errors="backslashreplace")


def _failures(run: CaseRun) -> str:
    failed = [f"{s.name}: {s.detail}".rstrip(": ") for s in run.scores if not s.passed]
    if run.raised:
        failed.insert(0, f"raised {run.raised}")
    return "; ".join(failed)


def _row(run: CaseRun) -> list[str]:
    return [
        run.case.id,
        str(run.repeat),
        "pass" if run.passed else "FAIL",
        f"{run.outcome.get('status', '-')}/{run.outcome.get('terminated_reason', '-')}",
        " → ".join(t.name for t in run.trajectory) or "-",
        f"{float(run.usage.get('usd', 0.0)):.6f}",
        str(run.steps),
        f"{run.latency:.3f}",
        _failures(run) or "-",
    ]


_HEAD = ["case", "repeat", "result", "outcome", "tools", "usd", "steps", "latency s", "failed"]


def render_markdown(result: SuiteResult) -> str:
    """The summary and the per-case table as Markdown."""
    s = result.summary()
    lines = [
        f"# Eval: {s['suite']}",
        "",
        f"- graph: `{s['graph']}`",
        f"- passed: {s['passed']}/{s['runs']} ({s['pass_rate']:.1%})",
        f"- latency p50 / p95: {s['latency_p50']:.3f} s / {s['latency_p95']:.3f} s",
        f"- cost: ${s['usd']:.6f}; mean steps {s['mean_steps']:.1f}",
    ]
    lines += [f"- {name}: {value:g}" for name, value in s["totals"].items()]
    lines += ["", "| " + " | ".join(_HEAD) + " |", "|" + "---|" * len(_HEAD)]
    for run in result.runs:
        cells = [c.replace("|", "\\|") for c in _row(run)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


_STYLE = """body{font:14px system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin-top:1em}td,th{border:1px solid #ccc;padding:4px 8px;
text-align:left;vertical-align:top}.FAIL{color:#b00;font-weight:bold}.pass{color:#070}
.charts{display:flex;flex-wrap:wrap;gap:1.5em}figure{margin:0}"""


def render_html(result: SuiteResult) -> str:
    """A self-contained HTML report: summary, charts (inline SVG) and the per-case table."""
    s = result.summary()
    totals = "".join(f"<li>{escape(k)}: {v:g}</li>" for k, v in s["totals"].items())
    rows = "".join(
        "<tr>" + "".join(f'<td class="{escape(c)}">{escape(c)}</td>' for c in _row(run)) + "</tr>"
        for run in result.runs
    )
    runs = result.runs
    charts = [
        _success_chart(runs),
        _histogram("cost (USD)", [float(r.usage.get("usd", 0.0)) for r in runs]),
        _histogram("steps", [float(r.steps) for r in runs]),
        _histogram("latency (s)", [r.latency for r in runs]),
    ]
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>Eval: {escape(s['suite'])}"
        f"</title><style>{_STYLE}</style></head><body><h1>Eval: {escape(s['suite'])}</h1>"
        f"<ul><li>graph: <code>{escape(s['graph'])}</code></li>"
        f"<li>passed: {s['passed']}/{s['runs']} ({s['pass_rate']:.1%})</li>"
        f"<li>latency p50 / p95: {s['latency_p50']:.3f} s / {s['latency_p95']:.3f} s</li>"
        f"<li>cost: ${s['usd']:.6f}; mean steps {s['mean_steps']:.1f}</li>{totals}</ul>"
        f"<div class='charts'>{''.join(charts)}</div><table><tr>"
        + "".join(f"<th>{h}</th>" for h in _HEAD)
        + f"</tr>{rows}</table></body></html>\n"
    )


_W, _H, _PAD = 320, 160, 24


def _figure(title: str, body: str) -> str:
    return (
        f"<figure><figcaption>{escape(title)}</figcaption>"
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{_W}' height='{_H + _PAD}' "
        f"role='img' aria-label='{escape(title)}'>{body}</svg></figure>"
    )


def _bars(heights: Sequence[float], labels: Sequence[str], colors: Sequence[str]) -> str:
    top = max(heights, default=0) or 1
    width = (_W - 2 * _PAD) / max(len(heights), 1)
    parts = []
    for i, (h, label, color) in enumerate(zip(heights, labels, colors, strict=True)):
        x, bar = _PAD + i * width, (_H - _PAD) * h / top
        parts.append(
            f"<rect x='{x + 1:.1f}' y='{_H - bar:.1f}' width='{max(width - 2, 1):.1f}' "
            f"height='{bar:.1f}' fill='{color}'><title>{escape(label)}: {h:g}</title></rect>"
            f"<text x='{x + width / 2:.1f}' y='{_H + 14}' font-size='9' text-anchor='middle'>"
            f"{escape(label[:10])}</text>"
        )
    return "".join(parts)


def _success_chart(runs: Sequence[CaseRun]) -> str:
    by_case: dict[str, list[bool]] = defaultdict(list)
    for run in runs:
        by_case[run.case.id].append(run.passed)
    rates = [sum(v) / len(v) for v in by_case.values()]
    colors = ["#2a2" if r == 1 else "#d80" if r > 0 else "#c22" for r in rates]
    return _figure("success rate per case", _bars(rates, list(by_case), colors))


def _histogram(title: str, values: Sequence[float], bins: int = 8) -> str:
    if not values:
        return _figure(title, "")
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, int((v - low) / span * bins))] += 1
    labels = [f"{low + span * i / bins:.3g}" for i in range(bins)]
    return _figure(title, _bars([float(c) for c in counts], labels, ["#37c"] * bins))
