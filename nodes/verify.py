"""`verify`: check a final answer with rules and, optionally, a model judge.

A failed check sends the answer back to the model with the reason (up to `max_revisions`
times); after that the run ends as `verification_failed`, or, with `escalate=True`, a human
decides (approve the answer, reject it, or respond with guidance for another try).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.runnables import RunnableConfig
from langgraph.errors import GraphBubbleUp
from langgraph.types import interrupt
from pydantic import BaseModel, Field

from keel import outcome
from keel._node import RunnableCallable, make_node
from keel.errors import UserError
from keel.models import resolve_model
from keel.redact import sanitized_logger
from keel.state import AgentState, Verdict

__all__ = ["Check", "JudgeVerdict", "verify"]

log = sanitized_logger("keel.nodes.verify")

Check = Callable[[str, AgentState], str | None]
"""A rule: given the answer and the state, return why it fails, or `None` when it passes."""

JUDGE_PROMPT = (
    "You check an assistant's final answer. Pass it if it answers the user's task correctly "
    "and completely, using only what the conversation supports. Otherwise fail it and say what "
    "is wrong in one sentence."
)


class JudgeVerdict(BaseModel):
    """The judge's decision on an answer."""

    passed: bool = Field(description="Whether the answer is acceptable.")
    reason: str = Field(description="Why, in one sentence.")


def verify(
    *,
    checks: Sequence[Check] = (),
    judge: str | BaseChatModel | None = None,
    max_revisions: int = 1,
    escalate: bool = False,
    name: str = "verify",
) -> RunnableCallable:
    """A node that verifies the last AI answer.

    Args:
        checks: Rules run in order; the first failure is the reason.
        judge: A model asked for a `JudgeVerdict` when the rules pass.
        max_revisions: How many times a failed answer goes back to the model.
        escalate: Ask a human when the revisions are used up, instead of ending the run.
        name: The node's name.
    """
    if max_revisions < 0:
        raise UserError(f"verify(max_revisions=...) must be 0 or more, got {max_revisions}.")
    rules = tuple(checks)
    judge_model = (
        resolve_model(judge).with_structured_output(JudgeVerdict) if judge is not None else None
    )

    def by_rules(state: AgentState) -> tuple[str, Verdict | None]:
        answer = _answer(state)
        for rule in rules:
            reason = rule(answer, state)
            if reason:
                return answer, {"passed": False, "reason": reason, "source": _name(rule)}
        return answer, None

    def judge_prompt(state: AgentState, answer: str) -> list[BaseMessage]:
        task = next((m for m in state.get("messages") or [] if isinstance(m, HumanMessage)), None)
        task_text = str(task.content) if task is not None else "(no task)"
        return [
            SystemMessage(content=JUDGE_PROMPT),
            HumanMessage(content=f"Task:\n{task_text}\n\nAnswer:\n{answer}"),
        ]

    def decide(state: AgentState, answer: str, verdict: Verdict | None) -> dict[str, Any]:
        verdicts = [*(state.get("verdicts") or [])]
        if verdict is None:
            verdict = {"passed": True, "reason": "all checks passed", "source": "rules"}
        verdicts.append(verdict)
        if verdict["passed"]:
            return {"verdicts": verdicts, "outcome": outcome.completed("answer verified")}
        revisions = state.get("revisions") or 0
        if revisions < max_revisions:
            feedback = HumanMessage(
                content=f"Your answer did not pass verification: {verdict['reason']} "
                "Revise your answer.",
                additional_kwargs={"keel_verification": True},
            )
            return {
                "verdicts": verdicts,
                "revisions": revisions + 1,
                "outcome": None,
                "messages": [feedback],
            }
        if escalate:
            return _escalate(answer, verdict, verdicts, revisions)
        return {
            "verdicts": verdicts,
            "outcome": outcome.stopped("verification_failed", verdict["reason"]),
        }

    def run(state: AgentState, config: RunnableConfig) -> dict[str, Any]:
        answer, verdict = by_rules(state)
        if verdict is None and judge_model is not None:
            try:
                judged = judge_model.invoke(judge_prompt(state, answer), config)
                verdict = _judged(judged)
            except GraphBubbleUp:
                raise
            except Exception as exc:
                verdict = _judge_failed(exc)
        return decide(state, answer, verdict)

    async def arun(state: AgentState, config: RunnableConfig) -> dict[str, Any]:
        answer, verdict = by_rules(state)
        if verdict is None and judge_model is not None:
            try:
                judged = await judge_model.ainvoke(judge_prompt(state, answer), config)
                verdict = _judged(judged)
            except GraphBubbleUp:
                raise
            except Exception as exc:
                verdict = _judge_failed(exc)
        return decide(state, answer, verdict)

    return make_node(name, run, arun)


def _escalate(
    answer: str, verdict: Verdict, verdicts: list[Verdict], revisions: int
) -> dict[str, Any]:
    decision = interrupt(
        {
            "type": "verification",
            "description": f"The answer failed verification: {verdict['reason']}",
            "answer": answer,
            "config": {"allow_accept": True, "allow_respond": True, "allow_ignore": True},
        }
    )
    kind = decision.get("type") if isinstance(decision, dict) else decision
    if kind in ("approve", "accept"):
        verdicts.append({"passed": True, "reason": "approved by a human", "source": "human"})
        return {"verdicts": verdicts, "outcome": outcome.completed("answer approved by a human")}
    if kind in ("respond", "response") and isinstance(decision, dict):
        text = decision.get("message") or decision.get("args")
        if isinstance(text, str):
            return {
                "verdicts": verdicts,
                "revisions": revisions + 1,
                "outcome": None,
                "messages": [HumanMessage(content=text)],
            }
    if kind in ("reject", "ignore"):
        return {
            "verdicts": verdicts,
            "outcome": outcome.stopped("verification_failed", verdict["reason"]),
        }
    raise UserError(
        f"Unknown verification decision {decision!r}: resume with {{'type': 'approve'}}, "
        "{'type': 'reject'} or {'type': 'respond', 'message': '...'}."
    )


def _answer(state: AgentState) -> str:
    for message in reversed(state.get("messages") or []):
        if isinstance(message, AIMessage):
            return message.text
    return ""


def _judged(result: Any) -> Verdict:
    judged = result if isinstance(result, JudgeVerdict) else JudgeVerdict.model_validate(result)
    return {"passed": judged.passed, "reason": judged.reason, "source": "judge"}


def _judge_failed(exc: Exception) -> Verdict:
    log.warning("the judge failed: %r", exc)
    return {
        "passed": False,
        "reason": f"the judge failed: {type(exc).__name__}: {exc}",
        "source": "judge",
    }


def _name(rule: Check) -> str:
    return getattr(rule, "__name__", type(rule).__name__)
