"""What a tool step costs the ledger, and that the shortcuts lose nothing.

Three shortcuts keep keel's production config cheap (`bench/guards_overhead.py`): the SQLite
checkpointer and the ledger queue on one lock per file instead of SQLite's millisecond busy
sleeps (`keel.db.writer_lock`); a check that only reads (a closed breaker letting a call
through, a task loading its user's standing approvals) runs with `Ledger.read`, outside any
transaction; and calls the permission gate lets
through untouched go straight from `call_model` to `execute_tools`, one superstep and one
checkpoint fewer per tool turn. These tests try to break each: a writer that holds the file,
a lock that is never released, a read that tries to write, a breaker that must still open and
close, a model that mixes allowed, denied and approval-bound calls.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypedDict

import psycopg
import pytest
from langchain_core.messages import AIMessage, ToolCall, ToolMessage
from langchain_core.tools import tool
from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime, get_runtime

from keel import Ledger, Persistence, RunContext, build_agent
from keel import tool as keel_tool
from keel._drive import Steps
from keel._node import RunnableCallable
from keel.db import ledger as ledger_module
from keel.db import writer_lock as writer_lock_module
from keel.db.ledger import Flow, read_ahead, together
from keel.db.writer_lock import writer_lock
from keel.errors import UserError
from keel.evals import ScriptedChatModel, call
from keel.guards import (
    BreakerPolicy,
    Budget,
    CircuitBreaker,
    CircuitOpen,
    LoopPolicy,
    PeriodBudget,
    Policy,
    RateLimit,
    Rule,
)
from keel.guards.standing import StandingStore


def _count(key: str) -> Flow[int]:
    rows = yield "SELECT COUNT(*) FROM keel_breakers WHERE key = ?", (key,)
    return int(rows[0][0])


def _insert(key: str) -> Flow[None]:
    yield "INSERT INTO keel_breakers (key) VALUES (?) ON CONFLICT DO NOTHING", (key,)


def _locked_read(key: str) -> Flow[None]:
    yield "SELECT failures FROM keel_breakers WHERE key = ? {for_update}", (key,)


# -- Ledger.read ----------------------------------------------------------------------------


async def test_a_read_sees_what_is_committed_and_refuses_to_write(ledger: Ledger) -> None:
    ledger.run(_insert("k"))
    assert ledger.read(_count("k")) == 1
    assert await ledger.aread(_count("k")) == 1
    for flow in (_insert("other"), _locked_read("k")):
        with pytest.raises(UserError, match=r"Ledger\.read runs only plain SELECTs"):
            ledger.read(flow)
    assert ledger.read(_count("other")) == 0  # the refused write never ran


def _both(key: str) -> Flow[tuple[int, int]]:
    """An upsert that returns the locked row, and a count that must see it: one round trip."""
    row, count = yield from together(
        (
            "INSERT INTO keel_breakers (key, failures) VALUES (?, 5) ON CONFLICT (key) "
            "DO UPDATE SET failures = keel_breakers.failures + 1 RETURNING failures",
            (key,),
        ),
        ("SELECT COUNT(*) FROM keel_breakers WHERE key = ?", (key,)),
    )
    return int(row[0][0]), int(count[0][0])


async def test_statements_run_together_each_get_their_rows(ledger: Ledger) -> None:
    """`together` statements go in one query on PostgreSQL: each still sees the ones before
    it, and each gets its own rows (sync and async, inside a transaction and in a read)."""
    assert ledger.run(_both("t")) == (5, 1)
    assert await ledger.arun(_both("t")) == (6, 1)

    def reads() -> Flow[list[list[Any]]]:
        return (yield from together(("SELECT 1", ()), ("SELECT 2, 3", ())))

    assert ledger.read(reads()) == [[(1,)], [(2, 3)]]
    assert await ledger.aread(reads()) == [[(1,)], [(2, 3)]]

    def sneaky() -> Flow[Any]:
        return (yield from together(("SELECT 1", ()), ("DELETE FROM keel_breakers", ())))

    with pytest.raises(UserError, match=r"Ledger\.read runs only plain SELECTs"):
        ledger.read(sneaky())
    assert ledger.read(_count("t")) == 1  # nothing was deleted


async def test_together_without_statements_is_refused(ledger: Ledger) -> None:
    """A flow author's mistake: refused at the call, and the transaction it was in rolls back."""
    refused = r"together\(\.\.\.\) needs one statement or more, got none"
    with pytest.raises(UserError, match=refused):
        together()

    def empty() -> Flow[Any]:
        yield from _insert("e")  # on PostgreSQL it waits to travel with the next statement
        return (yield from together())

    with pytest.raises(UserError, match=refused):
        ledger.run(empty())
    with pytest.raises(UserError, match=refused):
        await ledger.arun(empty())
    assert ledger.read(_count("e")) == 0  # neither transaction wrote its insert


