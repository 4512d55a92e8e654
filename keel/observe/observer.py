"""How a keel graph records itself: audit records from its nodes, a run record when it ends.

`build_agent(..., ledger=Ledger(url))` wraps three nodes and the routes that end a run:

- `audited(node, observer, derive)`: after the node, the audit records `derive` finds in its
  update (tool calls and their gate decisions, human decisions, budget events) are written —
  sync under `invoke`, awaited under `ainvoke`;
- `recorded(route, observer, source)`: each routing decision is logged as one JSON line on the
  `keel.decisions` logger, and when the route ends the run (or pauses it for a human) the run
  record is written (and a finished run reported to OpenTelemetry, see `keel.observe.otel`);
- `paused(node, observer)`: a node that pauses the run itself (`verify` asking a human) writes
  the run record as `interrupted` as it pauses.

An agent with side-effecting tools (`Observer(orphans=True)`) also audits, as its run ends or
pauses, each orphaned call of the thread nobody was told of (`keel.db.idempotency.untold_flow`:
a call whose request a crash lost, or a fork left on the branch it abandoned, which no later
call asked for again): one `tool` record with decision `orphaned` per call, ever, and a note in
the run record's `detail` (`keel.db.runs.orphans_note`, kept when a paused run's record is
written again), in the run record's transaction (a report the ledger refuses for good is left
out, logged, and the record written alone: a later run end reports them). A supervisor whose
agents have such tools does too, as its run ends (not as it pauses: an agent that waits holds
its calls in a conversation of its own). So does the record of a run found stopped that a new
message writes (`ending_flow`), and the one keel writes around the graph of an agent's run
that ended there (cancelled, Ctrl-C, its checkpointer failing: `record_run(thread=...)`; a
supervisor's leaves them to the thread's next message, as when it pauses).

The `derive` functions are pure: `(state, update, context, who) -> [AuditRecord]`. Writing
never fails a run: a database error is logged (`keel.observe`) and the run goes on. A replay or
shadow run (`keel.tools.stubs.isolated`) writes neither audit records nor a run record.
"""

from __future__ import annotations

import inspect
import logging
import threading
import uuid
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import partial
from typing import Any, Generic, TypeVar, cast

from langchain_core.messages import AIMessage, BaseMessage, ToolCall, ToolMessage
from langchain_core.runnables import RunnableConfig
from langgraph.errors import GraphInterrupt
from langgraph.graph import END
from langgraph.runtime import Runtime

from keel import outcome
from keel._drive import Op, Steps, adrive, both, drive
from keel._node import RunnableCallable, context_of, policy_id, runtime_in, saved_thread
from keel.approvals import json_text
from keel.db.audit import AuditLog, AuditRecord, insert_flow
from keel.db.idempotency import CallRecord, untold_flow
from keel.db.ledger import Flow, Ledger, refused_for_good
from keel.db.runs import (
    UNSAVED_KEY,
    Recorded,
    RunLog,
    RunRecord,
    orphans_note,
    recorded_flow,
    run_record,
    unsaved_flow,
)
from keel.errors import StorageError
from keel.guards.gate import Gate
from keel.guards.screening import GUARD_KEY
from keel.history import pending_tool_calls
from keel.nodes._once import known_call_ids, not_recorded, storage_outcome
from keel.nodes.human_review import REVIEWER_META, SETTLED_KEY
from keel.observe import otel
from keel.redact import sanitize, sanitized_logger
from keel.state import AgentState, RunContext, task_base
from keel.tools._duplicates import DUPLICATE_KEY
from keel.tools.registry import ToolRegistry
from keel.tools.stubs import isolated
from keel.versions import AgentVersion

__all__ = [
    "Derive",
    "Observer",
    "Route",
    "UNWRITTEN_MAX",
    "Who",
    "audited",
    "budget_records",
    "content_records",
    "decision_log",
    "paused",
    "recorded",
    "review_records",
    "tool_records",
    "with_runtime",
]

log = sanitized_logger("keel.observe")
decision_log = sanitized_logger("keel.decisions")
"""One JSON line per decision: `{"node", "choice", "reason", ...}`."""
UNWRITTEN_MAX = 1000
"""How many audit records, and how many run record writes, the ledger refused an `Observer`
keeps in memory to write later (each)."""


@dataclass(frozen=True, slots=True)
class Who:
    """Who and where a node call belongs to, for its records."""

    user_id: str
    tenant_id: str
    thread_id: str | None
    run_id: str | None
    policy: str
    version: AgentVersion | None = None

    def fields(self) -> dict[str, Any]:
        """The identity fields shared by audit and run records (with the agent version)."""
        return {
            "user_id": self.user_id,
            "tenant_id": self.tenant_id,
            "thread_id": self.thread_id,
            "run_id": self.run_id,
            "policy": self.policy,
            **(self.version.fields() if self.version is not None else {}),
        }


