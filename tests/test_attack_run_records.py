"""Every run has exactly one run record, and it says how the run ended (README, Observability).

A matrix: each way a run can end (completed; paused for approval, then resumed; budget stop;
a denied call; a model error; a tool error; the checkpointer failing mid-run, and the run
resumed once it is back; the ledger failing mid-run; cancelled; a stream its reader closed;
paused, then dropped by a new message) under each entry point (`invoke`, `stream` with
`"values"` and with `"updates"`, `ainvoke`, `astream` with `"values"` and with `"updates"`),
then a new message on the same thread, which completes; an agent, and (for most endings) a
supervisor handing the task to one. For every run: one record per run id, its status and
`terminated_reason` as the outcome the caller saw (the final state's, or a `StorageError`'s),
and the run id of the call that started it: no record takes another run's id. And every tool
call answered in the thread is in the audit log (a ledger that refused the call's audit
record mid-run and came back before the run ended gets it with the run's record). A new
message sent under the run id of the run before it is refused, not silently dropped.

Real parts: SQLite files, and a PostgreSQL database (checkpointer and ledger) whose connections
are terminated mid-run; models are keel's `ScriptedChatModel` with fresh tool-call ids, as real
models mint them.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import ToolMessage
from langgraph.types import Command, RetryPolicy
from test_storage_faults import InFlightKiller
from test_storage_outcome import KillUntilDone

from keel import Ledger, Persistence, RunContext, StorageError, UserError, build_agent, tool
from keel.db.audit import AuditLog
from keel.db.runs import RunLog, RunRecord
from keel.evals import ScriptedChatModel, call
from keel.graphs import FINISH, Route, build_supervisor
from keel.guards import Budget, Policy, Rule

CTX = RunContext(user_id="u1", tenant_id="acme")
ENDINGS = [
    "completed",
    "resumed",
    "budget",
    "denied",
    "model_error",
    "tool_error",
    "checkpointer",
    "resumed_after_storage",
    "ledger",
    "audit_down",
    "cancelled",
    "closed",
    "dropped",
]
"""`ledger`: the ledger refuses a side-effecting call's records (its result, its audit);
`resumed_after_storage`: the checkpointer failed, then `None` resumes the run once it is back;
`audit_down`: a read's audit record only; `closed`: a stream its reader closed; `dropped`:
paused for a human, then a new message answered the waiting call `not_run`."""
ENTRIES = [
    "invoke",
    "stream-values",
    "stream-updates",
    "ainvoke",
    "astream-values",
    "astream-updates",
]
STOPPED = ("stopped", "cancelled")
PAUSED = ("interrupted", "awaiting_approval")
COMPLETED = ("success", "completed")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """(backend, URL): a file of this test, or the module's PostgreSQL database (the tests
    keep apart by thread id)."""
    if request.param == "sqlite":
        return "sqlite", f"sqlite:///{tmp_path}/keel.db"
    return "postgres", request.getfixturevalue("module_postgres_url")


@dataclass
class Faults:
    """What the tools do to the storage, armed by the scenario; undone after the run."""

    backend: str
    url: str
    loop: asyncio.AbstractEventLoop
    saver: Any = None
    armed: str | None = None
    """`checkpointer` or `ledger`: break it when the next tool runs (once)."""
    release: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)
    undo: list[Callable[[], None]] = field(default_factory=list)

    def break_storage(self) -> None:
        what, self.armed = self.armed, None
        if what == "ledger":  # its writes after this tool, killed in each of its 3 attempts
            killer = InFlightKiller(self.url)
            killer.arm("keel_audit", times=3)
            self.undo.append(killer.join)
        elif what == "checkpointer" and self.backend == "postgres":
            pg = KillUntilDone(self.url)
            pg.start()
            self.undo.append(pg.stop)
        elif what == "checkpointer":
            self._pragma("ON")
            self.undo.append(lambda: self._pragma("OFF"))

    def _pragma(self, on: str) -> None:
        statement = self.saver.conn.execute(f"PRAGMA query_only = {on}")
        if asyncio.iscoroutine(statement):  # aiosqlite: on the loop the saver runs on
            if threading.current_thread() is threading.main_thread():
                self.loop.run_until_complete(statement)
            else:
                asyncio.run_coroutine_threadsafe(statement, self.loop).result(timeout=10)

    def mend(self) -> None:
        while self.undo:
            self.undo.pop()()


def _graph(graph: str, ending: str, faults: Faults, ledger: Ledger) -> Any:
    """A keel agent, or a supervisor handing every task to such an agent ("billing")."""
    if graph == "agent":
        return _agent(ending, faults, ledger, faults.saver)
    agent = _agent(ending, faults, ledger, None)  # it runs on the supervisor's checkpointer
    return build_supervisor({"billing": agent}, _router, ledger=ledger, checkpointer=faults.saver)


def _router(messages: Any) -> Route:
    """Hands the user's message to billing, and finishes once billing answered."""
    last = messages[-1]
    return Route(agent=FINISH if last.type == "ai" else "billing", task=last.text)


