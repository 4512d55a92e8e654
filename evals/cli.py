"""`keel eval`: run a suite, print a line per case, write the results, gate on the pass rate.

    keel eval SUITE [--graph module:factory] [--model M] [--judge M] [--repeat N]
                    [--concurrency C] [--min-pass-rate R] [--out DIR] [--price MODEL=IN,OUT]
                    [--langsmith [--dataset NAME]]

    keel eval feedback RUN [--score S] [--comment C] [--correction T] [--user U] [--db URL]

    keel eval replay THREAD --db URL --graph module:factory [--from CHECKPOINT] [--live --model M]
    keel eval capture THREAD --db URL --suite FILE [--expect STATUS/REASON]
    keel eval shadow SUITE --candidate module:factory [--graph ...] (or --threads T1,T2 --db URL)

Feedback is forwarded to LangSmith when `LANGSMITH_API_KEY` is set (see `keel.evals.feedback`).

SUITE is a YAML file or the name of a built-in suite (`adversarial`, `chaos`, `demo`).
`--langsmith` runs the suite as a LangSmith experiment (`keel.evals.experiment`; needs
`LANGSMITH_API_KEY`, and without it nothing is sent); the local results are written as well. The
`keel` command dispatches `keel eval ...` here by module name (`keel.app` never imports
`keel.evals`); `python -m keel.evals.cli SUITE` is the same command.

`--price MODEL=IN,OUT` (repeatable; also on `replay` and `shadow`) prices a model keel's table does
not know, as `keel run --price` does: the graph factories get the table as `prices=`
(`keel.evals.runner`), so a case's agent under a dollar limit can run on that model.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Sequence

from keel.app.cli_args import count
from keel.app.cli_prices import add_price_option
from keel.evals.suites import BUILTIN_SUITES

__all__ = ["main", "parser"]


def parser() -> argparse.ArgumentParser:
    """The `keel eval` argument parser."""
    p = argparse.ArgumentParser(
        prog="keel eval",
        description="Run an eval suite offline.",
        epilog="Also: keel eval replay THREAD (a stored thread on a new version, diffed), "
        "keel eval capture THREAD (a failed thread as a suite case), keel eval shadow SUITE "
        "(a candidate beside the current version, side effects stubbed), keel eval feedback RUN. "
        "Each has --help.",
    )
    p.add_argument("suite", help=f"a suite file, or a built-in suite: {', '.join(BUILTIN_SUITES)}")
    p.add_argument("--graph", default=None, help="graph factory module:function (default: suite's)")
    p.add_argument("--model", default=None, help="model for every case (overrides the suite's)")
    p.add_argument("--judge", default=None, help="model that judges rubrics")
    p.add_argument("--repeat", type=count, default=1, help="runs per case (default 1)")
    p.add_argument("--concurrency", type=count, default=4, help="runs at once (default 4)")
    p.add_argument(
        "--min-pass-rate", type=float, default=1.0, help="exit 1 below this share (default 1.0)"
    )
    p.add_argument("--out", default=None, help="results folder (default .keel/evals/SUITE)")
    add_price_option(p, "passed to the graph factories as prices=")
    p.add_argument(
        "--langsmith",
        action="store_true",
        help="run as a LangSmith experiment (needs LANGSMITH_API_KEY)",
    )
    p.add_argument(
        "--dataset", default=None, help="LangSmith dataset name (default keel-SUITE), reused"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run `keel eval`; returns the exit code (0 pass, 1 under the pass rate, 2 bad input).

    The arguments are parsed before the eval runner loads (`keel.evals.cli_suite`,
    `keel.evals.cli_replay`): `--help` and a usage error answer at once.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    _printable_output()
    if argv[:1] == ["feedback"]:
        from keel.evals.cli_suite import feedback_main

        return feedback_main(argv[1:])
    if argv[:1] in (["replay"], ["capture"], ["shadow"]):
        from keel.evals import cli_replay

        commands = {
            "replay": cli_replay.replay_main,
            "capture": cli_replay.capture_main,
            "shadow": cli_replay.shadow_main,
        }
        return commands[argv[0]](argv[1:])
    args = parser().parse_args(argv)
    from keel.evals import cli_suite

    return cli_suite.run(args)


def _printable_output() -> None:
    """Let stdout and stderr print any text: a lone surrogate is escaped, not raised."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")


if __name__ == "__main__":
    raise SystemExit(main())
