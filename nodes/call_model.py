"""`call_model`: one model turn, with usage and cost accounting, checks and retries inside.

Checks that only allow or stop (budgets, rate limits, breakers, the step limit) run inside this
node, so protection adds no superstep. A model failure, after retries, ends the run with an
outcome instead of an exception.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.runnables import Runnable, RunnableConfig
from langgraph.errors import GraphBubbleUp
from langgraph.runtime import Runtime
from langgraph.types import RetryPolicy

from keel import outcome
from keel._node import RunnableCallable, context_of, make_node, policy_id, thread_of
from keel.approvals import Grants
from keel.errors import KeelError
from keel.guards.breaker import BreakerTransition
from keel.guards.budget import check_budget, usage_of
from keel.guards.fallback import Retry, after_failure
from keel.guards.gate import Gate, approval_gate
from keel.guards.loop import call_sequence, detect_loop, wrap_up_note
from keel.guards.policy import Budget, LoopPolicy
from keel.guards.resilience import ModelGuard
from keel.guards.spend import SpendMeter, estimate_tokens
from keel.guards.standing import StandingStore, allowing
from keel.models import model_name_of, resolve_model
from keel.nodes.history import valid_history
from keel.nodes.plan import advance_plan, render_plan
from keel.pricing import PriceTable
from keel.state import AgentState, Outcome, RunContext, Usage, add_usage
from keel.tools.registry import ToolRegistry

__all__ = ["BeforeModel", "call_model"]

log = logging.getLogger("keel.nodes.call_model")

BeforeModel = Callable[[AgentState, RunContext], Outcome | None]
"""A check run before every model call: `None` lets the call happen, an `Outcome` stops the run."""

DEFAULT_MODEL_RETRY = RetryPolicy(initial_interval=0.5, max_interval=8.0, max_attempts=3)


@dataclass(frozen=True, slots=True)
class _Turn:
    """What to send, or why not to; `extra` is state to write along with the answer."""

    messages: list[BaseMessage] | None
    stop: Outcome | None
    extra: dict[str, Any] = field(default_factory=dict)
    chain: tuple[_Model, ...] = ()
    """The models to try, in order (the cheaper chain near the budget limit)."""


@dataclass(frozen=True, slots=True)
class _Model:
    """One model of the fallback chain: its name, with tools bound, and without."""

    name: str
    bound: Runnable[LanguageModelInput, BaseMessage]
    plain: BaseChatModel


def _chain(models: Sequence[str | BaseChatModel], registry: ToolRegistry) -> tuple[_Model, ...]:
    out = []
    for model in models:
        chat = resolve_model(model)
        bound = chat.bind_tools(registry.tools) if len(registry) else chat
        out.append(_Model(model_name_of(chat), bound, chat))
    return tuple(out)


@dataclass(slots=True)
class _Attempts:
    """One model turn's attempts along the fallback chain: the decisions both drivers share."""

    chain: tuple[_Model, ...]
    retry: RetryPolicy
    index: int = 0
    attempt: int = 1
    tripped: bool = False
    """The last failure opened the model's circuit breaker (retrying it would be refused)."""

    @property
    def model(self) -> _Model:
        return self.chain[self.index]

    def failed(self, exc: BaseException) -> float | dict[str, Any]:
        """Seconds to wait before the next attempt (on `self.model`), or the final update."""
        more = self.index + 1 < len(self.chain)
        step = after_failure(exc, self.attempt, self.retry, has_fallback=more, tripped=self.tripped)
        self.tripped = False
        if isinstance(step, Retry):
            self.attempt += 1
            return step.seconds
        if step == "fallback":
            log.warning("model %s failed (%r); falling back", self.model.name, exc)
            self.index, self.attempt = self.index + 1, 1
            return 0.0
        tried = self.chain[: self.index + 1]
        return _failed(exc, self.attempt, [m.name for m in tried] if len(tried) > 1 else [])