def _agent(ending: str, faults: Faults, ledger: Ledger, saver: Any) -> Any:
    @tool
    def lookup(order_id: str) -> str:
        """Look up an order."""
        faults.break_storage()
        return f"order {order_id}: delivered"

    @tool(risk="write")
    def refund(order_id: str) -> str:
        """Refund an order."""
        faults.break_storage()
        return f"refunded {order_id}"

    @tool
    def broken(order_id: str) -> str:
        """A tool that fails."""
        raise ValueError(f"no such order {order_id}")

    @tool
    def hang(order_id: str) -> str:
        """A tool the caller stops: Ctrl-C under a sync run, a cancelled task under async."""
        faults.started.set()
        if not faults.loop.is_running():  # a sync run
            raise KeyboardInterrupt
        faults.release.wait(10)
        return "too late"

    first = {
        "completed": "lookup",
        "resumed": "refund",
        "budget": "lookup",
        "denied": "refund",
        "model_error": None,
        "tool_error": "broken",
        "checkpointer": "lookup",
        "resumed_after_storage": "lookup",
        "ledger": "refund",
        "audit_down": "lookup",
        "cancelled": "hang",
        "closed": "lookup",
        "dropped": "refund",
    }[ending]

    def failing(messages: Any) -> Any:
        raise ConnectionError("the provider is down")

    opening = failing if first is None else call(first, order_id="A1")

    def turn(messages: Any) -> Any:  # a supervisor's agent starts each task on a fresh conversation
        if "A1" not in messages[-1].text:
            return "second answer"
        return opening(messages) if callable(opening) else opening

    model = ScriptedChatModel(script=[turn, "first answer", "second answer"], fresh_ids=True)
    action = {"resumed": "ask", "dropped": "ask", "denied": "deny"}.get(ending, "allow")
    budget = Budget(model_calls=1) if ending == "budget" else None
    policy = Policy(
        name="matrix",
        rules=(Rule(tool="refund", action=action), Rule(tool="*", action="allow")),
        budget=budget,
    )
    return build_agent(
        model,
        [lookup, refund, broken, hang],
        policy=policy,
        ledger=ledger,
        checkpointer=saver,
        model_retry=RetryPolicy(max_attempts=1),
    )


