"""Attacks on the output guard through an answer's content blocks other than `text`.

A provider's answer may carry more than `text` blocks: Anthropic's `thinking`, LangChain's
`reasoning`, OpenAI's `output_text` and citations (`annotations`) on a text block. They are
saved in the thread and sent to the client with the answer, so a model talked into it (or a
hostile one) put a card number there and the guard, which read `text` blocks only, passed it.
Real parts: keel's agent graph on a real SQLite checkpointer, keel's scripted model in the
provider's place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage

from keel import Ledger, Persistence, RunContext, RunLog, build_agent
from keel.evals import ScriptedChatModel
from keel.guards import Policy

CARD = "4111 1111 1111 1111"
ALICE = RunContext(user_id="alice")

BLOCKS: dict[str, list[Any]] = {
    "thinking": [
        {"type": "thinking", "thinking": f"the card is {CARD}", "signature": "c2ln"},
        {"type": "text", "text": "Done."},
    ],
    "reasoning": [
        {"type": "reasoning", "reasoning": f"the card is {CARD}"},
        {"type": "text", "text": "Done."},
    ],
    "summary": [
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": f"card {CARD}"}]},
        {"type": "text", "text": "Done."},
    ],
    "citation": [
        {"type": "text", "text": "Done.", "annotations": [{"type": "citation", "title": CARD}]}
    ],
    "output_text": [{"type": "output_text", "text": f"the card is {CARD}"}],
    "text-plain": [
        {"type": "text-plain", "text": f"the card is {CARD}", "mime_type": "text/plain"}
    ],
}


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_no_block_of_an_answer_keeps_a_card_number(tmp_path: Path, kind: str) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path}/k.db")
    model = ScriptedChatModel(script=[AIMessage(content=BLOCKS[kind])])
    config = {"configurable": {"thread_id": kind}}
    with Persistence(f"sqlite:///{tmp_path}/c.db").checkpointer() as saver:
        agent = build_agent(model, [], policy=Policy(), checkpointer=saver, ledger=ledger)
        final = agent.invoke({"messages": [("user", "hi")]}, config, context=ALICE)
        saved = [repr(s.values) for s in agent.get_state_history(config)]
    assert final["outcome"]["terminated_reason"] == "completed"
    answer = final["messages"][-1]
    assert CARD not in repr(answer.content) and "[CARD]" in repr(answer.content)
    assert answer.response_metadata["keel_guard"]["rules"] == ["pii:card"]
    assert not any(CARD in s for s in saved), "no checkpoint holds the unchecked answer"
    assert RunLog(ledger).query()[0].guard_findings["output:pii:card"] == 1
    ledger.close()


def test_a_thinking_block_keeps_its_signature_and_a_clean_one_is_left_alone(
    tmp_path: Path,
) -> None:
    clean = [{"type": "thinking", "thinking": "plan: answer", "signature": "c2ln"}, "Hi."]
    for content, changed in ((BLOCKS["thinking"], True), (clean, False)):
        model = ScriptedChatModel(script=[AIMessage(content=content)])
        answer = build_agent(model, [], policy=Policy()).invoke(
            {"messages": [("user", "hi")]}, context=ALICE
        )["messages"][-1]
        assert answer.content[0]["signature"] == "c2ln"
        assert ("keel_guard" in answer.response_metadata) is changed
        assert (answer.content == content) is not changed


def test_a_card_split_across_text_blocks_is_found_beside_a_thinking_block() -> None:
    content = [
        {"type": "thinking", "thinking": f"it is {CARD}", "signature": "c2ln"},
        {"type": "text", "text": "Billed to 4111 1111 "},
        {"type": "text", "text": "1111 1111."},
    ]
    model = ScriptedChatModel(script=[AIMessage(content=content)])
    answer = build_agent(model, [], policy=Policy()).invoke(
        {"messages": [("user", "hi")]}, context=ALICE
    )["messages"][-1]
    assert "4111" not in repr(answer.content)
    assert answer.response_metadata["keel_guard"]["rules"] == ["pii:card"]
