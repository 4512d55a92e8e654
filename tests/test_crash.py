"""Real crashes: SIGKILL agent processes, resume the threads in new processes.

Each case runs `ROUNDS` `tests/crash_agent.py` processes at once, each `PER_ROUND` threads (each
thread one side-effecting call that adds 1 to its counter row, as a payment would charge a
card), and kills them with SIGKILL: at a random moment, or right after the first effect. The
model names every tool call with a fresh random id, as real models do, so a model turn asked
again after the crash requests the same action under a new id. A new process resumes every
thread. Each thread must end completed with its counter at exactly 1, or wait on the "did this
happen?" review; a last process answers those reviews from the counter, and then every counter
is 1 and no ledger row is left `started`. Cases: sync (`invoke`) and async (`ainvoke`) drivers,
SQLite and PostgreSQL for checkpoints and ledger. The processes are forked from a fork server
that imported keel once (`tests/forking.py`; conftest's `forks`, shared by the worker's
tests), not started as fresh interpreters.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from forking import Forked, ForkServer
from langchain_core.messages import AIMessage
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.graph import END, START, MessagesState, StateGraph

CHILD = Path(__file__).with_name("crash_agent.py")
ROUNDS, PER_ROUND = int(os.environ.get("KEEL_CRASH_ROUNDS", "2")), 8


def child(forks: ForkServer, url: str, counters: str, case: tuple[str, str], *args: str) -> Forked:
    return forks.start_script(CHILD, url, counters, *case, *args)


def resumed(
    forks: ForkServer,
    url: str,
    counters: str,
    case: tuple[str, str],
    mode: str,
    threads: list[str],
) -> list[dict[str, Any]]:
    proc = child(forks, url, counters, case, mode, *threads)
    assert proc.wait() == 0, proc.err.read_text()
    return [json.loads(line) for line in proc.lines()]


def started_rows(url: str, threads: list[str]) -> list[str]:
    """The threads of the ledger rows left `started`."""
    query = "SELECT thread_id FROM keel_tool_calls WHERE state = 'started'"
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            rows = conn.execute(query).fetchall()
    else:
        with psycopg.connect(url, autocommit=True) as conn:
            rows = conn.execute(query).fetchall()
    return sorted(r[0] for r in rows if r[0] in threads)


def crash(
    forks: ForkServer, url: str, counters: str, case: tuple[str, str], batches: list[list[str]]
) -> None:
    """Run the batches in concurrent processes (a busy server) and kill each one."""
    rng = random.Random(len(batches))
    procs = [
        child(forks, url, counters, case, "run", str(7 * i + 1), *b) for i, b in enumerate(batches)
    ]
    for proc in procs:
        proc.wait_for_line("ready")
    for proc in procs:
        if case[1] == "random":
            time.sleep(rng.uniform(0.02, 0.3))
            proc.kill()
    for proc in procs:
        assert proc.wait() in (0, -signal.SIGKILL), proc.err.read_text()


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.parametrize("kill", ["random", "effect"])
@pytest.mark.parametrize("driver", ["sync", "async"])
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_sigkill_never_repeats_a_side_effect_when_the_model_mints_fresh_ids(
    backend: str, driver: str, kill: str, fresh_postgres_url: str, tmp_path: Path, forks: ForkServer
) -> None:
    counters = fresh_postgres_url
    url = f"sqlite:///{tmp_path}/keel.db" if backend == "sqlite" else fresh_postgres_url
    case = (driver, kill)
    threads = [f"t{i:03d}" for i in range(ROUNDS * PER_ROUND)]
    with psycopg.connect(counters, autocommit=True) as conn:
        conn.execute("CREATE TABLE crash_counters (key TEXT PRIMARY KEY, n INT NOT NULL)")
        for t in threads:
            conn.execute("INSERT INTO crash_counters VALUES (%s, 0)", (t,))
    crash(forks, url, counters, case, [threads[r::ROUNDS] for r in range(ROUNDS)])
    results = resumed(forks, url, counters, case, "resume", threads)
    assert len(results) == len(threads)
    doubles = [r["thread"] for r in results if r["counter"] > 1]
    assert not doubles, f"double charges in {len(doubles)} of {len(threads)} trials"
    waiting = [r["thread"] for r in results if r["waiting"]]
    print(f"{backend}/{driver}/{kill}: waiting on 'did this happen?': {len(waiting)}")
    for result in results:
        assert result["valid"], result
        if result["waiting"]:
            assert result["waiting"] == ["outcome_unknown"], result
            assert result["counter"] in (0, 1), result
        else:
            assert result["outcome"] == "completed" and result["counter"] == 1, result
            assert result["messages"] == 4, result  # user, call, tool result, answer
    # a row cut off mid-call is asked about; none stays `started` unseen
    assert started_rows(url, threads) == sorted(waiting)
    for result in resumed(forks, url, counters, case, "settle", waiting) if waiting else []:
        assert result["outcome"] == "completed" and result["counter"] == 1, result
    assert started_rows(url, threads) == []


class Crash(BaseException):
    """The process "dies"."""


class DiesBeforeCheckpoint(SqliteSaver):
    """Saves a task's writes, then "dies" before the checkpoint that follows them."""

    die = True

    def put(self, config: Any, checkpoint: Any, metadata: Any, new_versions: Any) -> Any:
        if self.die and metadata.get("step") == 0:
            self.die = False
            raise Crash
        return super().put(config, checkpoint, metadata, new_versions)


def test_killed_between_writes_and_checkpoint_next_is_empty_but_run_goes_on() -> None:
    """Pins LangGraph: when a task's writes were saved but not the next checkpoint,
    `get_state().next` is `()` although the run is not over; `invoke(None)` continues it.
    (A resume loop that trusts `next` would leave such threads unfinished.)"""
    builder = StateGraph(MessagesState)
    builder.add_node("answer", lambda state: {"messages": [AIMessage(content="hello")]})
    builder.add_edge(START, "answer")
    builder.add_edge("answer", END)
    with SqliteSaver.from_conn_string(":memory:") as base:
        saver = DiesBeforeCheckpoint(base.conn)
        graph = builder.compile(checkpointer=saver)
        config: Any = {"configurable": {"thread_id": "t"}}
        with pytest.raises(Crash):
            graph.invoke({"messages": [("user", "hi")]}, config, durability="sync")
        state = graph.get_state(config)
        assert state.next == ()
        assert [m.content for m in state.values["messages"]] == ["hi"]
        final = graph.invoke(None, config, durability="sync")
    assert [m.content for m in final["messages"]] == ["hi", "hello"]