@dataclass
class Caller:
    """Runs an agent through one entry point, each call with a fresh run id."""

    entry: str
    agent: Any
    loop: asyncio.AbstractEventLoop
    thread: str = field(default_factory=lambda: f"t-{uuid.uuid4().hex}")
    run_ids: list[str] = field(default_factory=list)
    pending: str | None = None
    """`keel_pending` for the next run (`not_run`: answer a waiting call so)."""

    @property
    def is_async(self) -> bool:
        return self.entry.startswith("a")

    def _config(self, run_id: str | None = None) -> Any:
        self.run_ids.append(run_id or str(uuid.uuid4()))
        configurable = {"thread_id": self.thread, "run_id": self.run_ids[-1]}
        if self.pending is not None:
            configurable["keel_pending"] = self.pending
        return {"configurable": configurable}

    def send(self, payload: Any, run_id: str | None = None) -> tuple[str, str]:
        """The (status, terminated_reason) the caller sees for the run `payload` starts.

        `run_id`: the run's id (default: a new one).
        """
        config, mode = self._config(run_id), self.entry.partition("-")[2]
        try:
            if self.entry == "invoke":
                return _pair(self.agent.invoke(payload, config, context=CTX)["outcome"])
            if self.entry == "ainvoke":
                result = self.loop.run_until_complete(
                    self.agent.ainvoke(payload, config, context=CTX)
                )
                return _pair(result["outcome"])
            chunks = self._chunks(payload, config, mode)
        except StorageError as exc:  # a stream without "values": the outcome it carries
            assert mode == "updates" and exc.outcome is not None
            return _pair(exc.outcome)
        states = [c for c in chunks if mode == "values" and "outcome" in c]
        return _pair(states[-1]["outcome"] if states else self.saved()["outcome"])

    def _chunks(self, payload: Any, config: Any, mode: str) -> list[Any]:
        if not self.is_async:
            return list(self.agent.stream(payload, config, context=CTX, stream_mode=mode))
        chunks = self.agent.astream(payload, config, context=CTX, stream_mode=mode)
        return self.loop.run_until_complete(_collected(chunks))

    def saved(self) -> Any:
        """The thread's saved state."""
        config = {"configurable": {"thread_id": self.thread}}
        if self.is_async:
            return self.loop.run_until_complete(self.agent.aget_state(config)).values
        return self.agent.get_state(config).values

    def stop(self, payload: Any, faults: Faults) -> None:
        """Start a run and stop it in its tool: Ctrl-C (sync), or cancel its task (async)."""
        config, mode = self._config(), self.entry.partition("-")[2]
        if not self.is_async:
            with pytest.raises(KeyboardInterrupt):
                if self.entry == "invoke":
                    self.agent.invoke(payload, config, context=CTX)
                else:
                    list(self.agent.stream(payload, config, context=CTX, stream_mode=mode))
            return
        if self.entry == "ainvoke":
            running: Any = self.agent.ainvoke(payload, config, context=CTX)
        else:
            running = _collected(self.agent.astream(payload, config, context=CTX, stream_mode=mode))
        self.loop.run_until_complete(_cancelled(running, faults))

    def close(self, payload: Any) -> None:
        """Start a stream and close it after its first chunk (its reader went away)."""
        config, mode = self._config(), self.entry.partition("-")[2]
        if not self.is_async:
            chunks = self.agent.stream(payload, config, context=CTX, stream_mode=mode)
            next(chunks)
            chunks.close()
            return
        achunks = self.agent.astream(payload, config, context=CTX, stream_mode=mode)
        self.loop.run_until_complete(anext(achunks))
        self.loop.run_until_complete(achunks.aclose())


async def _collected(chunks: AsyncIterator[Any]) -> list[Any]:
    return [chunk async for chunk in chunks]


async def _cancelled(running: Any, faults: Faults) -> None:
    task = asyncio.ensure_future(running)
    await asyncio.to_thread(faults.started.wait, 10)  # the tool runs
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    faults.release.set()


def _pair(outcome: Any) -> tuple[str, str]:
    if outcome is None:  # no outcome in the state
        return "", ""
    return str(outcome["status"]), str(outcome["terminated_reason"])


