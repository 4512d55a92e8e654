"""The one sync driver of keel.evals' async cores: fails fast inside a running event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from keel.errors import UserError

__all__ = ["sync"]

T = TypeVar("T")


def sync(name: str, start: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run `start()` to its end with `asyncio.run`; `name()` was called where it cannot be.

    Raises:
        UserError: called inside a running event loop (Jupyter, async code): await `a<name>`.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(start())
    raise UserError(
        f"{name}() was called inside a running event loop (Jupyter, async code). "
        f"Use `await a{name}(...)` instead."
    )
