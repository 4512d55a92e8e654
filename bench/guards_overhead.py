"""The cost of protection per tool step: keel's guarded agent against `create_agent` + middleware.

What is measured
----------------
One scripted task, K = 10 tool steps then a final answer, run through five agents that share
one `ScriptedChatModel` class and the same two plain LangChain tools: `echo` (called at every
step, with a new argument each time) and `refund` (never called; it is the tool that needs a
human). No approval, limit or loop check ever fires on the hot path; what is measured is the
cost of checking.

- `create_agent`: `langchain.agents.create_agent(model, tools)`, no middleware (reference);
- `create_agent_mw`: the same with LangChain's nearest equivalent of keel's guards:
  `ModelCallLimitMiddleware(run_limit=100)`, `ToolCallLimitMiddleware(run_limit=100)` and
  `HumanInTheLoopMiddleware(interrupt_on={"refund": True})`. It enforces call counts and an
  approval matched by exact tool name;
- `keel`: `keel.build_agent(model, tools)`, no policy (unguarded);
- `keel_guarded`: `build_agent(..., policy=Policy(budget=Budget(model_calls=100,
  tool_calls=100, usd=100), rules=(Rule(tool="echo", action="allow"), Rule(tool="refund",
  action="ask")), loop=LoopPolicy(max_repeats=50)))`. It enforces more: a dollar budget from
  the price table (and the soft-threshold warning), a default-deny permission matrix of
  role / tool glob / resource glob rules, approvals bound to the exact arguments and the policy
  version, and the loop guard (repeats and A-B-A-B cycles);
- `keel_period`: `keel_guarded` plus a per-user monthly USD budget (`PeriodBudget`) kept in
  the ledger (`Ledger` on the saver's database): two more database transactions per model
  call (reserve, settle), and the audit log and run records that come with a ledger.
  Reported separately; it is not part of the goal.
- `keel_resilient`: `keel_guarded` plus an RPM / TPM rate limit and circuit breakers per model
  and per tool, all kept in the ledger: per model call a bucket transaction (which reads the
  breaker) and a settle; per tool call a breaker read (and the audit log and run records). Reported
  separately; not part of the goal.
- `keel_all_on`: everything production turns on, all in the ledger: `keel_guarded` plus the
  period budget, rate limits and breakers of `keel_period` and `keel_resilient`, the audit log
  and run records (on with a ledger), and the idempotency ledger (`echo` is a keel tool with
  `risk="write"`, so every call is claimed before and recorded after it runs). Per tool step
  4 ledger transactions: the reservation with the model's breaker and the rate buckets' first
  try, the settle (with the rate refund), the claim with the tool's breaker read alongside
  (synchronous commit) and the tool node's end (the call's result, the audit record); a
  closed breaker changes nothing, and its successes are not written; on PostgreSQL 8 round
  trips in all (writes nobody reads travel with the next read or the `COMMIT`); and the
  side-effecting call
  waits for the checkpoint holding its request to be saved. Goal: no slower than
  `create_agent_mw` and at most 1.3x unguarded `keel`.
- `create_agent_keel_mw`: `create_agent` with keel's guards as middleware instead of
  LangChain's (`BudgetMiddleware`, `PermissionMiddleware`, `LoopGuardMiddleware`: the same
  budget, rules and loop guard as `keel_guarded`). Reported separately.

Each agent runs on two savers under sync `invoke`, a fresh thread per run: SQLite
(`keel.Persistence("sqlite:///…").checkpointer()`, i.e. LangGraph's `SqliteSaver`, one file
per agent) and PostgreSQL (`keel.Persistence(url).checkpointer()`, i.e. LangGraph's
`PostgresSaver` over one psycopg pool, shared by all agents) on a fresh database created on
the server of `KEEL_BENCH_POSTGRES_URL` or `KEEL_TEST_POSTGRES_URL` (default
postgresql://postgres@127.0.0.1:5432/test) and dropped at the end. Every agent uses the same
saver type, so only orchestration and guards differ.

Before timing, every (agent, saver) case runs once and is validated (exactly K tool results,
the final answer, `completed`, the usage the budget counts, the ledger's spend), and a proof run
shows that the guards are really on: calling `refund` pauses `create_agent_mw` and
`keel_guarded` for approval.

The cases are interleaved as in `agent_overhead.py`: in each of R rounds (`--rounds`) the
cases take turns run by run, in an order rotated from round to round, until each has run at
least 3 times and for at least `--min-seconds`.

How to read the output
----------------------
- `us/step`: wall time of one run divided by K, in microseconds (median over rounds).
- `ckpt/run`: checkpoint writes (rows in `checkpoints`) of one K-step run on that saver.
- `ckpt/step`: checkpoint writes per tool step: (writes of a K-step run - writes of a 0-step
  run) / K. A ReAct loop needs 2 (model, tools); so does keel when the gate lets the calls
  through as they are (its `tool_gate` node, a third, runs only to deny, ask or stop); every
  middleware hook that is a node of its own adds a superstep, and one more checkpoint write,
  per step.
- ratios: the median over rounds of the per-round ratio of two cases' times on one saver,
  with the lowest and highest per-round ratio (a wide range means a noisy machine).

Goal: keel_guarded <= 1.0x create_agent_mw, on both savers, while enforcing more; and with
everything on, keel_all_on <= 1.0x create_agent_mw and <= 1.3x keel.

The last two lines are machine-readable, with the PostgreSQL ratios:
`guarded_vs_create_agent_mw=<x.xx> guarded_vs_unguarded=<x.xx>` and
`all_on_vs_create_agent_mw=<x.xx> all_on_vs_unguarded=<x.xx>`.

Run it by path (`.venv/bin/python bench/guards_overhead.py [--quick]`); not with `python -m`
or `-c` from the repository root, whose `keel/` folder shadows the package.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
from agent_overhead import (  # the same interleaved rounds, run by path
    measure,
    paired_ratios,
    warn_if_tracing,
)
from langchain.agents import create_agent
from langchain.agents.middleware import (
    HumanInTheLoopMiddleware,
    ModelCallLimitMiddleware,
    ToolCallLimitMiddleware,
)
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import tool
from langgraph.checkpoint.base import BaseCheckpointSaver
from psycopg import sql

from keel import Ledger, Persistence, RunContext, build_agent
from keel import tool as keel_tool
from keel.evals import ScriptedChatModel, call
from keel.guards import (
    BreakerPolicy,
    Budget,
    BudgetMiddleware,
    LoopGuardMiddleware,
    LoopPolicy,
    PeriodBudget,
    PermissionMiddleware,
    Policy,
    RateLimit,
    Rule,
)

K = 10
"""Tool steps per run."""
FINAL = "done"
LIMIT = 100
"""Every count limit, far above what a run uses (K + 1 model calls, K tool calls)."""
VARIANTS = (
    "create_agent",
    "create_agent_mw",
    "create_agent_keel_mw",
    "keel",
    "keel_guarded",
    "keel_period",
    "keel_resilient",
    "keel_all_on",
)
KEEL = ("keel", "keel_guarded", "keel_period", "keel_resilient", "keel_all_on")
WITH_CONTEXT = (*KEEL, "create_agent_keel_mw")
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
THREAD_IDS = itertools.count()
"""Thread ids are unique across cases: several cases share a database."""
CONTEXT = RunContext(user_id="bench-user", tenant_id="bench")
RATIOS = (  # (numerator, denominator, what it shows, goal)
    ("keel_guarded", "create_agent_mw", "keel's guards vs LangChain's middleware", 1.0),
    ("keel_guarded", "keel", "cost of keel's guards", None),
    ("keel_guarded", "create_agent", "guarded keel vs bare create_agent", None),
    ("create_agent_mw", "create_agent", "cost of LangChain's middleware", None),
    ("keel_period", "keel_guarded", "cost of the ledger's period budget", None),
    ("keel_period", "create_agent_mw", "period-budgeted keel vs middleware", None),
    ("keel_resilient", "keel_guarded", "cost of rate limits + breakers (ledger)", None),
    ("keel_all_on", "create_agent_mw", "everything on vs LangChain's middleware", 1.0),
    ("keel_all_on", "keel", "cost of everything on (ledger)", 1.3),
    ("create_agent_keel_mw", "create_agent_mw", "keel's middleware vs LangChain's", None),
)

POLICY = Policy(
    name="bench",
    budget=Budget(model_calls=LIMIT, tool_calls=LIMIT, usd=100),
    rules=(Rule(tool="echo", action="allow"), Rule(tool="refund", action="ask")),
    loop=LoopPolicy(max_repeats=50),
)
PERIOD_POLICY = Policy(
    name="bench-period",
    budget=POLICY.budget,
    rules=POLICY.rules,
    loop=POLICY.loop,
    period_budgets=(PeriodBudget(scope="user", period="month", usd=1_000_000),),
)
RESILIENT_POLICY = Policy(
    name="bench-resilient",
    budget=POLICY.budget,
    rules=POLICY.rules,
    loop=POLICY.loop,
    rate_limits=(RateLimit(rpm=1_000_000, tpm=1_000_000_000),),
    model_breaker=BreakerPolicy(),
    tool_breaker=BreakerPolicy(),
)
ALL_ON_POLICY = Policy(
    name="bench-all-on",
    budget=POLICY.budget,
    rules=POLICY.rules,
    loop=POLICY.loop,
    period_budgets=PERIOD_POLICY.period_budgets,
    rate_limits=RESILIENT_POLICY.rate_limits,
    model_breaker=BreakerPolicy(),
    tool_breaker=BreakerPolicy(),
)
LEDGER_POLICIES = {
    "keel_period": PERIOD_POLICY,
    "keel_resilient": RESILIENT_POLICY,
    "keel_all_on": ALL_ON_POLICY,
}


@keel_tool(name="echo", risk="write")
def echo_once(x: int) -> str:
    """Return x, as text (a side effect to keel: claimed and recorded in the ledger)."""
    return f"echo {x}"


@tool
def echo(x: int) -> str:
    """Return x, as text."""
    return f"echo {x}"


@tool
def refund(order_id: str) -> str:
    """Refund an order (needs a human's approval; the benchmark never calls it)."""
    return f"refunded {order_id}"


TOOLS = [echo, refund]


def script(steps: int) -> list[Any]:
    # a new argument at every step, so the loop guard (50 repeats, A-B-A-B cycles) never trips
    return [*(call("echo", x=i) for i in range(steps)), FINAL]


# -- the agents ------------------------------------------------------------------------------


def middleware() -> list[Any]:
    return [
        ModelCallLimitMiddleware(run_limit=LIMIT),
        ToolCallLimitMiddleware(run_limit=LIMIT),
        HumanInTheLoopMiddleware(interrupt_on={"refund": True}),
    ]


def build(variant: str, model: ScriptedChatModel, saver: BaseCheckpointSaver[Any], url: str) -> Any:
    """The agent `variant` on `saver`; `url` names the saver's database (for the ledger)."""
    if variant == "create_agent":
        return create_agent(model, TOOLS, checkpointer=saver), None
    if variant == "create_agent_mw":
        return create_agent(model, TOOLS, middleware=middleware(), checkpointer=saver), None
    if variant == "keel":
        return build_agent(model, TOOLS, checkpointer=saver), None
    if variant == "create_agent_keel_mw":
        assert POLICY.budget is not None and POLICY.loop is not None
        guards = [
            BudgetMiddleware(POLICY.budget),
            PermissionMiddleware(POLICY),
            LoopGuardMiddleware(POLICY.loop),
        ]
        agent = create_agent(
            model, TOOLS, middleware=guards, context_schema=RunContext, checkpointer=saver
        )
        return agent, None
    if variant == "keel_guarded":
        return build_agent(model, TOOLS, policy=POLICY, checkpointer=saver), None
    ledger = Ledger(url)
    tools = [echo_once, refund] if variant == "keel_all_on" else TOOLS
    policy = LEDGER_POLICIES[variant]
    agent = build_agent(model, tools, policy=policy, ledger=ledger, checkpointer=saver)
    return agent, ledger


# -- the savers ------------------------------------------------------------------------------


@dataclass
class Saver:
    """One saver kind: how to get a checkpointer for an agent, and how to count its writes."""

    kind: str
    directory: Path
    pg_url: str | None = None
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    _shared: BaseCheckpointSaver[Any] | None = None
    _counter: psycopg.Connection[Any] | None = None

    def url_for(self, name: str) -> str:
        if self.kind == "sqlite":
            return f"sqlite:///{self.directory / f'{name}.sqlite'}"
        assert self.pg_url is not None
        return self.pg_url

    def checkpointer(self, name: str) -> BaseCheckpointSaver[Any]:
        if self.kind == "sqlite":  # one file per agent, as in agent_overhead.py
            return self.stack.enter_context(Persistence(self.url_for(name)).checkpointer())
        if self._shared is None:  # one PostgresSaver over one pool for all agents
            self._shared = self.stack.enter_context(Persistence(self.pg_url).checkpointer())
        return self._shared

    def count(self, saver: BaseCheckpointSaver[Any], thread_id: str) -> int:
        if self.kind == "sqlite":
            query = "SELECT COUNT(*) FROM checkpoints WHERE thread_id = ?"
            (rows,) = saver.conn.execute(query, (thread_id,)).fetchone()  # type: ignore[attr-defined]
            return int(rows)
        if self._counter is None:
            self._counter = self.stack.enter_context(psycopg.connect(self.pg_url, autocommit=True))
        query = "SELECT COUNT(*) FROM checkpoints WHERE thread_id = %s"
        row = self._counter.execute(query, (thread_id,)).fetchone()
        assert row is not None
        return int(row[0])

    def close(self) -> None:
        self.stack.close()


@contextlib.contextmanager
def fresh_database(base_url: str) -> Iterator[str]:
    """A new database on the server of `base_url`, dropped on exit."""
    name = f"keel_bench_guards_{uuid.uuid4().hex[:10]}"
    ident = sql.Identifier(name)
    parts = urlsplit(base_url)
    server = f"{parts.hostname}:{parts.port or 5432}"
    try:
        with psycopg.connect(base_url, autocommit=True, connect_timeout=5) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(ident))
    except psycopg.Error as exc:
        sys.exit(
            f"Cannot create a database on {server}: "
            f"{exc}\nSet KEEL_BENCH_POSTGRES_URL to a PostgreSQL server you may create "
            "databases on, or run with --sqlite-only."
        )
    try:
        yield urlsplit(base_url)._replace(path=f"/{name}").geturl()
    finally:
        with psycopg.connect(base_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))


