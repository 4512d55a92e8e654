"""keel.db: storage. One URL picks the backend (SQLite embedded, PostgreSQL in production).

- `Persistence`: the URL factory, LangGraph checkpointers and pools, retention.
- `Ledger`: keel's own tables (budgets, rate limits, breakers, standing approvals, idempotency,
  audit, run records), one transaction per `Flow`.
- `AuditLog` / `RunLog`: the audit log and the run records, in the ledger.
- `keel.db.tables` / `keel.db.migrations`: the ledger's tables, defined once, and its versioned
  schema (`MIGRATIONS`, applied by `Ledger.setup()`).
- `keel.db.checkpoint`: strict and pooled checkpointers, checkpoint retention.
- `keel.db.pools`: PostgreSQL pools and connections: health checks that drain, waits that tell a
  busy pool from a server gone, TCP keepalives and reply timeouts.
- `keel.db.idempotency`: the at-most-once bookkeeping of side-effecting tool calls.
- `keel.db.url`: the default database URL.

Each name loads when first used (`keel._lazy`). Storage imports only keel's core (`keel.errors`,
`keel.state`, ...), never a feature above it.
"""

import typing

from keel._lazy import lazy_facade as _lazy_facade

if typing.TYPE_CHECKING:
    from keel.db.audit import AuditLog, AuditRecord
    from keel.db.ledger import Flow, Ledger
    from keel.db.persistence import Persistence, PruneReport, ThreadSummary
    from keel.db.runs import RunLog, RunRecord
    from keel.db.url import default_db_url
else:
    _lazy_facade(
        __name__,
        {
            "keel.db.audit": ("AuditLog", "AuditRecord"),
            "keel.db.ledger": ("Flow", "Ledger"),
            "keel.db.persistence": ("Persistence", "PruneReport", "ThreadSummary"),
            "keel.db.runs": ("RunLog", "RunRecord"),
            "keel.db.url": ("default_db_url",),
        },
    )

__all__ = [
    "AuditLog",
    "AuditRecord",
    "Flow",
    "Ledger",
    "Persistence",
    "PruneReport",
    "RunLog",
    "RunRecord",
    "ThreadSummary",
    "default_db_url",
]