Derive = Callable[[AgentState, Mapping[str, Any], RunContext, Who], list[AuditRecord]]
"""Finds the audit records in a node's update."""


class Observer:
    """Where a graph records itself: the audit log and run records in one ledger.

    `version` (what the agent was built from) is stamped on every record.
    """

    def __init__(
        self,
        ledger: Ledger,
        *,
        graph: str,
        policy_name: str | None = None,
        policy_version: str = "1",
        version: AgentVersion | None = None,
        orphans: bool = False,
        orphans_paused: bool = True,
    ) -> None:
        self.ledger = ledger
        self.orphans = orphans
        """Audit the thread's untold orphaned calls as a run ends (`_orphans`)."""
        self.orphans_paused = orphans_paused
        """And as a run pauses (a supervisor's does not: its waiting agent's calls are in the
        agent's conversation, not its own history)."""
        self.audit = AuditLog(ledger)
        self.runs = RunLog(ledger)
        self.graph = graph
        self.policy_name = policy_name
        self.policy_version = policy_version
        self.version = version
        self._audits: _Kept[AuditRecord] = _Kept("audit records")
        """Audit records the ledger refused, oldest first."""
        self._runs: _Kept[_RunWrite] = _Kept("run record writes")
        """Run record writes the ledger refused, oldest first."""

    @property
    def dropped(self) -> int:
        """How many refused audit records and run record writes were dropped (over the cap)."""
        return self._audits.dropped + self._runs.dropped

    def keep_unwritten(self, records: list[AuditRecord]) -> None:
        """Keep audit records the ledger refused, to write with the next run record.

        The run goes on (or ends on the failure) without them; when a run record of this
        observer is written next (this run's end or pause, or a later run's), the ledger may
        be back: they are written first. At most `UNWRITTEN_MAX` are kept: beyond that the
        oldest are dropped, counted (`dropped`) and logged as an error. Run record writes the
        ledger refuses are kept the same way, and written, in order, before the next one.
        """
        self._audits.keep(records)

    def record_run(
        self,
        state: AgentState,
        config: RunnableConfig,
        context: RunContext,
        *,
        first_end: bool = False,
        thread: str | None = None,
    ) -> None:
        """Write the record of the run `state` ends (or pauses); a failure is logged.

        A replay or shadow run (`keel.tools.stubs.isolated`) writes none. `first_end`: only
        where the run recorded no end of its own (`keel.db.runs.upsert_flow`). `thread`: the
        thread the graph saves its state under, where `config` does not say (a run's end
        recorded around its graph, under its caller's config: cancelled, Ctrl-C, a checkpointer
        that failed); the record looks for that thread's orphaned calls (`_orphans`).
        """
        drive(self.recording(state, config, context, first_end=first_end, thread=thread))

    async def arecord_run(
        self,
        state: AgentState,
        config: RunnableConfig,
        context: RunContext,
        *,
        first_end: bool = False,
        thread: str | None = None,
    ) -> None:
        """`record_run` under `ainvoke`."""
        await adrive(self.recording(state, config, context, first_end=first_end, thread=thread))

    def recording(
        self,
        state: AgentState,
        config: RunnableConfig,
        context: RunContext,
        *,
        first_end: bool = False,
        thread: str | None = None,
    ) -> Steps[None]:
        """`record_run` as `keel._drive` steps (written once for `record_run` and `arecord_run`)."""
        if isolated():
            return
        late = self._audits.take()
        if late:  # refused before: the ledger may be back
            yield from self._late_audits(late)
        try:
            saved = thread if thread is not None else saved_thread(config)
            if thread is not None and not self.orphans_paused:
                # a supervisor's run ended around its graph (Ctrl-C in an agent's tool, say):
                # the agent it stopped holds its calls in a conversation of its own, so they
                # are in no history of the supervisor's; the thread's next message tells them
                # (`ending_flow`: "outcome unknown"), as for a supervisor that pauses
                saved = None
            write = self._write(state, config, context, first_end, saved)
        except Exception as exc:
            log.error("keel could not make the run record: %r", exc)
            return
        writes = [*self._runs.take(), write]
        at = 0
        while at < len(writes):
            try:
                ended = yield both(self.runs.ledger.run, self.runs.ledger.arun, writes[at].flow())
            except Exception as exc:
                if refused_for_good(exc) and writes[at].orphans is not None:
                    writes[at] = _unreported(writes[at], exc)  # the record, written alone
                    continue
                if refused_for_good(exc):  # kept, it would fail every later write with it
                    self._runs.drop(1, exc)
                    at += 1
                    continue
                self._runs.keep(writes[at:])
                log.error("keel could not write the run record: %r (kept for later)", exc)
                return
            ended()
            at += 1

    def _write(
        self,
        state: AgentState,
        config: RunnableConfig,
        context: RunContext,
        first_end: bool,
        thread: str | None,
    ) -> _RunWrite:
        """The write of the record of the run `state` ends, with its look for orphans.

        `thread`: the thread the graph saves its state under (None: it keeps none).
        """
        record = _record(self, state, config, context)
        return _RunWrite(
            record,
            self._base(state, config, record),
            first_end,
            self._orphans(state, thread, self.who(config, context), record),
        )

    def _orphans(
        self, state: AgentState, thread: str | None, who: Who, record: RunRecord
    ) -> _Orphans | None:
        """Where the run's record looks for `thread`'s untold orphaned calls (None: nowhere).

        `untold_flow` finds them (the history is the run's state), in the record's transaction:
        each gets one `orphaned` audit record, and the run record a note (`orphans_note`). A
        ledger that fails fails the record's write with them (kept for later, as a record is).
        A state without messages (a run whose storage failed before its first step) holds no
        history to tell an orphan by: it looks for none, and the thread's next run end tells.
        """
        paused = record.status == "interrupted"
        if not self.orphans or thread is None or (paused and not self.orphans_paused):
            return None
        if not state.get("messages"):
            return None
        return _Orphans(thread, known_call_ids(state.get("messages") or []), who)

    def _late_audits(self, late: list[AuditRecord]) -> Steps[None]:
        """Write audit records the ledger refused before; one it refuses for good is dropped.

        They go in one transaction; when the ledger refuses a value of one of them
        (`refused_for_good`), each goes alone, so that one does not hold back the others.
        """
        try:
            yield both(self.audit.write, self.audit.awrite, late)
            return
        except Exception as exc:
            if not refused_for_good(exc) or len(late) == 1:
                self._refused_audits(late, exc)
                return
        for record in late:
            try:
                yield both(self.audit.write, self.audit.awrite, [record])
            except Exception as exc:
                self._refused_audits([record], exc)

    def _refused_audits(self, records: list[AuditRecord], exc: Exception) -> None:
        if refused_for_good(exc):
            self._audits.drop(len(records), exc)
        else:
            self._audits.keep(records)
            log.error(
                "keel could not write %d audit records (kept for later): %r", len(records), exc
            )

    def ending_flow(
        self,
        state: AgentState,
        config: RunnableConfig,
        context: RunContext,
        *,
        first_end: bool = False,
        report: bool = True,
    ) -> Flow[Callable[[], None]] | None:
        """The write of the record of the run `state` ends, as a flow for a caller's transaction.

        With the thread's untold orphans (`_orphans`), as `record_run` looks for them (unless
        `report` is False: the ledger refused that report for good). Its result
        logs those and reports the stored run to OpenTelemetry: call it once the transaction
        committed. `None` for a replay or shadow run (it writes no record). Unlike
        `record_run`, a failure raises (the caller's transaction fails with it).
        """
        if isolated():
            return None
        # a run found stopped in its thread's saved state (the caller's config names the thread,
        # the checkpointer is the graph's)
        thread = (config.get("configurable") or {}).get("thread_id")
        looks = str(thread) if thread and report else None
        return self._write(state, config, context, first_end, looks).flow()

    def resuming(
        self, state: AgentState | None, config: RunnableConfig, context: RunContext
    ) -> Steps[RunnableConfig]:
        """`config` for a run that continues the run `state` is at (None: a new run).

        A continuation (`invoke(None)` after a storage failure) starts from the saved state,
        which lacks what its run spent in steps whose checkpoint failed to save; its record
        counted them. The config carries that (`keel.db.runs.unsaved_flow`) for its record to
        add, so the record counts what the run spent, not what its saved state kept. A caller's
        own `UNSAVED_KEY` is dropped. A ledger that cannot be read adds nothing (logged).
        """
        given = config.get("configurable") or {}
        configurable = {k: v for k, v in given.items() if k != UNSAVED_KEY}
        out = cast(RunnableConfig, {**config, "configurable": configurable})
        base = None if state is None or isolated() else task_base(state)
        if state is None or base is None:
            return out
        record = _record(self, state, out, context)
        try:
            lost = yield both(self.ledger.run, self.ledger.arun, unsaved_flow(record, base))
        except StorageError as exc:
            log.warning("keel could not read the record of the run it continues: %s", exc)
            return out
        if lost:
            configurable[UNSAVED_KEY] = {
                "graph": self.graph,
                "run_key": record.run_key,
                "usage": lost,
            }
        return out

    def _base(
        self, state: AgentState, config: RunnableConfig, record: RunRecord
    ) -> dict[str, float] | None:
        """The thread's usage when the run started, less what its saved state lost (`resuming`).

        The record's usage is the totals less this: what the run spent, the lost steps too.
        """
        base = task_base(state)
        unsaved = (config.get("configurable") or {}).get(UNSAVED_KEY)
        if base is None or not isinstance(unsaved, Mapping):
            return base
        if unsaved.get("graph") != self.graph or unsaved.get("run_key") != record.run_key:
            return base  # another graph's run (a supervisor's agent), or another run
        lost: Mapping[str, float] = unsaved.get("usage") or {}
        return {k: v - float(lost.get(k, 0)) for k, v in base.items()}

    def who(self, config: RunnableConfig, context: RunContext) -> Who:
        """The identity of a node call from its config and context."""
        configurable = config.get("configurable") or {}
        metadata = config.get("metadata") or {}
        run_id = configurable.get("run_id") or metadata.get("run_id")
        thread = configurable.get("thread_id")
        return Who(
            context.user_id,
            context.tenant_id,
            None if thread is None else str(thread),
            None if run_id is None else str(run_id),
            policy_id(context, self.policy_version, self.policy_name),
            self.version,
        )


