"""The database URL keel uses when none is given (light: the `keel` command's help names it)."""

from __future__ import annotations

import os

__all__ = ["DEFAULT_DB_URL", "default_db_url"]

DEFAULT_DB_URL = "sqlite:///.keel/keel.db"
"""The URL used when neither an argument nor `KEEL_DB_URL` names one."""


def default_db_url() -> str:
    """The database URL to use when none is given: env `KEEL_DB_URL`, else the SQLite default."""
    return os.environ.get("KEEL_DB_URL") or DEFAULT_DB_URL
