"""Attacks on hiding secrets by key name with the spellings JSON APIs use.

keel hides the value of a key naming a secret wherever it stores or sends data (audit log, run
records, decision logs, traces), "whatever it looks like". `access_token` and `X-Api-Key` were
hidden, but not their camelCase twins (`accessToken`, `clientSecret`, `dbPassword`,
`refreshToken`: most JSON APIs' spelling), nor `secret_key` (Django's, AWS's). A tool taking
`accessToken` wrote the token into the audit log as plain text. Real SQLite ledger.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from keel import AuditLog, Ledger, RunContext, build_agent, tool
from keel.evals import ScriptedChatModel, call
from keel.guards import Policy, Rule
from keel.redact import sanitize, secret_key

SECRET_NAMES = [
    "accessToken",
    "refreshToken",
    "idToken",
    "authToken",
    "sessionToken",
    "bearerToken",
    "clientSecret",
    "dbPassword",
    "secretKey",
    "secret_key",
    "SECRET_KEY",
    "secretAccessKey",
    "XApiKey",
    "apiKey",
    "access_token",
    "X-Api-Key",
]
COUNTS_AND_NAMES = ["maxTokens", "inputTokens", "tokenCount", "authorId", "keyboard", "keyId"]


@pytest.mark.parametrize("name", SECRET_NAMES)
def test_a_camel_case_or_snake_case_secret_key_is_hidden(name: str) -> None:
    assert secret_key(name)
    assert sanitize({name: "plainvalue123"}) == {name: "[SECRET]"}


@pytest.mark.parametrize("name", COUNTS_AND_NAMES)
def test_counts_and_ids_are_not_secrets(name: str) -> None:
    assert not secret_key(name)


@tool(risk="read")
def call_api(endpoint: str, accessToken: str) -> str:
    """Call an API with a token."""
    return "ok"


def test_a_tools_camel_case_token_never_reaches_the_audit_log(tmp_path: Path) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path}/k.db")
    model = ScriptedChatModel(
        script=[call("call_api", endpoint="/me", accessToken="plain-token-42"), "done"]
    )
    policy = Policy(rules=(Rule(tool="call_api", action="allow"),))
    agent = build_agent(model, [call_api], policy=policy, ledger=ledger)
    agent.invoke({"messages": [("user", "who am I")]}, context=RunContext(user_id="u1"))
    (record,) = [r for r in AuditLog(ledger).query() if r.kind == "tool"]
    assert record.args == {"endpoint": "/me", "accessToken": "[SECRET]"}
    ledger.close()
