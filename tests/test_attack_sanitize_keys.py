"""Attacks on `sanitize` with PII where it only read values: dict keys, floats and bytes.

The audit log, run records and traces record what `sanitize` leaves. It redacted every string
value but walked past dict keys, so a model that wrote a card number or an email as a key
(`{"4111 1111 1111 1111": 1}`, a tally keyed by customer email) put it in the audit log as plain
text; a card number sent as a JSON number with a fraction part (`4111111111111111.0`) or as
bytes passed too. Keys are redacted as values are, and keep their values (a `#2` after a key
that would take another's place); a whole float is read as its int; bytes are read as UTF-8
(bytes that are not kept as they are) and come back as bytes. Real SQLite ledger.
"""

from __future__ import annotations

import json
from pathlib import Path

from keel import AuditLog, Ledger, RunContext, build_agent, tool
from keel.evals import ScriptedChatModel, call
from keel.guards import Policy, Rule
from keel.redact import sanitize

CARD, MC = "4111 1111 1111 1111", "5500 0000 0000 0004"


@tool(risk="read")
def tally(counts: dict[str, int]) -> str:
    """Store counts by label."""
    return f"stored {len(counts)}"


def test_a_card_number_as_an_argument_key_never_reaches_the_audit_log(tmp_path: Path) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path}/k.db")
    counts = {CARD: 1, "jane@example.com": 2, "plain": 3}
    model = ScriptedChatModel(script=[call("tally", counts=counts), "done"])
    policy = Policy(rules=(Rule(tool="tally", action="allow"),))
    agent = build_agent(model, [tally], policy=policy, ledger=ledger)
    agent.invoke({"messages": [("user", "count")]}, context=RunContext(user_id="u1"))
    (record,) = [r for r in AuditLog(ledger).query() if r.kind == "tool"]
    assert record.args == {"counts": {"[CARD]": 1, "[EMAIL]": 2, "plain": 3}}
    stored = json.dumps(record.args)
    assert "4111" not in stored and "jane" not in stored
    ledger.close()


def test_keys_that_read_the_same_once_redacted_keep_every_value() -> None:
    assert sanitize({CARD: 1, MC: 2}) == {"[CARD]": 1, "[CARD] #2": 2}
    # a key that is already the redacted text keeps its place
    assert sanitize({CARD: 1, "[CARD]": 2}) == {"[CARD] #2": 1, "[CARD]": 2}


def test_keys_of_other_kinds_are_read_as_values() -> None:
    assert sanitize({4111111111111111: "a", ("to", "jane@example.com"): "b", 7: "c"}) == {
        "[CARD]": "a",
        ("to", "[EMAIL]"): "b",
        7: "c",
    }
    assert sanitize({"nested": {"jane@example.com": {CARD: 1}}}) == {
        "nested": {"[EMAIL]": {"[CARD]": 1}}
    }


def test_a_secret_key_name_still_hides_its_value() -> None:
    assert sanitize({"password": "hunter2hunter2", "jane@example.com": "x"}) == {
        "password": "[SECRET]",
        "[EMAIL]": "x",
    }


def test_a_card_number_as_a_whole_float_is_redacted() -> None:
    assert sanitize({"card": 4111111111111111.0, "n": 3.0, "price": 12.5}) == {
        "card": "[CARD]",
        "n": 3.0,
        "price": 12.5,
    }
    nan, inf = float("nan"), float("inf")
    assert sanitize([nan, inf, 1e300]) == [nan, inf, 1e300]  # the same nan object: equal
    assert sanitize({nan: 1}) == {nan: 1}  # a nan key is not "renamed" (nan != nan)


def test_bytes_are_read_as_utf8_and_stay_bytes() -> None:
    raw = f"card {CARD}, mail jane@example.com ".encode() + b"\xff\xfe\x00 end"
    assert sanitize({"blob": raw}) == {"blob": b"card [CARD], mail [EMAIL] \xff\xfe\x00 end"}
    assert sanitize(bytearray(CARD.encode())) == bytearray(b"[CARD]")
    binary = bytes(range(256))
    assert sanitize(binary) is binary  # nothing found: the same bytes, not a copy
