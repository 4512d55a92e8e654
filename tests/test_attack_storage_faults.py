"""The ledger down at the edges of a run: where keel writes before the run starts (the `not_run`
answers to calls a new message drops), and the audit records it keeps while the ledger is down.

README: "No run ends in a bare traceback: it ends with an outcome and a reason"; a storage
failure ends a run as `error / storage` and loses nothing. Real parts: an SQLite ledger whose
file is replaced by a directory while it is down (its connections closed, so the next
transaction opens the path and fails) and put back, SQLite checkpointers in a file of their own,
and a PostgreSQL ledger whose statements are killed mid-transaction (`pg_terminate_backend`).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from langgraph.types import Command
from test_storage_faults import InFlightKiller

from keel import Ledger, Persistence, RunContext, StorageError, build_agent, tool
from keel.db.audit import AuditLog, AuditRecord
from keel.db.runs import RunLog
from keel.evals import ScriptedChatModel, call
from keel.graphs import FINISH, Route, build_supervisor
from keel.guards import AdmissionPolicy, Policy, Rule
from keel.observe.observer import UNWRITTEN_MAX, Observer

CTX = RunContext(user_id="u1", tenant_id="acme")
ENTRIES = [
    "invoke",
    "ainvoke",
    "stream-values",
    "stream-updates",
    "astream-values",
    "astream-updates",
]
DROP = {"messages": [("user", "never mind the refund")]}


@dataclass
class SqliteLedgerDown:
    """Takes an SQLite ledger's database away (a directory where its file was) and puts it back."""

    ledger: Ledger
    path: Path
    aside: Path = field(init=False)

    def __post_init__(self) -> None:
        self.aside = self.path.parent / "aside"

    def down(self) -> None:
        self.ledger._disconnect()  # its open connections would outlive the file's unlinking
        self.aside.mkdir()
        for f in self.path.parent.glob(f"{self.path.name}*"):
            f.rename(self.aside / f.name)
        self.path.mkdir()

    def up(self) -> None:
        self.path.rmdir()
        for f in self.aside.iterdir():
            f.rename(self.path.parent / f.name)
        self.aside.rmdir()


@dataclass
class World:
    """A refund agent that asks a human, on a thread, with the entry point a test drives."""

    entry: str
    agent: Any
    ledger: Ledger
    loop: asyncio.AbstractEventLoop
    refunds: list[str]
    saver: Any
    thread: str = "t1"
    outcome: Any = None
    """The outcome the caller saw of the last run."""

    def run(self, payload: Any, **configurable: Any) -> tuple[str, str]:
        """The (status, terminated_reason) the caller sees of the run `payload` starts."""
        self.outcome = self._outcome(payload, configurable)
        return _pair(self.outcome)

    def _outcome(self, payload: Any, configurable: dict[str, Any]) -> Any:
        config = {"configurable": {"thread_id": self.thread, **configurable}}
        mode = self.entry.partition("-")[2]
        try:
            if self.entry == "invoke":
                return self.agent.invoke(payload, config, context=CTX)["outcome"]
            if self.entry == "ainvoke":
                run = self.agent.ainvoke(payload, config, context=CTX)
                return self.loop.run_until_complete(run)["outcome"]
            if self.entry.startswith("stream"):
                chunks = list(self.agent.stream(payload, config, context=CTX, stream_mode=mode))
            else:
                chunks = self.loop.run_until_complete(_collected(self.agent, payload, config, mode))
        except StorageError as exc:  # a stream without "values": the outcome it carries
            assert mode == "updates" and exc.outcome is not None, exc
            return exc.outcome
        if mode == "values":
            return chunks[-1]["outcome"]
        return self.state().values["outcome"]

    def state(self) -> Any:
        config = {"configurable": {"thread_id": self.thread}}
        if self.entry.startswith("a"):
            return self.loop.run_until_complete(self.agent.aget_state(config))
        return self.agent.get_state(config)


async def _collected(agent: Any, payload: Any, config: Any, mode: str) -> list[Any]:
    return [c async for c in agent.astream(payload, config, context=CTX, stream_mode=mode)]


def _pair(outcome: Any) -> tuple[str, str]:
    return str(outcome["status"]), str(outcome["terminated_reason"])