def call_model(
    model: str | BaseChatModel,
    tools: ToolRegistry | None = None,
    *,
    system_prompt: str | None = None,
    prices: PriceTable | None = None,
    before_model: Sequence[BeforeModel] = (),
    gate: Gate = approval_gate,
    retry: RetryPolicy = DEFAULT_MODEL_RETRY,
    budget: Budget | None = None,
    loop: LoopPolicy | None = None,
    meter: SpendMeter | None = None,
    guard: ModelGuard | None = None,
    fallbacks: Sequence[str | BaseChatModel] = (),
    downgrade: str | BaseChatModel | None = None,
    reserve_steps: int = 2,
    policy_version: str = "1",
    policy_name: str | None = None,
    standing: StandingStore | None = None,
    grants: Grants | None = None,
    name: str = "call_model",
) -> RunnableCallable:
    """A node that calls the model once and records the answer, tokens and dollars.

    Args:
        model: A chat model or a `provider:name` string.
        tools: The tools to bind; their calls are checked against `gate` to flag approvals.
        system_prompt: Sent first on every call (with the plan, when there is one).
        prices: Turns `usage_metadata` into USD; the default table when omitted.
        before_model: Checks run before each call; one returning an `Outcome` stops the run.
        gate: Decides which tool calls need a human; a call needing one sets the outcome to
            `interrupted` so the graph routes to `human_review`.
        retry: LangGraph's `RetryPolicy` for transient model errors (network, 5xx, 429).
        budget: Run budget checked before each call (stop, or a soft-threshold warning).
        loop: The loop guard applied to each answer's tool calls.
        meter: Reserves each call's estimate against per-user / per-tenant period budgets
            before the call and settles the real cost after it.
        guard: The rate limits and per-model breaker checked around each call, inside this
            node (`ModelGuard.from_policy(policy, ledger)`).
        fallbacks: Models to try in order when the model is down (5xx, connection errors,
            still rate limited after retries, open breaker); see `keel.guards.fallback`.
        downgrade: A cheaper model used instead of `model` once the run budget is past its
            soft threshold (model tiering; off when `None`). Its fallbacks are `fallbacks`.
        reserve_steps: Stop cleanly when fewer LangGraph steps than this remain, instead of
            raising `GraphRecursionError`.
        policy_version: The policy version standing approvals are bound to.
        policy_name: The policy name standing approvals are bound to.
        standing: Where user-scoped standing approvals are kept; loaded into the thread at
            the start of each task.
        grants: Verifies the approvals in state (`keel.approvals.Grants`); an unverified one
            does not spare a call its review.
        name: The node's name.
    """
    registry = tools or ToolRegistry()
    chain = _chain([model, *fallbacks], registry)
    cheaper = _chain([downgrade, *fallbacks], registry) if downgrade is not None else None
    table = prices or PriceTable()
    default_name = chain[0].name
    checks = tuple(before_model)

    sealer = grants if grants is not None else Grants.from_secret()

    def prepare(state: AgentState, runtime: Runtime[RunContext] | None) -> _Turn:
        remaining = state.get("remaining_steps")
        if remaining is not None and remaining <= reserve_steps:
            return _Turn(None, outcome.step_limit())
        extra: dict[str, Any] = {}
        history = state.get("messages") or []
        clock = state.get("clock") or {}
        if "started_at" not in clock or (history and isinstance(history[-1], HumanMessage)):
            clock = {"started_at": time.time()}  # a new task starts the wall clock
            extra["clock"] = clock
        models = chain
        if budget is not None:
            verdict = check_budget(budget, state.get("usage") or {}, started_at=clock["started_at"])
            if verdict.exceeded:
                return _Turn(None, outcome.stopped("budget_exceeded", verdict.exceeded))
            warnings = list(verdict.warnings)
            if cheaper is not None and warnings:
                models = cheaper
                warnings.append(f"model downgraded to {cheaper[0].name} near the budget limit")
            if warnings != (state.get("budget_warnings") or []):
                extra["budget_warnings"] = warnings
        context = context_of(runtime)
        for check in checks:
            stop = check(state, context)
            if stop is not None:
                return _Turn(None, stop)
        system = _system_text(system_prompt, state)
        if system:  # valid_history merges it with any system message already in the history
            history = [SystemMessage(content=system), *history]
        return _Turn(valid_history(history), None, extra, models)

    def finish(
        response: BaseMessage, state: AgentState, runtime: Runtime[RunContext] | None, turn: _Turn
    ) -> dict[str, Any] | str:
        """The state update for `response`, or the loop's reason when a wrap-up turn is due."""
        if not isinstance(response, AIMessage):
            raise KeelError(f"The model returned {type(response).__name__}, not an AIMessage.")
        usage = usage_of(response, table, default_name)
        update: dict[str, Any] = {"messages": [response], "usage": usage, **turn.extra}
        if response.invalid_tool_calls:
            # Providers count these as tool calls: answer each, and let the model try again.
            update["messages"].extend(_invalid_call_results(response))
            if not response.tool_calls and state.get("outcome") is not None:
                update["outcome"] = None
            if not response.tool_calls:
                return update
        if response.tool_calls:
            looping = (
                detect_loop(call_sequence(state.get("messages") or [], response), loop)
                if loop is not None
                else None
            )
            ctx = context_of(runtime)
            policy = policy_id(ctx, policy_version, policy_name)
            approvals = sealer.for_run(thread_of(runtime), ctx).trusted(
                {**(state.get("approvals") or {}), **turn.extra.get("approvals", {})}
            )
            decide = allowing(gate, approvals, policy)
            ask = _approval_needed(response, registry, decide, ctx)
            if looping is not None and loop is not None:
                if loop.on_loop == "wrap_up" and not _over(budget, state, usage):
                    return looping
                update["outcome"] = outcome.stopped("loop_detected", looping)
            elif ask:
                update["outcome"] = outcome.interrupted(ask)
            elif state.get("outcome") is not None:
                update["outcome"] = None  # a checkpoint write only when it changes
        else:
            update["outcome"] = outcome.completed()
            steps = state.get("plan")
            if steps and any(s["status"] == "in_progress" for s in steps):
                update["plan"] = advance_plan(steps, succeeded=True)
        return update

    def wrapped_up(
        first: BaseMessage, final: BaseMessage, reason: str, turn: _Turn
    ) -> dict[str, Any]:
        """The update after a loop's wrap-up turn: only the tool-free answer is kept."""
        assert isinstance(first, AIMessage)
        if not isinstance(final, AIMessage):
            raise KeelError(f"The model returned {type(final).__name__}, not an AIMessage.")
        usage = add_usage(
            usage_of(first, table, default_name), usage_of(final, table, default_name)
        )
        return {
            **turn.extra,
            "messages": [final],
            "usage": usage,
            "outcome": outcome.stopped("loop_detected", f"{reason}; answered without tools"),
        }

    def guarded_sync(
        at: _Attempts,
        tools: bool,
        messages: list[BaseMessage],
        config: RunnableConfig,
        ctx: RunContext,
    ) -> BaseMessage:
        m = at.model
        runnable = m.bound if tools else m.plain
        if guard is None:
            return runnable.invoke(messages, config)
        permit = guard.before(m.name, ctx.tenant_id, estimate_tokens(messages))
        try:
            response = runnable.invoke(messages, config)
        except Exception as exc:
            at.tripped = _opened(guard.after(m.name, permit, exc, 0))
            raise
        guard.after(m.name, permit, None, _tokens_of(response))
        return response

    async def guarded_async(
        at: _Attempts,
        tools: bool,
        messages: list[BaseMessage],
        config: RunnableConfig,
        ctx: RunContext,
    ) -> BaseMessage:
        m = at.model
        runnable = m.bound if tools else m.plain
        if guard is None:
            return await runnable.ainvoke(messages, config)
        permit = await guard.abefore(m.name, ctx.tenant_id, estimate_tokens(messages))
        try:
            response = await runnable.ainvoke(messages, config)
        except Exception as exc:
            at.tripped = _opened(await guard.aafter(m.name, permit, exc, 0))
            raise
        await guard.aafter(m.name, permit, None, _tokens_of(response))
        return response

    def call_sync(
        turn: _Turn,
        tools: bool,
        messages: list[BaseMessage],
        config: RunnableConfig,
        ctx: RunContext,
    ) -> BaseMessage | dict[str, Any]:
        attempts = _Attempts(turn.chain, retry)
        while True:
            try:
                return guarded_sync(attempts, tools, messages, config, ctx)
            except GraphBubbleUp:
                raise
            except Exception as exc:
                step = attempts.failed(exc)
                if isinstance(step, dict):
                    return step
                time.sleep(step)

    async def call_async(
        turn: _Turn,
        tools: bool,
        messages: list[BaseMessage],
        config: RunnableConfig,
        ctx: RunContext,
    ) -> BaseMessage | dict[str, Any]:
        attempts = _Attempts(turn.chain, retry)
        while True:
            try:
                return await guarded_async(attempts, tools, messages, config, ctx)
            except GraphBubbleUp:
                raise
            except Exception as exc:
                step = attempts.failed(exc)
                if isinstance(step, dict):
                    return step
                await asyncio.sleep(step)

    def answer(
        turn: _Turn, state: AgentState, config: RunnableConfig, runtime: Runtime[RunContext]
    ) -> dict[str, Any]:
        assert turn.messages is not None
        ctx = context_of(runtime)
        response = call_sync(turn, True, turn.messages, config, ctx)
        if isinstance(response, dict):
            return response
        update = finish(response, state, runtime, turn)
        if isinstance(update, dict):
            return update
        final = call_sync(turn, False, [*turn.messages, wrap_up_note(update)], config, ctx)
        return final if isinstance(final, dict) else wrapped_up(response, final, update, turn)

    async def aanswer(
        turn: _Turn, state: AgentState, config: RunnableConfig, runtime: Runtime[RunContext]
    ) -> dict[str, Any]:
        assert turn.messages is not None
        ctx = context_of(runtime)
        response = await call_async(turn, True, turn.messages, config, ctx)
        if isinstance(response, dict):
            return response
        update = finish(response, state, runtime, turn)
        if isinstance(update, dict):
            return update
        final = await call_async(turn, False, [*turn.messages, wrap_up_note(update)], config, ctx)
        return final if isinstance(final, dict) else wrapped_up(response, final, update, turn)

    def invoke(
        state: AgentState, config: RunnableConfig, runtime: Runtime[RunContext]
    ) -> dict[str, Any]:
        turn = prepare(state, runtime)
        if turn.messages is None:
            return {"outcome": turn.stop or outcome.failed("no messages to send")}
        if standing is not None and "clock" in turn.extra:  # a new task: the user's approvals
            turn.extra["approvals"] = standing.load(context_of(runtime))
        if meter is None:
            return answer(turn, state, config, runtime)
        held = meter.reserve(turn.messages, context_of(runtime), default_name)
        if isinstance(held, str):
            return {**turn.extra, "outcome": outcome.stopped("budget_exceeded", held)}
        update: dict[str, Any] | None = None
        try:
            update = answer(turn, state, config, runtime)
            return update
        finally:
            meter.settle(held, *_cost(update))

    async def ainvoke(
        state: AgentState, config: RunnableConfig, runtime: Runtime[RunContext]
    ) -> dict[str, Any]:
        turn = prepare(state, runtime)
        if turn.messages is None:
            return {"outcome": turn.stop or outcome.failed("no messages to send")}
        if standing is not None and "clock" in turn.extra:  # a new task: the user's approvals
            turn.extra["approvals"] = await standing.aload(context_of(runtime))
        if meter is None:
            return await aanswer(turn, state, config, runtime)
        held = await meter.areserve(turn.messages, context_of(runtime), default_name)
        if isinstance(held, str):
            return {**turn.extra, "outcome": outcome.stopped("budget_exceeded", held)}
        update: dict[str, Any] | None = None
        try:
            update = await aanswer(turn, state, config, runtime)
            return update
        finally:
            await meter.asettle(held, *_cost(update))

    return make_node(name, invoke, ainvoke)


