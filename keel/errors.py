"""keel's errors, split by audience (as Pydantic AI does).

- `UserError`: the developer called keel wrongly; the message says what to change.
- `SetupError`: the environment is not ready (database schema, missing package).
  - `SchemaVersionError`: the database was set up by a newer keel.
- `ModelRequestsForbidden`: a real model was called where only test doubles may run.
"""

from __future__ import annotations

__all__ = ["KeelError", "ModelRequestsForbidden", "SchemaVersionError", "SetupError", "UserError"]


class KeelError(Exception):
    """Base class of every error keel raises."""


class UserError(KeelError, ValueError):
    """A developer mistake: bad arguments, bad configuration. The message says the fix."""


class SetupError(KeelError, RuntimeError):
    """The environment is not ready: a database without keel's tables, a missing package."""


class SchemaVersionError(SetupError):
    """The ledger database is at a schema version this keel does not know (a newer keel's).

    Args:
        found: The database's version.
        known: The newest version this keel knows.
    """

    def __init__(self, *, found: int, known: int) -> None:
        self.found = found
        self.known = known
        super().__init__(
            f"The ledger database is at schema version {found}, but this keel knows versions up "
            f"to {known}: a newer keel set it up. Upgrade keel (pip install -U langgraph-keel) "
            "in every process that shares this database, or point this one at another database."
        )


class ModelRequestsForbidden(KeelError, RuntimeError):
    """A real chat model was called while model requests are forbidden (tests, evals)."""
