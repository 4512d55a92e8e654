"""A slow side-effecting tool for the Aegra worker-kill test and the throughput bench.

`slow_work(job)` records an attempt (job, the process id that ran it), waits
`KEEL_TEST_SLOW_SECONDS`, then records the effect, both in the PostgreSQL database named by
`KEEL_TEST_EFFECTS_URL`. It is `side_effects=True`, so keel's idempotency ledger (the server
config's `ledger`) holds it to at most once per thread and tool call. `model` calls it with the
user's message as the job, then answers.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence

import psycopg
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage

from keel.evals import ScriptedChatModel, call
from keel.tools import tool

EFFECTS_ENV = "KEEL_TEST_EFFECTS_URL"


@tool(name="slow_work", risk="write", side_effects=True, retries=0)
async def slow_work(job: str) -> str:
    """Do a slow job once (it has a side effect)."""
    seconds = float(os.environ.get("KEEL_TEST_SLOW_SECONDS", "3"))
    pid = os.getpid()
    async with await psycopg.AsyncConnection.connect(os.environ[EFFECTS_ENV], autocommit=True) as c:
        await c.execute("INSERT INTO attempts (job, pid) VALUES (%s, %s)", (job, pid))
        await asyncio.sleep(seconds)
        await c.execute("INSERT INTO effects (job, pid) VALUES (%s, %s)", (job, pid))
    return f"did {job} in process {pid}"


tools = [slow_work]


def _work(messages: Sequence[BaseMessage]) -> AIMessage:
    job = next(str(m.content) for m in messages if isinstance(m, HumanMessage))
    return call("slow_work", job=job)


def model() -> ScriptedChatModel:
    """Calls `slow_work` with the user's message, then says it is done."""
    return ScriptedChatModel(script=[_work, "Done."])


def _work_on_the_last(messages: Sequence[BaseMessage]) -> AIMessage:
    job = next(str(m.content) for m in reversed(messages) if isinstance(m, HumanMessage))
    return call("slow_work", job=job)


def model_per_message() -> ScriptedChatModel:
    """`model` for a thread of several messages: each one's job, then done (8 messages)."""
    return ScriptedChatModel(script=[_work_on_the_last, "Done."] * 8)
