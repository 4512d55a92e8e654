"""keel's guards as LangChain `AgentMiddleware`, for `langchain.agents.create_agent`.

Each middleware calls the same decisions as keel's nodes (`check_budget`, `PermissionMatrix`,
`detect_loop`, `ModelGuard` / `ToolGuard` over `RateLimiter` and `CircuitBreaker`), and each
hooks in through `wrap_model_call` / `wrap_tool_call` only, so none adds a graph node.

- `BudgetMiddleware`: run budgets in tokens, dollars, model and tool calls (usage read back
  from the messages' `usage_metadata` and priced by the price table, and kept in its own
  records, `SPENT_KEY`, which a client's state update cannot lower);
- `PermissionMiddleware`: the policy's rules, default deny; `ask` pauses the call with
  LangChain's per-call human-in-the-loop interrupt (`{"type": "tool_approval", ...}`),
  answered with a LangChain `Decision` (`approve`, `edit`, `reject`, `respond`); a repeat of
  an earlier side-effecting call of the turn is neither asked about nor run (`not_run`), nor
  is a call a reviewer rejected earlier on the thread (`rejected`, kept in the agent's state
  under `REJECTIONS_KEY`, its `state_schema`);
- `RateLimitMiddleware`: RPM / TPM buckets shared through the ledger;
- `CircuitBreakerMiddleware`: per-model and per-tool breakers shared through the ledger;
- `LoopGuardMiddleware`: repeated calls and A-B-A-B cycles stop the run or force a wrap-up
  (the run's calls kept in its records, `CALLS_KEY`).

A guard that stops the run answers in the model's place with an AI message without tool calls
(so the agent ends) whose `response_metadata["keel_outcome"]` is keel's `Outcome`;
`outcome_of(result)` reads it back (or `completed`).

As `build_agent` does, every keel model hook stores a model's answer with unique call ids and
JSON arguments, and answers an answer of only malformed tool calls and asks again (`_stored`);
every keel tool hook answers a tool's error `error` instead of raising it (`_ran`).
"""

from __future__ import annotations

import hmac
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from typing import Annotated, Any, Literal, NotRequired, TypeVar, cast

from langchain.agents.middleware import AgentMiddleware, ModelRequest, ModelResponse
from langchain.agents.middleware.types import (
    AgentState,
    ExtendedModelResponse,
    PrivateStateAttr,
    ToolCallRequest,
)
from langchain_core.messages import AIMessage, AnyMessage, BaseMessage, ToolMessage
from langchain_core.tools import BaseTool
from langgraph._internal._constants import OVERWRITE
from langgraph.channels.binop import BinaryOperatorAggregate
from langgraph.config import get_config
from langgraph.errors import GraphBubbleUp, is_invalid_resume
from langgraph.types import Command, Overwrite

from keel import outcome
from keel._drive import Op, Steps, adrive, both, call, drive
from keel._node import (
    NO_RESUME,
    ask,
    asked_before,
    context_of,
    peek_resume,
    refused_resume,
    void_resume,
)
from keel.approvals import REVIEWER_META, Grants, decision_of
from keel.db.audit import AuditLog, AuditRecord
from keel.db.ledger import Ledger
from keel.errors import UserError
from keel.guards.breaker import BreakerPolicy, CircuitBreaker, CircuitOpen
from keel.guards.budget import RAN, check_budget, run_messages, usage_from_messages, usage_of
from keel.guards.gate import GateDecision
from keel.guards.loop import call_sequence, detect_loop, loop_window, wrap_up_note
from keel.guards.permissions import PermissionMatrix
from keel.guards.policy import Budget, LoopPolicy, Policy
from keel.guards.ratelimit import RateLimit, RateLimited, RateLimiter
from keel.guards.resilience import ModelGuard, ToolGuard
from keel.guards.spend import estimate_tokens
from keel.history import (
    invalid_call_answers,
    malformed_stop,
    tool_turns_as_text,
    valid_history,
)
from keel.identity import reviewer_of, server_user
from keel.models import model_name_of, price_name_of
from keel.pricing import PriceTable, token_count, unpriced
from keel.redact import sanitized_logger
from keel.state import Approval, Outcome, RunContext, Usage, add_usage, merge_approvals, task_start
from keel.tools._args import approval_digests, invalid_args, json_args, unique_ids
from keel.tools._duplicates import DUPLICATE_KEY, duplicates
from keel.tools._injected import spoofed
from keel.tools.registry import registered
from keel.tools.stubs import isolated, stub_answer, stub_message

__all__ = [
    "CALLS_KEY",
    "REJECTIONS_KEY",
    "SPENT_KEY",
    "BudgetMiddleware",
    "CircuitBreakerMiddleware",
    "LoopGuardMiddleware",
    "PermissionMiddleware",
    "RateLimitMiddleware",
    "RejectionsChannel",
    "RunRecordsChannel",
    "outcome_of",
]

ModelHandler = Callable[[ModelRequest[Any]], ModelResponse[Any]]
AsyncModelHandler = Callable[[ModelRequest[Any]], Awaitable[ModelResponse[Any]]]
ToolHandler = Callable[[ToolCallRequest], ToolMessage | Command[Any]]
AsyncToolHandler = Callable[[ToolCallRequest], Awaitable[ToolMessage | Command[Any]]]
ExitBehavior = Literal["end", "error"]
_DEFAULT_CONTEXT = RunContext()
log = sanitized_logger("keel.guards.middleware")
_R = TypeVar("_R")


# -- helpers every middleware shares ------------------------------------------------------


def stop_message(result: Outcome) -> AIMessage:
    """The answer a guard gives in the model's place: it ends the agent with `result`."""
    return AIMessage(
        content=f"Stopped ({result['terminated_reason']}): {result['detail']}.",
        response_metadata={"keel_outcome": result},
    )


def outcome_of(result: Mapping[str, Any]) -> Outcome:
    """The keel `Outcome` of a `create_agent` run guarded by keel's middleware.

    A guard's stop is read from the last AI message; an agent that answered is `completed`.
    One whose last answer holds only malformed tool calls (`invalid_tool_calls`: keel's model
    hooks ask the model again, but an `after_model` hook in the agent drops LangChain's
    `jump_to` before the agent routes, and the agent ends there) failed: it gave no answer.
    """
    messages: Sequence[BaseMessage] = result.get("messages") or []
    last = next((m for m in reversed(messages) if isinstance(m, AIMessage)), None)
    if last is None:
        return outcome.failed("the agent produced no answer")
    stopped = last.response_metadata.get("keel_outcome")
    if isinstance(stopped, dict):
        return stopped  # type: ignore[return-value]
    if last.invalid_tool_calls and not last.tool_calls:
        names = ", ".join(sorted({c.get("name") or "?" for c in last.invalid_tool_calls}))
        return outcome.failed(
            f"the agent ended on a model answer of only malformed tool calls ({names}: arguments "
            "not valid JSON) and gave no answer"
        )
    return outcome.completed()


def _context(runtime: object) -> RunContext:
    """The run's identity, as keel's nodes take it (`keel._node.context_of`).

    Under LangGraph server with keel's auth it is the authenticated user's; whatever `context`
    the client sent is ignored.
    """
    if server_user(runtime) is not None:
        return context_of(runtime)  # type: ignore[arg-type]
    ctx = getattr(runtime, "context", None)
    if isinstance(ctx, RunContext):
        return ctx
    if isinstance(ctx, Mapping):
        return RunContext(**ctx)
    return _DEFAULT_CONTEXT


def _tool_message(request: ToolCallRequest, content: str, status: str) -> ToolMessage:
    call = request.tool_call
    return ToolMessage(
        content=content,
        tool_call_id=call.get("id") or "",
        name=call["name"],
        status="error",
        response_metadata={"keel_status": status},
    )


def _ran(request: ToolCallRequest, handler: Callable[..., Any]) -> Steps[Any]:
    """The tool node's answer to `request`, or the `error` answer to a tool that raised.

    `create_agent`'s `ToolNode` (its default `handle_tool_errors`) answers only arguments that
    do not fit, and raised any other error of a tool out of `invoke`. As `build_agent`'s
    `execute_tools`, a tool's error is its call's answer (`Error: <tool> failed: <type>:
    <error>`, `keel_status="error"`) and the run goes on. A pause (a LangGraph interrupt), a
    resume value its interrupt refused, and a `UserError` (a mistake in how keel is used) are
    raised, as there.
    """
    try:
        return (yield call(handler, request))
    except (GraphBubbleUp, UserError):
        raise
    except Exception as exc:
        if is_invalid_resume(exc):
            raise
        name = request.tool_call["name"]
        return _tool_message(request, f"Error: {name} failed: {type(exc).__name__}: {exc}", "error")


def _stored(request: ModelRequest[Any], response: _R) -> _R:
    """`response` with its answers as `build_agent`'s `call_model` stores a model's answer.

    Each tool call under an id no other call of the thread has (`unique_ids`: a model that
    named two calls alike had both answered under one id, and a resume or a rejection keyed by
    it could not tell them apart), and its arguments as JSON carries them (`json_args`: a key
    JSON cannot write, a tuple or a frozenset at any depth, is written as its canonical JSON,
    so the checkpoint can store the answer, where it raised `TypeError` and left the thread
    unsaved, and the tool's schema reads the arguments as a provider's: `invalid_args` when
    they do not fit). An answer of only malformed tool calls is answered and asked again
    (`_malformed`). Every keel middleware's model hook applies it, so one of them is enough.
    """
    if isinstance(response, ExtendedModelResponse):
        inner = _stored_answers(request, response.model_response)
        if inner is response.model_response:
            return response
        return cast("_R", replace(response, model_response=inner))
    return _malformed(request, _stored_answers(request, response))


