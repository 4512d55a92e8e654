"""`GuardedModel`: the one path every model call keel makes goes through.

Agent turns (`call_model`), plans (`plan`), the judge (`verify`), the supervisor's router and,
inside a run, the input guard's `ModelDetector` (`keel.guards.injection_model.DetectorCalls`) all
call their model through a `GuardedModel`, so each call, whatever asks for it:

1. is checked against the run budget (`Budget`: model calls, tokens, dollars, wall clock);
2. *reserves* its estimate against the period budgets (`SpendMeter`: the messages, the bound
   tools' schemas and the answer's reserve) — the answer is capped at that reserve;
3. passes the model's circuit breaker and rate limits (`ModelGuard`);
4. runs within a per-attempt deadline (`ModelTimeoutPolicy`), if one is set;
5. is *counted*: tokens and dollars from `usage_metadata` (structured output is asked for with
   `include_raw=True`, so its usage is read too), recorded by the breaker and the rate limiter
   and settled in the period budgets (an answer without usable counts at its reservation, the
   most it can have cost, not at an estimate that may be below the provider's bill);
6. on failure is retried (tenacity's `Retrying`, waiting a provider's `Retry-After` or an
   exponential backoff), moved to the next model, or stopped (`keel.guards.fallback`).

A structured call (a plan, a route, a verdict) is a decision keel reads, never an answer: it is
asked with LangGraph's `nostream` tag (`unstreamed`), so no `messages` stream relays its
tool-call arguments, in keel's graphs or in a graph of yours that embeds them.

Under a dollar limit (the run budget's `usd`, a `PeriodBudget`'s `usd`) every model of the chain
must have a price: a model the price table does not know is refused when the `GuardedModel` is
built (`UserError`, naming the model, the limit and the `prices=` fix), since its calls would
count as $0. An answer is priced by the model name the provider reports, else by the model keel
called; one neither prices ends the run as `stopped/budget_exceeded`, charged at its
reservation, and nothing further runs.

A failure of the ledger itself (its database is down) is not a model failure: the call ends
with an `error` outcome whose detail starts with `storage failed` (the run record's error
category `storage`), and the model is not retried.

The steps are written once, as a generator of operations that a sync and an async driver run
(as tenacity's `iter()` is), so `invoke` and `ainvoke` cannot drift apart.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import Any, TypeVar

from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage, convert_to_messages
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import merge_configs
from langgraph.constants import TAG_NOSTREAM
from langgraph.errors import GraphBubbleUp
from langgraph.types import RetryPolicy
from tenacity import RetryCallState, Retrying, stop_after_attempt

from keel import outcome
from keel._drive import Op, Steps, adrive, drive, finishing, retrying
from keel.db.ledger import Flow, Ledger, returning
from keel.db.runs import STORAGE_FAILED
from keel.errors import ModelBehaviorError, StorageError, UserError
from keel.guards import holders
from keel.guards.breaker import BreakerTransition, CircuitOpen
from keel.guards.budget import check_budget, outer_exceeded, usage_of, wall_deadline
from keel.guards.fallback import Retry, Step, after_failure, backoff
from keel.guards.policy import Budget, Policy
from keel.guards.ratelimit import RateLimited
from keel.guards.resilience import ModelGuard
from keel.guards.spend import (
    Crowded,
    Reservation,
    RoomWait,
    SpendMeter,
    estimate_tokens,
    schema_sizes,
    token_sizes,
)
from keel.history import tool_turns_as_text
from keel.models import model_name_of, price_name_of, resolve_model
from keel.pricing import PriceTable, finite_number, is_count, token_count, unpriced
from keel.redact import sanitized_logger
from keel.state import Outcome, RunContext, Usage
from keel.tools.stubs import isolated

__all__ = [
    "DEFAULT_MODEL_RETRY",
    "GuardedModel",
    "ModelAnswer",
    "ModelCallGuards",
    "ModelTimeoutPolicy",
    "capped",
    "unstreamed",
]

log = sanitized_logger("keel.guards.model_call")

T = TypeVar("T")

DEFAULT_MODEL_RETRY = RetryPolicy(initial_interval=0.5, max_interval=8.0, max_attempts=3)
"""Retries of a failed model call: 3 attempts, backoff from 0.5 s to at most 8 s."""

OUTPUT_CAP_FIELDS = ("max_tokens", "max_output_tokens", "num_predict", "max_new_tokens")
"""Chat model fields that cap an answer's length, as LangChain's integrations name them:
`max_tokens` (OpenAI, Anthropic, Mistral, Groq, Bedrock, llama.cpp and keel's scripted model),
`max_output_tokens` (Google), `num_predict` (Ollama), `max_new_tokens` (Hugging Face)."""


MAX_ATTEMPT_TIMEOUT = 86_400
"""The longest deadline a model call's attempt may have, in seconds."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelTimeoutPolicy:
    """A deadline for each attempt of a model call (keel stops waiting, and retries or falls back).

    Without it keel waits as long as the provider's client does. Under `invoke` the timed-out
    call is abandoned in a daemon thread (it cannot be interrupted); under `ainvoke` it is
    cancelled. A timed-out call is counted in the period budgets at its reservation, since the
    provider may bill it.
    """

    attempt_timeout: float
    """Seconds one attempt may take."""
    fallback: bool = False
    """On a timeout, move to the next model at once (`fallback_models`) instead of retrying
    the slow one; without a next model the call is retried, then the run ends as `timeout`."""

    def __post_init__(self) -> None:
        seconds = self.attempt_timeout
        number = finite_number(seconds)
        if number is None or not 0 < number <= MAX_ATTEMPT_TIMEOUT:
            raise UserError(  # infinity failed every call (OverflowError, a time_t out of range)
                f"ModelTimeoutPolicy.attempt_timeout must be a number of seconds greater than 0 "
                f"and at most {MAX_ATTEMPT_TIMEOUT:,} (a day), e.g. 20; got {seconds!r}. "
                "For no deadline pass model_timeout=None."
            )

    @classmethod
    def coerce(
        cls, value: float | timedelta | ModelTimeoutPolicy | None
    ) -> ModelTimeoutPolicy | None:
        """A policy from seconds, a `timedelta` or a policy; `None` stays `None`."""
        if value is None or isinstance(value, ModelTimeoutPolicy):
            return value
        if isinstance(value, timedelta):
            return cls(attempt_timeout=value.total_seconds())
        return cls(attempt_timeout=value)


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelCallGuards:
    """What every model call of a graph is held to; one object shared by all its nodes."""

    prices: PriceTable | None = None
    """Turns `usage_metadata` into USD (the default table when `None`)."""
    budget: Budget | None = None
    """The run budget checked before each call."""
    meter: SpendMeter | None = None
    """Reserves and settles each call against period budgets (answers capped at the reserve)."""
    guard: ModelGuard | None = None
    """The rate limits and per-model breaker."""
    retry: RetryPolicy = DEFAULT_MODEL_RETRY
    """Retries of a failed attempt."""
    timeout: ModelTimeoutPolicy | None = None
    """A deadline per attempt."""

    @classmethod
    def from_policy(
        cls,
        policy: Policy | None,
        ledger: Ledger | None,
        *,
        prices: PriceTable | None = None,
        retry: RetryPolicy = DEFAULT_MODEL_RETRY,
        timeout: float | timedelta | ModelTimeoutPolicy | None = None,
        caller: str = "build_agent",
    ) -> ModelCallGuards:
        """The guards of `policy` (budgets, rate limits, breaker), kept in `ledger`.

        Raises:
            UserError: `policy` or `ledger` is of the wrong type, or the policy keeps state in
                the ledger and there is no ledger.
        """
        if policy is not None and not isinstance(policy, Policy):
            raise UserError(
                f"{caller}(policy=...) must be a keel.guards.Policy (e.g. Policy.from_file("
                f"'policy.toml')), got {type(policy).__name__}."
            )
        if ledger is not None and not isinstance(ledger, Ledger):
            raise UserError(
                f"{caller}(ledger=...) must be a keel.Ledger (e.g. Ledger(url)), got "
                f"{type(ledger).__name__}."
            )
        _check_retry(caller, retry)
        meter = guard = None
        if policy is not None and policy.ledger_features:
            if not isinstance(ledger, Ledger):
                raise UserError(
                    f"Policy {policy.identity!r} has {', '.join(policy.ledger_features)}, which "
                    f"are kept in the ledger: pass {caller}(..., ledger=keel.Ledger(url)) with "
                    "the URL of your database."
                )
            if policy.period_budgets:
                meter = SpendMeter(ledger, policy.period_budgets, prices)
            guard = ModelGuard.from_policy(policy, ledger)
        return cls(
            prices=prices,
            budget=policy.budget if policy is not None else None,
            meter=meter,
            guard=guard,
            retry=retry,
            timeout=ModelTimeoutPolicy.coerce(timeout),
        )


@dataclass(frozen=True, slots=True)
class ModelAnswer:
    """What a guarded model call gave: its output and usage, or why there is none."""

    output: Any = None
    """What the model returned: an `AIMessage`, or for structured output the dict
    `{"raw": AIMessage, "parsed": ..., "parsing_error": ...}`; `None` when stopped."""
    usage: Usage = field(default_factory=lambda: Usage())
    """The tokens, dollars and model calls of the calls that were answered."""
    stop: Outcome | None = None
    """How the run ends when there is no output: a budget, the ledger, or the model's failure."""
    error: BaseException | None = None
    """The model's last error, when the model itself failed for good."""
    warnings: tuple[str, ...] = ()
    """What the period budgets could not hold exactly (for `AgentState.warnings`): an answer
    without usage, counted at its reservation, or one past its output reserve."""

    @property
    def message(self) -> AIMessage | None:
        """The model's `AIMessage` (the raw message of a structured answer)."""
        return None if self.output is None else _raw(self.output)


def _check_retry(caller: str, retry: RetryPolicy) -> None:
    """Refuse a `model_retry` that is no `RetryPolicy`, or whose numbers are no limit.

    LangGraph's namedtuple checks none: `max_attempts=inf` retried an outage until the backoff
    overflowed (a bare `OverflowError`, never the fallback), a NaN or negative interval raised
    from `sleep`, a NaN `initial_interval` waited `max_interval` before every retry.
    """
    if not isinstance(retry, RetryPolicy):
        raise UserError(
            f"{caller}(model_retry=...) must be a langgraph.types.RetryPolicy (e.g. "
            f"RetryPolicy(max_attempts=3)), got {type(retry).__name__}."
        )
    if not is_count(retry.max_attempts) or retry.max_attempts < 1:
        raise UserError(
            f"{caller}(model_retry=...): RetryPolicy.max_attempts is a count of attempts, the "
            f"first included: a whole number, 1 or more (e.g. 3); got {retry.max_attempts!r}."
        )
    for name in ("initial_interval", "max_interval", "backoff_factor"):
        value = getattr(retry, name)
        if (number := finite_number(value)) is None or number < 0:
            raise UserError(
                f"{caller}(model_retry=...): RetryPolicy.{name} must be a finite number, 0 or "
                f"more (e.g. RetryPolicy(initial_interval=0.5, backoff_factor=2.0, "
                f"max_interval=8.0)); got {value!r}."
            )


def capped(model: BaseChatModel, tokens: int) -> BaseChatModel | None:
    """A copy of `model` whose answers are at most `tokens` long; `None` when it has no cap.

    keel sets the field the integration itself sends to the provider (`OUTPUT_CAP_FIELDS`),
    keeping a lower cap the model already has.
    """
    fields = type(model).model_fields
    for name in OUTPUT_CAP_FIELDS:
        if name in fields:
            current = getattr(model, name, None)
            if isinstance(current, int) and not isinstance(current, bool) and current <= tokens:
                return model
            return model.model_copy(update={name: tokens})
    return None


def unstreamed(config: RunnableConfig | None) -> RunnableConfig:
    """`config` for a model call whose tokens no `messages` stream relays (LangGraph's `nostream`).

    A user's graph that has a keel graph as a node (or calls one in a node) and streams itself
    with `stream_mode="messages"` and `subgraphs=True` relays every model call's tokens as they
    come, around keel's own stream (`keel.graphs._answers`); so do keel's streams for a message
    they do not check (a tool call). Tagged `nostream`, a call's tokens reach no `messages`
    stream at all: `call_model` asks so under an output guard (its checked answer goes out whole
    when the node returns it), and `GuardedModel` always for a structured call (a decision, not
    an answer). Callbacks still see the call (tracing, and `astream_events`, which carries the
    raw output: see README).
    """
    return merge_configs(config, {"tags": [TAG_NOSTREAM]})


@dataclass(frozen=True, slots=True)
class _Model:
    """One model of the chain: its name, the runnable that asks it, the name it is priced by.

    `toolless`: it defines no tools (no `tools`, no `schema`). Anthropic refuses tool calls and
    results in such a request (a 400), so it is sent them as text (`tool_turns_as_text`).
    """

    name: str
    runnable: Runnable[LanguageModelInput, Any]
    priced_as: str
    toolless: bool = False


class _StorageFailed(Exception):
    """The ledger failed during a model call (wraps the database's error)."""

    def __init__(self, cause: BaseException) -> None:
        said = cause.reason if isinstance(cause, StorageError) else cause  # its fix is the run's
        super().__init__(f"{type(cause).__name__}: {said}")
        self.cause = cause


class _Failed(Exception):
    """The model failed an attempt (`tripped`: the failure opened its breaker)."""

    def __init__(self, error: Exception, tripped: bool) -> None:
        super().__init__(str(error))
        self.error = error
        self.tripped = tripped


class _Stopped(Exception):
    """The call may not happen, or its bookkeeping failed: end with `outcome`."""

    def __init__(self, result: Outcome, usage: Usage | None = None) -> None:
        super().__init__(result["detail"])
        self.outcome = result
        self.usage: Usage = usage or {}


@dataclass(slots=True)
class _Tried:
    """One attempt's result: the output and its usage, or the model's error."""

    output: Any = None
    usage: Usage = field(default_factory=lambda: Usage())
    error: Exception | None = None
    tripped: bool = False
    warnings: tuple[str, ...] = ()


Messages = Sequence[BaseMessage | tuple[str, str]]
Config = RunnableConfig | None
Spent = Mapping[str, Any] | None


class GuardedModel:
    """A chat model (and its fallbacks) called through keel's guards; see the module.

    Args:
        models: The model, then its fallbacks in order: chat models or `provider:name` strings.
        tools: Tools to bind (`bind_tools`); their schemas count in the estimate.
        schema: Ask for structured output of this schema (`include_raw=True`: the output is
            `{"raw", "parsed", "parsing_error"}`). Such a call is a decision, not an answer:
            it is tagged `nostream` (`unstreamed`), so no `messages` stream relays it.
        guards: The run budget, period budgets (the answer is capped at its reserve where the
            model supports it, see `capped`), rate limits and breaker, retries and deadline.
        steps: Count each answered call as a step of the run (agent turns do; a plan, a judge
            or a router does not).

    Example:
        ```python
        from keel import RunContext
        from keel.evals import ScriptedChatModel
        from keel.guards import Budget, GuardedModel, ModelCallGuards

        model = GuardedModel(
            [ScriptedChatModel(script=["hi"])], guards=ModelCallGuards(budget=Budget(usd=1.0))
        )
        answer = model.invoke([("user", "hello")], None, RunContext())
        assert answer.message.text == "hi" and answer.usage["model_calls"] == 1
        ```
    """

    def __init__(
        self,
        models: Sequence[str | BaseChatModel],
        *,
        tools: Sequence[Any] = (),
        schema: type[Any] | None = None,
        guards: ModelCallGuards | None = None,
        steps: bool = False,
    ) -> None:
        if not models:
            raise UserError("GuardedModel needs at least one model.")
        guards = guards or ModelCallGuards()
        self.prices = guards.prices or PriceTable()
        self.budget = guards.budget
        self.meter = guards.meter
        self.guard = guards.guard
        self.retry = guards.retry
        self.timeout = guards.timeout
        self.steps = steps
        self.decides = schema is not None
        """A structured call: asked `unstreamed`, its arguments reach no `messages` stream."""
        run_usd = self.budget.usd if self.budget is not None else None
        limits = [f"the run budget's usd limit of {run_usd:g}"] if run_usd else []
        if self.meter is not None and self.meter.usd_limit is not None:
            limits.append(self.meter.usd_limit)
        self.usd_limit = " and ".join(limits) or None
        """The dollar limits every call is held to, in words; `None` without one."""
        schemas = [*tools, *([schema] if schema is not None else [])]
        self.schema_tokens, self.schema_bound = schema_sizes(schemas)
        """Input tokens the bound tools' or the schema's JSON adds to every request: about
        (rate limits), and at most (reservations); serialised once, here."""
        self.chain = tuple(self._model(m, tools, schema) for m in models)
        self._overran: dict[str, int] = {}
        """The most output tokens each model that answered past the output reserve billed: its
        later calls reserve that (a provider that ignores the cap, a model without one)."""

    def _model(
        self, model: str | BaseChatModel, tools: Sequence[Any], schema: type[Any] | None
    ) -> _Model:
        chat = resolve_model(model)
        name, priced_as = model_name_of(chat), price_name_of(chat)
        self._require_price(priced_as)
        if self.meter is not None:
            limited = capped(chat, self.meter.output_reserve)
            if limited is None:
                log.warning(
                    "%s has no output cap keel knows (%s): its answers are not capped at the "
                    "period budget's reserve_output_tokens=%d, so a long answer can spend more "
                    "than was reserved",
                    name,
                    "/".join(OUTPUT_CAP_FIELDS),
                    self.meter.output_reserve,
                )
            chat = limited or chat
        runnable: Runnable[LanguageModelInput, Any] = chat
        if schema is not None:
            runnable = chat.with_structured_output(schema, include_raw=True)
        elif tools:
            runnable = chat.bind_tools(list(tools))
        return _Model(name, runnable, priced_as, toolless=schema is None and not tools)

    def _require_price(self, priced_as: str) -> None:
        """Refuse a model the price table cannot price while a dollar limit is in force.

        Its calls would count as $0, so the limit would never stop a run.
        """
        if self.usd_limit is None:
            return
        tables = [self.prices]  # prices every answer, for the run budget and the settle
        if self.meter is not None and self.meter.usd_limit is not None:
            tables.append(self.meter.prices)  # prices the period budgets' reservations
        if any(table.price_of(priced_as) is None for table in tables):
            raise UserError(unpriced(priced_as, self.usd_limit))

    @property
    def name(self) -> str:
        """The first model's name."""
        return self.chain[0].name

    def invoke(
        self, messages: Messages, config: Config, context: RunContext, *, usage: Spent = None
    ) -> ModelAnswer:
        """Call the model; `usage` is what the run has spent so far (for the run budget)."""
        return drive(self.call(convert_to_messages(messages), config, context, usage))

    async def ainvoke(
        self, messages: Messages, config: Config, context: RunContext, *, usage: Spent = None
    ) -> ModelAnswer:
        """Call the model (async); see `invoke`."""
        return await adrive(self.call(convert_to_messages(messages), config, context, usage))

    def deadline(self, clock: Mapping[str, Any] | None) -> float | None:
        """When (`time.time()`) the run whose clock is `clock` reaches its `wall_seconds` limit.

        Its own run budget's, or an outer run's (a supervisor's over its agent); `None` without
        one. Every model call of a run passes it as `until` (or its clock as `clock`): a call's
        wait for a period budget's room (`PeriodBudget.wait_for_reservations`) ends there, and
        the run with it.
        """
        return wall_deadline(self.budget, (clock or {}).get("started_at"))

    def _over_budget(
        self, usage: Mapping[str, Any] | None, started_at: float | None
    ) -> Outcome | None:
        """Why the run budget (or an outer run's) refuses the call; `started_at`: the run clock.

        With the clock, a run past its `wall_seconds` makes no further model call.
        """
        over = outer_exceeded(usage) if usage is not None else None
        if over is not None:  # a supervisor's run budget over its agent's planner or judge
            return outcome.stopped("budget_exceeded", over)
        if self.budget is None:
            return None
        verdict = check_budget(self.budget, usage or {}, started_at=started_at)
        return outcome.stopped("budget_exceeded", verdict.exceeded) if verdict.exceeded else None

    # -- the steps, written once ------------------------------------------------------------

    def call(
        self,
        messages: list[BaseMessage],
        config: RunnableConfig | None,
        ctx: RunContext,
        usage: Mapping[str, Any] | None,
        *,
        until: float | None = None,
        clock: Mapping[str, Any] | None = None,
    ) -> Steps[ModelAnswer]:
        """The call as steps for `keel._drive`; `invoke` and `ainvoke` drive it.

        Attempts along the chain: retry, fall back, or stop (`keel.guards.fallback`). `until`:
        the run's wall-clock limit (`time.time()`), past which no wait for a period budget's
        room (`PeriodBudget.wait_for_reservations`) goes on. `clock`: the run clock
        (`AgentState.clock`): a run past its `wall_seconds` (or an outer run's) makes no call,
        and `until` defaults to its deadline (`deadline`).
        """
        if until is None:
            until = self.deadline(clock)
        stop = self._over_budget(usage, (clock or {}).get("started_at"))
        if stop is not None:
            return ModelAnswer(stop=stop)
        if self.decides:  # a plan, a route, a verdict: read by keel, streamed to no client
            config = unstreamed(config)
        index = 0
        while True:
            m, more = self.chain[index], index + 1 < len(self.chain)
            policy = self._retrying(more)
            try:
                tried = yield from retrying(
                    policy, partial(self._tried, m, messages, config, ctx, until)
                )
            except _Stopped as stopped:
                return ModelAnswer(usage=stopped.usage, stop=stopped.outcome)
            except _Failed as failed:
                exc, attempt = failed.error, policy.statistics["attempt_number"]
                if self._next_step(failed, attempt, more) == "fallback":
                    log.warning("model %s failed (%r); falling back", m.name, exc)
                    index += 1
                    continue
                tried_names = [m.name for m in self.chain[: index + 1]] if index else []
                return ModelAnswer(stop=_failed(exc, attempt, tried_names), error=exc)
            return ModelAnswer(tried.output, tried.usage, warnings=tried.warnings)

    def _retrying(self, more: bool) -> Retrying:
        """Tenacity's retry object for one model of the chain (`after_failure`'s table).

        It retries what `keel.guards.fallback.after_failure` says to retry, waiting its
        `backoff` (a provider's `Retry-After`, else exponential), up to the `RetryPolicy`'s
        attempts; what it gives up on falls back or stops.
        """

        def again(state: RetryCallState) -> bool:
            failed = state.outcome.exception() if state.outcome is not None else None
            if not isinstance(failed, _Failed):
                return False
            return isinstance(self._next_step(failed, state.attempt_number, more), Retry)

        def wait(state: RetryCallState) -> float:
            failed = state.outcome.exception() if state.outcome is not None else None
            error = failed.error if isinstance(failed, _Failed) else None
            return backoff(self.retry, state.attempt_number, error)

        return Retrying(
            stop=stop_after_attempt(self.retry.max_attempts),
            wait=wait,
            retry=again,
            reraise=True,
        )

    def _next_step(self, failed: _Failed, attempt: int, more: bool) -> Step:
        return after_failure(
            failed.error,
            attempt,
            self.retry,
            has_fallback=more,
            tripped=failed.tripped,
            fallback_on_timeout=self.timeout is not None and self.timeout.fallback,
        )

    def _tried(
        self,
        m: _Model,
        messages: list[BaseMessage],
        config: RunnableConfig | None,
        ctx: RunContext,
        until: float | None,
    ) -> Steps[_Tried]:
        """One attempt; a model failure raised as `_Failed` for the retry engine to judge."""
        tried = yield from self._attempt(m, messages, config, ctx, until)
        if tried.error is not None:
            raise _Failed(tried.error, tried.tripped)
        return tried

    def _attempt(
        self,
        m: _Model,
        messages: list[BaseMessage],
        config: RunnableConfig | None,
        ctx: RunContext,
        until: float | None = None,
    ) -> Steps[_Tried]:
        """Reserve → breaker and rate limits → call → record → settle, on one model.

        A call the period budgets hold back for what other calls hold in flight (`Crowded`)
        waits for their reservations to settle and tries again (`RoomWait`), at most until
        `until` (the run's wall-clock limit).
        """
        wait: RoomWait | None = None
        admitted: tuple[Reservation | None, Any] | Crowded | _Tried
        holder = self._holder(config)
        while True:
            if self.guard is None:
                admitted = yield from self._reserve(m, messages, ctx, holder)
            else:
                admitted = yield from self._admit(m, messages, ctx, holder)
            if isinstance(admitted, _Tried):
                return admitted
            if not isinstance(admitted, Crowded):
                break
            assert self.meter is not None
            wait = wait or RoomWait(self.meter.ledger, until)
            refused = yield from wait.waiting(admitted)
            if refused is not None:
                raise _Stopped(outcome.stopped("budget_exceeded", refused))
        held, permit = admitted
        return (yield from self._call(m, messages, config, held, permit))

    def _call(
        self,
        m: _Model,
        messages: list[BaseMessage],
        config: RunnableConfig | None,
        held: Reservation | None,
        permit: Any,
    ) -> Steps[_Tried]:
        """Call → record → settle, once the call holds its reservation and permit."""
        try:
            output = yield self._charged_if_cancelled(self._ask(m, messages, config), held)
            message = _raw(output)
        except GraphBubbleUp:
            raise
        except Exception as exc:
            transition = yield from self._record(m, permit, exc, 0, {})
            charged = held if isinstance(exc, TimeoutError) else None
            yield from self._settle(held, charged, "after the model failed")
            return _Tried(error=exc, tripped=_opened(transition))
        unreported = 0 if _counted(message) else estimate_tokens(messages) + self.schema_tokens
        try:
            usage = usage_of(
                message, self.prices, m.priced_as, unreported, usd_limit=self.usd_limit
            )
            stop = None
        except UserError as exc:  # neither the reported nor the configured name has a price
            usage = usage_of(message, self.prices, m.priced_as, unreported)
            usage.pop("usd", None)  # not known: the call is charged at its reservation
            stop = outcome.stopped(
                "budget_exceeded", f"{exc} The run stopped after this call; nothing further ran."
            )
        warnings: list[str] = []
        if stop is None and held is not None and not _counted(message):
            usage = _at_reservation(usage, held, self._reserve_out(m.name))
            warnings.append(
                f"{m.name} reported no token usage: its calls count at their period budget "
                "reservations, the most they can cost"
            )
        counted_out = int(usage.get("output_tokens", 0)) if _counted(message) else 0
        if held is not None and counted_out > self._reserve_out():
            self._past_the_cap(m.name, counted_out)
            warnings.append(
                f"{m.name} answered past reserve_output_tokens={self._reserve_out()}: a period "
                "budget can be exceeded by what its calls bill past their reservations"
            )
        if not self.steps:
            usage.pop("steps", None)
        yield from self._record(m, permit, None, _tokens(usage), usage)
        yield from self._settle(
            held, usage if stop is None else held, "after the model answered", usage
        )
        if stop is not None:
            raise _Stopped(stop, usage)
        return _Tried(output, usage, warnings=tuple(warnings))

    def _holder(self, config: RunnableConfig | None) -> str | None:
        """The run a reservation names: the one holding the thread's lease in the meter's ledger.

        Its reservation is charged and released once that lease is seen expired (the run's
        process died) rather than held until `reservation_ttl` (`keel.guards.spend.RoomWait`).
        A run that holds no lease there (no checkpointer, a one-shot `invoke`) names its
        process (`keel.guards.holders.unleased`): charged once that process is seen gone.
        """
        meter = self._meter()
        if meter is None:
            return None
        leased = holders.of_thread((config or {}).get("configurable") or {}, meter.ledger)
        return leased if leased is not None else holders.unleased()

    def _admit(
        self, m: _Model, messages: list[BaseMessage], ctx: RunContext, holder: str | None
    ) -> Steps[tuple[Reservation | None, Any] | Crowded | _Tried]:
        """Breaker, then the reservation and the rate limits' first try in one transaction.

        `_Tried` with the refusal when the breaker is open or a rate limit has no room (the
        reservation released); `Crowded` when the call is to wait for room (nothing taken); a
        spent period budget or a failed ledger stops the run.
        """
        meter, guard = self._meter(), self.guard
        assert guard is not None
        # the rate limits' estimate; without a period budget: no reservation, and nothing
        # written; with one, the input is reserved at its bound (a token per byte), so the call
        # cannot cost more than it holds (both from one walk of the messages)
        first: Flow[Reservation | str | None]
        if meter is None:
            tokens, first = estimate_tokens(messages) + self.schema_tokens, returning(None)
        else:
            estimate, bound = token_sizes(messages)
            tokens = estimate + self.schema_tokens
            first = meter.reserve_input(
                bound + self.schema_bound,
                ctx,
                m.priced_as,
                output_tokens=self._overran.get(m.name),
                holder=holder,
            )
        try:
            held, permit = yield from guard.admitting(
                m.name, ctx.tenant_id, tokens, first, lambda r: not isinstance(r, str)
            )
        except Exception as exc:
            failed = _storage(exc)
            if isinstance(failed, CircuitOpen):
                return _Tried(error=failed)
            if not isinstance(failed, _StorageFailed):
                raise
            # the ledger failed: nothing was reserved, or the reservation expires
            raise _Stopped(_storage_failed(failed, "before the model was called")) from None
        if isinstance(held, Crowded):  # no rate limit was tried (`go_on` said no)
            return held
        if isinstance(held, str):
            raise _Stopped(outcome.stopped("budget_exceeded", held))
        if isinstance(permit, RateLimited):
            yield from self._settle(held, None, "after the breaker or rate limit refused")
            return _Tried(error=permit)
        return held, permit

    def _reserve(
        self, m: _Model, messages: list[BaseMessage], ctx: RunContext, holder: str | None
    ) -> Steps[tuple[Reservation | None, None] | Crowded]:
        """The call's reservation (none without period budgets), or `Crowded`: wait for room."""
        meter = self._meter()
        if meter is None:
            return None, None
        extra = self.schema_bound
        try:
            reserve = meter.reserving(
                messages,
                ctx,
                m.priced_as,
                schema_tokens=extra,
                output_tokens=self._overran.get(m.name),
                holder=holder,
            )
            held = yield Op(reserve.run, reserve.arun, on_error=_storage)
        except _StorageFailed as failed:
            raise _Stopped(_storage_failed(failed, "before the model was called")) from None
        if isinstance(held, Crowded):
            return held
        if isinstance(held, str):
            raise _Stopped(outcome.stopped("budget_exceeded", held))
        assert isinstance(held, Reservation)
        return held, None

    def _past_the_cap(self, name: str, tokens: int) -> None:
        """Reserve `tokens` of output for `name`'s later calls (in this process).

        Warns once per model that an answer billed more output than its reservation held.
        """
        known = self._overran.get(name)
        self._overran[name] = max(tokens, known or 0)
        if known is not None:
            return
        log.warning(
            "%s answered %d output tokens, past the %d its period budget reserved (its output "
            "cap is ignored or missing): a period can be exceeded by what calls under way bill "
            "past their reservations",
            name,
            tokens,
            self._reserve_out(),
        )

    def _reserve_out(self, name: str | None = None) -> int:
        """Output tokens a call reserves: the budgets' reserve, or what `name` billed past it."""
        reserve = self.meter.output_reserve if self.meter is not None else 0
        return max(reserve, self._overran.get(name, 0)) if name is not None else reserve

    def _meter(self) -> SpendMeter | None:
        """The period budgets' meter; none in a replay or shadow run (`isolated`).

        Production's period spend counts the user's runs, not a replay of them.
        """
        return None if isolated() else self.meter

    def _record(
        self,
        m: _Model,
        permit: Any,
        error: Exception | None,
        tokens: int,
        usage: Usage,
    ) -> Steps[BreakerTransition | None]:
        guard = self.guard
        if guard is None:
            return None
        try:
            transition = yield Op(
                lambda: guard.after(m.name, permit, error, tokens),
                lambda: guard.aafter(m.name, permit, error, tokens),
                on_error=_storage,
            )
        except _StorageFailed as failed:
            when = "after the model failed" if error is not None else "after the model answered"
            raise _Stopped(_storage_failed(failed, when), usage) from None
        return transition if isinstance(transition, BreakerTransition) else None

    def _settle(
        self,
        held: Reservation | None,
        cost: Usage | Reservation | None,
        when: str,
        usage: Usage | None = None,
    ) -> Steps[None]:
        """Replace the reservation by the cost (a `Reservation`: charge it as estimated)."""
        meter = self.meter
        if meter is None or held is None:
            return
        if isinstance(cost, Reservation):
            usd, tokens = cost.usd, cost.tokens
        elif cost is not None:
            usd, tokens = float(cost.get("usd", 0.0)), _tokens(cost)
        else:
            usd, tokens = None, None
        try:
            yield Op(
                lambda: meter.settle(held, usd, tokens),
                lambda: meter.asettle(held, usd, tokens),
                on_error=_storage,
            )
        except _StorageFailed as failed:
            if not when:  # already stopping for a storage failure: the reservation expires
                return
            raise _Stopped(_storage_failed(failed, when), usage) from None

    def _charged_if_cancelled(self, ask: Op, held: Reservation | None) -> Op:
        """`ask`, whose reservation is charged as reserved if its task is cancelled meanwhile.

        A cancelled run (a client gone, a served run interrupted or cancelled) ends the call
        in its `await`, where no later step runs (`adrive` closes the steps): its reservation
        held the period's room for `reservation_ttl` (15 min by default) and made every other
        call wait for it. The provider may have billed the request, so it is charged as a
        timed-out call is, at its reservation (the most it can cost): the budget holds, and the
        room the reserve held beyond that comes back now. A sync call cannot be cancelled.
        """
        meter = self.meter
        if meter is None or held is None:
            return ask

        async def arun() -> Any:
            try:
                return await ask.arun()
            except asyncio.CancelledError:
                try:
                    await finishing(meter.asettle(held, held.usd, held.tokens))
                except Exception:  # the ledger failed too: the reservation expires instead
                    log.exception("could not settle a cancelled model call's reservation")
                raise

        return Op(ask.run, arun, ask.on_error)

    def _ask(self, m: _Model, messages: list[BaseMessage], config: RunnableConfig | None) -> Op:
        seconds = self.timeout.attempt_timeout if self.timeout is not None else None
        runnable = m.runnable
        if m.toolless:  # no tool blocks in a request without tools
            messages = tool_turns_as_text(messages)
        if seconds is None:
            return Op(
                lambda: runnable.invoke(messages, config),
                lambda: runnable.ainvoke(messages, config),
            )
        return Op(
            lambda: _within(seconds, m.name, lambda: runnable.invoke(messages, config)),
            lambda: _awithin(seconds, m.name, runnable.ainvoke(messages, config)),
        )


# -- the ledger's failures --------------------------------------------------------------------


def _storage(exc: Exception) -> Exception:
    """A ledger operation's own failure is a storage failure; its refusals are not."""
    if isinstance(exc, CircuitOpen | RateLimited | GraphBubbleUp):
        return exc
    log.error("the ledger failed during a model call: %r", exc)
    return _StorageFailed(exc)


def _within(seconds: float, name: str, call: Callable[[], Any]) -> Any:
    """`call()` in a daemon thread, given up after `seconds` (a sync call cannot be cancelled)."""
    done = threading.Event()
    box: dict[str, Any] = {}
    context = contextvars.copy_context()

    def work() -> None:
        try:
            box["output"] = context.run(call)
        except BaseException as exc:  # handed to the caller
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=work, name=f"keel-model-call-{name}", daemon=True).start()
    if not done.wait(seconds):
        raise _timed_out(name, seconds)
    if "error" in box:
        raise box["error"]
    return box["output"]