def audited(node: RunnableCallable, observer: Observer, derive: Derive) -> RunnableCallable:
    """`node`, followed by writing the audit records `derive` finds in its update.

    One ledger batch per node call: what the node records after its model or tool call
    (settled spend, rate refunds, breaker successes, tool results) and its audit records commit
    in one transaction before the node returns. A failed audit write is logged, unless it
    carried such records: then the node's update is kept (a tool call that ran keeps its
    result) and the run ends as `error` of category `storage` (`_unrecorded`); a call whose
    result was not recorded stays `started`, so a resume asks a human, never runs it again.
    """

    def records(state: AgentState, update: Any, config: RunnableConfig, runtime: Any) -> list[Any]:
        if not isinstance(update, Mapping) or isolated():  # a replay's: not production's audit
            return []
        context = context_of(runtime)
        return derive(state, update, context, observer.who(config, context))

    def steps(
        got: list[Any], state: AgentState, config: RunnableConfig, runtime: Runtime[RunContext]
    ) -> Steps[Any]:
        """The node, then its audit records; `got` keeps the update for a storage failure.

        Records the ledger refuses are kept for the run's record (`Observer.keep_unwritten`).
        """
        got.append(
            (yield Op(partial(node.invoke, state, config), partial(node.ainvoke, state, config)))
        )
        carried = observer.ledger.deferred
        found = records(state, got[0], config, runtime)
        try:
            yield both(observer.audit.write, observer.audit.awrite, found)
        except Exception as exc:
            observer.keep_unwritten(found)
            if carried:
                raise
            log.error("keel could not write the audit log: %r (kept for the run's record)", exc)
        return got[0]

    def run(state: AgentState, config: RunnableConfig, runtime: Runtime[RunContext]) -> Any:
        got: list[Any] = []
        try:
            with observer.ledger.batch():
                return drive(steps(got, state, config, runtime))
        except StorageError as exc:
            return _unrecorded(got[0] if got else None, exc)

    async def arun(state: AgentState, config: RunnableConfig, runtime: Runtime[RunContext]) -> Any:
        got: list[Any] = []
        try:
            async with observer.ledger.abatch():
                return await adrive(steps(got, state, config, runtime))
        except StorageError as exc:
            return _unrecorded(got[0] if got else None, exc)

    return RunnableCallable(run, arun, name=node.name, trace=False)


