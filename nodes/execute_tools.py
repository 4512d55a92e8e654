"""`execute_tools`: run the last AI message's tool calls under keel's tool-execution contract.

Every tool call gets exactly one `ToolMessage`, whatever happens: success, invalid arguments
(checked against the tool's schema and never executed), unknown tool (with the valid names),
denied, needs approval, rejected, timeout or error. Tools without side effects are retried with
backoff; tools with side effects run at most once per call here, and, with a ledger, at most
once per thread across resumes, retries, replays and crashes (see `keel.db.idempotency`).

Under `ainvoke` the calls of one turn run concurrently and a timeout cancels the call. Under
`invoke` they run one after another, and a timed-out call's thread is abandoned (Python cannot
cancel a thread); use `ainvoke` for cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from langchain_core.messages import BaseMessage, ToolCall, ToolMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import ToolException
from langgraph.errors import GraphBubbleUp
from langgraph.runtime import Runtime
from pydantic import ValidationError

from keel import outcome
from keel._node import RunnableCallable, context_of, make_node, policy_id, thread_of
from keel.approvals import Grants, approval_digest, approval_key
from keel.db.ledger import Ledger
from keel.guards.budget import check_budget
from keel.guards.content import InputGuardPolicy
from keel.guards.gate import Gate, approval_gate
from keel.guards.policy import Budget
from keel.guards.resilience import ToolGuard
from keel.guards.screening import screen_tool_result
from keel.guards.standing import allowing
from keel.nodes._args import invalid_args
from keel.nodes._once import (
    Unknown,
    adrive_once,
    await_saved,
    drive_once,
    known_call_ids,
    ledger_key,
    succeeded,
    tool_message,
    wait_saved,
)
from keel.nodes._threads import start_daemon
from keel.nodes.history import pending_tool_calls
from keel.nodes.plan import advance_plan
from keel.state import AgentState, Approval, RunContext
from keel.tools.registry import RegisteredTool, ToolRegistry

__all__ = ["ToolStatus", "execute_tools"]

ToolStatus = Literal[
    "success",
    "invalid_args",
    "unknown_tool",
    "denied",
    "needs_approval",
    "rejected",
    "respond",
    "budget_stopped",
    "timeout",
    "error",
    "unavailable",
    "not_run",
    "blocked",
]
"""How a tool call ended; in each `ToolMessage`'s `response_metadata["keel_status"]`.
`respond` (a human answered instead of the tool) comes from `human_review`, `not_run` (the run
stopped first) from `respond`; `unavailable`: the tool's circuit breaker is open; `blocked`: the
input guard withheld the result."""


Known = frozenset[str]
"""The tool-call ids in the thread's history."""


class _Deadline(Exception):
    """keel's own per-call timeout fired (not a `TimeoutError` raised by the tool)."""


@dataclass(frozen=True, slots=True)
class _Job:
    """A call cleared to run."""

    call: ToolCall
    entry: RegisteredTool