# -- one (agent, saver) case -----------------------------------------------------------------


@dataclass
class Case:
    variant: str
    saver: Saver
    steps: int = K
    turns: list[Any] | None = None
    """The model's script; default: `steps` echo calls, then the final answer."""
    model: ScriptedChatModel = field(init=False)
    graph: Any = field(init=False)
    checkpointer: BaseCheckpointSaver[Any] = field(init=False)
    ledger: Ledger | None = field(init=False)
    last_thread: str = ""

    def __post_init__(self) -> None:
        self.model = ScriptedChatModel(script=self.turns or script(self.steps))
        db_name = f"{self.variant}-{self.steps}"
        self.checkpointer = self.saver.checkpointer(db_name)
        url = self.saver.url_for(db_name)
        self.graph, self.ledger = build(self.variant, self.model, self.checkpointer, url)

    @property
    def name(self) -> str:
        return f"{self.variant}/{self.saver.kind}"

    def run(self, message: str = "go") -> dict[str, Any]:
        self.last_thread = f"{self.variant}-{self.steps}-{next(THREAD_IDS)}"
        config = {"configurable": {"thread_id": self.last_thread}}
        inputs = {"messages": [("user", message)]}
        if self.variant in WITH_CONTEXT:
            result: dict[str, Any] = self.graph.invoke(inputs, config, context=CONTEXT)
        else:
            result = self.graph.invoke(inputs, config)
        return result

    def timed_run(self) -> float:
        start = time.perf_counter()
        self.run()
        elapsed = time.perf_counter() - start
        self.model.calls.clear()  # the scripted model records every call; keep memory flat
        return elapsed

    def checkpoints_of_last_run(self) -> int:
        return self.saver.count(self.checkpointer, self.last_thread)

    def spent_usd(self) -> float:
        """What the ledger holds as spent this month (keel_period; 0 for the others)."""
        if self.ledger is None or self.variant not in ("keel_period", "keel_all_on"):
            return 0.0
        return float(self.ledger.run(_spent_flow()))

    def checked_run(self) -> None:
        """One run, validated; the ledger must have recorded exactly its cost."""
        before = self.spent_usd()
        result = self.run()
        validate(self, result)
        if self.variant in ("keel_period", "keel_all_on"):
            recorded = self.spent_usd() - before
            assert abs(recorded - result["usage"]["usd"]) < 1e-9, f"{self.name}: {recorded}"
        self.model.calls.clear()

    def close(self) -> None:
        if self.ledger is not None:
            self.ledger.close()


