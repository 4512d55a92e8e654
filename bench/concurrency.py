"""Checkpointing under concurrency: keel's pooled Postgres saver against LangGraph's.

What is measured
----------------
A batch is N = 50 runs started together (`asyncio.gather`, one event loop). Each run has
K = 10 tool steps and a final answer; the scripted model sleeps 50 ms per call, so the
latency-bound ideal for a batch is (K + 1) x 50 ms = 0.55 s. The same graph runs with:

- `none`: no checkpointer (the floor for this graph on this machine);
- `peer`: LangGraph's `AsyncPostgresSaver` on a `psycopg_pool.AsyncConnectionPool`;
- `keel`: `keel.db.checkpoint.AsyncPooledPostgresSaver` on the same pool;
- `memory` (with `--memory`): LangGraph's `InMemorySaver`, what checkpointing costs in
  LangGraph itself before any I/O.

The pool is shared (min = max = 20, autocommit, `dict_row`, `prepare_threshold=0`), the
database is a fresh one made by this script and dropped at the end. Graphs: keel's
`build_agent`, and with `--stategraph` also a hand-built `StateGraph(MessagesState)` ReAct loop.
After a validated warm-up, each round runs one batch per case, in an order rotated from round
to round, so drift in machine speed hits all cases alike; the tables show medians over rounds.
Every run is checked: it completed with K tool results.

How to read the output
----------------------
- `wall s`: wall time of a batch (median over rounds; min and max beside it).
- `x ideal`: wall time over 0.55 s. `x none`: over the same graph's no-saver batch.
- `CPU s`: this process's CPU time for the batch (the Postgres server's is not included).
Goal: keel <= 1.3x the no-saver run. The last line is machine-readable:
`keel_vs_no_saver=<x.xx> peer_vs_keel=<x.xx>` (build_agent graph, medians of per-round ratios).

Run it by path: `cd /tmp && /work/main/.venv/bin/python /work/main/bench/concurrency.py`.
The server comes from KEEL_BENCH_POSTGRES_URL or KEEL_TEST_POSTGRES_URL.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import psycopg
from langchain_core.messages import BaseMessage, ToolMessage
from langchain_core.tools import tool
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from keel.db.checkpoint import AsyncPooledPostgresSaver
from keel.evals import ScriptedChatModel, call
from keel.graphs import build_agent

K = 10
LATENCY = 0.05
IDEAL = (K + 1) * LATENCY
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
SAVERS = ("none", "peer", "keel")
"""`--memory` adds `memory` (LangGraph's `InMemorySaver`): what checkpointing costs without I/O."""


@tool
def echo(x: int) -> str:
    """Return x, as text."""
    return f"echo {x}"


def scripted_model() -> ScriptedChatModel:
    return ScriptedChatModel(
        script=[*(call("echo", x=i) for i in range(K)), "done"], latency=LATENCY
    )


def build_keel(saver: BaseCheckpointSaver[Any] | None) -> Any:
    return build_agent(scripted_model(), [echo], checkpointer=saver)


def build_stategraph(saver: BaseCheckpointSaver[Any] | None) -> Any:
    bound = scripted_model().bind_tools([echo])

    async def model(state: MessagesState) -> dict[str, list[BaseMessage]]:
        return {"messages": [await bound.ainvoke(state["messages"])]}

    graph = StateGraph(MessagesState)
    graph.add_node("model", model)
    graph.add_node("tools", ToolNode([echo]))
    graph.add_edge(START, "model")
    graph.add_conditional_edges("model", tools_condition)
    graph.add_edge("tools", "model")
    return graph.compile(checkpointer=saver)


BUILDERS: dict[str, Callable[[BaseCheckpointSaver[Any] | None], Any]] = {
    "build_agent": build_keel,
    "stategraph": build_stategraph,
}


# -- the database ----------------------------------------------------------------------------


@asynccontextmanager
async def fresh_database(base_url: str) -> AsyncIterator[str]:
    """A new database on the server of `base_url`, with LangGraph's tables; dropped after."""
    name = f"keel_bench_{uuid.uuid4().hex[:10]}"
    ident = sql.Identifier(name)
    with psycopg.connect(base_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(ident))
    url = urlsplit(base_url)._replace(path=f"/{name}").geturl()
    try:
        async with await psycopg.AsyncConnection.connect(
            url, autocommit=True, row_factory=dict_row
        ) as conn:
            await AsyncPostgresSaver(conn).setup()
        yield url
    finally:
        with psycopg.connect(base_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))


def make_pool(url: str) -> AsyncConnectionPool[Any]:
    return AsyncConnectionPool(
        url,
        min_size=20,
        max_size=20,
        kwargs={"autocommit": True, "row_factory": dict_row, "prepare_threshold": 0},
        check=AsyncConnectionPool.check_connection,
        open=False,
    )


