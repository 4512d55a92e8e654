"""The bundled demo scenario: a support agent refunds a damaged order, with one approval.

It exercises a plan, read-only tool calls, a destructive call that needs a human's approval, and
a final answer. Offline it runs on keel's scripted model (`keel:demo`, which `keel.evals.demo`
plays); with `KEEL_MODEL` set it runs the same tools on that model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from keel.guards.policy import Budget, LoopPolicy, Policy, Rule
from keel.tools.registry import KeelTool, tool

if TYPE_CHECKING:  # chromadb and torch load only when the demo runs
    from keel.memory.chroma import ChromaStore

__all__ = [
    "DEMO_TASK",
    "SYSTEM_PROMPT",
    "DemoShop",
    "demo_memory",
    "demo_policy",
    "demo_tools",
]

DEMO_TASK = "Order A1001 arrived damaged. Please refund it."
SYSTEM_PROMPT = (
    "You are a support agent for an online shop. Look orders up before acting, follow the "
    "refund policy, and tell the customer exactly what you did."
)


@dataclass
class DemoShop:
    """The demo's tiny in-memory shop: orders and the refunds issued."""

    orders: dict[str, dict[str, object]] = field(
        default_factory=lambda: {
            "A1001": {"item": "ceramic teapot", "total": 42.50, "status": "delivered"},
            "A1002": {"item": "tea sampler", "total": 18.00, "status": "shipped"},
        }
    )
    refunds: list[tuple[str, float]] = field(default_factory=list)


def demo_tools(shop: DemoShop | None = None) -> list[KeelTool]:
    """The scenario's tools, bound to `shop` (a fresh one by default)."""
    shop = shop or DemoShop()

    @tool(name="lookup_order", resource=lambda a: f"orders/{a['order_id']}")
    def lookup_order(order_id: str) -> str:
        """Look up an order by id: item, total and delivery status."""
        order = shop.orders.get(order_id)
        if order is None:
            return f"No order {order_id}."
        return f"Order {order_id}: {order['item']}, total ${order['total']:.2f}, {order['status']}."

    @tool(name="search_policy")
    def search_policy(topic: str) -> str:
        """Search the shop's policies for a topic (e.g. 'refunds')."""
        return (
            "Refund policy: items that arrive damaged are refunded in full on request, "
            "within 30 days of delivery. Refunds need a human's approval."
        )

    @tool(
        name="issue_refund",
        risk="destructive",
        resource=lambda a: f"orders/{a['order_id']}",
    )
    def issue_refund(order_id: str, amount: float, reason: str) -> str:
        """Refund `amount` dollars on an order. Cannot be undone."""
        if order_id not in shop.orders:
            return f"No order {order_id}; nothing refunded."
        shop.refunds.append((order_id, amount))
        return f"Refunded ${amount:.2f} on order {order_id} ({reason})."

    return [lookup_order, search_policy, issue_refund]


def demo_policy() -> Policy:
    """The demo's guard rails: a run budget, default-deny rules, refunds ask a human, loop guard."""
    return Policy(
        name="demo",
        version="1",
        budget=Budget(model_calls=12, tool_calls=8, usd=0.50, wall_seconds=300),
        rules=(
            Rule(action="allow", tool="lookup_order"),
            Rule(action="allow", tool="search_policy"),
            Rule(action="ask", tool="issue_refund", reason="refunds move money"),
        ),
        loop=LoopPolicy(),
    )


def demo_memory(db_path: Path | None) -> ChromaStore:
    """Long-term memory for the demo: an embedded Chroma beside the SQLite file (`chroma/`).

    Uses keel's offline embedding model (loaded from an installed package, never downloaded).
    With no database file (PostgreSQL or `:memory:`), Chroma lives in `.keel/chroma`.
    """
    from keel.memory import ChromaStore, default_index  # imports chromadb and torch lazily

    root = db_path.parent if db_path is not None else Path(".keel")
    return ChromaStore(path=root / "chroma", index=default_index())
