"""Once a run's `wall_seconds` has passed, keel makes no further model call for it.

The agent's own turns checked the run clock before each call; the planner's, the judge's, the
supervisor router's and the injection detector's calls checked the run budget without it, so a
run past its `wall_seconds` still made them (they stopped only while waiting for a period
budget's room). Each run here spends its limit in a slow tool or a slow model turn first; the
next call of the path under test must not be made, and the run ends as `budget_exceeded` naming
`wall_seconds`, not with an exception. keel's scripted models are the only doubles.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from langchain_core.messages import AIMessage, BaseMessage

from keel import RunContext, build_agent
from keel.evals import ScriptedChatModel
from keel.graphs import FINISH, build_supervisor
from keel.guards import Budget, InputGuardPolicy, ModelDetector, Policy, Rule

ALICE = RunContext(user_id="alice", tenant_id="acme")
LIMIT = 0.5
"""Seconds of the runs' `wall_seconds` limit."""
SLOW = 0.8
"""Seconds the slow tool or model turn takes: past `LIMIT`."""
PLAN = {"Plan": {"steps": ["look it up", "answer"]}}
VERDICT = {"JudgeVerdict": {"passed": True, "reason": "ok"}}


def _policy(**more: Any) -> Policy:
    return Policy(
        rules=(Rule(action="allow"),), loop=None, budget=Budget(wall_seconds=LIMIT), **more
    )


def _lookup_fails(city: str) -> str:
    """Look the weather up (slowly, and it fails)."""
    time.sleep(SLOW)
    raise RuntimeError("the weather service is down")


def _lookup(city: str) -> str:
    """Look the weather up (slowly)."""
    time.sleep(SLOW)
    return f"sunny in {city}"


def _asks(tool: str) -> AIMessage:
    return AIMessage("", tool_calls=[{"name": tool, "args": {"city": "Oslo"}, "id": "c1"}])


def _planner() -> tuple[Any, ScriptedChatModel]:
    """The plan's step fails in a slow tool: the replan comes after the limit."""
    model = ScriptedChatModel(script=[_asks("_lookup_fails"), AIMessage("done")], structured=PLAN)
    agent = build_agent(model, [_lookup_fails], plan=True, policy=_policy())
    return agent, model


def _judge() -> tuple[Any, ScriptedChatModel]:
    """The agent's one turn is slow: the judge's call comes after the limit."""
    judge = ScriptedChatModel(structured=VERDICT)
    model = ScriptedChatModel(script=[AIMessage("done")], latency=SLOW)
    return build_agent(model, judge=judge, policy=_policy()), judge


def _detector() -> tuple[Any, ScriptedChatModel]:
    """The detector looks at the user's message, then (after the slow tool) at its result."""
    detector = ScriptedChatModel(
        structured={"InjectionVerdict": {"injection": False, "reason": "plain"}}
    )
    guard = InputGuardPolicy(detector=ModelDetector(model=detector))
    model = ScriptedChatModel(script=[_asks("_lookup"), AIMessage("done")])
    return build_agent(model, [_lookup], policy=_policy(input_guard=guard)), detector


def _routing(messages: list[BaseMessage]) -> dict[str, str]:
    """To the agent, then finish."""
    answered = any(isinstance(m, AIMessage) and m.name == "w" for m in messages)
    return {"agent": FINISH if answered else "w", "task": "t"}


def _router() -> tuple[Any, ScriptedChatModel]:
    """The agent's turn is slow: the second routing call comes after the limit."""
    worker = build_agent(ScriptedChatModel(script=["done"], latency=SLOW), name="w")
    router = ScriptedChatModel(structured={"Route": _routing})
    sup = build_supervisor({"w": worker}, router, policy=_policy(name="sup"))
    return sup, router


def _supervised_judge() -> tuple[Any, ScriptedChatModel]:
    """An agent of no budget under a supervisor's: the supervisor's wall_seconds holds its judge."""
    judge = ScriptedChatModel(structured=VERDICT)
    model = ScriptedChatModel(script=[AIMessage("done")], latency=SLOW)
    worker = build_agent(model, judge=judge, name="w")
    router = ScriptedChatModel(structured={"Route": _routing})
    return build_supervisor({"w": worker}, router, policy=_policy(name="sup")), judge


BUILDERS = {
    "planner": (_planner, 2),  # the plan and the turn that called the tool; no replan
    "judge": (_judge, 0),
    "detector": (_detector, 1),  # the user's message; not the tool's result
    "router": (_router, 1),  # the first route; not the one after the agent
    "supervised judge": (_supervised_judge, 0),
}


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
@pytest.mark.parametrize("path", list(BUILDERS))
async def test_no_model_call_starts_after_the_runs_wall_seconds(path: str, mode: str) -> None:
    build, calls = BUILDERS[path]
    graph, model = build()
    task = {"messages": [("user", "What is the weather in Oslo?")]}
    config = {"configurable": {"thread_id": f"{path}-{mode}"}}
    if mode == "invoke":
        result = await asyncio.to_thread(graph.invoke, task, config, context=ALICE)
    else:
        result = await graph.ainvoke(task, config, context=ALICE)
    assert len(model.calls) == calls, [m[-1].content for m in model.calls]
    assert result["outcome"]["terminated_reason"] == "budget_exceeded", result["outcome"]
    assert result["outcome"]["detail"].startswith(
        f"Exceeded the wall_seconds limit of {LIMIT:g} (wall_seconds="
    ), result["outcome"]
