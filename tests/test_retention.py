"""Checkpoint retention (`Persistence.prune`, `keel threads prune`) on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import operator
import time
from datetime import timedelta
from typing import Annotated, Any, Literal, TypedDict

import pytest
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, interrupt

from keel import Ledger, RunContext
from keel.app.cli import main as keel_main
from keel.db.checkpoint.retention import PruneReport, _id_time
from keel.db.persistence import Persistence
from keel.errors import UserError
from keel.guards import PeriodBudget
from keel.guards.spend import Reservation, charge_flow, reserve_flow, settle_flow, spent_flow

Mode = Literal["sync", "async"]
STEPS = 6


class State(TypedDict, total=False):
    n: Annotated[list[int], operator.add]
    answer: str


def _count(state: State) -> State:
    return {"n": [len(state.get("n", []))]}


def _ask(state: State) -> State:
    return {"answer": interrupt("approve?")}


def _graph(*, ask: bool = False) -> Any:
    builder = StateGraph(State)
    builder.add_node("count", _count)
    builder.add_node("ask", _ask)
    builder.add_edge(START, "count")
    done = "ask" if ask else END
    builder.add_conditional_edges(
        "count", lambda s: "count" if len(s["n"]) < STEPS else done, ["count", done]
    )
    builder.add_edge("ask", END)
    return builder


def _config(thread: str) -> Any:
    return {"configurable": {"thread_id": thread}}


async def _run(url: str, thread: str, graph_input: Any, *, ask: bool = False) -> Any:
    async with Persistence(url).acheckpointer() as saver:
        graph = _graph(ask=ask).compile(checkpointer=saver)
        return await graph.ainvoke(graph_input, _config(thread))


async def _snapshot(url: str, thread: str) -> tuple[Any, Any, Any, int]:
    """(values, next, interrupts, number of checkpoints) of a thread."""
    async with Persistence(url).acheckpointer() as saver:
        graph = _graph(ask=True).compile(checkpointer=saver)
        state = await graph.aget_state(_config(thread))
        history = [s async for s in graph.aget_state_history(_config(thread))]
        interrupts = [(i.value, i.id) for i in state.interrupts]
        return state.values, state.next, interrupts, len(history)


async def _prune(url: str, mode: Mode, **kwargs: Any) -> PruneReport:
    if mode == "sync":
        return await asyncio.to_thread(Persistence(url).prune, **kwargs)
    return await Persistence(url).aprune(**kwargs)


async def _rows(url: str) -> dict[str, int]:
    """Row counts of LangGraph's tables."""
    async with Persistence(url).acheckpointer() as saver:
        if hasattr(saver, "conn") and not hasattr(saver.conn, "execute"):  # the Postgres pool
            tables = ("checkpoints", "checkpoint_writes", "checkpoint_blobs")
            async with saver.conn.connection() as conn:
                return {
                    t: (await (await conn.execute(f"SELECT count(*) AS c FROM {t}")).fetchone())[
                        "c"
                    ]
                    for t in tables
                }
        counts = {}
        for t in ("checkpoints", "writes"):
            cur = await saver.conn.execute(f"SELECT count(*) FROM {t}")
            counts[t] = (await cur.fetchone())[0]
        return counts


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_keep_last_trims_old_checkpoints_and_keeps_state(db_url: str, mode: Mode) -> None:
    for thread in ("a", "b"):
        await _run(db_url, thread, {"n": []})
    before = {t: await _snapshot(db_url, t) for t in ("a", "b")}
    rows_before = await _rows(db_url)

    dry = await _prune(db_url, mode, keep_last=2, dry_run=True)
    assert await _rows(db_url) == rows_before  # a dry run deletes nothing
    report = await _prune(db_url, mode, keep_last=2)

    assert dry == PruneReport(**{**_fields(report), "dry_run": True})  # it reported exactly
    assert report.threads_trimmed == ("a", "b") and report.threads_deleted == ()
    rows_after = await _rows(db_url)
    assert rows_before["checkpoints"] - rows_after["checkpoints"] == report.checkpoints_deleted
    assert report.checkpoints_deleted == 2 * (before["a"][3] - 2)
    writes = "writes" if "writes" in rows_after else "checkpoint_writes"
    assert rows_before[writes] - rows_after[writes] == report.writes_deleted > 0
    if "checkpoint_blobs" in rows_after:
        assert rows_before["checkpoint_blobs"] - rows_after["checkpoint_blobs"] == (
            report.blobs_deleted
        )
        assert report.blobs_deleted > 0
    for thread in ("a", "b"):
        values, nxt, interrupts, count = await _snapshot(db_url, thread)
        assert (values, nxt, interrupts, count) == (*before[thread][:3], 2)
    again = await _prune(db_url, mode, keep_last=2)
    assert (again.threads_trimmed, again.checkpoints_deleted) == ((), 0)


