"""Shadow and replay comparisons as files: JSON, Markdown and a self-contained HTML page.

The same style as the suite report (`keel.evals.report`): a summary list and a table, the HTML
with no script and nothing loaded.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any

from keel.evals.replay import ReplayDiff
from keel.evals.report import _STYLE, write_text
from keel.evals.results import CaseRun
from keel.evals.shadow import ShadowResult

__all__ = ["write_replay_report", "write_shadow_report"]

_SHADOW_HEAD = ["case", "repeat", "changed", "outcome", "tools (current → candidate)"]
_SHADOW_HEAD += ["Δ usd", "Δ judge", "passed"]
_REPLAY_HEAD = ["thread", "from", "mode", "changed", "outcome", "tools (recorded → replayed)"]
_REPLAY_HEAD += ["Δ tokens", "Δ usd", "notes"]


def _outcome(outcome: dict[str, Any]) -> str:
    return f"{outcome.get('status', '-')}/{outcome.get('terminated_reason', '-')}"


def _tools(run: CaseRun) -> str:
    return " → ".join(t.name for t in run.trajectory) or "-"


def _shadow_rows(result: ShadowResult) -> list[list[str]]:
    rows = []
    for p in result.pairs:
        a, b = p.baseline, p.candidate
        rows.append([
            a.case.id,
            str(a.repeat),
            ("CHANGED" if p.changed else "same") if p.compared else "own graph",
            f"{_outcome(a.outcome)} → {_outcome(b.outcome)}",
            f"{_tools(a)} ⇒ {_tools(b)}",
            f"{p.usd_delta:+.6f}",
            "-" if p.judge_delta is None else f"{p.judge_delta:+g}",
            f"{'pass' if a.passed else 'FAIL'} → {'pass' if b.passed else 'FAIL'}",
        ])  # fmt: skip
    return rows


def _replay_rows(diffs: Sequence[ReplayDiff]) -> list[list[str]]:
    rows = []
    for d in diffs:
        notes = [f"unrecorded side effects stubbed: {len(d.unrecorded)}"] if d.unrecorded else []
        notes += ["cassette ran out"] if d.cassette_exhausted else []
        notes += [f"raised {d.raised}"] if d.raised else []
        rows.append([
            d.thread_id,
            d.start,
            d.mode,
            "CHANGED" if d.changed else "same",
            f"{_outcome(d.recorded.outcome)} → {_outcome(d.replayed.outcome)}",
            " → ".join(t.name for t in d.recorded.trajectory) + " ⇒ "
            + " → ".join(t.name for t in d.replayed.trajectory),
            f"{d.tokens_delta:+d}",
            f"{d.usd_delta:+.6f}",
            "; ".join(notes) or "-",
        ])  # fmt: skip
    return rows


def _markdown(title: str, facts: list[str], head: list[str], rows: list[list[str]]) -> str:
    lines = [f"# {title}", "", *[f"- {f}" for f in facts], ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _html(title: str, facts: list[str], head: list[str], rows: list[list[str]]) -> str:
    items = "".join(f"<li>{escape(f)}</li>" for f in facts)
    body = "".join(
        "<tr>" + "".join(f'<td class="{escape(c)}">{escape(c)}</td>' for c in r) + "</tr>"
        for r in rows
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
        f"<style>{_STYLE}.CHANGED{{color:#b00;font-weight:bold}}</style></head><body>"
        f"<h1>{escape(title)}</h1><ul>{items}</ul><table><tr>"
        + "".join(f"<th>{escape(h)}</th>" for h in head)
        + f"</tr>{body}</table></body></html>\n"
    )


def _write(
    out_dir: str | Path, stem: str, data: Any, title: str, facts: list[str], head: list[str],
    rows: list[list[str]],
) -> dict[str, Path]:  # fmt: skip
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / f"{stem}.{ext}" for k, ext in (("json", "json"), ("markdown", "md"))}
    paths["html"] = out / f"{stem}.html"
    write_text(paths["json"], json.dumps(data, indent=2, default=str) + "\n")
    write_text(paths["markdown"], _markdown(title, facts, head, rows))
    write_text(paths["html"], _html(title, facts, head, rows))
    return paths


def write_shadow_report(result: ShadowResult, out_dir: str | Path) -> dict[str, Path]:
    """Write `shadow.json`, `shadow.md` and `shadow.html` into `out_dir`; return their paths."""
    s = result.summary()
    facts = [
        f"current: {s['baseline']}; candidate: {s['candidate']}",
        f"runs: {s['runs']}; changed: {s['changed']} (outcome {s['outcome_changed']}, "
        f"trajectory {s['trajectory_changed']})",
        f"pass rate: {s['baseline_pass_rate']:.1%} → {s['candidate_pass_rate']:.1%}",
        f"cost: ${s['baseline_usd']:.6f} → ${s['candidate_usd']:.6f}",
        f"side-effecting calls stubbed: {s['stubbed_calls']}; side effects run: "
        f"{s['side_effects_run']}",
    ]
    if s["not_compared"]:
        facts.append(
            f"cases on their own graph (the candidate did not run them): {s['not_compared']}"
        )
    title = f"Shadow: {s['suite']}"
    return _write(
        out_dir, "shadow", result.to_dict(), title, facts, _SHADOW_HEAD, _shadow_rows(result)
    )


def write_replay_report(diffs: Sequence[ReplayDiff], out_dir: str | Path) -> dict[str, Path]:
    """Write `replay.json`, `replay.md` and `replay.html` into `out_dir`; return their paths."""
    facts = [
        f"threads: {len(diffs)}; changed: {sum(d.changed for d in diffs)}",
        f"tool calls answered from cassettes (not run): {sum(len(d.from_cassette) for d in diffs)}",
    ]
    data = {"replays": [d.to_dict() for d in diffs]}
    return _write(out_dir, "replay", data, "Replay", facts, _REPLAY_HEAD, _replay_rows(diffs))
