"""`keel eval SUITE` and `keel eval feedback`, once `keel.evals.cli` has parsed the arguments.

Loaded only when one of them runs: it brings the eval runner, LangGraph and LangChain, which
`keel eval --help` does without.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from keel.app.cli_args import check_text
from keel.app.cli_observe import existing_db
from keel.app.cli_prices import price_table
from keel.db.ledger import Ledger
from keel.errors import KeelError
from keel.evals.builtin import BUILTIN_SUITES, builtin_suite_path
from keel.evals.experiment import arun_experiment, dataset_name
from keel.evals.feedback import (
    feedback_for,
    forward_feedback,
    langsmith_key,
    new_feedback,
    record_feedback,
    run_key,
)
from keel.evals.report import default_out, results_folder, write_report
from keel.evals.results import CaseRun, SuiteResult
from keel.evals.runner import arun_suite, suite_factories
from keel.evals.suite import Suite, load_suite

__all__ = ["feedback_main", "run"]


def run(args: argparse.Namespace) -> int:
    """Run `keel eval SUITE` on the parsed `args`; returns the exit code."""
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


def feedback_main(argv: Sequence[str]) -> int:
    """Run `keel eval feedback`; returns the exit code."""
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