@contextlib.contextmanager
def _world(entry: str, ledger_url: str, folder: Path) -> Iterator[World]:
    """The agent on `ledger_url`, its checkpointer in a file of its own under `folder`."""
    loop = asyncio.new_event_loop()
    ledger = Ledger(ledger_url)
    refunds: list[str] = []
    url = f"sqlite:///{folder}/checkpoints.db"
    with contextlib.ExitStack() as stack:
        stack.callback(loop.close)
        stack.callback(lambda: loop.run_until_complete(ledger.aclose()))
        if entry.startswith("a"):
            saving = Persistence(url).acheckpointer()
            saver = loop.run_until_complete(saving.__aenter__())
            stack.callback(lambda: loop.run_until_complete(saving.__aexit__(None, None, None)))
        else:
            saver = stack.enter_context(Persistence(url).checkpointer())
        world = World(entry, None, ledger, loop, refunds, saver)
        script = [call("refund", order_id="A1"), "fine, no refund", "done"]
        world.agent = _refund_agent(world, *script, checkpointer=saver)
        yield world


def _refund_agent(world: World, *script: Any, checkpointer: Any = None) -> Any:
    """A refund agent on the world's ledger (a refund asks a human); `script`: its model's."""

    @tool(risk="write")
    def refund(order_id: str) -> str:
        """Refund an order."""
        world.refunds.append(order_id)
        return f"refunded {order_id}"

    model = ScriptedChatModel(script=list(script), fresh_ids=True)
    policy = Policy(name="p", rules=(Rule(tool="refund", action="ask"),))
    return build_agent(
        model, [refund], policy=policy, ledger=world.ledger, checkpointer=checkpointer
    )


def _waiting(world: World) -> None:
    """The first run asks a human about the refund, and waits."""
    assert world.run({"messages": [("user", "refund order A1")]}) == (
        "interrupted",
        "awaiting_approval",
    )


