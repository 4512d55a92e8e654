"""One ledger transaction per node: deferred records, the save watch, reused tool threads.

keel defers the records a node writes after its model or tool call (a rate refund, a breaker's
success, a tool call's result) to the node's next ledger transaction, or to the end of the
node. These tests try to lose them: a scope that raises, a second process reading before and
after, a read in the same scope that must see them, a claim that must still commit to disk.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from conftest import eventually

from keel import Ledger
from keel.db.checkpoint.saved import SaveWatch
from keel.db.ledger import Flow
from keel.nodes import _threads as threads
from keel.nodes._threads import start_daemon


def _bump(key: str) -> Flow[None]:
    """A record: one more failure on breaker `key` (a row any reader can count)."""
    yield "INSERT INTO keel_breakers (key) VALUES (?) ON CONFLICT DO NOTHING", (key,)
    yield "UPDATE keel_breakers SET failures = failures + 1 WHERE key = ?", (key,)


def _failures(key: str) -> Flow[int]:
    rows = yield "SELECT failures FROM keel_breakers WHERE key = ?", (key,)
    return int(rows[0][0]) if rows else 0


def _show_sync(flow: Flow[Any]) -> Flow[str]:
    yield from flow
    rows = yield "SHOW synchronous_commit", ()
    return str(rows[0][0])


async def test_deferred_records_wait_for_the_scopes_next_transaction(ledger: Ledger) -> None:
    other = Ledger(ledger.url)  # another process's view: its own connections
    try:
        with ledger.batch():
            ledger.defer(_bump("k"))
            ledger.defer(_bump("k"))
            assert ledger.deferred == 2
            assert other.run(_failures("k")) == 0  # not written yet
            # the scope's next transaction runs them first: its read sees both
            assert ledger.run(_failures("k")) == 2
            assert ledger.deferred == 0
            assert other.run(_failures("k")) == 2  # and committed them
            ledger.defer(_bump("k"))
        assert other.run(_failures("k")) == 3  # the scope's end commits the rest
    finally:
        other.close()


async def test_a_scope_that_raises_still_commits_its_records(ledger: Ledger) -> None:
    with pytest.raises(RuntimeError, match="the node failed"), ledger.batch():
        ledger.defer(_bump("k"))
        raise RuntimeError("the node failed after its tool ran")
    assert ledger.run(_failures("k")) == 1


async def test_async_scopes_commit_their_records_too(ledger: Ledger) -> None:
    with pytest.raises(RuntimeError):
        async with ledger.abatch():
            await ledger.adefer(_bump("k"))
            await ledger.adefer(_bump("k"))
            assert await ledger.arun(_failures("k")) == 2
            await ledger.adefer(_bump("k"))
            raise RuntimeError("boom")
    assert await ledger.arun(_failures("k")) == 3


async def test_outside_a_scope_a_record_is_written_at_once(ledger: Ledger) -> None:
    ledger.defer(_bump("k"))
    await ledger.adefer(_bump("k"))
    assert not ledger.batching and ledger.deferred == 0
    assert ledger.run(_failures("k")) == 2


async def test_nested_scopes_join_the_outer_one(ledger: Ledger) -> None:
    other = Ledger(ledger.url)
    try:
        with ledger.batch():
            with ledger.batch():
                ledger.defer(_bump("k"))
            assert ledger.deferred == 1  # the inner scope's end did not commit it
            assert other.run(_failures("k")) == 0
        assert other.run(_failures("k")) == 1
    finally:
        other.close()


async def test_a_scope_does_not_defer_another_ledgers_records(ledger: Ledger) -> None:
    other = Ledger(ledger.url)
    try:
        with ledger.batch():
            other.defer(_bump("k"))  # no scope of `other` is open: written now
            assert not other.batching
            assert ledger.run(_failures("k")) == 1
    finally:
        other.close()


@pytest.mark.postgres
async def test_a_claim_commits_the_records_before_it_synchronously(
    fresh_postgres_url: str,
) -> None:
    """Records deferred before a claim share its transaction, flushed to disk before the tool."""
    from keel.db.idempotency import claim_flow

    ledger = Ledger(fresh_postgres_url)
    try:
        with ledger.batch():
            ledger.defer(_bump("k"))
            assert ledger.run(_show_sync(claim_flow("t", "c1", "charge", "d"))) == "on"
        assert ledger.run(_failures("k")) == 1
        with ledger.batch():
            ledger.defer(_bump("k"))
            assert ledger.run(_show_sync(_failures("k"))) == "off"
    finally:
        ledger.close()


def test_a_save_reported_by_another_thread_ends_the_wait() -> None:
    watch = SaveWatch()
    key = ("thread", "", "checkpoint-1")
    got: list[bool] = []
    waiter = threading.Thread(target=lambda: got.append(watch.wait([key], 3600)), daemon=True)
    waiter.start()
    eventually(lambda: len(watch._changed._waiters) == 1, "the waiter to wait")  # type: ignore[attr-defined]
    watch.saved(key)
    waiter.join(60)  # (a guard: not woken, it would wait an hour)
    assert got == [True]  # woken, not timed out
    assert not watch.wait([("thread", "", "never-saved")], 0.05)
    assert watch.wait([("thread", "", "other"), key], 0)  # remembered; any key will do


async def test_an_async_wait_ends_when_the_save_is_reported() -> None:
    watch = SaveWatch()
    key = ("thread", "", "checkpoint-1")
    loop = asyncio.get_running_loop()
    loop.call_later(0.05, watch.saved, key)
    assert await watch.await_([("thread", "", "other"), key], 5.0)
    assert not await watch.await_([("thread", "", "other")], 0.05)
    assert not watch._waiters  # a timed-out waiter leaves nothing behind


def test_keels_saver_reports_what_it_saves_and_loads(tmp_path: Any) -> None:
    from keel import Persistence, build_agent
    from keel.evals import ScriptedChatModel

    with Persistence(f"sqlite:///{tmp_path}/k.db").checkpointer() as saver:
        agent = build_agent(ScriptedChatModel(script=["hi"]), checkpointer=saver)
        config = {"configurable": {"thread_id": "t1"}}
        agent.invoke({"messages": [("user", "hello")]}, config)
        latest = saver.get_tuple(config)
        assert latest is not None
        conf = latest.config["configurable"]
        watch = saver.keel_saves  # type: ignore[attr-defined]
        assert watch.wait([("t1", conf.get("checkpoint_ns", ""), conf["checkpoint_id"])], 0)


def test_a_saved_request_ends_the_wait_but_an_edited_one_does_not() -> None:
    """The wait for a side effect may end early only on a saved checkpoint whose newest
    message is the very request: same message id *and* the same calls and arguments."""
    from langchain_core.messages import AIMessage

    from keel.db.checkpoint.saved import newest_message, request_key

    config = {"configurable": {"thread_id": "t1", "checkpoint_ns": "", "checkpoint_id": "c2"}}
    asked = AIMessage(
        content="",
        id="m1",
        tool_calls=[{"name": "charge", "args": {"amount": 5}, "id": "tc1", "type": "tool_call"}],
    )
    edited = asked.model_copy(
        update={
            "tool_calls": [
                {"name": "charge", "args": {"amount": 500}, "id": "tc1", "type": "tool_call"}
            ]
        }
    )
    watch = SaveWatch()
    watch.saved(request_key(config, newest_message({"messages": ["hi", asked]})))
    assert watch.wait([request_key(config, asked)], 0)
    edited_key = request_key(config, edited)
    assert edited_key is not None and not watch.wait([edited_key], 0)
    assert request_key(config, AIMessage(content="no calls", id="m2")) is None
    assert newest_message({}) is None


def test_a_hung_tool_thread_never_delays_the_next_call() -> None:
    release = threading.Event()
    ran = threading.Event()
    names: list[str] = []
    start_daemon(lambda: release.wait(3600), "keel-tool-hung")
    start_daemon(lambda: (names.append(threading.current_thread().name), ran.set()), "keel-tool-b")
    assert ran.wait(60)  # while the hung call still holds its thread (a guard: an hour)
    assert names == ["keel-tool-b"]
    release.set()
    # the idle threads are reused: a third call runs on one of them, named for its tool
    done = threading.Event()
    eventually(lambda: len(threads._idle) >= 2, "both threads to be idle")
    before = threading.active_count()
    start_daemon(lambda: (names.append(threading.current_thread().name), done.set()), "keel-tool-c")
    assert done.wait(5)
    assert names[-1] == "keel-tool-c"
    assert threading.active_count() <= before


async def test_a_parallel_calls_result_is_recorded_before_its_slow_sibling_ends(
    tmp_path: Any,
) -> None:
    """Under `ainvoke` two calls run together: the quick one's result must not wait in the
    node's batch for the slow one (a crash meanwhile would leave it `started`)."""
    from langchain_core.messages import AIMessage

    from keel import Persistence, RunContext, build_agent, tool
    from keel.db.idempotency import records_flow
    from keel.evals import ScriptedChatModel

    url = f"sqlite:///{tmp_path}/k.db"
    watcher = Ledger(url)
    seen: list[str] = []

    @tool(risk="write")
    async def quick(x: int) -> str:
        """Quick write."""
        return f"quick {x}"

    @tool(risk="write")
    async def slow(x: int) -> str:
        """Slow write: waits until the quick call's result is in the ledger."""
        for _ in range(200):
            found = await watcher.arun(records_flow("t1", ["q1"]))
            if "q1" in found and found["q1"].state == "completed":
                seen.append("completed")
                break
            await asyncio.sleep(0.01)
        return f"slow {x}"

    both = AIMessage(
        content="",
        tool_calls=[
            {"name": "quick", "args": {"x": 1}, "id": "q1", "type": "tool_call"},
            {"name": "slow", "args": {"x": 2}, "id": "s1", "type": "tool_call"},
        ],
    )
    ledger = Ledger(url)
    try:
        async with Persistence(url).acheckpointer() as saver:
            agent = build_agent(
                # the calls keep the script's ids: the watcher reads q1's ledger row by its id
                ScriptedChatModel(script=[both, "done"], fresh_ids=False),
                [quick, slow],
                ledger=ledger,
                checkpointer=saver,
            )
            config = {"configurable": {"thread_id": "t1"}}
            await agent.ainvoke({"messages": [("user", "go")]}, config, context=RunContext())
    finally:
        await ledger.aclose()
        await watcher.aclose()
    assert seen == ["completed"]