def _spent_flow() -> Any:
    rows = yield ("SELECT COALESCE(SUM(spent_usd), 0) FROM keel_spend", ())
    return rows[0][0]


def validate(case: Case, result: dict[str, Any]) -> None:
    """Fail loudly unless the run made exactly `case.steps` tool calls and then answered."""
    messages = result["messages"]
    tools = [m for m in messages if isinstance(m, ToolMessage)]
    answers = [m for m in messages if isinstance(m, AIMessage)]
    where = f"{case.name} (steps={case.steps})"
    assert "__interrupt__" not in result, f"{where}: paused for approval"
    assert len(tools) == case.steps, f"{where}: {len(tools)} tool messages, want {case.steps}"
    assert [m.content for m in tools] == [f"echo {i}" for i in range(case.steps)], where
    assert all(m.status == "success" for m in tools), where
    assert len(answers) == case.steps + 1, f"{where}: {len(answers)} AI messages"
    last = messages[-1]
    assert isinstance(last, AIMessage) and last.content == FINAL, f"{where}: ended with {last!r}"
    assert not last.tool_calls, where
    if case.variant in KEEL:
        reason = result["outcome"]["terminated_reason"]
        assert reason == "completed", f"{where}: terminated_reason={reason!r}"
        usage = result["usage"]
        assert usage.get("model_calls", 0) == case.steps + 1, f"{where}: usage {usage}"
        assert usage.get("tool_calls", 0) == case.steps, f"{where}: usage {usage}"
        assert usage["usd"] > 0, f"{where}: no cost counted, so the usd budget would not bite"
        assert not result.get("budget_warnings"), f"{where}: {result.get('budget_warnings')}"


