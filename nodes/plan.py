"""`plan`: a structured plan from the model, with step status, and a new plan after a failure."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage
from langchain_core.runnables import RunnableConfig
from langgraph.runtime import Runtime
from pydantic import BaseModel, Field

from keel._drive import Steps
from keel._node import RunnableCallable, context_of, steps_node
from keel.guards.agent_guards import AgentGuards, model_guards
from keel.guards.model_call import GuardedModel, ModelAnswer, ModelCallGuards
from keel.history import earlier_turns, valid_history
from keel.pricing import PriceTable
from keel.redact import sanitized_logger
from keel.state import AgentState, PlanStep, RunContext, Usage, run_usage, task_clock, task_start

__all__ = ["Plan", "advance_plan", "needs_replan", "plan", "render_plan"]

log = sanitized_logger("keel.nodes.plan")

PLAN_PROMPT = (
    "Before acting, write a short plan for the task below: at most {max_steps} concrete steps, "
    "each one tool call or one answer. Do not carry out the steps."
)
TOOLS_PROMPT = (
    "The tools you can use:\n{tools}\nName the tool each step uses (e.g. 'Call lookup_order "
    "for order A1'); the last step answers the user. Do not guess a value a tool has not "
    "returned yet: write 'the order's total', not a number."
)
REPLAN_PROMPT = (
    "A step of your plan failed: {failure}. Write a new plan for what remains of the task "
    "(at most {max_steps} steps). Steps already done: {done}."
)


class Plan(BaseModel):
    """A plan: the steps to carry out the task, in order."""

    steps: list[str] = Field(description="The steps, in order, each a short imperative sentence.")


def plan(
    model: str | BaseChatModel,
    *,
    max_steps: int = 7,
    prices: PriceTable | None = None,
    fallbacks: Sequence[str | BaseChatModel] = (),
    guards: AgentGuards | ModelCallGuards | None = None,
    tools: Sequence[Any] = (),
    system_prompt: str | None = None,
    name: str = "plan",
) -> RunnableCallable:
    """A node that asks the model for a `Plan` and stores it as steps with a status.

    The planner sees the agent's `system_prompt` and the `tools` it may use (name and
    description), so that its steps are calls the agent can make: a small model that is told
    neither plans in the abstract ("check the damage") and then answers without a tool.

    It plans once at the start of each task (a thread's next user message is a new task,
    planned afresh, with the conversation before it as context); when `execute_tools` marks a
    step `failed`, it plans again for what remains. Planning is advisory: if the model cannot
    produce a plan, the run goes on without one. The planner's call is guarded and counted as
    every model call is (`keel.guards.GuardedModel` with `guards`, falling back along
    `fallbacks`); a budget that refuses it, or a ledger that fails, ends the run with that
    outcome. `prices` is used when `guards` is not given.
    """
    guards = model_guards(guards) or ModelCallGuards(prices=prices)
    planner = GuardedModel([model, *fallbacks], schema=Plan, guards=guards)
    before = [system_prompt] if system_prompt else []
    after = [TOOLS_PROMPT.format(tools="\n".join(_describe(t) for t in tools))] if tools else []

    def prompt(state: AgentState, new_task: bool) -> list[BaseMessage] | None:
        steps = [] if new_task else state.get("plan") or []
        if steps and not needs_replan(steps):
            return None
        messages = list(state.get("messages") or [])
        if not steps:
            instruction = PLAN_PROMPT.format(max_steps=max_steps)
        else:
            failed = next(s for s in steps if s["status"] == "failed")
            done = [s["description"] for s in steps if s["status"] == "done"] or "none"
            instruction = REPLAN_PROMPT.format(
                failure=failed["description"], max_steps=max_steps, done=done
            )
        system = "\n\n".join([*before, instruction, *after])
        if steps:  # the whole history, repaired as the agent's own turns send it
            return valid_history([SystemMessage(content=system), *messages])
        return [SystemMessage(content=system), *_task(messages)]

    def finish(got: ModelAnswer, state: AgentState, new_task: bool) -> dict[str, Any]:
        update: dict[str, Any] = {"usage": got.usage} if got.usage else {}
        if got.stop is not None and got.error is None:  # refused by a budget, or no ledger
            return {**update, "outcome": got.stop}
        if state.get("outcome") is not None:
            update["outcome"] = None  # a new task: the last one's outcome no longer holds
        if got.error is not None:
            log.warning("planning failed, going on without a plan: %r", got.error)
            plan = [] if new_task else _without_failed(state)
            return {**update, "plan": plan, **_warned(state, new_task, "failed", got.error)}
        raw: dict[str, Any] = got.output
        parsed = raw.get("parsed")
        if isinstance(parsed, Plan) and parsed.steps:
            earlier = [] if new_task else state.get("plan") or []
            done = [s for s in earlier if s["status"] == "done"]
            steps = [s.strip() for s in parsed.steps[:max_steps] if s.strip()]
            update["plan"] = _steps(done, steps)
        elif raw.get("parsing_error") is not None:
            log.warning("the model's plan did not parse: %s", raw["parsing_error"])
            return {**update, **_warned(state, new_task, "did not parse", raw["parsing_error"])}
        return {**update, **_warned(state, new_task)}

    def steps(
        state: AgentState, config: RunnableConfig, runtime: Runtime[RunContext]
    ) -> Steps[dict[str, Any]]:
        clock, usage = _clock(state)
        new_task = bool(clock)  # a task the run clock has not seen: planned afresh
        messages = prompt(state, new_task)
        if messages is None:
            return {}
        run_clock = clock.get("clock") or state.get("clock")
        got = yield from planner.call(messages, config, context_of(runtime), usage, clock=run_clock)
        return {**finish(got, state, new_task), **clock}

    return steps_node(name, steps)


_WARNING = "plan: "


def _warned(
    state: AgentState, new_task: bool, what: str | None = None, exc: object = None
) -> dict[str, Any]:
    """`state["warnings"]` with planning's own (as an update; `{}` when unchanged).

    A plan that failed degrades the run (its run record says so), and a new task's planning
    clears an earlier task's plan warning.
    """
    warnings = state.get("warnings") or []
    kept = [w for w in warnings if not (new_task and w.startswith(_WARNING))]
    if what is not None:
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        kept.append(f"{_WARNING}planning {what}, the run went on without a plan ({reason})")
    return {"warnings": kept} if kept != warnings else {}


def _task(messages: Sequence[BaseMessage]) -> list[BaseMessage]:
    """What a new plan is made for: the current task, after the conversation that led to it."""
    start = task_start(messages)
    if start < 0:
        first: list[BaseMessage] = [m for m in messages if isinstance(m, HumanMessage)]
        return first[:1]
    return [*earlier_turns(messages[:start]), messages[start]]


def _describe(tool: Any) -> str:
    name = getattr(tool, "name", None) or getattr(tool, "__name__", str(tool))
    about = (getattr(tool, "description", None) or getattr(tool, "__doc__", None) or "").strip()
    return f"- {name}: {about.splitlines()[0]}" if about else f"- {name}"


def _steps(done: list[PlanStep], descriptions: list[str]) -> list[PlanStep]:
    steps: list[PlanStep] = [dict(s) for s in done]  # type: ignore[misc]
    for i, text in enumerate(descriptions):
        steps.append(
            {
                "id": len(steps) + 1,
                "description": text,
                "status": "in_progress" if i == 0 else "pending",
            }
        )
    return steps


def _without_failed(state: AgentState) -> list[PlanStep]:
    return [s for s in state.get("plan") or [] if s["status"] != "failed"]


def needs_replan(steps: list[PlanStep]) -> bool:
    """Whether a step failed, so the plan must be redone."""
    return any(s["status"] == "failed" for s in steps)


def advance_plan(steps: list[PlanStep], *, succeeded: bool) -> list[PlanStep]:
    """The plan after one round of tool calls: the current step is done (or failed)."""
    out: list[PlanStep] = [dict(s) for s in steps]  # type: ignore[misc]
    current = next((s for s in out if s["status"] == "in_progress"), None)
    if current is None:
        return out
    current["status"] = "done" if succeeded else "failed"
    if succeeded:
        following = next((s for s in out if s["status"] == "pending"), None)
        if following is not None:
            following["status"] = "in_progress"
    return out


def render_plan(steps: list[PlanStep]) -> str:
    """The plan as text for the model's system prompt."""
    marks = {"pending": "[ ]", "in_progress": "[>]", "done": "[x]", "failed": "[!]"}
    lines = [f"{marks[s['status']]} {s['id']}. {s['description']}" for s in steps]
    return "Your plan ([>] is the current step; do that step now):\n" + "\n".join(lines)


def _clock(state: AgentState) -> tuple[dict[str, Any], Usage]:
    """(`{"clock": ...}` when planning starts a new task, else `{}`; the run's usage so far).

    The planner is the task's first model call, so it starts the run clock: its usage then
    counts towards the run budget (`call_model` keeps the clock).
    """
    clock = task_clock(state, time.time())
    usage = run_usage(state.get("usage"), clock if clock is not None else state.get("clock"))
    return ({"clock": clock} if clock is not None else {}), usage
