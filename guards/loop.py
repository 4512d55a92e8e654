"""The loop guard: the same call repeated, or a cycle (A-B-A-B, A-B-C-D-A-B-C-D, ...), is a loop.

`detect_loop(calls, policy)` is a pure decision over the sequence of tool calls of the current
task (name + canonical arguments), the proposed ones last.
"""

from __future__ import annotations

from collections.abc import Sequence

from langchain_core.messages import AIMessage, AnyMessage, HumanMessage

from keel.guards.policy import LoopPolicy
from keel.state import task_start
from keel.tools._args import ToolLookup, read_call

__all__ = ["MAX_CYCLE_LENGTH", "call_sequence", "detect_loop", "loop_window", "wrap_up_note"]

Call = tuple[str, str]

MAX_CYCLE_LENGTH = 64
"""The longest block of calls a cycle may have (a model's parallel calls of a turn included).

The guard runs at every step, so it reads only the last `MAX_CYCLE_LENGTH * max_cycles` calls
(one pass over them, whatever the task's length); a longer cycle is left to the run budget."""


def loop_window(policy: LoopPolicy) -> int:
    """How many of the task's last calls `detect_loop` reads under `policy`."""
    return max(policy.max_repeats, MAX_CYCLE_LENGTH * policy.max_cycles)


def call_sequence(
    messages: Sequence[AnyMessage],
    proposed: AIMessage | None = None,
    tools: ToolLookup | None = None,
    *,
    last: int | None = None,
) -> list[Call]:
    """The current task's tool calls, as `(name, canonical args)`, in order.

    From the user's message that started the task (`keel.state.task_start`): a thread's earlier
    tasks are not counted, and `verify`'s feedback inside the task does not start the count
    again (a model sent back to revise that repeats its calls is still repeating them).
    With `tools` (a tool by name), the arguments of a call to one of them are as the tool
    reads them (`keel.tools._args.as_called`): `amount=10` and `amount=10.0` for an `int`
    are the same call, so alternating spellings does not slip past `max_repeats`.

    `last`: only the task's last calls, this many (`loop_window`): the guard runs at every
    step, and reading each call as the tool does (a schema validation) at every step made a
    long task's steps cost more and more.
    """
    start = max(task_start(messages), 0)
    turns = [*messages[start:], *([proposed] if proposed is not None else [])]
    turns_with_calls: list[AIMessage] = []
    count = 0
    for m in reversed(turns):  # from the end: a long task's early calls are not read
        if isinstance(m, AIMessage) and m.tool_calls:
            turns_with_calls.append(m)
            count += len(m.tool_calls)
            if last is not None and count >= last:
                break
    picked = [tc for m in reversed(turns_with_calls) for tc in m.tool_calls]
    if last is not None:
        picked = picked[-last:] if last > 0 else []
    return [read_call(tc["name"], tc["args"], tools) for tc in picked]


def detect_loop(calls: Sequence[Call], policy: LoopPolicy) -> str | None:
    """Why the sequence ends in a loop, or None.

    - repeats: the last `max_repeats` calls are the same tool with the same arguments;
    - cycles: the last calls are a block of 2 to `MAX_CYCLE_LENGTH` calls, not all the same,
      repeated `max_cycles` times (A-B-A-B, A-B-C-D-A-B-C-D, or the same 4 parallel calls in
      two turns); the shortest such block is named.
    """
    n = policy.max_repeats
    if len(calls) >= n and len(set(calls[-n:])) == 1:
        name, args = calls[-1]
        return f"{name} was called {n} times in a row with the same arguments {args}"
    cycles = policy.max_cycles
    if cycles >= 2 and len(calls) >= 2 * cycles:
        period = _cycle(calls[-MAX_CYCLE_LENGTH * cycles :], cycles)
        if period is not None:
            block = calls[-period:]
            names = [name for name, _ in block]
            shown = " → ".join(names if period <= 8 else [*names[:8], f"… ({period} calls)"])
            return f"the calls {shown} repeated {cycles} times in a cycle"
    return None


def _cycle(calls: Sequence[Call], cycles: int) -> int | None:
    """The shortest cycle `calls` ends in, or None.

    That is the least p ≥ 2 such that the calls end in a block of p calls, not all the same,
    repeated `cycles` times.

    With the calls read backwards as `r`, the tail is a block of p repeated k times exactly when
    `r[:p*(k-1)] == r[p:p*k]`, i.e. when the Z-function of `r` at p is at least `p*(k-1)`:
    one linear pass answers every p.
    """
    ids: dict[Call, int] = {}
    r = [ids.setdefault(c, len(ids)) for c in reversed(calls)]
    m = len(r)
    z = [0] * m
    left = right = 0
    for i in range(1, m):
        if i < right:
            z[i] = min(right - i, z[i - left])
        while i + z[i] < m and r[z[i]] == r[i + z[i]]:
            z[i] += 1
        if i + z[i] > right:
            left, right = i, i + z[i]
    for p in range(2, m // cycles + 1):
        if z[p] >= p * (cycles - 1) and len(set(r[:p])) > 1:
            return p
    return None


def wrap_up_note(reason: str) -> HumanMessage:
    """The note that asks the model for a final answer without tools after a loop."""
    return HumanMessage(
        content=f"(keel loop guard) You are repeating tool calls: {reason}. Do not call any "
        "more tools. Give your final answer now with what you have."
    )