def execute_tools(
    tools: ToolRegistry,
    *,
    gate: Gate = approval_gate,
    policy_version: str = "1",
    policy_name: str | None = None,
    budget: Budget | None = None,
    tool_guard: ToolGuard | None = None,
    ledger: Ledger | None = None,
    input_guard: InputGuardPolicy | None = None,
    grants: Grants | None = None,
    name: str = "execute_tools",
) -> RunnableCallable:
    """A node that answers every pending tool call of the last AI message with one ToolMessage.

    Args:
        tools: The tools the agent may call.
        gate: Decides allow / ask / deny per call; an `ask` call runs only when a grant in
            state sealed by `grants` for this thread and user matches its exact arguments.
        policy_version: Bound into approval digests; a new version invalidates old approvals.
        policy_name: The policy's name for the digest (default: `RunContext.policy`).
        budget: Run budget: calls that would pass its tool-call limit are answered
            `budget_stopped` and the run ends as `budget_exceeded`.
        tool_guard: The per-tool circuit breaker: while a tool's is open the call is answered
            `unavailable` (the model is told what is missing) and the run goes on.
        ledger: The idempotency ledger. With one, a side-effecting call in a thread runs at
            most once: a resume, retry or replay gets the recorded result, and a call that
            started but never finished (the process died) is not repeated: the run pauses for
            `human_review` ("did this happen?") unless the tool is `idempotent` or its
            `reconcile` settles it. Without one, nothing protects against a repeat. A call the
            ledger answers from its record does not touch the breaker.
        input_guard: The input guard applied to every result before the model reads it
            (`keel.guards.check_input(..., source="tool")`): an injection is flagged, redacted
            or the result withheld (`keel_status == "blocked"`); `None`: results pass as they
            are.
        grants: Verifies approval grants (`keel.approvals.Grants`); default: the secret in
            `KEEL_APPROVAL_SECRET`, else this process's own.
        name: The node's name.
    """
    sealer = grants if grants is not None else Grants.from_secret()

    def plan_calls(
        state: AgentState, runtime: Runtime[RunContext] | None
    ) -> list[ToolMessage | _Job]:
        _, calls = pending_tool_calls(state.get("messages") or [])
        context = context_of(runtime)
        approvals = sealer.for_run(thread_of(runtime), context).trusted(state.get("approvals"))
        policy = policy_id(context, policy_version, policy_name)
        decide = allowing(gate, approvals, policy)  # standing approvals turn ask into allow
        planned = [_classify(c, tools, decide, context, approvals, policy) for c in calls]
        return _within_budget(state, planned)

    def _within_budget(state: AgentState, planned: list[ToolMessage | _Job]) -> list[Any]:
        """Stop the calls the budget does not allow.

        When a limit is already spent (dollars, tokens, model calls: no model could read the
        results) no call runs; past the tool-call limit, the calls that fit run.
        """
        jobs = sum(isinstance(p, _Job) for p in planned)
        if budget is None or not jobs:
            return planned
        usage = state.get("usage") or {}
        started = (state.get("clock") or {}).get("started_at")
        verdict = check_budget(budget, usage, started_at=started)
        allowed = 0
        if verdict.exceeded is None:
            allowed = jobs
            if budget.tool_calls is not None:
                allowed = min(jobs, int(budget.tool_calls - usage.get("tool_calls", 0)))
            if allowed >= jobs:
                return planned
            verdict = check_budget(
                budget, usage, started_at=started, planned_tool_calls=allowed + 1
            )
        reason = verdict.exceeded or "tool-call budget exhausted"
        out: list[Any] = []
        for p in planned:
            if isinstance(p, _Job):
                if allowed > 0:
                    allowed -= 1
                else:
                    p = _message(p.call, f"Not run: {reason}.", "budget_stopped")
            out.append(p)
        return [*out, outcome.stopped("budget_exceeded", reason)]

    def finish(state: AgentState, results: list[Any], ran: int) -> dict[str, Any]:
        unknown = [r for r in results if isinstance(r, Unknown)]
        stops = [r for r in results if not isinstance(r, ToolMessage | Unknown)]
        results = [r for r in results if isinstance(r, ToolMessage)]
        if input_guard is not None:
            results = [screen_tool_result(r, input_guard) or r for r in results]
        update: dict[str, Any] = {"messages": results, "usage": {"tool_calls": ran, "steps": 1}}
        if unknown:
            names = ", ".join(sorted({u.call["name"] for u in unknown}))
            update["outcome"] = outcome.interrupted(
                f"outcome unknown: a call to {names} started but never finished; "
                "a human must say whether it happened"
            )
        elif stops:
            update["outcome"] = stops[0]
        steps = state.get("plan")
        if steps and results:
            ok = all(m.status == "success" for m in results)
            update["plan"] = advance_plan(steps, succeeded=ok)
        return update

    def run_sync(job: _Job, config: RunnableConfig, known: Known) -> ToolMessage | Unknown:
        key = ledger_key(job.entry, job.call, config, ledger)
        if key is None or ledger is None:
            return _guarded_sync(job, config, tool_guard)
        return drive_once(
            job.entry, job.call, key, ledger, lambda: _guarded_sync(job, config, tool_guard), known
        )

    async def run_async(
        job: _Job, config: RunnableConfig, known: Known, alone: bool
    ) -> ToolMessage | Unknown:
        key = ledger_key(job.entry, job.call, config, ledger)
        if key is None or ledger is None:
            return await _guarded_async(job, config, tool_guard)
        run = lambda: _guarded_async(job, config, tool_guard)  # noqa: E731
        return await adrive_once(job.entry, job.call, key, ledger, run, known, alone=alone)

    def invoke(
        state: AgentState, config: RunnableConfig, runtime: Runtime[RunContext]
    ) -> dict[str, Any]:
        planned = plan_calls(state, runtime)
        if _durable_jobs(planned, config, ledger) and not wait_saved(config, _request(state)):
            planned = _not_saved(planned, config, ledger)
        known = known_call_ids(state.get("messages") or [])
        results = [p if not isinstance(p, _Job) else run_sync(p, config, known) for p in planned]
        return finish(state, results, sum(isinstance(p, _Job) for p in planned))

    async def ainvoke(
        state: AgentState, config: RunnableConfig, runtime: Runtime[RunContext]
    ) -> dict[str, Any]:
        planned = plan_calls(state, runtime)
        request = _request(state)
        if _durable_jobs(planned, config, ledger) and not await await_saved(config, request):
            planned = _not_saved(planned, config, ledger)
        known = known_call_ids(state.get("messages") or [])
        alone = sum(isinstance(p, _Job) for p in planned) == 1
        results = await asyncio.gather(
            *(
                run_async(p, config, known, alone) if isinstance(p, _Job) else _answered(p)
                for p in planned
            )
        )
        return finish(state, list(results), sum(isinstance(p, _Job) for p in planned))

    return make_node(name, invoke, ainvoke)


