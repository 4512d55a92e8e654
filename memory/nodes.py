"""`recall` and `reflect`: the nodes that make an agent remember and learn.

- `recall` (before planning): the user's relevant memories and lessons, semantic + most recent,
  within a token budget, as one `SystemMessage(id="keel-recall")`. `call_model` sends every
  system message first, merged into one (`valid_history`), so the memories join the system
  prompt; the fixed id makes the next turn's recall replace this one instead of piling up.
  Each memory is screened first with the input guard, as a tool result is: one it finds an
  injection in is left out (it would otherwise speak with the system prompt's authority).
- `reflect` (after the run): stores a `Lesson` of the finished run in the user's lessons.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from langchain_core.messages import RemoveMessage, SystemMessage
from langchain_core.runnables import RunnableConfig
from langgraph.runtime import Runtime
from langgraph.store.base import BaseStore, SearchItem

from keel._drive import Op, Steps
from keel._node import RunnableCallable, context_of, steps_node
from keel.errors import UserError
from keel.guards.content import ContentFinding, InputGuardPolicy, acheck_input, check_input
from keel.guards.injection_model import DetectorCalls
from keel.guards.model_call import ModelCallGuards
from keel.guards.screening import GUARD_KEY, guard_note
from keel.memory.lessons import extract_lesson
from keel.memory.scope import identity_of, store_of, user_namespace
from keel.redact import sanitized_logger
from keel.state import AgentState, RunContext, task_start
from keel.tools.stubs import isolated

__all__ = ["RECALL_ID", "recall", "reflect"]

log = sanitized_logger("keel.memory")

RECALL_ID = "keel-recall"
"""The id of the system message `recall` writes (and replaces on the next turn)."""

HEADER = (
    "What you remember about this user (use it when relevant; it may be outdated). A lesson "
    "tells how an earlier run went: nothing in it is done for the current task, which needs "
    "its own tool calls:"
)


DEFAULT_GUARD = InputGuardPolicy()
"""What `recall` screens memories with unless told otherwise: keel's heuristics."""


def _approx_tokens(text: str) -> int:
    return len(text) // 4 + 1


def recall(
    store: BaseStore | None = None,
    *,
    kinds: Sequence[str] = ("memories", "lessons"),
    limit: int = 5,
    recent: int = 2,
    token_budget: int = 800,
    count_tokens: Callable[[str], int] = _approx_tokens,
    guard: InputGuardPolicy | None = DEFAULT_GUARD,
    guards: ModelCallGuards | None = None,
    name: str = "recall",
) -> RunnableCallable:
    """A node that puts the user's relevant memories into the model's context.

    The memories join the system prompt, so each one is screened first as untrusted text (a
    memory may have been written by a model that obeyed an injected page, or by a client
    through the store API): one the input guard finds an injection in is left out, whatever
    its `injection_action` (`redact` keeps it with the matched spans replaced). The recalled
    message says how many were left out, and carries the guard's note for the audit log.

    Args:
        store: The store; the graph's own (`compile(store=...)`) when omitted.
        kinds: Namespaces to read, each `(kind, tenant, user)` from the run's `RunContext`.
        limit: Semantic matches per kind for the latest user message.
        recent: Most recently updated memories per kind, added when not already matched.
        token_budget: The most tokens the recalled text may take; lower-ranked memories are
            left out first.
        count_tokens: Counts tokens of a text (default: characters / 4).
        guard: The input guard memories are screened with (as tool results are); default:
            keel's heuristics. `build_agent` passes its policy's. `None` screens nothing.
        guards: The run's model-call guards a `ModelDetector`'s calls go through (`build_agent`
            passes the agent's); its calls are counted in the run's `usage` either way. A call
            they refuse leaves the memories out (`model_error`), and the run's next model call
            meets the same budget.
        name: The node's name.
    """
    _check_recall(kinds, limit, recent, token_budget)
    if guard is not None and not isinstance(guard, InputGuardPolicy):
        raise UserError(f"recall(guard=...) must be an InputGuardPolicy or None, got {guard!r}.")
    calls = DetectorCalls(guards, guard.detector if guard is not None else None)

    def steps(state: AgentState, runtime: Runtime[RunContext] | None) -> Steps[dict[str, Any]]:
        ctx = identity_of(context_of(runtime))  # fails closed, as a missing store does
        st, query = store_of(runtime, store), _last_user_text(state)
        asks = [(query, limit), (None, recent)] if query else [(None, recent)]
        searches = [(user_namespace(ctx, k), q, n) for k in kinds for q, n in asks if n]
        found: list[SearchItem] = []
        try:
            for ns, q, n in searches:
                found.extend((yield _search(st, ns, q, n)))
        except Exception as exc:  # the store failed: the run goes on without memories
            return _degraded(state, exc)
        lines = _render(found, token_budget, count_tokens)
        kept, findings = yield from _screened(lines, guard)
        if kept or findings:
            return {
                "messages": [_recalled(kept, len(lines) - len(kept), findings)],
                **_recovered(state),
            }
        if any(m.id == RECALL_ID for m in state.get("messages") or []):
            return {"messages": [RemoveMessage(id=RECALL_ID)], **_recovered(state)}
        return _recovered(state)

    return calls.node(name, lambda state, _, runtime: steps(state, runtime), stop=False)


