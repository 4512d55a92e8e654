"""`keel`: run agents, resume threads, list threads, set up the database.

    keel demo [--approve | --reject | --wait] [--db URL] [--price MODEL=IN,OUT]
    keel run "task" [--model M | --agent module:attr] [--thread ID] [--user U] [--db URL]
             [--approve | --reject | --wait] [--price MODEL=IN,OUT]
    keel run --thread ID [--approve | --reject]
                                    resume a waiting thread (keel demo's too) with the agent
                                    and model that made it
    keel threads [--db URL] [--limit N]
    keel threads prune [--keep N] [--idle-days D] [--dry-run] [--db URL]
    keel db setup [--db URL]
    keel models install | path      (the local model: see `keel.app.cli_models`)
    keel audit | report | health    (see `keel.app.cli_observe`)
    keel eval SUITE [--graph module:factory] ...   (see `keel.evals.cli`)
    keel serve --server-config FILE [--port N] [--host H] [--config langgraph.json] [--reload]
    keel serve --server-config FILE --aegra-config DIR [--config langgraph.json]

With a terminal, approvals are asked for on it (approve / edit / reject / respond). Without one
(CI, a pipe) the request is shown and answered by `--approve` or `--reject`; with neither, the
demo approves (its scenario's answer) and `keel run` leaves the thread waiting.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from keel.app import cli_models
from keel.app.cli_args import check_text, count, days
from keel.app.cli_prices import add_price_option
from keel.db.url import default_db_url
from keel.errors import KeelError
from keel.observe.switch import NO_KEY_WARNING, tracing_without_key

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """The `keel` command. Returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["eval"]:  # keel.evals is loaded by name: nothing in keel imports it
        return int(importlib.import_module("keel.evals.cli").main(argv[1:]))
    args = _parser().parse_args(argv)
    if tracing_without_key():
        # one line, then tracing off for this process: no tracer (keel's or LangChain's
        # default, which a graph of the user's would get) tries to reach LangSmith
        print(f"keel: {NO_KEY_WARNING}", file=sys.stderr)
        os.environ["LANGSMITH_TRACING"] = os.environ["LANGCHAIN_TRACING_V2"] = "false"
    try:
        check_text(args, skip=_PATHS)
    except KeelError as exc:
        print(f"keel: {exc}", file=sys.stderr)
        return 2
    try:
        command = _command(args)
    except KeyboardInterrupt:  # as in keel_cli: Ctrl-C while the command's modules load
        print("\nkeel: interrupted while starting; nothing ran.", file=sys.stderr)
        return 130
    try:
        return command(args)
    except KeelError as exc:
        print(f"keel: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nkeel: interrupted.", file=sys.stderr)
        return 130


def _command(args: argparse.Namespace) -> Callable[[argparse.Namespace], int]:
    """The function that runs `args.command`, its modules loaded now.

    Each command loads only what it needs (LangGraph, the database drivers, Chroma); parsing
    the arguments, and `--help`, load none of it.
    """
    if args.command in ("demo", "run"):
        from keel.app import cli_run

        return cli_run.run
    if args.command in ("threads", "db"):
        from keel.app import cli_db

        return cli_db.run
    if args.command in ("audit", "report", "health"):
        from keel.app import cli_observe

        return cli_observe.run
    if args.command == "serve":
        from keel.app import cli_serve

        return cli_serve.run
    return cli_models.run


