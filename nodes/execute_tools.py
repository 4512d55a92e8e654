"""`execute_tools`: run the last AI message's tool calls under keel's tool-execution contract.

Every tool call gets exactly one `ToolMessage`, whatever happens: success, invalid arguments
(checked against the tool's schema and never executed), unknown tool (with the valid names),
denied, needs approval, rejected, timeout or error. Tools without side effects are retried with
backoff; tools with side effects run at most once per call here, and, with a ledger, at most
once per thread across resumes, retries, replays and crashes (see `keel.db.idempotency`). A
side-effecting call that repeats an earlier call of its turn (same tool, same canonical
arguments) is not run: it shares that call's answer (`keel.tools._duplicates`).

A tool gets what LangGraph's `ToolNode` would inject (`InjectedState`, `InjectedStore`,
`ToolRuntime`: `keel.nodes._inject`), added to the model's arguments only as it is invoked; a
call whose arguments name an injected parameter is `invalid_args`. A tool's `Command` answers
its call with its own `ToolMessage`; keel refuses any other part of it (`keel.nodes._command`).

Under `ainvoke` the calls of one turn run concurrently and a timeout cancels the call. Under
`invoke` they run one after another, and a timed-out call's thread is abandoned (Python cannot
cancel a thread); use `ainvoke` for cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Literal, Unpack

from langchain_core.messages import AIMessage, ToolCall, ToolMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import ToolException
from langgraph.errors import GraphBubbleUp
from langgraph.runtime import Runtime
from pydantic import ValidationError
from tenacity import Retrying, retry_if_not_exception_type, stop_after_attempt, wait_exponential

from keel import outcome
from keel._drive import Op, Steps, adrive, drive, retrying
from keel._node import RunnableCallable, context_of, handed_at, make_node, thread_of
from keel.approvals import decision_of
from keel.db.ledger import Ledger
from keel.errors import UserError
from keel.guards.agent_guards import AgentGuards, GuardOptions
from keel.guards.budget import check_budget, outer_budgets
from keel.guards.gate import Gate
from keel.guards.injection_model import DetectorCalls
from keel.guards.policy import Budget
from keel.guards.resilience import ToolGuard
from keel.guards.screening import ascreen_tool_result, screen_tool_result
from keel.history import in_call_order, pending_tool_calls
from keel.nodes._inject import injected_args, with_injected
from keel.nodes._once import (
    STORAGE_KEY,
    Unknown,
    known_call_ids,
    ledger_key,
    once_steps,
    saved_steps,
    storage_outcome,
    succeeded,
    tool_message,
)
from keel.nodes._threads import start_daemon
from keel.nodes.plan import advance_plan
from keel.state import AgentState, Approval, RunContext, Usage, run_usage
from keel.tools._args import approval_digests, invalid_args, validation_problem
from keel.tools._duplicates import duplicate_answer, duplicates
from keel.tools.registry import RegisteredTool, ToolExited, ToolRegistry
from keel.tools.stubs import stub_answer

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
stopped first) from `respond` (and from keel's `PermissionMiddleware` for a repeat of an
earlier side-effecting call of the same turn, with `keel_duplicate_of`); `unavailable`: the
tool's circuit breaker is open; `blocked`: the input guard withheld the result."""


Known = frozenset[str]
"""The tool-call ids in the thread's history."""


class _Deadline(Exception):
    """keel's own per-call timeout fired (not a `TimeoutError` raised by the tool)."""


@dataclass(frozen=True, slots=True)
class _Job:
    """A call cleared to run."""

    call: ToolCall
    entry: RegisteredTool
    key: tuple[str, str, str, str] | None = None
    """Its idempotency key when it runs through the ledger (`ledger_key`), set once planned."""
    injected: Mapping[str, Any] = field(default_factory=dict)
    """What keel injects (`InjectedState`, `InjectedStore`, `ToolRuntime`), added to the
    model's arguments only as the tool is invoked (`keel.nodes._inject`)."""


@dataclass(frozen=True, slots=True)
class _Duplicate:
    """A call that repeats an earlier one of its turn (`keel.tools._duplicates`).

    It never runs: it is answered with its primary's answer once that exists.
    """

    call: ToolCall
    primary: str
    """The primary's tool-call id."""


