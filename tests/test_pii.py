"""PII detection and redaction: true positives, tricky negatives, and properties."""

from __future__ import annotations

import importlib
import inspect
import itertools
import re
import textwrap
from collections import namedtuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from langchain_core.messages import AIMessage, HumanMessage

from keel.errors import UserError
from keel.guards import PiiMatch, find_pii, redact, sanitize
from keel.redact import PII_KINDS, iban_valid, luhn_valid


def kinds_of(text: str) -> list[tuple[str, str]]:
    return [(m.kind, m.value) for m in find_pii(text)]


# -- true positives ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [
        ("mail jane.doe+tag@example.co.uk today", "email", "jane.doe+tag@example.co.uk"),
        ("<JANE@EXAMPLE.COM>", "email", "JANE@EXAMPLE.COM"),
        ("call +44 20 7946 0958 now", "phone", "+44 20 7946 0958"),
        ("call +1 (415) 555-0199", "phone", "+1 (415) 555-0199"),
        ("call +14155550199", "phone", "+14155550199"),
        ("call +33 1 23 45 67 89.", "phone", "+33 1 23 45 67 89"),
        ("call (415) 555-0199", "phone", "(415) 555-0199"),
        ("call 415-555-0199", "phone", "415-555-0199"),
        ("call 415.555.0199", "phone", "415.555.0199"),
        ("call 1-800-555-0199", "phone", "1-800-555-0199"),
        ("card 4111 1111 1111 1111 exp", "card", "4111 1111 1111 1111"),
        ("card 4111-1111-1111-1111", "card", "4111-1111-1111-1111"),
        ("card 5555555555554444.", "card", "5555555555554444"),
        ("amex 3782 822463 10005", "card", "3782 822463 10005"),
        # pasted from a PDF or a web page: no-break, narrow no-break and thin spaces
        (
            "card 4111\u00a01111\u00a01111\u00a01111 exp",
            "card",
            "4111\u00a01111\u00a01111\u00a01111",
        ),
        ("carte 4111\u202f1111\u202f1111\u202f1111.", "card", "4111\u202f1111\u202f1111\u202f1111"),
        ("card 4111\u20091111 1111\u00a01111", "card", "4111\u20091111 1111\u00a01111"),
        ("iban DE89 3704 0044 0532 0130 00 ok", "iban", "DE89 3704 0044 0532 0130 00"),
        ("iban GB82WEST12345698765432", "iban", "GB82WEST12345698765432"),
        ("iban FR14 2004 1010 0505 0001 3M02 606", "iban", "FR14 2004 1010 0505 0001 3M02 606"),
        ("ssn 123-45-6789", "ssn", "123-45-6789"),
        ("host 192.168.1.10, up", "ip", "192.168.1.10"),
        ("host 10.0.0.1.", "ip", "10.0.0.1"),
        ("v6 2001:db8::8a2e:370:7334 up", "ip", "2001:db8::8a2e:370:7334"),
        ("v6 fe80::1", "ip", "fe80::1"),
        ("mapped ::ffff:192.168.1.1", "ip", "::ffff:192.168.1.1"),
        ("key sk-proj-abcdefghijklmnopqrstuvwx", "secret", "sk-proj-abcdefghijklmnopqrstuvwx"),
        ("AKIAIOSFODNN7EXAMPLE", "secret", "AKIAIOSFODNN7EXAMPLE"),
        (
            "ghp_abcdefghijklmnopqrstuvwxyz0123456789",
            "secret",
            "ghp_abcdefghijklmnopqrstuvwxyz0123456789",
        ),
        ("slack xoxb-1234567890-abcdefghij", "secret", "xoxb-1234567890-abcdefghij"),
        ("api_key=abc123def456", "secret", "abc123def456"),
        ('{"password": "hunter22"}', "secret", "hunter22"),
        ("AWS_SECRET_ACCESS_KEY = wJalrXUtnFEMI/K7MDENG.", "secret", "wJalrXUtnFEMI/K7MDENG"),
        ("Authorization: Bearer abcdefghijklmnop1234", "secret", "abcdefghijklmnop1234"),
        (
            "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.dozjgNryP4J3jVmNHl0w5N",
            "secret",
            "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.dozjgNryP4J3jVmNHl0w5N",
        ),
    ],
)
def test_finds(text: str, kind: str, value: str) -> None:
    assert kinds_of(text) == [(kind, value)]


def test_pem_private_key_block_and_a_truncated_one() -> None:
    pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----"
    assert redact(f"key:\n{pem}\nafter") == "key:\n[SECRET]\nafter"
    assert redact("-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBg") == "[SECRET]"
    assert redact("-----BEGIN PUBLIC KEY-----\nMIIBIjAN\n-----END PUBLIC KEY-----") == (
        "-----BEGIN PUBLIC KEY-----\nMIIBIjAN\n-----END PUBLIC KEY-----"
    )


