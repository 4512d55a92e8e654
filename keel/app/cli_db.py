"""`keel threads`, `keel threads prune` and `keel db setup`: the stored threads and the database.

Loaded by `keel.app.cli` only when one of them runs (they bring LangGraph's checkpointers and
the database drivers).
"""

from __future__ import annotations

import argparse
from datetime import timedelta
from textwrap import shorten

from keel.app.cli_observe import existing_db
from keel.db.ledger import Ledger
from keel.db.migrations import version_flow
from keel.db.persistence import Persistence
from keel.errors import KeelError

__all__ = ["run"]


def run(args: argparse.Namespace) -> int:
    """Run `keel threads [prune]` or `keel db setup`; returns the exit code."""
    if args.command == "db":
        return _db_setup(args.db)
    if args.threads_command == "prune":
        return _threads_prune(args)
    return _threads(args)


def _threads(args: argparse.Namespace) -> int:
    rows = Persistence(existing_db(args.db)).list_threads(limit=args.limit)
    if not rows:
        print("keel: no threads yet. Run `keel demo` to make one.")
        return 0
    for row in rows:
        result = row.values.get("outcome") or {}
        reason = (
            shorten(row.error, 60, placeholder="…")
            if row.error
            else result.get("terminated_reason", "-")
        )
        print(f"{row.thread_id:<24} {row.updated_at or '-':<32} {row.status:<12} {reason}")
    return 0


def _threads_prune(args: argparse.Namespace) -> int:
    if args.keep is None and args.idle_days is None:
        raise KeelError("threads prune needs --keep N and/or --idle-days D (see --help).")
    idle = None if args.idle_days is None else timedelta(days=args.idle_days)
    report = Persistence(existing_db(args.db)).prune(
        keep_last=args.keep, idle_ttl=idle, dry_run=args.dry_run
    )
    print(f"keel: {'dry run: ' if report.dry_run else ''}{report.summary()}")
    for thread_id in report.threads_deleted:
        print(f"  {'would delete' if report.dry_run else 'deleted'} {thread_id}")
    for thread_id, reason in report.threads_skipped:
        print(f"  skipped {thread_id}: {reason}")
    return 0


def _db_setup(url: str | None) -> int:
    persistence = Persistence(url)
    persistence.setup()
    ledger = Ledger(url)
    try:
        version = ledger.run(version_flow())  # sets the ledger up (migrates) first
    finally:
        ledger.close()
    print(f"keel: database ready at {persistence.safe_url} (ledger schema version {version})")
    return 0