@contextlib.contextmanager
def _world(backend: str, url: str, entry: str) -> Iterator[tuple[Faults, Ledger]]:
    """The ledger and checkpointer on `url`, and the faults their tools can cause."""
    loop = asyncio.new_event_loop()
    faults = Faults(backend, url, loop)
    ledger = Ledger(url)
    with contextlib.ExitStack() as stack:
        stack.callback(loop.close)
        stack.callback(faults.mend)
        stack.callback(lambda: loop.run_until_complete(ledger.aclose()))
        stack.callback(ledger.close)
        if entry.startswith("a"):
            saving = Persistence(url).acheckpointer()
            faults.saver = loop.run_until_complete(saving.__aenter__())
            stack.callback(lambda: loop.run_until_complete(saving.__aexit__(None, None, None)))
        else:
            faults.saver = stack.enter_context(Persistence(url).checkpointer())
        yield faults, ledger


def _play(ending: str, caller: Caller, faults: Faults) -> list[tuple[str, str]]:
    """Run the scenario's first run (and its resume); what the caller saw of each run."""
    ask = {"messages": [("user", "refund order A1")]}
    if ending == "cancelled":
        caller.stop(ask, faults)
        return [STOPPED]
    if ending == "closed":
        caller.close(ask)
        return [STOPPED]
    armed = {
        "checkpointer": "checkpointer",
        "resumed_after_storage": "checkpointer",
        "ledger": "ledger",
        "audit_down": "ledger",
    }
    faults.armed = armed.get(ending)
    seen = caller.send(ask)
    faults.mend()
    if ending in ("resumed", "dropped"):  # a supervisor's state says so too: see below
        assert seen == PAUSED, seen
    if ending == "resumed":
        seen = caller.send(Command(resume=[{"type": "approve"}]))
    if ending == "resumed_after_storage":  # the database is back: the run goes on
        assert seen == ("error", "storage"), seen
        seen = caller.send(None)
    if ending == "dropped":  # the next message answers the waiting call `not_run`
        caller.pending = "not_run"
        return [STOPPED]
    return [seen]


EXPECTED = {
    "completed": COMPLETED,
    "resumed": COMPLETED,
    "budget": ("stopped", "budget_exceeded"),
    "denied": COMPLETED,  # answered `denied`; the model goes on
    "model_error": ("error", "error"),
    "tool_error": COMPLETED,  # answered `error`; the model goes on
    "checkpointer": ("error", "storage"),
    "resumed_after_storage": COMPLETED,  # the same run, its record updated
    "ledger": ("error", "error"),  # of category storage: the refund's result was not recorded
    "audit_down": COMPLETED,  # a read's audit record refused: the run goes on
    "cancelled": STOPPED,
    "closed": STOPPED,  # a stream its reader closed
    "dropped": STOPPED,  # paused for a human; a new message dropped what it waited for
}


SUPERVISED = {"completed", "resumed", "budget", "model_error", "checkpointer", "cancelled"}
"""The endings a supervisor's run is put through (its agent's, seen through the supervisor)."""
CASES = [
    pytest.param(
        graph,
        ending,
        entry,
        id=f"{graph}-{ending}-{entry}",
    )
    for graph in ("agent", "supervisor")
    for ending in ENDINGS
    for entry in ENTRIES
    if ending != "closed" or "stream" in entry  # only a stream has a reader to close it
    if graph == "agent" or (ending in SUPERVISED and entry.endswith(("invoke", "updates")))
]


