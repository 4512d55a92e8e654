"""Prompt-injection detection rates of keel's default detector on the labelled corpus.

What is measured
----------------
`keel.guards.HeuristicDetector()` (what `InputGuardPolicy()` uses when no detector is set) on
every case of `keel.evals.injection_corpus()`: hand-written user messages and tool results,
about half of them benign look-alikes. For each split it prints, per channel, the share of
injections reported (detection) and the share of benign texts reported (false positives), the
ids missed or misfired on, and the mean time per case. The splits:

- `dev` (140 cases): tuned on;
- `holdout` (104 cases): written first and never tuned on by measurement, but the signals were
  designed by someone who had read these texts, so its figures are optimistic;
- `fresh` (60 cases): written after the detector was finished and measured once; never tuned
  on. The most honest estimate of how the heuristics do on wording they were not built for.

Goal: detection >= 0.8 on both channels, false positives <= 0.05 (both channels together).
The last line holds the figures on every case never tuned on (`holdout` and `fresh` together):

    detect_user=… detect_tool=… false_positive=…

Run it by path: `.venv/bin/python bench/injection.py` (about a second).
"""

from __future__ import annotations

import time

from keel.evals import DetectionRates, detection_rates, injection_corpus
from keel.guards import HeuristicDetector


def report(split: str, rates: DetectionRates, seconds: float, n: int) -> None:
    print(f"{split:<8} {'channel':<7} {'detection':>9} {'false_pos':>9}")
    print(f"{'':<8} {'user':<7} {rates.detect_user:>9.2f} {rates.false_positive_user:>9.2f}")
    print(f"{'':<8} {'tool':<7} {rates.detect_tool:>9.2f} {rates.false_positive_tool:>9.2f}")
    print(f"{'':<8} {'both':<7} {'':>9} {rates.false_positive:>9.2f}")
    print(f"{'':<8} missed: {', '.join(rates.missed) or '-'}")
    print(f"{'':<8} false alarms: {', '.join(rates.false_alarms) or '-'}")
    print(f"{'':<8} {n} cases, {seconds / n * 1e6:.0f} us per case")


def main() -> None:
    detector = HeuristicDetector()
    for split in ("dev", "holdout", "fresh"):
        cases = injection_corpus(split)  # type: ignore[arg-type]
        start = time.perf_counter()
        rates = detection_rates(detector, cases)
        report(split, rates, time.perf_counter() - start, len(cases))
        print(f"{'':<8} {rates.line()}")
    untuned = [c for c in injection_corpus() if c.split != "dev"]
    print(f"never tuned on ({len(untuned)} cases, holdout + fresh):")
    print(detection_rates(detector, untuned).line())


if __name__ == "__main__":
    main()
