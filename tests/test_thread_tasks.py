"""A thread's second task is its own: what the planner, the judge, the lesson and `respond` read.

Chat agents live on threads: each user message is a new task on the same history. The planner,
`verify`'s judge and `reflect`'s lesson each read "the task" from the history; they read the
thread's *first* user message (the planner planned the first task once and never again, the
judge judged the second answer against the first question and every earlier tool result, the
lesson listed every earlier task's tools and errors). Each now reads the current task, with
the conversation before it as context only.
"""

from __future__ import annotations

from typing import Any

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    InvalidToolCall,
    SystemMessage,
    ToolMessage,
)
from langgraph.checkpoint.memory import InMemorySaver

from keel import build_agent
from keel.evals import ScriptedChatModel, call
from keel.guards import Budget, Policy, Rule
from keel.memory import extract_lesson
from keel.state import VERIFICATION_KEY, AgentState
from keel.tools import tool

FIRST = {"messages": [("user", "What did I order in A1?")]}
SECOND = {"messages": [("user", "And what is in order B2?")]}
POLICY = Policy(rules=(Rule(tool="lookup_order", action="allow"),))


@tool(risk="read")
def lookup_order(order_id: str) -> str:
    """Look up an order."""
    return f"order {order_id}: a blue kettle, shipped"


def _script() -> list[Any]:
    return [
        call("lookup_order", order_id="A1"),
        "A blue kettle.",
        call("lookup_order", order_id="B2"),
        "Order B2 is a blue kettle too.",
    ]


def _two_tasks(**options: Any) -> dict[str, Any]:
    agent = build_agent(options.pop("model"), [lookup_order], policy=POLICY,
                        checkpointer=InMemorySaver(), **options)  # fmt: skip
    config = {"configurable": {"thread_id": "t"}}
    agent.invoke(FIRST, config)
    result: dict[str, Any] = agent.invoke(SECOND, config)
    return result


def test_the_judge_judges_the_second_task_with_its_own_tool_results() -> None:
    asked: list[str] = []

    def verdict(messages: list[BaseMessage]) -> dict[str, Any]:
        asked.append(messages[-1].text)
        return {"passed": True, "reason": "ok"}

    judge = ScriptedChatModel(structured={"JudgeVerdict": verdict})
    _two_tasks(model=ScriptedChatModel(script=_script()), judge=judge)
    first, second = asked
    assert first.startswith("Task:\nWhat did I order in A1?\n"), first
    task, answer = second.split("\n\nTask:\n")[1].split("\n\nAnswer:\n")
    assert task.startswith("And what is in order B2?\n"), second
    assert "order B2: a blue kettle" in task and "order A1" not in task, second
    assert answer == "Order B2 is a blue kettle too."
    # the earlier conversation is context, without its tool results
    assert "- user: What did I order in A1?\n- assistant: A blue kettle." in second


def test_the_planner_plans_each_task_of_a_thread() -> None:
    planned: list[list[BaseMessage]] = []

    def plan(messages: list[BaseMessage]) -> dict[str, Any]:
        planned.append(messages[1:])
        return {"steps": [f"look up the order ({len(planned)})", "answer"]}

    model = ScriptedChatModel(script=_script(), structured={"Plan": plan})
    result = _two_tasks(model=model, plan=True)
    assert len(planned) == 2, "the second task was not planned"
    assert planned[1][-1].text == "And what is in order B2?"
    assert [m.text for m in planned[1][:-1]] == ["What did I order in A1?", "A blue kettle."]
    # the second task's plan is its own: no step of the first plan is carried over
    assert [s["description"] for s in result["plan"]] == ["look up the order (2)", "answer"]


def test_the_next_task_s_plan_context_keeps_no_unanswered_broken_call() -> None:
    """The first task's model answered text with a call whose arguments did not parse (keel
    answered it, and the model answered again). The second task's planner read the earlier
    conversation as text turns, and kept that message (it has text and no parsed call) without
    keel's answer to its broken call: OpenAI refuses such a history (400), and keel went on
    without a plan, silently, for that task."""
    broken = InvalidToolCall(
        type="invalid_tool_call", name="lookup_order", args='{"order_id": "A1",}', id="bad"
    )
    first = AIMessage(content="Let me look that up.", invalid_tool_calls=[broken])
    model = ScriptedChatModel(
        script=[first, "A blue kettle.", "Order B2 is a blue kettle too."],
        structured={"Plan": {"steps": ["look up the order", "answer"]}},
    )
    result = _two_tasks(model=model, plan=True)
    asked = [c for c in model.calls if isinstance(c[0], SystemMessage) and "plan for" in c[0].text]
    assert len(asked) == 2, model.calls
    assert [m.text for m in asked[1][1:]] == [
        "What did I order in A1?",
        "A blue kettle.",
        "And what is in order B2?",
    ]
    assert [s["description"] for s in result["plan"]] == ["look up the order", "answer"]


