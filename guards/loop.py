"""The loop guard: the same call repeated, or an A-B-A-B cycle, is a loop.

`detect_loop(calls, policy)` is a pure decision over the sequence of tool calls of the current
task (name + canonical arguments), the proposed ones last.
"""

from __future__ import annotations

from collections.abc import Sequence

from langchain_core.messages import AIMessage, AnyMessage, HumanMessage

from keel.approvals import canonical_args
from keel.guards.policy import LoopPolicy
from keel.state import task_start

__all__ = ["call_sequence", "detect_loop", "wrap_up_note"]

Call = tuple[str, str]


def call_sequence(messages: Sequence[AnyMessage], proposed: AIMessage | None = None) -> list[Call]:
    """The current task's tool calls, as `(name, canonical args)`, in order.

    From the user's message that started the task (`keel.state.task_start`): a thread's earlier
    tasks are not counted, and `verify`'s feedback inside the task does not start the count
    again (a model sent back to revise that repeats its calls is still repeating them).
    """
    start = max(task_start(messages), 0)
    calls: list[Call] = []
    for m in [*messages[start:], *([proposed] if proposed is not None else [])]:
        if isinstance(m, AIMessage):
            for tc in m.tool_calls:  # a loop, not extend(genexpr): runs per message and step
                calls.append((tc["name"], canonical_args(tc["args"])))
    return calls


def detect_loop(calls: Sequence[Call], policy: LoopPolicy) -> str | None:
    """Why the sequence ends in a loop, or None.

    - repeats: the last `max_repeats` calls are the same tool with the same arguments;
    - cycles: the last calls are a block of 2 or 3 different calls repeated `max_cycles` times.
    """
    n = policy.max_repeats
    if len(calls) >= n and len(set(calls[-n:])) == 1:
        name, args = calls[-1]
        return f"{name} was called {n} times in a row with the same arguments {args}"
    if policy.max_cycles >= 2:
        for period in (2, 3):
            span = period * policy.max_cycles
            if len(calls) < span:
                continue
            block = list(calls[-period:])
            if len(set(block)) < period:
                continue
            if list(calls[-span:]) == block * policy.max_cycles:
                names = " → ".join(name for name, _ in block)
                return f"the calls {names} repeated {policy.max_cycles} times in a cycle"
    return None


def wrap_up_note(reason: str) -> HumanMessage:
    """The note that asks the model for a final answer without tools after a loop."""
    return HumanMessage(
        content=f"(keel loop guard) You are repeating tool calls: {reason}. Do not call any "
        "more tools. Give your final answer now with what you have."
    )
