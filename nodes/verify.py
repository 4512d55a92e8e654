"""`verify`: check a final answer with rules and, optionally, a model judge.

A failed check sends the answer back to the model with the reason (up to `max_revisions`
times); after that the run ends as `verification_failed`, or, with `escalate=True`, a human
decides (approve the answer, reject it, or respond with guidance for another try).

An escalation takes two steps of `verify`: the first records the failed verdict (and the
judge's usage) with the outcome `interrupted/awaiting_approval`, and `route_after_verify` sends
the run back to `verify`, which asks the human. So the run's state says it waits for a human
while it does, and a resume asks the human's answer without checking (or paying the judge)
again. A graph of your own routes an `interrupted` outcome from `verify` back to `verify`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
    convert_to_messages,
)
from langchain_core.runnables import RunnableConfig
from langgraph.runtime import Runtime
from langgraph.types import interrupt
from pydantic import BaseModel, Field

from keel import outcome
from keel._drive import Steps
from keel._node import RunnableCallable, context_of, steps_node
from keel.errors import ModelBehaviorError, UserError
from keel.guards.agent_guards import AgentGuards, model_guards
from keel.guards.model_call import GuardedModel, ModelAnswer, ModelCallGuards
from keel.history import earlier_turns
from keel.redact import sanitized_logger
from keel.state import VERIFICATION_KEY, AgentState, RunContext, Verdict, run_usage, task_start

__all__ = ["Check", "JudgeVerdict", "verify"]

log = sanitized_logger("keel.nodes.verify")

Check = Callable[[str, AgentState], str | None]
"""A rule: given the answer and the state, return why it fails, or `None` when it passes."""

JUDGE_PROMPT = (
    "You check an assistant's final answer to a user's task. Pass it if it answers the task "
    "truthfully: what it says was done or found must match what the tools returned (saying "
    "that an action was refused or not done is a truthful answer). Fail it if it claims "
    "something the tool results do not show, or ignores the task; say what is wrong in one "
    "sentence."
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
    guards: AgentGuards | ModelCallGuards | None = None,
    name: str = "verify",
) -> RunnableCallable:
    """A node that verifies the last AI answer.

    The judge's call is guarded and counted as every model call is (`keel.guards.GuardedModel`):
    its tokens and dollars join the run's `usage` and the period budgets; a run budget or a
    period budget that refuses it stops the run as `budget_exceeded`, a ledger that fails ends
    it as `error`; a judge that fails (after retries, or with its breaker open) fails the
    answer with the reason.

    Args:
        checks: Rules run in order; the first failure is the reason.
        judge: A model asked for a `JudgeVerdict` when the rules pass.
        max_revisions: How many times a failed answer goes back to the model.
        escalate: Ask a human when the revisions are used up, instead of ending the run.
        guards: What the judge's calls are held to (budgets, rate limits, breaker, retries,
            deadline) and priced by.
        name: The node's name.
    """
    if max_revisions < 0:
        raise UserError(f"verify(max_revisions=...) must be 0 or more, got {max_revisions}.")
    rules = tuple(checks)
    judge_model = (
        GuardedModel([judge], schema=JudgeVerdict, guards=model_guards(guards))
        if judge is not None
        else None
    )

    def decide(state: AgentState, answer: str, verdict: Verdict | None) -> dict[str, Any]:
        verdicts = [*(state.get("verdicts") or [])]
        if verdict is None:
            verdict = {"passed": True, "reason": "all checks passed", "source": "rules"}
        verdicts.append(verdict)
        if verdict["passed"]:
            return {"verdicts": verdicts, "outcome": outcome.completed("answer verified")}
        revisions = _revisions(state)
        if revisions < max_revisions:
            feedback = HumanMessage(
                content=f"Your answer did not pass verification: {verdict['reason']} "
                "Revise your answer.",
                additional_kwargs={VERIFICATION_KEY: True},
            )
            return {
                "verdicts": verdicts,
                "revisions": revisions + 1,
                "outcome": None,
                "messages": [feedback],
            }
        if escalate:
            waiting = f"awaiting a human: the answer failed verification: {verdict['reason']}"
            return {"verdicts": verdicts, "outcome": outcome.interrupted(waiting)}
        return {
            "verdicts": verdicts,
            "outcome": outcome.stopped("verification_failed", verdict["reason"]),
        }

    def judged(state: AgentState, answer: str, got: ModelAnswer) -> dict[str, Any]:
        update: dict[str, Any] = {"usage": got.usage} if got.usage else {}
        if got.stop is not None and got.error is None:  # refused by a budget, or no ledger
            return {**update, "outcome": got.stop}
        verdict = _judge_failed(got.error) if got.error is not None else _judged(got.output)
        return {**update, **decide(state, answer, verdict)}

    def steps(
        state: AgentState, config: RunnableConfig, runtime: Runtime[RunContext]
    ) -> Steps[dict[str, Any]]:
        if escalate and _escalating(state):
            return _escalate(state)
        try:
            answer, verdict = _by_rules(rules, state)
        except _CheckRaised as raised:
            return {"outcome": outcome.failed(str(raised))}
        if verdict is not None or judge_model is None:
            return decide(state, answer, verdict)
        ctx, usage = context_of(runtime), run_usage(state.get("usage"), state.get("clock"))
        prompt = convert_to_messages(_judge_prompt(state, answer))
        got = yield from judge_model.call(prompt, config, ctx, usage, clock=state.get("clock"))
        return judged(state, answer, got)

    return steps_node(name, steps)


def _by_rules(rules: Sequence[Check], state: AgentState) -> tuple[str, Verdict | None]:
    """The answer, and the first rule's failure (`None`: every rule passed)."""
    answer = _answer(state)
    for rule in rules:
        try:
            reason = rule(answer, state)
        except Exception as exc:  # your code: the run ends with an outcome that names it
            log.exception("the check %s raised", _name(rule))
            raise _CheckRaised(_name(rule), exc) from exc
        if reason:
            return answer, {"passed": False, "reason": reason, "source": _name(rule)}
    return answer, None