def prove_guards(saver: Saver) -> None:
    """Calling `refund` must pause both guarded agents for approval (the guards are on)."""
    for variant in ("create_agent_mw", "keel_guarded"):
        case = Case(variant, saver, steps=0, turns=[call("refund", order_id="A1"), FINAL])
        result = case.run("refund A1")
        assert "__interrupt__" in result, f"{case.name}: refund ran without approval"
        if variant == "keel_guarded":
            assert result["outcome"]["status"] == "interrupted", result["outcome"]
        assert not any(isinstance(m, ToolMessage) for m in result["messages"]), case.name


# -- measuring -------------------------------------------------------------------------------


def count_writes(saver: Saver) -> dict[str, tuple[int, float]]:
    """Per agent on `saver`: checkpoint writes of a K-step run, and writes per tool step."""
    out: dict[str, tuple[int, float]] = {}
    for variant in VARIANTS:
        writes = {}
        for steps in (0, K):
            case = Case(variant, saver, steps=steps)
            try:
                case.checked_run()
                writes[steps] = case.checkpoints_of_last_run()
            finally:
                case.close()
        out[variant] = (writes[K], (writes[K] - writes[0]) / K)
    return out


# -- main ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument(
        "--min-seconds", type=float, default=1.0, help="time per case per round (default 1.0)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round of 0.1 s")
    parser.add_argument("--sqlite-only", action="store_true", help="skip PostgreSQL")
    args = parser.parse_args()
    rounds, min_seconds = (1, 0.1) if args.quick else (args.rounds, args.min_seconds)
    warn_if_tracing()
    base = os.environ.get("KEEL_BENCH_POSTGRES_URL") or os.environ.get(
        "KEEL_TEST_POSTGRES_URL", DEFAULT_URL
    )

    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="keel-bench-")))
        savers = [Saver("sqlite", tmp)]
        if not args.sqlite_only:
            savers.append(Saver("postgres", tmp, pg_url=stack.enter_context(fresh_database(base))))
        for saver in savers:
            stack.callback(saver.close)
        counts = {}
        for saver in savers:
            counts[saver.kind] = count_writes(saver)
            prove_guards(saver)
        cases = [Case(v, s) for s in savers for v in VARIANTS]
        for case in cases:
            stack.callback(case.close)
        for case in cases:  # warm-up, and proof that every agent does the task
            case.checked_run()
        per_round = measure(cases, rounds, min_seconds)

    report(per_round, counts, [s.kind for s in savers], rounds, min_seconds)