def _over(budget: Budget | None, state: AgentState, usage: Usage) -> bool:
    """Whether the run's budget is spent once `usage` is added (no wrap-up turn then)."""
    if budget is None:
        return False
    total = add_usage(state.get("usage") or {}, usage)
    return check_budget(budget, total).exceeded is not None


def _invalid_call_results(response: AIMessage) -> list[ToolMessage]:
    return [
        ToolMessage(
            content=f"Error: the arguments for {call.get('name') or 'this tool'} were not valid "
            f"JSON ({call.get('error') or 'could not parse'}). Call the tool again with a JSON "
            "object of arguments.",
            tool_call_id=call.get("id") or "",
            name=call.get("name") or "",
            status="error",
            response_metadata={"keel_status": "invalid_args"},
        )
        for call in response.invalid_tool_calls
    ]


def _cost(update: dict[str, Any] | None) -> tuple[float | None, int | None]:
    """What a model turn cost, for the spend ledger; `(None, None)` when no call completed."""
    usage = (update or {}).get("usage")
    if not usage or not usage.get("model_calls"):
        return None, None
    return float(usage.get("usd", 0.0)), int(
        usage.get("input_tokens", 0) + usage.get("output_tokens", 0)
    )


def _system_text(system_prompt: str | None, state: AgentState) -> str:
    plan = state.get("plan")
    parts = [system_prompt] if system_prompt else []
    if plan:
        parts.append(render_plan(plan))
    return "\n\n".join(parts)


