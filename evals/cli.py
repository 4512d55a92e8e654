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
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from keel.app.cli_args import check_text, count
from keel.app.cli_observe import existing_db
from keel.app.cli_prices import add_price_option, price_table
from keel.db.ledger import Ledger
from keel.errors import KeelError
from keel.evals.builtin import BUILTIN_SUITES, builtin_suite_path
from keel.evals.cli_replay import capture_main, replay_main, shadow_main
from keel.evals.experiment import arun_experiment, dataset_name
from keel.evals.feedback import (
    feedback_for,
    forward_feedback,
    langsmith_key,
    new_feedback,
    record_feedback,
    run_key,
)
from keel.evals.report import default_out, printable_output, results_folder, write_report
from keel.evals.results import CaseRun, SuiteResult
from keel.evals.runner import arun_suite, suite_factories
from keel.evals.suite import Suite, load_suite

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
    """Run `keel eval`; returns the exit code (0 pass, 1 under the pass rate, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    printable_output()
    if argv[:1] == ["feedback"]:
        return _feedback(argv[1:])
    if argv[:1] == ["replay"]:
        return replay_main(argv[1:])
    if argv[:1] == ["capture"]:
        return capture_main(argv[1:])
    if argv[:1] == ["shadow"]:
        return shadow_main(argv[1:])
    args = parser().parse_args(argv)
    try:
        if not 0 <= args.min_pass_rate <= 1:
            raise KeelError(f"--min-pass-rate must be between 0 and 1, got {args.min_pass_rate}.")
        path = Path(args.suite)
        if args.suite in BUILTIN_SUITES and not path.is_file():  # a path too long raises
            path = builtin_suite_path(args.suite)
        if args.langsmith and not langsmith_key():
            raise KeelError(
                "--langsmith needs LANGSMITH_API_KEY (and LANGSMITH_ENDPOINT for a self-hosted "
                "LangSmith); nothing was sent. Drop --langsmith to run the suite locally."
            )
        if args.dataset is not None and not args.langsmith:
            raise KeelError("--dataset names the LangSmith dataset: use it with --langsmith.")
        check_text(args, skip=("suite", "out"))
        _no_empty(args)
        args.prices = price_table(args.price) if args.price else None
        suite = load_suite(path)
        out = Path(args.out or default_out(suite.name)).expanduser()
        suite_factories(suite, args.graph, args.prices)  # a bad --graph writes no folder
        results_folder(out)  # before the suite runs: its results must not be lost at the end
        result, experiment = asyncio.run(_run(suite, args))
        if experiment is not None:
            print(
                f"keel eval: LangSmith experiment {experiment!r} on dataset "
                f"{args.dataset or dataset_name(suite)!r}"
            )
    except KeelError as exc:
        print(f"keel eval: {exc}", file=sys.stderr)
        return 2
    try:
        paths = write_report(result, out)
    except OSError as exc:  # exit 2, never 1: 1 says the suite ran under the pass rate
        print(f"keel eval: cannot write the results ({exc}); pass --out a folder.", file=sys.stderr)
        return 2
    _print_summary(result, args.min_pass_rate)
    print(f"keel eval: wrote {paths['json']}, {paths['markdown']}, {paths['html']}")
    return 0 if result.pass_rate >= args.min_pass_rate else 1


async def _run(suite: Suite, args: argparse.Namespace) -> tuple[SuiteResult, str | None]:
    total = len(suite.cases) * args.repeat
    done = 0

    def progress(run: CaseRun) -> None:
        nonlocal done
        done += 1
        outcome = f"{run.outcome.get('status', '-')}/{run.outcome.get('terminated_reason', '-')}"
        failed = ", ".join(s.name for s in run.scores if not s.passed)
        failed = f"  failed: {failed}" if failed else ""
        raised = f"  raised: {run.raised}" if run.raised else ""
        print(
            f"[{done}/{total}] {'PASS' if run.passed else 'FAIL'} {run.case.id} #{run.repeat} "
            f"{outcome} {run.latency:.2f}s ${float(run.usage.get('usd', 0.0)):.6f}{failed}{raised}",
            flush=True,
        )

    options: dict[str, Any] = {
        "model": args.model,
        "judge": args.judge,
        "repeat": args.repeat,
        "concurrency": args.concurrency,
        "prices": args.prices,
    }
    if args.langsmith:
        return await arun_experiment(suite, args.graph, dataset=args.dataset, **options)
    return await arun_suite(suite, args.graph, on_run=progress, **options), None


def _print_summary(result: SuiteResult, min_pass_rate: float) -> None:
    s = result.summary()
    verdict = "ok" if result.pass_rate >= min_pass_rate else f"UNDER {min_pass_rate:.0%}"
    print(
        f"keel eval: {s['suite']}: {s['passed']}/{s['runs']} passed ({s['pass_rate']:.1%}, "
        f"{verdict}); p50 {s['latency_p50']:.2f}s p95 {s['latency_p95']:.2f}s; ${s['usd']:.6f}"
    )
    for name, value in s["totals"].items():
        print(f"keel eval: {name}: {value:g}")


_EMPTY = {
    "graph": "name a graph factory as module:factory, or leave --graph out for keel's demo agent",
    "judge": "name the judge's model (e.g. openai:gpt-4o-mini), or leave --judge out",
    "out": "name a folder for the results, or leave --out out for .keel/evals/SUITE",
}


def _no_empty(args: argparse.Namespace) -> None:
    """Refuse an empty `--graph`, `--judge` or `--out`: each was taken for no option at all."""
    for option, fix in _EMPTY.items():
        value = getattr(args, option)
        if value is not None and not value.strip():
            raise KeelError(f"--{option} is empty: {fix}.")


def _feedback(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="keel eval feedback",
        description="Record feedback on a run (with --score/--comment/--correction), or list it.",
    )
    p.add_argument("run", help="run key, run id or thread id (as `keel report` shows)")
    p.add_argument("--score", type=float, default=None, help="a score (0/1, 1-5, ...)")
    p.add_argument("--comment", default="", help="what the person said")
    p.add_argument("--correction", default="", help="what the answer should have been")
    p.add_argument("--user", default=None, help="who gives the feedback")
    p.add_argument("--db", default=None, help="database URL (default: $KEEL_DB_URL or .keel/)")
    args = p.parse_args(argv)
    try:  # a mistyped --db (or a bad URL): an error now, not after the pool's 10 s of retries
        check_text(args, skip=("db",), positional=("run",))
        ledger = Ledger(existing_db(args.db))
    except KeelError as exc:
        print(f"keel eval feedback: {exc}", file=sys.stderr)
        return 2
    try:
        if args.score is None and not args.comment and not args.correction:
            found = feedback_for(ledger, args.run)
            for f in found:
                score = "-" if f.score is None else f"{f.score:g}"
                print(f"{f.run}  score {score}  by {f.user or '-'}: {f.comment} {f.correction}")
            if not found:  # it printed nothing at all, for a mistyped run too
                run_key(ledger, args.run)  # no such run: a UserError, exit 2
                print(f"keel eval feedback: no feedback on {args.run!r} yet.")
            return 0
        feedback = new_feedback(
            args.run,
            score=args.score,
            comment=args.comment,
            correction=args.correction,
            user=args.user,
        )
        stored = record_feedback(ledger, feedback, forward=False)
        print(f"keel eval: feedback recorded on {args.run}")
        if langsmith_key():
            try:
                forward_feedback(ledger, stored)
                print("keel eval: feedback forwarded to LangSmith")
            except Exception as exc:  # stored already: say so, do not fail
                print(f"keel eval feedback: not forwarded to LangSmith: {exc}", file=sys.stderr)
        return 0
    except KeelError as exc:
        print(f"keel eval feedback: {exc}", file=sys.stderr)
        return 2
    finally:
        ledger.close()


if __name__ == "__main__":
    raise SystemExit(main())
