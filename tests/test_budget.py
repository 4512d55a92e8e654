"""Run budgets: `check_budget` as a pure decision, then runs of `build_agent(policy=...)`.

A limit is reached when the amount spent equals it: the run then stops cleanly with
`outcome = {"status": "stopped", "terminated_reason": "budget_exceeded", "detail": ...}` and
`respond`'s partial answer. Tool calls are planned: a batch that would pass the tool-call limit
is not run.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from contextlib import AsyncExitStack
from typing import Any

import pytest
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolCall, ToolMessage
from langgraph.checkpoint.memory import InMemorySaver

from keel import Ledger, Persistence, Price, PriceTable, RunContext, build_agent, tool
from keel.evals import ScriptedChatModel, call
from keel.guards import Budget, BudgetVerdict, PeriodBudget, Policy, Rule, check_budget
from keel.nodes import valid_history

CTX = RunContext(user_id="u1", tenant_id="acme", roles=("support",))
ALLOW_ALL = (Rule(action="allow"),)
# $1 per million input tokens, output free: a call of 100,000 input tokens costs exactly $0.10
PRICES = PriceTable(
    {"scripted": Price(input_per_mtok=1.0, output_per_mtok=0.0)}, include_defaults=False
)


# ===========================================================================================
# check_budget: pure
# ===========================================================================================


def test_exact_message_when_over_the_dollar_limit() -> None:
    verdict = check_budget(Budget(usd=0.5), {"usd": 0.51})
    assert verdict == BudgetVerdict(exceeded="Exceeded the usd limit of 0.5 (usd=0.51)")


def test_a_limit_is_reached_when_spent_equals_it() -> None:
    assert check_budget(Budget(model_calls=3), {"model_calls": 3}) == BudgetVerdict(
        exceeded="Exceeded the model_calls limit of 3 (model_calls=3)"
    )
    assert check_budget(Budget(model_calls=3), {"model_calls": 2}).exceeded is None


@pytest.mark.parametrize(
    ("budget", "usage", "message"),
    [
        (
            Budget(input_tokens=1000),
            {"input_tokens": 1204},
            "Exceeded the input_tokens limit of 1000 (input_tokens=1204)",
        ),
        (
            Budget(output_tokens=50),
            {"output_tokens": 50},
            "Exceeded the output_tokens limit of 50 (output_tokens=50)",
        ),
        (Budget(steps=10), {"steps": 11}, "Exceeded the steps limit of 10 (steps=11)"),
        (
            Budget(usd=0.25),
            {"usd": 0.1 + 0.1 + 0.1},  # 0.30000000000000004 is shown as 0.3
            "Exceeded the usd limit of 0.25 (usd=0.3)",
        ),
        (
            Budget(usd=1e-6),
            {"usd": 1.25e-6},
            "Exceeded the usd limit of 1e-06 (usd=1.25e-06)",
        ),
    ],
)
def test_exact_messages_per_limit(budget: Budget, usage: dict[str, Any], message: str) -> None:
    assert check_budget(budget, usage) == BudgetVerdict(exceeded=message)


def test_the_first_limit_in_field_order_is_reported() -> None:
    budget = Budget(usd=0.1, model_calls=1)
    verdict = check_budget(budget, {"usd": 5.0, "model_calls": 9})
    assert verdict.exceeded == "Exceeded the model_calls limit of 1 (model_calls=9)"


def test_soft_warnings_past_the_ratio() -> None:
    budget = Budget(usd=0.5, model_calls=10)
    assert check_budget(budget, {"usd": 0.42, "model_calls": 5}) == BudgetVerdict(
        warnings=("usd at 84% of 0.5",)
    )
    assert check_budget(budget, {"usd": 0.42, "model_calls": 9}) == BudgetVerdict(
        warnings=("model_calls at 90% of 10", "usd at 84% of 0.5")
    )
    assert check_budget(budget, {"usd": 0.39, "model_calls": 7}) == BudgetVerdict()


def test_soft_ratio_is_configurable() -> None:
    budget = Budget(model_calls=10, soft_ratio=0.5)
    assert check_budget(budget, {"model_calls": 4}).warnings == ()
    assert check_budget(budget, {"model_calls": 5}).warnings == ("model_calls at 50% of 10",)


def test_no_limits_and_no_usage() -> None:
    assert check_budget(Budget(), {"usd": 1e9, "model_calls": 10**6}) == BudgetVerdict()
    assert check_budget(Budget(usd=1, model_calls=1), {}) == BudgetVerdict()


def test_tool_calls_are_planned_before_they_run() -> None:
    budget = Budget(tool_calls=3)
    # 2 done + 1 planned reaches the limit: allowed, with a warning
    assert check_budget(budget, {"tool_calls": 2}, planned_tool_calls=1) == BudgetVerdict(
        warnings=("tool_calls at 100% of 3",)
    )
    # 2 done + 2 planned would pass it
    assert check_budget(budget, {"tool_calls": 2}, planned_tool_calls=2) == BudgetVerdict(
        exceeded="Exceeded the tool_calls limit of 3 (tool_calls=4)"
    )
    # all spent, nothing planned: the model may still answer (any tool call it makes is stopped)
    assert check_budget(budget, {"tool_calls": 3}).exceeded is None


def test_planned_tool_calls_count_only_against_the_tool_call_limit() -> None:
    budget = Budget(model_calls=3, steps=3)
    verdict = check_budget(budget, {"model_calls": 1, "steps": 1}, planned_tool_calls=50)
    assert verdict == BudgetVerdict()


def test_wall_seconds_from_the_task_start() -> None:
    budget = Budget(wall_seconds=30)
    assert check_budget(budget, {}, started_at=100.0, now=130.5) == BudgetVerdict(
        exceeded="Exceeded the wall_seconds limit of 30 (wall_seconds=30.5)"
    )
    assert check_budget(budget, {}, started_at=100.0, now=125.0) == BudgetVerdict(
        warnings=("wall_seconds at 83% of 30",)
    )
    # no clock yet (the task's first model call has not happened): nothing spent
    assert check_budget(budget, {}, started_at=None, now=10**9) == BudgetVerdict()


# ===========================================================================================
# End to end
# ===========================================================================================


class Counter:
    def __init__(self) -> None:
        self.ran: list[str] = []

    def tools(self) -> list[Any]:
        @tool
        def lookup(q: str) -> str:
            """Look something up."""
            self.ran.append(q)
            return f"found {q}"

        return [lookup]


def priced(message: AIMessage, tokens_in: int = 100_000, tokens_out: int = 10) -> AIMessage:
    """A scripted turn with fixed token usage (so dollars and tokens are exact)."""
    message.usage_metadata = {
        "input_tokens": tokens_in,
        "output_tokens": tokens_out,
        "total_tokens": tokens_in + tokens_out,
    }
    return message


def lookups(n: int, final: str = "All found.") -> list[Any]:
    return [priced(call("lookup", q=str(i))) for i in range(1, n + 1)] + [
        priced(AIMessage(content=final))
    ]


def agent_for(model: ScriptedChatModel, counter: Counter, budget: Budget, saver: Any = None) -> Any:
    policy = Policy(budget=budget, rules=ALLOW_ALL)
    return build_agent(model, counter.tools(), policy=policy, prices=PRICES, checkpointer=saver)


async def run(agent: Any, payload: Any, mode: str, config: Any = None) -> dict[str, Any]:
    if mode == "invoke":
        return dict(agent.invoke(payload, config, context=CTX))
    return dict(await agent.ainvoke(payload, config, context=CTX))


def tool_statuses(messages: Sequence[BaseMessage]) -> list[str]:
    return [m.response_metadata["keel_status"] for m in messages if isinstance(m, ToolMessage)]


def assert_partial_answer(final: dict[str, Any], detail: str) -> None:
    last = final["messages"][-1]
    assert isinstance(last, AIMessage)
    assert last.response_metadata == {"keel_partial": True}
    assert last.tool_calls == []
    assert last.text.startswith(f"I had to stop before finishing (budget_exceeded): {detail}.")
    assert valid_history(final["messages"]) == final["messages"]


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
@pytest.mark.parametrize(
    ("budget", "detail", "model_calls", "ran"),
    [
        # the 2nd call is the last: its tool call is not run (nothing could read its result)
        (Budget(model_calls=2), "Exceeded the model_calls limit of 2 (model_calls=2)", 2, ["1"]),
        # $0.10 a call: after 3 calls $0.30 >= $0.25
        (Budget(usd=0.25), "Exceeded the usd limit of 0.25 (usd=0.3)", 3, ["1", "2"]),
        (
            Budget(input_tokens=250_000),
            "Exceeded the input_tokens limit of 250000 (input_tokens=300000)",
            3,
            ["1", "2"],
        ),
        (
            Budget(output_tokens=20),
            "Exceeded the output_tokens limit of 20 (output_tokens=20)",
            2,
            ["1"],
        ),
        # a step is a model turn or a tool round: call, tools, call, tools, (stop)
        (Budget(steps=4), "Exceeded the steps limit of 4 (steps=4)", 2, ["1", "2"]),
    ],
    ids=["model_calls", "usd", "input_tokens", "output_tokens", "steps"],
)
async def test_a_run_over_its_budget_stops_with_a_partial_answer(
    mode: str, budget: Budget, detail: str, model_calls: int, ran: list[str]
) -> None:
    counter = Counter()
    model = ScriptedChatModel(script=lookups(5))
    final = await run(agent_for(model, counter, budget), {"messages": [("user", "go")]}, mode)

    assert final["outcome"] == {
        "status": "stopped",
        "terminated_reason": "budget_exceeded",
        "detail": detail,
    }
    assert len(model.calls) == model_calls
    assert final["usage"]["model_calls"] == model_calls
    assert counter.ran == ran
    assert final["usage"].get("tool_calls", 0) == len(ran)
    assert_partial_answer(final, detail)
    # every tool call has its answer: the ones cut off say why
    stopped = [
        m
        for m in final["messages"]
        if isinstance(m, ToolMessage) and m.response_metadata["keel_status"] != "success"
    ]
    assert [m.content for m in stopped] == [f"Not run: {detail}."] * len(stopped)
    assert {m.response_metadata["keel_status"] for m in stopped} <= {"budget_stopped"}


def test_the_usd_budget_holds_with_the_default_price_table() -> None:
    counter = Counter()
    model = ScriptedChatModel(script=lookups(5))
    # default prices: scripted is $1 in / $2 out per 1M tokens; 100k in + 10 out = $0.10002
    agent = build_agent(
        model, counter.tools(), policy=Policy(budget=Budget(usd=0.15), rules=ALLOW_ALL)
    )
    final = agent.invoke({"messages": [("user", "go")]}, context=CTX)
    assert final["outcome"]["detail"] == "Exceeded the usd limit of 0.15 (usd=0.20004)"
    assert final["usage"]["usd"] == pytest.approx(0.20004)


@pytest.mark.parametrize(
    ("budget", "spent"),
    [
        (Budget(output_tokens=2_000), "output_tokens"),
        (Budget(input_tokens=5_000), "input_tokens"),
        (Budget(usd=0.004), "usd"),
    ],
    ids=["output-tokens", "input-tokens", "usd"],
)
def test_a_model_that_reports_no_usage_is_counted_by_estimate(
    budget: Budget, spent: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A provider that reports no `usage_metadata` (some OpenAI-compatible servers, streaming)
    must not make token and dollar budgets count nothing: keel counts an estimate."""
    counter = Counter()
    long_answer = "x" * 4_000  # about 1,000 tokens a turn
    script = [
        AIMessage(long_answer, tool_calls=call("lookup", q=str(i)).tool_calls) for i in range(20)
    ]
    model = ScriptedChatModel(script=[*script, "done"], report_usage=False)
    prices = PriceTable({"scripted": Price(input_per_mtok=1.0, output_per_mtok=1.0)})
    policy = Policy(budget=budget, rules=ALLOW_ALL)
    agent = build_agent(model, counter.tools(), policy=policy, prices=prices)
    final = agent.invoke({"messages": [("user", "go")]}, context=CTX)

    assert all(answer.usage_metadata is None for answer in model.answers)  # nothing reported
    assert final["outcome"]["terminated_reason"] == "budget_exceeded"
    assert f"Exceeded the {spent} limit" in final["outcome"]["detail"]
    assert len(counter.ran) < 10
    warned = [r for r in caplog.records if "reported no usage_metadata" in r.getMessage()]
    assert len(warned) <= 1  # once per model and process