def paused(node: RunnableCallable, observer: Observer) -> RunnableCallable:
    """`node`, writing the run record as `interrupted` when it pauses the run itself.

    A node that calls `interrupt()` (`verify` asking a human about a failed answer) pauses the
    run where no route sees it; the record is written as the pause propagates, and the same row
    is updated when the resumed run ends.
    """

    def waiting(state: AgentState) -> AgentState:
        result = state.get("outcome")
        if result is not None and result["status"] == "interrupted":
            return state  # the node said why it waits (`verify`'s escalation)
        return {**state, "outcome": outcome.interrupted(f"{node.name} asks a human")}

    def run(state: AgentState, config: RunnableConfig, runtime: Runtime[RunContext]) -> Any:
        try:
            return node.invoke(state, config)
        except GraphInterrupt:
            observer.record_run(waiting(state), config, context_of(runtime))
            raise

    async def arun(state: AgentState, config: RunnableConfig, runtime: Runtime[RunContext]) -> Any:
        try:
            return await node.ainvoke(state, config)
        except GraphInterrupt:
            await observer.arecord_run(waiting(state), config, context_of(runtime))
            raise

    return RunnableCallable(run, arun, name=node.name, trace=False)


def _unrecorded(update: Any, exc: StorageError) -> Any:
    """The node's update when the ledger failed to record what it did (after its call ran).

    The node itself failing (`update` is None) raises as before. Otherwise its tool results are
    kept, marked as not recorded, and the run ends as `error` of category `storage`.
    """
    if not isinstance(update, Mapping):
        raise exc
    messages = [
        not_recorded(m, exc) if isinstance(m, ToolMessage) else m
        for m in update.get("messages") or []
    ]
    lost = [m for m in messages if isinstance(m, ToolMessage)]
    log.error("keel could not record a node's ledger writes: %r", exc)
    return {
        **update,
        "messages": messages,
        "outcome": storage_outcome(lost, f"after the call: {exc}"),
    }


