"""A sync `Ledger.close()` closes the async pool too, whichever loop opened it.

On PostgreSQL a ledger used by `invoke` and `ainvoke` has a sync pool and an async pool (opened
in the event loop of the first `ainvoke`). `close()` closed only the sync pool: the async
pool's connections stayed open, counted here in `pg_stat_activity` for the test database.
Now `close()` closes it in its loop when that loop runs in another thread, without it when the
loop has ended, and from inside that loop (where it cannot wait) it closes the idle connections
and logs a warning to `await aclose()`. Real parts: PostgreSQL, the scripted model.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import pytest
from langgraph.checkpoint.memory import InMemorySaver
from test_attack_closed_ledger import _left_open, _open

from keel import Ledger, RunContext, RunLog, build_agent, tool
from keel.evals import ScriptedChatModel, call
from keel.guards import Policy, Rule

CTX = RunContext(user_id="u1", tenant_id="acme")
TASK = {"messages": [("user", "look order A1 up")]}
pytestmark = pytest.mark.postgres


def _agent(ledger: Ledger) -> Any:
    @tool(name="lookup")
    def lookup(order_id: str) -> str:
        """Look an order up."""
        return f"{order_id} shipped"

    model = ScriptedChatModel(
        script=[call("lookup", order_id="A1"), "Shipped."] * 2, fresh_ids=True
    )
    policy = Policy(name="p", rules=(Rule(tool="lookup", action="allow"),))
    return build_agent(model, [lookup], policy=policy, ledger=ledger, checkpointer=InMemorySaver())


@pytest.mark.parametrize("order", ["invoke-first", "ainvoke-first"])
def test_close_after_invoke_and_an_ainvoke_whose_loop_ended_leaves_no_backend(
    fresh_postgres_url: str, order: str
) -> None:
    ledger = Ledger(fresh_postgres_url)
    agent = _agent(ledger)

    def sync_run() -> None:
        config: Any = {"configurable": {"thread_id": "sync"}}
        assert agent.invoke(TASK, config, context=CTX)["outcome"]["status"] == "success"

    def async_run() -> None:  # in an event loop of its own, ended when it returns
        config: Any = {"configurable": {"thread_id": "async"}}
        done = asyncio.run(agent.ainvoke(TASK, config, context=CTX))
        assert done["outcome"]["status"] == "success"

    for run in (sync_run, async_run) if order == "invoke-first" else (async_run, sync_run):
        run()
    assert _open(fresh_postgres_url) >= 2  # a connection in each pool
    ledger.close()
    assert ledger.closed and _left_open(fresh_postgres_url) == 0


def test_close_from_another_thread_while_the_pools_loop_runs(fresh_postgres_url: str) -> None:
    ledger = Ledger(fresh_postgres_url)
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()
    try:
        RunLog(ledger).query()
        asyncio.run_coroutine_threadsafe(RunLog(ledger).aquery(), loop).result(timeout=30)
        assert _open(fresh_postgres_url) >= 2
        ledger.close()  # the pool closes in its loop, which goes on running
        assert _left_open(fresh_postgres_url) == 0
        assert loop.is_running()
        ping = asyncio.run_coroutine_threadsafe(asyncio.sleep(0, "alive"), loop)
        assert ping.result(timeout=5) == "alive"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        runner.join(timeout=10)
        loop.close()


async def test_close_inside_the_pools_own_loop_closes_it_and_says_to_use_aclose(
    fresh_postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = Ledger(fresh_postgres_url)
    await RunLog(ledger).aquery()
    assert await asyncio.to_thread(_open, fresh_postgres_url) >= 1
    with caplog.at_level(logging.WARNING, logger="keel.db.ledger"):
        ledger.close()
    assert "await ledger.aclose()" in caplog.text
    # the count runs in a thread: this loop goes on, and finishes the pool's close
    assert await asyncio.to_thread(_left_open, fresh_postgres_url) == 0
    await ledger.aclose()  # harmless after


def test_aclose_in_another_loop_than_the_pools_leaves_no_backend(fresh_postgres_url: str) -> None:
    ledger = Ledger(fresh_postgres_url)
    asyncio.run(RunLog(ledger).aquery())  # the pool's loop ends here
    assert _open(fresh_postgres_url) >= 1
    asyncio.run(ledger.aclose())
    assert ledger.closed and _left_open(fresh_postgres_url) == 0