def test_a_tool_call_budget_answers_the_extra_call_and_keeps_history_valid(db_url: str) -> None:
    counter = Counter()
    model = ScriptedChatModel(script=lookups(5))
    with Persistence(db_url).checkpointer() as saver:
        agent = agent_for(model, counter, Budget(tool_calls=2), saver)
        config = {"configurable": {"thread_id": "tools"}}
        final = agent.invoke({"messages": [("user", "go")]}, config, context=CTX)
        stored = agent.get_state(config)

    detail = "Exceeded the tool_calls limit of 2 (tool_calls=3)"
    assert final["outcome"] == {
        "status": "stopped",
        "terminated_reason": "budget_exceeded",
        "detail": detail,
    }
    assert counter.ran == ["1", "2"]
    assert final["usage"]["tool_calls"] == 2
    assert tool_statuses(final["messages"]) == ["success", "success", "budget_stopped"]
    extra = [m for m in final["messages"] if isinstance(m, ToolMessage)][-1]
    assert extra.content == f"Not run: {detail}."
    assert extra.status == "error"
    assert_partial_answer(final, detail)
    assert stored.next == ()
    assert valid_history(stored.values["messages"]) == stored.values["messages"]


def test_a_parallel_batch_runs_the_calls_that_fit_the_tool_call_budget() -> None:
    counter = Counter()
    batch = AIMessage(
        content="",
        tool_calls=[ToolCall(name="lookup", args={"q": q}, id=f"p{q}") for q in "abc"],
    )
    model = ScriptedChatModel(script=[batch, "done"])
    final = agent_for(model, counter, Budget(tool_calls=2)).invoke(
        {"messages": [("user", "go")]}, context=CTX
    )
    assert counter.ran == ["a", "b"]
    assert tool_statuses(final["messages"]) == ["success", "success", "budget_stopped"]