Route = Callable[[Any], str] | Callable[[Any, Runtime[RunContext] | None], str]
"""A route: from the state (the graph's whole state: an agent's `AgentState`, a supervisor's
`SupervisorState`), or from the state and the run's `Runtime` (two positional
parameters without defaults). The runtime is None when no run is going on: a state update
(`update_state`) asks the routes of the node it writes as where the thread goes next."""


def with_runtime(route: Route) -> Callable[[AgentState, Runtime[RunContext] | None], str]:
    """`route` called as `(state, runtime)`, whichever of the two forms it takes."""
    positional = [
        p
        for p in inspect.signature(route).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    if len(positional) > 1:
        return route  # type: ignore[return-value]
    by_state: Callable[[AgentState], str] = route  # type: ignore[assignment]
    return lambda state, runtime: by_state(state)


def recorded(
    route: Route,
    observer: Observer | None,
    source: str,
    *,
    end: str = END,
) -> RunnableCallable:
    """`route`, logging its decision; the run record is written when it ends or pauses the run.

    `end` is where a finished run goes: `END`, or the node that closes every run (`reflect`);
    a route to END is sent there. Under a state update (no run: `runtime_in` finds none) the
    route only answers where the thread goes next: nothing is logged or recorded.
    """
    choose = with_runtime(route)

    def decide(state: AgentState, runtime: Runtime[RunContext] | None) -> tuple[str, bool]:
        if runtime is None:  # a state update: no run, so no step limit either
            unlimited: Any = {k: v for k, v in state.items() if k != "remaining_steps"}
            choice = choose(unlimited, None)
            return (end if choice == END else choice), False
        choice = choose(state, runtime)
        if choice == END:
            choice = end
        result: Mapping[str, Any] = state.get("outcome") or {}
        _log_decision(source, choice, state)
        paused = choice == "human_review" and result.get("status") == "interrupted"
        ends = choice == end or paused
        return choice, ends and observer is not None

    # `state: Any`: LangGraph reads a route's input with the schema its first parameter names;
    # the graph's whole state it is (a supervisor's has more keys than `AgentState`)
    def steps(state: Any, config: RunnableConfig) -> Steps[str]:
        runtime = runtime_in(config)
        choice, ends = decide(state, runtime)
        if ends and observer is not None:
            yield from observer.recording(state, config, context_of(runtime))
        return choice

    def run(state: Any, config: RunnableConfig) -> str:
        return drive(steps(state, config))

    async def arun(state: Any, config: RunnableConfig) -> str:
        return await adrive(steps(state, config))

    return RunnableCallable(run, arun, name=f"route_{source}", trace=False)


def _record(observer: Observer, state: AgentState, config: RunnableConfig, context: Any) -> Any:
    who = observer.who(config, context)
    tools = dict(observer.version.tool_versions) if observer.version is not None else {}
    return run_record(state, graph=observer.graph, tool_versions=tools, **who.fields())


_T = TypeVar("_T")


class _Kept(Generic[_T]):
    """What the ledger refused, kept in memory to write later: at most `UNWRITTEN_MAX`."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.items: list[_T] = []
        self.dropped = 0
        self._lock = threading.Lock()

    def keep(self, items: list[_T]) -> None:
        """Keep `items` after those kept (or put back first ones taken); drop the oldest over."""
        if not items:
            return
        with self._lock:
            self.items.extend(items)
            over = len(self.items) - UNWRITTEN_MAX
            if over > 0:
                del self.items[:over]
                self.dropped += over
        if over > 0:
            log.error(
                "keel dropped %d %s the ledger refused (%d dropped so far): it keeps at most %d "
                "in memory until the ledger takes writes again",
                over,
                self.what,
                self.dropped,
                UNWRITTEN_MAX,
            )

    def drop(self, count: int, exc: Exception) -> None:
        """Count and log `count` items the ledger refused for good (`refused_for_good`)."""
        with self._lock:
            self.dropped += count
        log.error("keel dropped %d %s the ledger refuses for good: %r", count, self.what, exc)

    def take(self) -> list[_T]:
        """All that is kept (taken: `keep` what fails to be written again)."""
        with self._lock:
            taken, self.items = self.items, []
        return taken


@dataclass(frozen=True, slots=True)
class _Orphans:
    """Where a run record's write looks for orphaned calls: the thread, its history, who."""

    thread: str
    known: Collection[str]
    who: Who

    def telling(self) -> Flow[list[CallRecord]]:
        """Write an `orphaned` audit record for each untold orphan; return those.

        Their arguments and results are the ledger's stored text, redacted when stored
        (`insert_flow(redacted=True)`).
        """
        lost = yield from untold_flow(self.thread, self.known)
        yield from insert_flow([_orphan_record(r, self.who) for r in lost], redacted=True)
        return lost


@dataclass(frozen=True, slots=True)
class _RunWrite:
    """One write of a run record (`recorded_flow`), with its look for orphans (`_Orphans`)."""

    record: RunRecord
    base: Mapping[str, float] | None
    first_end: bool
    orphans: _Orphans | None = None

    def flow(self) -> Flow[Callable[[], None]]:
        """The orphans' audit records, then the run record noting them, in one transaction.

        Its result logs the orphans and reports the run: call it once the transaction
        committed.
        """
        told = (yield from self.orphans.telling()) if self.orphans is not None else []
        record = self.record
        if told:
            note = orphans_note([(c.tool, c.tool_call_id) for c in told])
            record = replace(record, detail=f"{record.detail} {note}".lstrip())
        recorded = yield from recorded_flow(record, self.base, first_end=self.first_end)
        return partial(_ended, recorded, record, told)


def _unreported(write: _RunWrite, exc: Exception) -> _RunWrite:
    """`write` without its look for orphans, which the ledger refused for good (logged).

    Dropped with it, the run's record would be lost; the orphans stay untold, and a later run
    end of the thread reports them once the ledger takes the report.
    """
    log.error(
        "keel could not report orphaned calls with the run record: the ledger refuses the "
        "report for good (%r); the record is written without it, and a later run end of the "
        "thread reports them",
        exc,
    )
    return replace(write, orphans=None)


def _ended(recorded: Recorded, written: RunRecord, told: list[CallRecord]) -> None:
    """A run record's write committed: log the orphans it told of, report the run."""
    for r in told:
        log.warning("orphaned call: %s", _orphan_result(r))
    _telemetry(recorded, written)


def _orphan_record(call: CallRecord, who: Who) -> AuditRecord:
    """The audit record of an orphaned call: one per call (its id is the thread's and call's)."""
    tools = who.version.tool_versions if who.version is not None else {}
    return AuditRecord(
        kind="tool",
        decision="orphaned",
        status="unknown",
        tool=call.tool,
        args=call.args,
        result=_orphan_result(call),
        tool_call_id=call.tool_call_id,
        tool_version=tools.get(call.tool),
        id=uuid.uuid5(
            uuid.NAMESPACE_URL, f"keel:orphaned:{call.thread_id}:{call.tool_call_id}"
        ).hex,
        **who.fields(),
    )


def _orphan_result(call: CallRecord) -> str:
    """What an orphan's audit record says, of the ledger's text only.

    Its arguments as stored (redacted), the registered tool's name and the ids the row is
    stored under (`insert_flow(redacted=True)` does not redact it again).
    """
    when = datetime.fromtimestamp(call.started_at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return (
        f"outcome unknown: {call.tool} {json_text(call.args)} (tool_call_id "
        f"{call.tool_call_id}, thread {call.thread_id}) started at {when} and never finished, and "
        "the model turn that asked for it is in no history the thread goes on with (lost with "
        "its process in a crash, or left on a branch a fork from an earlier checkpoint "
        "abandoned), so it may or may not have happened. keel has not run it again; a later "
        "call of the same tool and arguments in this thread is asked about it (resolve it with "
        "that call's answer, or check the outside world)"
    )


def _telemetry(recorded: Recorded, written: RunRecord) -> None:
    """Report the run to OpenTelemetry, when it is installed (see `keel.observe.otel`).

    A write that found the run's end already stored (a cancellation, refused) reports nothing.
    """
    telemetry = otel.active()
    if telemetry is not None and recorded.stored.terminated_reason == written.terminated_reason:
        try:
            telemetry.record_run(recorded.stored, before=recorded.before)
        except Exception as exc:
            log.error("keel could not report the run to OpenTelemetry: %r", exc)


def _log_decision(node: str, choice: str, state: AgentState) -> None:
    if not decision_log.isEnabledFor(logging.INFO):
        return
    result: Mapping[str, Any] = state.get("outcome") or {}
    messages = state.get("messages") or []
    last = messages[-1] if messages else None
    reason = result.get("detail")
    if reason is None and isinstance(last, AIMessage) and last.tool_calls:
        reason = "tool calls: " + ", ".join(c["name"] for c in last.tool_calls)
    _decision(node, choice, reason or "")


def _decision(node: str, choice: str, reason: str, **extra: Any) -> None:
    """Log one decision as a JSON line on `keel.decisions` (at INFO), PII and secrets redacted.

    Nothing is sanitized or encoded unless the logger takes INFO records.
    """
    if not decision_log.isEnabledFor(logging.INFO):
        return
    line = sanitize({"node": node, "choice": choice, "reason": reason, **extra})
    decision_log.info(json_text(line))


# -- what a node's update means for the audit log (pure) --------------------------------------


def tool_records(tools: ToolRegistry, gate: Gate) -> Derive:
    """Audit records for `execute_tools`: one per answered call, with its gate decision."""

    def derive(
        state: AgentState, update: Mapping[str, Any], context: RunContext, who: Who
    ) -> list[AuditRecord]:
        _, calls = pending_tool_calls(state.get("messages") or [])
        by_id = {c.get("id") or "": c for c in calls}
        out = []
        for m in update.get("messages") or []:
            call = by_id.get(m.tool_call_id) if isinstance(m, ToolMessage) else None
            if call is None:
                continue
            if m.response_metadata.get(DUPLICATE_KEY):
                out.append(_duplicate_record(call, m, tools, who))
                continue
            entry = tools.get(call["name"])
            args = call.get("args")
            verdict = gate(entry, args, context) if entry and isinstance(args, dict) else None
            status = str(m.response_metadata.get("keel_status", m.status))
            action = verdict.action if verdict is not None else "deny"
            reason = verdict.reason if verdict is not None else ""
            _decision("execute_tools", action, reason, tool=call["name"], status=status)
            out.append(
                AuditRecord(
                    kind="tool",
                    decision=action,
                    status=status,
                    tool=call["name"],
                    args=args,
                    rule=verdict.rule if verdict is not None else None,
                    result=m.text,
                    tool_call_id=m.tool_call_id,
                    tool_version=entry.spec.version if entry is not None else None,
                    **who.fields(),
                )
            )
        return [*out, *content_records(state, update, context, who)]  # and budget records

    return derive


def review_records(tools: ToolRegistry) -> Derive:
    """Audit records for `human_review`: one per human decision, with the tool's version."""

    def derive(
        state: AgentState, update: Mapping[str, Any], context: RunContext, who: Who
    ) -> list[AuditRecord]:
        _, calls = pending_tool_calls(state.get("messages") or [])
        args = {c.get("id") or "": c.get("args") for c in calls}
        edited = set()
        for m in update.get("messages") or []:
            if isinstance(m, AIMessage):  # an edit: the calls with their new arguments
                for c in m.tool_calls:
                    call_id = c.get("id") or ""
                    if c.get("args") != args.get(call_id):
                        edited.add(call_id)
                        args[call_id] = c.get("args")
        out = []
        for approval in (update.get("approvals") or {}).values():
            call_id = approval["tool_call_id"]
            kind = "edited" if call_id in edited else approval["decision"]
            review = _Review(approval["tool"], call_id, args, who, tools)
            out.append(review.record(kind, approval.get("reviewer")))
        decided = {a["tool_call_id"] for a in (update.get("approvals") or {}).values()}
        by_id = {c.get("id") or "": c for c in calls}
        for m in update.get("messages") or []:
            if not isinstance(m, ToolMessage) or m.tool_call_id in decided:
                continue  # a rejection of a call whose outcome was unknown has no approval
            if m.response_metadata.get(DUPLICATE_KEY) and m.tool_call_id in by_id:
                # no human saw it: it follows the answer to the call it repeats
                out.append(_duplicate_record(by_id[m.tool_call_id], m, tools, who))
                continue
            kind = _ANSWERED.get(str(m.response_metadata.get("keel_status")))
            if kind is not None:
                review = _Review(m.name, m.tool_call_id, args, who, tools)
                by = m.response_metadata.get(REVIEWER_META)
                out.append(review.record(kind, by, m.text))
        for settled in update.get(SETTLED_KEY) or []:  # "did this happen?" answered
            review = _Review(settled["tool"], settled["tool_call_id"], args, who, tools)
            out.append(
                review.record(settled["decision"], settled.get("reviewer"), settled["result"])
            )
        return [*out, *content_records(state, update, context, who)]

    return derive


def _duplicate_record(call: ToolCall, m: ToolMessage, tools: ToolRegistry, who: Who) -> AuditRecord:
    """The audit record of a repeat of an earlier call of its turn (`keel.tools._duplicates`).

    It was not run: it was answered with the answer of the call it repeats.
    """
    primary = str(m.response_metadata[DUPLICATE_KEY])
    status = str(m.response_metadata.get("keel_status", m.status))
    _decision(
        "execute_tools", "duplicate", f"repeats call {primary}", tool=call["name"], status=status
    )
    entry = tools.get(call["name"])
    return AuditRecord(
        kind="tool",
        decision="duplicate",
        status=status,
        tool=call["name"],
        args=call.get("args"),
        result=f"duplicate of call {primary} (same tool and arguments in one turn): not run, "
        f"answered with its result: {m.text}",
        tool_call_id=m.tool_call_id,
        tool_version=entry.spec.version if entry is not None else None,
        **who.fields(),
    )


_ANSWERED = {"respond": "responded", "rejected": "rejected"}
"""A human's answer in a tool's place (`keel_status`), as the audit's decision."""


@dataclass(frozen=True, slots=True)
class _Review:
    """The call a human decided on: its tool, id and arguments, and who the run acted for."""

    tool: str | None
    call_id: str
    args: Mapping[str, Any]
    who: Who
    tools: ToolRegistry

    def record(self, kind: str, approver: str | None, result: str = "") -> AuditRecord:
        _decision("human_review", kind, result, tool=self.tool, approver=approver)
        entry = self.tools.get(self.tool) if self.tool is not None else None
        return AuditRecord(
            kind="approval",
            decision=kind,
            tool=self.tool,
            args=self.args.get(self.call_id),
            approver=approver,
            result=result,
            tool_call_id=self.call_id,
            tool_version=entry.spec.version if entry is not None else None,
            **self.who.fields(),
        )


def content_records(
    state: AgentState, update: Mapping[str, Any], context: RunContext, who: Who
) -> list[AuditRecord]:
    """Audit records for the content guards: one per message a guard acted on.

    That is each message carrying the note `keel.guards.screening` leaves in its
    `response_metadata` (flagged, redacted or blocked); and the budget's record when a budget
    refused the injection detector's model call (`budget_records`).
    """
    out = []
    for m in update.get("messages") or []:
        note = m.response_metadata.get(GUARD_KEY) if isinstance(m, BaseMessage) else None
        if not isinstance(note, dict):
            continue
        rules = ", ".join(note.get("rules") or [])
        _decision(
            f"{note.get('guard')}_guard", str(note.get("action")), rules, source=note.get("source")
        )
        out.append(
            AuditRecord(
                kind="content",
                decision=str(note.get("action")),
                status=str(note.get("source")),
                tool=m.name if isinstance(m, ToolMessage) else None,
                rule=rules,
                result="; ".join(note.get("excerpts") or []),
                tool_call_id=m.tool_call_id if isinstance(m, ToolMessage) else None,
                **who.fields(),
            )
        )
    return [*out, *budget_records(state, update, context, who)]


def budget_records(
    state: AgentState, update: Mapping[str, Any], context: RunContext, who: Who
) -> list[AuditRecord]:
    """Audit records for budget events: a limit reached, a soft threshold newly passed."""
    out = []
    result = update.get("outcome")
    if result is not None and result.get("terminated_reason") == "budget_exceeded":
        out.append(
            AuditRecord(kind="budget", decision="exceeded", result=result["detail"], **who.fields())
        )
    before = set(state.get("budget_warnings") or [])
    for warning in update.get("budget_warnings") or []:
        if warning not in before:
            out.append(
                AuditRecord(kind="budget", decision="warning", result=warning, **who.fields())
            )
    return out