@pytest.mark.parametrize(("graph", "ending", "entry"), CASES)
def test_each_run_has_one_record_that_says_how_it_ended(
    backend: tuple[str, str], graph: str, ending: str, entry: str
) -> None:
    kind, url = backend
    if ending in ("ledger", "audit_down") and kind == "sqlite":
        pytest.skip("the ledger's statements are killed in flight on PostgreSQL only")
    with _world(kind, url, entry) as (faults, ledger):
        caller = Caller(entry, _graph(graph, ending, faults, ledger), faults.loop)
        seen = _play(ending, caller, faults)
        runs = len(caller.run_ids)  # a resume is part of the run it resumes
        seen.append(caller.send({"messages": [("user", "and order B2?")]}))
        starts = [caller.run_ids[0], caller.run_ids[runs]]
        every = [r for r in RunLog(ledger).query() if r.thread_id == caller.thread]
        records = [r for r in every if r.graph == f"keel_{graph}"]
        agents = [r for r in every if r.graph != f"keel_{graph}"]  # a supervisor's agent's
        audit = AuditLog(ledger).query(thread=caller.thread)
        messages = caller.saved()["messages"]
    assert seen == [EXPECTED[ending], COMPLETED], seen
    assert [(r.status, r.terminated_reason) for r in records] == seen, _show(records)
    assert [r.run_id for r in records] == starts, _show(records)
    assert [r.run_id for r in agents] == (starts if graph == "supervisor" else []), _show(agents)
    if ending in ("checkpointer", "ledger"):
        assert records[0].error_category == "storage", _show(records)
    assert len(set(caller.run_ids)) == len(caller.run_ids)
    # every call answered in the thread is in the audit log, under a run of the thread
    answered = {m.tool_call_id for m in messages if isinstance(m, ToolMessage)}
    assert answered <= {a.tool_call_id for a in audit if a.kind == "tool"}, audit
    assert {a.run_id for a in audit} <= set(caller.run_ids), audit


@pytest.mark.parametrize("entry", ["invoke", "ainvoke", "astream-updates"])
def test_a_new_message_under_the_last_runs_id_is_refused_not_dropped(
    tmp_path: Path, entry: str
) -> None:
    """LangGraph takes a call under the run id that last wrote the thread for that run's
    re-entry (a retried or reconnected run) and drops its input: the new message was lost,
    the caller got the old run's answer as the new one's, and no record was written. keel
    refuses it, before anything is written; a retry of that run (its own input) still goes
    through as LangGraph reads it, and a new run id starts a new run."""
    first, second = {"messages": [("user", "refund order A1")]}, {"messages": [("user", "B2?")]}
    with _world("sqlite", f"sqlite:///{tmp_path}/keel.db", entry) as (faults, ledger):
        caller = Caller(entry, _graph("agent", "completed", faults, ledger), faults.loop)
        assert caller.send(first) == COMPLETED
        reused = caller.run_ids[0]
        with pytest.raises(UserError, match="its own run_id"):
            caller.send(second, run_id=reused)
        assert caller.send(first, run_id=reused) == COMPLETED  # a retry of that run
        assert len(caller.saved()["messages"]) == 4  # nothing sent twice, nothing lost
        assert caller.send(second) == COMPLETED
        records = RunLog(ledger).query()
    assert [(r.run_id, r.terminated_reason) for r in records] == [
        (reused, "completed"),
        (caller.run_ids[-1], "completed"),
    ]


@pytest.mark.parametrize("entry", ENTRIES)
def test_a_supervisor_paused_for_approval_says_so_in_its_state(tmp_path: Path, entry: str) -> None:
    """The supervisor's agent pauses by raising `GraphInterrupt` inside the supervisor's node,
    and a node that raises writes nothing: the supervisor's state said `outcome: None` while its
    record said `interrupted`. Now it says what a paused agent's says (the waiting agent's own
    outcome), in the state each entry point ends with and in `get_state`; the run resumes."""
    with _world("sqlite", f"sqlite:///{tmp_path}/keel.db", entry) as (faults, ledger):
        caller = Caller(entry, _graph("supervisor", "resumed", faults, ledger), faults.loop)
        assert caller.send({"messages": [("user", "refund order A1")]}) == PAUSED
        config = {"configurable": {"thread_id": caller.thread}}
        if caller.is_async:
            inside = faults.loop.run_until_complete(caller.agent.aget_state(config, subgraphs=True))
        else:
            inside = caller.agent.get_state(config, subgraphs=True)
        (task,) = inside.tasks
        waiting = {
            "status": "interrupted",
            "terminated_reason": "awaiting_approval",
            "detail": "awaiting approval for refund",
        }
        assert task.state.values["outcome"] == waiting  # the agent's own
        assert inside.values["outcome"] == caller.saved()["outcome"] == waiting
        assert caller.send(Command(resume=[{"type": "approve"}])) == COMPLETED
    readme = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())
    assert "While a sub-agent waits for a human, the supervisor's state says what the" in readme