def _stored_answers(request: ModelRequest[Any], response: _R) -> _R:
    """`response` with each AI message stored as `_stored` says (ids, arguments)."""
    if isinstance(response, AIMessage):
        history = request.state.get("messages") if isinstance(request.state, Mapping) else None
        return cast("_R", unique_ids(json_args(response), history or []))
    if not isinstance(response, ModelResponse):
        return response
    result = [
        _stored_answers(request, m) if isinstance(m, AIMessage) else m for m in response.result
    ]
    if all(a is b for a, b in zip(result, response.result, strict=True)):
        return response
    return cast("_R", replace(response, result=result))


def _malformed(request: ModelRequest[Any], response: _R) -> _R:
    """`response`, its malformed tool calls answered as `build_agent`'s `call_model` answers them.

    A provider's call whose arguments did not parse (`invalid_tool_calls`) is no tool call to
    `create_agent`: beside valid calls it went unanswered until LangChain's next model call
    answered it its own way (no keel status), and alone it ended the run `completed` with an
    empty answer. As in `build_agent`, each is answered `invalid_args` with the answer; an answer
    of only such calls has the model asked again (the agent jumps back to the model), and at
    `MALFORMED_TURNS` such answers in a row the run ends as `error`, a `ModelBehaviorError`
    (`keel.history.malformed_stop`).
    """
    messages: list[BaseMessage] = [response] if isinstance(response, AIMessage) else []
    if isinstance(response, ModelResponse):
        messages = response.result
    last = next((m for m in reversed(messages) if isinstance(m, AIMessage)), None)
    if last is None or not last.invalid_tool_calls:
        return response
    answered = {m.tool_call_id for m in messages if isinstance(m, ToolMessage)}
    if all((c.get("id") or "") in answered for c in last.invalid_tool_calls):
        return response  # a keel hook inside this one answered them
    structured = response.structured_response if isinstance(response, ModelResponse) else None
    history = request.state.get("messages") if isinstance(request.state, Mapping) else None
    result: list[BaseMessage] = [*messages, *invalid_call_answers(last)]
    stop = None if last.tool_calls else malformed_stop(history or [], model_name_of(request.model))
    if stop is not None:
        result.append(stop_message(stop))
    answer = ModelResponse(result=result, structured_response=structured)
    if stop is not None or last.tool_calls:  # the valid calls run, then the model reads all
        return cast("_R", answer)
    return cast(
        "_R",
        ExtendedModelResponse(model_response=answer, command=Command(update={"jump_to": "model"})),
    )


def _exit(behavior: object) -> ExitBehavior:
    if behavior not in ("end", "error"):
        raise UserError(f"exit_behavior must be 'end' or 'error', got {behavior!r}.")
    return behavior


# -- budget -------------------------------------------------------------------------------


SPENT_KEY = "keel_spent"
"""`BudgetMiddleware`'s state key: what each run spent, one record per model answer and per
tool call that ran, written by the middleware beside the message it counts."""

CALLS_KEY = "keel_calls"
"""`LoopGuardMiddleware`'s state key: each run's tool calls, one record per model answer
(`calls`: each call as the tool reads it), written beside the answer."""

_COUNTS = ("input_tokens", "output_tokens", "usd", "model_calls", "steps", "tool_calls")


