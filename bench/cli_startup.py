"""How long `keel --help` (and each subcommand's `--help`, and a mistyped command) takes.

Each case is the installed console script (`keel` beside this interpreter) run as a user runs it,
against `python -c pass` (the interpreter's own start) measured in the same rounds: the cases
alternate run by run for R rounds (`--rounds`), so machine drift hits them alike. Output: per
case the median wall time over rounds, in ms, and that minus `python -c pass`. The last line is
machine-readable: `help_ms=<keel --help> python_ms=<python -c pass> help_minus_python_ms=<...>`.

Run it by path: `.venv/bin/python bench/cli_startup.py [--rounds 5]`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES: dict[str, list[str]] = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "keel --help": ["--help"],
    "keel demo --help": ["demo", "--help"],
    "keel run --help": ["run", "--help"],
    "keel threads --help": ["threads", "--help"],
    "keel threads prune --help": ["threads", "prune", "--help"],
    "keel db --help": ["db", "--help"],
    "keel audit --help": ["audit", "--help"],
    "keel report --help": ["report", "--help"],
    "keel health --help": ["health", "--help"],
    "keel models --help": ["models", "--help"],
    "keel serve --help": ["serve", "--help"],
    "keel eval --help": ["eval", "--help"],
    "keel audti (a typo)": ["audti"],
}


def _once(cmd: list[str], cwd: str, env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, check=False)
    elapsed = time.perf_counter() - start
    assert done.returncode in (0, 2), done.stderr.decode()  # a typo is argparse's exit 2
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="runs of each case (default 5)")
    args = parser.parse_args()
    keel = str(Path(sys.executable).with_name("keel"))
    env = {**os.environ, "LANGSMITH_TRACING": "false"}
    times: dict[str, list[float]] = {name: [] for name in CASES}
    with tempfile.TemporaryDirectory() as cwd:  # no ./keel folder to shadow the package
        for _ in range(args.rounds):
            for name, argv in CASES.items():
                cmd = argv if name.startswith("python") else [keel, *argv]
                times[name].append(_once(cmd, cwd, env))
    median = {name: statistics.median(t) * 1000 for name, t in times.items()}
    base = median["python -c pass"]
    print(f"{'case':<28} {'ms':>7} {'- python':>9}   (median of {args.rounds})")
    for name, ms in median.items():
        print(f"{name:<28} {ms:7.0f} {ms - base:9.0f}")
    print(
        f"help_ms={median['keel --help']:.0f} python_ms={base:.0f} "
        f"help_minus_python_ms={median['keel --help'] - base:.0f}"
    )


if __name__ == "__main__":
    main()