def execute_tools(
    tools: ToolRegistry,
    *,
    guards: AgentGuards | None = None,
    name: str = "execute_tools",
    **options: Unpack[GuardOptions],
) -> RunnableCallable:
    """A node that answers every pending tool call of the last AI message with one ToolMessage.

    Args:
        tools: The tools the agent may call.
        guards: What the agent is held to (`AgentGuards.from_policy(policy, ledger)`):
            - the gate decides allow / ask / deny per call; an `ask` call runs only when a
              grant in state sealed by the guards' `grants` for this thread and user matches
              its exact arguments (bound to the policy's name and version);
            - the run budget: calls that would pass its tool-call limit are answered
              `budget_stopped` and the run ends as `budget_exceeded`;
            - the per-tool circuit breaker (`tool_guard`): while a tool's is open the call is
              answered `unavailable` (the model is told what is missing) and the run goes on;
            - the idempotency `ledger`: with one, a side-effecting call in a thread runs at
              most once: a resume, retry or replay gets the recorded result, and a call that
              started but never finished (the process died) is not repeated: the run pauses
              for `human_review` ("did this happen?") unless the tool is `idempotent` or its
              `reconcile` settles it. A call the ledger answers from its record does not touch
              the breaker;
            - the `input_guard`, applied to every result before the model reads it
              (`keel.guards.check_input(..., source="tool")`): an injection is flagged,
              redacted or the result withheld (`keel_status == "blocked"`).
        name: The node's name.
        **options: Single guards instead of (or over) `guards`: `gate`, `policy_version`,
            `policy_name`, `budget`, `tool_guard`, `ledger`, `input_guard`, `grants` (see
            `AgentGuards.of`).
    """
    held = AgentGuards.of(guards, **options)
    ledger = held.ledger
    screening = held.input_guard
    calls = DetectorCalls(held.model, screening.detector if screening is not None else None)

    def plan_calls(
        state: AgentState, config: RunnableConfig, runtime: Runtime[RunContext] | None
    ) -> Steps[list[ToolMessage | _Job | _Duplicate]]:
        messages = state.get("messages") or []
        index, calls = pending_tool_calls(messages)
        request = messages[index] if calls else None  # the model message asking for `calls`
        context = context_of(runtime)
        approvals = held.trusted(thread_of(runtime), context, state.get("approvals"))
        decide = held.deciding(approvals, context)  # standing approvals turn ask into allow
        policy = held.policy_id(context)
        # a repeat of an earlier side-effecting call of the turn is never gated, claimed or run
        dupes = duplicates(request.tool_calls, tools.get) if isinstance(request, AIMessage) else {}
        planned = [
            _Duplicate(c, dupes[c.get("id") or ""].get("id") or "")
            if (c.get("id") or "") in dupes
            else _classify(c, tools, decide, context, approvals, policy)
            for c in calls
        ]
        planned = _within_budget(held.budget, state, planned)
        planned = [_keyed(p, config, ledger) for p in planned]
        planned = [_injecting(p, state, config, runtime, tools) for p in planned]
        durable = any(isinstance(p, _Job) and p.key for p in planned)  # waits for its request
        if durable and not (yield from saved_steps(config, request)):
            planned = _not_saved(planned)
        return planned

    def run(
        job: _Job, config: RunnableConfig, known: Known, alone: bool = True
    ) -> Steps[ToolMessage | Unknown]:
        if (stubbed := _stubbed(job)) is not None:  # a replay or shadow run's stub: the
            return stubbed  # ledger and the breaker are the real ones, and nothing ran
        key, guard = job.key, held.tool_guard
        if key is None or ledger is None:
            return (yield from _guarded(job, config, guard))
        # the breaker is checked in the claim's transaction (`gate`), then only recorded
        guarded = partial(_guarded, job, config, guard, checked=True)
        gate = guard.gate(job.entry.name) if guard is not None else None
        since = handed_at(config)  # a supervisor's earlier task of this agent: not an orphan
        steps = once_steps(
            job.entry, job.call, key, ledger, guarded, known, alone=alone, gate=gate, since=since
        )
        return (yield from steps)

    def invoke(
        state: AgentState, config: RunnableConfig, runtime: Runtime[RunContext]
    ) -> dict[str, Any]:
        planned = drive(plan_calls(state, config, runtime))
        known = known_call_ids(state.get("messages") or [])
        results = [drive(run(p, config, known)) if isinstance(p, _Job) else p for p in planned]
        with calls.counting(state, runtime, sync=True) as spend:
            if screening is not None:
                results = [
                    (screen_tool_result(r, screening) or r) if isinstance(r, ToolMessage) else r
                    for r in results
                ]
        return spend.into(_finish(state, _derived(state, results), _jobs(planned)))

    async def ainvoke(
        state: AgentState, config: RunnableConfig, runtime: Runtime[RunContext]
    ) -> dict[str, Any]:
        planned = await adrive(plan_calls(state, config, runtime))
        known = known_call_ids(state.get("messages") or [])
        alone = _jobs(planned) == 1
        results = await asyncio.gather(
            *(
                adrive(run(p, config, known, alone)) if isinstance(p, _Job) else _answered(p)
                for p in planned
            )
        )
        with calls.counting(state, runtime, sync=False) as spend:
            if screening is not None:
                results = [
                    (await ascreen_tool_result(r, screening) or r)
                    if isinstance(r, ToolMessage)
                    else r
                    for r in results
                ]
        return spend.into(_finish(state, _derived(state, list(results)), _jobs(planned)))

    return make_node(name, invoke, ainvoke)