def test_a_new_message_after_a_budget_stop_is_a_new_run_with_its_own_budget(
    db_url: str,
) -> None:
    """What works, on a real checkpointer.

    A budget stop ends the graph (`next == ()`): nothing is pending, so `invoke(None)` is a
    no-op. A run budget is per run (a task on a thread): a new user message on the same thread
    starts a new run, which may spend its own budget (per-user and per-tenant period budgets
    are what bound a thread across runs). The model sees everything so far, including the calls
    that were not run, and the thread's usage keeps adding up.
    """
    counter = Counter()

    def next_step(messages: Sequence[BaseMessage]) -> AIMessage:
        """Look up 1, then 2, then answer: whatever is missing from the thread so far."""
        found = {m.text for m in messages if isinstance(m, ToolMessage) and m.status == "success"}
        for q in ("1", "2"):
            if f"found {q}" not in found:
                return priced(call("lookup", q=q))
        return priced(AIMessage(content="1 and 2 found."))

    # the 2nd call asks for lookup 2, which model_calls=2 cuts off
    model = ScriptedChatModel(script=[next_step] * 10)
    config = {"configurable": {"thread_id": "resume"}}
    detail = "Exceeded the model_calls limit of 2 (model_calls=2)"
    with Persistence(db_url).checkpointer() as saver:
        small = agent_for(model, counter, Budget(model_calls=2), saver)
        stopped = small.invoke({"messages": [("user", "find 1 and 2")]}, config, context=CTX)
        assert stopped["outcome"]["detail"] == detail
        assert counter.ran == ["1"]
        assert small.get_state(config).next == ()

        # input None: the graph has ended, so nothing runs and nothing changes
        unchanged = small.invoke(None, config, context=CTX)
        assert unchanged["outcome"]["detail"] == detail
        assert len(model.calls) == 2

        final = small.invoke({"messages": [("user", "continue")]}, config, context=CTX)

    assert final["outcome"] == {
        "status": "success",
        "terminated_reason": "completed",
        "detail": "final answer given",
    }
    assert counter.ran == ["1", "2"]
    assert final["messages"][-1].text == "1 and 2 found."
    assert final["usage"]["model_calls"] == 4  # the thread's totals
    assert final["usage"]["tool_calls"] == 2
    # the new run's first model call saw the whole thread, with the cut-off call answered
    seen = model.calls[2]
    assert [m.response_metadata.get("keel_status") for m in seen if isinstance(m, ToolMessage)] == [
        "success",
        "budget_stopped",
    ]
    assert isinstance(seen[-1], HumanMessage) and seen[-1].text == "continue"
    assert valid_history(final["messages"]) == final["messages"]


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
async def test_a_run_budget_counts_only_the_current_run(db_url: str, mode: str) -> None:
    """Two runs on one thread, each under the run budget, their sum over it: the second is not
    stopped. The per-user period budget, which counts both, stops the third."""
    counter = Counter()
    ledger = Ledger(db_url)
    # each run: a lookup and an answer = 2 model calls, 1 tool call, $0.20
    script = [*lookups(1, "one"), *lookups(1, "two"), *lookups(1, "three")]
    model = ScriptedChatModel(script=script)
    policy = Policy(
        budget=Budget(model_calls=3, tool_calls=1, usd=0.35),
        period_budgets=(PeriodBudget(scope="user", period="month", usd=0.5),),
        rules=ALLOW_ALL,
    )
    config: Any = {"configurable": {"thread_id": f"two-runs-{mode}"}}
    persistence = Persistence(db_url)
    async with AsyncExitStack() as stack:
        if mode == "invoke":
            saver = stack.enter_context(persistence.checkpointer())
        else:
            saver = await stack.enter_async_context(persistence.acheckpointer())
        agent = build_agent(
            model, counter.tools(), policy=policy, prices=PRICES, checkpointer=saver,
            ledger=ledger,
        )  # fmt: skip
        first = await run(agent, {"messages": [("user", "one")]}, mode, config)
        second = await run(agent, {"messages": [("user", "two")]}, mode, config)
        assert counter.ran == ["1", "1"]
        third = await run(agent, {"messages": [("user", "three")]}, mode, config)
    assert first["outcome"]["terminated_reason"] == "completed", first["outcome"]
    assert second["outcome"]["terminated_reason"] == "completed", second["outcome"]
    assert second["usage"]["model_calls"] == 4 and second["usage"]["tool_calls"] == 2
    assert abs(second["usage"]["usd"] - 0.4) < 1e-9  # the thread's totals are past the budget
    # the month's $0.50 counts every run: its third lookup spends it, the answer is refused
    assert third["outcome"]["terminated_reason"] == "budget_exceeded", third["outcome"]
    assert third["outcome"]["detail"].startswith("Exceeded the user monthly usd budget of 0.5")
    await ledger.aclose()


