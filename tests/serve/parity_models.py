"""Scripted models the parity server config names by `package.module:attribute`.

The server imports them (PYTHONPATH holds the repository root); each is stateless across runs
(a scripted model answers by the turn of the conversation it is given).
"""

from __future__ import annotations

from collections.abc import Sequence

from langchain_core.messages import BaseMessage, SystemMessage

from keel.evals import ChaosChatModel, ChaosPolicy, ScriptedChatModel, call

PLACE = "Ships to Lisbon, Portugal."


def _recalled(messages: Sequence[BaseMessage]) -> str:
    memory = " ".join(m.text for m in messages if isinstance(m, SystemMessage))
    return "You ship to Lisbon." if "Lisbon" in memory else "I do not know where you ship."


def _sum_right(messages: Sequence[BaseMessage]) -> dict[str, object]:
    answer = messages[-1].text.rpartition("Answer:")[2]
    if "42" in answer:
        return {"passed": True, "reason": "the sum is right"}
    return {"passed": False, "reason": "17 + 25 is not 41"}


remembering = ScriptedChatModel(script=[call("remember", text=PLACE), "Noted."])
"""Run 1: stores where the user ships through the `remember` tool."""

recalling = ScriptedChatModel(script=[_recalled])
"""Run 2: answers from what `recall` put into its context, and only from that."""

revising = ScriptedChatModel(script=["17 + 25 = 41.", "17 + 25 = 42."])
"""Wrong first, right after the judge's reason."""

judge = ScriptedChatModel(structured={"JudgeVerdict": _sum_right})
"""Passes an answer that says 42."""

down = ChaosChatModel(
    model=ScriptedChatModel(script=["Answered by the primary model."]),
    policy=ChaosPolicy(server_error=1.0),
)
"""Every call fails with a 5xx."""

backup = ScriptedChatModel(script=["Answered by the backup model."])
"""The fallback."""

adder = ScriptedChatModel(script=[call("add", a=17, b=25), "It is 42."])
"""The semantic health check's known task, answered right."""
