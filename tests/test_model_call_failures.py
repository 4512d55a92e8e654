"""A model call whose ledger fails, or whose model is slow, still ends the run with an outcome.

- The ledger's database fails (its SQLite file replaced by a directory): the run ends as
  `error` with the error category `storage`, the model is not called and nothing is reported
  as a model failure. No mocks: real ledgers, really broken.
- A model slower than `ModelTimeoutPolicy.attempt_timeout`: keel stops waiting, and moves to
  the next model (`fallback=True`) or ends the run as `timeout`.
- A `model_retry` whose numbers are no limit (NaN, infinity, a fraction, a negative wait) is
  refused when the agent is built; many retries of an outage end on the fallback model.
"""

from __future__ import annotations

import asyncio
import math
import shutil
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langgraph.types import RetryPolicy

from keel import Ledger, Price, PriceTable, RunContext, build_agent
from keel.db.runs import error_category
from keel.evals import ScriptedChatModel
from keel.guards import BreakerPolicy, ModelTimeoutPolicy, PeriodBudget, Policy, Rule

ALICE = RunContext(user_id="alice", tenant_id="acme")
ALLOW = (Rule(action="allow"),)
MONTHLY = Policy(rules=ALLOW, period_budgets=(PeriodBudget(usd=10.0),))
BREAKER = Policy(rules=ALLOW, model_breaker=BreakerPolicy(failure_threshold=3))


def _broken_sqlite_ledger(tmp_path: Path) -> Ledger:
    """A ledger that was set up, whose database file is then replaced by a directory.

    The ledger keeps its SQLite connections open (an open file outlives its unlinking), so
    they are closed too: the next transaction opens the path again, and fails.
    """
    path = tmp_path / "keel.db"
    ledger = Ledger(f"sqlite:///{path}")
    ledger.setup()
    ledger._disconnect()
    path.unlink()
    path.mkdir()
    return ledger


async def _run(agent: Any, mode: str) -> Any:
    state = {"messages": [("user", "hi")]}
    if mode == "ainvoke":
        final = await agent.ainvoke(state, context=ALICE)
        await _aiosqlite_stopped()
        return final
    return agent.invoke(state, context=ALICE)


async def _aiosqlite_stopped() -> None:
    """Let aiosqlite's worker threads end while the event loop is open.

    After a failed connect, aiosqlite stops its worker thread without awaiting it; a thread
    that ends after the test's loop closed raises "Event loop is closed" in a later test.
    """
    for _ in range(500):
        if not any("_connection_worker_thread" in t.name for t in threading.enumerate()):
            return
        await asyncio.sleep(0.01)


def _assert_storage_failure(final: Any, model: ScriptedChatModel) -> None:
    result = final["outcome"]
    assert result["status"] == "error"
    raised = "storage failed: the ledger raised StorageError: cannot open"
    assert result["detail"].startswith(raised)
    assert "model call failed" not in result["detail"]
    assert error_category(result) == "storage"
    assert model.calls == [], "the model is never called without its budget and breaker"


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
@pytest.mark.parametrize("policy", [MONTHLY, BREAKER], ids=["spend", "breaker"])
async def test_a_failing_ledger_ends_the_run_as_a_storage_error(
    tmp_path: Path, mode: str, policy: Policy
) -> None:
    model = ScriptedChatModel(script=["hello"])
    ledger = _broken_sqlite_ledger(tmp_path)
    agent = build_agent(model, policy=policy, ledger=ledger, model_retry=RetryPolicy())
    final = await _run(agent, mode)
    _assert_storage_failure(final, model)
    assert final["usage"].get("model_calls", 0) == 0


