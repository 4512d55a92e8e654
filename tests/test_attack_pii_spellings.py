"""Attacks on the output guard's PII check with spellings that read as the PII.

A model talked into leaking a card number (or a hostile one) writes it with no-break or thin
spaces, zero-width characters or full-width digits between and for its digits: the reader sees
the card, and the guard, which knew ASCII digits split by ` ` or `-`, passed it. The same goes
for an email (a zero-width character inside, a full-width at sign or dot), an SSN (spaces, no-break
spaces, non-ASCII digits), a phone number (no-break spaces, zero-width characters), an IBAN
(no-break spaces, full-width digits) and an email whose dot is an ideographic full stop (`。`, as
CJK input methods type it). keel's agent graph with keel's scripted model in the provider's place.
"""

from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage

from keel import RunContext, build_agent
from keel.evals import ScriptedChatModel
from keel.guards import Policy
from keel.redact import redact

SPELLINGS = {
    "no-break space": "4111\u00a01111\u00a01111\u00a01111",
    "narrow no-break space": "4111\u202f1111\u202f1111\u202f1111",
    "thin space": "4111\u20091111\u20091111\u20091111",
    "ideographic space": "4111\u30001111\u30001111\u30001111",
    "zero-width space": "4111\u200b1111\u200b1111\u200b1111",
    "zero-width between every digit": "\u200b".join("4111111111111111"),
    "word joiner beside a space": "4111\u2060 1111\u2060 1111\u2060 1111",
    "soft hyphen": "4111\u00ad1111\u00ad1111\u00ad1111",
    "full-width digits": "".join(
        chr(0xFF10 + int(d)) if d != " " else d for d in "4111 1111 1111 1111"
    ),
    "arabic-indic digits": "".join(
        chr(0x0660 + int(d)) if d != " " else d for d in "4111 1111 1111 1111"
    ),
}
ZW, NBSP = "\u200b", "\u00a0"


def _full_width(text: str) -> str:
    return "".join(chr(0xFF10 + int(ch)) if ch.isdigit() else ch for ch in text)


def _full_width_all(text: str) -> str:
    """Digits and capitals full-width, as a CJK input method types them."""
    return "".join(chr(ord(ch) + 0xFEE0) if ch.isalnum() else ch for ch in text)