def merge_records(
    left: Mapping[str, Any] | None, right: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Reducer of `SPENT_KEY` and `CALLS_KEY`: records accumulate by key; none is removed.

    A record written again under its key keeps its run, turn and calls, and the larger of each
    count (a tool call's task run again after a pause writes the same record). Whatever is not
    a record (no run, a count that is no finite non-negative number, calls that are not pairs
    of text) is dropped.
    """
    out = _records(left)
    for key, record in _records(right).items():
        kept = out.get(key)
        if kept is not None:
            counts = [f for f in _COUNTS if f in kept or f in record]
            record = {**kept, **{f: max(kept.get(f, 0), record.get(f, 0)) for f in counts}}
        out[key] = record
    return out


def _records(found: object) -> dict[str, Any]:
    """The well-formed records of `found` (a mapping of key to record)."""
    out: dict[str, Any] = {}
    for key, record in found.items() if isinstance(found, Mapping) else ():
        if not (isinstance(key, str) and isinstance(record, Mapping)):
            continue
        run, turn, calls = record.get("run"), record.get("turn", ""), record.get("calls", [])
        counts = {f: record[f] for f in _COUNTS if f in record}
        if (
            isinstance(run, str)
            and isinstance(turn, str)
            and isinstance(calls, list | tuple)
            and all(
                isinstance(c, list | tuple) and len(c) == 2 and all(isinstance(x, str) for x in c)
                for c in calls
            )
            and all(
                isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v < float("inf")
                for v in counts.values()
            )
        ):
            out[key] = {"run": run, "turn": turn, **counts}
            if calls:
                out[key]["calls"] = [list(c) for c in calls]
    return out


class RunRecordsChannel(BinaryOperatorAggregate[dict[str, Any]]):
    """The channel of `SPENT_KEY` and `CALLS_KEY`: every write merges (`merge_records`).

    LangGraph's own channel stores the first write of an empty key as written and takes an
    `Overwrite` as the key's whole value. Here every write goes through `merge_records`, and
    an `Overwrite` (or its JSON form) is dropped with a warning, not raised: LangGraph saves a
    run's `Command(update=...)` before applying it, and a channel that raised would refuse
    every later read of the thread. A client that may update the thread's state can add
    records (they only count against its own runs), never remove, lower or rewrite one.
    """

    def __init__(
        self,
        typ: Any = dict,
        operator: Callable[[Any, Any], dict[str, Any]] = merge_records,
    ) -> None:
        super().__init__(typ, operator)

    def update(self, values: Sequence[Any]) -> bool:
        """Merge `values`' records; drop an overwrite."""
        if not values:
            return False
        kept = _records(self.value) if self.is_available() else {}
        for value in values:
            if _overwrites(value):
                log.warning("keel's run records cannot be overwritten or cleared: write dropped")
                continue
            kept = merge_records(kept, value)
        self.value = kept
        return True


class BudgetState(AgentState[Any]):
    """The state `BudgetMiddleware` adds to `create_agent`'s: what each run spent.

    Private (`PrivateStateAttr`): not in the agent's input or output schema.
    """

    keel_spent: NotRequired[Annotated[dict[str, Any], PrivateStateAttr, RunRecordsChannel()]]


class LoopState(AgentState[Any]):
    """The state `LoopGuardMiddleware` adds to `create_agent`'s: each run's tool calls.

    Private (`PrivateStateAttr`): not in the agent's input or output schema.
    """

    keel_calls: NotRequired[Annotated[dict[str, Any], PrivateStateAttr, RunRecordsChannel()]]


def _run_records(messages: Sequence[BaseMessage], found: object) -> list[dict[str, Any]]:
    """The current run's records in `found`, in the order written, whatever its messages say.

    The run is the one its messages start (`task_start`'s user message); its records are all
    those written since its first one: a run whose start a client removed (or rewrote) reads
    from an earlier run's start on (more, never less). A run with no record yet has none.
    """
    records = list(_records(found).values())
    run = _run_id(messages) if task_start(messages) >= 0 else None
    first = next((i for i, r in enumerate(records) if r["run"] == run), None)
    if run is not None and first is None:
        return []
    return records[first or 0 :]


def _run_spent(messages: Sequence[BaseMessage], found: object) -> Usage:
    """What the current run spent by `SPENT_KEY`'s records (`_run_records`)."""
    records = _run_records(messages, found)
    total: Usage = {}
    for r in records:
        total = add_usage(total, cast("Usage", {f: r[f] for f in _COUNTS if f in r}))
    turns = {r["turn"] for r in records if r.get("tool_calls")}  # each round of tool results
    return add_usage(total, {"steps": len(turns)}) if turns else total


def _larger(one: Usage, other: Usage) -> Usage:
    """The larger of each count of `one` and `other`."""
    a, b = cast("Mapping[str, float]", one), cast("Mapping[str, float]", other)
    return cast("Usage", {k: max(a.get(k, 0), b.get(k, 0)) for k in {*a, *b}})


class BudgetMiddleware(AgentMiddleware[Any, Any, Any]):
    """Stops a `create_agent` run at a keel `Budget`: tokens, dollars, model and tool calls.

    Before each model call the run's usage (from the messages) is checked with `check_budget`;
    a spent budget ends the run as `budget_exceeded`. A tool call past the `tool_calls` limit
    is answered `budget_stopped`, and the next model turn ends the run; of the calls of one
    turn (run in parallel), those that fit run, in the turn's order, as in `build_agent`.
    `wall_seconds` is not enforced here (`create_agent` has no run clock); use LangGraph's
    `TimeoutPolicy`.

    The run's usage is the larger, count by count, of what its messages say and of the
    middleware's own records (`SPENT_KEY`, its private state: one per answer and per call that
    ran, written beside it): a client that removes or rewrites the run's turns while it waits
    for a human lowers neither. A user message starts a new run, as in `build_agent`.

    Under a `usd` limit every call must have a price: a call to a model the price table does
    not know is not made (the run ends as `budget_exceeded`, the detail says which model to
    price and how), and an answer whose reported model name the table does not know is priced
    by the model that was called (`response_metadata["keel_priced_as"]`).

    Example:
        ```python
        agent = create_agent(model, tools, middleware=[BudgetMiddleware(Budget(usd=0.50))])
        ```
    """

    def __init__(self, budget: Budget, *, prices: PriceTable | None = None) -> None:
        """Hold runs to `budget`, pricing calls with `prices` (the default table if omitted)."""
        super().__init__()
        if not isinstance(budget, Budget):
            raise UserError(f"BudgetMiddleware needs a keel Budget(...), got {budget!r}.")
        self.budget = budget
        self.prices = prices or PriceTable()
        self.usd_limit = f"the run budget's usd limit of {budget.usd:g}" if budget.usd else None
        """The dollar limit in words; `None` without one."""

    state_schema = BudgetState

    def _usage(
        self, state: Mapping[str, Any], default_name: str = "unknown"
    ) -> tuple[Usage, Outcome | None]:
        """The run's usage, and the stop when a dollar limit meets an answer with no price.

        The larger of what its messages and its records (`SPENT_KEY`) say, count by count: a
        client that removes or rewrites the run's messages lowers neither.
        """
        messages = state["messages"]
        try:
            usage = usage_from_messages(
                run_messages(messages), self.prices, default_name, usd_limit=self.usd_limit
            )
        except UserError as exc:
            return {}, outcome.stopped("budget_exceeded", str(exc))
        return _larger(usage, _run_spent(messages, state.get(SPENT_KEY))), None

    def _stop(self, state: Mapping[str, Any], model: Any = None) -> AIMessage | None:
        messages = state["messages"]
        for m in reversed(messages):  # the last turn's tools: one stopped by the budget?
            if isinstance(m, AIMessage):
                break
            if isinstance(m, ToolMessage) and m.response_metadata.get("keel_status") == (
                "budget_stopped"
            ):
                reason = str(m.response_metadata.get("keel_reason"))
                return stop_message(outcome.stopped("budget_exceeded", reason))
        name = price_name_of(model) if model is not None else "unknown"
        if self.usd_limit is not None and self.prices.price_of(name) is None:
            return stop_message(outcome.stopped("budget_exceeded", unpriced(name, self.usd_limit)))
        usage, unpriced_stop = self._usage(state, name)
        if unpriced_stop is not None:
            return stop_message(unpriced_stop)
        exceeded = check_budget(self.budget, usage).exceeded
        return stop_message(outcome.stopped("budget_exceeded", exceeded)) if exceeded else None

    def _priced(self, response: Any, model: Any) -> Any:
        """`response`, its answers whose reported model has no price marked with the model's."""
        name = price_name_of(model)
        if self.prices.price_of(name) is None:
            return response
        for m in _answers(response):
            reported = m.response_metadata.get("model_name")
            if not reported or self.prices.price_of(str(reported)) is None:
                m.response_metadata["keel_priced_as"] = name
        return response

    def _counted(self, request: ModelRequest[Any], response: Any) -> Any:
        """`response`, with the record of each of its answers' usage in `SPENT_KEY`."""
        name = price_name_of(request.model)
        run = _run_id(request.state["messages"])
        records: dict[str, Any] = {}
        for m in _answers(response):
            m.id = m.id or f"lc_{uuid.uuid4()}"
            usage = usage_of(m, self.prices, name)  # as `usage_from_messages` counts it
            records[m.id] = {"run": run, "turn": m.id, **usage}
        return _with_records(response, SPENT_KEY, records)

    def wrap_model_call(self, request: ModelRequest[Any], handler: ModelHandler) -> Any:
        """Call the model unless the budget is spent (or the model has no price under `usd`)."""
        stop = self._stop(request.state, request.model)
        if stop is not None:
            return stop
        response = self._priced(_stored(request, handler(request)), request.model)
        return self._counted(request, response)

    async def awrap_model_call(self, request: ModelRequest[Any], handler: AsyncModelHandler) -> Any:
        """Call the model unless the budget is spent (async)."""
        stop = self._stop(request.state, request.model)
        if stop is not None:
            return stop
        response = self._priced(_stored(request, await handler(request)), request.model)
        return self._counted(request, response)

    def _refuse_tool(self, request: ToolCallRequest) -> ToolMessage | None:
        usage, unpriced_stop = self._usage(request.state)
        if unpriced_stop is not None:
            reason = unpriced_stop["detail"]
            message = _tool_message(request, f"Not run: {reason}", "budget_stopped")
            message.response_metadata["keel_reason"] = reason
            return message
        planned = 1 + _ahead(request)
        exceeded = check_budget(self.budget, usage, planned_tool_calls=planned).exceeded
        if exceeded is None:
            return None
        message = _tool_message(request, f"Not run: {exceeded}.", "budget_stopped")
        message.response_metadata["keel_reason"] = exceeded
        return message

    def wrap_tool_call(self, request: ToolCallRequest, handler: ToolHandler) -> Any:
        """Run the tool unless the tool-call budget is spent."""
        if (refused := self._refuse_tool(request)) is not None:
            return refused
        return _tool_counted(request, _marked(drive(_ran(request, handler)), _unrun(request)))

    async def awrap_tool_call(self, request: ToolCallRequest, handler: AsyncToolHandler) -> Any:
        """Run the tool unless the tool-call budget is spent (async)."""
        if (refused := self._refuse_tool(request)) is not None:
            return refused
        result = _marked(await adrive(_ran(request, handler)), _unrun(request))
        return _tool_counted(request, result)


def _with_records(response: Any, key: str, records: dict[str, Any]) -> Any:
    """A model call's `response`, writing `records` under `key` beside its answers."""
    if not records:
        return response
    if isinstance(response, ExtendedModelResponse):
        command = response.command or Command()
        written = command.update if isinstance(command.update, dict) else {}
        return replace(response, command=replace(command, update={**written, key: records}))
    inner = ModelResponse(result=[response]) if isinstance(response, AIMessage) else response
    return ExtendedModelResponse(model_response=inner, command=Command(update={key: records}))


def _run_id(messages: Sequence[BaseMessage]) -> str:
    """The id of the user message that started the current run ("" without one)."""
    start = task_start(messages)
    return str(messages[start].id or "") if start >= 0 else ""


def _tool_counted(request: ToolCallRequest, result: Any) -> Any:
    """`result`, with a record in `SPENT_KEY` of each of its calls that ran (`RAN`)."""
    messages = request.state["messages"]
    turn = next((m for m in reversed(messages) if isinstance(m, AIMessage)), None)
    run, turn_id = _run_id(messages), str(turn.id or "") if turn is not None else ""
    records = {
        f"tool:{m.tool_call_id}": {"run": run, "turn": turn_id, "tool_calls": 1}
        for m in _answers_of(result)
        if (_status_of(m) or "success") in RAN
    }
    if not records:
        return result
    if isinstance(result, Command):
        update = result.update if isinstance(result.update, dict) else {}
        return replace(result, update={**update, SPENT_KEY: records})
    return Command(update={"messages": [result], SPENT_KEY: records})


def _ahead(request: ToolCallRequest) -> int:
    """The calls of `request`'s turn before it, not answered in the state: counted as run.

    `create_agent` runs the calls of a turn as parallel tasks that read the same state, so each
    saw the turn's other calls as unspent budget: a model that asked for ten calls at once ran
    all ten under `tool_calls=2`. As in `build_agent`, the calls that fit run, in the turn's
    order; the rest are answered `budget_stopped`. An earlier call later refused (denied,
    rejected) still counts here: the budget is held, never overrun; one the tool node answers
    without running its tool (no such tool, arguments its schema refuses) does not, as in
    `build_agent`: it never runs, whatever a human or a rule says.
    """
    messages = request.state.get("messages") if isinstance(request.state, Mapping) else None
    call_id = request.tool_call.get("id")
    if not isinstance(messages, Sequence) or not call_id:
        return 0
    turn = next((m for m in reversed(messages) if isinstance(m, AIMessage)), None)
    ids = [c.get("id") for c in (turn.tool_calls if turn is not None else [])]
    if call_id not in ids:
        return 0
    answered = {m.tool_call_id for m in messages if isinstance(m, ToolMessage)}
    # the tool node's tools (none known: every earlier call counts, the budget is held)
    tools = {t.name: t for t in getattr(request.runtime, "tools", None) or ()}
    calls = turn.tool_calls if turn is not None else []
    return sum(
        1
        for c in calls[: ids.index(call_id)]
        if c.get("id") not in answered
        and not (tools and _unrun_call(tools.get(c["name"]), c.get("args")))
    )


# -- permissions --------------------------------------------------------------------------


REJECTIONS_KEY = "keel_rejections"
"""`PermissionMiddleware`'s state key: the thread's rejections by human reviewers, by digest."""


def merge_rejections(
    left: Mapping[str, Approval] | None, right: Mapping[str, Any] | None
) -> dict[str, Approval]:
    """Reducer of `REJECTIONS_KEY`: rejections accumulate by digest (`merge_approvals`).

    The calls of a turn run as tasks of their own, so rejections given in one resume merge.
    The key holds what `PermissionMiddleware` writes, rejections only: a write of anything else
    (an approval, a record that is not one) is refused with a `UserError`.
    """
    return merge_approvals(_rejections(left), _rejections(right, refuse=True))


class RejectionsChannel(BinaryOperatorAggregate[dict[str, Approval]]):
    """The channel of `REJECTIONS_KEY`: only the rejections `PermissionMiddleware` seals get in.

    Every write goes through `merge_rejections` (LangGraph's own channel stores the first
    write of an empty key as written, and takes a value written past the reducer, `Overwrite`,
    as the key's whole value). A client that may update the thread's state (`update_state`,
    `Command(update=...)`, served or embedded) therefore cannot clear the rejections: an
    `Overwrite` (or its JSON forms, `{"__overwrite__": ...}`) is refused with a `UserError`; nor
    forge one: a rejection whose seal (`keel.approvals.Grants.sign_rejection`, under the
    approval secret) does not verify is dropped, so it neither stops a call nor names a
    reviewer. A rejection sealed under another secret (this process's random one, after a
    restart: set `KEEL_APPROVAL_SECRET`) is dropped too: its call is then asked about again.
    """

    def __init__(
        self,
        typ: Any = dict,
        operator: Callable[[Any, Any], dict[str, Approval]] = merge_rejections,
    ) -> None:
        super().__init__(typ, operator)

    def update(self, values: Sequence[Any]) -> bool:
        """Merge `values`' sealed rejections; refuse an overwrite or a record of anything else."""
        if not values:
            return False
        kept = _rejections(self.value) if self.is_available() else {}
        grants = Grants.from_secret()
        for value in values:
            if _overwrites(value):
                raise UserError(
                    f"{REJECTIONS_KEY!r} cannot be overwritten or cleared: it keeps the thread's "
                    "rejections by human reviewers, and only PermissionMiddleware writes it. A "
                    "rejected call stays rejected on this thread; to have it asked again, start "
                    "a new thread."
                )
            written = merge_rejections({}, value)
            sealed = {k: r for k, r in written.items() if _sealed(grants, k, r)}
            kept = merge_approvals(kept, sealed)
        self.value = kept
        return True


def _overwrites(value: object) -> bool:
    """Whether `value` is LangGraph's `Overwrite`, typed or in one of its JSON forms."""
    if isinstance(value, Overwrite):
        return True
    return isinstance(value, Mapping) and (OVERWRITE in value or value.get("type") == OVERWRITE)


def _sealed(grants: Grants, key: str, record: Mapping[str, Any]) -> bool:
    """Whether `record`'s seal is keel's (`Grants.sign_rejection`)."""
    seal = record.get("seal")
    if not isinstance(seal, str):
        return False
    return hmac.compare_digest(seal, grants.sign_rejection(key, record))


def _rejections(found: object, *, refuse: bool = False) -> dict[str, Approval]:
    """The rejection records of `found`; with `refuse`, anything else raises a `UserError`."""
    out: dict[str, Approval] = {}
    items = found.items() if isinstance(found, Mapping) else None
    if items is None and found is not None and refuse:
        raise _not_rejections(f"a {type(found).__name__}")
    for key, record in items or ():
        if (
            isinstance(record, Mapping)
            and record.get("decision") == "rejected"
            and record.get("digest") == key
            and isinstance(key, str)
            and isinstance(record.get("tool"), str)
        ):
            out[key] = cast("Approval", dict(record))
        elif refuse:
            raise _not_rejections(f"{record!r} under {key!r}")
    return out


def _not_rejections(what: str) -> UserError:
    return UserError(
        f"{REJECTIONS_KEY!r} holds only the rejections PermissionMiddleware records when a "
        f"human rejects a call, each under its digest; it cannot take {what}. An approval is "
        "never read from state: answer the call's interrupt with Command(resume=...)."
    )


class PermissionState(AgentState[Any]):
    """The state `PermissionMiddleware` adds to `create_agent`'s: the thread's rejections.

    Private (`PrivateStateAttr`): not in the agent's input or output schema, so a run's input
    cannot set it (LangGraph drops the key).
    """

    keel_rejections: NotRequired[
        Annotated[dict[str, Approval], PrivateStateAttr, RejectionsChannel()]
    ]


def _valid(request: ModelRequest[Any]) -> ModelRequest[Any]:
    """`request` with a history every provider accepts (`keel.history.valid_history`)."""
    return request.override(messages=cast("list[AnyMessage]", valid_history(request.messages)))


class PermissionMiddleware(AgentMiddleware[Any, Any, Any]):
    """A policy's permission rules for `create_agent`: allow, ask a human, or deny (default).

    Roles come from the run's `RunContext` (`create_agent(..., context_schema=RunContext)` and
    `invoke(..., context=RunContext(roles=(...)))`). A denied call is never run: the model gets
    `Not permitted: … (rule: …)`. An `ask` call pauses with LangChain's per-call interrupt
    (`{"type": "tool_approval", "tool_call_id", "name", "args", "description"}`); resume with
    `Command(resume={"type": "approve"})`, `{"type": "edit", "edited_action": {"name": ...,
    "args": {...}}}`, `{"type": "reject", "message": ...}` or `{"type": "respond", "message":
    ...}`, alone or as `{"decisions": [decision]}`. Edited arguments are checked against the
    tool's schema and the rules again. A decision answers the call it is asked about alone: an
    answer keel cannot take (another type, several decisions, a dict keyed by call ids, one
    naming another call, an edit to another tool or to arguments that do not fit) raises a
    `UserError` before it is used: nothing runs, and the call waits for a right answer. With
    several calls waiting, answer each interrupt by its id; each answer is checked on its own,
    and the calls answered rightly in the same resume run and keep their results. An answer is
    taken only by a call that asked (its interrupt saved in its checkpoint): a resume value
    that reaches a call its step runs for the first time is refused and voided, and nothing
    runs (`invoke(None)` asks a human about the call; LangGraph kept the refused value, and
    every later `invoke(None)` met the same refusal). A task
    that asks again (a middleware around this one runs the call again) has each answer checked
    before it is taken. `update_state` drops a waiting call's question (LangGraph keeps no
    pending interrupt across it): `invoke(None)` asks again; a plain resume sent after the
    update is refused with a `UserError` saying so, and voided (where it was saved, the parent
    graph's checkpoint under a parent): it never answers the call. An answer is taken only by
    the call its task asked about (the saved question's call id, tool and arguments): a call a
    client's `Command(goto=Send(...))` put in a waiting task's place (LangGraph names sent
    tasks by their place) is refused, the answer voided, and `invoke(None)` asks about it.

    With `ledger=`, each call it answers is written to the audit log as `build_agent` writes it
    (one `tool` record: the rules' decision, the status, the rule, who, the thread and run), and
    each human decision as `human_review` writes it (one `approval` record: `approved`, `edited`
    with the edited arguments, `rejected` or `responded` with the reply, and the `approver`).

    A call to no tool is left to the tool node, and one with arguments its tool's schema refuses
    is answered `invalid_args`, both before any rule, as `build_agent` answers them: no human is
    asked about a call that cannot run, and a deny rule does not hide what the model must fix.

    A call to a side-effecting tool with the same arguments as an earlier call of its turn is
    answered `not_run` (`keel_duplicate_of` names the earlier call), never asked about or run;
    so is a call a reviewer's edit makes the twin of another call of its turn.

    A reviewer's rejection is kept for the thread, as `build_agent` keeps it (one rule, one
    digest: `keel.approvals`): in the agent's state under `keel_rejections` (`REJECTIONS_KEY`,
    private to the agent: not in its input or output schema; merged by `merge_rejections`, so
    the calls of a turn rejected in one resume are all kept), under the digest of the call as
    the tool reads it (`keel.tools._args.approval_digests`: tool, tool version, arguments read
    by its schema, the policy's `name@version`). A later `ask` call of that tool with those
    arguments, under any id and however spelled (`10`, `10.0`, `"10"` for an `int`, a default
    sent or left out), is answered as `build_agent`'s `execute_tools` answers it ("Rejected by a
    human reviewer; <tool> was not run.", `keel_status="rejected"`) and no human is asked; other
    arguments are asked. The rejection comes back as a `Command` writing its record beside its
    tool message (`InputGuardMiddleware` around this one screens that message as any result).
    Approvals are not kept: as in `build_agent`, an approval covers the call a human saw, and
    the same call made again is asked about again. The key holds rejections only: a write of
    anything else (an approval, a record under another key) or an overwrite (LangGraph's
    `Overwrite`) is refused with a `UserError`, and a rejection this middleware did not seal is
    dropped (`RejectionsChannel`): a client that may update the thread's state can neither clear
    the rejections nor forge one, and no record in state is ever taken as an approval. Each
    rejection names who rejected (`reviewer`: the server's authenticated user, else the
    decision's `reviewer`), in its record and on its tool message (`keel_reviewer`), for the
    audit. As a node of a parent graph the
    agent keeps them for the thread when compiled with `checkpointer=True`; by default LangGraph
    starts its state afresh at each of the parent's runs.

    Each model call gets a history every provider accepts (`keel.history.valid_history`): a
    new message sent while a call waits for approval (or after a run stopped mid-call) leaves
    that call unanswered in the thread, which OpenAI and Anthropic refuse with a 400; the model
    reads it answered "no result (... it may or may not have run)" instead. The thread's state
    is not rewritten.
    """

    state_schema = PermissionState

    def __init__(self, policy: Policy, *, ledger: Ledger | None = None) -> None:
        """Decide every tool call by `policy.rules` (first match wins, default deny).

        With `ledger`, each call this middleware answers is written to the audit log.
        """
        super().__init__()
        if not isinstance(policy, Policy):
            raise UserError(f"PermissionMiddleware needs a keel Policy(...), got {policy!r}.")
        if ledger is not None and not isinstance(ledger, Ledger):
            raise UserError(f"ledger=... must be a keel.Ledger(url), got {ledger!r}.")
        self.audit = AuditLog(ledger) if ledger is not None else None
        """Where each answered call is audited (`kind="tool"`), or None."""
        self.matrix = PermissionMatrix.from_policy(policy)
        Grants.from_secret()  # a bad KEEL_APPROVAL_SECRET is refused here, not at a rejection
        self.policy_id = policy.identity
        """The policy bound into the digests of reviewers' decisions (`name@version`)."""

    def _digests(self, request: ToolCallRequest) -> tuple[str, str] | None:
        """The digests of `request`'s call as the tool reads it (`approval_digests`), or None."""
        tool, args = request.tool, request.tool_call.get("args")
        if tool is None or not isinstance(args, dict):
            return None
        return approval_digests(registered(tool), args, self.policy_id)

    def _rejected_before(self, request: ToolCallRequest) -> ToolMessage | None:
        """The answer to a call a human rejected earlier on the thread, or None.

        As `execute_tools` answers it: same tool, same arguments as the tool reads them, same
        policy; only the rejections this middleware recorded (`REJECTIONS_KEY`) are read.
        """
        state = request.state
        digests = self._digests(request)
        if digests is None or not isinstance(state, Mapping):
            return None
        found = decision_of(
            _rejections(state.get(REJECTIONS_KEY)), digests, request.tool_call.get("id") or ""
        )
        if found is None:
            return None
        name = request.tool_call["name"]
        return _tool_message(
            request, f"Rejected by a human reviewer; {name} was not run.", "rejected"
        )

    def _recorded(
        self, request: ToolCallRequest, rejection: ToolMessage, reviewer: str | None
    ) -> Command[Any]:
        """`rejection` of `request`'s call, and its sealed record in `REJECTIONS_KEY`.

        The record names who rejected (`reviewer`), for the audit, as `build_agent`'s does.
        """
        digests = self._digests(request)
        update: dict[str, Any] = {"messages": [rejection]}
        if digests is not None:
            call = request.tool_call
            record: Approval = {
                "digest": digests[0],
                "tool": call["name"],
                "tool_call_id": call.get("id") or "",
                "decision": "rejected",
            }
            if reviewer is not None:
                record["reviewer"] = reviewer
            record["seal"] = Grants.from_secret().sign_rejection(digests[0], record)
            update[REJECTIONS_KEY] = {digests[0]: record}
        return Command(update=update)

    def _decide(self, request: ToolCallRequest, args: Mapping[str, Any]) -> GateDecision:
        tool = request.tool
        if tool is None:  # an unknown tool: let the ToolNode answer with the valid names
            return GateDecision.allow()
        return self.matrix(registered(tool), args, _context(request.runtime))

    def _gate(
        self, request: ToolCallRequest
    ) -> Steps[ToolCallRequest | ToolMessage | Command[Any]]:
        call = request.tool_call
        decision = self._decide(request, call["args"])
        if decision.action == "ask":
            if (rejected := self._rejected_before(request)) is not None:
                return rejected  # a human rejected this call on the thread: not asked again
            question = {
                "type": "tool_approval",
                "tool_call_id": call.get("id") or "",
                "name": call["name"],
                "args": call["args"],
                "description": decision.reason
                + (f" (rule: {decision.rule})" if decision.rule else ""),
            }
            config = get_config()
            waiting = peek_resume(config)
            if waiting is not NO_RESUME:  # checked before interrupt() consumes it
                try:
                    asked = yield from asked_before(config)
                    if asked.questions and not _asked_about(request, asked.questions):
                        # a client's Send in the place of the task that asked: its answer is
                        # void (that question's task is gone), and this call is asked anew
                        yield from void_resume(config)
                        raise _asked_another(request, asked.questions)
                    if not asked.before:  # void: the call is asked on the next run
                        yield from void_resume(config)
                        raise _unasked(request, asked.updated)
                    _checked(request, waiting)
                except UserError as exc:
                    raise refused_resume(exc) from None
            answer = ask(question)
            reviewer = _reviewer(request, answer)
            resolved = _apply_decision(request, answer, reviewer)
            yield from self._reviewed(request, resolved, reviewer)
            if isinstance(resolved, ToolMessage) and _status_of(resolved) == "rejected":
                return self._recorded(request, resolved, reviewer)
            if isinstance(resolved, ToolMessage) or resolved is request:
                return resolved
            if (twin := _repeat(resolved, edited=True)) is not None:
                return twin  # the edit made it another call of the turn, which runs on its own
            request, decision = resolved, self._decide(resolved, resolved.tool_call["args"])
        if decision.action == "deny":
            rule = f" (rule: {decision.rule})" if decision.rule else ""
            return _tool_message(request, f"Not permitted: {decision.reason}{rule}.", "denied")
        return request

    def wrap_model_call(self, request: ModelRequest[Any], handler: ModelHandler) -> Any:
        """Call the model with a valid history (see the class's doc)."""
        return _stored(request, handler(_valid(request)))

    async def awrap_model_call(self, request: ModelRequest[Any], handler: AsyncModelHandler) -> Any:
        """Call the model with a valid history (async)."""
        return _stored(request, await handler(_valid(request)))

    def wrap_tool_call(self, request: ToolCallRequest, handler: ToolHandler) -> Any:
        """Run the call if the rules allow it (or a human approves it); else answer why not."""
        return drive(self._answer(request, handler))

    async def awrap_tool_call(self, request: ToolCallRequest, handler: AsyncToolHandler) -> Any:
        """Run the call if the rules allow it (or a human approves it), async."""
        return await adrive(self._answer(request, handler))

    def _answer(self, request: ToolCallRequest, handler: Callable[..., Any]) -> Steps[Any]:
        """The call's answer: the tool's result, or what answers it instead; then its audit."""
        resolved = yield from self._resolve(request)
        result = resolved
        if not isinstance(resolved, ToolMessage | Command):
            result = _marked((yield from _ran(resolved, handler)), _unknown(resolved))
        yield from self._audited(request, result)
        return result

    def _audited(self, request: ToolCallRequest, result: object) -> Steps[None]:
        """Write the audit record of `request`'s call answered by `result`, with a ledger.

        As `build_agent`'s `tool_records` writes it: one `tool` record per answered call, with
        the rules' decision on the call the model made (`deny` for a tool that does not exist,
        `duplicate` for a repeat of its turn), its keel status and result. A replay or shadow
        run writes none; a write the ledger refuses is logged, and the run goes on.
        """
        if self.audit is None or isolated():
            return
        call_id = request.tool_call.get("id") or ""
        try:
            records = [self._record(request, m) for m in _answers_of(result)]
            yield both(self.audit.write, self.audit.awrite, records)
        except Exception as exc:
            log.error("keel could not write the audit record of call %s: %r", call_id, exc)

    def _record(self, request: ToolCallRequest, answer: ToolMessage) -> AuditRecord:
        call, tool = request.tool_call, request.tool
        args = call.get("args")
        decision, rule = "deny", None
        if answer.response_metadata.get(DUPLICATE_KEY):
            decision = "duplicate"
        elif tool is not None and isinstance(args, dict):
            verdict = self._decide(request, args)
            decision, rule = verdict.action, verdict.rule
        return AuditRecord(
            kind="tool",
            decision=decision,
            status=str(_status_of(answer) or answer.status),
            args=args,
            rule=rule,
            result=answer.text,
            tool_call_id=answer.tool_call_id,
            **self._about(request),
        )

    def _about(self, request: ToolCallRequest) -> dict[str, Any]:
        """The fields of an audit record of `request`'s call: its tool, who, where, the policy."""
        tool, ctx, config = request.tool, _context(request.runtime), get_config()
        configurable, metadata = config.get("configurable") or {}, config.get("metadata") or {}
        thread, run = (
            configurable.get("thread_id"),
            configurable.get("run_id") or metadata.get("run_id"),
        )
        return {
            "tool": request.tool_call["name"],
            "tool_version": registered(tool).spec.version if tool is not None else None,
            "user_id": ctx.user_id,
            "tenant_id": ctx.tenant_id,
            "thread_id": None if thread is None else str(thread),
            "run_id": None if run is None else str(run),
            "policy": self.policy_id,
        }

    def _reviewed(
        self, request: ToolCallRequest, resolved: ToolCallRequest | ToolMessage, by: str | None
    ) -> Steps[None]:
        """Write the `approval` audit record of a human's decision on `request`'s call.

        As `build_agent`'s `human_review` writes it: `approved`, `edited` (with the edited
        arguments), `rejected` or `responded` (with the reply), and who decided (`approver`).
        A replay or shadow run writes none; a write the ledger refuses is logged.
        """
        if self.audit is None or isolated():
            return
        decision, args, result = "approved", request.tool_call.get("args"), ""
        if isinstance(resolved, ToolMessage):
            decision = "rejected" if _status_of(resolved) == "rejected" else "responded"
            result = resolved.text if decision == "responded" else ""
        elif resolved is not request:
            decision, args = "edited", resolved.tool_call.get("args")
        record = AuditRecord(
            kind="approval",
            decision=decision,
            args=args,
            approver=by,
            result=result,
            tool_call_id=request.tool_call.get("id") or "",
            **self._about(request),
        )
        try:
            yield both(self.audit.write, self.audit.awrite, [record])
        except Exception as exc:
            log.error(
                "keel could not write the audit record of a decision on %s: %r",
                record.tool_call_id,
                exc,
            )

    def _resolve(
        self, request: ToolCallRequest
    ) -> Steps[ToolCallRequest | ToolMessage | Command[Any]]:
        """The allowed request, or what answers it: a repeat's pointer, a refusal, a stub."""
        repeat = _repeat(request)
        if repeat is not None:
            return repeat
        if request.tool is None:  # no such tool: the tool node answers with the names, runs nothing
            return request
        unfit = _unfit(request)
        if unfit is not None:  # never decided on, asked or run
            return unfit
        resolved = yield from self._gate(request)
        if isinstance(resolved, ToolMessage | Command) or resolved.tool is None:
            return resolved
        answer = stub_answer(registered(resolved.tool), resolved.tool_call)
        if answer is None:
            return resolved
        call = resolved.tool_call
        return stub_message(answer, call.get("id") or "", call["name"])


def _answers_of(result: object) -> list[ToolMessage]:
    """The tool messages of a call's answer: the message, or those a `Command` writes."""
    update = result.update if isinstance(result, Command) else None
    found = update.get("messages") if isinstance(update, dict) else [result]
    return [m for m in found or () if isinstance(m, ToolMessage)]


def _repeat(request: ToolCallRequest, *, edited: bool = False) -> ToolMessage | None:
    """The answer to a call that repeats an earlier side-effecting call of its turn, or None.

    Same tool, same canonical arguments (`keel.tools._duplicates`): it is neither asked about
    nor run. `create_agent` runs each call of a turn as a task of its own, so a repeat cannot
    wait for the earlier call's result: its answer points the model to it. An `edited` call
    (its arguments a reviewer's) that became a later call's twin repeats that one: the later
    call was no repeat when its own task decided it, and runs (or ran) on its own.
    """
    tool, call_id = request.tool, request.tool_call.get("id") or ""
    state = request.state
    messages = state.get("messages") if isinstance(state, Mapping) else None
    if tool is None or not call_id or not isinstance(messages, Sequence):
        return None
    entry = registered(tool)
    turn = next((m for m in reversed(messages) if isinstance(m, AIMessage)), None)
    calls = [
        request.tool_call if c.get("id") == call_id else c
        for c in (turn.tool_calls if turn is not None else [])
    ]
    found = duplicates(calls, lambda name: entry if name == entry.name else None)
    primary = found.get(call_id)
    if primary is None and edited:
        later = next((d for d, first in found.items() if first.get("id") == call_id), None)
        primary = next((c for c in calls if later is not None and c.get("id") == later), None)
    if primary is None:
        return None
    first = primary.get("id") or ""
    return ToolMessage(
        content=f"Not run: this call repeats call {first} of the same turn (same tool and "
        f"arguments); {entry.name} runs once, and that call's result is this call's result.",
        tool_call_id=call_id,
        name=entry.name,
        status="error",
        response_metadata={"keel_status": "not_run", DUPLICATE_KEY: first},
    )


_DECISION_FORMS = (
    "{'type': 'approve'}, {'type': 'edit', 'edited_action': {'name': ..., 'args': {...}}}, "
    "{'type': 'reject', 'message': '...'} or {'type': 'respond', 'message': '...'}"
)


def _checked(request: ToolCallRequest, answer: Any) -> Mapping[str, Any]:
    """The reviewer's decision on `request`'s call, or a `UserError` saying what is wrong.

    It runs on the answer before `interrupt()` consumes it (LangGraph keeps a consumed resume
    value even when the task then raises, so a refused answer would stick and the call could
    never be answered again), and on what `interrupt()` returns. A decision answers this call
    alone: one that names another call (`tool_call_id`, a key that is a call id of the turn),
    an edit that names another tool or arguments its schema refuses, a `respond` without text
    are refused, and nothing runs.
    """
    call = request.tool_call
    name, call_id = call["name"], call.get("id") or ""
    where = f"{name} (call {call_id!r})"
    outer = answer
    if isinstance(answer, Mapping) and isinstance(answer.get("decisions"), list):
        decisions = answer["decisions"]
        if len(decisions) != 1:
            raise UserError(
                f"{where} waits for one decision: PermissionMiddleware asks about each call "
                f"with an interrupt of its own, and the answer holds {len(decisions)}. Resume "
                "with {'decisions': [decision]} or one decision; with several calls waiting, "
                "answer each interrupt by its id: Command(resume={interrupt.id: decision, ...})."
            )
        answer = decisions[0]
    kind = answer.get("type") if isinstance(answer, Mapping) else None
    if kind not in ("approve", "edit", "reject", "respond"):
        keyed = isinstance(answer, Mapping) and "type" not in answer
        hint = " (one decision per interrupt: not a dict keyed by tool_call_id)" if keyed else ""
        raise UserError(
            f"Unknown review decision {answer!r} for {where}: resume with {_DECISION_FORMS}{hint}."
        )
    assert isinstance(answer, Mapping)
    named = answer.get("tool_call_id")
    if named is not None and named != call_id:
        raise UserError(
            f"The decision {dict(answer)!r} names call {named!r}, but the interrupt it answers "
            f"asks about {where}: answer each interrupt with its own call's decision."
        )
    keys = {k for m in (outer, answer) for k in m if isinstance(k, str)}
    if by_id := sorted(map(repr, _turn_ids(request) & keys)):
        raise UserError(
            f"The answer {dict(outer)!r} for {where} is both one decision (its 'type') and "
            f"answers keyed by {', '.join(by_id)}: keel would take the decision and drop the "
            "rest. Answer each interrupt with one decision."
        )
    for given in (outer, answer):
        if isinstance(given, Mapping) and not isinstance(given.get("reviewer", ""), str):
            raise UserError(
                f"'reviewer' names who answered {where}, as text ({{'reviewer': 'alice'}}), "
                f"got {given['reviewer']!r}."
            )
    if kind == "edit":
        _check_edit(request, answer.get("edited_action"), where)
    text = answer.get("message")
    if (kind == "respond" and not isinstance(text, str)) or (
        kind == "reject" and text is not None and not isinstance(text, str)
    ):
        form = "{'type': 'respond', 'message': '...'}"
        if kind == "reject":
            form = "{'type': 'reject', 'message': '...'} (or no message)"
        raise UserError(f"A {kind!r} decision for {where} needs its message as text: {form}.")
    return answer


def _unasked(request: ToolCallRequest, updated: bool) -> UserError:
    """The refusal of a resume value that reached a call no human was asked about.

    `updated`: the call's step runs from a state update's checkpoint, which dropped the
    question the call waited on (if it was asked before the update).
    """
    call = request.tool_call
    where = f"{call['name']} (call {call.get('id')!r})"
    if updated:
        return UserError(
            f"Command(resume=...) reached {where}, whose question is no longer waiting: a state "
            "update (update_state) made a new checkpoint, and LangGraph keeps no pending "
            "interrupt across one, so the answer was given to no question. Nothing ran, and the "
            "answer is void: it will never answer the call. To have the call asked again, "
            "invoke(None, config), and answer the new interrupt by its id."
        )
    return UserError(
        f"Command(resume=...) reached {where}, which no human was asked about: its step runs it "
        "for the first time (sent by a Command(goto=...), or left unrun when the run stopped), "
        "so the answer was given to no question about it. Nothing ran, and the answer is void: "
        "it will never answer the call. invoke(None, config) asks a human about the call; a "
        "new message goes on without it. Resume only a thread that waits (its state's "
        "interrupts), answering each by its id."
    )


def _asked_about(request: ToolCallRequest, questions: Sequence[Any]) -> bool:
    """Whether one of a task's saved `questions` asked about `request`'s call.

    The same call id, tool and arguments (a policy changed since, with another reason in the
    question's description, still asked about the call).
    """
    call = request.tool_call
    this = (call.get("id") or "", call["name"], call["args"])
    return any(
        isinstance(q, Mapping) and (q.get("tool_call_id"), q.get("name"), q.get("args")) == this
        for q in questions
    )


def _asked_another(request: ToolCallRequest, questions: Sequence[Any]) -> UserError:
    """The refusal of a resume value that answers another call's question than `request`'s.

    LangGraph names a sent task by its place among its step's sends: a client's
    `Command(goto=Send("tools", ...))` on a waiting thread takes the place (and the id) of the
    task that asked, and would take the answer a human gave about that task's call.
    """
    call = request.tool_call
    where = f"{call['name']} (call {call.get('id')!r})"
    asked = ", ".join(
        f"{q.get('name')} (call {q.get('tool_call_id')!r})" if isinstance(q, Mapping) else repr(q)
        for q in questions
    )
    return UserError(
        f"Command(resume=...) reached {where}, but the question it answers was about {asked}: "
        "the call was sent in that call's place (a Command(goto=Send(...)) on a waiting "
        "thread). Nothing ran, and the answer is void: it will never answer either call. "
        f"invoke(None, config) asks about {where}; a new message goes on without it."
    )


def _turn_ids(request: ToolCallRequest) -> set[str]:
    """The ids of the calls of the turn `request`'s call belongs to (the last AI message's)."""
    state = request.state
    messages = state.get("messages") if isinstance(state, Mapping) else None
    if not isinstance(messages, Sequence):
        return set()
    turn = next((m for m in reversed(messages) if isinstance(m, AIMessage)), None)
    return {c.get("id") or "" for c in (turn.tool_calls if turn is not None else [])} - {""}


def _unfit(request: ToolCallRequest) -> ToolMessage | None:
    """The `invalid_args` answer to a call whose arguments its tool's schema refuses, or None.

    Answered before any rule, as `build_agent`'s `execute_tools` answers it: no human is asked
    about a call that cannot run, a deny rule does not hide what the model must fix, and the
    call never reaches the tool node ungated (a check of the arguments that reads the world
    might let it through there). Arguments naming a parameter the ToolNode injects are refused
    too: the ToolNode would replace them, but the rules' resource extractor and a human
    reviewer would read them as the model's.
    """
    tool = request.tool
    if tool is None:
        return None
    problem = invalid_args(registered(tool), request.tool_call.get("args"))
    if problem is None:
        return None
    return _tool_message(
        request,
        f"Error: invalid arguments for {tool.name}: {problem}. Fix the arguments and call the "
        "tool again.",
        "invalid_args",
    )


def _check_edit(request: ToolCallRequest, edited: Any, where: str) -> None:
    """Refuse an edit that is not one: other tool, arguments that are no object or misfit."""
    form = "{'type': 'edit', 'edited_action': {'name': ..., 'args': {...}}}"
    name = request.tool_call["name"]
    if not isinstance(edited, Mapping):
        raise UserError(f"An 'edit' decision for {where} needs the edited call: {form}.")
    if edited.get("name", name) != name:
        raise UserError(
            f"An edit changes the arguments of the call it answers, not its tool: {where} "
            f"cannot become {edited.get('name')!r}. Edit {name}'s arguments, or reject the "
            "call and let the model call the other tool (the rules decide that call)."
        )
    tool = request.tool
    args = edited.get("args")
    problem = invalid_args(registered(tool), args) if tool is not None else None
    if problem is not None or not isinstance(args, dict):
        problem = problem or f"arguments must be a JSON object, got {type(args).__name__}"
        raise UserError(
            f"The edited arguments for {where} do not fit its schema: {problem}. Resume "
            f"again with arguments that do: {form}."
        )


def _reviewer(request: ToolCallRequest, answer: Any) -> str | None:
    """Who answered: the server's authenticated user, else (embedded) the decision's `reviewer`.

    As `build_agent`'s `human_review` takes it; `_checked` refused a `reviewer` that is no text.
    """
    served = reviewer_of(server_user(request.runtime))
    if served is not None:
        return served
    decision = _checked(request, answer)
    named = decision.get("reviewer", _outer_reviewer(answer))
    return named if isinstance(named, str) else None


def _outer_reviewer(answer: Any) -> object:
    """The `reviewer` an answer of the form `{"decisions": [...], "reviewer": ...}` names."""
    return answer.get("reviewer") if isinstance(answer, Mapping) else None


def _apply_decision(
    request: ToolCallRequest, answer: Any, reviewer: str | None = None
) -> ToolCallRequest | ToolMessage:
    """The approved (or edited) request, or the ToolMessage that answers it instead.

    A rejection or a reply names who gave it (`REVIEWER_META`), as `build_agent`'s do.
    """
    decision = _checked(request, answer)
    kind, name = decision["type"], request.tool_call["name"]
    if kind == "approve":
        return request
    if kind == "edit":
        args = decision["edited_action"]["args"]
        return request.override(tool_call={**request.tool_call, "args": dict(args)})
    by = {REVIEWER_META: reviewer} if reviewer is not None else {}
    if kind == "reject":
        note = f": {decision['message']}" if decision.get("message") else ""
        message = _tool_message(request, f"Rejected by a human reviewer{note}.", "rejected")
        message.response_metadata.update(by)
        return message
    return ToolMessage(
        content=f"A human answered instead of running {name}: {decision['message']}",
        tool_call_id=request.tool_call.get("id") or "",
        name=name,
        response_metadata={"keel_status": "respond", **by},
    )


# -- rate limits and breakers: ModelGuard / ToolGuard, as in call_model / execute_tools -----


class _ModelGuarded(AgentMiddleware[Any, Any, Any]):
    """Runs each model call through a `ModelGuard`; a refused call ends the run or raises."""

    def __init__(self, guard: ModelGuard, exit_behavior: ExitBehavior) -> None:
        super().__init__()
        self.guard = guard
        self.exit_behavior = _exit(exit_behavior)

    def _refused(self, exc: CircuitOpen | RateLimited) -> AIMessage:
        if self.exit_behavior == "error":
            raise exc
        return stop_message(outcome.failed(f"model call refused: {exc}"))

    def wrap_model_call(
        self, request: ModelRequest[Any], handler: ModelHandler
    ) -> ModelResponse[Any] | AIMessage:
        """Call the model within its rate limits and breaker."""
        return _stored(request, drive(self._guarded(request, call(handler, request))))

    async def awrap_model_call(
        self, request: ModelRequest[Any], handler: AsyncModelHandler
    ) -> ModelResponse[Any] | AIMessage:
        """Call the model within its rate limits and breaker (async)."""
        return _stored(request, await adrive(self._guarded(request, call(handler, request))))

    def _guarded(
        self, request: ModelRequest[Any], model_call: Op
    ) -> Steps[ModelResponse[Any] | AIMessage]:
        guard = self.guard
        name, tenant = model_name_of(request.model), _context(request.runtime).tenant_id
        tokens = estimate_tokens(request.messages)
        try:
            permit = yield both(guard.before, guard.abefore, name, tenant, tokens)
        except (CircuitOpen, RateLimited) as exc:
            return self._refused(exc)
        try:
            response: ModelResponse[Any] = yield model_call
        except Exception as exc:
            yield both(guard.after, guard.aafter, name, permit, exc, 0)
            raise
        yield both(guard.after, guard.aafter, name, permit, None, _tokens(response, tokens))
        return response


def _tokens(response: ModelResponse[Any], estimate: int) -> int:
    """The tokens the answer reports; the request's `estimate` when it reports no usable count.

    A count that is not one (negative, `None`, text) must not refund the rate limit's tokens.
    """
    meta: Mapping[str, Any] = {}
    for m in _answers(response):
        if isinstance(m.usage_metadata, Mapping):
            meta = m.usage_metadata
    counts = [token_count(meta.get(k)) for k in ("input_tokens", "output_tokens")]
    if counts[0] is None or counts[1] is None:
        return estimate
    return counts[0] + counts[1]


def _answers(response: object) -> list[AIMessage]:
    """The AI messages of a model call's result.

    The result is a `ModelResponse`, an `AIMessage`, or an `ExtendedModelResponse` around a
    `ModelResponse`.
    """
    if isinstance(response, AIMessage):
        return [response]
    inner = getattr(response, "model_response", response)
    return [m for m in getattr(inner, "result", None) or [] if isinstance(m, AIMessage)]


class RateLimitMiddleware(_ModelGuarded):
    """RPM / TPM limits per model and per tenant for `create_agent`, shared via the ledger.

    A call waits for room up to each limit's `max_wait`; then, with `exit_behavior="end"`, the
    run ends with an `error` outcome naming the limit, or (`"error"`) `RateLimited` is raised,
    e.g. for LangChain's `ModelFallbackMiddleware` (placed before this one) to catch.
    """

    def __init__(
        self, ledger: Ledger, limits: Sequence[RateLimit], *, exit_behavior: ExitBehavior = "end"
    ) -> None:
        """Hold model calls to `limits`, kept in `ledger`."""
        super().__init__(ModelGuard(RateLimiter(ledger, limits), None), exit_behavior)


class CircuitBreakerMiddleware(_ModelGuarded):
    """Circuit breakers per model and per tool for `create_agent`, shared via the ledger.

    An open model breaker fails fast: the run ends with an `error` outcome, or (`exit_behavior=
    "error"`) `CircuitOpen` is raised for LangChain's `ModelFallbackMiddleware` (placed before
    this one) to move to the next model. An open tool breaker answers the call `unavailable`
    and tells the model what is missing; the run goes on. A pause for a human (an interrupt
    raised by a `PermissionMiddleware` inside this one) is not a failure of the tool. What a
    call counts is `ToolGuard.counts`'s rule, as in `build_agent`: the call's keel status
    decides, and a call the tool never ran (denied, rejected, no such tool, arguments that did
    not fit, a twin) counts for nothing; no breaker is kept for a tool name that is no tool's.
    """

    def __init__(
        self,
        ledger: Ledger,
        *,
        model: BreakerPolicy | None = None,
        tool: BreakerPolicy | None = None,
        exit_behavior: ExitBehavior = "end",
    ) -> None:
        """Breakers for models (`model=`) and/or tools (`tool=`); at least one."""
        if model is None and tool is None:
            raise UserError(
                "CircuitBreakerMiddleware needs model=BreakerPolicy(...) and/or "
                "tool=BreakerPolicy(...)."
            )
        breaker = CircuitBreaker(ledger, model) if model is not None else None
        super().__init__(ModelGuard(None, breaker), exit_behavior)
        self.tool_guard = ToolGuard(CircuitBreaker(ledger, tool)) if tool is not None else None

    def wrap_model_call(
        self, request: ModelRequest[Any], handler: ModelHandler
    ) -> ModelResponse[Any] | AIMessage:
        """Call the model unless its breaker is open."""
        if self.guard.breaker is None:
            return _stored(request, handler(request))
        return super().wrap_model_call(request, handler)

    async def awrap_model_call(
        self, request: ModelRequest[Any], handler: AsyncModelHandler
    ) -> ModelResponse[Any] | AIMessage:
        """Call the model unless its breaker is open (async)."""
        if self.guard.breaker is None:
            return _stored(request, await handler(request))
        return await super().awrap_model_call(request, handler)

    def wrap_tool_call(self, request: ToolCallRequest, handler: ToolHandler) -> Any:
        """Run the tool unless its breaker is open; record the result."""
        return drive(self._tool(request, handler))

    async def awrap_tool_call(self, request: ToolCallRequest, handler: AsyncToolHandler) -> Any:
        """Run the tool unless its breaker is open; record the result (async)."""
        return await adrive(self._tool(request, handler))

    def _tool(self, request: ToolCallRequest, handler: Callable[..., Any]) -> Steps[Any]:
        guard, tool = self.tool_guard, request.tool
        if guard is None or tool is None:  # no such tool: no breaker is kept for the name
            return _marked((yield from _ran(request, handler)), _unrun(request))
        name = tool.name
        refused = yield both(guard.check, guard.acheck, name)
        if refused is not None:
            return _tool_message(request, refused, "unavailable")
        unrun = _unrun(request)
        try:
            result = yield from _ran(request, handler)  # a tool's error: answered `error`
        except GraphBubbleUp:  # a pause (a human asked about the call), not the tool's failure
            raise
        except Exception:
            yield both(guard.record, guard.arecord, name, "error")
            raise
        result = _marked(result, unrun)  # the tool node refused the arguments: it never ran
        yield both(guard.record, guard.arecord, name, _status(result))
        return result


def _status_of(message: ToolMessage) -> object:
    """The keel status a guard put on `message` (`keel_status`)."""
    return message.response_metadata.get("keel_status")


def _unrun(request: ToolCallRequest) -> str | None:
    """The keel status of a call the tool node answers without running the tool, else None.

    `unknown_tool` (no such tool) or `invalid_args` (arguments its schema refuses; one naming an
    injected argument runs: the tool node replaces it).
    """
    return _unrun_call(request.tool, request.tool_call.get("args"))


def _unknown(request: ToolCallRequest) -> str | None:
    """`unknown_tool` for a call to no tool, else None.

    What is left unrun of a call `PermissionMiddleware` let through: it answered arguments that
    did not fit itself (`_unfit`), and a reviewer's edit that does not fit is refused.
    """
    return "unknown_tool" if request.tool is None else None


def _unrun_call(tool: BaseTool | None, args: object) -> str | None:
    """`_unrun` for a call to `tool` (None: no such tool) with `args`."""
    if tool is None:
        return "unknown_tool"
    entry = registered(tool)
    if isinstance(args, dict) and spoofed(entry.injected, args):
        return None
    return None if invalid_args(entry, args) is None else "invalid_args"


def _marked(result: Any, status: str | None) -> Any:
    """`result` marked with keel's `status` when it is the tool node's own error answer.

    The tool node answers a call it did not run (no such tool, arguments that did not fit)
    without a keel status; `build_agent` marks those `unknown_tool` / `invalid_args` (`_unrun`),
    and so does each keel middleware around the tool node, whichever the agent has: the budget
    counts only calls that ran (`RAN`), and the breaker counts none of these.
    """
    if (
        status is not None
        and isinstance(result, ToolMessage)
        and result.status == "error"
        and _status_of(result) is None
    ):
        meta = {**result.response_metadata, "keel_status": status}
        return result.model_copy(update={"response_metadata": meta})
    return result


def _status(result: ToolMessage | Command[Any]) -> object:
    """The keel status `ToolGuard` is handed for `result` (`ToolGuard.counts` decides).

    A message's `keel_status`, else its own `status`; a `Command`'s by its tool messages.
    """
    update = result.update if isinstance(result, Command) else None
    found = update.get("messages") if isinstance(update, dict) else [result]
    return ToolGuard.deciding(
        _status_of(m) or m.status for m in found or () if isinstance(m, ToolMessage)
    )


# -- the loop guard -----------------------------------------------------------------------


class LoopGuardMiddleware(AgentMiddleware[Any, Any, Any]):
    """keel's loop guard for `create_agent`: repeated calls or A-B-A-B cycles.

    With `on_loop="stop"` the looping turn is replaced by a stop (`loop_detected`); with
    `"wrap_up"` the model is asked once more, without tools, for its final answer. The run's
    earlier calls are read from the middleware's records (`CALLS_KEY`, its private state), so
    a client that removes the run's turns while it waits does not hide a repeat.
    """

    state_schema = LoopState

    def __init__(self, loop: LoopPolicy | None = None) -> None:
        """Detect loops by `loop` (the default `LoopPolicy()` when omitted)."""
        super().__init__()
        if loop is not None and not isinstance(loop, LoopPolicy):
            raise UserError(f"LoopGuardMiddleware needs a keel LoopPolicy(...), got {loop!r}.")
        self.loop = loop or LoopPolicy()

    def _looping(
        self, request: ModelRequest[Any], response: ModelResponse[Any]
    ) -> tuple[str | None, dict[str, Any]]:
        """Why the answer loops (or None), and the record of its calls (`CALLS_KEY`).

        The run's earlier calls are read from its records, not its messages: a client that
        removes or rewrites the run's turns while it waits does not hide a repeat.
        """
        answer = next(iter(_answers(response)[-1:]), None)
        if answer is None or not answer.tool_calls:
            return None, {}
        tools = {t.name: registered(t) for t in request.tools if isinstance(t, BaseTool)}
        messages, window = request.state["messages"], loop_window(self.loop)
        records = _run_records(messages, request.state.get(CALLS_KEY))
        earlier = [(c[0], c[1]) for r in records for c in r.get("calls", [])]
        if not records:  # a run begun before the records were kept
            earlier = call_sequence(messages, None, tools.get, last=window)
        made = call_sequence([], answer, tools.get)
        calls = [*earlier, *made][-window:] if window > 0 else []
        answer.id = answer.id or f"lc_{uuid.uuid4()}"
        record = {"run": _run_id(messages), "turn": answer.id, "calls": [list(c) for c in made]}
        return detect_loop(calls, self.loop), {answer.id: record}

    def _wrap_up(self, request: ModelRequest[Any], reason: str) -> ModelRequest[Any]:
        asked: list[Any] = [*tool_turns_as_text(request.messages), wrap_up_note(reason)]  # as text
        return request.override(tools=[], messages=asked)

    def _final(self, reason: str, final: ModelResponse[Any] | None) -> AIMessage:
        detail = f"{reason}; answered without tools" if final is not None else reason
        result = outcome.stopped("loop_detected", detail)
        answer = next(
            (m for m in (final.result if final else []) if isinstance(m, AIMessage)), None
        )
        if answer is None or answer.tool_calls:
            return stop_message(result)
        meta = {**answer.response_metadata, "keel_outcome": result}
        return answer.model_copy(update={"response_metadata": meta})

    def wrap_model_call(
        self, request: ModelRequest[Any], handler: ModelHandler
    ) -> ModelResponse[Any] | AIMessage:
        """Call the model; a looping answer stops the run or gets one tool-free wrap-up turn."""
        return drive(self._called(request, handler))

    async def awrap_model_call(
        self, request: ModelRequest[Any], handler: AsyncModelHandler
    ) -> ModelResponse[Any] | AIMessage:
        """Call the model; a looping answer stops the run or gets a wrap-up turn (async)."""
        return await adrive(self._called(request, handler))

    def _called(
        self, request: ModelRequest[Any], handler: Callable[..., Any]
    ) -> Steps[ModelResponse[Any] | AIMessage]:
        """The model call and, on a looping answer, the stop or the wrap-up turn, as steps."""
        response = _stored(request, (yield call(handler, request)))
        reason, records = self._looping(request, response)
        if reason is None:
            return _with_records(response, CALLS_KEY, records)  # type: ignore[no-any-return]
        if self.loop.on_loop == "stop":
            return self._final(reason, None)
        return self._final(reason, (yield call(handler, self._wrap_up(request, reason))))
