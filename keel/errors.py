"""keel's errors, split by audience (as Pydantic AI does).

- `UserError`: the developer called keel wrongly; the message says what to change.
- `SetupError`: the environment is not ready (database schema, missing package).
- `ModelRequestsForbidden`: a real model was called where only test doubles may run.
"""

from __future__ import annotations

__all__ = ["KeelError", "ModelRequestsForbidden", "SetupError", "UserError"]


class KeelError(Exception):
    """Base class of every error keel raises."""


class UserError(KeelError, ValueError):
    """A developer mistake: bad arguments, bad configuration. The message says the fix."""


class SetupError(KeelError, RuntimeError):
    """The environment is not ready: a database without keel's tables, a missing package."""


class ModelRequestsForbidden(KeelError, RuntimeError):
    """A real chat model was called while model requests are forbidden (tests, evals)."""