OTHER_SPELLINGS = {
    "email, zero-width in the name": ("email", f"ja{ZW}ne@example.com"),
    "email, zero-width before the @": ("email", f"jane{ZW}@example.com"),
    "email, soft hyphens in the domain": ("email", "jane@exam\u00adple\u00ad.com"),
    "email, zero-width in the top-level domain": ("email", f"jane@example.c{ZW}om"),
    "email, full-width @": ("email", "jane\uff20example.com"),
    "email, full-width dot": ("email", "jane.doe@example\uff0eco\uff0euk"),
    "email, full-width @ and dot": ("email", "jane\uff20example\uff0ecom"),
    "ssn with spaces": ("ssn", "123 45 6789"),
    "ssn with no-break spaces": ("ssn", f"123{NBSP}45{NBSP}6789"),
    "ssn with thin spaces": ("ssn", "123\u200945\u20096789"),
    "ssn in full-width digits": ("ssn", _full_width("123-45-6789")),
    "ssn in arabic-indic digits": (
        "ssn",
        "".join(chr(0x0660 + int(d)) if d.isdigit() else d for d in "123-45-6789"),
    ),
    "ssn with zero-width characters": ("ssn", f"12{ZW}3-{ZW}45-67{ZW}89"),
    "phone with no-break spaces": ("phone", f"+44{NBSP}20{NBSP}7946{NBSP}0958"),
    "north american phone with no-break spaces": ("phone", f"415{NBSP}555{NBSP}0199"),
    "north american phone, a no-break space after the area code": (
        "phone",
        f"(415){NBSP}555-0199",
    ),
    "iban with no-break spaces": ("iban", f"DE89{NBSP}3704{NBSP}0044{NBSP}0532{NBSP}0130{NBSP}00"),
    "iban with narrow no-break spaces": (
        "iban",
        "GB82\u202fWEST\u202f1234\u202f5698\u202f7654\u202f32",
    ),
    "iban with a zero-width character": ("iban", f"DE89{ZW}3704 0044 0532 0130 00"),
    # phone numbers with invisible characters inside, IBANs in full-width digits, emails with
    # an ideographic full stop for the dot passed before
    "phone with zero-width characters": ("phone", f"+44{ZW} 20 79{ZW}46 0958"),
    "phone, a zero-width character between every digit": ("phone", ZW.join("+14155550199")),
    "phone with soft hyphens": ("phone", "+44\u00ad20\u00ad7946\u00ad0958"),
    "north american phone with a word joiner": ("phone", "(415)\u2060 555-01\u206099"),
    "north american phone, dashes and zero-width": ("phone", f"415-5{ZW}55-0199"),
    "iban in full-width digits": ("iban", "GB" + _full_width("82 WEST 1234 5698 7654 32")),
    "iban in full-width digits, no spaces": ("iban", "DE" + _full_width("89370400440532013000")),
    "iban in arabic-indic digits": (
        "iban",
        "DE"
        + "".join(chr(0x0660 + int(d)) if d.isdigit() else d for d in "89 3704 0044 0532 0130 00"),
    ),
    "iban, full-width letters and digits": ("iban", _full_width_all("DE89 3704 0044 0532 0130 00")),
    "iban, full-width letters inside": ("iban", _full_width_all("GB82 WEST 1234 5698 7654 32")),
    "iban, full-width letters, no spaces": ("iban", _full_width_all("GB82WEST12345698765432")),
    "iban, full-width country": ("iban", _full_width_all("GB") + "82WEST12345698765432"),
    "email, ideographic full stop": ("email", "jane@example\u3002com"),
    "email, half-width ideographic full stop": ("email", "jane@example\uff61co\uff61uk"),
    "email, ideographic full stop in the name": ("email", "jane\u3002doe@example\u3002com"),
}
NOT_PII = [
    f"1{NBSP}234{NBSP}567,89 kr and 12{NBSP}345{NBSP}678 €",  # amounts
    f"1{NBSP}234,56 € on 15{NBSP}01{NBSP}2024",  # an amount, a date
    "version 1.2.3 and v1\uff0e2\uff0e3",  # versions
    "ids 12 123 45 6789",  # groups of a longer spaced number, not an SSN
    "123 45 6789 12",
    "123-45 6789",  # mixed separators
    _full_width("912-45-6789"),  # area 9xx
    f"123-45-6789{ZW}0",  # reads as 123-45-67890
    f"DE89 3704 0044 0532 0130 00{ZW}1",  # reads as a longer number
    f"DE89{NBSP}3704{NBSP}0044{NBSP}0532{NBSP}0130{NBSP}01",  # checksum fails
    "user\uff20localhost and @handle and pkg\uff201.2.3",
    f"call 555{NBSP}1234567",  # bare digits: not a phone
    f"call 555{ZW}1234567",  # nor with a zero-width character inside
    f"+1{ZW}23",  # too few digits for a phone
    "GB" + _full_width("82 WEST 1234 5698 7654 33"),  # checksum fails
    _full_width_all("GB82 WEST 1234 5698 7654 33"),  # checksum fails, full-width letters too
    _full_width_all("XGB82WEST12345698765432"),  # part of a longer full-width word
    "see @handle\u3002Thanks, and v1\u30022\u30023",  # no address: a handle, a version
]
NOT_CARDS = [
    "order 1234 5678 9012 3456 shipped",  # fails Luhn
    "4111 1111-1111 1111",  # mixed separators: not one number as written
    "v1.4111111111111111",  # part of a version
    "4111\u00a01111\u00a01111\u00a01112",  # fails Luhn
]


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_a_card_spelled_to_slip_past_is_redacted(spelling: str) -> None:
    text = f"Billed to {SPELLINGS[spelling]}, thanks."
    assert redact(text) == "Billed to [CARD], thanks."


@pytest.mark.parametrize("text", NOT_CARDS)
def test_numbers_that_are_not_cards_stay(text: str) -> None:
    assert redact(text) == text