def _breaking(tmp_path: Path) -> tuple[Ledger, Any]:
    """A working ledger, and a function that breaks its database when called."""
    path = tmp_path / "keel.db"
    ledger = Ledger(f"sqlite:///{path}")

    def break_it() -> None:
        shutil.move(path, tmp_path / "moved.db")
        path.mkdir()
        ledger._disconnect()  # its open connections would still reach the moved file

    return ledger, break_it


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
async def test_a_ledger_that_fails_while_the_model_answers_ends_the_run_as_storage(
    tmp_path: Path, mode: str
) -> None:
    """The answer's cost cannot be settled: the run stops, and the call is still counted."""
    ledger, break_it = _breaking(tmp_path)

    def answer(messages: Any) -> str:
        break_it()
        return "Paris."

    agent = build_agent(ScriptedChatModel(script=[answer]), policy=MONTHLY, ledger=ledger)
    final = await _run(agent, mode)
    detail = final["outcome"]["detail"]
    assert detail.startswith("storage failed: the ledger raised StorageError: cannot open")
    assert "after the model answered" in detail
    assert error_category(final["outcome"]) == "storage"
    assert final["usage"]["model_calls"] == 1  # the provider was paid: the run counts it


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
async def test_a_failing_ledger_stops_the_judge_as_a_storage_error(
    tmp_path: Path, mode: str
) -> None:
    """The ledger dies after the agent's answer, before the judge's call is reserved."""
    ledger, break_it = _breaking(tmp_path)

    def rule(answer: str, state: Any) -> None:
        break_it()  # the rules pass; the judge is asked next

    judge = ScriptedChatModel(
        model_name="judge", structured={"JudgeVerdict": {"passed": True, "reason": "ok"}}
    )
    agent = build_agent(
        ScriptedChatModel(script=["Paris."]),
        checks=[rule],
        judge=judge,
        policy=MONTHLY,
        ledger=ledger,
        # under a dollar budget every model needs a price (an unpriced judge is refused)
        prices=PriceTable({"judge": Price(input_per_mtok=1.0, output_per_mtok=2.0)}),
    )
    final = await _run(agent, mode)
    _assert_storage_failure(final, judge)
    assert final["usage"]["model_calls"] == 1  # the agent's answer was counted
    assert final["messages"][-1].response_metadata.get("keel_partial") is True


# -- a deadline per attempt ---------------------------------------------------------------------


class _Held:
    """The slow model's answer under `invoke`: each call stays inside until the test lets it go
    (60 s at most), so a run that ends while a call is still inside stopped waiting for it."""

    def __init__(self) -> None:
        self.entered = 0
        self.inside = 0
        self.released = threading.Event()

    def __call__(self, messages: Any) -> str:
        self.entered += 1
        self.inside += 1
        self.released.wait(60)
        self.inside -= 1
        return "too late"


