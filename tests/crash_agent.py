"""The process `tests/test_crash.py` kills: keel agents whose tool adds 1 to a PostgreSQL row.

    python tests/crash_agent.py URL COUNTERS DRIVER KILL run SEED THREAD...
    python tests/crash_agent.py URL COUNTERS DRIVER KILL resume THREAD...
    python tests/crash_agent.py URL COUNTERS DRIVER KILL settle THREAD...

`URL` is keel's database (checkpoints and ledger: SQLite or PostgreSQL); `COUNTERS` a
PostgreSQL database with the `crash_counters` table (the outside world the tool changes, like a
payment provider). `DRIVER` is `sync` (`invoke` on threads, the sync saver) or `async`
(`ainvoke`, the async saver, and `durability="async"` as LangGraph server passes it; the
sync driver keeps keel's default, `"sync"`). `KILL` is `random` (the tool sleeps a random bit
before and after its increment, and the test kills the process at a random moment) or `effect`
(the process kills itself right after the first increment). `run` runs one agent run per thread,
concurrently, and prints "ready" first; `resume` resumes every thread (a thread with no
checkpoint is submitted again, as a client would) and prints one JSON line per thread; `settle`
answers each "did this happen?" from the counter, then resumes.

The model names every tool call with a fresh random id, as real models do.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
from langgraph.types import Command

from keel import Ledger, Persistence, RunContext, build_agent, tool
from keel.evals.scripted import ScriptedChatModel, call
from keel.history import valid_history

CTX = RunContext(user_id="crash")
ASYNC: dict[str, Any] = {"context": CTX, "durability": "async"}


class World:
    """The counters the tool changes, through one connection per process."""

    def __init__(self, url: str, kill: str, rng: random.Random) -> None:
        self.conn = psycopg.connect(url, autocommit=True)
        self.lock = threading.Lock()
        self.kill, self.rng = kill, rng

    def pause(self) -> float:
        return self.rng.uniform(0, 0.04) if self.kill == "random" else 0.0

    def increment(self, key: str) -> str:
        with self.lock:
            row = self.conn.execute(
                "UPDATE crash_counters SET n = n + 1 WHERE key = %s RETURNING n", (key,)
            ).fetchone()
        if self.kill == "effect":
            os.kill(os.getpid(), signal.SIGKILL)
        return f"counter {key} is now {row[0] if row else '?'}"

    def counter(self, key: str) -> int:
        with self.lock:
            row = self.conn.execute(
                "SELECT n FROM crash_counters WHERE key = %s", (key,)
            ).fetchone()
        return int(row[0]) if row else -1


def make_agent(world: World, driver: str, saver: Any, ledger: Ledger) -> Any:
    if driver == "async":

        @tool(risk="write", name="increment")
        async def increment(key: str) -> str:
            """Add 1 to the counter `key`."""
            await asyncio.sleep(world.pause())
            result = await asyncio.to_thread(world.increment, key)
            await asyncio.sleep(world.pause())
            return result

        chosen: Any = increment
    else:

        @tool(risk="write", name="increment")
        def sync_increment(key: str) -> str:
            """Add 1 to the counter `key`."""
            import time

            time.sleep(world.pause())
            result = world.increment(key)
            time.sleep(world.pause())
            return result

        chosen = sync_increment

    def script(messages: list[Any]) -> Any:
        return call("increment", key=str(messages[0].content))

    model = ScriptedChatModel(script=[script, "Done."], latency=0.01, fresh_ids=True)
    return build_agent(model, [chosen], checkpointer=saver, ledger=ledger)


def report(agent: Any, world: World, key: str, config: Any) -> dict[str, Any]:
    state = agent.get_state(config)
    return summary(state, world, key)


def summary(state: Any, world: World, key: str) -> dict[str, Any]:
    messages = state.values.get("messages", [])
    waiting = [r for i in state.interrupts for r in i.value]
    kept = messages[:-1] if waiting else messages  # waiting: ends with the unanswered call
    return {
        "thread": key,
        "counter": world.counter(key),
        "outcome": (state.values.get("outcome") or {}).get("terminated_reason"),
        "waiting": [r.get("kind") for r in waiting],
        "valid": valid_history(kept) == list(kept),
        "messages": len(messages),
    }


def answer(world: World, key: str) -> Command:
    return Command(resume={"type": "approve" if world.counter(key) == 1 else "run_again"})


def sync_main(url: str, world: World, mode: str, threads: list[str], seed: int) -> None:
    ledger = Ledger(url)
    ledger.setup()
    with Persistence(url).checkpointer() as saver:
        agent = make_agent(world, "sync", saver, ledger)
        rng = random.Random(seed)
        delays = {t: rng.uniform(0, 0.15) for t in threads}

        def one(key: str) -> dict[str, Any] | None:
            config = {"configurable": {"thread_id": key}}
            if mode == "run":
                threading.Event().wait(delays[key])
                agent.invoke({"messages": [("user", key)]}, config, context=CTX)
                return None
            state = agent.get_state(config)
            if not (state.config.get("configurable") or {}).get("checkpoint_id"):
                agent.invoke({"messages": [("user", key)]}, config, context=CTX)
            elif state.interrupts and mode == "settle":
                agent.invoke(answer(world, key), config, context=CTX)
            elif not state.interrupts and not state.values.get("outcome"):
                # Not `state.next`: killed after a task's writes were saved but before the
                # next checkpoint, `next` is empty although the run is not over.
                agent.invoke(None, config, context=CTX)
            return report(agent, world, key, config)

        if mode == "run":
            print("ready", flush=True)
        with ThreadPoolExecutor(len(threads)) as pool:
            for result in pool.map(one, threads):
                if result is not None:
                    print(json.dumps(result), flush=True)
    ledger.close()


async def async_main(url: str, world: World, mode: str, threads: list[str], seed: int) -> None:
    ledger = Ledger(url)
    await ledger.asetup()
    async with Persistence(url).acheckpointer() as saver:
        agent = make_agent(world, "async", saver, ledger)
        rng = random.Random(seed)

        async def one(key: str) -> dict[str, Any] | None:
            config = {"configurable": {"thread_id": key}}
            if mode == "run":
                await asyncio.sleep(rng.uniform(0, 0.15))
                await agent.ainvoke({"messages": [("user", key)]}, config, **ASYNC)
                return None
            state = await agent.aget_state(config)
            if not (state.config.get("configurable") or {}).get("checkpoint_id"):
                await agent.ainvoke({"messages": [("user", key)]}, config, **ASYNC)
            elif state.interrupts and mode == "settle":
                await agent.ainvoke(answer(world, key), config, **ASYNC)
            elif not state.interrupts and not state.values.get("outcome"):
                await agent.ainvoke(None, config, **ASYNC)
            return summary(await agent.aget_state(config), world, key)

        if mode == "run":
            print("ready", flush=True)
        for result in await asyncio.gather(*(one(t) for t in threads)):
            if result is not None:
                print(json.dumps(result), flush=True)
    await ledger.aclose()


def main() -> None:
    url, counters, driver, kill, mode, *rest = sys.argv[1:]
    seed = int(rest.pop(0)) if mode == "run" else 0
    world = World(counters, kill if mode == "run" else "none", random.Random(seed))
    if driver == "sync":
        sync_main(url, world, mode, rest, seed)
    else:
        asyncio.run(async_main(url, world, mode, rest, seed))


if __name__ == "__main__":
    main()