async def test_read_ahead_sends_a_check_with_a_flow_s_first_step(ledger: Ledger) -> None:
    """`read_ahead`: the check's rows, then the rest of the flow, whatever its first step is
    (a statement, a `together`, or none at all)."""
    check = ("SELECT COUNT(*) FROM keel_breakers", ())

    def then(flow: Flow[Any]) -> Flow[tuple[Any, Any]]:
        rows, rest = yield from read_ahead(check, flow)
        return rows, (yield from rest)

    def nothing() -> Flow[str]:
        yield from ()
        return "none"

    assert ledger.run(then(_both("ra"))) == ([(0,)], (5, 1))  # the check ran first
    assert ledger.run(then(_count("ra"))) == ([(1,)], 1)
    assert await ledger.arun(then(nothing())) == ([(1,)], "none")


async def test_a_read_leaves_the_scopes_deferred_records_for_its_next_transaction(
    ledger: Ledger,
) -> None:
    with ledger.batch():
        ledger.defer(_insert("k"))
        assert ledger.read(_count("k")) == 0  # not committed yet, and not taken
        assert ledger.deferred == 1
    assert ledger.read(_count("k")) == 1  # the scope's end committed it


def test_a_closed_breaker_lets_calls_through_while_another_process_writes(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path}/keel.db"
    ledger = Ledger(url)
    breaker = CircuitBreaker(ledger, BreakerPolicy(failure_threshold=1, cooldown_seconds=60))
    ledger.setup()
    writer = sqlite3.connect(tmp_path / "keel.db", isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # another process holds the file's write lock
    done: list[Any] = []
    thread = threading.Thread(target=lambda: done.append(breaker.before("tool:x")))
    thread.start()
    thread.join(timeout=10)
    try:
        assert done == [None], "a closed breaker's check waited for the writer"
    finally:
        writer.execute("ROLLBACK")
        thread.join()
    # a change still goes through a transaction: the failure opens it, the next call is refused
    breaker.record("tool:x", ok=False)
    with pytest.raises(CircuitOpen):
        breaker.before("tool:x")
    ledger.close()


def test_standing_approvals_load_while_another_process_writes(tmp_path: Path) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path}/keel.db")
    ledger.setup()
    writer = sqlite3.connect(tmp_path / "keel.db", isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # another process holds the file's write lock
    done: list[Any] = []
    context = RunContext(user_id="u1", tenant_id="acme")
    thread = threading.Thread(target=lambda: done.append(StandingStore(ledger).load(context)))
    thread.start()
    thread.join(timeout=10)
    try:
        assert done == [{}], "loading standing approvals waited for the writer"
    finally:
        writer.execute("ROLLBACK")
        thread.join()
    ledger.close()


# -- the writer lock ------------------------------------------------------------------------


def test_one_lock_per_file_whatever_its_spelling(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    path = tmp_path / "keel.db"
    assert writer_lock(path) is writer_lock(str(tmp_path / "sub" / ".." / "keel.db"))
    assert writer_lock(path) is not writer_lock(tmp_path / "other.db")
    with Persistence(f"sqlite:///{path}").checkpointer() as saver:
        assert saver.lock is writer_lock(path)  # type: ignore[attr-defined]


def test_the_ledger_waits_for_the_checkpointer_then_commits(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/keel.db"
    ledger = Ledger(url)
    ledger.setup()
    events: list[str] = []
    with Persistence(url).checkpointer() as saver:
        lock = saver.lock  # type: ignore[attr-defined]
        with lock:  # the checkpointer is writing

            def commit() -> None:
                ledger.run(_insert("k"))
                events.append("ledger committed")

            thread = threading.Thread(target=commit)
            thread.start()
            thread.join(timeout=0.2)
            events.append("checkpointer done")
        thread.join(timeout=10)
    assert events == ["checkpointer done", "ledger committed"]
    assert ledger.read(_count("k")) == 1
    ledger.close()


def test_a_lock_never_released_delays_the_ledger_but_does_not_stop_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("keel.db.ledger.WAIT", 0.05)
    assert writer_lock_module.WAIT == 0.5  # the default the ledger gives a checkpointer write
    ledger = Ledger(f"sqlite:///{tmp_path}/keel.db")
    ledger.setup()
    held = threading.Event()
    release = threading.Event()

    def hold() -> None:  # a thread that took the lock and hangs (no database lock held)
        with writer_lock(tmp_path / "keel.db"):
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(5)
    try:
        ledger.run(_insert("k"))  # SQLite's own locking still guards the file
        assert ledger.read(_count("k")) == 1
    finally:
        release.set()
        holder.join()
        ledger.close()


# -- the gate's pass-through ----------------------------------------------------------------


@tool
def lookup(q: str) -> str:
    """Look something up."""
    return f"found {q}"


RAN: list[str] = []


@tool
def wipe(target: str) -> str:
    """Delete everything (denied by the policy)."""
    RAN.append(target)
    return "wiped"


@tool
def refund(order: str) -> str:
    """Refund an order (needs a human)."""
    RAN.append(order)
    return "refunded"


POLICY = Policy(
    rules=(
        Rule(tool="lookup", action="allow"),
        Rule(tool="refund", action="ask"),
        Rule(tool="wipe", action="deny"),
    )
)


def _nodes(agent: Any, thread: str) -> list[str]:
    config = {"configurable": {"thread_id": thread}}
    steps = agent.stream(
        {"messages": [("user", "go")]}, config, context=RunContext(), stream_mode="updates"
    )
    return [name for chunk in steps for name in chunk]


def test_allowed_calls_skip_the_gate_node_and_its_checkpoint(tmp_path: Path) -> None:
    def saved(saver: Any, steps: int) -> tuple[list[str], int]:
        turns = [*(call("lookup", q=str(i)) for i in range(steps)), "done"]
        agent = build_agent(ScriptedChatModel(script=turns), [lookup, wipe, refund], policy=POLICY,
                            checkpointer=saver)  # fmt: skip
        nodes = _nodes(agent, f"t{steps}")
        assert "tool_gate" in agent.get_graph().nodes  # still there for what it must decide
        return nodes, len(list(saver.list({"configurable": {"thread_id": f"t{steps}"}})))

    with Persistence(f"sqlite:///{tmp_path}/keel.db").checkpointer() as saver:
        (nodes, two), (_, one) = saved(saver, 2), saved(saver, 1)
    assert "tool_gate" not in nodes
    assert nodes.count("execute_tools") == 2
    assert two - one == 2  # per tool turn: call_model's checkpoint and execute_tools'


@pytest.mark.parametrize(
    ("turn", "expected"),
    [
        # a hostile model mixes a denied call into an allowed one, with odd spellings
        ([("lookup", {"q": "a"}), ("wipe", {"target": "db"})], ["success", "denied"]),
        ([("WIPE", {"target": "db"}), ("lookup", {"q": "a"})], ["unknown_tool", "success"]),
        ([("wipe", {"target": "db"})], ["denied"]),
    ],
)
def test_a_call_the_gate_refuses_never_runs(turn: Any, expected: list[str]) -> None:
    RAN.clear()
    calls = [ToolCall(name=n, args=a, id=None) for n, a in turn]
    model = ScriptedChatModel(script=[AIMessage(content="", tool_calls=calls), "ok"])
    agent: Any = build_agent(model, [lookup, wipe, refund], policy=POLICY)
    result = agent.invoke({"messages": [("user", "go")]}, {}, context=RunContext())
    statuses = [
        m.response_metadata.get("keel_status", m.status)
        for m in result["messages"]
        if isinstance(m, ToolMessage)
    ]
    assert statuses == expected
    assert RAN == []


def test_a_call_that_needs_a_human_still_stops_at_the_gate(tmp_path: Path) -> None:
    RAN.clear()
    calls = [ToolCall(name="lookup", args={"q": "a"}, id=None),
             ToolCall(name="refund", args={"order": "A1"}, id=None)]  # fmt: skip
    model = ScriptedChatModel(script=[AIMessage(content="", tool_calls=calls), "ok"])
    with Persistence(f"sqlite:///{tmp_path}/keel.db").checkpointer() as saver:
        agent = build_agent(model, [lookup, wipe, refund], policy=POLICY, checkpointer=saver)
        nodes = _nodes(agent, "t1")
        state = agent.get_state({"configurable": {"thread_id": "t1"}})
    assert nodes[-2:] == ["tool_gate", "__interrupt__"]  # human_review waits for the human
    assert state.values["outcome"]["status"] == "interrupted"
    assert RAN == []  # neither call ran: the turn waits for the human as a whole


# -- what a tool step writes with everything on ---------------------------------------------


@keel_tool(name="echo", risk="write")
def echo(x: int) -> str:
    """Return x (a side effect to keel: claimed before and recorded after it runs)."""
    return f"echo {x}"


ALL_ON = Policy(  # bench/guards_overhead.py's ALL_ON_POLICY
    name="bench-all-on",
    budget=Budget(model_calls=100, tool_calls=100, usd=100),
    rules=(Rule(tool="echo", action="allow"), Rule(tool="refund", action="ask")),
    loop=LoopPolicy(max_repeats=50),
    period_budgets=(PeriodBudget(scope="user", period="month", usd=1_000_000),),
    rate_limits=(RateLimit(rpm=1_000_000, tpm=1_000_000_000),),
    model_breaker=BreakerPolicy(),
    tool_breaker=BreakerPolicy(),
)


def _per_tool_step(
    ledger: Ledger, saver: Any, counts: Callable[[], dict[str, int]], k: int
) -> dict[str, float]:
    """What `counts()` counts per everything-on tool step: (a k-step run - a 0-step run) / k."""
    seen = []
    for steps in (0, k):
        turns = [*(call("echo", x=i) for i in range(steps)), "done"]
        agent: Any = build_agent(ScriptedChatModel(script=turns), [echo, refund], policy=ALL_ON,
                                 ledger=ledger, checkpointer=saver)  # fmt: skip
        before = counts()
        config = {"configurable": {"thread_id": f"t{steps}"}}
        context = RunContext(user_id="u1", tenant_id="acme")
        result = agent.invoke({"messages": [("user", "go")]}, config, context=context)
        assert result["outcome"]["terminated_reason"] == "completed"
        seen.append({key: n - before[key] for key, n in counts().items()})
    return {key: (seen[1][key] - seen[0][key]) / k for key in seen[0]}


def _counted(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    counts = {"transactions": 0, "reads": 0}
    run_sqlite = ledger._run_sqlite

    def counting(flow: Any, *, transaction: bool = True) -> Any:
        counts["transactions" if transaction else "reads"] += 1
        return run_sqlite(flow, transaction=transaction)

    monkeypatch.setattr(ledger, "_run_sqlite", counting)
    return counts


def test_a_tool_step_with_everything_on_makes_four_transactions_and_no_other_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path}/keel.db"
    ledger = Ledger(url)
    ledger.setup()
    counts = _counted(ledger, monkeypatch)
    with Persistence(url).checkpointer() as saver:
        per_step = _per_tool_step(ledger, saver, lambda: dict(counts), k=2)
    # README: "4 transactions"; the tool's breaker is read in its claim's, not apart
    assert per_step == {"transactions": 4, "reads": 0}
    ledger.close()


def _round_trips(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the queries the ledger sends to PostgreSQL, each one round trip.

    A transaction's go through its `ClientCursor` (`_sent`: the queued writes with the next
    read, `BEGIN` with the first, `COMMIT` with the last writes or apart; only the ledger uses
    a `ClientCursor`); a plain read's (`Ledger.read`) through `_fetch_pg`, one per statement.
    """
    counts = {"in transactions": 0, "plain reads": 0}
    execute, fetch = psycopg.ClientCursor.execute, ledger_module._fetch_pg

    def executing(self: psycopg.ClientCursor[Any], query: Any, *args: Any, **kwargs: Any) -> Any:
        counts["in transactions"] += 1
        return execute(self, query, *args, **kwargs)

    def fetching(cur: Any, sql: str, params: tuple[Any, ...]) -> Steps[list[Any]]:
        if sql is not ledger_module._TOGETHER:  # each of a `together`'s statements is counted
            counts["plain reads"] += 1
        return (yield from fetch(cur, sql, params))

    monkeypatch.setattr(psycopg.ClientCursor, "execute", executing)
    monkeypatch.setattr(ledger_module, "_fetch_pg", fetching)
    return counts


@pytest.mark.postgres
def test_a_tool_step_with_everything_on_takes_eight_round_trips_on_postgres(
    fresh_postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 4 transactions' 8 queries (a write nobody reads travels with the next read, or with
    `COMMIT`; the tool breaker's row is read with the claim's first statement): README's "an
    everything-on tool step: 8 round trips"."""
    ledger = Ledger(fresh_postgres_url)
    ledger.setup()
    counts = _round_trips(monkeypatch)
    with Persistence(fresh_postgres_url).checkpointer() as saver:
        per_step = _per_tool_step(ledger, saver, lambda: dict(counts), k=3)
    assert per_step == {"in transactions": 8, "plain reads": 0}
    ledger.close()


def test_a_rate_limit_that_refuses_releases_the_reservation_it_committed_with(
    tmp_path: Path,
) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path}/keel.db")
    policy = Policy(
        rules=(Rule(tool="echo", action="allow"),),
        period_budgets=(PeriodBudget(scope="user", period="month", usd=1_000),),
        rate_limits=(RateLimit(rpm=1, max_wait=0),),
    )
    agent: Any = build_agent(
        ScriptedChatModel(script=[call("echo", x=1), "done"]), [echo], policy=policy,
        ledger=ledger,
    )  # fmt: skip
    result = agent.invoke({"messages": [("user", "go")]}, {}, context=RunContext())
    assert result["outcome"]["status"] == "error"  # the second call found no room
    assert "Rate limit" in result["outcome"]["detail"]
    held = ledger.read(_reserved())
    assert held == 0  # the refused call's reservation went with its refusal
    ledger.close()


def _reserved() -> Flow[int]:
    rows = yield "SELECT COUNT(*) FROM keel_reservations", ()
    return int(rows[0][0])


class _Tiny(TypedDict):
    x: int


def test_langgraph_pin_a_route_without_tracing_gets_the_runtime_only_as_a_parameter() -> None:
    # keel's routes are RunnableCallable(..., trace=False) (keel.observe.observer.recorded):
    # inside one, LangGraph's get_runtime() / get_config() raise, so the gate's pass-through
    # takes `runtime` as a parameter (`with_runtime`). A plain function route may call it.
    seen: dict[str, Any] = {}

    def calls_get_runtime(state: _Tiny) -> str:
        try:
            seen["runtime"] = get_runtime()
        except RuntimeError as exc:
            seen["error"] = str(exc)
        return END

    def takes_runtime(state: _Tiny, runtime: Runtime[Any]) -> str:
        seen["runtime"] = runtime
        return END

    def run(route: Any) -> dict[str, Any]:
        seen.clear()
        graph = StateGraph(_Tiny)
        graph.add_node("a", lambda s: {"x": 1})
        graph.add_edge(START, "a")
        graph.add_conditional_edges("a", route, [END])
        graph.compile().invoke({"x": 0})
        return dict(seen)

    assert isinstance(run(calls_get_runtime).get("runtime"), Runtime)
    untraced = run(RunnableCallable(calls_get_runtime, name="r", trace=False))
    assert "outside of a runnable context" in untraced["error"]
    assert isinstance(
        run(RunnableCallable(takes_runtime, name="r", trace=False))["runtime"], Runtime
    )


def test_sqlite_pin_switching_to_wal_fails_at_once_while_another_connection_writes(
    tmp_path: Path,
) -> None:
    # no busy handler: `timeout=` does not help, so several workers starting together on a
    # fresh ledger file failed ("database is locked"); keel's ledger tries again (`_to_wal`)
    path = tmp_path / "fresh.db"
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    writer.execute("CREATE TABLE t (x)")
    writer.execute("BEGIN IMMEDIATE")
    other = sqlite3.connect(path, isolation_level=None, timeout=30)
    with pytest.raises(sqlite3.OperationalError, match="database is locked"):
        other.execute("PRAGMA journal_mode=WAL")
    released = threading.Timer(0.2, lambda: writer.execute("ROLLBACK"))
    released.start()
    ledger = Ledger(f"sqlite:///{path}")
    ledger.setup()  # waits for the writer instead of failing
    released.join()
    assert ledger.read(_count("k")) == 0
    ledger.close()
    other.close()
    writer.close()
