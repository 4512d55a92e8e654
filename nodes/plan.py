"""`plan`: a structured plan from the model, with step status, and a new plan after a failure."""

from __future__ import annotations

from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage
from langchain_core.runnables import RunnableConfig
from langgraph.errors import GraphBubbleUp
from pydantic import BaseModel, Field

from keel._node import RunnableCallable, make_node
from keel.models import model_name_of, resolve_model
from keel.pricing import PriceTable
from keel.redact import sanitized_logger
from keel.state import AgentState, PlanStep, Usage

__all__ = ["Plan", "advance_plan", "needs_replan", "plan", "render_plan"]

log = sanitized_logger("keel.nodes.plan")

PLAN_PROMPT = (
    "Before acting, write a short plan for the task below: at most {max_steps} concrete steps, "
    "each one tool call or one answer. Do not carry out the steps."
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
    name: str = "plan",
) -> RunnableCallable:
    """A node that asks the model for a `Plan` and stores it as steps with a status.

    It plans once at the start; when `execute_tools` marks a step `failed`, it plans again for
    what remains. Planning is advisory: if the model cannot produce a plan, the run goes on
    without one.
    """
    chat = resolve_model(model)
    planner = chat.with_structured_output(Plan, include_raw=True)
    table = prices or PriceTable()
    default_name = model_name_of(chat)

    def prompt(state: AgentState) -> list[BaseMessage] | None:
        steps = state.get("plan") or []
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
        task = [m for m in messages if isinstance(m, HumanMessage)]
        return [SystemMessage(content=instruction), *(task[:1] if not steps else messages)]

    def finish(raw: dict[str, Any], state: AgentState) -> dict[str, Any]:
        parsed = raw.get("parsed")
        message = raw.get("raw")
        update: dict[str, Any] = {}
        meta = getattr(message, "usage_metadata", None)
        if meta:
            usage: Usage = {
                "input_tokens": int(meta.get("input_tokens", 0)),
                "output_tokens": int(meta.get("output_tokens", 0)),
                "usd": table.cost(default_name, meta),
                "model_calls": 1,
            }
            update["usage"] = usage
        if isinstance(parsed, Plan) and parsed.steps:
            done = [s for s in state.get("plan") or [] if s["status"] == "done"]
            steps = [s.strip() for s in parsed.steps[:max_steps] if s.strip()]
            update["plan"] = _steps(done, steps)
        elif raw.get("parsing_error") is not None:
            log.warning("the model's plan did not parse: %s", raw["parsing_error"])
        return update

    def invoke(state: AgentState, config: RunnableConfig) -> dict[str, Any]:
        messages = prompt(state)
        if messages is None:
            return {}
        try:
            return finish(planner.invoke(messages, config), state)  # type: ignore[arg-type]
        except GraphBubbleUp:
            raise
        except Exception as exc:
            log.warning("planning failed, going on without a plan: %r", exc)
            return {"plan": _without_failed(state)}

    async def ainvoke(state: AgentState, config: RunnableConfig) -> dict[str, Any]:
        messages = prompt(state)
        if messages is None:
            return {}
        try:
            return finish(await planner.ainvoke(messages, config), state)  # type: ignore[arg-type]
        except GraphBubbleUp:
            raise
        except Exception as exc:
            log.warning("planning failed, going on without a plan: %r", exc)
            return {"plan": _without_failed(state)}

    return make_node(name, invoke, ainvoke)


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
    return "Your plan ([>] is the current step):\n" + "\n".join(lines)