def _jobs(planned: list[Any]) -> int:
    return sum(isinstance(p, _Job) for p in planned)


def _derived(state: AgentState, results: list[Any]) -> list[Any]:
    """`results` with each duplicate answered by its primary's answer (already screened).

    The primary's answer is this step's or one already in the thread (a human's rejection or
    reply); a duplicate whose primary has none yet (its outcome is unknown) stays unanswered.
    """
    if not any(isinstance(r, _Duplicate) for r in results):
        return results
    messages = state.get("messages") or []
    index, _ = pending_tool_calls(messages)
    by_id = {m.tool_call_id: m for m in messages[index + 1 :] if isinstance(m, ToolMessage)}
    by_id.update((r.tool_call_id, r) for r in results if isinstance(r, ToolMessage))
    out = []
    for r in results:
        if isinstance(r, _Duplicate):
            answer = by_id.get(r.primary)
            if answer is None:
                continue
            r = duplicate_answer(r.call, answer)
        out.append(r)
    return out


def _within_budget(
    budget: Budget | None, state: AgentState, planned: list[ToolMessage | _Job | _Duplicate]
) -> list[Any]:
    """Stop the calls the run budget, or an outer run's (a supervisor's), does not allow."""
    usage = run_usage(state.get("usage"), state.get("clock"))
    started = (state.get("clock") or {}).get("started_at")
    held = [(budget, usage, started, "")] if budget is not None else []
    for o in outer_budgets():
        held.append((o.budget, o.counting(usage), o.started_at, f": the run budget of {o.holder}"))
    out: list[Any] = list(planned)
    for limit, spent, since, whose in held:
        out = _within_one(limit, spent, since, whose, out)
        if out and isinstance(out[-1], dict):  # stopped: the outcome comes last
            break
    return out


def _within_one(
    budget: Budget, usage: Usage, started: float | None, whose: str, planned: list[Any]
) -> list[Any]:
    """Stop the calls `budget` does not allow, `usage` spent against it.

    When a limit is already spent (dollars, tokens, model calls: no model could read the
    results) no call runs; past the tool-call limit, the calls that fit run.
    """
    jobs = _jobs(planned)
    if not jobs:
        return planned
    verdict = check_budget(budget, usage, started_at=started)
    allowed = 0
    if verdict.exceeded is None:
        allowed = jobs
        if budget.tool_calls is not None:
            allowed = min(jobs, int(budget.tool_calls - usage.get("tool_calls", 0)))
        if allowed >= jobs:
            return planned
        verdict = check_budget(budget, usage, started_at=started, planned_tool_calls=allowed + 1)
    reason = (verdict.exceeded or "tool-call budget exhausted") + whose
    out: list[Any] = []
    for p in planned:
        if isinstance(p, _Job):
            if allowed > 0:
                allowed -= 1
            else:
                p = _message(p.call, f"Not run: {reason}.", "budget_stopped")
        out.append(p)
    return [*out, outcome.stopped("budget_exceeded", reason)]