def test_spans_index_the_text() -> None:
    text = "Jane (jane@example.com) paid with 4111 1111 1111 1111."
    assert find_pii(text) == [
        PiiMatch("email", 6, 22, "jane@example.com"),
        PiiMatch("card", 34, 53, "4111 1111 1111 1111"),
    ]
    for m in find_pii(text):
        assert text[m.start : m.end] == m.value


# -- tricky negatives --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "order #1234567890123456 shipped",  # 16 digits, no card network prefix / Luhn
        "order 4111111111111112",  # Visa prefix, Luhn fails
        "card 4111-1111 1111-1111",  # dashes and spaces mixed
        "1\u00a0234\u00a0567,89 kr and 12\u202f345\u202f678 €",  # amounts with no-break spaces
        "0000 0000 0000 0000",  # passes Luhn, not a card
        "tracking 1Z999AA10123456784",
        "on 2024-01-15, 2024/01/15, 15.01.2024 at 12:30:45",
        "the year 2024 and zip 94107, room 101",
        "version 1.2.3, v1.2.3.4, 1.2.3.4.5, python3.11.4",
        "price $1,234.56 or €1.234,56 or 1 234 567,89 kr",
        "uuid 123e4567-e89b-12d3-a456-426614174000",
        "uuid 12345678-1234-1234-1234-123456789012",
        "isbn 978-3-16-148410-0",
        "std::vector and a::b and Foo::Bar",
        "MAC 00:1A:2B:3C:4D:5E",
        "area code 123-456-7890 is not a NANP number",  # area code starting with 1
        "ssn-like 000-12-3456, 666-12-3456, 912-34-5678",
        "iban GB82 WEST 1234 5698 7654 33",  # checksum fails
        "iban XX82WEST12345698765432",  # no such country
        "max_tokens: 100000 and token_count=123456",
        "password: [REDACTED] and api_key=***",
        "score +1 5 and +3.5%",
        "sk-learn and task-abcdefghijklmnopqrstuvwxyz",
        "user@localhost and pkg@1.2.3 and @handle",
        "call 5551234567",  # bare digits: deliberately not a phone
    ],
)
def test_does_not_flag(text: str) -> None:
    assert find_pii(text) == []


def test_a_year_after_a_phone_number_is_not_part_of_it() -> None:
    assert kinds_of("call +1 415 555 0199 2024") == [("phone", "+1 415 555 0199")]


def test_overlaps_go_to_the_stronger_kind() -> None:
    # the card's digits also look like a phone number; the email holds digits
    assert kinds_of("4111-1111-1111-1111") == [("card", "4111-1111-1111-1111")]
    assert kinds_of("password=jane@example.com") == [("secret", "jane@example.com")]


# -- redact and sanitize -----------------------------------------------------------------------


def test_redact_replaces_each_kind() -> None:
    text = (
        "Jane <jane@example.com>, +44 20 7946 0958, card 4111 1111 1111 1111, "
        "IBAN DE89370400440532013000, SSN 123-45-6789, from 10.0.0.1, key AKIAIOSFODNN7EXAMPLE"
    )
    assert redact(text) == (
        "Jane <[EMAIL]>, [PHONE], card [CARD], IBAN [IBAN], SSN [SSN], from [IP], key [SECRET]"
    )


def test_redact_some_kinds_with_a_custom_replacement() -> None:
    text = "jane@example.com from 10.0.0.1"
    assert redact(text, kinds=["ip"], replacement=lambda kind: "***") == "jane@example.com from ***"


def test_unknown_kinds_are_refused() -> None:
    with pytest.raises(UserError) as err:
        redact("x", kinds=["email", "passport"])  # type: ignore[list-item]
    assert str(err.value) == (
        "kinds has unknown PII kinds ['passport']; use some of "
        "['secret', 'email', 'iban', 'card', 'ssn', 'ip', 'phone']."
    )
    with pytest.raises(UserError, match=r"^kinds must be a collection of kinds, e.g. \['email'\]"):
        find_pii("x", kinds="email")  # type: ignore[arg-type]


Point = namedtuple("Point", ["label", "value"])


def test_sanitize_walks_nested_data() -> None:
    args = {
        "to": "jane@example.com",
        "cc": ["ok", ("+44 20 7946 0958", 3)],
        "card": 4111111111111111,
        "amount": 42.5,
        "flags": {"a", "b"},
        "point": Point("ip", "10.0.0.1"),
        "nothing": None,
        "ok": True,
    }
    assert sanitize(args) == {
        "to": "[EMAIL]",
        "cc": ["ok", ("[PHONE]", 3)],
        "card": "[CARD]",
        "amount": 42.5,
        "flags": {"a", "b"},
        "point": Point("ip", "[IP]"),
        "nothing": None,
        "ok": True,
    }
    assert args["to"] == "jane@example.com", "the input is not changed"