_PATHS = ("db", "slo", "html", "chroma", "server_config", "config", "aegra_config", "dir")
"""Arguments that name files: a file name may be any bytes, so `check_text` leaves them."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keel", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    db_help = f"database URL (default: $KEEL_DB_URL or {default_db_url()})"

    def run_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--db", default=None, help=db_help)
        p.add_argument("--thread", default=None, help="thread id (new one if omitted)")
        p.add_argument("--user", default="cli-user", help="user id for the run context")
        p.add_argument("--tenant", default="default", help="tenant id for the run context")
        add_price_option(p, "the demo's policy holds each run to a dollar limit")
        decide = p.add_mutually_exclusive_group()
        decide.add_argument("--approve", action="store_true", help="approve calls without asking")
        decide.add_argument("--reject", action="store_true", help="reject calls without asking")
        decide.add_argument(
            "--wait",
            action="store_true",
            help="leave approvals waiting; resume later with keel run --thread ID",
        )

    demo = sub.add_parser("demo", help="run the bundled refund scenario")
    run_options(demo)
    run = sub.add_parser("run", help="run the agent on a task, or resume a thread")
    run.add_argument("task", nargs="?", help="the task; omit it with --thread to resume")
    run.add_argument("--model", default=None, help="LangChain model string (default: $KEEL_MODEL)")
    run.add_argument(
        "--agent",
        default=None,
        help="your own agent instead of keel's: module:attribute of a compiled graph, a "
        "StateGraph or a function that returns one",
    )
    run_options(run)
    threads = sub.add_parser("threads", help="list stored threads with their outcome")
    threads.add_argument("--db", default=None, help=db_help)
    threads.add_argument("--limit", type=count, default=20, help="the most threads listed")
    threads_sub = threads.add_subparsers(dest="threads_command")
    prune = threads_sub.add_parser("prune", help="delete old checkpoints and idle threads")
    prune.add_argument("--keep", type=count, default=None, help="checkpoints kept per thread")
    prune.add_argument("--idle-days", type=days, default=None, help="delete threads idle longer")
    prune.add_argument("--dry-run", action="store_true", help="report what would go; delete none")
    prune.add_argument("--db", default=argparse.SUPPRESS, help=db_help)
    _serve_parser(sub)
    db = sub.add_parser("db", help="database maintenance")
    db.add_argument("action", choices=["setup"])
    db.add_argument("--db", default=None, help=db_help)
    _observe_parsers(sub, db_help)
    cli_models.add_parser(sub)
    sub.add_parser("eval", help="run an eval suite (keel eval --help)", add_help=False)
    return parser


def _serve_parser(sub: Any) -> None:
    serve = sub.add_parser("serve", help="serve keel's graphs with `langgraph dev` (offline)")
    serve.add_argument(
        "--server-config",
        default=os.environ.get("KEEL_SERVER_CONFIG"),
        help="tokens, tenants and agents (TOML; default: $KEEL_SERVER_CONFIG)",
    )
    serve.add_argument("--port", type=int, default=8123, help="TCP port (default 8123)")
    serve.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1)")
    serve.add_argument("--config", default=None, help="langgraph.json (default: ./langgraph.json)")
    serve.add_argument("--reload", action="store_true", help="reload when code changes")
    serve.add_argument(
        "--aegra-config",
        metavar="DIR",
        default=None,
        help="write aegra.json and its shim into DIR (for Aegra replicas) instead of serving",
    )


def _observe_parsers(sub: Any, db_help: str) -> None:
    """Add `audit`, `report` and `health` to the `keel` parser's subcommands."""
    audit = sub.add_parser("audit", help="show the audit log")
    audit.add_argument("--thread", default=None, help="only this thread")
    audit.add_argument("--user", default=None, help="only this user")
    audit.add_argument(
        "--decision",
        default=None,
        help="only this decision (orphaned: calls a crash left, which may or may not have run)",
    )
    audit.add_argument("--since", default=None, help="ISO time or age (30m, 12h, 7d)")
    audit.add_argument("--limit", type=count, default=1000, help="the most records shown")
    audit.add_argument("--json", action="store_true", help="one JSON object per line")
    audit.add_argument("--db", default=None, help=db_help)
    report = sub.add_parser("report", help="success, latency, cost and SLOs from run records")
    report.add_argument("--since", default=None, help="ISO time or age (30m, 12h, 7d)")
    report.add_argument("--tenant", default=None, help="only this tenant")
    report.add_argument(
        "--by", choices=["version"], default=None, help="compare the agent versions that served"
    )
    report.add_argument("--json", action="store_true", help="print the report as JSON")
    report.add_argument("--slo", default=None, help="TOML/YAML file of SLO objectives")
    report.add_argument("--html", default=None, help="also write an HTML report to this file")
    report.add_argument("--db", default=None, help=db_help)
    health = sub.add_parser("health", help="liveness, readiness and a semantic check")
    health.add_argument("--semantic", action="store_true", help="run the known task too")
    health.add_argument("--chroma", default=None, help="Chroma path or http:// URL to check")
    health.add_argument("--json", action="store_true", help="print the checks as JSON")
    health.add_argument("--db", default=None, help=db_help)


if __name__ == "__main__":
    raise SystemExit(main())
