"""`--price MODEL=IN,OUT`: price a model keel's table does not know, from the command line.

`keel run`, `keel demo` and the `keel eval` commands that run a model (a suite, `replay`,
`shadow`) take it, repeatable, with the same parsing and the same errors: under a dollar limit
keel refuses a model it cannot price, and this is how a command-line user prices it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING

from keel.errors import KeelError

if TYPE_CHECKING:  # keel.pricing (LangChain's messages) loads when a price table is made
    from keel.pricing import PriceTable

__all__ = ["add_price_option", "price_table"]


def add_price_option(parser: argparse.ArgumentParser, why: str) -> None:
    """Add the repeatable `--price MODEL=IN,OUT` option to `parser`; `why` ends its help."""
    parser.add_argument(
        "--price",
        action="append",
        default=[],
        metavar="MODEL=IN,OUT",
        help="price a model keel's table does not know, USD per 1M input and output tokens "
        f"(e.g. gpt-5=1.25,10; repeatable): {why}",
    )


def price_table(given: Sequence[str]) -> PriceTable:
    """The price table: keel's, with each `--price MODEL=IN,OUT` over it.

    Raises:
        KeelError: an item is not `MODEL=IN,OUT` with two finite amounts, 0 or more.
    """
    from keel.pricing import Price, PriceTable

    table = {}
    for item in given:
        name, _, amounts = item.rpartition("=")
        parts = amounts.split(",")
        try:
            if not name or len(parts) != 2:
                raise ValueError(item)
            price = Price(input_per_mtok=float(parts[0]), output_per_mtok=float(parts[1]))
        except (ValueError, KeelError):
            raise KeelError(
                f"--price {item!r}: give MODEL=INPUT,OUTPUT in USD per 1M tokens, finite and "
                "0 or more (e.g. --price gpt-5=1.25,10)."
            ) from None
        table[name] = price
    return PriceTable(table)
