"""The labelled prompt-injection corpus, and detection rates of any `InjectionDetector` on it.

`injection_corpus.jsonl` (shipped with keel) holds hand-written cases, one JSON object a line:
`id`, `split` (`dev`: tune on it; `holdout`: written first, never tuned on; `fresh`: written
after the detector was built, never tuned on), `channel`
(`user` message or `tool` result), `label` (`injection` or `benign`), `kind` (the attack or
look-alike family) and `text`. About half are benign look-alikes ("skip the second paragraph
of my email", security articles that quote attacks, sysadmin text). `bench/injection.py`
prints keel's heuristic figures; measure your own detector the same way:

Example:
    ```python
    from keel.evals import detection_rates, injection_corpus
    from keel.guards import HeuristicDetector

    rates = detection_rates(HeuristicDetector(), injection_corpus("holdout"))
    print(rates.line())  # detect_user=… detect_tool=… false_positive=…
    ```
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Literal, get_args

from keel.guards.finding import InputSource
from keel.guards.injection import InjectionDetector, adetect, detect

__all__ = [
    "DetectionRates",
    "InjectionCase",
    "adetection_rates",
    "detection_rates",
    "injection_corpus",
]

Split = Literal["dev", "holdout", "fresh"]
Label = Literal["injection", "benign"]
_FIELDS = ("id", "split", "channel", "label", "kind", "text")


@dataclass(frozen=True, kw_only=True, slots=True)
class InjectionCase:
    """One labelled text of the corpus."""

    id: str
    """Unique, e.g. `holdout-tool-007`."""
    split: Split
    """`dev` (tuned on), `holdout` (written first) or `fresh` (written last); the latter two
    were never tuned on."""
    channel: InputSource
    """`user` message or `tool` result."""
    label: Label
    """`injection` or `benign`."""
    kind: str
    """The family: `override`, `indirect_email`, `lookalike`, `security_discussion`, …"""
    text: str
    """The text itself."""


def injection_corpus(split: Split | None = None) -> list[InjectionCase]:
    """The corpus shipped with keel, or one split of it.

    Raises:
        ValueError: A line of the file is malformed (names the line).
    """
    raw = resources.files("keel.evals").joinpath("injection_corpus.jsonl").read_text("utf-8")
    cases = [_case(n, line) for n, line in enumerate(raw.splitlines(), 1) if line.strip()]
    return [c for c in cases if split is None or c.split == split]


def _case(number: int, line: str) -> InjectionCase:
    row = json.loads(line)
    allowed = {
        "split": get_args(Split),
        "channel": get_args(InputSource),
        "label": get_args(Label),
    }
    bad = [f for f in _FIELDS if not isinstance(row.get(f), str) or not row[f]]
    bad += [f for f, values in allowed.items() if row.get(f) not in values]
    if bad or set(row) != set(_FIELDS):
        raise ValueError(
            f"injection_corpus.jsonl line {number}: fields must be exactly {list(_FIELDS)} "
            f"with split in {allowed['split']}, channel in {allowed['channel']} and label in "
            f"{allowed['label']}; wrong or missing: {sorted(set(bad) | (set(row) ^ set(_FIELDS)))}."
        )
    return InjectionCase(**row)


@dataclass(frozen=True, kw_only=True, slots=True)
class DetectionRates:
    """How a detector did on a set of cases: detection per channel, and false positives."""

    detect_user: float
    """Share of injections in user messages that were reported."""
    detect_tool: float
    """Share of injections in tool results that were reported."""
    false_positive: float
    """Share of benign texts (both channels) that were reported."""
    false_positive_user: float
    """Share of benign user messages that were reported."""
    false_positive_tool: float
    """Share of benign tool results that were reported."""
    missed: tuple[str, ...]
    """The ids of the injections not reported."""
    false_alarms: tuple[str, ...]
    """The ids of the benign texts reported."""

    def line(self) -> str:
        """`detect_user=0.92 detect_tool=0.96 false_positive=0.02`."""
        return (
            f"detect_user={self.detect_user:.2f} detect_tool={self.detect_tool:.2f} "
            f"false_positive={self.false_positive:.2f}"
        )


def detection_rates(detector: InjectionDetector, cases: Sequence[InjectionCase]) -> DetectionRates:
    """Run `detector` on every case (sync; an async detector runs in a fresh event loop)."""
    return _rates(cases, [bool(detect(detector, c.text, c.channel)) for c in cases])


async def adetection_rates(
    detector: InjectionDetector, cases: Sequence[InjectionCase]
) -> DetectionRates:
    """`detection_rates` for async code (a `ModelDetector` is awaited case by case)."""
    return _rates(cases, [bool(await adetect(detector, c.text, c.channel)) for c in cases])


def _rates(cases: Sequence[InjectionCase], reported: list[bool]) -> DetectionRates:
    def share(label: Label, channel: InputSource | None) -> float:
        hits = [
            r
            for c, r in zip(cases, reported, strict=True)
            if c.label == label and channel in (None, c.channel)
        ]
        return sum(hits) / len(hits) if hits else 0.0

    return DetectionRates(
        detect_user=share("injection", "user"),
        detect_tool=share("injection", "tool"),
        false_positive=share("benign", None),
        false_positive_user=share("benign", "user"),
        false_positive_tool=share("benign", "tool"),
        missed=tuple(
            c.id for c, r in zip(cases, reported, strict=True) if c.label == "injection" and not r
        ),
        false_alarms=tuple(
            c.id for c, r in zip(cases, reported, strict=True) if c.label == "benign" and r
        ),
    )