def test_the_planners_calls_count_towards_the_run_budget() -> None:
    model = ScriptedChatModel(
        script=lookups(1), structured={"Plan": {"steps": ["look up", "answer"]}}
    )
    policy = Policy(budget=Budget(model_calls=2), rules=ALLOW_ALL)
    agent = build_agent(model, Counter().tools(), policy=policy, plan=True)
    final = agent.invoke({"messages": [("user", "go")]}, context=CTX)
    # plan (1) + lookup (2): the answer would be the 3rd model call
    assert final["outcome"]["terminated_reason"] == "budget_exceeded", final["outcome"]
    assert final["usage"]["model_calls"] == 2


def test_budget_warnings_appear_past_the_soft_ratio() -> None:
    counter = Counter()
    model = ScriptedChatModel(script=lookups(4))  # 5 model calls in all
    agent = agent_for(model, counter, Budget(model_calls=5, soft_ratio=0.5), InMemorySaver())
    config = {"configurable": {"thread_id": "warn"}}
    seen: list[list[str]] = []
    for chunk in agent.stream(
        {"messages": [("user", "go")]}, config, context=CTX, stream_mode="values"
    ):
        warnings = chunk.get("budget_warnings")
        if warnings is not None and warnings not in seen:
            seen.append(warnings)
    final = agent.get_state(config).values
    # checked before each call: 2 of 5 spent is below 50%, then 60%, then 80%
    assert seen == [["model_calls at 60% of 5"], ["model_calls at 80% of 5"]]
    assert final["budget_warnings"] == ["model_calls at 80% of 5"]
    assert final["outcome"]["terminated_reason"] == "completed"  # all 5 calls were allowed
    assert len(model.calls) == 5


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
async def test_wall_seconds_stop_a_slow_run_and_restart_for_a_new_task(mode: str) -> None:
    counter = Counter()

    def answer(messages: Sequence[BaseMessage]) -> AIMessage | str:
        last = messages[-1]
        if isinstance(last, HumanMessage) and last.text == "new task":
            return "fresh answer"
        return call("lookup", q=str(len(messages)))

    model = ScriptedChatModel(script=[answer] * 10, latency=0.2)
    agent = agent_for(model, counter, Budget(wall_seconds=0.3), InMemorySaver())
    config = {"configurable": {"thread_id": "wall"}}
    final = await run(agent, {"messages": [("user", "go")]}, mode, config)

    detail = final["outcome"]["detail"]
    found = re.fullmatch(
        r"Exceeded the wall_seconds limit of 0\.3 \(wall_seconds=([\d.]+)\)", detail
    )
    assert found is not None, detail
    assert float(found.group(1)) >= 0.3
    assert final["outcome"]["terminated_reason"] == "budget_exceeded"
    assert 1 <= len(model.calls) <= 3
    assert_partial_answer(final, detail)

    # the wall clock belongs to the task: a new user message starts it again
    calls_before = len(model.calls)
    fresh = await run(agent, {"messages": [("user", "new task")]}, mode, config)
    assert fresh["outcome"]["terminated_reason"] == "completed"
    assert fresh["messages"][-1].text == "fresh answer"
    assert len(model.calls) == calls_before + 1
