"""The agent's state and the run's context: the contract every keel node reads and writes.

`AgentState` is a `TypedDict` because LangGraph state is dict-shaped; the nested records are
`TypedDict`s too, so a checkpoint holds only plain JSON-able values and round-trips through every
saver (SQLite, Postgres, the LangGraph server) unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, NotRequired

from langchain_core.messages import AnyMessage, HumanMessage
from langgraph.graph.message import add_messages
from langgraph.managed import RemainingSteps
from typing_extensions import TypedDict

from keel.errors import UserError

__all__ = [
    "AgentInput",
    "AgentState",
    "Approval",
    "Outcome",
    "OutcomeStatus",
    "PlanStep",
    "RunContext",
    "TerminatedReason",
    "Usage",
    "VERIFICATION_KEY",
    "Verdict",
    "add_usage",
    "check_storable",
    "merge_approvals",
    "run_usage",
    "starts_task",
    "storable_ids",
    "task_base",
    "task_start",
    "task_clock",
    "task_reset",
]

TerminatedReason = Literal[
    "completed",
    "budget_exceeded",
    "denied",
    "loop_detected",
    "timeout",
    "rejected",
    "error",
    "verification_failed",
    "awaiting_approval",
    "breakpoint",
    "blocked",
    "overloaded",
    "storage",
    "cancelled",
]
"""Why a run ended (or, for `awaiting_approval` and `breakpoint`, why it is paused: for a human, or
at a breakpoint its caller set with `interrupt_before` / `interrupt_after`); `denied`: never
produced by keel's own graphs, since a call the permission gate denies does not end the run (it
is answered with a `denied` tool message and the model goes on); it is there for a graph of
yours that ends a run on a refusal (`keel.outcome.stopped("denied", ...)`); `blocked`: a content
guard refused the user's input or withheld the answer; `overloaded`: admission control
(`keel.guards.admission`) refused to start it (the detail says when to retry); `storage`: the
checkpointer's database failed, so the run's last steps may not be saved; `cancelled`: the
caller ended it (its task cancelled, or its pending calls dropped for a new message), or its
process died mid-step (recorded by the thread's next message)."""

OutcomeStatus = Literal["success", "stopped", "error", "interrupted"]
"""`success`: a final answer; `stopped`: a guard or a human ended the run early with a partial
answer; `error`: something failed that keel could not recover from; `interrupted`: paused for a
human, resumable."""


class Outcome(TypedDict):
    """How a run ended. Every keel run's final state carries one."""

    status: OutcomeStatus
    terminated_reason: TerminatedReason
    detail: str


class Usage(TypedDict, total=False):
    """Resources a run consumed. Summed across nodes by `add_usage`."""

    input_tokens: int
    output_tokens: int
    usd: float
    model_calls: int
    tool_calls: int
    steps: int


class PlanStep(TypedDict):
    """One step of the agent's plan."""

    id: int
    description: str
    status: Literal["pending", "in_progress", "done", "failed"]


class Approval(TypedDict):
    """A human decision bound to one exact call (tool, tool version, canonical args, policy)."""

    digest: str
    tool: str
    tool_call_id: str
    decision: Literal["approved", "rejected"]
    reviewer: NotRequired[str]
    expires_at: NotRequired[float]
    """Set on standing approvals (`keel.guards.standing`): epoch seconds it holds until."""
    scope: NotRequired[Literal["thread", "user"]]
    """Set on standing approvals: the thread it was given in, or all the user's threads."""
    seal: NotRequired[str]
    """keel's HMAC over the grant, its thread and user (`keel.approvals.Grants`)."""


class Verdict(TypedDict):
    """The result of one verification of a final answer."""

    passed: bool
    reason: str
    source: str


def add_usage(left: Usage | None, right: Usage | None) -> Usage:
    """Reducer: add two usage records field by field."""
    if not left:
        return dict(right) if right else {}  # type: ignore[return-value]
    if not right:
        return left
    out: dict[str, Any] = dict(left)
    for key, value in right.items():
        out[key] = out.get(key, 0) + value
    return out  # type: ignore[return-value]


VERIFICATION_KEY = "keel_verification"
"""The `additional_kwargs` key of a user-role message keel writes inside a run (`verify`'s
feedback to the model, a human's answer to a failed verification): it starts no new task."""


def starts_task(message: object) -> bool:
    """Whether `message` starts a task (a run): a user's message, not one of keel's own."""
    return isinstance(message, HumanMessage) and not message.additional_kwargs.get(VERIFICATION_KEY)


def task_start(messages: Sequence[Any]) -> int:
    """The index of the message that started the current task (run), or -1 without one.

    The last message that `starts_task`: a thread's earlier tasks, and keel's own user-role
    messages inside a run (`verify`'s feedback), are not the current task.
    """
    for i in range(len(messages) - 1, -1, -1):
        if starts_task(messages[i]):
            return i
    return -1


def task_clock(state: Mapping[str, Any], now: float) -> dict[str, float] | None:
    """The run clock for a new task (a user message the clock has not seen yet), else `None`.

    The clock (`AgentState.clock`) holds when the task started (`started_at`, for wall-clock
    budgets), which user message it is for (`task`: how many user messages the thread had) and
    the thread's usage at that moment (`usage:<field>`), so that `run_usage` is the run's own.
    A clock from before `task` existed is renewed when the last message is a user's.
    """
    messages = state.get("messages") or []
    clock = state.get("clock") or {}
    task = float(sum(starts_task(m) for m in messages))
    if "started_at" in clock:
        if "task" in clock and clock["task"] == task:
            return None
        if "task" not in clock and not (messages and starts_task(messages[-1])):
            return None
    usage = state.get("usage") or {}
    # every field, 0 where nothing was used yet: a conversation's first clock is a base too
    # (`task_base`), so a run record never falls back to the thread's last record, which in a
    # supervisor's thread is another graph's (a sub-agent's, or the supervisor's)
    base = {f"usage:{k}": 0.0 for k in Usage.__annotations__}
    base |= {f"usage:{k}": float(v) for k, v in usage.items() if isinstance(v, int | float)}
    return {"started_at": now, "task": task, **base}


def task_reset(state: Mapping[str, Any]) -> dict[str, Any]:
    """The update that clears an earlier task's records when a new task starts.

    `verdicts`, `revisions` and `budget_warnings` are the current task's: a thread's third task
    that was never sent back has no revision, and no earlier task's verdict or budget warning.
    """
    empty: dict[str, Any] = {"verdicts": [], "revisions": 0, "budget_warnings": []}
    return {key: value for key, value in empty.items() if state.get(key)}


def task_base(state: Mapping[str, Any]) -> dict[str, float] | None:
    """The thread's usage when the run `state` is at started (its run clock), else None.

    None when the clock is an earlier task's (the run ended before its first model call) or
    older than the clock's usage fields.
    """
    clock = state.get("clock") or {}
    tasks = float(sum(starts_task(m) for m in state.get("messages") or []))
    if clock.get("task") != tasks or not any(k.startswith("usage:") for k in clock):
        return None
    return {k.removeprefix("usage:"): float(v) for k, v in clock.items() if k.startswith("usage:")}


def run_usage(usage: Mapping[str, Any] | None, clock: Mapping[str, float] | None) -> Usage:
    """The current run's usage: the thread's totals (`usage`) less those when it started.

    Run budgets count this, not the thread's totals; period budgets count every run.
    """
    base = clock or {}
    out = {k: v - base.get(f"usage:{k}", 0) for k, v in (usage or {}).items()}
    return out  # type: ignore[return-value]


def merge_approvals(
    left: dict[str, Approval] | None, right: dict[str, Approval] | None
) -> dict[str, Approval]:
    """Reducer: approvals accumulate by digest. A rejection is final: it is never overwritten."""
    merged = dict(left or {})
    for digest, approval in (right or {}).items():
        previous = merged.get(digest)
        if previous is not None and previous["decision"] == "rejected":
            continue
        merged[digest] = approval
    return merged


class AgentState(TypedDict, total=False):
    """The state of a keel agent run.

    Attributes:
        messages: The conversation, merged by id with LangGraph's `add_messages`.
        plan: The current plan, when planning is on.
        usage: Tokens, dollars, model and tool calls so far (summed).
        approvals: Human decisions keyed by call digest.
        verdicts: The current task's verification results, in order.
        revisions: How many times a failed verification sent the current task's answer back.
        outcome: How the run ended; `None` while it is running.
        clock: `started_at` (epoch seconds) of the current task, for wall-clock budgets, and
            the thread's usage when it started (see `task_clock` and `run_usage`).
        budget_warnings: The current task's budget limits past their soft threshold.
        warnings: What degraded in the current task and how (e.g. memory that could not be
            read); the run went on without it. Shown in the run record's detail.
        remaining_steps: LangGraph's managed step counter (not stored).
    """

    messages: Annotated[list[AnyMessage], add_messages]
    plan: list[PlanStep]
    usage: Annotated[Usage, add_usage]
    approvals: Annotated[dict[str, Approval], merge_approvals]
    verdicts: list[Verdict]
    revisions: int
    outcome: Outcome | None
    clock: dict[str, float]
    budget_warnings: list[str]
    warnings: list[str]
    remaining_steps: RemainingSteps


class AgentInput(TypedDict, total=False):
    """What a caller may send a keel graph: the graphs' `input_schema`.

    Everything else in `AgentState` (approvals, usage, outcome, plan, verdicts, revisions, the
    run clock, budget warnings) is keel's record of the run: only keel's nodes write it, and
    keel's graphs refuse it from `invoke` input, `update_state` and `Command(update=...)`.

    Attributes:
        messages: The conversation to add to (a user message, usually).
    """

    messages: Annotated[list[AnyMessage], add_messages]


@dataclass(frozen=True, kw_only=True, slots=True)
class RunContext:
    """Who a run is for. Passed as LangGraph runtime context (`context=RunContext(...)`).

    Identity comes from here (or from the server's auth), never from the model or tool arguments.

    Attributes:
        user_id: The end user the run acts for.
        tenant_id: The tenant (organisation) the user belongs to.
        roles: The user's roles, matched by the permission rules.
        policy: The name of the policy the run is held to.
    """

    user_id: str = "anonymous"
    tenant_id: str = "default"
    roles: tuple[str, ...] = field(default=("user",))
    policy: str = "default"

    def __post_init__(self) -> None:
        for name in ("user_id", "tenant_id", "policy"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise UserError(
                    f"RunContext.{name} must be a non-empty string, got {value!r}. "
                    f"Pass it explicitly, e.g. RunContext({name}='acme')."
                )
            check_storable(f"RunContext.{name}", value)
        roles: object = self.roles
        if isinstance(roles, str) or not all(isinstance(r, str) for r in self.roles):
            raise UserError(
                f"RunContext.roles must be a tuple of role names, got {self.roles!r}. "
                "For example: RunContext(roles=('support',))."
            )
        for role in self.roles:
            check_storable("RunContext.roles", role)
        object.__setattr__(self, "roles", tuple(self.roles))

    def key(self, sep: str = "/") -> str:
        """`tenant<sep>user`, one string per (tenant, user): the ledger's key of this user.

        Each id has `%` and `sep` percent-escaped, so user `b/c` of tenant `a` and user `c` of
        tenant `a/b` never share a budget, a standing approval or an approval's seal (joined
        as they are, both read `a/b/c`). Ids with neither character keep the key they had.
        """
        code = f"%{ord(sep):02X}"
        return sep.join(
            part.replace("%", "%25").replace(sep, code) for part in (self.tenant_id, self.user_id)
        )


_IDS = ("thread_id", "checkpoint_ns", "checkpoint_id")
"""The ids of a run's config that name what it reads and writes."""


def storable_ids(config: Mapping[str, Any] | None) -> None:
    r"""Refuse a config whose thread or checkpoint id no database stores (`check_storable`).

    Else a run on thread `"t\ud800"` ended `error/storage` ("once the checkpointer is fixed"),
    `get_state` raised a bare `UnicodeEncodeError`, and on PostgreSQL a run on `"t\x00"` left a
    run record that failed every later run record write of its agent.

    Raises:
        UserError: an id holds a NUL character or a lone surrogate.
    """
    configurable = (config or {}).get("configurable") or {}
    for name in _IDS:
        value = configurable.get(name)
        if isinstance(value, str):
            check_storable(name, value)


def check_storable(what: str, value: str) -> None:
    """Refuse an id the ledger and the checkpointer cannot store (NUL, a lone surrogate).

    Neither UTF-8 (a lone surrogate) nor PostgreSQL's text (NUL) holds them.

    Raises:
        UserError: `value` holds one, named as `what`.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        bad = True
    else:
        bad = "\x00" in value
    if bad:
        raise UserError(
            f"{what} must be text that can be stored, got {value!r} (a NUL character or a lone "
            "surrogate): pass the id as plain UTF-8 text."
        )
