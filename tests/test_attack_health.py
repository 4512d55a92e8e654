"""Attacks on the health routes' promise that passwords are never shown.

A readiness check that fails shows why; the why may echo the URL it was given (psycopg quotes
a malformed URI whole, keel names a URL it does not support). Whatever the URL looks like (a
password with an `@` in it, a malformed URI, a libpq key=value string, a `password=` query
parameter), no part of the password may reach the answer.
"""

from __future__ import annotations

import json

import pytest

from keel.app.health import served_readiness

SECRET = "s3cr3tpw"

URLS = [
    f"postgresql://alice:{SECRET}@127.0.0.1:1/x",
    "postgresql://alice:s3cr@3tpw@127.0.0.1:1/x",  # an unencoded @ in the password
    f"postgresql://alice:{SECRET}@[::1:1/x",  # malformed: psycopg echoes the whole URI
    f"postgresql://alice@127.0.0.1:1/x?password={SECRET}",
    f"postgresql://alice:{SECRET}@127.0.0.1:1/x?sslmode=nonsense",
    f"postgresql+asyncpg://alice:{SECRET}@127.0.0.1:1/x",
    f"mysql://alice:{SECRET}@127.0.0.1:1/x",
    f"host=127.0.0.1 port=1 user=alice password={SECRET}",
    f"host=127.0.0.1 port=1 user=alice password='{SECRET} x'",
]


@pytest.mark.parametrize("url", URLS)
def test_no_part_of_a_password_is_shown(url: str) -> None:
    health = served_readiness(db=url, ledger=url)
    assert not health.ok
    text = json.dumps(health.to_dict())
    assert "s3cr" not in text and "3tpw" not in text, text
    assert {c.name for c in health.checks} == {"database", "ledger"}