def test_a_lesson_is_the_tasks_own() -> None:
    def refund_failed(order: str) -> ToolMessage:
        return ToolMessage("Error: payment API timeout", tool_call_id=order, name="refund",
                           status="error")  # fmt: skip

    state: AgentState = {
        "messages": [
            HumanMessage("refund order 7"),
            AIMessage("", tool_calls=[{"name": "refund", "args": {}, "id": "c1"}]),
            refund_failed("c1"),
            AIMessage("I could not refund it."),
            HumanMessage("what is in order 8?"),
            AIMessage("", tool_calls=[{"name": "lookup_order", "args": {}, "id": "c2"}]),
            ToolMessage("a kettle", tool_call_id="c2", name="lookup_order"),
            AIMessage("A red kettle."),
            HumanMessage(
                "Your answer did not pass verification: the colour is wrong. Revise your answer.",
                additional_kwargs={VERIFICATION_KEY: True},
            ),
            AIMessage("A kettle."),
        ],
        "outcome": {"status": "success", "terminated_reason": "completed", "detail": ""},
    }
    lesson = extract_lesson(state)
    assert lesson is not None
    assert lesson.asked == "what is in order 8?"  # not the first task, nor keel's feedback
    assert lesson.tools_used == ("lookup_order",)
    assert lesson.errors == ()
    assert lesson.answer == "A kettle."


def test_a_partial_answer_tells_what_this_task_found() -> None:
    """A second task cut short by its run budget said "My last answer so far: A blue kettle."
    (the first task's answer) and listed the first task's tool results as found."""
    script = [*_script()[:3], call("lookup_order", order_id="C3")]
    policy = Policy(budget=Budget(tool_calls=1), rules=POLICY.rules)
    agent = build_agent(ScriptedChatModel(script=script), [lookup_order], policy=policy,
                        checkpointer=InMemorySaver())  # fmt: skip
    config = {"configurable": {"thread_id": "t"}}
    agent.invoke(FIRST, config)
    result = agent.invoke(SECOND, config)
    assert result["outcome"]["terminated_reason"] == "budget_exceeded"
    partial = result["messages"][-1].text
    assert "order B2: a blue kettle" in partial, partial
    assert "A1" not in partial and "My last answer so far" not in partial, partial


def test_each_task_gets_its_own_revisions() -> None:
    """`max_revisions=1` counted over the thread: a second task whose first answer failed was
    not sent back once but ended `verification_failed` at once."""
    judged: list[int] = []

    def verdict(messages: list[BaseMessage]) -> dict[str, Any]:
        judged.append(1)
        return {"passed": len(judged) % 2 == 0, "reason": "Say which order."}

    judge = ScriptedChatModel(structured={"JudgeVerdict": verdict})
    model = ScriptedChatModel(script=["draft 1", "final 1", "draft 2", "final 2"])
    agent = build_agent(model, judge=judge, max_revisions=1, checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "t"}}
    first = agent.invoke(FIRST, config)
    second = agent.invoke(SECOND, config)
    assert first["outcome"]["terminated_reason"] == "completed"
    assert second["outcome"]["terminated_reason"] == "completed", second["outcome"]
    assert second["messages"][-1].text == "final 2"
    assert second["revisions"] == 1


def test_a_plan_that_failed_degrades_its_task_and_only_its_task(tmp_path: Any) -> None:
    """Planning is advisory, but a task that went on without a plan says so: in
    `state["warnings"]` and the run record's detail (it was a log line only, which is how a
    planner refused by the provider for a malformed history went unnoticed). The next task,
    planned, carries no warning of the one before."""
    from keel import Ledger, RunContext, RunLog

    planned: list[int] = []

    def plan(messages: list[BaseMessage]) -> dict[str, Any]:
        planned.append(1)
        if len(planned) == 1:
            raise RuntimeError("the provider said 400")
        return {"steps": ["look up the order", "answer"]}

    ledger = Ledger(f"sqlite:///{tmp_path}/keel.db")
    model = ScriptedChatModel(script=_script(), structured={"Plan": plan})
    agent = build_agent(model, [lookup_order], policy=POLICY, checkpointer=InMemorySaver(),
                        plan=True, ledger=ledger)  # fmt: skip
    config: Any = {"configurable": {"thread_id": "t"}}
    first = agent.invoke(FIRST, config, context=RunContext(user_id="u"))
    assert first["outcome"]["terminated_reason"] == "completed" and first["plan"] == []
    (warning,) = first["warnings"]
    assert warning.startswith("plan: planning failed, the run went on without a plan (")
    assert "the provider said 400" in warning
    (record,) = RunLog(ledger).query()
    assert record.status == "success" and "(degraded: plan: planning failed" in record.detail
    second = agent.invoke(SECOND, config, context=RunContext(user_id="u"))
    assert second["warnings"] == [] and len(second["plan"]) == 2
    ledger.close()
