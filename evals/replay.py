"""Replay a stored thread on a new graph version, with recorded responses or live, and diff it.

`areplay(thread_id, graph, db=URL)` reads the thread (SQLite or PostgreSQL), starts a fresh
thread of `graph` from one of its checkpoints (default: the user's first message) and runs it to
its end, answering approvals as the recorded human did and sending the thread's later user
messages in turn. With the recorded responses (the default) the model is the thread's cassette
and every tool call the cassette holds is answered from it; live (`live=True, model=...`) a new
model answers. Either way a side-effecting call never runs again, and a call the cassette lacks
runs only if its tool is declared read-only (see `keel.evals.cassette`).

The result, a `ReplayDiff`, compares the recorded run (from the start checkpoint on) with the
replayed one: tool-call trajectory (name, arguments, status; matched by position, never by
tool-call id), outcome (`status`, `terminated_reason`) and cost (tokens, USD).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.runnables import RunnableConfig
from langgraph.types import Command

from keel.errors import UserError
from keel.evals._sync import sync
from keel.evals.cassette import Cassette, CassetteModel, RecordedCall, canonical, is_model_answer
from keel.evals.executions import Execution, recording
from keel.evals.results import ToolStep
from keel.evals.runner import (
    MAX_RESUMES,
    GraphFactory,
    build_graph,
    check_prices,
    isolated_graph,
    load_graph,
    trajectory_of,
)
from keel.evals.stored import StoredThread, aload_thread, start_messages
from keel.models import resolve_model
from keel.pricing import PriceTable, token_count
from keel.state import RunContext, starts_task
from keel.tools.stubs import stubbing

__all__ = ["ReplayDiff", "RunView", "areplay", "outcomes_differ", "replay", "step_key"]


@dataclass(kw_only=True, slots=True)
class RunView:
    """What one side of a replay did after the start checkpoint."""

    trajectory: list[ToolStep] = field(default_factory=list)
    """Tool calls, in order, with how each ended."""
    outcome: dict[str, Any] = field(default_factory=dict)
    """The final outcome."""
    input_tokens: int = 0
    """Input tokens of its model answers."""
    output_tokens: int = 0
    """Output tokens of its model answers."""
    usd: float = 0.0
    """Their cost, from keel's price table (with the replay's `prices` over it)."""
    model_calls: int = 0
    """Model answers."""
    answer: str = ""
    """The last AI text."""

    @classmethod
    def of(
        cls,
        messages: Sequence[BaseMessage],
        outcome: dict[str, Any],
        prices: PriceTable | None = None,
    ) -> RunView:
        """The view of the messages a run added, and its outcome (priced by `prices`)."""
        prices = prices or PriceTable()
        view = cls(trajectory=trajectory_of(messages), outcome=dict(outcome))
        for m in messages:
            if not isinstance(m, AIMessage):
                continue
            view.answer = str(m.text) or view.answer
            if not is_model_answer(m):
                continue
            view.model_calls += 1
            usage = m.usage_metadata
            if usage is not None:  # a count that is not one (None, negative, text) counts 0
                view.input_tokens += token_count(usage.get("input_tokens")) or 0
                view.output_tokens += token_count(usage.get("output_tokens")) or 0
                name = str(m.response_metadata.get("model_name") or "")
                view.usd += prices.cost(name, dict(usage))
        view.usd = round(view.usd, 8)
        return view

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "trajectory": [_step(t) for t in self.trajectory],
            "outcome": self.outcome,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "usd": self.usd,
            "model_calls": self.model_calls,
            "answer": self.answer,
        }


def _step(t: ToolStep) -> dict[str, Any]:
    return {"name": t.name, "args": dict(t.args), "status": t.status}


def step_key(t: ToolStep) -> tuple[str, str, str]:
    """A tool call as compared: name, canonical arguments, status (never the call's id)."""
    return t.name, canonical(t.args), t.status


def outcomes_differ(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two outcomes differ in `status` or `terminated_reason`."""
    return any(a.get(k) != b.get(k) for k in ("status", "terminated_reason"))


@dataclass(kw_only=True, slots=True)
class ReplayDiff:
    """A stored thread's recorded run against its replay."""

    thread_id: str
    """The stored thread."""
    start: str
    """Where the replay started: `step N (checkpoint id)` or `first user message`."""
    mode: str
    """`cassette` (recorded responses) or `live`."""
    recorded: RunView
    """The recorded run from the start on."""
    replayed: RunView
    """The replayed run."""
    graph: str = ""
    """The graph the replay ran on."""
    recorded_graph: str | None = None
    """The name of the graph that wrote the thread (from its run records), when known."""
    replayed_graph: str | None = None
    """The name of the graph the replay ran on."""
    from_cassette: list[RecordedCall] = field(default_factory=list)
    """Tool calls answered from the cassette or canned (their tools did not run)."""
    unrecorded: list[RecordedCall] = field(default_factory=list)
    """Calls the cassette lacked to tools not declared read-only: answered, never executed."""
    executions: list[Execution] = field(default_factory=list)
    """Tool bodies that really ran during the replay (tools that `record_execution`)."""
    cassette_exhausted: bool = False
    """The replayed graph asked the cassette for more model answers than it holds."""
    raised: str | None = None
    """An exception that escaped the replayed graph (a replay should never end so)."""

    @property
    def divergence(self) -> int | None:
        """The index of the first tool call that differs (name, args or status), or `None`."""
        a, b = self.recorded.trajectory, self.replayed.trajectory
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            if step_key(x) != step_key(y):
                return i
        return None if len(a) == len(b) else min(len(a), len(b))

    @property
    def trajectory_changed(self) -> bool:
        """Whether the tool calls differ."""
        return self.divergence is not None

    @property
    def outcome_changed(self) -> bool:
        """Whether `status` or `terminated_reason` differ."""
        return outcomes_differ(self.recorded.outcome, self.replayed.outcome)

    @property
    def usd_delta(self) -> float:
        """Replayed minus recorded cost, in USD."""
        return round(self.replayed.usd - self.recorded.usd, 8)

    @property
    def tokens_delta(self) -> int:
        """Replayed minus recorded tokens (input plus output)."""
        replayed = self.replayed.input_tokens + self.replayed.output_tokens
        return replayed - self.recorded.input_tokens - self.recorded.output_tokens

    @property
    def changed(self) -> bool:
        """Whether the trajectory, the outcome or the cost changed, or the replay failed."""
        return (
            self.trajectory_changed
            or self.outcome_changed
            or self.tokens_delta != 0
            or self.cassette_exhausted
            or self.raised is not None
        )

    def lines(self) -> list[str]:
        """The diff as short human-readable lines."""
        out = [f"replay of {self.thread_id} from {self.start} ({self.mode}) on {self.graph}"]
        if (
            self.recorded_graph
            and self.replayed_graph
            and self.recorded_graph != self.replayed_graph
        ):
            out.append(
                f"  note: the thread was written by graph {self.recorded_graph!r}, replayed on "
                f"{self.replayed_graph!r}"
            )
        div = self.divergence
        if div is None:
            out.append(f"  trajectory: same ({len(self.recorded.trajectory)} tool calls)")
        else:
            out.append(f"  trajectory: differs from call {div + 1}")
            rows = max(len(self.recorded.trajectory), len(self.replayed.trajectory))
            for i in range(div, rows):
                out.append(f"    {i + 1}. {_show(self.recorded.trajectory, i)}  →  "
                           f"{_show(self.replayed.trajectory, i)}")  # fmt: skip
        out.append(f"  outcome: {_outcome(self.recorded.outcome)} → "
                   f"{_outcome(self.replayed.outcome)}"
                   + (" (changed)" if self.outcome_changed else ""))  # fmt: skip
        out.append(
            f"  cost: {self.recorded.input_tokens + self.recorded.output_tokens} → "
            f"{self.replayed.input_tokens + self.replayed.output_tokens} tokens, "
            f"${self.recorded.usd:.6f} → ${self.replayed.usd:.6f}"
        )
        if self.unrecorded:
            names = ", ".join(c.name for c in self.unrecorded)
            out.append(f"  calls not in the cassette (stubbed, not run): {names}")
        if self.cassette_exhausted:
            out.append("  the cassette ran out of model answers (replay live to go further)")
        if self.raised:
            out.append(f"  raised: {self.raised}")
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "thread_id": self.thread_id,
            "start": self.start,
            "mode": self.mode,
            "graph": self.graph,
            "recorded_graph": self.recorded_graph,
            "replayed_graph": self.replayed_graph,
            "changed": self.changed,
            "divergence": self.divergence,
            "outcome_changed": self.outcome_changed,
            "usd_delta": self.usd_delta,
            "tokens_delta": self.tokens_delta,
            "recorded": self.recorded.to_dict(),
            "replayed": self.replayed.to_dict(),
            "from_cassette": [_call(c) for c in self.from_cassette],
            "unrecorded": [_call(c) for c in self.unrecorded],
            "executions": [{"tool": e.tool, "args": dict(e.args)} for e in self.executions],
            "cassette_exhausted": self.cassette_exhausted,
            "raised": self.raised,
        }


def _call(c: RecordedCall) -> dict[str, Any]:
    return {"name": c.name, "args": dict(c.args), "status": c.status}


def _show(steps: Sequence[ToolStep], i: int) -> str:
    if i >= len(steps):
        return "-"
    t = steps[i]
    return f"{t.name}({canonical(t.args)}) [{t.status}]"


def _outcome(outcome: dict[str, Any]) -> str:
    return f"{outcome.get('status', '-')}/{outcome.get('terminated_reason', '-')}"


async def areplay(
    thread: str | StoredThread,
    graph: str | GraphFactory | Any,
    *,
    db: str | None = None,
    start: str | int | None = None,
    live: bool = False,
    model: str | BaseChatModel | None = None,
    identity: RunContext | None = None,
    cassette: Cassette | None = None,
    prices: PriceTable | None = None,
) -> ReplayDiff:
    """Replay a stored thread on `graph` and diff it with the recorded run.

    Args:
        thread: The thread's id (read from `db`), or a `StoredThread`.
        graph: A graph factory (`module:function` or `factory(model)`), or a built graph
            (its own model answers: live only).
        db: The database URL (default: `KEEL_DB_URL`, else `.keel/`).
        start: The checkpoint to start from: its id, or its step (default: the first user
            message).
        live: Let `model` answer instead of the cassette.
        model: The live model (a chat model or a model string).
        identity: Who the replay runs for (default: the thread's user and tenant, role `user`).
        cassette: The recorded responses to play (default: recorded from the thread; e.g. a
            `Cassette.from_json` kept beside a test).
        prices: Prices for the graph factory (`factory(model, prices=prices)`, as in
            `arun_suite`): the live model's, or the recorded model's the cassette plays.

    Raises:
        UserError: no such thread or checkpoint, a thread that is not an agent's, or a
            combination of `graph`, `live` and `model` that cannot replay.
    """
    stored = thread if isinstance(thread, StoredThread) else await aload_thread(thread, db=db)
    cassette = cassette or Cassette.from_thread(stored)
    checkpoint = stored.checkpoint(start)
    if checkpoint is None:
        msgs = stored.messages
        begin = msgs[: next((i for i, m in enumerate(msgs) if isinstance(m, AIMessage)), len(msgs))]
        where = "the first user message"
    else:
        begin = start_messages(checkpoint.messages)
        where = f"step {checkpoint.step} ({checkpoint.id})"
        if not begin:
            raise UserError(
                f"Checkpoint {checkpoint.id} (step {checkpoint.step}) of thread "
                f"{stored.thread_id!r} holds no messages yet; start from a later step."
            )
    chat_model, compiled, label = _graph(graph, cassette, live=live, model=model, prices=prices)
    compiled = isolated_graph(compiled)  # off production's checkpointer, every call stubbable
    seen = {m.id for m in begin}
    # the users' later tasks: keel's own user-role messages (verify's feedback) are not sent,
    # the replayed graph writes its own
    later: list[BaseMessage] = [m for m in stored.messages if starts_task(m) and m.id not in seen]
    tools = cassette.tools()
    diff = ReplayDiff(
        thread_id=stored.thread_id,
        start=where,
        mode="live" if live or chat_model is None else "cassette",
        recorded=RunView.of(
            [m for m in stored.messages if m.id not in seen], stored.outcome, prices
        ),
        replayed=RunView(),
        graph=label,
        recorded_graph=stored.graph,
        replayed_graph=getattr(compiled, "name", None),
    )
    values: dict[str, Any] = {}
    with recording() as executions, stubbing(tools):
        try:
            values = await _drive(compiled, begin, later, identity or stored.identity, cassette)
        except Exception as exc:
            diff.raised = f"{type(exc).__name__}: {exc}"
    messages = [m for m in values.get("messages") or [] if m.id not in seen]
    diff.replayed = RunView.of(messages, dict(values.get("outcome") or {}), prices)
    diff.from_cassette = list(tools.answered)
    diff.unrecorded = list(tools.unrecorded)
    diff.executions = list(executions)
    diff.cassette_exhausted = isinstance(chat_model, CassetteModel) and chat_model.exhausted
    return diff


def replay(
    thread: str | StoredThread, graph: str | GraphFactory | Any, **options: Any
) -> ReplayDiff:
    """Sync entry point of `areplay` (not from a running event loop: await `areplay`)."""
    return sync("replay", lambda: areplay(thread, graph, **options))


def _graph(
    graph: str | GraphFactory | Any,
    cassette: Cassette,
    *,
    live: bool,
    model: str | BaseChatModel | None,
    prices: PriceTable | None,
) -> tuple[BaseChatModel | None, Any, str]:
    if hasattr(graph, "astream") and hasattr(graph, "aget_state"):
        if not live or model is not None:
            raise UserError(
                "A built graph answers with its own model, so it replays live only: pass "
                "live=True (--live) and no model, or pass a graph factory (module:function) "
                "to replay with the recorded responses."
            )
        return None, graph, str(getattr(graph, "name", "graph"))
    factory = load_graph(graph)
    label = graph if isinstance(graph, str) else getattr(graph, "__name__", "factory")
    check_prices([(str(label), factory)], prices)
    if live and model is None:
        raise UserError("A live replay needs the new model: pass model=... (--model M).")
    if not live and model is not None:
        raise UserError(f"model={model!r} answers only a live replay: add live=True (--live).")
    chat_model = resolve_model(model) if live and model is not None else cassette.model()
    try:
        return chat_model, build_graph(factory, chat_model, prices), str(label)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"The graph factory {label!r} failed to build a graph: {exc}") from exc


