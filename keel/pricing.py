"""The price table: turns a model call's `usage_metadata` into US dollars."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

from keel.errors import UserError
from keel.redact import sanitized_logger

__all__ = [
    "DEFAULT_PRICES",
    "FREE_PREFIXES",
    "Price",
    "PriceTable",
    "finite_number",
    "is_count",
    "token_count",
    "unpriced",
]

log = sanitized_logger("keel.pricing")


def finite_number(value: object) -> float | None:
    """`value` as a float when it is a finite int or float (not a bool), else None.

    NaN compares False with every limit and infinity passes them all: neither is an amount.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def is_count(value: object) -> TypeGuard[int]:
    """Whether `value` is a whole number as a count takes it: an int, not a bool or a float.

    `model_calls=1.5` is no count, and `True` is not 1 call: a limit gets an int.
    """
    return isinstance(value, int) and not isinstance(value, bool)


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
            number = finite_number(value)
            if number is None or number < 0:
                raise UserError(
                    f"Price.{name} must be a finite number ≥ 0 (USD per 1M tokens), got {value!r}."
                )


FREE_PREFIXES = ("ollama:", "local:")
"""Model names keel prices at $0 unless a table prices them: models that run on this machine."""

_FREE = Price(input_per_mtok=0.0, output_per_mtok=0.0)


# List prices as published by the providers (USD per 1M tokens). Override with PriceTable(...).
DEFAULT_PRICES: Mapping[str, Price] = {
    "gpt-4o-mini": Price(input_per_mtok=0.15, output_per_mtok=0.60),
    "gpt-4o": Price(input_per_mtok=2.50, output_per_mtok=10.00),
    "gpt-4o-2024-05-13": Price(input_per_mtok=5.00, output_per_mtok=15.00),  # dearer than gpt-4o
    "gpt-4.1-nano": Price(input_per_mtok=0.10, output_per_mtok=0.40),
    "gpt-4.1-mini": Price(input_per_mtok=0.40, output_per_mtok=1.60),
    "gpt-4.1": Price(input_per_mtok=2.00, output_per_mtok=8.00),
    "o4-mini": Price(input_per_mtok=1.10, output_per_mtok=4.40),
    "claude-3-5-haiku": Price(input_per_mtok=0.80, output_per_mtok=4.00),
    "claude-haiku-4-5": Price(input_per_mtok=1.00, output_per_mtok=5.00),
    "claude-sonnet-4": Price(input_per_mtok=3.00, output_per_mtok=15.00),
    "claude-sonnet-4-5": Price(input_per_mtok=3.00, output_per_mtok=15.00),
    "claude-opus-4": Price(input_per_mtok=15.00, output_per_mtok=75.00),
    "claude-opus-4-1": Price(input_per_mtok=15.00, output_per_mtok=75.00),
    "gemini-2.5-flash": Price(input_per_mtok=0.30, output_per_mtok=2.50),
    "gemini-2.5-pro": Price(input_per_mtok=1.25, output_per_mtok=10.00),
    # keel's local model (`local:`, keel.local_model): runs on this machine, costs nothing.
    "qwen2.5-coder-1.5b": Price(input_per_mtok=0.0, output_per_mtok=0.0),
    # keel's scripted test model: priced so that cost accounting is visible in tests and demos.
    "scripted": Price(input_per_mtok=1.00, output_per_mtok=2.00),
}


_SNAPSHOT = re.compile(
    r"(?:[-@](?:\d{4}-\d{2}-\d{2}|\d{8}|\d{2,4}|latest|v\d+(?::\d+)?|preview|exp))+"
)
"""What a dated or versioned name adds to the model it is a snapshot of (`-2024-07-18`,
`-20241022`, `-001`, `-latest`, `-v1:0`, `@20240620`, `-preview-05-06`)."""