def report(
    per_round: dict[str, list[float]],
    counts: dict[str, dict[str, tuple[int, float]]],
    savers: list[str],
    rounds: int,
    min_seconds: float,
) -> None:
    print(
        f"\n{K} tool steps + final answer per run; {rounds} round(s) x >= {min_seconds:g} s "
        f"per case; Python {sys.version.split()[0]}\n"
    )
    header = f"{'agent':<21} {'saver':<9} {'us/step':>8} {'ckpt/run':>9} {'ckpt/step':>10}"
    print(header)
    print("-" * len(header))
    for saver in savers:
        for variant in VARIANTS:
            us = statistics.median(per_round[f"{variant}/{saver}"]) / K * 1e6
            writes, per_step = counts[saver][variant]
            print(f"{variant:<21} {saver:<9} {us:>8.0f} {writes:>9d} {per_step:>10.1f}")

    print((f"\n{'time ratio':<40}" + "".join(f"{s + ' (range)':<19}" for s in savers)).rstrip())
    ratios: dict[tuple[str, str, str], float] = {}
    for a, b, what, goal in RATIOS:
        row = f"{a + ' / ' + b:<40}"
        for saver in savers:
            each = paired_ratios(per_round, f"{a}/{saver}", f"{b}/{saver}")
            ratio = ratios[(a, b, saver)] = statistics.median(each)
            row += f"{f'{ratio:.2f} ({min(each):.2f}-{max(each):.2f})':<19}"
        if goal is not None:
            met = all(ratios[(a, b, saver)] <= goal for saver in savers)
            what += f": goal <= {goal:.2f} {'met' if met else 'MISSED'}"
        print(f"{row}{what}")
    print("\nBelow 1.00 the first agent is faster. Checkpoint writes keel's guards add per step:")
    print(
        ", ".join(
            f"{saver} {counts[saver]['keel_guarded'][1] - counts[saver]['keel'][1]:+.1f}"
            for saver in savers
        )
        + "\n"
    )
    for saver in savers[:-1]:
        print(
            f"{saver}: guarded_vs_create_agent_mw="
            f"{ratios[('keel_guarded', 'create_agent_mw', saver)]:.2f} "
            f"guarded_vs_unguarded={ratios[('keel_guarded', 'keel', saver)]:.2f}"
        )
        print(
            f"{saver}: all_on_vs_create_agent_mw="
            f"{ratios[('keel_all_on', 'create_agent_mw', saver)]:.2f} "
            f"all_on_vs_unguarded={ratios[('keel_all_on', 'keel', saver)]:.2f}"
        )
    last = savers[-1]
    prefix = "" if last == "postgres" else f"{last}: "
    print(
        f"{prefix}guarded_vs_create_agent_mw="
        f"{ratios[('keel_guarded', 'create_agent_mw', last)]:.2f} "
        f"guarded_vs_unguarded={ratios[('keel_guarded', 'keel', last)]:.2f}"
    )
    print(
        f"{prefix}all_on_vs_create_agent_mw="
        f"{ratios[('keel_all_on', 'create_agent_mw', last)]:.2f} "
        f"all_on_vs_unguarded={ratios[('keel_all_on', 'keel', last)]:.2f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