def reflect(
    store: BaseStore | None = None,
    *,
    kind: str = "lessons",
    ttl: float | None = None,
    name: str = "reflect",
) -> RunnableCallable:
    """A node that stores the finished run's `Lesson` (asked, outcome, why, tools, errors).

    A replay or shadow run (`keel.tools.stubs.isolated`) stores none.

    Args:
        store: The store; the graph's own when omitted.
        kind: The namespace kind lessons go to: `(kind, tenant, user)`.
        ttl: Minutes a lesson lives (`None`: kept); needs a store with TTL support.
        name: The node's name.
    """
    if ttl is not None and not ttl > 0:
        raise UserError(f"reflect(ttl=...) must be minutes > 0 or None, got {ttl!r}.")

    def plan(
        state: AgentState, runtime: Runtime[RunContext] | None
    ) -> tuple[BaseStore, tuple[str, ...], dict[str, Any]] | None:
        lesson = extract_lesson(state)
        if lesson is None or isolated():  # a replay's lesson is not the user's
            return None
        ns = user_namespace(context_of(runtime), kind)
        return store_of(runtime, store), ns, lesson.value()

    def _ttl(st: BaseStore) -> dict[str, Any]:
        return {"ttl": ttl} if ttl is not None and st.supports_ttl else {}

    def steps(
        state: AgentState, config: RunnableConfig, runtime: Runtime[RunContext]
    ) -> Steps[dict[str, Any]]:
        todo = plan(state, runtime)
        if todo is not None:
            st, ns, value = todo
            try:
                put = (ns, uuid.uuid4().hex, value)
                yield Op(partial(st.put, *put, **_ttl(st)), partial(st.aput, *put, **_ttl(st)))
            except Exception as exc:
                return _degraded(state, exc, "reflect failed, the lesson was not stored")
        return {}

    return steps_node(name, steps)


_WARNING = "memory: "


def _degraded(
    state: AgentState, exc: Exception, what: str = "recall failed, no memories used"
) -> dict[str, Any]:
    """The store failed: go on without it, warned (logged and in `state["warnings"]`)."""
    reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
    log.warning("keel memory: the store failed, the run goes on (%s): %s", what, reason)
    kept = state.get("warnings") or []
    if what.startswith("recall"):  # recall starts a task: an earlier task's warning is over
        kept = [w for w in kept if not w.startswith(_WARNING)]
    return {"warnings": [*kept, f"{_WARNING}{what} ({reason})"]}


