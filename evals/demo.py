"""The demo scenario's scripted models (`keel:demo`, `-support`, `-router`, `-memory`).

They play `keel.app.demo`'s support scenario offline. Nothing in keel imports this module: a
model string names it (`resolve_model("keel:demo")`, `KEEL_MODEL`, a server config), so the
production server's import path never carries a scripted model.
"""

from __future__ import annotations

from collections.abc import Sequence

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage

from keel.app.demo import DEMO_TASK
from keel.evals.scripted import ScriptedChatModel, call

__all__ = ["demo_memory_model", "demo_model", "demo_router_model", "demo_support_model"]


def demo_model(latency: float = 0.0) -> BaseChatModel:
    """Keel's scripted model playing the scenario (plan, three tool calls, final answer)."""
    return ScriptedChatModel(
        script=[
            call("lookup_order", order_id="A1001"),
            call("search_policy", topic="refunds for damaged items"),
            call("issue_refund", order_id="A1001", amount=42.50, reason="arrived damaged"),
            "I'm sorry your teapot arrived damaged. I've refunded the full $42.50 for order "
            "A1001; you'll see it on your statement within a few days.",
        ],
        structured={
            "Plan": {
                "steps": [
                    "Look up order A1001",
                    "Check the refund policy for damaged items",
                    "Issue the refund (needs approval)",
                    "Confirm the refund to the customer",
                ]
            },
            "JudgeVerdict": {
                "passed": True,
                "reason": "The answer reports the refund the tools confirm.",
            },
        },
        latency=latency,
    )


def demo_support_model(latency: float = 0.0) -> BaseChatModel:
    """The scenario's support agent: looks the order up and answers (no side effects)."""
    return ScriptedChatModel(
        script=[
            call("lookup_order", order_id="A1001"),
            "Order A1001 (ceramic teapot, $42.50) was delivered; billing handles the refund.",
        ],
        latency=latency,
    )


def demo_router_model(latency: float = 0.0) -> BaseChatModel:
    """The scenario's supervisor: support first, then billing, then finish."""

    def route(messages: Sequence[BaseMessage]) -> dict[str, str]:
        answered = [m.name for m in messages if isinstance(m, AIMessage) and m.name]
        if "support" not in answered:
            return {"agent": "support", "task": "Look up order A1001 and its delivery status."}
        if "billing" not in answered:
            return {"agent": "billing", "task": DEMO_TASK}
        return {"agent": "FINISH", "task": ""}

    return ScriptedChatModel(script=[], structured={"Route": route}, latency=latency)


def demo_memory_model(latency: float = 0.0) -> BaseChatModel:
    """An assistant that remembers what the user said about themselves."""
    return ScriptedChatModel(
        script=[call("remember", text="Prefers email over phone."), "Noted: email it is."],
        latency=latency,
    )