async def _awithin(seconds: float, name: str, call: Awaitable[Any]) -> Any:
    try:
        return await asyncio.wait_for(call, seconds)
    except TimeoutError:
        raise _timed_out(name, seconds) from None


def _timed_out(name: str, seconds: float) -> TimeoutError:
    return TimeoutError(
        f"{name} did not answer within {seconds:g} s (ModelTimeoutPolicy.attempt_timeout)"
    )


# -- small helpers -----------------------------------------------------------------------------


def _raw(output: Any) -> AIMessage:
    """The `AIMessage` of a model's output (plain, or the `raw` of a structured answer)."""
    message = output.get("raw") if isinstance(output, Mapping) else output
    if not isinstance(message, AIMessage):
        raise ModelBehaviorError(
            "the model", f"returned {type(message).__name__}, not an AIMessage"
        )
    return message


def _tokens(usage: Mapping[str, Any]) -> int:
    return int(usage.get("input_tokens", 0)) + int(usage.get("output_tokens", 0))


def _counted(message: AIMessage) -> bool:
    """Whether the answer reported both its token counts as counts (no estimate needed)."""
    meta: object = message.usage_metadata
    return isinstance(meta, Mapping) and all(
        token_count(meta.get(k)) is not None for k in ("input_tokens", "output_tokens")
    )