# -- running batches ---------------------------------------------------------------------------


def validate(result: dict[str, Any]) -> None:
    tool_results = [m for m in result["messages"] if isinstance(m, ToolMessage)]
    outcome = result.get("outcome", {"terminated_reason": "completed"})  # stategraph has none
    if len(tool_results) != K or outcome["terminated_reason"] != "completed":
        raise SystemExit(f"invalid run: {len(tool_results)} tool results, outcome {outcome}")


async def batch(graph: Any, n: int, label: str, round_no: int) -> tuple[float, float]:
    """Run n threads at once; (wall s, CPU s)."""
    configs = [{"configurable": {"thread_id": f"{label}-{round_no}-{i}"}} for i in range(n)]
    cpu, start = time.process_time(), time.perf_counter()
    results = await asyncio.gather(
        *(graph.ainvoke({"messages": [("user", "go")]}, c) for c in configs)
    )
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    for result in results:
        validate(result)
    return wall, cpu


async def measure(
    graphs: dict[str, Any], n: int, rounds: int
) -> dict[str, list[tuple[float, float]]]:
    for label, graph in graphs.items():  # warm-up, validated
        await batch(graph, 5, f"warm-{label}", 0)
    samples: dict[str, list[tuple[float, float]]] = {label: [] for label in graphs}
    labels = list(graphs)
    for r in range(rounds):
        order = labels[r % len(labels) :] + labels[: r % len(labels)]
        for label in order:
            samples[label].append(await batch(graphs[label], n, label, r + 1))
    return samples


# -- report ---------------------------------------------------------------------------------


def ratio(samples: dict[str, list[tuple[float, float]]], a: str, b: str) -> float:
    """Median over rounds of a's wall time over b's wall time in the same round."""
    return statistics.median(x[0] / y[0] for x, y in zip(samples[a], samples[b], strict=True))


def report(samples: dict[str, list[tuple[float, float]]], graph_names: list[str]) -> None:
    print("| case | wall s (median) | min | max | x ideal | x none | CPU s |")
    print("|---|---|---|---|---|---|---|")
    for label, runs in samples.items():
        walls = [w for w, _ in runs]
        graph = label.split("/")[0]
        print(
            f"| {label} | {statistics.median(walls):.2f} | {min(walls):.2f} | {max(walls):.2f} | "
            f"{statistics.median(walls) / IDEAL:.1f} | {ratio(samples, label, f'{graph}/none'):.2f}"
            f" | {statistics.median(c for _, c in runs):.2f} |"
        )
    for graph in graph_names:
        print(
            f"{graph}: keel/none {ratio(samples, f'{graph}/keel', f'{graph}/none'):.2f}  "
            f"peer/keel {ratio(samples, f'{graph}/peer', f'{graph}/keel'):.2f}"
        )
    keel_vs_none = ratio(samples, "build_agent/keel", "build_agent/none")
    peer_vs_keel = ratio(samples, "build_agent/peer", "build_agent/keel")
    goal = "met" if keel_vs_none <= 1.3 else "MISSED"
    print(f"goal keel <= 1.3x no saver: {goal}")
    print(f"keel_vs_no_saver={keel_vs_none:.2f} peer_vs_keel={peer_vs_keel:.2f}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50, help="concurrent runs per batch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stategraph", action="store_true", help="also a hand-built graph")
    parser.add_argument("--memory", action="store_true", help="also LangGraph's InMemorySaver")
    args = parser.parse_args()
    base = os.environ.get("KEEL_BENCH_POSTGRES_URL") or os.environ.get(
        "KEEL_TEST_POSTGRES_URL", DEFAULT_URL
    )
    graph_names = ["build_agent", *(["stategraph"] if args.stategraph else [])]
    async with fresh_database(base) as url, make_pool(url) as pool:
        await pool.wait()
        savers: dict[str, BaseCheckpointSaver[Any] | None] = {
            "none": None, "peer": AsyncPostgresSaver(pool), "keel": AsyncPooledPostgresSaver(pool)
        }  # fmt: skip
        if args.memory:
            savers["memory"] = InMemorySaver()
        graphs = {
            f"{g}/{s}": BUILDERS[g](savers[s]) for g, s in itertools.product(graph_names, savers)
        }
        print(
            f"{args.runs} concurrent runs x {K} tool steps, model {LATENCY * 1000:.0f} ms/call, "
            f"ideal {IDEAL:.2f} s; pool 20; {args.rounds} rounds; Postgres {urlsplit(base).netloc}"
        )
        samples = await measure(graphs, args.runs, args.rounds)
    report(samples, graph_names)


if __name__ == "__main__":
    asyncio.run(main())