class _Started(BaseCallbackHandler):
    """The model calls started, by model name (an attempt cancelled in its wait counts)."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def on_chat_model_start(self, serialized: Any, messages: Any, **kwargs: Any) -> None:
        self.names.append(kwargs["metadata"]["ls_model_name"])


def _slow_agent(fallback: bool, slow: ScriptedChatModel) -> Any:
    """`slow` under 0.3 s deadlines: given up for the next model, or retried once."""
    fast = ScriptedChatModel(model_name="fast", script=["on time"])
    if fallback:
        deadline = ModelTimeoutPolicy(attempt_timeout=0.3, fallback=True)
        return build_agent(slow, fallback_models=[fast], model_timeout=deadline)
    retry = RetryPolicy(max_attempts=2, initial_interval=0.01, jitter=False)
    return build_agent(slow, model_timeout=0.3, model_retry=retry)


def _assert_on_time(final: Any) -> None:
    assert final["outcome"]["terminated_reason"] == "completed"
    assert final["messages"][-1].text == "on time"


def _assert_timed_out(final: Any) -> None:
    assert final["outcome"]["terminated_reason"] == "timeout"
    assert final["outcome"]["detail"] == (
        "model call failed after 2 attempt(s): TimeoutError: slow did not answer within 0.3 s "
        "(ModelTimeoutPolicy.attempt_timeout)"
    )


@pytest.mark.parametrize("fallback", [True, False], ids=["next_model", "timeout"])
def test_a_slow_model_is_given_up_under_invoke(fallback: bool) -> None:
    held = _Held()
    slow = ScriptedChatModel(model_name="slow", script=[held, held])
    try:
        final = _slow_agent(fallback, slow).invoke({"messages": [("user", "hi")]}, context=ALICE)
        # keel stopped waiting: the run ended with its slow calls still inside; with
        # fallback=True the slow model is not retried (one call), else it is (two)
        assert (held.entered, held.inside) == ((1, 1) if fallback else (2, 2))
    finally:
        held.released.set()
    (_assert_on_time if fallback else _assert_timed_out)(final)


@pytest.mark.parametrize("fallback", [True, False], ids=["next_model", "timeout"])
async def test_a_slow_model_is_cancelled_under_ainvoke(fallback: bool) -> None:
    slow = ScriptedChatModel(model_name="slow", script=["too late"] * 2, latency=3600)
    started = _Started()
    agent = _slow_agent(fallback, slow)
    run = agent.ainvoke({"messages": [("user", "hi")]}, {"callbacks": [started]}, context=ALICE)
    final = await asyncio.wait_for(run, 60)  # a guard: the slow model answers in an hour
    assert slow.calls == []  # cancelled in its wait: it never answered
    # with fallback=True the slow model is not retried, but the next model is asked
    assert started.names == (["slow", "fast"] if fallback else ["slow", "slow"])
    (_assert_on_time if fallback else _assert_timed_out)(final)


@pytest.mark.parametrize(
    "value",
    # infinity (or 1e300) was taken, and every model call then failed: OverflowError, a time_t
    # out of range, the run ended as `error`
    [0, -1.5, "10", True, math.nan, math.inf, 1e300, 86_401, timedelta(days=2)],
    ids=repr,
)
def test_a_bad_deadline_says_what_to_fix(value: Any) -> None:
    from keel import UserError

    with pytest.raises(UserError) as caught:
        build_agent(ScriptedChatModel(script=["hi"]), model_timeout=value)
    got = value.total_seconds() if isinstance(value, timedelta) else value
    assert str(caught.value) == (
        "ModelTimeoutPolicy.attempt_timeout must be a number of seconds greater than 0 and at "
        f"most 86,400 (a day), e.g. 20; got {got!r}. For no deadline pass model_timeout=None."
    )


# -- a RetryPolicy whose numbers are no limit --------------------------------------------------

NO_RETRY_LIMIT = [
    # LangGraph's namedtuple checks none of these; taken, max_attempts=inf retried an outage
    # until the backoff overflowed (a bare OverflowError, never the fallback model), a NaN or
    # negative interval raised from sleep, a NaN initial_interval waited max_interval each time
    ({"max_attempts": math.inf}, "max_attempts is a count of attempts"),
    ({"max_attempts": 0}, "max_attempts is a count of attempts"),
    ({"max_attempts": 2.5}, "max_attempts is a count of attempts"),
    ({"max_attempts": True}, "max_attempts is a count of attempts"),
    ({"initial_interval": math.nan}, "initial_interval must be a finite number"),
    ({"initial_interval": -1}, "initial_interval must be a finite number"),
    ({"max_interval": math.nan}, "max_interval must be a finite number"),
    ({"max_interval": "8"}, "max_interval must be a finite number"),
    ({"backoff_factor": math.inf}, "backoff_factor must be a finite number"),
]


@pytest.mark.parametrize(("fields", "message"), NO_RETRY_LIMIT, ids=repr)
def test_a_retry_policy_that_is_no_limit_is_refused_when_the_agent_is_built(
    fields: dict[str, Any], message: str
) -> None:
    from keel import UserError
    from keel.graphs import build_supervisor

    retry = RetryPolicy(**fields)
    model = ScriptedChatModel(script=["hi"])
    with pytest.raises(
        UserError, match=rf"^build_agent\(model_retry=\.\.\.\): RetryPolicy\.{message}"
    ):
        build_agent(model, model_retry=retry)
    agents = {"helper": build_agent(model)}
    with pytest.raises(
        UserError, match=rf"^build_supervisor\(model_retry=\.\.\.\): RetryPolicy\.{message}"
    ):
        build_supervisor(agents, model, model_retry=retry)


def test_many_retries_of_an_outage_end_on_the_fallback_model() -> None:
    """`max_attempts=1100` with no wait: the 1,025th backoff (2.0 ** 1024) is past the float
    range; it was a bare OverflowError that ended the run, not the fallback's answer."""
    from keel.evals import ChaosChatModel, ChaosPolicy

    down = ChaosChatModel(
        model=ScriptedChatModel(model_name="primary", script=["never"]),
        policy=ChaosPolicy(server_error=1.0),
    )
    backup = ScriptedChatModel(model_name="backup", script=["from the backup"])
    retry = RetryPolicy(max_attempts=1100, initial_interval=0, max_interval=0, jitter=False)
    agent = build_agent(down, fallback_models=[backup], model_retry=retry)
    final = agent.invoke({"messages": [("user", "hi")]}, context=ALICE)
    assert final["outcome"]["terminated_reason"] == "completed"
    assert final["messages"][-1].content == "from the backup"
