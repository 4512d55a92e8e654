"""Served throughput: `langgraph dev` against Aegra with one and two worker replicas.

What is measured
----------------
A batch is N runs (default 40) started together, each on a new thread, by bob (tenant globex in
`tests/serve/keel-server.toml`): keel's billing agent on its scripted model (lookup, policy,
a refund the tenant's policy denies, final answer: 4 model calls, 3 tool calls, no approval).
Each run's latency is the server's own record, `updated_at - created_at` of the run; the batch's
throughput is N over the time from the first submission to the last run's `updated_at`. The
client waits by polling `runs.get` every 0.5 s (Aegra's `runs.wait` polls every ~2 s, which would
measure the poll, not the server), so the poll interval does not enter either figure.

Servers (`tests/servers.py`, the same launchers as the e2e tests):
- `dev`: `keel serve` (`langgraph dev`, one in-memory process);
- `aegra_1w`: an API-only Aegra replica + one worker replica (PostgreSQL + Redis);
- `aegra_2w`: the same with two worker replicas.

The first batch on each server is a warm-up (graphs built, pools opened) and is not counted; the
table shows the median over `--rounds` batches. On a 2-core machine the replicas compete for
the same cores, so a second worker cannot add much. The last line is machine-readable:
`dev_runs_s=… aegra_1w_runs_s=… aegra_2w_runs_s=… aegra_2w_vs_1w=…` (runs/s ratio).

Run it by path from the repository: `.venv/bin/python bench/serve_throughput.py` (needs the
Aegra venv, `make aegra-venv`; PostgreSQL from KEEL_BENCH_POSTGRES_URL or
KEEL_TEST_POSTGRES_URL; Redis from KEEL_TEST_REDIS_URL, default db 15).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import servers  # noqa: E402
from langgraph_sdk import get_client  # noqa: E402

TASK = {"messages": [{"role": "user", "content": "Order A1001 arrived damaged. Refund it."}]}


def _ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


async def batch(url: str, n: int) -> tuple[float, list[float]]:
    """N runs at once; (runs/s, per-run latencies in seconds)."""
    client = get_client(url=url, headers={"Authorization": "Bearer token-bob"})
    async with client:
        threads = await asyncio.gather(*(client.threads.create() for _ in range(n)))
        started = time.time()
        runs = await asyncio.gather(
            *(client.runs.create(t["thread_id"], "agent", input=TASK) for t in threads)
        )
        done: dict[str, dict[str, object]] = {}
        deadline = time.monotonic() + 300
        while len(done) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{n - len(done)} runs did not end within 300 s")
            await asyncio.sleep(0.5)
            for run in runs:
                if run["run_id"] not in done:
                    got = await client.runs.get(run["thread_id"], run["run_id"])
                    if got["status"] not in ("pending", "running"):
                        if got["status"] != "success":
                            raise RuntimeError(f"run ended {got['status']}: {got}")
                        done[run["run_id"]] = dict(got)
    ends = [_ts(str(r["updated_at"])) for r in done.values()]
    latencies = [_ts(str(r["updated_at"])) - _ts(str(r["created_at"])) for r in done.values()]
    return n / (max(ends) - started), latencies


def measure(url: str, n: int, rounds: int) -> tuple[float, float, float]:
    """Median runs/s, p50 and p95 latency (ms) over `rounds` batches after a warm-up."""
    asyncio.run(batch(url, max(4, n // 4)))
    rates: list[float] = []
    latencies: list[float] = []
    for _ in range(rounds):
        rate, lat = asyncio.run(batch(url, n))
        rates.append(rate)
        latencies.extend(lat)
    q = statistics.quantiles(latencies, n=20)
    return statistics.median(rates), statistics.median(latencies) * 1000, q[18] * 1000


@contextmanager
def server(kind: str, workdir: Path, postgres_url: str, ledger_url: str) -> Iterator[str]:
    if kind == "dev":
        with servers.serving_dev(workdir, ledger_url) as (url, _):
            yield url
        return
    workers = int(kind.removeprefix("aegra_").removesuffix("w"))
    with servers.serving_aegra(
        workdir, postgres_url, ledger_url, workers=workers, leases={}
    ) as cluster:
        yield cluster.url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=40, help="runs per batch (default 40)")
    parser.add_argument("--rounds", type=int, default=3, help="batches per server (default 3)")
    args = parser.parse_args()
    postgres_url = os.environ.get("KEEL_BENCH_POSTGRES_URL") or os.environ.get(
        "KEEL_TEST_POSTGRES_URL"
    )
    if not postgres_url:
        sys.exit("Set KEEL_BENCH_POSTGRES_URL (or KEEL_TEST_POSTGRES_URL) to a PostgreSQL server.")
    if (missing := servers.aegra_missing()) is not None:
        sys.exit(f"This bench cannot start Aegra: {missing}.")
    results: dict[str, tuple[float, float, float]] = {}
    print(f"{args.runs} runs per batch, {args.rounds} batches per server (median)")
    print(f"{'server':<10} {'runs/s':>8} {'p50 ms':>8} {'p95 ms':>8}")
    for kind in ("dev", "aegra_1w", "aegra_2w"):
        with (
            tempfile.TemporaryDirectory() as tmp,
            servers.fresh_database(postgres_url, "keel_bench_ledger") as ledger_url,
            server(kind, Path(tmp), postgres_url, ledger_url) as url,
        ):
            results[kind] = measure(url, args.runs, args.rounds)
        rate, p50, p95 = results[kind]
        print(f"{kind:<10} {rate:>8.1f} {p50:>8.0f} {p95:>8.0f}", flush=True)
    ratio = results["aegra_2w"][0] / results["aegra_1w"][0]
    print(
        " ".join(f"{k}_runs_s={v[0]:.1f}" for k, v in results.items())
        + f" aegra_2w_vs_1w={ratio:.2f}"
    )


if __name__ == "__main__":
    main()
