"""A switch that makes any network chat-model call an error (for test suites and offline evals).

keel's test doubles (`keel_test_double = True`) and keel's local model (`LocalChatModel`,
llama.cpp on this machine, no network) still run.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from langchain_core.language_models import BaseChatModel

from keel.errors import ModelRequestsForbidden
from keel.local_model import LocalChatModel

__all__ = ["forbid_model_requests", "model_requests_forbidden"]

_forbidden_globally = False
_lock = threading.Lock()
_installed = False
_PATCHED = ("_generate_with_cache", "_agenerate_with_cache", "stream", "astream")


def model_requests_forbidden() -> bool:
    """Whether real model requests are forbidden right now."""
    return _forbidden_globally


@contextmanager
def forbid_model_requests() -> Iterator[None]:
    """Inside this block, calling any chat model that is not a keel test double raises.

    keel's `ScriptedChatModel` (and any model with `keel_test_double = True`) still runs, and so
    does keel's local model (`keel.local_model.LocalChatModel`): it calls no network.
    keel's own test suite wraps every test in it.

    Example:
        ```python
        with forbid_model_requests():
            ChatOpenAI().invoke("hi")  # raises ModelRequestsForbidden
        ```
    """
    global _forbidden_globally
    _install()
    previous = _forbidden_globally
    _forbidden_globally = True
    try:
        yield
    finally:
        _forbidden_globally = previous


def _check(model: BaseChatModel) -> None:
    allowed = getattr(model, "keel_test_double", False) or isinstance(model, LocalChatModel)
    if _forbidden_globally and not allowed:
        raise ModelRequestsForbidden(
            f"A real model call to {type(model).__name__} was made while model requests are "
            "forbidden (keel.evals.forbid_model_requests). Use keel.evals.ScriptedChatModel in "
            "tests, or leave the forbid_model_requests() block to call a real model."
        )


def _guard(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def guarded(self: BaseChatModel, *args: Any, **kwargs: Any) -> Any:
        _check(self)
        return original(self, *args, **kwargs)

    return guarded


def _install() -> None:
    global _installed
    with _lock:
        if _installed:
            return
        for name in _PATCHED:
            setattr(BaseChatModel, name, _guard(getattr(BaseChatModel, name)))
        _installed = True