@pytest.mark.postgres
async def test_postgres_blobs_left_are_exactly_those_still_referenced(
    fresh_postgres_url: str,
) -> None:
    for thread in ("a", "b"):
        await _run(fresh_postgres_url, thread, {"n": []})
    await Persistence(fresh_postgres_url).aprune(keep_last=1)
    persistence = Persistence(fresh_postgres_url)
    async with persistence.acheckpointer() as saver, saver.conn.connection() as conn:  # type: ignore[attr-defined]
        unreferenced = await (
            await conn.execute(
                "SELECT b.thread_id, b.channel, b.version FROM checkpoint_blobs b "
                "WHERE NOT EXISTS (SELECT 1 FROM checkpoints c WHERE c.thread_id = b.thread_id"
                " AND c.checkpoint_ns = b.checkpoint_ns"
                " AND c.checkpoint -> 'channel_versions' ->> b.channel = b.version)"
            )
        ).fetchall()
        missing = await (
            await conn.execute(
                "SELECT c.thread_id, v.key FROM checkpoints c, "
                "jsonb_each_text(c.checkpoint -> 'channel_versions') v "
                "WHERE v.key = 'n' AND NOT EXISTS (SELECT 1 FROM checkpoint_blobs b "
                "WHERE b.thread_id = c.thread_id AND b.channel = v.key "
                "AND b.version = v.value)"
            )
        ).fetchall()
    assert unreferenced == [] and missing == []


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_pending_interrupt_survives_and_resumes(db_url: str, mode: Mode) -> None:
    paused = await _run(db_url, "waiting", {"n": []}, ask=True)
    assert paused["__interrupt__"][0].value == "approve?"
    await _run(db_url, "done", {"n": []})
    before = await _snapshot(db_url, "waiting")
    await asyncio.sleep(0.01)

    report = await _prune(db_url, mode, keep_last=1, idle_ttl=0.005)

    assert report.threads_deleted == ("done",)
    assert report.threads_skipped == (("waiting", "idle but waiting on an interrupt"),)
    values, nxt, interrupts, count = await _snapshot(db_url, "waiting")
    assert (values, nxt, interrupts) == before[:3] and nxt == ("ask",) and count == 1
    assert (await _snapshot(db_url, "done"))[3] == 0
    resumed = await _run(db_url, "waiting", Command(resume="yes"), ask=True)
    assert resumed == {"n": list(range(STEPS)), "answer": "yes"}


async def test_idle_ttl_keeps_recent_threads(db_url: str) -> None:
    await _run(db_url, "recent", {"n": []})
    report = await Persistence(db_url).aprune(idle_ttl=timedelta(days=1))
    assert report == PruneReport(dry_run=False)
    assert report.summary() == (
        "deleted 0 idle threads; trimmed 0 threads; 0 checkpoints, 0 writes, 0 blobs"
    )


