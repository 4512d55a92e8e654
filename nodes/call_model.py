"""`call_model`: one model turn, with usage and cost accounting, checks and retries inside.

Checks that only allow or stop (budgets, rate limits, breakers, the step limit) run inside this
node, so protection adds no superstep. A model failure, after retries, ends the run with an
outcome instead of an exception.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Unpack

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    SystemMessage,
)
from langchain_core.runnables import RunnableConfig
from langgraph.runtime import Runtime

from keel import outcome
from keel._drive import Op, Steps
from keel._node import RunnableCallable, context_of, steps_node, thread_of
from keel.approvals import decided
from keel.guards.agent_guards import AgentGuards, GuardOptions
from keel.guards.budget import check_budget, outer_exceeded, wall_deadline
from keel.guards.content import OutputGuardPolicy
from keel.guards.loop import call_sequence, detect_loop, loop_window, wrap_up_note
from keel.guards.model_call import DEFAULT_MODEL_RETRY, GuardedModel, ModelAnswer, unstreamed
from keel.guards.policy import Budget, LoopPolicy
from keel.guards.screening import checked_answer
from keel.history import invalid_call_answers, malformed_stop, valid_history
from keel.nodes.plan import advance_plan, render_plan
from keel.redact import sanitized_logger
from keel.state import (
    AgentState,
    Outcome,
    RunContext,
    Usage,
    add_usage,
    run_usage,
    task_clock,
    task_reset,
)
from keel.tools._args import approval_digests, json_args, unique_ids
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
    until: float | None = None
    """When the run's (or an outer run's) `wall_seconds` limit is reached (`wall_deadline`)."""


def call_model(
    model: str | BaseChatModel,
    tools: ToolRegistry | None = None,
    *,
    system_prompt: str | None = None,
    before_model: Sequence[BeforeModel] = (),
    guards: AgentGuards | None = None,
    fallbacks: Sequence[str | BaseChatModel] = (),
    downgrade: str | BaseChatModel | None = None,
    reserve_steps: int = 2,
    name: str = "call_model",
    **options: Unpack[GuardOptions],
) -> RunnableCallable:
    """A node that calls the model once and records the answer, tokens and dollars.

    Args:
        model: A chat model or a `provider:name` string.
        tools: The tools to bind; their calls are checked against the gate to flag approvals.
        system_prompt: Sent first on every call (with the plan, when there is one).
        before_model: Checks run before each call; one returning an `Outcome` stops the run.
        guards: What the agent is held to (`AgentGuards.from_policy(policy, ledger)`): the
            run budget (stop, or a soft-threshold warning), the period budgets (each call's
            estimate reserved, the answer capped at the reserve), rate limits and breaker,
            retries and deadline, prices, the loop guard, the gate and standing approvals.
            With `guards.gated` a `tool_gate` node after this one decides about tool calls;
            else a call the gate says to `ask` about sets the outcome to `interrupted`, so the
            graph routes to `human_review`.
        fallbacks: Models to try in order when the model is down (5xx, connection errors,
            still rate limited after retries, open breaker); see `keel.guards.fallback`.
        downgrade: A cheaper model used instead of `model` once the run budget is past its
            soft threshold (model tiering; off when `None`). Its fallbacks are `fallbacks`.
        reserve_steps: Stop cleanly when fewer LangGraph steps than this remain, instead of
            raising `GraphRecursionError`.
        name: The node's name.
        **options: Single guards instead of (or over) `guards`: `prices`, `gate` (`None`: a
            `tool_gate` node decides), `retry`, `budget`, `loop`, `meter`, `guard`, `timeout`,
            `standing`, `grants`, `policy_version`, `policy_name` (see `AgentGuards.of`).

    Every call goes through a `keel.guards.GuardedModel`: period budget reservation, breaker
    and rate limits, deadline, usage accounting and fallbacks.
    """
    held = AgentGuards.of(guards, **options)
    registry = tools or ToolRegistry()
    turn = _TurnMaker(held, registry, tuple(before_model), system_prompt, reserve_steps)
    chain, cheaper = turn.models(model, fallbacks), None
    if downgrade is not None:
        cheaper = turn.models(downgrade, fallbacks)
    answer = _Answerer(held, registry)

    def steps(
        state: AgentState, config: RunnableConfig, runtime: Runtime[RunContext]
    ) -> Steps[dict[str, Any]]:
        prepared = turn.prepare(state, runtime, chain, cheaper)
        if prepared.messages is None:
            return {"outcome": prepared.stop or outcome.failed("no messages to send")}
        standing = held.standing
        if standing is not None and "clock" in prepared.extra:  # a new task: user approvals
            ctx = context_of(runtime)
            found = yield Op(
                lambda: standing.for_task(ctx, state), lambda: standing.afor_task(ctx, state)
            )
            prepared.extra.update(found)
        return (yield from answer.steps(prepared, state, config, runtime))

    return steps_node(name, steps)


@dataclass(frozen=True, slots=True)
class _TurnMaker:
    """Decides what a turn sends, or why it sends nothing (limits, budget, checks)."""

    guards: AgentGuards
    registry: ToolRegistry
    checks: tuple[BeforeModel, ...]
    system_prompt: str | None
    reserve_steps: int

    def models(
        self, first: str | BaseChatModel, fallbacks: Sequence[str | BaseChatModel]
    ) -> _Models:
        chain, guards = [first, *fallbacks], self.guards.model
        bound = GuardedModel(chain, tools=self.registry.tools, guards=guards, steps=True)
        return _Models(bound, GuardedModel(chain, guards=guards, steps=True))

    def prepare(
        self,
        state: AgentState,
        runtime: Runtime[RunContext] | None,
        chain: _Models,
        cheaper: _Models | None,
    ) -> _Turn:
        remaining = state.get("remaining_steps")
        if remaining is not None and remaining <= self.reserve_steps:
            return _Turn(None, outcome.step_limit())
        extra: dict[str, Any] = {}
        history = state.get("messages") or []
        clock = task_clock(state, time.time()) or dict(state.get("clock") or {})
        if clock.get("answered") != clock.get("task"):  # the model's first turn in a new task
            clock["answered"] = clock.get("task", 0.0)
            extra["clock"] = clock  # (the planner may have started the clock already)
            extra.update(task_reset(state))  # an earlier task's verdicts are not this one's
        models = chain
        budget = self.guards.budget
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
        over = outer_exceeded(run_usage(state.get("usage"), clock))
        if over is not None:  # a supervisor's run budget, held inside its agent too
            return _Turn(None, outcome.stopped("budget_exceeded", over))
        context = context_of(runtime)
        for check in self.checks:
            try:
                stop = check(state, context)
            except Exception as exc:  # your code: the run ends with an outcome that names it
                name = getattr(check, "__name__", type(check).__name__)
                log.exception("the before_model check %s raised", name)
                stop = outcome.failed(
                    f"the before_model check {name} raised {type(exc).__name__}: {exc}"
                )
            if stop is not None:
                return _Turn(None, stop)
        system = _system_text(self.system_prompt, state)
        if system:  # valid_history merges it with any system message already in the history
            history = [SystemMessage(content=system), *history]
        until = wall_deadline(budget, clock.get("started_at"))
        return _Turn(valid_history(history), None, extra, models, until)


@dataclass(frozen=True, slots=True)
class _Answerer:
    """Asks the model and turns its answer into the state update (loop guard, approvals)."""

    guards: AgentGuards
    registry: ToolRegistry

    @property
    def loop(self) -> LoopPolicy | None:
        """The loop guard this node applies: `wrap_up` always, `stop` without a tool_gate."""
        loop = self.guards.loop
        if loop is None or (self.guards.gated and loop.on_loop != "wrap_up"):
            return None
        return loop

    def steps(
        self,
        turn: _Turn,
        state: AgentState,
        config: RunnableConfig,
        runtime: Runtime[RunContext],
    ) -> Steps[dict[str, Any]]:
        assert turn.messages is not None and turn.models is not None
        ctx = context_of(runtime)
        if self.guards.output_guard is not None:
            config = unstreamed(config)  # the checked answer goes out whole
        got = yield from turn.models.bound.call(turn.messages, config, ctx, None, until=turn.until)
        if got.stop is not None:
            return _stopped(got, turn)
        update = self.finish(got, state, runtime, turn)
        if isinstance(update, dict):
            return update
        note = wrap_up_note(update)
        # `plain` binds no tools: it sends the tool turns as text (Anthropic's rule)
        final = yield from turn.models.plain.call(
            [*turn.messages, note], config, ctx, None, until=turn.until
        )
        return _wrapped_up(got, final, update, turn, self.guards.output_guard)

    def finish(
        self, got: ModelAnswer, state: AgentState, runtime: Runtime[RunContext] | None, turn: _Turn
    ) -> dict[str, Any] | str:
        """The state update for the answer, or the loop's reason when a wrap-up turn is due."""
        assert got.message is not None
        response, usage = unique_ids(got.message, state.get("messages") or []), got.usage
        response = json_args(response)
        update: dict[str, Any] = {"messages": [response], "usage": usage, **turn.extra}
        noted = state.get("warnings") or []
        if any(w not in noted for w in got.warnings):  # what the period budgets held loosely
            update["warnings"] = [*noted, *(w for w in got.warnings if w not in noted)]
        if response.invalid_tool_calls:
            update["messages"].extend(invalid_call_answers(response))
            if not response.tool_calls:
                misbehaving = _misbehaving(state, turn)
                if misbehaving is not None or state.get("outcome") is not None:
                    update["outcome"] = misbehaving
                return update
        if not response.tool_calls:
            answer, update["outcome"] = checked_answer(
                response, self.guards.output_guard, outcome.completed()
            )
            update["messages"] = [answer]
            steps = state.get("plan")
            if steps and any(s["status"] == "in_progress" for s in steps):
                update["plan"] = advance_plan(steps, succeeded=True)
            return update
        loop = self.loop
        looping = None
        if loop is not None:
            calls = call_sequence(
                state.get("messages") or [], response, self.registry.get, last=loop_window(loop)
            )
            looping = detect_loop(calls, loop)
        if looping is not None and loop is not None:
            if loop.on_loop == "wrap_up" and not _over(self.guards.budget, state, usage):
                return looping
            update["outcome"] = outcome.stopped("loop_detected", looping)
        elif ask := self.approval_needed(response, state, runtime, turn):
            update["outcome"] = outcome.interrupted(ask)
        elif state.get("outcome") is not None:
            update["outcome"] = None  # a checkpoint write only when it changes
        return update

    def approval_needed(
        self,
        response: AIMessage,
        state: AgentState,
        runtime: Runtime[RunContext] | None,
        turn: _Turn,
    ) -> str | None:
        """Without a tool_gate node: why the turn waits for a human, if it does."""
        if self.guards.gated:
            return None
        ctx = context_of(runtime)
        approvals = self.guards.trusted(
            thread_of(runtime), ctx, state.get("approvals"), turn.extra.get("approvals")
        )
        decide, policy = self.guards.deciding(approvals, ctx), self.guards.policy_id(ctx)
        reasons = []
        for tc in response.tool_calls:
            entry = self.registry.get(tc["name"])
            if entry is None or decide(entry, tc["args"], ctx).action != "ask":
                continue
            # a call a human rejected earlier on the thread is not asked about again
            digests = approval_digests(entry, tc["args"], policy)
            if not decided(approvals, digests, tc.get("id") or ""):
                reasons.append(tc["name"])
        return f"awaiting approval for {', '.join(reasons)}" if reasons else None


