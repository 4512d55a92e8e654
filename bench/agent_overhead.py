"""Orchestration overhead of keel's agent against a hand-built ReAct loop and `create_agent`.

What is measured
----------------
One scripted task, K = 10 tool steps then a final answer, run through three agents:

- `stategraph`: the textbook hand-built LangGraph ReAct loop, `StateGraph(MessagesState)` with
  a `model` node, `ToolNode` and `tools_condition` routing;
- `create_agent`: LangChain's `langchain.agents.create_agent(model, tools)`;
- `keel`: `keel.graphs.build_agent(model, tools)`.

All three use the same deterministic `ScriptedChatModel` and the same plain LangChain tool,
so the only thing that differs is orchestration: nodes, routing, state and checkpoints. Each
agent runs with no checkpointer and with a `SqliteSaver` over a file (a fresh thread per run),
under sync `invoke`.

The (agent, saver) cases are interleaved: in each of R rounds (`--rounds`) the cases take
turns run by run, in an order rotated from round to round, until each has run at least 3
times and for at least `--min-seconds`; so drift in machine speed hits all cases alike.

How to read the output
----------------------
- `us/step`: wall time of one run divided by K, in microseconds (the mean over a round's runs;
  the table shows the median over rounds). It includes the final model turn, spread over the
  K steps.
- `ckpt/run`: checkpoint writes of one run with the SQLite saver (rows in `checkpoints`); for
  a lean ReAct loop 2K + 3 (the input, the `__start__` step and the final model turn).
- `ss/step`: supersteps per tool step, i.e. extra checkpoint writes per extra tool step,
  measured as (writes of a K-step run - writes of a 0-step run) / K. A ReAct loop needs 2
  (model, tools); every further node on the per-step path adds one, and with a saver one
  more checkpoint write.
- `keel/x`: keel's time over agent x's time, per saver: the median over rounds of the ratio
  of the two cases' times in the same round. Below 1.00 keel is faster. `range over rounds`
  is the lowest and highest of those per-round ratios: a wide range means a noisy machine,
  so trust the median only as far as the range is narrow (or raise `--rounds`).

Goals: keel <= 1.0x `create_agent` and <= 1.3x the hand-built graph, on both savers.

The last line is machine-readable `name=value` pairs with the SQLite ratios:
`keel_vs_create_agent=<x.xx> keel_vs_stategraph=<x.xx>`.

Run it by path (`make bench`, or `.venv/bin/python bench/agent_overhead.py [--quick]`); not
with `python -m` or `-c` from the repository root, whose `keel/` folder shadows the package.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from langchain.agents import create_agent
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.tools import tool
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition

from keel.evals import ScriptedChatModel, call
from keel.graphs import build_agent

K = 10
"""Tool steps per run."""
FINAL = "done"
VARIANTS = ("stategraph", "create_agent", "keel")
SAVERS = ("none", "sqlite")
MIN_RUNS = 3
GOALS = {"create_agent": 1.0, "stategraph": 1.3}
"""keel's time over the agent's time must stay at or below these."""


@tool
def echo(x: int) -> str:
    """Return x, as text."""
    return f"echo {x}"


def script(steps: int) -> list[Any]:
    return [*(call("echo", x=i) for i in range(steps)), FINAL]


# -- the three agents ------------------------------------------------------------------------


def build_stategraph(model: ScriptedChatModel, checkpointer: SqliteSaver | None) -> Any:
    bound = model.bind_tools([echo])

    def call_model(state: MessagesState) -> dict[str, list[BaseMessage]]:
        return {"messages": [bound.invoke(state["messages"])]}

    graph = StateGraph(MessagesState)
    graph.add_node("model", call_model)
    graph.add_node("tools", ToolNode([echo]))
    graph.add_edge(START, "model")
    graph.add_conditional_edges("model", tools_condition)
    graph.add_edge("tools", "model")
    return graph.compile(checkpointer=checkpointer)


def build_create_agent(model: ScriptedChatModel, checkpointer: SqliteSaver | None) -> Any:
    return create_agent(model, [echo], checkpointer=checkpointer)


def build_keel(model: ScriptedChatModel, checkpointer: SqliteSaver | None) -> Any:
    return build_agent(model, [echo], checkpointer=checkpointer)


BUILDERS: dict[str, Callable[[ScriptedChatModel, SqliteSaver | None], Any]] = {
    "stategraph": build_stategraph,
    "create_agent": build_create_agent,
    "keel": build_keel,
}


# -- one (agent, saver) case -----------------------------------------------------------------


@dataclass
class Case:
    variant: str
    saver: str
    directory: Path
    steps: int = K
    conn: sqlite3.Connection | None = None
    graph: Any = None
    model: ScriptedChatModel = field(init=False)
    _ids: itertools.count[int] = field(default_factory=itertools.count)
    last_thread: str = ""

    def __post_init__(self) -> None:
        self.model = ScriptedChatModel(script=script(self.steps))
        checkpointer = None
        if self.saver == "sqlite":
            path = self.directory / f"{self.variant}-{self.steps}.sqlite"
            self.conn = sqlite3.connect(path, check_same_thread=False)
            checkpointer = SqliteSaver(self.conn)
            checkpointer.setup()
        self.graph = BUILDERS[self.variant](self.model, checkpointer)

    @property
    def name(self) -> str:
        return f"{self.variant}/{self.saver}"

    def run(self) -> dict[str, Any]:
        self.last_thread = f"{self.variant}-{next(self._ids)}"
        result: dict[str, Any] = self.graph.invoke(
            {"messages": [("user", "go")]}, {"configurable": {"thread_id": self.last_thread}}
        )
        return result

    def timed_run(self) -> float:
        start = time.perf_counter()
        self.run()
        elapsed = time.perf_counter() - start
        self.model.calls.clear()  # the scripted model records every call; keep memory flat
        return elapsed

    def checkpoints_of_last_run(self) -> int:
        assert self.conn is not None
        (rows,) = self.conn.execute(
            "SELECT COUNT(*) FROM checkpoints WHERE thread_id = ?", (self.last_thread,)
        ).fetchone()
        return int(rows)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def validate(case: Case, result: dict[str, Any]) -> None:
    """Fail loudly unless the run made exactly `case.steps` tool calls and then answered."""
    messages = result["messages"]
    tools = [m for m in messages if isinstance(m, ToolMessage)]
    answers = [m for m in messages if isinstance(m, AIMessage)]
    where = f"{case.name} (steps={case.steps})"
    assert len(tools) == case.steps, f"{where}: {len(tools)} tool messages, want {case.steps}"
    assert [m.content for m in tools] == [f"echo {i}" for i in range(case.steps)], where
    assert all(m.status == "success" for m in tools), where
    assert len(answers) == case.steps + 1, f"{where}: {len(answers)} AI messages"
    last = messages[-1]
    assert isinstance(last, AIMessage) and last.content == FINAL, f"{where}: ended with {last!r}"
    assert not last.tool_calls, where
    if case.variant == "keel":
        reason = result["outcome"]["terminated_reason"]
        assert reason == "completed", f"{where}: terminated_reason={reason!r}"


# -- measuring -------------------------------------------------------------------------------


def supersteps(directory: Path) -> dict[str, tuple[int, float]]:
    """Per agent: checkpoint writes of a K-step run, and extra writes per extra tool step."""
    out: dict[str, tuple[int, float]] = {}
    for variant in VARIANTS:
        writes = {}
        for steps in (0, K):
            case = Case(variant, "sqlite", directory / "count", steps=steps)
            try:
                validate(case, case.run())
                writes[steps] = case.checkpoints_of_last_run()
            finally:
                case.close()
        out[variant] = (writes[K], (writes[K] - writes[0]) / K)
    return out


def measure(cases: list[Case], rounds: int, min_seconds: float) -> dict[str, list[float]]:
    """Seconds per run for every case, one mean per round.

    Within a round the cases take turns run by run (starting from a case rotated each round),
    until each has run at least `MIN_RUNS` times for at least `min_seconds` in all; so a slow
    patch of the machine lands on all cases of the round alike.
    """
    per_round: dict[str, list[float]] = {c.name: [] for c in cases}
    for r in range(rounds):
        shift = r % len(cases)
        order = cases[shift:] + cases[:shift]
        times: dict[str, list[float]] = {c.name: [] for c in order}
        gc.collect()
        pending = order
        while pending:
            for case in pending:
                times[case.name].append(case.timed_run())
            pending = [
                c
                for c in pending
                if len(times[c.name]) < MIN_RUNS or sum(times[c.name]) < min_seconds
            ]
        for name, seconds in times.items():
            per_round[name].append(statistics.fmean(seconds))
        print(f"  round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    return per_round


def warn_if_tracing() -> None:
    """Say so when LangSmith tracing is switched on (`true`/`1`/`yes`): timings include it."""
    switches = ("LANGSMITH_TRACING", "LANGCHAIN_TRACING_V2")
    if any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes") for v in switches):
        print("warning: LangSmith tracing is on; timings include it", file=sys.stderr)


def paired_ratios(per_round: dict[str, list[float]], a: str, b: str) -> list[float]:
    """Case a's time over case b's, round by round."""
    return [x / y for x, y in zip(per_round[a], per_round[b], strict=True)]


# -- main ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument(
        "--min-seconds", type=float, default=0.4, help="time per case per round (default 0.4)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round of 0.1 s")
    args = parser.parse_args()
    rounds, min_seconds = (1, 0.1) if args.quick else (args.rounds, args.min_seconds)
    warn_if_tracing()

    with tempfile.TemporaryDirectory(prefix="keel-bench-") as tmp:
        directory = Path(tmp)
        (directory / "count").mkdir()
        counts = supersteps(directory)
        cases = [Case(v, s, directory) for s in SAVERS for v in VARIANTS]
        try:
            for case in cases:  # warm-up, and proof that every agent does the task
                validate(case, case.run())
                case.model.calls.clear()
            per_round = measure(cases, rounds, min_seconds)
        finally:
            for case in cases:
                case.close()

    report(per_round, counts, rounds, min_seconds)


def report(
    per_round: dict[str, list[float]],
    counts: dict[str, tuple[int, float]],
    rounds: int,
    min_seconds: float,
) -> None:
    print(
        f"\n{K} tool steps + final answer per run; {rounds} round(s) x >= {min_seconds:g} s "
        f"per case; Python {sys.version.split()[0]}\n"
    )
    header = (
        f"{'agent':<13} {'saver':<7} {'us/step':>8} {'ckpt/run':>9} {'ss/step':>8} "
        f"{'keel/x':>7}  {'range over rounds':<17}  goal"
    )
    print(header)
    print("-" * len(header))
    ratios: dict[tuple[str, str], float] = {}
    for saver in SAVERS:
        for variant in VARIANTS:
            name = f"{variant}/{saver}"
            us = statistics.median(per_round[name]) / K * 1e6
            writes, per_step = counts[variant]
            row = f"{variant:<13} {saver:<7} {us:>8.0f} {writes:>9d} {per_step:>8.1f}"
            if variant != "keel":
                each = paired_ratios(per_round, f"keel/{saver}", name)
                ratio = ratios[(variant, saver)] = statistics.median(each)
                goal = GOALS[variant]
                verdict = "met" if ratio <= goal else "MISSED"
                spread = f"{min(each):.2f}-{max(each):.2f}"
                row += f" {ratio:>7.2f}  {spread:<17}  <= {goal:.2f} {verdict}"
            print(row)
    print("\nckpt/run and ss/step are counted with the SQLite saver (the same graph steps run")
    print("without a saver). keel/x < 1 means keel is faster.\n")
    print(
        f"nosaver: keel_vs_create_agent={ratios[('create_agent', 'none')]:.2f} "
        f"keel_vs_stategraph={ratios[('stategraph', 'none')]:.2f}"
    )
    print(
        f"keel_vs_create_agent={ratios[('create_agent', 'sqlite')]:.2f} "
        f"keel_vs_stategraph={ratios[('stategraph', 'sqlite')]:.2f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
