"""Whether LangSmith tracing is switched on, and whether it has a key.

Read from the environment only, so that the `keel` command checks it before it loads LangChain
(`keel.observe.tracing` uses it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

__all__ = ["NO_KEY_WARNING", "switched_on", "tracing_enabled", "tracing_without_key"]

_TRUE = ("true", "1", "yes")


def switched_on(env: Mapping[str, str]) -> bool:
    """Whether `LANGSMITH_TRACING` (or `LANGCHAIN_TRACING_V2`) switches tracing on."""
    switch = env.get("LANGSMITH_TRACING") or env.get("LANGCHAIN_TRACING_V2") or ""
    return switch.strip().lower() in _TRUE


def tracing_enabled(env: Mapping[str, str] | None = None) -> bool:
    """Whether LangSmith tracing is configured: an API key and tracing switched on."""
    env = os.environ if env is None else env
    key = env.get("LANGSMITH_API_KEY") or env.get("LANGCHAIN_API_KEY")
    return bool(key) and switched_on(env)


NO_KEY_WARNING = (
    "LANGSMITH_TRACING is on but LANGSMITH_API_KEY is not set: keel sends no traces. "
    "Set the key to trace, or LANGSMITH_TRACING=false to silence this."
)
"""What keel says, once, when tracing is switched on without a key."""


def tracing_without_key(env: Mapping[str, str] | None = None) -> bool:
    """Whether tracing is switched on (`LANGSMITH_TRACING=true`) but no API key is set."""
    env = os.environ if env is None else env
    return switched_on(env) and not tracing_enabled(env)
