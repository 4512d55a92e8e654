"""`keel eval replay`, `keel eval capture` and `keel eval shadow`.

    keel eval replay THREAD --db URL --graph module:factory [--from CHECKPOINT] [--live --model M]
                     [--user U --tenant T --roles R,S] [--json FILE] [--out DIR]
                     [--save-cassette FILE | --cassette FILE] [--price MODEL=IN,OUT]
    keel eval capture THREAD --db URL --suite FILE [--id ID] [--expect STATUS/REASON] [--run N]
                      [--roles R,S] [--graph module:factory]
    keel eval shadow SUITE --candidate module:factory [--graph module:factory]
                     [--model M] [--candidate-model M] [--judge M] [--out DIR]
                     [--price MODEL=IN,OUT]
    keel eval shadow --threads T1,T2 --db URL --candidate module:factory [--model M] [--out DIR]
                     [--price MODEL=IN,OUT]

`--price` (repeatable) prices a model keel's table does not know for the graph factories
(`prices=`), as `keel eval SUITE --price` does; a cassette replay plays the recorded model.

Exit codes: 0 done (differences are reported, not failures), 2 bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from keel._data_files import read_text
from keel.app.cli_args import check_text, refuse_empty
from keel.app.cli_prices import add_price_option, price_table
from keel.errors import KeelError, UserError
from keel.evals.builtin import BUILTIN_SUITES, builtin_suite_path
from keel.evals.capture import acapture
from keel.evals.cassette import Cassette
from keel.evals.compare_report import write_replay_report, write_shadow_report
from keel.evals.replay import areplay
from keel.evals.report import default_out, results_folder, write_text
from keel.evals.shadow import ashadow, ashadow_threads
from keel.evals.stored import StoredThread, aload_thread
from keel.evals.suite import Suite, load_suite
from keel.pricing import PriceTable
from keel.state import RunContext

__all__ = ["capture_main", "replay_main", "shadow_main"]


_FILES = ("db", "json", "out", "cassette", "save_cassette", "suite")
"""Arguments that name files or folders: a file name may be any bytes (`check_text`)."""


def _identity(args: argparse.Namespace, stored: StoredThread) -> RunContext | None:
    """Who the replay runs for: the thread's user and tenant unless `--user` / `--tenant` say.

    `--roles` alone replayed as user `replay-user` of tenant `default` (not the thread's, as
    the options' help says), under another user's budgets, memories and tenant.
    """
    if args.user is None and args.tenant is None and args.roles is None:
        return None
    roles = _roles(args.roles)
    return RunContext(
        user_id=args.user or stored.identity.user_id,
        tenant_id=args.tenant or stored.identity.tenant_id,
        roles=roles or ("user",),
    )


def _roles(text: str | None) -> tuple[str, ...] | None:
    """`--roles R,S` as a tuple; None when not given; a `UserError` when it names no role."""
    if text is None:
        return None
    roles = tuple(r.strip() for r in text.split(",") if r.strip())
    if not roles:
        raise UserError(
            f"--roles {text!r} names no role: give them comma-separated (e.g. support,admin), "
            "or leave --roles out."
        )
    return roles


def _prices(args: argparse.Namespace) -> PriceTable | None:
    return price_table(args.price) if args.price else None


def _run(name: str, job: object) -> int:
    try:
        asyncio.run(job)  # type: ignore[arg-type]
    except KeelError as exc:
        print(f"keel eval {name}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a report, JSON or cassette path that cannot be written or read
        print(f"keel eval {name}: {exc}; check the file and folder paths given.", file=sys.stderr)
        return 2
    return 0


def _write_json(path: str, data: object) -> None:
    _write_text(path, json.dumps(data, indent=2, default=str))


def _write_text(path: str, text: str) -> None:
    write_text(Path(path).expanduser(), text + "\n")


def _read_cassette(path: str) -> Cassette:
    fix = "Save one with --save-cassette FILE."
    return Cassette.from_json(read_text(Path(path).expanduser(), "Cassette file", missing=fix))


def replay_main(argv: Sequence[str]) -> int:
    """`keel eval replay`: replay a stored thread on a graph and print the diff."""
    p = argparse.ArgumentParser(prog="keel eval replay", description=replay_main.__doc__)
    p.add_argument("thread", help="the stored thread's id")
    p.add_argument("--db", default=None, help="database URL (default: $KEEL_DB_URL or .keel/)")
    p.add_argument("--graph", required=True, help="graph factory module:function")
    p.add_argument("--from", dest="start", default=None, help="checkpoint id or step to start at")
    p.add_argument("--live", action="store_true", help="a live model answers, not the cassette")
    p.add_argument("--model", default=None, help="the live model (with --live)")
    p.add_argument("--user", default=None, help="user of the replay (default: the thread's)")
    p.add_argument("--tenant", default=None, help="tenant of the replay (default: the thread's)")
    p.add_argument("--roles", default=None, help="comma-separated roles (default: user)")
    p.add_argument("--json", default=None, help="write the diff as JSON to this file")
    p.add_argument("--out", default=None, help="write replay.json/.md/.html into this folder")
    p.add_argument("--cassette", default=None, help="play this saved cassette (JSON)")
    p.add_argument("--save-cassette", default=None, help="save the thread's cassette (JSON)")
    add_price_option(p, "passed to the graph factory as prices=")
    args = p.parse_args(argv)
    out = Path(args.out).expanduser() if args.out else None  # `--out=~/x`: no shell expands it

    async def job() -> None:
        check_text(args, skip=_FILES, positional=("thread",))
        refuse_empty(args, "model", "json", "out", "cassette", "save_cassette", required=["graph"])
        refuse_empty(args, "user", "tenant")
        prices = _prices(args)  # a bad --price is reported before the database is read
        stored = await aload_thread(args.thread, db=args.db)
        cassette = _read_cassette(args.cassette) if args.cassette else None
        if args.save_cassette:
            _write_text(args.save_cassette, Cassette.from_thread(stored).to_json())
        diff = await areplay(
            stored, args.graph, start=args.start, live=args.live, model=args.model,
            identity=_identity(args, stored), cassette=cassette, prices=prices,
        )  # fmt: skip
        print("\n".join(diff.lines()))
        if args.json:
            _write_json(args.json, diff.to_dict())
        if out is not None:
            paths = write_replay_report([diff], out)
            print(f"keel eval replay: wrote {paths['json']}, {paths['markdown']}, {paths['html']}")

    return _run("replay", job())


def capture_main(argv: Sequence[str]) -> int:
    """`keel eval capture`: append a stored thread to a suite file as a regression case."""
    p = argparse.ArgumentParser(prog="keel eval capture", description=capture_main.__doc__)
    p.add_argument("thread", help="the stored thread's id")
    p.add_argument("--db", default=None, help="database URL (default: $KEEL_DB_URL or .keel/)")
    p.add_argument("--suite", required=True, help="the suite file (created if missing)")
    p.add_argument("--id", default=None, help="the case's id (default thread-<THREAD>)")
    p.add_argument("--expect", default=None, help="what should have happened: status/reason")
    p.add_argument("--roles", default=None, help="comma-separated roles of the user")
    p.add_argument("--graph", default=None, help="graph factory of a new suite file")
    p.add_argument(
        "--run", type=int, default=None, help="which run of the thread: 1 the first, -1 the last"
    )
    args = p.parse_args(argv)

    async def job() -> None:
        check_text(args, skip=_FILES, positional=("thread",))
        refuse_empty(args, "graph", required=["suite"])
        roles = _roles(args.roles)
        case = await acapture(
            args.thread, args.suite, db=args.db, case_id=args.id, expect=args.expect,
            roles=roles, graph=args.graph, run=args.run,
        )  # fmt: skip
        todo = "" if args.expect else " (set its expected outcome where the TODO says)"
        print(f"keel eval capture: appended case {case['id']!r} to {args.suite}{todo}")

    return _run("capture", job())


def _suite(name: str) -> Suite:
    path = Path(name)
    if name in BUILTIN_SUITES and not path.is_file():  # a path too long raises
        path = builtin_suite_path(name)
    return load_suite(path)


def shadow_main(argv: Sequence[str]) -> int:
    """`keel eval shadow`: a candidate version beside the current one, side effects stubbed."""
    p = argparse.ArgumentParser(prog="keel eval shadow", description=shadow_main.__doc__)
    p.add_argument("suite", nargs="?", default=None, help="a suite file or built-in suite")
    p.add_argument("--candidate", default=None, help="the candidate's graph factory")
    p.add_argument("--graph", default=None, help="the current graph factory (default: suite's)")
    p.add_argument("--model", default=None, help="model of the current version (or --threads)")
    p.add_argument("--candidate-model", default=None, help="model of the candidate")
    p.add_argument("--judge", default=None, help="model that judges rubrics")
    p.add_argument("--threads", default=None, help="comma-separated stored thread ids")
    p.add_argument("--db", default=None, help="database of --threads")
    p.add_argument("--out", default=None, help="report folder (default .keel/evals/shadow-*)")
    add_price_option(p, "passed to both sides' graph factories as prices=")
    args = p.parse_args(argv)
    out = Path(args.out).expanduser() if args.out else None  # `--out=~/x`: no shell expands it

    async def job() -> None:
        check_text(args, skip=_FILES)
        refuse_empty(args, "candidate", "candidate_model", "graph", "model", "judge", "out")
        refuse_empty(args, "threads")
        prices = _prices(args)
        if out is not None:  # before anything runs: the runs' results must not be lost at the end
            results_folder(out)
        if args.threads:
            if args.candidate is None:
                raise KeelError("--threads needs --candidate module:factory.")
            ids = [t for t in args.threads.split(",") if t]
            diffs = await ashadow_threads(
                ids, args.candidate, db=args.db, model=args.model, prices=prices
            )
            for diff in diffs:
                print("\n".join(diff.lines()))
            paths = write_replay_report(diffs, out or Path(".keel/evals/shadow-threads"))
        else:
            if args.suite is None:
                raise KeelError("Give a SUITE (file or built-in name), or --threads T1,T2.")
            suite = _suite(args.suite)
            result = await ashadow(
                suite, args.graph, args.candidate, model=args.model,
                candidate_model=args.candidate_model, judge=args.judge, prices=prices,
            )  # fmt: skip
            s = result.summary()
            for pair in result.pairs:
                mark = "CHANGED" if pair.changed else "same   "
                mark = mark if pair.compared else "OWN GRAPH (candidate not run)"
                print(f"{mark} {pair.baseline.case.id} #{pair.baseline.repeat}")
            print(
                f"keel eval shadow: {s['changed']}/{s['runs']} changed; pass rate "
                f"{s['baseline_pass_rate']:.1%} → {s['candidate_pass_rate']:.1%}; stubbed "
                f"{s['stubbed_calls']}; side effects run: {s['side_effects_run']}"
            )
            paths = write_shadow_report(result, out or default_out(suite.name, "shadow-"))
        print(f"keel eval shadow: wrote {paths['json']}, {paths['markdown']}, {paths['html']}")

    return _run("shadow", job())