def test_sanitize_content_blocks_keeps_binary_payloads() -> None:
    blocks = [
        {"type": "text", "text": "mail jane@example.com"},
        {"type": "image", "base64": "QUtJQUlPU0ZPRE5ON0VYQU1QTEU=", "mime_type": "image/png"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,4111111111111111"}},
    ]
    # tool arguments that merely have a "type" key are not content blocks: all redacted
    assert sanitize({"type": "refund", "data": "jane@example.com"}) == {
        "type": "refund",
        "data": "[EMAIL]",
    }
    assert sanitize(blocks) == [
        {"type": "text", "text": "mail [EMAIL]"},
        blocks[1],
        blocks[2],
    ]


def test_sanitize_messages_content_and_tool_call_args() -> None:
    ai = AIMessage(
        content="Sending to jane@example.com",
        tool_calls=[{"name": "send", "args": {"to": "jane@example.com"}, "id": "c1"}],
    )
    clean = sanitize([HumanMessage(content="I am jane@example.com"), ai])
    assert clean[0].content == "I am [EMAIL]"
    assert isinstance(clean[1], AIMessage)
    assert clean[1].content == "Sending to [EMAIL]"
    assert clean[1].tool_calls[0]["args"] == {"to": "[EMAIL]"}
    assert ai.tool_calls[0]["args"] == {"to": "jane@example.com"}


# -- validators and properties -----------------------------------------------------------------


def _luhn_digit(body: str) -> str:
    for d in "0123456789":
        if luhn_valid(body + d):
            return d
    raise AssertionError("unreachable")


@given(st.text(alphabet="0123456789", min_size=1, max_size=25))
def test_luhn_has_exactly_one_check_digit(body: str) -> None:
    valid = [d for d in "0123456789" if luhn_valid(body + d)]
    assert len(valid) == 1


@given(st.text(alphabet="0123456789", min_size=12, max_size=18), st.integers(0, 17), st.data())
def test_luhn_catches_every_single_digit_error(body: str, pos: int, data: st.DataObject) -> None:
    number = body + _luhn_digit(body)
    i = pos % len(number)
    wrong = data.draw(st.sampled_from([d for d in "0123456789" if d != number[i]]))
    assert not luhn_valid(number[:i] + wrong + number[i + 1 :])


@given(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=18, max_size=18))
def test_iban_check_digits_computed_by_iso_7064_validate(bban: str) -> None:
    # compute the check digits the way ISO 13616 does, then the validator must accept it
    numeric = int("".join(str(int(ch, 36)) for ch in bban + "DE00"))
    iban = f"DE{98 - numeric % 97:02d}{bban}"
    assert iban_valid(iban)
    assert iban_valid(" ".join(iban[i : i + 4] for i in range(0, len(iban), 4)))
    assert not iban_valid(iban[:2] + f"{(int(iban[2:4]) + 1) % 100:02d}" + iban[4:])
    text = f"pay to {iban}."
    assert redact(text) == "pay to [IBAN]."


_TRICKY = st.lists(
    st.sampled_from(
        [
            *"0123456789 -.:+@()[]_=/\n",
            *("a", "Z", "x", "sk-", "AKIA", "key=", "@b.co", "::", "+44 ", "4111", "DE89", "ghp_"),
        ]
    ),
    max_size=40,
).map("".join)


@settings(max_examples=300)
@given(st.one_of(_TRICKY, st.text(max_size=60)))
def test_redaction_is_idempotent(text: str) -> None:
    once = redact(text)
    assert redact(once) == once
    assert find_pii(once) == []


@given(_TRICKY)
def test_matches_are_ordered_disjoint_and_index_the_text(text: str) -> None:
    matches = find_pii(text)
    for a, b in itertools.pairwise(matches):
        assert a.end <= b.start
    for m in matches:
        assert text[m.start : m.end] == m.value and m.kind in PII_KINDS


# -- the docstring examples of the new modules run, and their `#>` outputs hold ------------------


def _examples(module_name: str) -> list[tuple[str, str]]:
    module = importlib.import_module(module_name)
    found = []
    objects = [module, *(getattr(module, n) for n in module.__all__)]
    objects += [m for o in objects if inspect.isclass(o) for m in vars(o).values()]
    for obj in objects:
        doc = inspect.getdoc(obj.__func__ if isinstance(obj, classmethod) else obj) or ""
        if getattr(obj, "__module__", module_name) != module_name and obj is not module:
            continue
        for block in re.findall(r"```python\n(.*?)```", doc, flags=re.S):
            found.append((getattr(obj, "__qualname__", module_name), textwrap.dedent(block)))
    return found


@pytest.mark.parametrize("module_name", ["keel.redact", "keel.guards.content", "keel.evals.chaos"])
def test_docstring_examples_run(module_name: str) -> None:
    examples = _examples(module_name)
    assert examples, f"{module_name} has no examples"
    for where, block in examples:
        namespace = dict(vars(importlib.import_module(module_name)))
        code: list[str] = []
        for line in block.splitlines():
            if not line.startswith("#>"):
                code.append(line)
                continue
            *before, last = [c for c in code if c.strip()]
            exec("\n".join(before), namespace)
            assert repr(eval(last, namespace)) == line[2:].strip(), where
            code = []
        exec("\n".join(code), namespace)
