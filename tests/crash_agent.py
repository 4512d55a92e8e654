"""The process `tests/test_crash.py` kills: keel agents on PostgreSQL whose tool adds 1 to a row.

    python tests/crash_agent.py URL run SEED THREAD...     run one agent run per thread,
                                                           concurrently; print "ready" first
    python tests/crash_agent.py URL resume THREAD...       resume every thread; print one JSON
                                                           line per thread
    python tests/crash_agent.py URL settle THREAD...       answer each "did this happen?" from
                                                           the counter, then resume (as resume)

The tool sleeps a random bit before and after its increment, so a SIGKILL lands before,
during or after it.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
from typing import Any

import psycopg
from langgraph.types import Command

from keel import Ledger, Persistence, RunContext, build_agent, tool
from keel.evals.scripted import ScriptedChatModel, call
from keel.nodes.history import valid_history

CTX = RunContext(user_id="crash")


def make_agent(url: str, saver: Any, ledger: Ledger, rng: random.Random) -> Any:
    @tool(risk="write")
    async def increment(key: str) -> str:
        """Add 1 to the counter `key`."""
        await asyncio.sleep(rng.uniform(0, 0.04))
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            cur = await conn.execute(
                "UPDATE crash_counters SET n = n + 1 WHERE key = %s RETURNING n", (key,)
            )
            row = await cur.fetchone()
        await asyncio.sleep(rng.uniform(0, 0.04))
        return f"counter {key} is now {row[0] if row else '?'}"

    def script(messages: list[Any]) -> Any:
        key = str(messages[0].content)
        return call("increment", key=key)

    model = ScriptedChatModel(script=[script, "Done."], latency=0.01)
    return build_agent(model, [increment], checkpointer=saver, ledger=ledger)


async def counter(url: str, key: str) -> int:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute("SELECT n FROM crash_counters WHERE key = %s", (key,))
        row = await cur.fetchone()
        return int(row[0]) if row else -1


async def run(url: str, seed: int, threads: list[str]) -> None:
    rng = random.Random(seed)
    ledger = Ledger(url)
    await ledger.asetup()
    async with Persistence(url).acheckpointer() as saver:
        agent = make_agent(url, saver, ledger, rng)
        print("ready", flush=True)

        async def one(key: str) -> None:
            await asyncio.sleep(rng.uniform(0, 0.15))
            config = {"configurable": {"thread_id": key}}
            await agent.ainvoke({"messages": [("user", key)]}, config, context=CTX)

        await asyncio.gather(*(one(t) for t in threads))
        print("finished", flush=True)


async def resume(url: str, threads: list[str], *, settle: bool) -> None:
    ledger = Ledger(url)
    async with Persistence(url).acheckpointer() as saver:
        agent = make_agent(url, saver, ledger, random.Random(0))

        async def one(key: str) -> dict[str, Any]:
            config = {"configurable": {"thread_id": key}}
            state = await agent.aget_state(config)
            if not (state.config.get("configurable") or {}).get("checkpoint_id"):
                # killed before the first checkpoint: the client submits the run again
                await agent.ainvoke({"messages": [("user", key)]}, config, context=CTX)
            elif state.interrupts and settle:
                answer = "approve" if await counter(url, key) == 1 else "run_again"
                await agent.ainvoke(Command(resume={"type": answer}), config, context=CTX)
            elif not state.interrupts and not state.values.get("outcome"):
                # Not `state.next`: killed after a task's writes were saved but before the
                # next checkpoint, `next` is empty although the run is not over.
                await agent.ainvoke(None, config, context=CTX)
            state = await agent.aget_state(config)
            messages = state.values.get("messages", [])
            waiting = [r for i in state.interrupts for r in i.value]
            return {
                "thread": key,
                "counter": await counter(url, key),
                "outcome": (state.values.get("outcome") or {}).get("terminated_reason"),
                "waiting": [r.get("kind") for r in waiting],
                "next": list(state.next),
                # a thread waiting on "did this happen?" ends with the unanswered call
                "valid": valid_history(messages[:-1] if waiting else messages)
                == list(messages[:-1] if waiting else messages),
                "messages": len(messages),
            }

        for result in await asyncio.gather(*(one(t) for t in threads)):
            print(json.dumps(result), flush=True)
    await ledger.aclose()


def main() -> None:
    url, mode, *rest = sys.argv[1:]
    if mode == "run":
        asyncio.run(run(url, int(rest[0]), rest[1:]))
    else:
        asyncio.run(resume(url, rest, settle=mode == "settle"))


if __name__ == "__main__":
    main()