async def _drive(
    graph: Any,
    begin: list[BaseMessage],
    later: list[BaseMessage],
    identity: RunContext,
    cassette: Cassette,
) -> dict[str, Any]:
    config: RunnableConfig = {"configurable": {"thread_id": f"replay-{uuid.uuid4().hex}"}}
    payload: Any = {"messages": list(begin)}
    turns = list(later)
    for _ in range(MAX_RESUMES + len(turns)):
        async for _update in graph.astream(payload, config, context=identity):
            pass
        snapshot = await graph.aget_state(config)
        if snapshot.interrupts:
            payload = Command(resume=_answers(snapshot.interrupts[0].value, cassette.decision))
        elif turns:
            payload = {"messages": [turns.pop(0)]}
        else:
            return dict(snapshot.values)
    raise UserError(f"The replay was still asking for approvals after {MAX_RESUMES} answers.")


def _answers(requests: Any, decide: Callable[[Any], str]) -> Any:
    def one(request: Any) -> dict[str, Any]:
        action = request.get("action_request", {}) if isinstance(request, dict) else {}
        call = {"name": action.get("action"), "args": action.get("args") or {}}
        return {"type": decide(call), "reviewer": "keel-replay"}

    if isinstance(requests, list):
        return [one(r) for r in requests]
    return one(requests)