@pytest.mark.parametrize("spelling", list(OTHER_SPELLINGS))
def test_other_pii_spelled_to_slip_past_is_redacted_whole(spelling: str) -> None:
    kind, value = OTHER_SPELLINGS[spelling]
    text = f"Send it to {value}, thanks."
    # the whole of it goes, the invisible characters inside too
    assert redact(text) == f"Send it to [{kind.upper()}], thanks."


@pytest.mark.parametrize("text", NOT_PII)
def test_text_that_is_no_pii_stays(text: str) -> None:
    assert redact(text) == text


# Japanese, Chinese, Korean and Thai put no space between a word and what follows it: PII
# written right against their letters stood inside a "word" (they are word characters) and passed.
UNSPACED = [
    ("メールはjane@example.comです。", "メールは[EMAIL]です。"),
    ("邮箱jane@example.com谢谢", "邮箱[EMAIL]谢谢"),
    ("이메일jane@example.com으로", "이메일[EMAIL]으로"),
    ("อีเมลjane@example.comครับ", "อีเมล[EMAIL]ครับ"),
    ("カード4111 1111 1111 1111です", "カード[CARD]です"),
    ("电话+86 10 6552 9988转", "电话[PHONE]转"),
    ("電話は415-555-0199まで", "電話は[PHONE]まで"),
    ("SSNは123-45-6789です", "SSNは[SSN]です"),
    ("口座GB82 WEST 1234 5698 7654 32へ", "口座[IBAN]へ"),
    ("サーバ10.0.0.1です", "サーバ[IP]です"),
    ("키는sk-proj-abcdefghijklmnopqrstuvwxyz입니다", "키는[SECRET]입니다"),
]


@pytest.mark.parametrize(("text", "redacted"), UNSPACED, ids=[t for t, _ in UNSPACED])
def test_pii_against_letters_of_an_unspaced_script_is_redacted(text: str, redacted: str) -> None:
    assert redact(text) == redacted


@pytest.mark.parametrize(
    "text",
    [
        "x4111111111111111",
        "abc123-45-6789",
        "v10.0.0.1a",
        "café4111111111111111",
        "été415-555-0199",
    ],
)
def test_pii_inside_a_latin_word_still_stays(text: str) -> None:
    assert redact(text) == text


def _guarded_answer(answer: str) -> AIMessage:
    """The final answer of keel's agent (with a policy) whose model said `answer`."""
    model = ScriptedChatModel(script=[AIMessage(content=answer)])
    final = build_agent(model, [], policy=Policy()).invoke(
        {"messages": [("user", "hi")]}, context=RunContext(user_id="u1")
    )
    message: AIMessage = final["messages"][-1]
    return message


def test_a_hostile_models_spaced_card_never_reaches_the_answer() -> None:
    answer = f"Done. Card: {SPELLINGS['no-break space']} / {SPELLINGS['zero-width space']}"
    final = _guarded_answer(answer)
    assert final.content == "Done. Card: [CARD] / [CARD]"
    assert final.response_metadata["keel_guard"]["rules"] == ["pii:card"]


def test_a_hostile_models_disguised_phone_iban_and_email_never_reach_the_answer() -> None:
    iban = "GB" + _full_width("82 WEST 1234 5698 7654 32")
    final = _guarded_answer(
        f"Call +44{ZW} 20 79{ZW}46 0958, pay {iban}, mail jane@example\u3002com."
    )
    assert final.content == "Call [PHONE], pay [IBAN], mail [EMAIL]."
    rules = sorted(final.response_metadata["keel_guard"]["rules"])
    assert rules == ["pii:email", "pii:iban", "pii:phone"]


def test_a_hostile_models_disguised_email_and_ssn_never_reach_the_answer() -> None:
    final = _guarded_answer(f"Mail jane\uff20example\uff0ecom, SSN 123{NBSP}45{NBSP}6789.")
    assert final.content == "Mail [EMAIL], SSN [SSN]."
    assert sorted(final.response_metadata["keel_guard"]["rules"]) == ["pii:email", "pii:ssn"]
