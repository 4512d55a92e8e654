"""`human_review`: ask a human about tool calls that need approval, with a typed resume.

The interrupt payload is a list of Agent-Inbox-style requests, one per call awaiting approval.
Resume with one response per request (a list, in the requests' order: an answer naming another
`tool_call_id` than the request in its place is refused), a dict keyed by `tool_call_id` (every
request answered; a key that names no request, nor a repeat of one, is refused), or, when there
is a single request, one response. A response is
`{"type": "approve" | "edit" | "reject" | "respond", ...}`; Agent Inbox's `accept` / `ignore` /
`response` are accepted too.

- `approve` binds the approval to the call's exact arguments (tool + canonical args + policy),
  as the tool reads them (`keel.tools._args.approval_digests`: `10` and `10.0` for an `int`
  are one call, so a rejected call asked again spelled anew is answered `rejected` at once).
  With `"always": {"ttl_seconds": 3600}` (and optionally `"same_args": True`) it also stands
  for later calls of the tool in this thread until it expires (`keel.guards.standing`); a
  served reviewer answering another user's thread may not make it user-wide (`"scope": "user"`).
- `edit` (`{"type": "edit", "args": {...}}`) replaces the arguments and approves the new call.
- `reject` (optional `"message"`) answers the call as rejected and ends the run as `rejected`.
- `respond` (`{"type": "respond", "message": "..."}`) answers the call with the human's text
  instead of running it; the model goes on from there.

A side-effecting call that repeats an earlier call of its turn (same tool, same canonical
arguments: `keel.tools._duplicates`) is not asked about: it follows the answer to that call
(a rejection or a reply answers it too, an edit edits it), and it never runs on its own.

With a ledger, a side-effecting call that started but never finished (the process died) is
asked about too, as a request with `kind == "outcome_unknown"` ("did this happen?"):

- `approve` (optional `"message"`: the result) — it happened; recorded as done, not run again.
- `run_again` — it did not happen; it runs again.
- `reject` (optional `"message"`) — do not run it; the run ends as `rejected`.
- `respond` — it happened, and the human's text is its result.

Each decision reaches the audit log with its approver: an approval, a rejection or a reply
through the state update; an answer to "did this happen?" that leaves the reply to
`execute_tools` through the update's `SETTLED_KEY`, which is no state channel (LangGraph drops
a node's keys that are not, so only keel's audit reads it).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal, NotRequired, Unpack, cast

from langchain_core.messages import AIMessage, ToolCall, ToolMessage
from langchain_core.runnables import RunnableConfig
from langgraph.runtime import Runtime
from langgraph.types import interrupt
from typing_extensions import TypedDict

from keel import outcome
from keel._drive import Op, Steps, both
from keel._node import (
    NO_RESUME,
    RunnableCallable,
    context_of,
    peek_resume,
    thread_of,
)
from keel.approvals import REVIEWER_META, RunGrants, approval_key, decided
from keel.db.idempotency import CallRecord, records_flow, resolve_flow
from keel.db.ledger import Flow, Ledger
from keel.errors import StorageError, UserError
from keel.guards.agent_guards import AgentGuards, GuardOptions
from keel.guards.content import InputGuardPolicy
from keel.guards.injection_model import DetectorCalls
from keel.guards.screening import GUARD_KEY, GuardNote, ascreen_human_text, screen_human_text
from keel.guards.standing import Always, StandingStore, standing_approval
from keel.history import in_call_order, pending_tool_calls
from keel.identity import reviewer_of, server_user
from keel.nodes._once import ledger_key
from keel.redact import sanitized_logger
from keel.state import AgentState, Approval, RunContext
from keel.tools._args import approval_digests, as_called, invalid_args
from keel.tools._duplicates import answer_duplicates, duplicates
from keel.tools.registry import ToolRegistry

__all__ = [
    "REVIEWER_META",
    "SETTLED_KEY",
    "ReviewRequest",
    "ReviewResponse",
    "Settled",
    "human_review",
]

SETTLED_KEY = "keel_settled"
"""The update key listing the "did this happen?" answers whose reply `execute_tools` writes
(`Settled`), for the audit log; not a state channel, so it is never saved."""

log = sanitized_logger("keel.nodes.human_review")

_ALIASES = {"accept": "approve", "ignore": "reject", "response": "respond"}


class ReviewRequest(TypedDict):
    """One call awaiting a human (Agent Inbox `HumanInterrupt` shape, plus keel's fields)."""

    action_request: dict[str, Any]
    config: dict[str, bool]
    description: str
    tool_call_id: str
    digest: str
    kind: NotRequired[Literal["outcome_unknown"]]
    """Set on a "did this happen?" request about a call whose outcome is unknown."""


class Settled(TypedDict):
    """A human's answer about a call of unknown outcome that `execute_tools` replies to."""

    tool: str
    tool_call_id: str
    decision: Literal["approved", "responded", "run_again"]
    result: str
    """What the ledger records as the call's result ("" for `run_again`: it runs again)."""
    reviewer: NotRequired[str]


class ReviewResponse(TypedDict):
    """A human's answer to one `ReviewRequest`."""

    type: Literal["approve", "edit", "reject", "respond", "run_again"]
    args: NotRequired[dict[str, Any]]
    message: NotRequired[str]
    reviewer: NotRequired[str]
    always: NotRequired[bool | dict[str, Any]]
    """On approve / edit: a standing approval (`keel.guards.standing.Always`)."""


def human_review(
    tools: ToolRegistry,
    *,
    guards: AgentGuards | None = None,
    name: str = "human_review",
    **options: Unpack[GuardOptions],
) -> RunnableCallable:
    """A node that interrupts for the calls that need a human and records the decisions.

    Args:
        tools: The agent's tools.
        guards: What the agent is held to (`AgentGuards.from_policy(policy, ledger)`): the
            gate decides which calls need approval (`ask`); approvals are bound to the
            policy's name and version and sealed with its `grants` so `execute_tools` can
            trust them; `standing` keeps user-scoped standing approvals (`"always": {"scope":
            "user"}`) in the ledger (without it, such an answer is refused with a
            `UserError`); with the idempotency `ledger`, calls whose outcome is unknown
            (started, never finished) are asked about ("did this happen?"); the reviewer's
            text (`respond`, a rejection's message) passes its `input_guard` before the model
            reads it, as a user's message does.
        name: The node's name.
        **options: Single guards instead of (or over) `guards`: `gate`, `policy_version`,
            `policy_name`, `standing`, `ledger`, `grants` (see `AgentGuards.of`).
    """
    held = AgentGuards.of(guards, **options)
    sealer, standing, ledger = held.grants, held.standing, held.ledger
    screening = held.input_guard
    calls = DetectorCalls(held.model, screening.detector if screening is not None else None)

    def in_ledger(state: AgentState, config: RunnableConfig) -> tuple[str, list[str]]:
        """The thread and the pending calls whose outcome the ledger may know."""
        _, calls = pending_tool_calls(state.get("messages") or [])
        keys = []
        for call in calls:
            entry = tools.get(call["name"])
            if entry is not None and isinstance(call.get("args"), dict):
                keys.append(ledger_key(entry, call, config, ledger))
        found = [k for k in keys if k is not None]
        return (found[0][0] if found else ""), [k[1] for k in found]

    def decide(
        state: AgentState,
        config: RunnableConfig,
        runtime: Runtime[RunContext],
        records: Mapping[str, CallRecord],
    ) -> Steps[tuple[dict[str, Any], list[Flow[bool]], dict[str, Approval]]]:
        """The state update, the ledger updates to make, and the standing approvals to keep."""
        context = context_of(runtime)
        run = sealer.for_run(thread_of(runtime), context)
        pending = _requests(held, tools, state, run, context, records)
        if not pending:
            return {"outcome": None}, [], {}
        waiting = peek_resume(config)
        reviewer = reviewer_of(server_user(runtime))
        repeats = _repeats_of(state.get("messages") or [], tools, pending)
        if waiting is not NO_RESUME:
            # Check the answer before interrupt() consumes it: LangGraph stores a consumed
            # resume value even when the node then raises, so a bad answer would stick.
            checked = _normalize(waiting, pending, repeats)
            _check_scope(checked, standing, reviewer, context)
            _check_edits(checked, pending, tools)
        answers = _normalize(interrupt(pending), pending, repeats)
        policy = held.policy_id(context)
        thread, _ = in_ledger(state, config)
        if screening is not None:
            answers = yield both(_guarded, _aguarded, answers, screening)
        update, settle, for_user = _apply(state, pending, answers, policy, thread, tools, reviewer)
        update["approvals"] = {k: run.seal(k, a) for k, a in update["approvals"].items()}
        return update, settle, {k: update["approvals"][k] for k in for_user}

    def steps(
        state: AgentState, config: RunnableConfig, runtime: Runtime[RunContext]
    ) -> Steps[dict[str, Any]]:
        thread, ids = in_ledger(state, config)
        records: Mapping[str, CallRecord] = {}
        if ledger is not None and ids:
            try:
                records = yield _flow(ledger, records_flow(thread, ids))
            except StorageError as exc:
                _unread(exc)
        update, settle, for_user = yield from decide(state, config, runtime, records)
        for flow in settle:
            assert ledger is not None
            try:
                yield _flow(ledger, flow)
            except StorageError as exc:
                _unsettled(exc)
        if for_user and standing is not None:
            ctx = context_of(runtime)
            yield Op(lambda: standing.save(ctx, for_user), lambda: standing.asave(ctx, for_user))
        return update

    return calls.node(name, steps)


def _requests(
    held: AgentGuards,
    tools: ToolRegistry,
    state: AgentState,
    run: RunGrants,
    context: RunContext,
    records: Mapping[str, CallRecord],
) -> list[ReviewRequest]:
    """The calls of the last AI message that wait for a human, as review requests."""
    messages = state.get("messages") or []
    _, calls = pending_tool_calls(messages)
    policy = held.policy_id(context)
    approvals = run.trusted(state.get("approvals"))
    decide = held.deciding(approvals, context)
    dupes = _duplicates_of(messages, tools)
    out: list[ReviewRequest] = []
    for call in calls:
        entry = tools.get(call["name"])
        if entry is None or invalid_args(entry, call.get("args")) is not None:
            continue  # execute_tools answers it: no human is asked about a call that cannot run
        if (call.get("id") or "") in dupes:
            continue  # a repeat of an earlier call of the turn follows that call's answer
        decision = decide(entry, call["args"], context)
        digests = approval_digests(entry, call["args"], policy)
        digest = digests[0]  # a decision is stored under the arguments as the tool reads them
        record = records.get(call.get("id") or "")
        if record is not None and record.state == "started":
            out.append(_unknown_request(call, record, digest))
            continue
        if decision.action != "ask" or decided(approvals, digests, call.get("id") or ""):
            continue
        out.append(
            {
                "action_request": {"action": entry.name, "args": call["args"]},
                "config": {
                    "allow_accept": True,
                    "allow_edit": True,
                    "allow_respond": True,
                    "allow_ignore": True,
                },
                "description": decision.reason
                + (f" (rule: {decision.rule})" if decision.rule else ""),
                "tool_call_id": call.get("id") or "",
                "digest": digest,
            }
        )
    return out


def _flow(ledger: Ledger, flow: Flow[Any]) -> Op:
    return both(ledger.run, ledger.arun, flow)


def _unread(exc: StorageError) -> None:
    """The ledger could not say which calls started: ask as usual.

    `execute_tools` claims each call in the ledger before running it, so none runs while the
    ledger is down.
    """
    log.warning("keel could not read the idempotency ledger before review: %r", exc)


def _unsettled(exc: StorageError) -> None:
    """A human's answer about a call of unknown outcome could not be recorded.

    The call stays `started`, so the next run asks again (it never runs twice).
    """
    log.warning("keel could not record a human's answer in the idempotency ledger: %r", exc)


def _unknown_request(call: ToolCall, record: CallRecord, digest: str) -> ReviewRequest:
    started = datetime.fromtimestamp(record.started_at, UTC).isoformat(timespec="seconds")
    return {
        "action_request": {"action": call["name"], "args": call["args"]},
        "config": {
            "allow_accept": True,
            "allow_edit": False,
            "allow_respond": True,
            "allow_ignore": True,
        },
        "description": (
            f"Did this happen? {call['name']} started at {started} but never finished (the "
            "process stopped), so whether it took effect is unknown. Answer 'approve' if it "
            "did (it is recorded as done), 'run_again' if it did not, or 'reject' to not run it."
        ),
        "tool_call_id": call.get("id") or "",
        "digest": digest,
        "kind": "outcome_unknown",
    }


def _check_scope(
    answers: Sequence[ReviewResponse],
    standing: StandingStore | None,
    reviewer: str | None = None,
    context: RunContext | None = None,
) -> None:
    """Refuse a user-scoped standing approval keel cannot keep, or its reviewer may not give.

    A reviewer answering another user's thread (`keel.identity`: the run acts for the owner)
    decides on this thread: a user-scoped one would allow the tool in all the owner's threads,
    ones the reviewer never saw, and stand in the owner's name.
    """
    for answer in answers:
        always = Always.parse(answer["always"]) if "always" in answer else None
        if always is None or always.scope != "user":
            continue
        if reviewer is not None and context is not None and reviewer != context.user_id:
            raise UserError(
                f"A reviewer's standing approval stands in the thread they answer: with scope "
                f"'user' it would allow the call in all the threads of {context.user_id!r}, "
                "ones you have not seen. Answer with 'always': {'scope': 'thread', ...}, or "
                "without 'always'; a user-wide one is the thread owner's to give (or the "
                "policy's)."
            )
        if standing is None:
            raise UserError(
                "A standing approval with scope 'user' is kept in the ledger: pass "
                "build_agent(..., ledger=keel.Ledger(url)), or use scope 'thread'."
            )


def _check_edits(
    answers: Sequence[ReviewResponse], pending: Sequence[ReviewRequest], tools: ToolRegistry
) -> None:
    """Refuse edited arguments that do not fit the tool's schema, while the human is there."""
    for request, answer in zip(pending, answers, strict=True):
        entry = tools.get(request["action_request"]["action"])
        if answer["type"] != "edit" or entry is None:
            continue
        problem = invalid_args(entry, answer.get("args"))
        if problem is not None:
            raise UserError(
                f"The edited arguments for {request['action_request']['action']} (call "
                f"{request['tool_call_id']!r}) do not fit its schema: {problem}. Resume again "
                "with arguments that do: {'type': 'edit', 'args': {...}}."
            )


def _repeats_of(
    messages: Sequence[Any], tools: ToolRegistry, pending: Sequence[ReviewRequest]
) -> frozenset[str]:
    """The ids of the repeats of the waiting calls.

    A dict answer may name them; they follow their first call's answer whatever it says.
    """
    waiting = {r["tool_call_id"] for r in pending}
    return frozenset(
        i for i, first in _duplicates_of(messages, tools).items() if first.get("id") in waiting
    )


def _by_id(
    resume: Mapping[Any, Any], pending: Sequence[ReviewRequest], repeats: Collection[str]
) -> list[Any]:
    """A dict answer keyed by `tool_call_id`, as a list in the requests' order.

    Every waiting call needs its answer, and every key must name a waiting call (or a repeat
    of one): an answer for a call that does not wait here (another agent's, a stale one, a
    typo) would otherwise be dropped without a word.
    """
    ids = [r["tool_call_id"] for r in pending]
    unknown = [k for k in resume if k not in ids and k not in repeats]
    missing = [i for i in ids if i not in resume]
    if unknown or missing:
        waits = ", ".join(
            f"{r['action_request']['action']} (call {r['tool_call_id']!r})" for r in pending
        )
        problems = []
        if unknown:
            problems.append(f"is keyed by {', '.join(map(repr, unknown))}, not among them")
        if missing:
            problems.append(f"has no answer for {', '.join(map(repr, missing))}")
        raise UserError(
            f"human_review waits on {waits}, and the answer {dict(resume)!r} "
            f"{' and '.join(problems)}. Answer with a dict keyed by the waiting calls' "
            "tool_call_id, a list in the requests' order, or, for one call, one response "
            "({'type': 'approve'}, ...)."
        )
    return [resume[i] for i in ids]


def _keyed(
    resume: Mapping[Any, Any], pending: Sequence[ReviewRequest], repeats: Collection[str]
) -> list[Any]:
    """The keys of a one-response answer that name a waiting call (or a repeat of one)."""
    ids = {r["tool_call_id"] for r in pending}
    return [k for k in resume if k in ids or k in repeats]


def _normalize(
    resume: Any, pending: Sequence[ReviewRequest], repeats: Collection[str] = ()
) -> list[ReviewResponse]:
    if isinstance(resume, Mapping) and "type" not in resume:
        resume = _by_id(resume, pending, repeats)
    elif isinstance(resume, Mapping) and (keyed := _keyed(resume, pending, repeats)):
        raise UserError(
            f"The answer {dict(resume)!r} is both one response (its 'type') and answers keyed "
            f"by {', '.join(map(repr, keyed))}: keel would take the first and drop the rest. "
            "Answer with one response, or with a dict keyed by the waiting calls' tool_call_id."
        )
    elif isinstance(resume, Mapping | str):
        resume = [resume]
    if not isinstance(resume, Sequence) or len(resume) != len(pending):
        raise UserError(
            f"human_review is waiting on {len(pending)} call(s) "
            f"({', '.join(r['action_request']['action'] for r in pending)}) and got "
            f"{resume!r}. Resume with Command(resume=[{{'type': 'approve'}}, ...]) — one "
            "response per call, a dict keyed by tool_call_id, or one response for one call."
        )
    for request, raw in zip(pending, resume, strict=True):
        named = raw.get("tool_call_id") if isinstance(raw, Mapping) else None
        if named is not None and named != request["tool_call_id"]:
            raise UserError(
                f"The answer {raw!r} names call {named!r}, but the request in its place is "
                f"{request['action_request']['action']} (call {request['tool_call_id']!r}): a "
                "list answers the requests in their order. Answer in that order, or with a "
                "dict keyed by tool_call_id."
            )
    answers = [_response(r) for r in resume]
    for request, answer in zip(pending, answers, strict=True):
        unknown = request.get("kind") == "outcome_unknown"
        if unknown and answer["type"] == "edit":
            raise UserError(
                f"{request['action_request']['action']} (call {request['tool_call_id']!r}) "
                "started and never finished, so it cannot be edited: answer 'approve' (it "
                "happened), 'run_again' (it did not) or 'reject' (do not run it)."
            )
        if not unknown and answer["type"] == "run_again":
            raise UserError(
                f"'run_again' answers a \"did this happen?\" request; "
                f"{request['action_request']['action']} (call {request['tool_call_id']!r}) "
                "awaits approval: answer 'approve', 'edit', 'reject' or 'respond'."
            )
    return answers


_ANSWER_KEYS = frozenset(ReviewResponse.__annotations__)
"""The keys of a review answer; any other key a client sends is dropped."""


def _response(raw: Any) -> ReviewResponse:
    if isinstance(raw, str):
        raw = {"type": raw}
    kind = _ALIASES.get(str(raw.get("type")), raw.get("type")) if isinstance(raw, Mapping) else None
    if kind not in ("approve", "edit", "reject", "respond", "run_again"):
        raise UserError(
            f"Unknown review response {raw!r}: use {{'type': 'approve'}}, "
            "{'type': 'edit', 'args': {...}}, {'type': 'reject', 'message': '...'} or "
            "{'type': 'respond', 'message': '...'}."
        )
    assert isinstance(raw, Mapping)
    # only what a reviewer may say: a key of keel's own (the input guard's note) is keel's to set
    response: dict[str, Any] = {k: v for k, v in raw.items() if k in _ANSWER_KEYS}
    response["type"] = kind
    args = response.get("args")
    if "always" in response and kind not in ("approve", "edit"):
        raise UserError(f"'always' goes with an 'approve' or 'edit' response, not {kind!r}.")
    if "always" in response:
        Always.parse(response["always"])  # checked before interrupt() consumes the answer
    if kind == "approve":
        # an approval approves the call as it stands; changing arguments is an `edit`
        # (Agent Inbox's `accept` sends its ActionRequest, or null, in `args`)
        response.pop("args", None)
    if kind == "edit" and isinstance(args, Mapping) and isinstance(args.get("args"), dict):
        response["args"] = args["args"]  # Agent Inbox: {"args": {"action": ..., "args": {...}}}
    if kind == "respond" and "message" not in response and isinstance(args, str):
        response["message"] = args  # Agent Inbox: {"type": "response", "args": "text"}
    if kind == "edit" and not isinstance(response.get("args"), dict):
        raise UserError(
            "An 'edit' response needs the new arguments: {'type': 'edit', 'args': {...}}."
        )
    if kind == "respond" and not isinstance(response.get("message"), str):
        raise UserError("A 'respond' response needs text: {'type': 'respond', 'message': '...'}.")
    if not isinstance(response.get("reviewer", ""), str):  # the audit log's approver
        raise UserError(
            f"'reviewer' names who answered, as text ({{'reviewer': 'alice'}}), got "
            f"{response['reviewer']!r}."
        )
    return response  # type: ignore[return-value]


def _apply(
    state: AgentState,
    pending: Sequence[ReviewRequest],
    answers: Sequence[ReviewResponse],
    policy: str,
    thread: str,
    tools: ToolRegistry,
    reviewer: str | None = None,
) -> tuple[dict[str, Any], list[Flow[bool]], dict[str, Approval]]:
    """The decisions' state update, ledger updates and user-scoped standing approvals.

    `reviewer` (the server's authenticated user) overrides any `reviewer` the answers name: a
    served client cannot say who approved.
    """
    messages = state.get("messages") or []
    index, _ = pending_tool_calls(messages)
    ai = messages[index]
    assert isinstance(ai, AIMessage)
    approvals: dict[str, Approval] = {}
    for_user: dict[str, Approval] = {}
    results: list[ToolMessage] = []
    settled: list[Settled] = []
    edits: dict[str, dict[str, Any]] = {}
    rejected: list[str] = []
    settle: list[Flow[bool]] = []
    for request, answer in zip(pending, answers, strict=True):
        tool = request["action_request"]["action"]
        call_id = request["tool_call_id"]
        if request.get("kind") == "outcome_unknown":
            flow, reply = _settle(thread, request, answer, _who(answer, reviewer))
            settle.append(flow)
            if isinstance(reply, ToolMessage):
                results.append(reply)
                rejected.append(tool)
            else:
                settled.append(reply)
        elif answer["type"] in ("approve", "edit"):
            args = answer.get("args", request["action_request"]["args"])
            if answer["type"] == "edit":
                edits[call_id] = dict(args)
            entry = tools.get(tool)
            assert entry is not None  # a request names a tool of the agent's (`_requests`)
            digest, _ = approval_digests(entry, args, policy)
            approvals[approval_key(digest, call_id, "approved")] = _approval(
                digest, tool, call_id, "approved", answer, reviewer
            )
            if "always" in answer:
                always = Always.parse(answer["always"])
                read, version = as_called(entry, dict(args)), entry.spec.version
                key, standing = standing_approval(
                    always, tool, read, policy, call_id, version=version
                )
                if (who := _who(answer, reviewer)) is not None:
                    standing["reviewer"] = who  # who gave it, as on the call's approval
                approvals[key] = standing
                if always.scope == "user":
                    for_user[key] = standing
        elif answer["type"] == "reject":
            digest = request["digest"]
            approvals[digest] = _approval(digest, tool, call_id, "rejected", answer, reviewer)
            note = f": {answer['message']}" if answer.get("message") else ""
            text = f"Rejected by a human reviewer{note}."
            results.append(_reply(call_id, tool, text, "rejected", answer))
            rejected.append(tool)
        else:
            text = f"A human answered instead of running {tool}: {answer['message']}"
            results.append(_reply(call_id, tool, text, "respond", answer, _who(answer, reviewer)))
    update: dict[str, Any] = {"approvals": approvals, "outcome": None}
    if settled:
        update[SETTLED_KEY] = settled
    # the repeats of a call follow its answer: a reply answers them too, an edit edits them
    dupes = _duplicates_of(messages, tools)
    _, waiting = pending_tool_calls(messages)
    results = _with_duplicates(waiting, dupes, results)
    for dupe, primary in dupes.items():
        if primary.get("id") in edits:
            edits[dupe] = edits[primary.get("id") or ""]
    new_messages: list[Any] = []
    if edits:
        calls: list[ToolCall] = [
            {**tc, "args": edits.get(tc.get("id") or "", tc["args"])} for tc in ai.tool_calls
        ]
        new_messages.append(ai.model_copy(update={"tool_calls": calls}))
    new_messages.extend(in_call_order(messages, results) if not edits else results)
    if new_messages:
        update["messages"] = new_messages
    if rejected:
        update["outcome"] = outcome.stopped(
            "rejected", f"a human rejected the call to {', '.join(rejected)}"
        )
    return update, settle, for_user


def _duplicates_of(messages: Sequence[Any], tools: ToolRegistry) -> dict[str, ToolCall]:
    """The repeated side-effecting calls of the last AI message (`keel.tools._duplicates`)."""
    index, _ = pending_tool_calls(messages)
    ai = messages[index] if index >= 0 else None
    return duplicates(ai.tool_calls, tools.get) if isinstance(ai, AIMessage) else {}


def _with_duplicates(
    waiting: Sequence[ToolCall], dupes: Mapping[str, ToolCall], results: list[ToolMessage]
) -> list[ToolMessage]:
    """`results` and the answers of the duplicates of the calls they answer, in call order."""
    if not dupes or not results:
        return results
    answers = {m.tool_call_id: m for m in [*results, *answer_duplicates(waiting, dupes, results)]}
    return [answers[c.get("id") or ""] for c in waiting if (c.get("id") or "") in answers]


def _guarded(answers: list[ReviewResponse], guard: InputGuardPolicy) -> list[ReviewResponse]:
    """`answers` with their text (`message`) as the input guard lets the model read it.

    The guard's note rides along under `GUARD_KEY` until `_reply` puts it on the reply.
    """
    return [_with_text(a, *screen_human_text(t, guard)) if (t := _text(a)) else a for a in answers]


async def _aguarded(answers: list[ReviewResponse], guard: InputGuardPolicy) -> list[ReviewResponse]:
    """`_guarded` for async code: an async detector (`ModelDetector`) is awaited."""
    return [
        _with_text(a, *(await ascreen_human_text(t, guard))) if (t := _text(a)) else a
        for a in answers
    ]


def _text(answer: ReviewResponse) -> str:
    """The answer's text for the model (a `respond` answer, a rejection's message), or ""."""
    text = answer.get("message")
    return text if isinstance(text, str) else ""


def _with_text(answer: ReviewResponse, screened: str, note: GuardNote | None) -> ReviewResponse:
    if note is None:
        return answer
    return cast(ReviewResponse, {**answer, "message": screened, GUARD_KEY: note})


def _settle(
    thread: str, request: ReviewRequest, answer: ReviewResponse, reviewer: str | None
) -> tuple[Flow[bool], ToolMessage | Settled]:
    """The ledger update for an answer to "did this happen?", and the reply for a rejection.

    An answer that it happened (or a rerun) leaves the reply to `execute_tools`, which reads
    the recorded result (or runs the call) from the ledger; it comes back as `Settled`, for
    the audit log.
    """
    tool, call_id = request["action_request"]["action"], request["tool_call_id"]
    kind = answer["type"]
    settled: Settled = {
        "tool": tool,
        "tool_call_id": call_id,
        "decision": "run_again",
        "result": "",
    }
    if reviewer is not None:
        settled["reviewer"] = reviewer
    if kind == "run_again":
        return resolve_flow(thread, call_id, "cleared"), settled
    if kind == "reject":
        note = f": {answer['message']}" if answer.get("message") else ""
        text = f"Rejected by a human reviewer{note}; {tool} was not run again."
        result = {"content": text, "keel_status": "rejected"}
        return resolve_flow(thread, call_id, "failed", result), _reply(
            call_id, tool, text, "rejected", answer, reviewer
        )
    text = answer.get("message") or f"A human reviewer confirmed that {tool} took effect."
    status = "respond" if kind == "respond" else "success"
    result = {"content": text, "keel_status": status}
    decision: Literal["approved", "responded"] = "responded" if kind == "respond" else "approved"
    settled = {**settled, "decision": decision, "result": text}
    return resolve_flow(thread, call_id, "completed", result), settled


def _approval(
    digest: str,
    tool: str,
    call_id: str,
    decision: Literal["approved", "rejected"],
    answer: ReviewResponse,
    reviewer: str | None,
) -> Approval:
    approval: Approval = {
        "digest": digest,
        "tool": tool,
        "tool_call_id": call_id,
        "decision": decision,
    }
    who = _who(answer, reviewer)
    if who is not None:
        approval["reviewer"] = who
    return approval


def _who(answer: ReviewResponse, reviewer: str | None) -> str | None:
    """Who answered: the server's authenticated user, else (embedded) the answer's `reviewer`."""
    return reviewer if reviewer is not None else answer.get("reviewer")


def _reply(
    call_id: str,
    tool: str,
    content: str,
    status: str,
    answer: Mapping[str, Any] | None = None,
    reviewer: str | None = None,
) -> ToolMessage:
    meta: dict[str, Any] = {"keel_status": status}
    if answer is not None and GUARD_KEY in answer:  # what the input guard found in its text
        meta[GUARD_KEY] = answer[GUARD_KEY]
    if reviewer is not None:  # who answered in the tool's place, for the audit log
        meta[REVIEWER_META] = reviewer
    return ToolMessage(
        content=content,
        tool_call_id=call_id,
        name=tool,
        status="error" if status == "rejected" else "success",
        response_metadata=meta,
    )