def _approval_needed(
    response: AIMessage, registry: ToolRegistry, gate: Gate, context: RunContext
) -> str | None:
    reasons = []
    for tc in response.tool_calls:
        entry = registry.get(tc["name"])
        if entry is not None and gate(entry, tc["args"], context).action == "ask":
            reasons.append(tc["name"])
    return f"awaiting approval for {', '.join(reasons)}" if reasons else None


def _failed(exc: BaseException, attempts: int, tried: list[str]) -> dict[str, Any]:
    """The update that ends a run whose model call failed for good."""
    log.warning("model call failed after %d attempt(s): %r", attempts, exc)
    detail = f"model call failed after {attempts} attempt(s): {type(exc).__name__}: {exc}"
    if tried:
        detail += f" (fallback models tried, in order: {', '.join(tried)})"
    if isinstance(exc, TimeoutError):
        return {"outcome": outcome.stopped("timeout", detail)}
    return {"outcome": outcome.failed(detail)}


def _opened(transition: BreakerTransition | None) -> bool:
    return transition is not None and transition.after == "open"


def _tokens_of(response: BaseMessage) -> int:
    """Input + output tokens a response reports (0 when it reports none)."""
    meta: Mapping[str, Any] = getattr(response, "usage_metadata", None) or {}
    return int(meta.get("input_tokens", 0)) + int(meta.get("output_tokens", 0))