def _judge_prompt(state: AgentState, answer: str) -> list[BaseMessage]:
    """The judge's prompt: the current task, what its tools returned, the answer.

    A thread's earlier tasks are context (their tool results are not shown).
    """
    messages = list(state.get("messages") or [])
    start = task_start(messages)
    task_text = messages[start].text if start >= 0 else "(no task)"
    results = [
        f"- {m.name or 'tool'}: {_line(m.text)}"
        for m in messages[start + 1 :]
        if isinstance(m, ToolMessage)
    ]
    seen = "\n".join(results) or "(no tool was called for this task)"
    earlier = [
        f"- {'user' if isinstance(m, HumanMessage) else 'assistant'}: {_line(m.text)}"
        for m in earlier_turns(messages[: max(start, 0)])
    ]
    context = (
        "Earlier in this conversation (context only; its tool results are not shown):\n"
        + "\n".join(earlier)
        + "\n\n"
        if earlier
        else ""
    )
    return [
        SystemMessage(content=JUDGE_PROMPT),
        HumanMessage(
            content=f"{context}Task:\n{task_text}\n\nWhat the tools returned for this "
            f"task:\n{seen}\n\nAnswer:\n{answer}"
        ),
    ]


def _line(text: str, most: int = 300) -> str:
    """`text` on one line, at most `most` characters."""
    return " ".join(text.split())[:most]


class _CheckRaised(Exception):
    """A rule check raised: the run ends as `error`, with the check's name and its error."""

    def __init__(self, name: str, exc: Exception) -> None:
        super().__init__(f"the check {name} raised {type(exc).__name__}: {exc}")


def _escalating(state: AgentState) -> bool:
    """Whether `verify` asked a human about its last failed verdict (the escalation's 2nd step)."""
    result = state.get("outcome")
    verdicts = state.get("verdicts") or []
    waiting = result is not None and result["status"] == "interrupted"
    return waiting and bool(verdicts) and not verdicts[-1]["passed"]


def _escalate(state: AgentState) -> dict[str, Any]:
    """Ask a human about the answer whose last verdict failed, and act on the answer."""
    answer, verdicts = _answer(state), [*(state.get("verdicts") or [])]
    verdict, revisions = verdicts[-1], _revisions(state)
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
                "messages": [
                    HumanMessage(content=text, additional_kwargs={VERIFICATION_KEY: True})
                ],
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


def _revisions(state: AgentState) -> int:
    """How often the current task's answer went back to the model.

    Each time with a message of keel's: the verifier's feedback or a human's guidance. A
    thread's earlier tasks had their own `max_revisions` (counted over the thread, a second
    task got none).
    """
    messages = state.get("messages") or []
    return sum(
        1
        for m in messages[task_start(messages) + 1 :]
        if isinstance(m, HumanMessage) and m.additional_kwargs.get(VERIFICATION_KEY)
    )


def _answer(state: AgentState) -> str:
    for message in reversed(state.get("messages") or []):
        if isinstance(message, AIMessage):
            return message.text
    return ""


def _judged(output: Any) -> Verdict:
    parsed = output.get("parsed") if isinstance(output, dict) else output
    if not isinstance(parsed, JudgeVerdict):
        error = output.get("parsing_error") if isinstance(output, dict) else None
        problem = f"gave a verdict that does not parse ({error})" if error else "gave no verdict"
        return _judge_failed(ModelBehaviorError("the judge", problem))
    return {"passed": parsed.passed, "reason": parsed.reason, "source": "judge"}


def _judge_failed(exc: BaseException) -> Verdict:
    log.warning("the judge failed: %r", exc)
    return {
        "passed": False,
        "reason": f"the judge failed: {type(exc).__name__}: {exc}",
        "source": "judge",
    }


def _name(rule: Check) -> str:
    return getattr(rule, "__name__", type(rule).__name__)
