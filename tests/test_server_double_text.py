"""A user who sends again while a served run is going (double-texting), on a real `langgraph dev`.

LangGraph's server orders runs on a thread itself (`multitask_strategy`); keel's graphs also
take the thread per process (`keel.graphs._one_run`). These tests check the two together: a
run the server cancels for the new one gives the thread back (no wait, no hang), and queued
runs both land whole.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import servers
from langgraph_sdk import get_client

SLOW_CONFIG = servers.ROOT / "tests" / "serve" / "keel-slow.toml"
ALICE = {"Authorization": "Bearer token-alice"}
PER_MESSAGE: Any = {"configurable": {"agent": "per_message"}}


@pytest.fixture(scope="module")
def slow_server(postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("double-text")
    with (
        servers.fresh_database(postgres_url, "keel_double_ledger") as ledger_url,
        servers.fresh_database(postgres_url, "keel_double_effects") as effects_url,
    ):
        with psycopg.connect(effects_url, autocommit=True) as conn:
            conn.execute(servers.slow_tools_schema())
        env = {"KEEL_TEST_EFFECTS_URL": effects_url, "KEEL_TEST_SLOW_SECONDS": "1.5"}
        with servers.serving_dev(workdir, ledger_url, server_config=SLOW_CONFIG, extra_env=env) as (
            url,
            _,
        ):
            yield url


def _texts(state: Any) -> list[str]:
    return [str(m.get("content")) for m in state["values"]["messages"]]


@pytest.mark.parametrize("strategy", ["enqueue", "interrupt"])
async def test_a_second_message_while_a_run_is_going_lands_whole(
    slow_server: str, strategy: str
) -> None:
    async with get_client(url=slow_server, headers=ALICE) as c:
        thread = (await c.threads.create())["thread_id"]
        first = await c.runs.create(
            thread,
            "agent",
            input={"messages": [{"role": "user", "content": "job-one"}]},
            config=PER_MESSAGE,
        )
        await asyncio.sleep(0.5)  # the first run is in its slow tool
        second = await c.runs.create(
            thread,
            "agent",
            input={"messages": [{"role": "user", "content": "job-two"}]},
            config=PER_MESSAGE,
            multitask_strategy=strategy,
        )
        await asyncio.wait_for(c.runs.join(thread, second["run_id"]), timeout=60)
        done = await c.runs.get(thread, second["run_id"])
        before = await c.runs.get(thread, first["run_id"])
        state = await c.threads.get_state(thread)
    assert done["status"] == "success"
    assert state["values"]["outcome"]["terminated_reason"] == "completed"
    texts = _texts(state)
    assert "job-two" in texts
    if strategy == "enqueue":  # both ran, one after the other, and the thread holds both
        assert before["status"] == "success"
        assert texts.index("job-one") < texts.index("job-two")
    else:  # the server cancelled the first for the second, which then had the thread
        assert before["status"] == "interrupted"
        # pinned: langgraph dev keeps none of the interrupted run's messages (its question
        # too), with or without keel's lock; "enqueue" keeps both runs whole
        assert "job-one" not in texts