class PriceTable:
    """Model prices by name, matched exactly or as a known name's dated snapshot.

    `gpt-4o-mini-2024-07-18` is priced as `gpt-4o-mini`, and so are names that add only a
    snapshot to a known one (`-20241022`, `-latest`, `-001`, `-v1:0`, `@20240620`, `-preview`:
    `_SNAPSHOT`); a provider prefix (`openai:`) is ignored. Any other longer name is not
    (`gpt-4o-realtime-preview`, `o4-mini-deep-research`, `claude-opus-4-5` cost more or less than
    the name they start with): it is a model the table does not know, so a dollar limit never
    holds a dearer model at a cheaper one's price.
    Local models (`ollama:…`, `local:…`) cost nothing unless you price them. A model the table
    does not know counts as $0 (one warning), except under a dollar limit (`Budget.usd`,
    `PeriodBudget.usd`): there keel refuses it when the agent is built, naming the model and
    the limit; price it with `build_agent(..., prices=PriceTable({...}))`.

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
        """The price of `model_name`, or None when the table does not know it.

        A local model (`ollama:…`, `local:…`, `FREE_PREFIXES`) the table does not price costs
        nothing: its price is $0, not None.
        """
        name = _normalize(model_name)
        if name in self._prices:
            return self._prices[name]
        for known in self._by_length:
            if name.startswith(known) and _SNAPSHOT.fullmatch(name, len(known)):
                return self._prices[known]
        return _FREE if model_name.startswith(FREE_PREFIXES) else None

    def cost(self, model_name: str, usage: Mapping[str, Any] | None) -> float:
        """USD for one call's `usage_metadata`; 0.0 (and one warning) for an unknown model.

        Under a dollar limit keel does not count an unknown model as free: `build_agent` and
        the other builders refuse it, and a call whose model has no price ends the run
        (`keel.guards.budget.usage_of`). Token counts that are not a count (negative, `None`,
        text) count as 0 here.
        """
        if not usage:
            return 0.0
        price = self.price_of(model_name)
        if price is None:
            if model_name in self._warned:
                return 0.0
            self._warned.add(model_name)
            log.warning(
                "keel has no price for model %r: its calls are counted as $0. "
                "Add it with PriceTable({%r: Price(input_per_mtok=…, output_per_mtok=…)}).",
                model_name,
                model_name,
            )
            return 0.0
        tokens_in = token_count(usage.get("input_tokens")) or 0
        tokens_out = token_count(usage.get("output_tokens")) or 0
        return (tokens_in * price.input_per_mtok + tokens_out * price.output_per_mtok) / 1e6


def token_count(value: object) -> int | None:
    """A provider's token count as an int ≥ 0, or None when it is not a usable count.

    An int, a whole float or a string of ASCII digits is a count (at most `MAX_TOKENS`: a larger
    one is cut to it, so that pricing it cannot overflow); a negative number is not (it would
    lower the spend), nor are `None`, NaN, infinity, fractions, booleans and other text.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        text = value.strip()
        digits = text.isascii() and text.isdigit()
        value = (int(text) if len(text) <= 18 else MAX_TOKENS) if digits else None
    if isinstance(value, int) and value >= 0:
        return min(value, MAX_TOKENS)
    return None


MAX_TOKENS = 10**15
"""The largest token count keel takes from a provider's report (far past any real call)."""


def unpriced(model_name: str, limit: str, *, reported: str | None = None) -> str:
    """Why a dollar limit cannot hold a model keel has no price for, and how to price it."""
    also = f" (the provider reported {reported!r})" if reported and reported != model_name else ""
    return (
        f"keel has no price for model {model_name!r}{also}, so {limit} cannot be enforced: "
        f"its calls would count as $0. Price it with prices=PriceTable({{{model_name!r}: "
        "Price(input_per_mtok=…, output_per_mtok=…)}) (the prices= option of build_agent, "
        "build_supervisor, BudgetMiddleware and ModelCallGuards; [prices] in a server config; "
        f"--price {model_name}=IN,OUT for keel run, keel demo and keel eval), or remove the "
        "dollar limit."
    )


def _normalize(name: str) -> str:
    return name.split(":", 1)[1] if ":" in name else name
