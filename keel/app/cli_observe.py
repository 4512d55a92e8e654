"""The observability subcommands of `keel`: `audit`, `report` and `health`.

    keel audit [--thread ID] [--user U] [--decision D] [--since WHEN] [--limit N] [--json]
               [--db URL]
    keel report [--since WHEN] [--tenant T] [--by version] [--json] [--slo FILE] [--html FILE]
                [--db URL]
    keel health [--semantic] [--chroma PATH] [--json] [--db URL]

`WHEN` is an ISO date or time (`2026-12-01`, `2026-12-01T09:00:00+00:00`) or an age: `30m`,
`12h`, `7d`. `keel audit --decision orphaned` lists the side-effecting calls a crash left
`started`, their requests lost, which may or may not have run. `keel report --by version` adds
one row per agent version (runs, success rate, outcomes, cost, tokens, steps, satisfaction from
feedback). `keel report` exits 1 when an SLO
objective is breached (it says which), so cron or CI can alert on it; `keel health` exits 1
when a check fails.

Their arguments are parsed in `keel.app.cli`, which loads this module (and with it the ledger
and the database drivers) only when one of them runs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from keel.app.report import (
    breaches,
    build_report,
    by_version,
    load_objectives,
    render_html,
    render_text,
    render_versions,
)
from keel.db.audit import AuditLog
from keel.db.ledger import Ledger
from keel.db.persistence import Persistence
from keel.db.runs import RunLog
from keel.errors import KeelError, UserError

__all__ = ["existing_db", "parse_since", "run"]

_AGE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def run(args: argparse.Namespace) -> int:
    """Run `keel audit`, `keel report` or `keel health`; returns the exit code."""
    if args.command == "audit":
        return _audit(args)
    if args.command == "report":
        return _report(args)
    return _health(args)


def parse_since(text: str | None, *, now: float | None = None) -> float | None:
    """Unix time from an ISO date/time (UTC when no zone is given) or an age like `12h`."""
    if text is None:
        return None
    found = _AGE.match(text.strip())
    if found:
        return (now or time.time()) - float(found.group(1)) * _SECONDS[found.group(2)]
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise KeelError(
            f"--since {text!r} is neither an ISO time (2026-12-01, 2026-12-01T09:00) nor an "
            "age (30m, 12h, 7d)."
        ) from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def existing_db(url: str | None) -> str | None:
    """`url` for a command that only reads it; a SQLite file that does not exist is refused.

    Used by `keel audit`, `report`, `threads`, `eval feedback` and by `keel.evals` to load a
    stored thread (replay, capture, shadow of threads).

    Opening it would create an empty database at a mistyped path and report "nothing there";
    `sqlite:///:memory:` is refused for the same reason.
    A PostgreSQL database is connected to once first: one that cannot be reached (no such
    database, a wrong password, no server) is an error at once, not after the ledger's pool
    has retried for 10 seconds.

    Raises:
        UserError: `:memory:`, or a SQLite file that is not there.
        SetupError: a PostgreSQL database that cannot be reached.
    """
    persistence = Persistence(url)
    if persistence.url.endswith(":memory:"):
        raise UserError(
            f"{persistence.url} is a new, empty database each time it is opened: there is "
            "nothing in it to read. Pass the --db (or KEEL_DB_URL) your runs were made with."
        )
    persistence.reach()
    path = persistence.sqlite_path
    try:
        missing = path is not None and not path.is_file()
    except OSError:  # a name too long for the file system, say
        missing = True
    if missing:
        raise UserError(
            f"No keel database at {path}: check --db (or KEEL_DB_URL). `keel demo`, `keel run` "
            "or `keel db setup` creates one."
        )
    return url


def _no_empty_filter(args: argparse.Namespace, *options: str) -> None:
    """Refuse a filter given as empty text: it matched nothing and said only "no records"."""
    for option in options:
        value = getattr(args, option)
        if value is not None and not value.strip():
            raise UserError(
                f"--{option} is empty: give the {option} to show, or leave --{option} out for "
                "all of them."
            )


def _audit(args: argparse.Namespace) -> int:
    _no_empty_filter(args, "thread", "user", "decision")
    since = parse_since(args.since)
    ledger = Ledger(existing_db(args.db))
    try:
        log = AuditLog(ledger)
        records = log.query(
            thread=args.thread,
            user=args.user,
            decision=args.decision,
            since=since,
            limit=args.limit,
        )
        held = log.decisions() if args.decision is not None and not records else None
    finally:
        ledger.close()
    if held is not None and args.decision not in held:  # a typo (`orphan`) or none yet
        print(
            f"keel: no record in this log has the decision {args.decision!r}; it holds "
            f"{', '.join(held) or 'no records'} (`--decision orphaned` lists the calls a crash "
            "left).",
            file=sys.stderr,
        )
    for r in records:
        if args.json:
            print(json.dumps(r.to_dict(), default=str))
            continue
        when = datetime.fromtimestamp(r.at, UTC).strftime("%Y-%m-%d %H:%M:%S")
        decision = f"{r.decision}:{r.status}" if r.status else r.decision
        extra = "".join(
            f" {k}={v}"
            for k, v in (("version", r.tool_version), ("rule", r.rule), ("by", r.approver))
            if v is not None
        )
        print(
            f"{when} {r.kind:<8} {decision:<18} {r.tool or '-':<20} user={r.user_id or '-'} "
            f"tenant={r.tenant_id or '-'} thread={r.thread_id or '-'}{extra} "
            f"args={json.dumps(r.args)} {r.result}"
        )
    if not records and not args.json:
        print("keel: no audit records match.")
    if len(records) == args.limit:  # the oldest first: newer records may be left out
        print(
            f"keel: showing the first {args.limit} records that match; narrow them (--since, "
            "--thread, --user) or raise --limit to see later ones.",
            file=sys.stderr,
        )
    return 0


def _report(args: argparse.Namespace) -> int:
    _no_empty_filter(args, "tenant")
    objectives = load_objectives(args.slo) if args.slo else []
    ledger = Ledger(existing_db(args.db))
    since = parse_since(args.since)
    try:
        runs = RunLog(ledger)
        records = runs.query(since=since, tenant=args.tenant)
        scores = runs.scores(since=since, tenant=args.tenant)
    finally:
        ledger.close()
    report = build_report(records, scores)
    versions = by_version(records, scores) if args.by == "version" else []
    breached = breaches(report, objectives)
    if args.json:
        extra = {"versions": [asdict(v) for v in versions]} if args.by else {}
        print(json.dumps({**report.to_dict(), **extra, "slo_breaches": breached}, indent=2))
    else:
        print(render_text(report))
        if args.by:
            print("\nby version:\n" + render_versions(versions))
    if args.html:
        html_path = Path(args.html).expanduser()
        try:
            html_path.write_text(render_html(report, breached, versions))
        except OSError as exc:
            raise KeelError(f"Cannot write --html {html_path}: {exc.strerror}.") from None
        print(f"keel: wrote {html_path}", file=sys.stderr)
    for b in breached:
        print(f"keel: SLO breached: {b}", file=sys.stderr)
    return 1 if breached else 0


def _health(args: argparse.Namespace) -> int:
    from keel.app.health import check_health

    result = check_health(db=args.db, chroma=args.chroma, semantic=args.semantic)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        for check in result.checks:
            print(f"{'ok  ' if check.ok else 'FAIL'} {check.name}: {check.detail}")
    return 0 if result.ok else 1
