"""`tool_gate`: the node that decides, before any tool runs, where the model's tool calls go.

One decision per guard, in order: the loop guard (`detect_loop`: a loop ends the run as
`loop_detected`), the run budget (`check_budget`: a spent budget ends it as `budget_exceeded`),
and the permission gate (the policy's `PermissionMatrix`, with standing approvals) per call:

- `allow` → `execute_tools`;
- `ask` → `human_review` (the run pauses with `outcome.status == "interrupted"`);
- `deny` → answered with a `ToolMessage` (`keel_status == "denied"`): here when every call is
  denied (the model reads the answers and goes on), else by `execute_tools` with the same
  gate, so results stay in call order.

Route after it with `route_after_gate`. `execute_tools` applies the same gate again, so a call
that reaches it some other way is still refused; checks that only admit or refuse inside a call
(the tool-call limit per call, the breaker, the idempotency ledger) stay in `execute_tools`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Unpack

from langchain_core.messages import AIMessage, ToolMessage
from langgraph.runtime import Runtime

from keel import outcome
from keel._node import RunnableCallable, context_of, make_node, thread_of
from keel.approvals import decided
from keel.guards.agent_guards import AgentGuards, GuardOptions
from keel.guards.budget import check_budget, outer_exceeded
from keel.guards.loop import call_sequence, detect_loop, loop_window
from keel.history import pending_tool_calls
from keel.nodes._once import tool_message
from keel.state import AgentState, RunContext, run_usage
from keel.tools._args import approval_digests, invalid_args
from keel.tools._duplicates import answer_duplicates, duplicates
from keel.tools.registry import ToolRegistry

__all__ = ["gate_decision", "gate_passes", "route_after_gate", "tool_gate"]


def tool_gate(
    tools: ToolRegistry,
    *,
    guards: AgentGuards | None = None,
    name: str = "tool_gate",
    **options: Unpack[GuardOptions],
) -> RunnableCallable:
    """A node that routes the last AI message's tool calls: run, ask a human, or refuse.

    Args:
        tools: The tools the agent may call (unknown tools and invalid arguments are left to
            `execute_tools`, which answers them).
        guards: What the agent is held to (`AgentGuards.from_policy(policy, ledger)`): the
            gate decides allow / ask / deny per call (standing approvals, bound to the
            policy's name and version, turn an `ask` into `allow`; an approval whose seal
            does not verify spares no call its review); when the run budget is spent no call
            runs and the run ends; a loop ends the run as `loop_detected` (a `wrap_up` loop
            policy is applied by `call_model`, which makes the wrap-up call).
        name: The node's name.
        **options: Single guards instead of (or over) `guards`: `gate`, `budget`, `loop`,
            `policy_version`, `policy_name`, `grants` (see `AgentGuards.of`).
    """
    decide = gate_decision(tools, AgentGuards.of(guards, **options))

    def run(state: AgentState, runtime: Runtime[RunContext]) -> dict[str, Any]:
        update = decide(state, runtime)
        if "outcome" not in update and state.get("outcome") is not None:
            update["outcome"] = None
        return update

    async def arun(state: AgentState, runtime: Runtime[RunContext]) -> dict[str, Any]:
        return run(state, runtime)

    return make_node(name, run, arun)


def route_after_gate(state: AgentState) -> str:
    """After `tool_gate`: `execute_tools`, `human_review`, `respond`, or back to `call_model`."""
    result = state.get("outcome")
    if result is not None and result["status"] == "interrupted":
        return "human_review"
    if result is not None and result["status"] in ("stopped", "error"):
        return "respond"
    _, calls = pending_tool_calls(state.get("messages") or [])
    return "execute_tools" if calls else "call_model"


Decide = Callable[[AgentState, Runtime[RunContext]], dict[str, Any]]
"""What `tool_gate` writes for a state: `{}` when every pending call goes on to the tools."""


def gate_decision(tools: ToolRegistry, held: AgentGuards) -> Decide:
    """The gate's decision about the pending tool calls, as the update `tool_gate` writes.

    Pure: it reads the state and the run's identity and writes nothing, so a route may ask it
    too (see `gate_passes`).
    """
    loop, budget = held.loop, held.budget

    def decide(state: AgentState, runtime: Runtime[RunContext]) -> dict[str, Any]:
        messages = state.get("messages") or []
        index, calls = pending_tool_calls(messages)
        if not calls:
            return {}
        last = messages[index]
        assert isinstance(last, AIMessage)
        if loop is not None and loop.on_loop == "stop":
            window = loop_window(loop)
            looping = detect_loop(
                call_sequence(messages[:index], last, tools.get, last=window), loop
            )
            if looping is not None:
                return {"outcome": outcome.stopped("loop_detected", looping)}
        usage = run_usage(state.get("usage"), state.get("clock"))
        reason = outer_exceeded(usage, planned_tool_calls=1)
        if budget is not None and reason is None:
            started = (state.get("clock") or {}).get("started_at")
            reason = check_budget(budget, usage, started_at=started, planned_tool_calls=1).exceeded
        if reason is not None:
            return {
                "messages": [
                    tool_message(c, f"Not run: {reason}.", "budget_stopped") for c in calls
                ],
                "outcome": outcome.stopped("budget_exceeded", reason),
            }
        context = context_of(runtime)
        approvals = held.trusted(thread_of(runtime), context, state.get("approvals"))
        verdict_of = held.deciding(approvals, context)
        policy = held.policy_id(context)
        # a repeat of an earlier side-effecting call of the turn follows that call's decision
        dupes = duplicates(last.tool_calls, tools.get)
        own = [c for c in calls if (c.get("id") or "") not in dupes]
        denied: list[ToolMessage] = []
        asks: list[str] = []
        for call in own:
            entry = tools.get(call["name"])
            if entry is None or invalid_args(entry, call.get("args")) is not None:
                continue  # execute_tools answers it (unknown tool, invalid arguments)
            decision = verdict_of(entry, call["args"], context)
            if decision.action == "deny":
                rule = f" (rule: {decision.rule})" if decision.rule else ""
                denied.append(
                    tool_message(call, f"Not permitted: {decision.reason}{rule}.", "denied")
                )
            elif decision.action == "ask":
                # a call a human rejected earlier on the thread is not asked about again (as
                # `human_review` does): the run does not pause, so its record has no interrupt
                digests = approval_digests(entry, call["args"], policy)
                if not decided(approvals, digests, call.get("id") or ""):
                    asks.append(entry.name)
        # Answer here only when no call goes on: else execute_tools answers the denied calls
        # too (the same gate), so every result stays in call order.
        update: dict[str, Any] = {}
        if denied and len(denied) == len(own):
            stored = messages[index + 1 :]
            answers = {
                m.tool_call_id: m
                for m in [*denied, *answer_duplicates(calls, dupes, [*stored, *denied])]
            }
            update["messages"] = [
                answers[c.get("id") or ""] for c in calls if (c.get("id") or "") in answers
            ]
        if asks:
            update["outcome"] = outcome.interrupted(f"awaiting approval for {', '.join(asks)}")
        return update

    return decide


def gate_passes(
    tools: ToolRegistry, guards: AgentGuards
) -> Callable[[AgentState, Runtime[RunContext]], bool]:
    """Whether `tool_gate` would let every pending call go on and write nothing.

    Asked by the route after `call_model`: then the calls go straight to `execute_tools`,
    which applies the same gate again, and the run saves a step and a checkpoint per tool
    turn. Any other decision (a call denied, one that needs a human, a spent budget, a loop),
    or a failure while deciding, sends the calls through the `tool_gate` node as before.
    """
    decide = gate_decision(tools, guards)

    def passes(state: AgentState, runtime: Runtime[RunContext]) -> bool:
        if not pending_tool_calls(state.get("messages") or [])[1]:
            return False
        try:
            return decide(state, runtime) == {}
        except Exception:  # the node decides again, and reports it
            return False

    return passes
