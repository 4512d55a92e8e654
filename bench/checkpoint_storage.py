"""Checkpoint storage: bytes per 50-step thread, against the bytes of the thread's messages.

What is measured
----------------
One thread of keel's agent loop (keel's `call_model` and `execute_tools` nodes on keel's
`AgentState`, the routing of `build_agent`) runs 50 tool steps and a final answer on
PostgreSQL (keel's sync saver, `durability="sync"`: every checkpoint is written), twice:

- `peer`: `AgentState.messages` on LangGraph's default channel (`add_messages`, a
  `BinaryOperatorAggregate`): the whole message list is stored again at every checkpoint;
- `delta`: the same state with `messages` on LangGraph's beta `DeltaChannel`: checkpoints
  store only the new messages (the task writes), plus a full snapshot every
  `snapshot_frequency` updates;
- `keelN`: what keel uses: the default channel, and keel's retention
  (`Persistence.prune(keep_last=N)`, or `keel threads prune --keep N`) once the run is
  over (N = 10 and 2 by default). The thread then reads back identical (checked), and its
  bytes are counted at rest; during the run it grows as `peer` does.

For each thread, as in `/work/shared/research/perf-baselines.md` §3:

- *logical* bytes: the checkpoint rows' JSON text, plus the raw bytes of its blobs and writes;
- *stored* bytes: `pg_column_size` of those rows (after pglz/TOAST): what is on disk.

The baseline is the messages themselves: the final message list serialized once with
LangGraph's serializer. Each ratio is thread bytes / message bytes. Goal: keel <= 3x (the
peer measured 48x in the research notes). The last line is machine-readable:
`keel_bytes_vs_messages=<x.x> peer_bytes_vs_messages=<x.x>` (logical bytes; keel with the last
`--keep-last` value).

Run it by path: `.venv/bin/python bench/checkpoint_storage.py` (about 10 s). The server comes
from KEEL_BENCH_POSTGRES_URL or KEEL_TEST_POSTGRES_URL; a fresh database is made and dropped.
"""

from __future__ import annotations

import argparse
import functools
import os
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Annotated, Any
from urllib.parse import urlsplit

import psycopg
from langchain_core.messages import AnyMessage
from langgraph.channels import DeltaChannel
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
from langgraph.graph import START, StateGraph
from langgraph.graph.message import add_messages
from psycopg import sql

from keel import AgentState, Persistence, RunContext, tool
from keel.evals import ScriptedChatModel, call
from keel.graphs import route_after_model, route_after_tools
from keel.nodes import call_model, execute_tools
from keel.tools import ToolRegistry


def _add_all(messages: Sequence[AnyMessage], writes: Sequence[Any]) -> Any:
    """`DeltaChannel`'s batch reducer: `add_messages` folded over the writes."""
    return functools.reduce(add_messages, writes, list(messages))  # type: ignore[arg-type]


class DeltaAgentState(AgentState, total=False):
    """keel's state with the messages on LangGraph's `DeltaChannel`."""

    messages: Annotated[list[AnyMessage], DeltaChannel(_add_all)]  # type: ignore[misc]


@tool
def lookup(n: int) -> str:
    """Look up record `n`."""
    return f"record {n}: status shipped, carrier ACME, eta 2 days"


def agent(schema: type[Any], steps: int, saver: Any) -> Any:
    script: list[Any] = [call("lookup", n=i) for i in range(steps)] + ["All records checked."]
    tools = ToolRegistry([lookup])
    graph = StateGraph(schema, context_schema=RunContext)
    graph.add_node("call_model", call_model(ScriptedChatModel(script=script), tools))
    graph.add_node("execute_tools", execute_tools(tools))
    graph.add_edge(START, "call_model")
    # lambdas: LangGraph reads a schema from a typed route function's annotations
    graph.add_conditional_edges(
        "call_model", lambda s: route_after_model(s), ["execute_tools", "__end__"]
    )
    graph.add_conditional_edges("execute_tools", lambda s: route_after_tools(s), ["call_model"])
    return graph.compile(checkpointer=saver)


_BYTES_SQL = """
SELECT
  (SELECT coalesce(sum(length(checkpoint::text) + length(metadata::text)), 0)
     FROM checkpoints WHERE thread_id = %(t)s),
  (SELECT coalesce(sum(pg_column_size(c.*)), 0) FROM checkpoints c WHERE thread_id = %(t)s),
  (SELECT coalesce(sum(length(coalesce(blob, ''))), 0)
     FROM checkpoint_blobs WHERE thread_id = %(t)s),
  (SELECT coalesce(sum(pg_column_size(b.*)), 0) FROM checkpoint_blobs b WHERE thread_id = %(t)s),
  (SELECT coalesce(sum(length(blob)), 0) FROM checkpoint_writes WHERE thread_id = %(t)s),
  (SELECT coalesce(sum(pg_column_size(w.*)), 0) FROM checkpoint_writes w WHERE thread_id = %(t)s),
  (SELECT count(*) FROM checkpoints WHERE thread_id = %(t)s)
"""


