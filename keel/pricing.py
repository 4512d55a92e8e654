"""The price table: turns a model call's `usage_metadata` into US dollars."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from keel.errors import UserError
from keel.redact import sanitized_logger

__all__ = ["DEFAULT_PRICES", "Price", "PriceTable"]

log = sanitized_logger("keel.pricing")


@dataclass(frozen=True, kw_only=True, slots=True)
class Price:
    """What a model costs, in USD per one million tokens."""

    input_per_mtok: float
    """USD per 1M input (prompt) tokens."""
    output_per_mtok: float
    """USD per 1M output (completion) tokens."""

    def __post_init__(self) -> None:
        for name in ("input_per_mtok", "output_per_mtok"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value < 0:
                raise UserError(
                    f"Price.{name} must be a number ≥ 0 (USD per 1M tokens), got {value!r}."
                )


# List prices as published by the providers (USD per 1M tokens). Override with PriceTable(...).
DEFAULT_PRICES: Mapping[str, Price] = {
    "gpt-4o-mini": Price(input_per_mtok=0.15, output_per_mtok=0.60),
    "gpt-4o": Price(input_per_mtok=2.50, output_per_mtok=10.00),
    "gpt-4.1-nano": Price(input_per_mtok=0.10, output_per_mtok=0.40),
    "gpt-4.1-mini": Price(input_per_mtok=0.40, output_per_mtok=1.60),
    "gpt-4.1": Price(input_per_mtok=2.00, output_per_mtok=8.00),
    "o4-mini": Price(input_per_mtok=1.10, output_per_mtok=4.40),
    "claude-3-5-haiku": Price(input_per_mtok=0.80, output_per_mtok=4.00),
    "claude-haiku-4-5": Price(input_per_mtok=1.00, output_per_mtok=5.00),
    "claude-sonnet-4": Price(input_per_mtok=3.00, output_per_mtok=15.00),
    "claude-opus-4": Price(input_per_mtok=15.00, output_per_mtok=75.00),
    "gemini-2.5-flash": Price(input_per_mtok=0.30, output_per_mtok=2.50),
    "gemini-2.5-pro": Price(input_per_mtok=1.25, output_per_mtok=10.00),
    # keel's local model (`local:`, keel.local_model): runs on this machine, costs nothing.
    "qwen2.5-coder-1.5b": Price(input_per_mtok=0.0, output_per_mtok=0.0),
    # keel's scripted test model: priced so that cost accounting is visible in tests and demos.
    "scripted": Price(input_per_mtok=1.00, output_per_mtok=2.00),
}


class PriceTable:
    """Model prices by name, matched exactly or by the longest known prefix.

    `gpt-4o-mini-2024-07-18` is priced as `gpt-4o-mini`; a provider prefix (`openai:`) is ignored.
    Local models (`ollama:…`, `local:…`) cost nothing unless you price them.

    Example:
        ```python
        table = PriceTable({"my-model": Price(input_per_mtok=1.0, output_per_mtok=3.0)})
        table.cost("my-model", {"input_tokens": 1000, "output_tokens": 500})  # 0.0025
        ```
    """

    def __init__(
        self, prices: Mapping[str, Price] | None = None, *, include_defaults: bool = True
    ) -> None:
        table: dict[str, Price] = dict(DEFAULT_PRICES) if include_defaults else {}
        for name, price in (prices or {}).items():
            if not isinstance(price, Price):
                raise UserError(
                    f"PriceTable entry {name!r} must be a Price(input_per_mtok=…, "
                    f"output_per_mtok=…), got {price!r}."
                )
            table[_normalize(name)] = price
        self._prices = table
        self._by_length = sorted(table, key=len, reverse=True)
        self._warned: set[str] = set()

    def price_of(self, model_name: str) -> Price | None:
        """The price of `model_name`, or None when the table does not know it."""
        name = _normalize(model_name)
        if name in self._prices:
            return self._prices[name]
        for known in self._by_length:
            if name.startswith(known):
                return self._prices[known]
        return None

    def cost(self, model_name: str, usage: Mapping[str, Any] | None) -> float:
        """USD for one call's `usage_metadata`; 0.0 (and one warning) for an unknown model."""
        if not usage:
            return 0.0
        price = self.price_of(model_name)
        if price is None:
            if model_name.startswith(("ollama:", "local:")) or model_name in self._warned:
                return 0.0
            self._warned.add(model_name)
            log.warning(
                "keel has no price for model %r: its calls are counted as $0. "
                "Add it with PriceTable({%r: Price(input_per_mtok=…, output_per_mtok=…)}).",
                model_name,
                model_name,
            )
            return 0.0
        tokens_in = int(usage.get("input_tokens", 0) or 0)
        tokens_out = int(usage.get("output_tokens", 0) or 0)
        return (tokens_in * price.input_per_mtok + tokens_out * price.output_per_mtok) / 1e6


def _normalize(name: str) -> str:
    return name.split(":", 1)[1] if ":" in name else name