def _at_reservation(usage: Usage, held: Reservation, output_reserve: int) -> Usage:
    """`usage` raised to the call's reservation: for an answer without usable counts.

    Its estimate (about 4 characters a token) can be below what the provider bills (a token per
    digit); the reservation is what the call can cost at most (its input bound, the answer's cap).
    """
    tokens_in = max(int(usage.get("input_tokens", 0)), held.tokens - output_reserve)
    tokens_out = max(int(usage.get("output_tokens", 0)), output_reserve)
    usd = max(float(usage.get("usd", 0.0)), held.usd)
    return {**usage, "input_tokens": tokens_in, "output_tokens": tokens_out, "usd": usd}


def _opened(transition: BreakerTransition | None) -> bool:
    return transition is not None and transition.after == "open"


def _failed(exc: BaseException, attempts: int, tried: list[str]) -> Outcome:
    """How a run ends whose model call failed for good."""
    log.warning("model call failed after %d attempt(s): %r", attempts, exc)
    detail = f"model call failed after {attempts} attempt(s): {type(exc).__name__}: {exc}"
    if tried:
        detail += f" (fallback models tried, in order: {', '.join(tried)})"
    if isinstance(exc, TimeoutError):
        return outcome.stopped("timeout", detail)
    return outcome.failed(detail)


def _storage_failed(failed: _StorageFailed, when: str) -> Outcome:
    """How a run ends whose ledger failed around a model call (error category `storage`)."""
    return outcome.failed(
        f"{STORAGE_FAILED}: the ledger raised {failed} {when}; no budget, breaker or rate "
        "limit could be checked or recorded. Resume the thread once the database is back."
    )
