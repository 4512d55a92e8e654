"""keel's errors, split by audience (as Pydantic AI does).

- `UserError`: the developer called keel wrongly; the message says what to change.
- `SetupError`: the environment is not ready (database schema, missing package).
- `StorageError`: keel's database failed mid-run (a connection lost for good, a commit whose
  result is unknown); category `storage`. Transient failures are retried before it is raised.
- `ModelRequestsForbidden`: a real model was called where only test doubles may run.
"""

from __future__ import annotations

__all__ = ["KeelError", "ModelRequestsForbidden", "SetupError", "StorageError", "UserError"]


class KeelError(Exception):
    """Base class of every error keel raises."""


class UserError(KeelError, ValueError):
    """A developer mistake: bad arguments, bad configuration. The message says the fix."""


class SetupError(KeelError, RuntimeError):
    """The environment is not ready: a database without keel's tables, a missing package."""


class ModelRequestsForbidden(KeelError, RuntimeError):
    """A real chat model was called while model requests are forbidden (tests, evals)."""


class StorageError(KeelError, RuntimeError):
    """keel's database failed during a run, after the retries that were safe.

    A transaction that surely did not commit (its connection died before `COMMIT` was sent)
    is replayed on a fresh connection first; this is raised when that is impossible or keeps
    failing. Nothing is duplicated by resuming the run: a run that ends on it resumes from its
    last checkpoint. `in_doubt` is true when the connection died while committing, so the
    transaction may or may not have been applied (keel's writes are keyed, so a resume finds
    it either way).
    """

    category = "storage"
    """The error category a run that ends on this error is reported under."""

    def __init__(self, message: str, *, in_doubt: bool = False) -> None:
        super().__init__(message)
        self.in_doubt = in_doubt
        """Whether the failed transaction may have committed."""
