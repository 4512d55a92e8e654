"""Attacks on the output guard's card check with spellings that read as the card.

A model talked into leaking a card number (or a hostile one) writes it with no-break or thin
spaces, zero-width characters or full-width digits between and for its digits: the reader sees
the card, and the guard, which knew ASCII digits split by ` ` or `-`, passed it. keel's agent
graph with keel's scripted model in the provider's place.
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


def test_a_hostile_models_spaced_card_never_reaches_the_answer() -> None:
    answer = f"Done. Card: {SPELLINGS['no-break space']} / {SPELLINGS['zero-width space']}"
    model = ScriptedChatModel(script=[AIMessage(content=answer)])
    final = build_agent(model, [], policy=Policy()).invoke(
        {"messages": [("user", "hi")]}, context=RunContext(user_id="u1")
    )
    assert final["messages"][-1].content == "Done. Card: [CARD] / [CARD]"
    assert final["messages"][-1].response_metadata["keel_guard"]["rules"] == ["pii:card"]