def _finish(state: AgentState, results: list[Any], ran: int) -> dict[str, Any]:
    """The node's update from the calls' results (tool results already read by the guard)."""
    unknown = [r for r in results if isinstance(r, Unknown)]
    stops = [r for r in results if not isinstance(r, ToolMessage | Unknown)]
    results = [r for r in results if isinstance(r, ToolMessage)]
    messages = in_call_order(state.get("messages") or [], results)
    update: dict[str, Any] = {"messages": messages, "usage": {"tool_calls": ran, "steps": 1}}
    lost = [r for r in results if r.response_metadata.get(STORAGE_KEY)]
    if unknown:
        names = ", ".join(sorted({u.call["name"] for u in unknown}))
        update["outcome"] = outcome.interrupted(
            f"outcome unknown: a call to {names} started but never finished; "
            "a human must say whether it happened"
        )
    elif lost:
        update["outcome"] = storage_outcome(lost, lost[0].response_metadata[STORAGE_KEY])
    elif stops:
        update["outcome"] = stops[0]
    steps = state.get("plan")
    if steps and results:
        ok = all(m.status == "success" for m in results)
        update["plan"] = advance_plan(steps, succeeded=ok)
    return update


def _keyed(planned: Any, config: RunnableConfig, ledger: Ledger | None) -> Any:
    """A cleared call with its idempotency key (computed once: canonical JSON and a digest)."""
    if not isinstance(planned, _Job):
        return planned
    return replace(planned, key=ledger_key(planned.entry, planned.call, config, ledger))


def _injecting(
    planned: Any,
    state: AgentState,
    config: RunnableConfig,
    runtime: Runtime[RunContext] | None,
    tools: ToolRegistry,
) -> Any:
    """A cleared call with what keel injects into it, or its error when it cannot be filled."""
    if not isinstance(planned, _Job):
        return planned
    injected = injected_args(planned.entry, planned.call, state, config, runtime, tools)
    if isinstance(injected, str):
        return _message(planned.call, injected, "error")
    return replace(planned, injected=injected) if injected else planned