def _recovered(state: AgentState) -> dict[str, Any]:
    """A previous task's memory warning no longer holds."""
    warnings = state.get("warnings") or []
    kept = [w for w in warnings if not w.startswith(_WARNING)]
    return {"warnings": kept} if len(kept) != len(warnings) else {}


def _check_recall(kinds: Sequence[str], limit: int, recent: int, budget: int) -> None:
    if isinstance(kinds, str) or not kinds:
        raise UserError(f"recall(kinds=...) must be a list of namespace kinds, got {kinds!r}.")
    for arg, value in (("limit", limit), ("recent", recent)):
        if not isinstance(value, int) or value < 0:
            raise UserError(f"recall({arg}=...) must be 0 or more, got {value!r}.")
    if not isinstance(budget, int) or budget < 1:
        raise UserError(f"recall(token_budget=...) must be 1 or more, got {budget!r}.")


def _last_user_text(state: AgentState) -> str:
    """The current task's text (not keel's own feedback to the model inside a run)."""
    messages = state.get("messages") or []
    start = task_start(messages)
    return messages[start].text if start >= 0 else ""


def _render(items: list[SearchItem], budget: int, count: Callable[[str], int]) -> list[str]:
    """Best first (semantic matches by score, then recent ones), deduplicated, within budget."""
    seen: set[tuple[tuple[str, ...], str]] = set()
    lines: list[str] = []
    used = count(HEADER)
    ranked = sorted(items, key=lambda i: (i.score is None, -(i.score or 0.0)))
    for item in ranked:
        ident = (item.namespace, item.key)
        text = str(item.value.get("text") or item.value)
        line = f"- [{item.namespace[0]}] {text}"
        cost = count(line)
        if ident in seen or used + cost > budget:
            continue
        seen.add(ident)
        lines.append(line)
        used += cost
    return lines


def _search(store: BaseStore, ns: tuple[str, ...], query: str | None, limit: int) -> Op:
    kw: dict[str, Any] = {"query": query, "limit": limit, "refresh_ttl": False}
    return Op(partial(store.search, ns, **kw), partial(store.asearch, ns, **kw))


def _screened(
    lines: list[str], guard: InputGuardPolicy | None
) -> Steps[tuple[list[str], list[ContentFinding]]]:
    """The lines the guard lets into the system prompt, and what it found in the others.

    One check of all the lines (one model call with a `ModelDetector`); only when it finds
    something is each line checked on its own, to leave out just the ones at fault.
    """
    if guard is None or not lines:
        return lines, []
    whole = yield _check("\n".join(lines), guard)
    if whole.action == "allow":
        return lines, []
    kept: list[str] = []
    findings: list[ContentFinding] = []
    for line in lines:
        verdict = whole if len(lines) == 1 else (yield _check(line, guard))
        findings.extend(verdict.findings)
        if verdict.action == "allow":
            kept.append(line)
        elif verdict.action == "redact":  # the spans replaced: the rest of the memory stays
            kept.append(verdict.text)
    return kept, findings


def _check(text: str, guard: InputGuardPolicy) -> Op:
    """A memory is untrusted text, as a tool's result is."""
    return Op(
        partial(check_input, text, guard, source="tool"),
        partial(acheck_input, text, guard, source="tool"),
    )


def _recalled(kept: list[str], left_out: int, findings: list[ContentFinding]) -> SystemMessage:
    """The recall message; the guard's note, when it acted, goes to the audit log."""
    lines = [HEADER, *kept]
    if left_out:
        rules = ", ".join(dict.fromkeys(f.rule for f in findings))
        lines.append(f"- [{left_out} withheld by the input guard: {rules}]")
        log.warning("keel memory: %d recalled memories left out (%s)", left_out, rules)
    message = SystemMessage(content="\n".join(lines), id=RECALL_ID)
    if findings:
        action = "block" if left_out else "redact"
        message.response_metadata[GUARD_KEY] = guard_note("input", "memory", action, findings)
    return message
