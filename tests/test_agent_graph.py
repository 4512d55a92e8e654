"""README "The agent graph": each option adds its node, and only its node.

`[recall]` and `[reflect]` with `memory=True`, `[plan]` with `plan=True`, `[verify]` with
`verify=True` or `checks=` / `judge=`, `[input_guard]` and `[output_guard]` with a `Policy`
(each on unless the policy turns it off), and the `tool_gate` step with a policy.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from langgraph.store.memory import InMemoryStore

from keel import build_agent
from keel.evals import ScriptedChatModel
from keel.guards import Policy, Rule

CORE = {"call_model", "execute_tools", "human_review", "respond"}
POLICY = Policy(rules=(Rule(tool="*", action="allow"),))
JUDGE = ScriptedChatModel(structured={"Verdict": {"passed": True, "reason": "ok"}})


@pytest.mark.parametrize(
    ("options", "added"),
    [
        ({}, set()),
        ({"plan": True}, {"plan"}),
        ({"verify": True}, {"verify"}),
        ({"checks": [lambda answer, state: None]}, {"verify"}),
        ({"judge": JUDGE}, {"verify"}),
        ({"memory": True, "store": InMemoryStore()}, {"recall", "reflect"}),
        ({"policy": POLICY}, {"input_guard", "tool_gate", "output_guard"}),
        ({"policy": dataclasses.replace(POLICY, input_guard=None)}, {"tool_gate", "output_guard"}),
        ({"policy": dataclasses.replace(POLICY, output_guard=None)}, {"input_guard", "tool_gate"}),
    ],
    ids=["bare", "plan", "verify", "checks", "judge", "memory", "policy", "no-in", "no-out"],
)
def test_each_option_adds_its_nodes_and_no_other(options: dict[str, Any], added: set[str]) -> None:
    agent = build_agent(ScriptedChatModel(script=["hi"]), **options)
    assert set(agent.get_graph().nodes) - {"__start__", "__end__"} == CORE | added
