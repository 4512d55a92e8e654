"""Fallbacks by error type: after a failed model call, retry, move to the next model, or stop.

One pure decision, `after_failure(exc, attempt, retry, has_fallback)`, shared by the sync and
async drivers in `keel.nodes.call_model` (and the LangChain middleware):

| the error | what happens |
|---|---|
| a provider's 429 | wait its `Retry-After` (capped by the `RetryPolicy`); then the next model |
| a provider outage (5xx, connection error) | retry with backoff; then the next model |
| `CircuitOpen`, or a failure that opened the breaker | the next model at once |
| `RateLimited` (keel's own RPM / TPM wait ran out) | the next model at once |
| `TimeoutError` | retry; then stop, and the run ends as `timeout` (or the next model at once) |
| `ModelBehaviorError` (an answer keel cannot use) | the next model at once; else stop (`error`) |
| anything else (a 4xx, a bug) | stop, and the run ends as `error` |

A timeout moves to the next model at once only with `fallback_on_timeout`
(`ModelTimeoutPolicy(fallback=True)`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from langgraph.types import RetryPolicy

from keel._node import default_retry_on
from keel.errors import KeelError, ModelBehaviorError
from keel.guards.breaker import CircuitOpen, is_outage
from keel.guards.ratelimit import RateLimited

__all__ = ["Retry", "Step", "after_failure", "backoff", "retry_after", "should_retry"]


@dataclass(frozen=True, slots=True)
class Retry:
    """Try the same model again after `seconds`."""

    seconds: float


Step = Retry | Literal["fallback", "stop"]
"""What to do after a failed call: `Retry(s)`, move to the next model, or stop."""


def after_failure(
    exc: BaseException,
    attempt: int,
    retry: RetryPolicy,
    *,
    has_fallback: bool,
    tripped: bool = False,
    fallback_on_timeout: bool = False,
) -> Step:
    """The next step after attempt number `attempt` (from 1) of one model failed with `exc`.

    `tripped`: this failure opened the model's breaker, so a retry would be refused.
    `fallback_on_timeout`: a timed-out model is left for the next one at once (a slow model is
    usually slow again), instead of being retried.
    """
    if tripped or isinstance(exc, CircuitOpen | RateLimited | ModelBehaviorError):
        return "fallback" if has_fallback else "stop"
    if fallback_on_timeout and has_fallback and isinstance(exc, TimeoutError):
        return "fallback"
    if attempt < retry.max_attempts and should_retry(retry, exc):
        return Retry(backoff(retry, attempt, exc))
    if isinstance(exc, TimeoutError) or not has_fallback:
        return "stop"
    if retry_after(exc) is not None or is_outage(exc):
        return "fallback"
    return "stop"


def should_retry(policy: RetryPolicy, exc: BaseException) -> bool:
    """Whether `policy` retries `exc` (a 429 with `Retry-After` and a timeout always are)."""
    if isinstance(exc, KeelError):
        return False
    if isinstance(exc, TimeoutError) or retry_after(exc) is not None:
        return True  # LangGraph's default treats TimeoutError (an OSError) as permanent
    if not isinstance(exc, Exception):
        return False
    retry_on = policy.retry_on
    if retry_on is default_retry_on:
        return default_retry_on(exc)
    if isinstance(retry_on, Sequence):
        return isinstance(exc, tuple(retry_on))
    if isinstance(retry_on, type):
        return isinstance(exc, retry_on)
    return bool(retry_on(exc))


def retry_after(exc: BaseException) -> float | None:
    """Seconds a rate-limited provider asked to wait (`Retry-After`), if it said."""
    value = getattr(exc, "retry_after", None)
    if isinstance(exc, KeelError):
        return None  # keel's RateLimited / CircuitOpen carry retry_after, but are not a 429
    if value is None:
        headers = getattr(getattr(exc, "response", None), "headers", None)
        if headers is not None and hasattr(headers, "get"):
            value = headers.get("retry-after") or headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except (TypeError, ValueError):
        return None


def backoff(policy: RetryPolicy, attempt: int, exc: BaseException | None = None) -> float:
    """Seconds to wait before attempt `attempt + 1`: `Retry-After` if given, else exponential."""
    asked = retry_after(exc) if exc is not None else None
    if asked is not None:
        return min(policy.max_interval, asked)
    try:
        grown = policy.initial_interval * policy.backoff_factor ** (attempt - 1)
    except OverflowError:  # 2.0 ** 1024: past the float range, far past any max_interval
        grown = policy.max_interval
    wait = min(policy.max_interval, grown)
    return wait + (random.uniform(0, 1) if policy.jitter else 0.0)