def _show(records: list[RunRecord]) -> list[tuple[Any, ...]]:
    return [(r.run_id, r.run_key, r.status, r.terminated_reason, r.detail[:80]) for r in records]


def _refuse_thread(url: str, table: str, thread: str) -> None:
    """Make the ledger's database refuse rows of `table` for `thread` (a trigger), up as ever.

    A value the database refuses for good (SQLite: a constraint, `IntegrityError`; PostgreSQL:
    a data exception, `DataError`), unlike a database that is down.
    """
    if url.startswith("sqlite"):
        import sqlite3

        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as db:
            db.execute(
                f"CREATE TRIGGER refuse_{table} BEFORE INSERT ON {table} "
                f"WHEN NEW.thread_id = '{thread}' BEGIN SELECT RAISE(ABORT, 'refused'); END"
            )
            db.commit()
        return
    import psycopg

    with psycopg.connect(url, autocommit=True) as db:
        db.execute(
            f"CREATE FUNCTION refuse_{table}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"IF NEW.thread_id = '{thread}' THEN RAISE EXCEPTION 'refused' USING "
            "ERRCODE = '22023'; END IF; RETURN NEW; END $$"
        )
        db.execute(
            f"CREATE TRIGGER refuse_{table} BEFORE INSERT ON {table} "
            f"FOR EACH ROW EXECUTE FUNCTION refuse_{table}()"
        )


def test_a_run_record_the_ledger_refuses_for_good_does_not_hold_back_later_ones(
    db_url: str,
) -> None:
    # kept to be written with the next record, it failed that one too, and every one after
    ledger = Ledger(db_url)
    ledger.setup()
    _refuse_thread(db_url, "keel_runs", "refused")
    with Persistence(db_url).checkpointer() as saver:
        agent = build_agent(ScriptedChatModel(script=["hi"] * 3), ledger=ledger, checkpointer=saver)
        for thread in ("refused", "t2", "t3"):
            config: Any = {"configurable": {"thread_id": thread}}
            done = agent.invoke({"messages": [("user", "hi")]}, config)
            assert done["outcome"]["terminated_reason"] == "completed"
    assert sorted(r.thread_id for r in RunLog(ledger).query()) == ["t2", "t3"]
    ledger.close()


def test_an_audit_record_the_ledger_refuses_for_good_does_not_hold_back_kept_ones(
    tmp_path: Path,
) -> None:
    import sqlite3

    url = f"sqlite:///{tmp_path}/keel.db"
    ledger = Ledger(url)
    ledger.setup()
    _refuse_thread(url, "keel_audit", "refused")

    def echo(x: int) -> str:
        """Echo x."""
        return f"echo {x}"

    def rename(old: str, new: str) -> None:  # the audit table gone and back: an outage
        with contextlib.closing(sqlite3.connect(tmp_path / "keel.db")) as db:
            db.execute(f"ALTER TABLE {old} RENAME TO {new}")
            db.commit()

    script = [call("echo", x=1), "done"] * 3
    with Persistence(url).checkpointer() as saver:
        agent = build_agent(
            ScriptedChatModel(script=script), [echo], ledger=ledger, checkpointer=saver
        )

        def run(thread: str) -> None:
            config: Any = {"configurable": {"thread_id": thread}}
            done = agent.invoke({"messages": [("user", "hi")]}, config)
            assert done["outcome"]["terminated_reason"] == "completed"

        run("refused")  # its tool call's audit record is refused for good
        rename("keel_audit", "keel_audit_away")
        run("t2")  # its audit record is kept: the table is gone
        rename("keel_audit_away", "keel_audit")
        run("t3")  # the kept record is written now, the refused one is not kept
    threads = {r.thread_id for r in AuditLog(ledger).query()}
    assert {"t2", "t3"} <= threads and "refused" not in threads
    ledger.close()