def _not_saved(planned: list[Any]) -> list[Any]:
    """Answer the ledger calls `error`: the checkpoint holding their request was never saved."""
    return [
        _message(
            p.call,
            f"Error: {p.entry.name} was not run: the checkpoint holding this request was not "
            "saved, so a crash could repeat it. Check the checkpointer's database.",
            "error",
        )
        if isinstance(p, _Job) and p.key is not None
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
        digests = approval_digests(entry, call["args"], policy)
        approval = decision_of(approvals, digests, call.get("id") or "")
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


# -- running the cleared calls: tenacity's retries over one attempt, two drivers --------------

_NOT_RETRIED = (ToolException, ValidationError, _Deadline, GraphBubbleUp, UserError)
"""A tool's own error report, bad arguments, keel's deadline, a LangGraph interrupt, a mistake
in how keel is used (raised to the caller)."""


def _retrying(job: _Job) -> Retrying:
    """A side-effect-free tool's retries: its `attempts`, backoff from `retry_wait` up to 5 s.

    (`ToolSpec` gives side-effecting tools one attempt; see `keel.tools`.)
    """
    spec = job.entry.spec
    return Retrying(
        stop=stop_after_attempt(spec.attempts),
        wait=wait_exponential(multiplier=spec.retry_wait, max=5.0),
        retry=retry_if_not_exception_type(_NOT_RETRIED),
        reraise=True,
    )


def _run(job: _Job, config: RunnableConfig) -> Steps[ToolMessage]:
    """Run the call, retried by tenacity; every failure ends as one ToolMessage."""
    policy = _retrying(job)
    attempt = Op(lambda: _attempt_sync(job, config), lambda: _attempt_async(job, config))
    try:
        result = yield from retrying(policy, partial(_once, attempt))
    except (GraphBubbleUp, UserError):
        raise
    except Exception as exc:
        return _failure(job, exc, policy.statistics["attempt_number"])
    return _succeeded(job, result)


def _stubbed(job: _Job) -> ToolMessage | None:
    """The answer of an active tool stub (replay, shadow runs), the tool left unrun."""
    answer = stub_answer(job.entry, job.call)
    if answer is None:
        return None
    return tool_message(job.call, answer.content, answer.status, keel_stub=True)


def _once(attempt: Op) -> Steps[Any]:
    return (yield attempt)


def _failure(job: _Job, exc: BaseException, attempt: int) -> ToolMessage:
    """The ToolMessage of a call whose last attempt failed with `exc`."""
    if isinstance(exc, _Deadline):
        return _message(job.call, str(exc), "timeout")
    if isinstance(exc, ValidationError):
        return _invalid(job, exc)
    tries = f" after {attempt} attempts" if attempt > 1 else ""
    return _message(
        job.call, f"Error: {job.entry.name} failed{tries}: {type(exc).__name__}: {exc}", "error"
    )


def _invalid(job: _Job, exc: ValidationError) -> ToolMessage:
    """The answer to a call whose arguments the tool refused, naming no value it was given.

    A failure on an injected argument (its annotation does not fit what keel injects) is the
    tool's error, not the model's.
    """
    problem = validation_problem(exc)
    injected = {str(e["loc"][0]) for e in exc.errors() if e["loc"]} & set(job.injected)
    if injected:
        names = ", ".join(repr(n) for n in sorted(injected))
        return _message(
            job.call,
            f"Error: {job.entry.name} was not run: what the agent injects for {names} does not "
            f"fit the tool's annotation ({problem}). Fix the tool's annotation.",
            "error",
        )
    return _message(
        job.call, f"Error: invalid arguments for {job.entry.name}: {problem}", "invalid_args"
    )


def _attempt_sync(job: _Job, config: RunnableConfig) -> Any:
    tool = job.entry.tool
    if getattr(tool, "coroutine", None) is not None and getattr(tool, "func", None) is None:
        raise UserError(
            f"{job.entry.name} is an async tool: run the agent with `ainvoke` / `astream` (or "
            "give the tool a sync function too)."
        )
    timeout = job.entry.spec.timeout
    if timeout is None:
        return _invoke(job, config)
    return _call_in_thread(job, config, timeout)


def _invoke(job: _Job, config: RunnableConfig) -> Any:
    """The sync call; `SystemExit` from a LangChain tool's body is its failure (`ToolExited`).

    A keel tool converts it itself, under `ainvoke` too; a LangChain tool's async body cannot
    be reached (LangChain runs it in a task of its own).
    """
    try:
        return job.entry.tool.invoke(with_injected(job.call, job.injected), config)
    except SystemExit as exc:
        raise ToolExited(job.entry.name, exc) from None


async def _attempt_async(job: _Job, config: RunnableConfig) -> Any:
    timeout = job.entry.spec.timeout
    deadline = asyncio.timeout(timeout)
    try:
        async with deadline:
            if _is_sync(job.entry):
                return await _in_daemon_thread(job, config)
            return await job.entry.tool.ainvoke(with_injected(job.call, job.injected), config)
    except TimeoutError:
        if not deadline.expired():
            raise
        raise _Deadline(
            f"Error: {job.entry.name} did not finish within {timeout:g} s and was cancelled."
        ) from None


# -- the tool's circuit breaker around a run (keel.guards.resilience) ------------------------


def _guarded(
    job: _Job, config: RunnableConfig, guard: ToolGuard | None, checked: bool = False
) -> Steps[ToolMessage]:
    """Run the call under its breaker, and record its result.

    The breaker is checked first, unless the call's claim `checked` it already.
    """
    if guard is None:
        return (yield from _run(job, config))
    tool = job.entry.name
    if not checked:
        refused = yield Op(lambda: guard.check(tool), lambda: guard.acheck(tool))
        if refused is not None:
            return _message(job.call, refused, "unavailable")
    result = yield from _run(job, config)
    status = str(result.response_metadata.get("keel_status"))
    yield Op(lambda: guard.record(tool, status), lambda: guard.arecord(tool, status))
    return result


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
            box["value"] = ctx.run(_invoke, job, config)
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
                ctx.run(_invoke, job, config),
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
