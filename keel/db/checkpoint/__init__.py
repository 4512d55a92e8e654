"""keel.db.checkpoint: LangGraph checkpointers and checkpoint maintenance.

- `AsyncPooledPostgresSaver`: LangGraph's async Postgres saver, one pool connection per call
  instead of one lock per saver, and group commits (same tables, same format).
- `PruneReport`: what `keel.Persistence.prune()` (retention) deleted, or would delete.
- `CheckpointPolicy`: a size limit per checkpoint (warn or refuse) and strict serialization
  (`UnserializableState` names the path of a value that would not load back).
"""

from keel.db.checkpoint.postgres import AsyncPooledPostgresSaver
from keel.db.checkpoint.retention import PruneReport
from keel.db.checkpoint.strict import (
    CheckpointPolicy,
    CheckpointSizeWarning,
    CheckpointTooLarge,
    UnserializableState,
)

__all__ = [
    "AsyncPooledPostgresSaver",
    "CheckpointPolicy",
    "CheckpointSizeWarning",
    "CheckpointTooLarge",
    "PruneReport",
    "UnserializableState",
]