def test_arguments_are_checked(tmp_path: Any) -> None:
    persistence = Persistence(f"sqlite:///{tmp_path}/k.db")
    with pytest.raises(UserError, match=r"prune\(\) needs keep_last=N .* and/or idle_ttl"):
        persistence.prune()
    with pytest.raises(UserError, match=r"prune\(keep_last=\.\.\.\) must be None or an integer"):
        persistence.prune(keep_last=0)
    with pytest.raises(UserError, match=r"prune\(idle_ttl=\.\.\.\) must be None, positive"):
        persistence.prune(idle_ttl=-1)


def test_checkpoint_ids_carry_their_time(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path}/k.db"
    asyncio.run(_run(url, "t", {"n": []}))
    with Persistence(url).checkpointer() as saver:
        tup = saver.get_tuple(_config("t"))
    assert tup is not None
    from datetime import datetime

    written = datetime.fromisoformat(tup.checkpoint["ts"]).timestamp()
    assert abs((_id_time(tup.checkpoint["id"]) or 0) - written) < 0.01
    assert _id_time("not-a-uuid") is None
    assert _id_time("9f1c6a4e-4d8a-4b7e-9f3a-1c2b3d4e5f60") is None  # version 4: never idle


def test_cli_threads_prune(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    asyncio.run(_run(db_url, "t1", {"n": []}))
    assert keel_main(["threads", "prune", "--keep", "1", "--dry-run", "--db", db_url]) == 0
    assert capsys.readouterr().out.startswith("keel: dry run: would delete 0 idle threads; ")
    assert keel_main(["threads", "prune", "--keep", "1", "--db", db_url]) == 0
    out = capsys.readouterr().out
    assert out.startswith("keel: deleted 0 idle threads; trimmed 1 threads; ")
    assert keel_main(["threads", "prune", "--db", db_url]) == 2
    assert "needs --keep N and/or --idle-days D" in capsys.readouterr().err


def _fields(report: PruneReport) -> dict[str, Any]:
    return {name: getattr(report, name) for name in PruneReport.__dataclass_fields__}


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_prune_releases_expired_budget_reservations(db_url: str, mode: Mode) -> None:
    ledger = Ledger(db_url)
    budget = PeriodBudget(scope="user", period="month", usd=10, reservation_ttl=60)
    ctx = RunContext(user_id="u1", tenant_id="acme")
    now = time.time()
    # A process that died mid-call left its reservation behind (reserved 2 minutes ago)...
    stale = ledger.run(reserve_flow([budget], ctx, 4.0, 400, now - 120))
    # ...and a call in flight holds a live one...
    live = ledger.run(reserve_flow([budget], ctx, 3.0, 300, now))
    # ...and one of a run that looked dead was charged by a call it crowded: spent.
    charged = ledger.run(reserve_flow([budget], ctx, 1.0, 100, now - 120))
    assert isinstance(stale, Reservation) and isinstance(live, Reservation)
    assert isinstance(charged, Reservation) and ledger.run(charge_flow(charged.rows[0][0]))

    def held() -> set[Any]:
        return {r[0] for r in ledger.run(_rows_flow("SELECT id FROM keel_reservations"))}

    assert len(held()) == 3
    dry = await _prune(db_url, mode, keep_last=5, dry_run=True)
    assert dry.reservations_released == 1 and len(held()) == 3  # a dry run deletes nothing
    report = await _prune(db_url, mode, keep_last=5)
    assert report.reservations_released == 1
    assert "released 1 expired budget reservations" in report.summary()
    assert held() == {live.rows[0][0], charged.rows[0][0]}  # the live and the charged kept
    assert ledger.run(spent_flow(budget, ctx, now)) == (1.0, 100)  # released: nothing spent
    # The stale call finishes after all: its cost still settles, once.
    ledger.run(settle_flow(stale, 1.5, 150))
    ledger.run(settle_flow(live, 2.0, 200))
    assert ledger.run(spent_flow(budget, ctx, now)) == (4.5, 450)
    assert held() == {charged.rows[0][0]}
    again = await _prune(db_url, mode, keep_last=5)
    assert again.reservations_released == 0
    ledger.close()


def _rows_flow(sql: str) -> Any:
    rows = yield (sql, ())
    return rows
