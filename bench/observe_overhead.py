"""What recording costs: keel's agent with `ledger=` (audit log + run records) against without.

One scripted task, K = 10 tool steps then a final answer, run by `build_agent` twice over:
`plain` (no ledger) and `recorded` (a ledger on a SQLite file: one audit transaction per tool
step, one run record at the end). Both run without a checkpointer and with a `SqliteSaver`
file, under sync `invoke`. Cases alternate run by run for R rounds (`--rounds`), each round
at least `--min-seconds` per case, so machine drift hits both alike.

Output: per case the median over rounds of ms per run; `recorded/plain` is the median of the
per-round ratios (range in brackets). The last line is machine-readable:
`recorded_vs_plain_nosaver=<x.xx> recorded_vs_plain_sqlite=<x.xx>`.

Run it by path: `.venv/bin/python bench/observe_overhead.py [--quick]`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from langgraph.checkpoint.sqlite import SqliteSaver

from keel import Ledger, RunContext, build_agent
from keel.evals import ScriptedChatModel
from keel.evals.scripted import call
from keel.tools import tool

K = 10


@tool(name="lookup")
def lookup(key: str) -> str:
    """Look a key up."""
    return f"value of {key}"


def _script() -> list[Any]:
    return [*(call("lookup", key=f"k{i}") for i in range(K)), "done"]


def _agent(ledger: Ledger | None, saver: Any) -> Any:
    # the scripted model picks its turn from the messages, so one agent serves every run
    return build_agent(
        ScriptedChatModel(script=_script()), [lookup], ledger=ledger, checkpointer=saver
    )


def _run_once(agent: Any) -> float:
    config = {"configurable": {"thread_id": uuid.uuid4().hex}, "recursion_limit": 100}
    start = time.perf_counter()
    result = agent.invoke({"messages": [("user", "go")]}, config, context=RunContext())
    elapsed = time.perf_counter() - start
    assert result["outcome"]["terminated_reason"] == "completed"
    return elapsed


def _round(cases: dict[str, Any], min_seconds: float) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in cases}
    while min(sum(t) for t in times.values()) < min_seconds or min(map(len, times.values())) < 3:
        for name, agent in cases.items():
            times[name].append(_run_once(agent))
    return {name: statistics.mean(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("--quick", action="store_true", help="3 rounds of 0.3 s")
    args = parser.parse_args()
    rounds, min_seconds = (3, 0.3) if args.quick else (args.rounds, args.min_seconds)
    tmp = Path(tempfile.mkdtemp())
    ledger = Ledger(f"sqlite:///{tmp}/ledger.db")
    ledger.setup()
    ratios: dict[str, float] = {}
    with SqliteSaver.from_conn_string(str(tmp / "checkpoints.db")) as sqlite:
        for saver_name, saver in (("nosaver", None), ("sqlite", sqlite)):
            cases = {"plain": _agent(None, saver), "recorded": _agent(ledger, saver)}
            results = [_round(cases, min_seconds) for _ in range(rounds)]
            per_round = [r["recorded"] / r["plain"] for r in results]
            ratios[saver_name] = statistics.median(per_round)
            for name in cases:
                ms = statistics.median(r[name] for r in results) * 1000
                print(f"{name:<9} {saver_name:<8} {ms:8.2f} ms/run ({K} tool steps)")
            print(
                f"recorded/plain {saver_name}: {ratios[saver_name]:.2f} "
                f"[{min(per_round):.2f}-{max(per_round):.2f}]"
            )
    print(
        f"recorded_vs_plain_nosaver={ratios['nosaver']:.2f} "
        f"recorded_vs_plain_sqlite={ratios['sqlite']:.2f}"
    )


if __name__ == "__main__":
    main()