def _records(world: World) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The thread's `not_run` audit records (tool, status) and its run records' endings."""
    audit = AuditLog(world.ledger).query(thread=world.thread)
    dropped = [(str(a.tool), a.status) for a in audit if a.decision == "not_run"]
    runs = [(r.status, r.terminated_reason) for r in RunLog(world.ledger).query()]
    return dropped, runs


@pytest.mark.parametrize("entry", ENTRIES)
def test_a_ledger_down_as_a_new_message_drops_the_waiting_calls_ends_the_run(
    tmp_path: Path, entry: str
) -> None:
    """`keel_pending="not_run"` audits the dropped calls before the run starts. With the ledger
    down there, a stream raised the driver's `StorageError` with no outcome (a bare traceback;
    `invoke` had already ended such a run): now every entry point ends it `error / storage`,
    nothing of it is written (the call still waits), and once the ledger is back the same message
    drops the call, audited once, the run that waited recorded `stopped / cancelled`."""
    path = tmp_path / "keel.db"
    with _world(entry, f"sqlite:///{path}", tmp_path) as world:
        _waiting(world)
        fault = SqliteLedgerDown(world.ledger, path)
        fault.down()
        assert world.run(DROP, keel_pending="not_run") == ("error", "storage")
        fault.up()
        # it says what to do: send the message again (`invoke(None)` would resume nothing)
        assert "send its input again" in world.outcome["detail"], world.outcome
        assert world.state().next == ("human_review",)  # the call still waits: nothing lost
        assert world.run(DROP, keel_pending="not_run") == ("success", "completed")
        dropped, runs = _records(world)
    assert dropped == [("refund", "not_run")]
    assert runs == [
        ("error", "storage"),  # the message that failed is a run: recorded once the ledger is back
        ("stopped", "cancelled"),
        ("success", "completed"),
    ]
    assert world.refunds == []


def _lookup_agent(ledger: Ledger, saver: Any, faults: list[Callable[[], None]]) -> Any:
    """Looks an order up (a read: its audit record alone is what the ledger refuses)."""

    @tool
    def lookup(order_id: str) -> str:
        """Look an order up."""
        while faults:  # the first call only
            faults.pop()()
        return f"order {order_id}: delivered"

    model = ScriptedChatModel(
        script=[call("lookup", order_id="A1"), "delivered", "second answer"] * 2, fresh_ids=True
    )
    return build_agent(model, [lookup], ledger=ledger, checkpointer=saver)


@contextlib.contextmanager
def _down_over_a_run(tmp_path: Path) -> Iterator[tuple[Any, Ledger, Any]]:
    """A run on thread t1 whose tool takes the SQLite ledger away until after the run ended
    (it completes: a read's audit record is all the ledger refused), then the ledger is back:
    (the agent, the ledger, the run's final state)."""
    path = tmp_path / "keel.db"
    ledger = Ledger(f"sqlite:///{path}")
    fault = SqliteLedgerDown(ledger, path)
    with Persistence(f"sqlite:///{tmp_path}/checkpoints.db").checkpointer() as saver:
        agent = _lookup_agent(ledger, saver, [fault.down])
        ask = {"messages": [("user", "where is A1?")]}
        first = agent.invoke(ask, {"configurable": {"thread_id": "t1"}}, context=CTX)
        assert _pair(first["outcome"]) == ("success", "completed")
        fault.up()
        yield agent, ledger, first
    ledger.close()


def test_audit_records_the_ledger_refused_are_written_by_the_next_run_once_it_is_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The ledger goes down as a tool runs and is still down when the run ends: its audit
    record was kept for the run's record, then dropped when that write failed too (logged, lost
    for good). Now it is kept again, and the next run's record writes it once the ledger is
    back (its own thread's next run would first wait out the lease whose release failed)."""
    with _down_over_a_run(tmp_path) as (agent, ledger, first):
        other = {"configurable": {"thread_id": "t2"}}  # a later run, on any thread
        second = agent.invoke({"messages": [("user", "where is A1?")]}, other, context=CTX)
        assert _pair(second["outcome"]) == ("success", "completed")
        answered = [m.tool_call_id for m in first["messages"] if m.type == "tool"]
        audit = AuditLog(ledger).query(thread="t1")
    assert [(a.tool, a.tool_call_id) for a in audit if a.kind == "tool"] == [
        ("lookup", answered[0])
    ]
    assert "kept for later" in caplog.text


def test_the_audit_records_kept_in_memory_are_bounded_and_the_drop_is_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A ledger that stays down while runs go on made the process keep every refused audit
    record, without bound. At most `UNWRITTEN_MAX` are kept: the oldest go, counted and logged
    as an error, and the rest are written once the ledger is back."""
    ledger = Ledger(f"sqlite:///{tmp_path}/keel.db")
    observer = Observer(ledger, graph="keel_agent")
    config: Any = {"configurable": {"thread_id": "t1", "run_id": "r1"}}
    refused = [
        AuditRecord(kind="tool", decision="allow", tool="lookup", result=str(i), thread_id="t1")
        for i in range(UNWRITTEN_MAX + 5)
    ]
    for at in range(0, len(refused), 100):  # a node's records at a time
        observer.keep_unwritten(refused[at : at + 100])
    assert observer.dropped == 5
    assert "dropped 5 audit records" in caplog.text
    state = {"messages": [], "outcome": {"status": "success", "terminated_reason": "completed"}}
    observer.record_run(state, config, CTX)  # the ledger takes writes: they are written
    written = AuditLog(ledger).query(thread="t1", limit=UNWRITTEN_MAX * 2)
    ledger.close()
    assert [a.result for a in written] == [r.result for r in refused[5:]]


def test_a_message_that_dropped_the_calls_and_failed_to_start_audits_them_once(
    tmp_path: Path,
) -> None:
    """The `not_run` records are written before the run saves its input; with the checkpointer
    failing there, the run ends `error / storage` and the calls still wait, so the message is
    sent again and answers them again: each call's `not_run` record was stored twice, as if
    two calls had been dropped. It is stored once."""
    with _world("invoke", f"sqlite:///{tmp_path}/keel.db", tmp_path) as world:
        _waiting(world)
        world.saver.conn.execute("PRAGMA query_only = ON")  # the checkpointer's disk fails
        assert world.run(DROP, keel_pending="not_run") == ("error", "storage")
        world.saver.conn.execute("PRAGMA query_only = OFF")
        assert world.state().next == ("human_review",)
        assert world.run(DROP, keel_pending="not_run") == ("success", "completed")
        dropped, runs = _records(world)
    assert dropped == [("refund", "not_run")]
    assert ("stopped", "cancelled") in runs and ("interrupted", "awaiting_approval") not in runs
    assert world.refunds == []


@pytest.mark.postgres
@pytest.mark.parametrize("table", ["keel_audit", "keel_runs"])
@pytest.mark.parametrize("entry", ["invoke", "astream-updates"])
def test_the_not_run_records_and_the_end_of_the_run_that_waited_commit_together(
    module_postgres_url: str, tmp_path: Path, entry: str, table: str
) -> None:
    """The `not_run` audit records and the record of the run that waited were two
    transactions: with the ledger failing between them (`keel_runs`' statements killed three
    times; or the first one, `keel_audit`'s: then a stream raised a bare `StorageError`), the
    audit said the call was dropped, the run went on, and the run that waited kept
    `interrupted / awaiting_approval` as its record for good. Now neither is written: the run
    ends `error / storage`, the call still waits, and the message sent again writes both."""
    with _world(entry, module_postgres_url, tmp_path) as world:
        world.thread = f"t-{tmp_path.name}-{entry}-{table}"
        _waiting(world)
        killer = InFlightKiller(module_postgres_url)
        killer.arm(table, times=3)
        seen = world.run(DROP, keel_pending="not_run")
        killer.join()
        assert world.state().next == ("human_review",)  # nothing written: the call still waits
        assert [seen, world.run(DROP, keel_pending="not_run")] == [
            ("error", "storage"),
            ("success", "completed"),
        ]
        audit = AuditLog(world.ledger).query(thread=world.thread)
        runs = [r for r in RunLog(world.ledger).query() if r.thread_id == world.thread]
    assert [(a.tool, a.status) for a in audit if a.decision == "not_run"] == [("refund", "not_run")]
    assert [(r.status, r.terminated_reason) for r in runs] == [
        ("error", "storage"),  # the message that failed to start is a run, and says so
        ("stopped", "cancelled"),
        ("success", "completed"),
    ]
    assert world.refunds == []


def test_a_lease_the_ledger_kept_as_a_run_ended_does_not_hold_up_the_threads_next_run(
    tmp_path: Path,
) -> None:
    """The ledger down as a run ends: the thread's lease stays in it (its release failed). The
    lease of a process that died is taken over at once; this process's own run that ended was
    waited out instead, so the thread's next message hung for the lease's 30 s. It is taken
    over at once (the run asks the ledger about it, as ever)."""
    config = {"configurable": {"thread_id": "t1"}}
    with _down_over_a_run(tmp_path) as (agent, _, _):
        seen: list[Any] = []
        second = threading.Thread(
            target=lambda: seen.append(
                agent.invoke({"messages": [("user", "thanks")]}, config, context=CTX)
            ),
            daemon=True,
        )
        second.start()
        second.join(timeout=20)  # the lease left behind holds for 30 s
        assert not second.is_alive(), "the next run waited out the lease its own process left"
    assert _pair(seen[0]["outcome"]) == ("success", "completed")


@pytest.mark.parametrize("entry", ["invoke", "astream-updates"])
def test_a_run_record_the_ledger_refused_is_written_once_it_is_back(
    tmp_path: Path, entry: str
) -> None:
    """A resume approved with the ledger down ends `error` (category `storage`: the refund
    could not be claimed, so it did not run), and its record could not be written: the run's
    record said `interrupted / awaiting_approval` for good, and the reviewer's approval was
    not in the audit log. Both are kept and written by the next run record once the ledger is
    back."""
    path = tmp_path / "keel.db"
    with _world(entry, f"sqlite:///{path}", tmp_path) as world:
        _waiting(world)
        fault = SqliteLedgerDown(world.ledger, path)
        fault.down()
        assert world.run(Command(resume=[{"type": "approve"}])) == ("error", "error")
        fault.up()
        assert world.run({"messages": [("user", "anything else?")]}) == ("success", "completed")
        audit = AuditLog(world.ledger).query(thread=world.thread)
        runs = RunLog(world.ledger).query()
    assert [(r.status, r.terminated_reason, r.error_category) for r in runs] == [
        ("error", "error", "storage"),
        ("success", "completed", None),
    ]
    assert ("approval", "approved") in [(a.kind, a.decision) for a in audit]
    assert world.refunds == []


def _router(messages: Any) -> Route:
    """Hands the user's message to billing, and finishes once billing answered."""
    last = messages[-1]
    return Route(agent=FINISH if last.type == "ai" else "billing", task=last.text)


@pytest.mark.parametrize("entry", ["invoke", "stream-updates", "astream-values"])
def test_a_supervisor_whose_ledger_is_down_as_a_new_message_drops_its_agents_calls(
    tmp_path: Path, entry: str
) -> None:
    """The same for a supervisor, whose agent waits for the human: the run ends `error /
    storage` with nothing written, and once the ledger is back the message drops the agent's
    call (audited once) and records both runs that waited `stopped / cancelled`."""
    path = tmp_path / "keel.db"
    with _world(entry, f"sqlite:///{path}", tmp_path) as world:
        opening = call("refund", order_id="A1")
        world.agent = build_supervisor(
            {"billing": _refund_agent(world, lambda m: opening if "A1" in m[-1].text else "ok")},
            _router,
            ledger=world.ledger,
            checkpointer=world.saver,
        )
        with contextlib.suppress(TypeError):  # a paused supervisor's state has no outcome
            world.run({"messages": [("user", "refund order A1")]})
        assert world.state().next == ("billing",)
        fault = SqliteLedgerDown(world.ledger, path)
        fault.down()
        assert world.run(DROP, keel_pending="not_run") == ("error", "storage")
        fault.up()
        assert world.state().next == ("billing",)  # its agent's call still waits
        assert world.run(DROP, keel_pending="not_run") == ("success", "completed")
        dropped, _ = _records(world)
        runs = [(r.graph, r.status, r.terminated_reason) for r in RunLog(world.ledger).query()]
    assert dropped == [("refund", "not_run")]
    assert runs.count(("keel_supervisor", "stopped", "cancelled")) == 1
    assert runs.count(("keel_agent", "stopped", "cancelled")) == 1
    assert ("keel_supervisor", "error", "storage") in runs  # the message that failed to start
    assert not [r for r in runs if r[1] == "interrupted"], runs
    assert world.refunds == []


@pytest.mark.parametrize("entry", ENTRIES)
def test_a_ledger_down_as_admission_control_takes_the_runs_slot_ends_the_run(
    tmp_path: Path, entry: str
) -> None:
    """With admission control, a run takes its slot in the ledger before it starts. With the
    ledger down there, a stream raised the driver's `StorageError` with no outcome (`invoke`
    ended the run, but told the caller to resume a thread that had nothing saved): every entry
    point now ends it `error / storage`, nothing of it written; once the ledger is back it runs,
    and the slot it did not get is no one's."""
    path = tmp_path / "keel.db"
    with _world(entry, f"sqlite:///{path}", tmp_path) as world:
        world.agent = build_agent(
            ScriptedChatModel(script=["Hello.", "Hello again."]),
            policy=Policy(admission=AdmissionPolicy(tenant_running=1)),
            ledger=world.ledger,
            checkpointer=world.saver,
        )
        world.ledger.setup()
        fault = SqliteLedgerDown(world.ledger, path)
        fault.down()
        assert world.run({"messages": [("user", "hi")]}) == ("error", "storage")
        fault.up()
        assert "send its input again" in world.outcome["detail"], world.outcome
        assert world.state().values == {}  # nothing of it was written
        assert world.run({"messages": [("user", "hi")]}) == ("success", "completed")
        assert world.run({"messages": [("user", "hi again")]}) == ("success", "completed")


def test_a_ledger_file_removed_mid_run_is_said_and_what_it_refused_is_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The SQLite ledger's file removed while keel has it open: its open connection went on
    writing into the removed file, so runs completed and nothing said their audit and run
    records were gone. Now each transaction finds the file gone and fails (a `StorageError`
    saying so, logged), the records are kept, and once the file is made again (`keel db
    setup`) the next run writes them there."""
    path = tmp_path / "keel.db"
    ledger = Ledger(f"sqlite:///{path}")
    config = {"configurable": {"thread_id": "t1"}}

    def remove() -> None:
        for f in tmp_path.glob("keel.db*"):
            f.unlink()

    with Persistence(f"sqlite:///{tmp_path}/checkpoints.db").checkpointer() as saver:
        agent = _lookup_agent(ledger, saver, [remove])
        first = agent.invoke({"messages": [("user", "where is A1?")]}, config, context=CTX)
        assert _pair(first["outcome"]) == ("success", "completed")
        assert "was removed while keel had it open" in caplog.text
        assert not path.exists()  # not made again, empty, behind the operator's back
        remade = Ledger(f"sqlite:///{path}")  # the operator's `keel db setup`
        remade.setup()
        remade.close()
        other = {"configurable": {"thread_id": "t2"}}
        second = agent.invoke({"messages": [("user", "where is A1?")]}, other, context=CTX)
        assert _pair(second["outcome"]) == ("success", "completed")
        runs = [(r.thread_id, r.terminated_reason) for r in RunLog(ledger).query()]
        audit = [(a.thread_id, a.tool) for a in AuditLog(ledger).query() if a.kind == "tool"]
    ledger.close()
    assert runs == [("t1", "completed"), ("t2", "completed")]
    assert audit == [("t1", "lookup"), ("t2", "lookup")]