def _durable_jobs(planned: list[Any], config: RunnableConfig, ledger: Ledger | None) -> bool:
    """Whether a cleared call runs through the ledger (and so must wait for the checkpoint)."""
    return any(
        isinstance(p, _Job) and ledger_key(p.entry, p.call, config, ledger) is not None
        for p in planned
    )


def _not_saved(planned: list[Any], config: RunnableConfig, ledger: Ledger | None) -> list[Any]:
    """Answer the ledger calls `error`: the checkpoint holding their request was never saved."""
    return [
        _message(
            p.call,
            f"Error: {p.entry.name} was not run: the checkpoint holding this request was not "
            "saved, so a crash could repeat it. Check the checkpointer's database.",
            "error",
        )
        if isinstance(p, _Job) and ledger_key(p.entry, p.call, config, ledger) is not None
        else p
        for p in planned
    ]


# -- deciding what each call gets -----------------------------------------------------------


def _classify(
    call: ToolCall,
    tools: ToolRegistry,
    gate: Gate,
    context: RunContext,
    approvals: Mapping[str, Approval],
    policy: str,
) -> ToolMessage | _Job:
    entry = tools.get(call["name"])
    if entry is None:
        names = ", ".join(repr(n) for n in tools.names) or "none: this agent has no tools"
        return _message(
            call,
            f"Error: {call['name']!r} is not a valid tool, try one of [{names}].",
            "unknown_tool",
        )
    problem = invalid_args(entry, call.get("args"))
    if problem is not None:
        return _message(
            call,
            f"Error: invalid arguments for {entry.name}: {problem}. "
            "Fix the arguments and call the tool again.",
            "invalid_args",
        )
    decision = gate(entry, call["args"], context)
    if decision.action == "deny":
        rule = f" (rule: {decision.rule})" if decision.rule else ""
        return _message(call, f"Not permitted: {decision.reason}{rule}.", "denied")
    if decision.action == "ask":
        digest = approval_digest(entry.name, call["args"], policy, version=entry.spec.version)
        approval = approvals.get(digest) or approvals.get(
            approval_key(digest, call.get("id") or "", "approved")
        )
        if approval is None:
            return _message(
                call,
                f"{entry.name} needs a human's approval for these exact arguments and has "
                "none; it was not run.",
                "needs_approval",
            )
        if approval["decision"] == "rejected":
            return _message(
                call, f"Rejected by a human reviewer; {entry.name} was not run.", "rejected"
            )
    return _Job(call, entry)


# -- running the cleared calls: one decision, two drivers ----------------------------------


def _on_failure(job: _Job, exc: BaseException, attempt: int) -> ToolMessage | float:
    """After a failed attempt: the final ToolMessage, or seconds to wait before retrying."""
    if isinstance(exc, _Deadline):
        return _message(job.call, str(exc), "timeout")
    if isinstance(exc, ValidationError):
        return _message(
            job.call, f"Error: invalid arguments for {job.entry.name}: {exc}", "invalid_args"
        )
    if isinstance(exc, ToolException) or attempt >= job.entry.spec.attempts:
        tries = f" after {attempt} attempts" if attempt > 1 else ""
        return _message(
            job.call,
            f"Error: {job.entry.name} failed{tries}: {type(exc).__name__}: {exc}",
            "error",
        )
    return float(min(5.0, job.entry.spec.retry_wait * 2 ** (attempt - 1)))


def _run_sync(job: _Job, config: RunnableConfig) -> ToolMessage:
    timeout = job.entry.spec.timeout
    attempt = 0
    while True:
        attempt += 1
        try:
            if timeout is None:
                return _succeeded(job, job.entry.tool.invoke(job.call, config))
            return _succeeded(job, _call_in_thread(job, config, timeout))
        except GraphBubbleUp:
            raise
        except Exception as exc:
            step = _on_failure(job, exc, attempt)
            if isinstance(step, ToolMessage):
                return step
            time.sleep(step)


