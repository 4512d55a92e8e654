"""`call_model`: one model turn, with usage and cost accounting, checks and retries inside.

Checks that only allow or stop (budgets, rate limits, breakers, the step limit) run inside this
node, so protection adds no superstep. A model failure, after retries, ends the run with an
outcome instead of an exception.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.runnables import RunnableConfig
from langgraph.runtime import Runtime
from langgraph.types import RetryPolicy

from keel import outcome
from keel._node import RunnableCallable, context_of, make_node, policy_id, thread_of
from keel.approvals import Grants
from keel.guards.budget import check_budget
from keel.guards.gate import Gate, approval_gate
from keel.guards.loop import call_sequence, detect_loop, wrap_up_note
from keel.guards.model_call import (
    DEFAULT_MODEL_RETRY,
    GuardedModel,
    ModelAnswer,
    ModelCallGuards,
    ModelTimeoutPolicy,
)
from keel.guards.policy import Budget, LoopPolicy
from keel.guards.resilience import ModelGuard
from keel.guards.spend import SpendMeter
from keel.guards.standing import StandingStore, allowing
from keel.nodes.history import valid_history
from keel.nodes.plan import advance_plan, render_plan
from keel.pricing import PriceTable
from keel.redact import sanitized_logger
from keel.state import (
    AgentState,
    Outcome,
    RunContext,
    Usage,
    add_usage,
    run_usage,
    task_clock,
)
from keel.tools.registry import ToolRegistry

__all__ = ["DEFAULT_MODEL_RETRY", "BeforeModel", "call_model"]

log = sanitized_logger("keel.nodes.call_model")

BeforeModel = Callable[[AgentState, RunContext], Outcome | None]
"""A check run before every model call: `None` lets the call happen, an `Outcome` stops the run."""


@dataclass(frozen=True, slots=True)
class _Models:
    """The guarded model chain of a turn: with the tools bound, and without (a wrap-up turn)."""

    bound: GuardedModel
    plain: GuardedModel


@dataclass(frozen=True, slots=True)
class _Turn:
    """What to send, or why not to; `extra` is state to write along with the answer."""

    messages: list[BaseMessage] | None
    stop: Outcome | None
    extra: dict[str, Any] = field(default_factory=dict)
    models: _Models | None = None
    """The models to ask (the cheaper chain near the budget limit)."""


def call_model(
    model: str | BaseChatModel,
    tools: ToolRegistry | None = None,
    *,
    system_prompt: str | None = None,
    prices: PriceTable | None = None,
    before_model: Sequence[BeforeModel] = (),
    gate: Gate | None = approval_gate,
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
    timeout: float | timedelta | ModelTimeoutPolicy | None = None,
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
            `interrupted` so the graph routes to `human_review`. `None` when a `tool_gate`
            node after this one decides (as in `build_agent` with a policy).
        retry: LangGraph's `RetryPolicy` for transient model errors (network, 5xx, 429).
        budget: Run budget checked before each call (stop, or a soft-threshold warning).
        loop: The loop guard applied to each answer's tool calls.
        meter: Reserves each call's estimate against per-user / per-tenant period budgets
            before the call and settles the real cost after it; each answer is capped at
            the reserve.
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
        timeout: A deadline for each attempt of a model call (`ModelTimeoutPolicy`).
        grants: Verifies the approvals in state (`keel.approvals.Grants`); an unverified one
            does not spare a call its review.
        name: The node's name.

    Every call goes through a `keel.guards.GuardedModel`: period budget reservation, breaker
    and rate limits, deadline, usage accounting and fallbacks.
    """
    registry = tools or ToolRegistry()
    table = prices or PriceTable()

    guards = ModelCallGuards(
        prices=table,
        meter=meter,
        guard=guard,
        retry=retry,
        timeout=ModelTimeoutPolicy.coerce(timeout),
    )

    def models(first: str | BaseChatModel) -> _Models:
        chain = [first, *fallbacks]
        bound = GuardedModel(chain, tools=registry.tools, guards=guards, steps=True)
        return _Models(bound, GuardedModel(chain, guards=guards, steps=True))

    chain = models(model)
    cheaper = models(downgrade) if downgrade is not None else None
    checks = tuple(before_model)

    sealer = grants if grants is not None else Grants.from_secret()

    def prepare(state: AgentState, runtime: Runtime[RunContext] | None) -> _Turn:
        remaining = state.get("remaining_steps")
        if remaining is not None and remaining <= reserve_steps:
            return _Turn(None, outcome.step_limit())
        extra: dict[str, Any] = {}
        history = state.get("messages") or []
        clock = task_clock(state, time.time()) or dict(state.get("clock") or {})
        if clock.get("answered") != clock.get("task"):  # the model's first turn in a new task
            clock["answered"] = clock.get("task", 0.0)
            extra["clock"] = clock  # (the planner may have started the clock already)
        models = chain
        if budget is not None:
            spent = run_usage(state.get("usage"), clock)
            verdict = check_budget(budget, spent, started_at=clock["started_at"])
            if verdict.exceeded:
                return _Turn(None, outcome.stopped("budget_exceeded", verdict.exceeded))
            warnings = list(verdict.warnings)
            if cheaper is not None and warnings:
                models = cheaper
                warnings.append(f"model downgraded to {cheaper.bound.name} near the budget limit")
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
        got: ModelAnswer, state: AgentState, runtime: Runtime[RunContext] | None, turn: _Turn
    ) -> dict[str, Any] | str:
        """The state update for the answer, or the loop's reason when a wrap-up turn is due."""
        response, usage = got.message, got.usage
        assert response is not None
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
            ask = None
            if gate is not None:
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
        first: ModelAnswer, final: ModelAnswer, reason: str, turn: _Turn
    ) -> dict[str, Any]:
        """The update after a loop's wrap-up turn: only the tool-free answer is kept."""
        usage = add_usage(first.usage, final.usage)
        if final.stop is not None:
            return {**turn.extra, "usage": usage, "outcome": final.stop}
        return {
            **turn.extra,
            "messages": [final.message],
            "usage": usage,
            "outcome": outcome.stopped("loop_detected", f"{reason}; answered without tools"),
        }

    def answer(
        turn: _Turn, state: AgentState, config: RunnableConfig, runtime: Runtime[RunContext]
    ) -> dict[str, Any]:
        assert turn.messages is not None and turn.models is not None
        ctx = context_of(runtime)
        got = turn.models.bound.invoke(turn.messages, config, ctx)
        if got.stop is not None:
            return _stopped(got, turn)
        update = finish(got, state, runtime, turn)
        if isinstance(update, dict):
            return update
        note = wrap_up_note(update)
        final = turn.models.plain.invoke([*turn.messages, note], config, ctx)
        return wrapped_up(got, final, update, turn)

    async def aanswer(
        turn: _Turn, state: AgentState, config: RunnableConfig, runtime: Runtime[RunContext]
    ) -> dict[str, Any]:
        assert turn.messages is not None and turn.models is not None
        ctx = context_of(runtime)
        got = await turn.models.bound.ainvoke(turn.messages, config, ctx)
        if got.stop is not None:
            return _stopped(got, turn)
        update = finish(got, state, runtime, turn)
        if isinstance(update, dict):
            return update
        note = wrap_up_note(update)
        final = await turn.models.plain.ainvoke([*turn.messages, note], config, ctx)
        return wrapped_up(got, final, update, turn)

    def invoke(
        state: AgentState, config: RunnableConfig, runtime: Runtime[RunContext]
    ) -> dict[str, Any]:
        turn = prepare(state, runtime)
        if turn.messages is None:
            return {"outcome": turn.stop or outcome.failed("no messages to send")}
        if standing is not None and "clock" in turn.extra:  # a new task: the user's approvals
            turn.extra.update(standing.for_task(context_of(runtime), state))
        return answer(turn, state, config, runtime)

    async def ainvoke(
        state: AgentState, config: RunnableConfig, runtime: Runtime[RunContext]
    ) -> dict[str, Any]:
        turn = prepare(state, runtime)
        if turn.messages is None:
            return {"outcome": turn.stop or outcome.failed("no messages to send")}
        if standing is not None and "clock" in turn.extra:  # a new task: the user's approvals
            turn.extra.update(await standing.afor_task(context_of(runtime), state))
        return await aanswer(turn, state, config, runtime)

    return make_node(name, invoke, ainvoke)


def _over(budget: Budget | None, state: AgentState, usage: Usage) -> bool:
    """Whether the run's budget is spent once `usage` is added (no wrap-up turn then)."""
    if budget is None:
        return False
    total = add_usage(run_usage(state.get("usage"), state.get("clock")), usage)
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


def _stopped(got: ModelAnswer, turn: _Turn) -> dict[str, Any]:
    """The update of a turn whose model call was refused or failed (its usage still counts)."""
    assert got.stop is not None
    update: dict[str, Any] = {**turn.extra, "outcome": got.stop}
    if got.usage:
        update["usage"] = got.usage
    return update


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