def _wrapped_up(
    first: ModelAnswer,
    final: ModelAnswer,
    reason: str,
    turn: _Turn,
    policy: OutputGuardPolicy | None,
) -> dict[str, Any]:
    """The update after a loop's wrap-up turn: only the tool-free answer is kept."""
    usage = add_usage(first.usage, final.usage)
    if final.stop is not None:
        return {**turn.extra, "usage": usage, "outcome": final.stop}
    assert final.message is not None
    stop = outcome.stopped("loop_detected", f"{reason}; answered without tools")
    message = final.message
    if message.invalid_tool_calls:  # told to call no tool; kept, nothing would answer these
        message = message.model_copy(update={"invalid_tool_calls": []})
    answer, result = checked_answer(message, policy, stop)
    return {**turn.extra, "messages": [answer], "usage": usage, "outcome": result}


def _over(budget: Budget | None, state: AgentState, usage: Usage) -> bool:
    """Whether the run's budget is spent once `usage` is added (no wrap-up turn then)."""
    if budget is None:
        return False
    total = add_usage(run_usage(state.get("usage"), state.get("clock")), usage)
    return check_budget(budget, total).exceeded is not None


def _misbehaving(state: AgentState, turn: _Turn) -> Outcome | None:
    """The run's end when this turn makes `MALFORMED_TURNS` of only malformed tool calls."""
    name = turn.models.bound.name if turn.models is not None else "the model"
    stop = malformed_stop(state.get("messages") or [], name)
    if stop is not None:
        log.warning("%s", stop["detail"])
    return stop


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