async def _run_async(job: _Job, config: RunnableConfig) -> ToolMessage:
    timeout = job.entry.spec.timeout
    attempt = 0
    while True:
        attempt += 1
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                if _is_sync(job.entry):
                    result = await _in_daemon_thread(job, config)
                else:
                    result = await job.entry.tool.ainvoke(job.call, config)
            return _succeeded(job, result)
        except GraphBubbleUp:
            raise
        except Exception as exc:
            if isinstance(exc, TimeoutError) and deadline.expired():
                exc = _Deadline(
                    f"Error: {job.entry.name} did not finish within {timeout:g} s and was "
                    "cancelled."
                )
            step = _on_failure(job, exc, attempt)
            if isinstance(step, ToolMessage):
                return step
            await asyncio.sleep(step)


# -- the tool's circuit breaker around a run (keel.guards.resilience) ------------------------


def _guarded_sync(job: _Job, config: RunnableConfig, guard: ToolGuard | None) -> ToolMessage:
    if guard is None:
        return _run_sync(job, config)
    refused = guard.check(job.entry.name)
    if refused is not None:
        return _message(job.call, refused, "unavailable")
    result = _run_sync(job, config)
    guard.record(job.entry.name, str(result.response_metadata.get("keel_status")))
    return result


async def _guarded_async(job: _Job, config: RunnableConfig, guard: ToolGuard | None) -> ToolMessage:
    if guard is None:
        return await _run_async(job, config)
    refused = await guard.acheck(job.entry.name)
    if refused is not None:
        return _message(job.call, refused, "unavailable")
    result = await _run_async(job, config)
    await guard.arecord(job.entry.name, str(result.response_metadata.get("keel_status")))
    return result


def _request(state: AgentState) -> BaseMessage | None:
    """The model message whose tool calls this step runs."""
    messages = state.get("messages") or []
    index, calls = pending_tool_calls(messages)
    return messages[index] if calls else None


def _call_in_thread(job: _Job, config: RunnableConfig, timeout: float) -> Any:
    """Run a sync call on its own daemon thread and wait at most `timeout` seconds.

    A thread per call (an idle one or a new one, never a queue: `keel.nodes._threads`): a hung
    call never delays or starves other calls, and a call reported as timed out was already
    running, never started later from a queue.
    """
    box: dict[str, Any] = {}
    done = threading.Event()
    ctx = contextvars.copy_context()

    def target() -> None:
        try:
            box["value"] = ctx.run(job.entry.tool.invoke, job.call, config)
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc
        finally:
            done.set()

    start_daemon(target, f"keel-tool-{job.entry.name}")
    if not done.wait(timeout):
        raise _Deadline(
            f"Error: {job.entry.name} did not finish within {timeout:g} s; its result will be "
            "ignored (under a sync invoke it may still finish in the background)."
        )
    if "error" in box:
        raise box["error"]
    return box["value"]


def _is_sync(entry: RegisteredTool) -> bool:
    """A tool with a sync function and no coroutine (LangChain would run it on its executor)."""
    tool = entry.tool
    return getattr(tool, "coroutine", None) is None and getattr(tool, "func", None) is not None


async def _in_daemon_thread(job: _Job, config: RunnableConfig) -> Any:
    """Run a sync tool on its own daemon thread under `ainvoke`.

    LangChain runs a sync tool on the event loop's default executor, whose threads the
    interpreter joins at exit: a hung tool kept the process alive after its timeout. A daemon
    thread is abandoned at exit; the timeout still cancels the wait for it.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()
    ctx = contextvars.copy_context()

    def target() -> None:
        try:
            settled: tuple[Any, BaseException | None] = (
                ctx.run(job.entry.tool.invoke, job.call, config),
                None,
            )
        except BaseException as exc:  # handed to the awaiting task
            settled = (None, exc)
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
            loop.call_soon_threadsafe(_settle, future, *settled)

    start_daemon(target, f"keel-tool-{job.entry.name}")
    return await future


def _settle(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


async def _answered(message: Any) -> Any:
    return message


def _succeeded(job: _Job, result: Any) -> ToolMessage:
    return succeeded(job.entry, job.call, result)


def _message(call: ToolCall, content: str, status: ToolStatus) -> ToolMessage:
    return tool_message(call, content, status)
