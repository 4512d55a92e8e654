"""`input_guard` and `output_guard`: the content guards as nodes of the graph.

- `input_guard` sits before the model at the start of a run: the user's new messages (and
  every message a caller wrote, which keel's graphs mark unread, `SENT_KEY`; the node removes
  the mark once it read them, so a run resumed after a crash still reads them) are
  checked for size and prompt injection (`keel.guards.check_input`); a flagged or redacted
  message is replaced in state with a note of what was found, and a blocked one ends the run
  (`outcome.terminated_reason == "blocked"`, routed to `respond`). Tool results are checked
  as they come in, by `execute_tools(input_guard=...)`, with the same decision.
- `output_guard` sits before the end: the final answer, or the partial answer `respond`
  wrote, is checked for PII and secrets (`keel.guards.check_output`) and replaced in state
  by its redacted copy (or withheld, for `block`).

What a guard found is kept in the message's `response_metadata["keel_guard"]`, which the audit
log and the run record read. Both nodes work on their own in a hand-built `StateGraph`.
"""

from __future__ import annotations

import time
from typing import Any

from langchain_core.messages import AIMessage
from langgraph.runtime import Runtime

from keel import outcome
from keel._node import RunnableCallable, make_node
from keel.errors import UserError
from keel.guards.content import InputGuardPolicy, OutputGuardPolicy
from keel.guards.injection_model import DetectorCalls, DetectorSpend
from keel.guards.model_call import ModelCallGuards
from keel.guards.screening import (
    GUARD_KEY,
    Screened,
    ascreen_inputs,
    is_checked_answer,
    screen_answer,
    screen_inputs,
)
from keel.state import AgentState, RunContext, task_clock, task_reset

__all__ = ["input_guard", "output_guard", "route_after_input_guard"]


def input_guard(
    policy: InputGuardPolicy | None = None,
    *,
    guards: ModelCallGuards | None = None,
    name: str = "input_guard",
) -> RunnableCallable:
    """A node that checks the new user messages (and any unread tool results) before the model.

    Route after it with `route_after_input_guard` (a block, or a budget that refused the
    detector's model call, goes to `respond`).

    Args:
        policy: What to check and what to do (default `InputGuardPolicy()`: injections are
            flagged, inputs over 50,000 characters blocked).
        guards: The run's model-call guards a `ModelDetector`'s calls go through (budgets,
            rate limits, breaker, prices; `build_agent` passes the agent's). Its calls are
            counted in the run's `usage` either way.
        name: The node's name.
    """
    policy = _checked(policy, InputGuardPolicy, "input_guard")
    calls = DetectorCalls(guards, policy.detector)

    def run(state: AgentState, runtime: Runtime[RunContext]) -> dict[str, Any]:
        with calls.counting(state, runtime, sync=True) as spend:
            screened = screen_inputs(state.get("messages") or [], policy)
        return _input_update(state, screened, spend)

    async def arun(state: AgentState, runtime: Runtime[RunContext]) -> dict[str, Any]:
        with calls.counting(state, runtime, sync=False) as spend:
            screened = await ascreen_inputs(state.get("messages") or [], policy)
        return _input_update(state, screened, spend)

    return make_node(name, run, arun)


def _input_update(state: AgentState, screened: Screened, spend: DetectorSpend) -> dict[str, Any]:
    update: dict[str, Any] = {}
    if screened.messages:
        update["messages"] = screened.messages
    # a budget that refused the detector ends the run as such (what it left unchecked is blocked)
    stop = spend.stop
    if stop is None and screened.blocked is not None:
        stop = outcome.stopped("blocked", screened.blocked)
    if stop is not None:
        update["outcome"] = stop
        # the run ends before the model: start its clock here, so that its usage, its start
        # and its records are its own, not the thread's previous task's; nor did it degrade as
        # that task did (its `recall` and standing approvals, which clear their own warnings
        # as a task starts, do not run)
        clock = task_clock(state, time.time())
        if clock is not None:
            update.update(clock=clock, **task_reset(state))
            if state.get("warnings"):
                update["warnings"] = []
    elif state.get("outcome") is not None:
        update["outcome"] = None  # a new task: the last one's outcome no longer holds
    return spend.into(update)


def route_after_input_guard(state: AgentState, *, next: str = "call_model") -> str:
    """After `input_guard`: `respond` when it blocked the input or ended the run, else `next`.

    It ends the run when a guard refused its detector's model call (a spent budget, the
    ledger down); it clears an earlier task's outcome otherwise.
    """
    result = state.get("outcome")
    if result is not None and result["status"] in ("stopped", "error"):
        return "respond"
    return next


def output_guard(
    policy: OutputGuardPolicy | None = None, *, name: str = "output_guard"
) -> RunnableCallable:
    """A node that checks the last answer (final or partial) for PII and secrets.

    keel's `call_model` and `respond` check the answers they write already (so the thread
    never saves an unchecked one); this node then records what they found, as it records what
    it finds itself in an answer from a node of yours.

    Args:
        policy: What to look for and what to do (default `OutputGuardPolicy()`: redact).
        name: The node's name.
    """
    policy = _checked(policy, OutputGuardPolicy, "output_guard")

    def run(state: AgentState) -> dict[str, Any]:
        messages = state.get("messages") or []
        last = messages[-1] if messages else None
        if not isinstance(last, AIMessage) or last.tool_calls:
            return {}
        # an answer keel's call_model or respond checked is this guard's copy: not scanned again
        screened = None if is_checked_answer(last, policy) else screen_answer(last, policy)
        if screened is None:
            if _output_note(last) is None:
                return {}
            # checked where it was written (call_model, respond): its finding is recorded here
            screened = last
        update: dict[str, Any] = {"messages": [screened]}
        if screened.response_metadata["keel_guard"]["action"] == "block":
            update["outcome"] = outcome.stopped("blocked", screened.text)
        return update

    async def arun(state: AgentState) -> dict[str, Any]:
        return run(state)

    return make_node(name, run, arun)


def _output_note(message: AIMessage) -> dict[str, Any] | None:
    note = message.response_metadata.get(GUARD_KEY)
    return note if isinstance(note, dict) and note.get("guard") == "output" else None


def _checked(policy: Any, kind: type[Any], name: str) -> Any:
    if policy is None:
        return kind()
    if not isinstance(policy, kind):
        raise UserError(f"{name}(policy=...) must be a {kind.__name__}, got {policy!r}.")
    return policy
