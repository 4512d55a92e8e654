"""keel.checkpoint: LangGraph checkpointers and checkpoint maintenance.

- `AsyncPooledPostgresSaver`: LangGraph's async Postgres saver, one pool connection per call
  instead of one lock per saver, and group commits (same tables, same format).
- `PruneReport`: what `keel.Persistence.prune()` (retention) deleted, or would delete.
"""

from keel.checkpoint.postgres import AsyncPooledPostgresSaver
from keel.checkpoint.retention import PruneReport

__all__ = ["AsyncPooledPostgresSaver", "PruneReport"]
