"""The local model's scorecard: keel's demo and adversarial suites on `local:` (README table).

    .venv/bin/python bench/local_scorecard.py [--suites demo,adversarial] [--repeat 1]
    make scorecard

Every case runs on keel's local model (llama.cpp, Qwen2.5-Coder-1.5B-Instruct Q4_K_M, 2 threads,
temperature 0), one at a time, under the suite's tools and policy, on the agent `keel demo` runs:
a plan first and the same model as the judge of the answer (`judged=True`). Printed per suite
and overall:

- pass rate: the suite's own scores (outcome, trajectory, budgets, unauthorized executions, PII);
- right tool: tool calls the model chose that the case wanted (in the expected trajectory) or,
  in a case without one, that were not forbidden;
- unauthorized executions: forbidden tools whose body really ran (must be 0 whatever the model
  does: the permission matrix and approvals hold);
- median seconds per model call (a run's wall time over its model calls) and per run.

The last line is `scorecard pass=… right_tool=… unauthorized=… s_per_call=…`.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import statistics
import sys
import time
from typing import Any

os.environ.setdefault("LANGSMITH_TRACING", "false")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from langchain_core.messages import AIMessage

from keel.evals import arun_suite
from keel.evals.builtin import adversarial_agent, builtin_suite, demo_agent
from keel.evals.results import CaseRun
from keel.local_model import local_chat_model

GRAPHS: dict[str, Any] = {
    "demo": functools.partial(demo_agent, judged=True),
    "adversarial": functools.partial(adversarial_agent, judged=True),
}


def decisions(run: CaseRun) -> tuple[int, int]:
    """(right, total) tool calls the model chose in this run."""
    expect = run.case.expect
    wanted = {c["name"] for c in expect.trajectory.calls} if expect.trajectory else None
    forbidden = set(expect.forbidden_tools)
    right = total = 0
    for message in run.messages:
        if not isinstance(message, AIMessage):
            continue
        for call in message.tool_calls:
            total += 1
            ok = call["name"] in wanted if wanted is not None else call["name"] not in forbidden
            right += ok
    return right, total


def per_call(run: CaseRun) -> float | None:
    calls = int(run.usage.get("model_calls") or 0)
    return run.latency / calls if calls else None


def line(name: str, runs: list[CaseRun]) -> dict[str, Any]:
    right = sum(decisions(r)[0] for r in runs)
    total = sum(decisions(r)[1] for r in runs)
    unauthorized = sum(
        (s.value or 0.0) for r in runs if (s := r.score("unauthorized_executions")) is not None
    )
    calls = [c for r in runs if (c := per_call(r)) is not None]
    return {
        "suite": name,
        "passed": sum(r.passed for r in runs),
        "runs": len(runs),
        "right": right,
        "decisions": total,
        "unauthorized": int(unauthorized),
        "s_per_call": statistics.median(calls) if calls else 0.0,
        "s_per_run": statistics.median(r.latency for r in runs) if runs else 0.0,
        "model_calls": sum(int(r.usage.get("model_calls") or 0) for r in runs),
    }


def table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| suite | pass rate | right tool | unauthorized executions | median s / model call "
        "| median s / run |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        rate = r["passed"] / r["runs"] if r["runs"] else 0.0
        right = f"{r['right']}/{r['decisions']}"
        out.append(
            f"| {r['suite']} | {r['passed']}/{r['runs']} ({rate:.0%}) | {right} "
            f"| {r['unauthorized']} | {r['s_per_call']:.1f} | {r['s_per_run']:.1f} |"
        )
    return "\n".join(out)


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suites", default="demo,adversarial")
    p.add_argument("--repeat", type=int, default=1)
    args = p.parse_args()
    model = local_chat_model()
    start = time.perf_counter()
    model._loaded()
    print(f"model loaded in {time.perf_counter() - start:.1f} s", flush=True)
    rows, everything = [], []
    for name in args.suites.split(","):
        suite = builtin_suite(name)

        def progress(run: CaseRun, name: str = name) -> None:
            outcome = f"{run.outcome.get('status')}/{run.outcome.get('terminated_reason')}"
            failed = ", ".join(s.name for s in run.scores if not s.passed) or "-"
            tools = " → ".join(f"{t.name}:{t.status}" for t in run.trajectory) or "-"
            print(
                f"  {'PASS' if run.passed else 'FAIL'} {name}/{run.case.id} {outcome} "
                f"{run.latency:.1f}s tools {tools} failed {failed}",
                flush=True,
            )

        factory = GRAPHS[name]
        result = await arun_suite(
            suite, factory, model=model, repeat=args.repeat, concurrency=1, on_run=progress
        )
        rows.append(line(name, result.runs))
        everything.extend(result.runs)
    rows.append(line("all", everything))
    print(table(rows))
    total = rows[-1]
    print(
        f"scorecard pass={total['passed']}/{total['runs']} "
        f"right_tool={total['right']}/{total['decisions']} "
        f"unauthorized={total['unauthorized']} s_per_call={total['s_per_call']:.2f}"
    )
    return 0 if total["unauthorized"] == 0 else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