def measure(
    url: str, name: str, schema: type[Any], steps: int, keep_last: int | None = None
) -> dict[str, int]:
    """Run one thread (then keep its latest `keep_last` checkpoints) and count its bytes."""
    config: Any = {"configurable": {"thread_id": name}, "recursion_limit": 4 * steps + 10}
    with Persistence(url).checkpointer() as saver:
        graph = agent(schema, steps, saver)
        final = graph.invoke({"messages": [("user", "check all")]}, config, durability="sync")
        assert final["outcome"]["terminated_reason"] == "completed", final["outcome"]
        assert len(final["messages"]) == 2 * steps + 2
        if keep_last is not None:
            report = Persistence(url).prune(keep_last=keep_last)
            assert name in report.threads_trimmed, report
        again = graph.get_state(config).values  # reads back (DeltaChannel replays writes)
        assert again["messages"] == final["messages"] and again["outcome"] == final["outcome"]
    _, messages = JsonPlusSerializer().dumps_typed(final["messages"])
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(_BYTES_SQL, {"t": name}).fetchone()
    assert row is not None
    ck_logical, ck_stored, bl_logical, bl_stored, wr_logical, wr_stored, count = map(int, row)
    return {
        "checkpoints": count,
        "logical": ck_logical + bl_logical + wr_logical,
        "stored": ck_stored + bl_stored + wr_stored,
        "messages": len(messages),
        "checkpoint_rows": ck_logical,
        "blobs": bl_logical,
        "writes": wr_logical,
    }


@contextmanager
def fresh_database(base: str) -> Iterator[str]:
    name = f"keel_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield urlsplit(base)._replace(path=f"/{name}").geturl()
    finally:
        with psycopg.connect(base, autocommit=True) as conn:
            drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
            conn.execute(drop.format(sql.Identifier(name)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=int, default=50, help="tool steps per thread")
    parser.add_argument(
        "--keep-last",
        type=int,
        nargs="+",
        default=[10, 2],
        help="checkpoints keel's retention keeps (the last value is the headline figure)",
    )
    args = parser.parse_args()
    base = os.environ.get("KEEL_BENCH_POSTGRES_URL") or os.environ.get("KEEL_TEST_POSTGRES_URL")
    if not base:
        raise SystemExit("Set KEEL_BENCH_POSTGRES_URL or KEEL_TEST_POSTGRES_URL.")
    results: dict[str, dict[str, int]] = {}
    with fresh_database(base) as url:
        # keel first: its prune runs over every thread in the database (each keel thread is
        # counted right after its own prune)
        keel = {
            f"keel{n}": measure(url, f"keel{n}", AgentState, args.steps, keep_last=n)
            for n in args.keep_last
        }
        results["peer"] = measure(url, "peer", AgentState, args.steps)
        results["delta"] = measure(url, "delta", DeltaAgentState, args.steps)
        results.update(keel)
    print(f"{args.steps}-step thread on PostgreSQL, durability=sync")
    print(f"{'case':<6} {'channel':<24} {'ckpts':>5} {'logical B':>11} {'stored B':>10} "
          f"{'messages B':>10} {'logical x':>9} {'stored x':>8}")  # fmt: skip
    channels = {"peer": "default (add_messages)", "delta": "DeltaChannel (beta)"}
    channels.update({f"keel{n}": f"default + keep_last={n}" for n in args.keep_last})
    for case, r in results.items():
        print(
            f"{case:<6} {channels[case]:<24} {r['checkpoints']:>5} {r['logical']:>11,} "
            f"{r['stored']:>10,} {r['messages']:>10,} {r['logical'] / r['messages']:>9.1f} "
            f"{r['stored'] / r['messages']:>8.1f}"
        )
    for case, r in results.items():
        print(
            f"{case}: logical bytes in checkpoint rows {r['checkpoint_rows']:,}, blobs "
            f"{r['blobs']:,}, writes {r['writes']:,}"
        )
    keel, peer = results[f"keel{args.keep_last[-1]}"], results["peer"]
    print(
        f"keel_bytes_vs_messages={keel['logical'] / keel['messages']:.1f} "
        f"peer_bytes_vs_messages={peer['logical'] / peer['messages']:.1f}"
    )


if __name__ == "__main__":
    main()
