"""keel on Aegra, one machine: a worker replica SIGKILLed under 20 slow runs loses nothing.

An API-only replica and two worker replicas (`tests/servers.py`, short leases: 9 s lease, 4 s
heartbeat, 3 s reaper) serve `tests/serve/keel-slow.toml`: an agent whose one tool,
`slow_work`, records the attempt and, 3 s later, the effect, with the process id that ran it.
20 threads get one run each; once both workers have started some, one worker is SIGKILLed. The
reaper hands its runs to the other worker, which resumes them from the last checkpoint. keel's
idempotency ledger (PostgreSQL) turns the re-execution of an interrupted call into "did this
happen?" rather than a second effect; a human then settles each doubt from the facts (approve:
it happened; run_again: it did not) and every job has taken effect exactly once. (keel's server
e2e suite runs against Aegra in test_server_e2e.py.)
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
import pytest
import servers
from langgraph_sdk import get_client
from langgraph_sdk.client import LangGraphClient

pytestmark = pytest.mark.aegra

RUNS = 20
SLOW_SECONDS = 3.0
SLOW_CONFIG = servers.ROOT / "tests" / "serve" / "keel-slow.toml"


def _rows(url: str, table: str) -> list[tuple[str, int]]:
    with psycopg.connect(url) as conn:
        return [(str(j), int(p)) for j, p in conn.execute(f"SELECT job, pid FROM {table}")]


def _claims(url: str, thread_id: str) -> list[str]:
    """The states of the thread's side-effecting calls in keel's idempotency ledger."""
    with psycopg.connect(url) as conn:
        query = "SELECT state FROM keel_tool_calls WHERE thread_id = %s"
        return [str(s) for (s,) in conn.execute(query, (thread_id,))]


@pytest.mark.postgres
async def test_a_killed_worker_loses_no_run_and_repeats_no_side_effect(
    postgres_url: str, tmp_path: Path
) -> None:
    servers.need_aegra()
    with (
        servers.fresh_database(postgres_url, "keel_aegra_ledger") as ledger_url,
        servers.fresh_database(postgres_url, "keel_aegra_effects") as effects_url,
    ):
        with psycopg.connect(effects_url, autocommit=True) as conn:
            conn.execute(servers.slow_tools_schema())
        env = {
            "KEEL_TEST_EFFECTS_URL": effects_url,
            "KEEL_TEST_SLOW_SECONDS": str(SLOW_SECONDS),
        }
        with servers.serving_aegra(
            tmp_path, postgres_url, ledger_url, server_config=SLOW_CONFIG, extra_env=env
        ) as cluster:
            try:
                await _kill_a_worker_under_load(cluster, effects_url, ledger_url)
            except BaseException:
                print(cluster.logs()[-20000:])
                raise


async def _kill_a_worker_under_load(
    cluster: servers.AegraCluster, effects_url: str, ledger_url: str
) -> None:
    by_pid = {w.pid: w for w in cluster.workers}
    client = get_client(url=cluster.url, headers={"Authorization": "Bearer token-alice"})
    async with client:
        threads = [
            t["thread_id"]
            for t in await asyncio.gather(*(client.threads.create() for _ in range(RUNS)))
        ]
        jobs = {tid: f"job-{i}" for i, tid in enumerate(threads)}
        await asyncio.gather(
            *(
                client.runs.create(
                    tid, "agent", input={"messages": [{"role": "user", "content": jobs[tid]}]}
                )
                for tid in threads
            )
        )
        # once both workers are inside slow_work, kill the one with more calls in flight
        deadline = time.monotonic() + 30
        while {p for _, p in _rows(effects_url, "attempts")} != set(by_pid):
            assert time.monotonic() < deadline, (
                f"not both workers ran: {_rows(effects_url, 'attempts')}"
            )
            await asyncio.sleep(0.2)
        done = {j for j, _ in _rows(effects_url, "effects")}
        in_flight = Counter(p for j, p in _rows(effects_url, "attempts") if j not in done)
        victim = by_pid[max(by_pid, key=lambda pid: in_flight[pid])]
        (survivor,) = (w for w in cluster.workers if w is not victim)
        victim.kill()
        killed_at = time.monotonic()

        # every thread ends (trust get_state: a stream or join can miss events)
        states = await _ended(client, threads)
        recovered_in = time.monotonic() - killed_at

        attempts, effects = _rows(effects_url, "attempts"), _rows(effects_url, "effects")
        # work done by both workers, and runs the victim held were finished by the survivor
        assert {p for _, p in attempts} == {victim.pid, survivor.pid}
        # no side effect twice, and no call the survivor repeated after the victim's attempt
        assert [j for j, n in Counter(j for j, _ in effects).items() if n > 1] == []
        assert [j for j, n in Counter(j for j, _ in attempts).items() if n > 1] == []
        effect_of = dict(effects)
        in_doubt: dict[str, str] = {}
        for tid, state in states.items():
            values = state["values"]
            humans = [m for m in values["messages"] if m["type"] == "human"]
            assert [m["content"] for m in humans] == [jobs[tid]], "one human message per thread"
            outcome = values["outcome"]
            tool_replies = [m for m in values["messages"] if m["type"] == "tool"]
            if outcome["terminated_reason"] == "awaiting_approval":
                # the ledger stopped the re-run of a call the victim claimed: "did this happen?"
                # (killed between its claim and the tool's first line, it left no attempt)
                assert _claims(ledger_url, tid) == ["started"], (jobs[tid], outcome)
                assert {p for j, p in attempts if j == jobs[tid]} <= {victim.pid}, jobs[tid]
                assert "a call to slow_work started but never finished" in outcome["detail"]
                assert tool_replies == []
                in_doubt[tid] = jobs[tid]
            else:
                assert outcome["terminated_reason"] == "completed", outcome
                (reply,) = tool_replies
                assert reply["content"] == f"did {jobs[tid]} in process {effect_of[jobs[tid]]}"
        assert in_doubt, "the kill interrupted no slow_work call: the test proved nothing"
        # a call in doubt happened at most once: the victim's effect, if it got that far
        assert all(effect_of.get(j, victim.pid) == victim.pid for j in in_doubt.values())

        # a human settles each doubt from the facts: it happened (approve) or not (run_again)
        for tid, job in in_doubt.items():
            answer = "approve" if job in effect_of else "run_again"
            await client.runs.create(tid, "agent", command={"resume": [{"type": answer}]})
        settled = await _ended(client, list(in_doubt))
    for state in settled.values():
        assert state["values"]["outcome"]["terminated_reason"] == "completed", state["values"]
    # every job took effect exactly once
    assert sorted(j for j, _ in _rows(effects_url, "effects")) == sorted(jobs.values())
    print(f"killed {victim.pid}: {len(in_doubt)} calls in doubt, all ended in {recovered_in:.1f} s")


async def _ended(client: LangGraphClient, threads: list[str]) -> dict[str, Any]:
    """Each thread's state once no run of it is pending or running and it has an outcome."""
    states: dict[str, Any] = {}
    deadline = time.monotonic() + 60
    while len(states) < len(threads) and time.monotonic() < deadline:
        await asyncio.sleep(1)
        for tid in threads:
            if tid not in states:
                runs = await client.runs.list(tid)
                if any(r["status"] in ("pending", "running") for r in runs):
                    continue
                state = await client.threads.get_state(tid)
                if isinstance(state["values"], dict) and state["values"].get("outcome"):
                    states[tid] = state
    assert len(states) == len(threads), f"{len(threads) - len(states)} runs did not end in 60 s"
    return states


def test_the_aegra_venv_has_the_version_the_makefile_pins() -> None:
    servers.need_aegra()
    pin = re.search(
        r"^AEGRA_API := aegra-api==(\S+)$", (servers.ROOT / "Makefile").read_text(), re.M
    )
    assert pin is not None, "the Makefile pins aegra-api (AEGRA_API := aegra-api==X.Y.Z)"
    code = "import importlib.metadata as m; print(m.version('aegra-api'))"
    out = subprocess.run([str(servers.AEGRA_PYTHON), "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == pin.group(1), (
        f"stale {servers.AEGRA_PYTHON}: rm -rf .venv-aegra && make aegra-venv"
    )
