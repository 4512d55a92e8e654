"""The suite runner on real graphs: keel's demo agent, approvals, repeats, concurrency, a
graph that raises, and model overrides."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, MessagesState, StateGraph

from keel.errors import UserError
from keel.evals import ScriptedChatModel, call
from keel.evals.builtin import builtin_suite
from keel.evals.runner import arun_suite, load_graph, run_suite
from keel.evals.suite import Suite

IN_FLIGHT = {"now": 0, "max": 0}


def slow_graph(model: BaseChatModel) -> Any:
    """A plain LangGraph graph (no keel) that tracks how many runs are in flight."""

    async def node(state: MessagesState) -> dict[str, Any]:
        IN_FLIGHT["now"] += 1
        IN_FLIGHT["max"] = max(IN_FLIGHT["max"], IN_FLIGHT["now"])
        await asyncio.sleep(0.05)
        IN_FLIGHT["now"] -= 1
        return {"messages": [("ai", "done")]}

    graph = StateGraph(MessagesState)
    graph.add_node("node", node)
    graph.add_edge(START, "node")
    graph.add_edge("node", END)
    return graph.compile(checkpointer=InMemorySaver())


def broken_graph(model: BaseChatModel) -> Any:
    raise RuntimeError("cannot build")


def suite(*cases: dict[str, Any], **top: Any) -> Suite:
    return Suite.from_dict({"cases": list(cases), **top})


async def test_the_demo_suite_passes_on_the_demo_agent_and_scores_what_ran() -> None:
    result = await arun_suite(builtin_suite("demo"))
    assert result.pass_rate == 1.0, [(r.case.id, r.scores) for r in result.failed()]
    approved, rejected = result.runs
    assert [e.tool for e in approved.executions] == [
        "lookup_order",
        "search_policy",
        "issue_refund",
    ]
    assert "issue_refund" not in [e.tool for e in rejected.executions]
    assert rejected.outcome["terminated_reason"] == "rejected"
    assert [t.status for t in rejected.trajectory][-1] == "rejected"
    assert approved.usage["model_calls"] == 4 and approved.steps > 4 and approved.latency > 0
    assert result.summary()["totals"] == {"unauthorized_executions": 0.0}


async def test_repeat_and_concurrency() -> None:
    IN_FLIGHT["max"] = 0
    cases = [{"id": f"c{i}", "input": "hi"} for i in range(3)]
    result = await arun_suite(suite(*cases, model="keel:demo"), slow_graph, repeat=2, concurrency=3)
    assert [(r.case.id, r.repeat) for r in result.runs] == [
        (f"c{i}", k) for i in range(3) for k in range(2)
    ]
    assert IN_FLIGHT["max"] == 3
    IN_FLIGHT["max"] = 0
    await arun_suite(suite(*cases, model="keel:demo"), slow_graph, concurrency=1)
    assert IN_FLIGHT["max"] == 1


BUILDS: list[int] = []  # asyncio tasks alive at each graph build


def counting_graph(model: BaseChatModel) -> Any:
    """`slow_graph`, noting how many asyncio tasks exist as each run builds its graph."""
    BUILDS.append(len(asyncio.all_tasks()))
    return slow_graph(model)


class Enough(Exception):
    pass


STOPPED: list[object] = []


def _stop(run: object) -> None:
    """Fail the first run only: the other worker would take the next job if not stopped."""
    if not STOPPED:
        STOPPED.append(run)
        raise Enough


async def test_a_big_repeat_builds_each_run_only_when_it_starts() -> None:
    # (every run's coroutine and task was built up front: 2,001 tasks before the first run,
    # memory in proportion to --repeat; and a failing run left the others running on)
    BUILDS.clear()
    STOPPED.clear()
    with pytest.raises(Enough):
        await arun_suite(
            suite({"id": "a", "input": "hi"}, model="keel:demo"),
            counting_graph,
            repeat=2_000,
            concurrency=2,
            on_run=_stop,
        )
    assert BUILDS[0] <= 2 + 1  # the two workers and the test's own task
    started = len(BUILDS)
    assert started <= 4  # one run each, and at most one more that began as the first failed
    await asyncio.sleep(0.3)  # a worker left going would have started more runs by now
    assert len(BUILDS) == started  # the failure stopped the other worker


async def test_runs_keep_case_then_repeat_order_when_they_finish_out_of_order() -> None:
    cases = [{"id": f"c{i}", "input": "hi"} for i in range(3)]
    result = await arun_suite(suite(*cases, model="keel:demo"), slow_graph, repeat=3, concurrency=4)
    assert [(r.case.id, r.repeat) for r in result.runs] == [
        (f"c{i}", k) for i in range(3) for k in range(3)
    ]


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"repeat": 0}, "repeat must be a whole number of 1 or more, got 0."),
        ({"repeat": -1}, "repeat must be a whole number of 1 or more, got -1."),
        ({"repeat": "3"}, "repeat must be a whole number of 1 or more, got '3'."),
        ({"repeat": True}, "repeat must be a whole number of 1 or more, got True."),
        ({"concurrency": 1.5}, "concurrency must be a whole number of 1 or more, got 1.5."),
    ],
)
async def test_bad_counts_are_refused_before_anything_runs(
    options: dict[str, Any], says: str
) -> None:
    BUILDS.clear()
    with pytest.raises(UserError, match=re.escape(says)):
        await arun_suite(
            suite({"id": "a", "input": "hi"}, model="keel:demo"), counting_graph, **options
        )
    assert BUILDS == []


async def test_a_graph_that_raises_is_a_failed_run_not_a_crash() -> None:
    result = await arun_suite(suite({"id": "a", "input": "hi"}, model="keel:demo"), broken_graph)
    (run,) = result.runs
    assert run.raised == "RuntimeError: cannot build" and not run.passed
    assert result.pass_rate == 0.0


async def test_the_model_option_overrides_cases_and_an_unmodelled_case_is_an_error() -> None:
    scripted = ScriptedChatModel(script=[call("lookup_order", order_id="A1002"), "It shipped."])
    expect = {"status": "success", "trajectory": {"args": "ignore", "calls": ["lookup_order"]}}
    spec = {"id": "a", "input": "where is A1002?", "expect": expect}
    result = await arun_suite(suite(spec), model=scripted)
    assert result.pass_rate == 1.0 and result.runs[0].model == "scripted"
    with pytest.raises(UserError, match="Case 'a' has no model"):
        await arun_suite(suite(spec))


def test_load_graph_errors_and_the_sync_entry_point() -> None:
    with pytest.raises(UserError, match="must be 'module:function'"):
        load_graph("keel.evals.builtin")
    with pytest.raises(UserError, match="Cannot load graph factory"):
        load_graph("keel.evals.builtin:nope")
    result = run_suite(suite({"id": "a", "input": "hi"}, model="keel:demo"), slow_graph)
    assert result.runs[0].outcome == {} and result.runs[0].answer == "done"


async def test_the_sync_entry_point_refuses_a_running_loop() -> None:
    with pytest.raises(UserError, match="Use `await arun_suite"):
        run_suite(suite({"id": "a", "input": "hi"}, model="keel:demo"), slow_graph)
