"""Circuit breakers: every transition as a pure function over fabricated times, then the ledger
on both backends (sync and async), then a chaos model driving a breaker through its whole cycle.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage

from keel import KeelError, Ledger, UserError
from keel.db.ledger import Flow
from keel.evals import (
    ChaosChatModel,
    ChaosPolicy,
    ChaosRateLimitError,
    ChaosServerError,
    ScriptedChatModel,
)
from keel.guards import BreakerPolicy, BreakerTransition, CircuitBreaker, CircuitOpen
from keel.guards.breaker import BreakerEvent, BreakerState, is_outage, next_state

P = BreakerPolicy(failure_threshold=3, window_seconds=10, cooldown_seconds=5, success_threshold=2)

# -- config and errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"failure_threshold": 0},
            "BreakerPolicy.failure_threshold must be a whole number, 1 or more "
            "(e.g. failure_threshold=5); got 0.",
        ),
        (
            {"success_threshold": True},
            "BreakerPolicy.success_threshold must be a whole number, 1 or more "
            "(e.g. success_threshold=5); got True.",
        ),
        (
            {"window_seconds": 0},
            "BreakerPolicy.window_seconds must be a finite number of seconds greater than 0 "
            "(e.g. window_seconds=30); got 0.",
        ),
        (
            {"cooldown_seconds": "5"},
            "BreakerPolicy.cooldown_seconds must be a finite number of seconds greater than 0 "
            "(e.g. cooldown_seconds=30); got '5'.",
        ),
    ],
)
def test_breaker_policy_rejects_bad_values(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        BreakerPolicy(**kwargs)


def test_circuit_open_says_what_to_do() -> None:
    err = CircuitOpen("model:gpt-4o", 1005.0, retry_after=4.25)
    assert str(err) == (
        "Circuit breaker 'model:gpt-4o' is open: calls fail fast until it half-opens in 4.25 s. "
        "Fall back to another model or tool, or retry after that."
    )
    assert (err.key, err.retry_at, err.retry_after) == ("model:gpt-4o", 1005.0, 4.25)
    assert isinstance(err, KeelError)


def test_is_outage_counts_server_faults_not_client_errors() -> None:
    assert is_outage(ChaosServerError(503))
    assert is_outage(ChaosServerError(500))
    assert is_outage(TimeoutError())
    assert is_outage(ConnectionError())
    assert is_outage(RuntimeError("an SDK's connection error"))
    assert not is_outage(ChaosRateLimitError(1.0))  # the provider is up, it asks to slow down
    assert not is_outage(CircuitOpen("k", 0.0, retry_after=0.0))
    assert not is_outage(UserError("bad call"))
    assert not is_outage(ValueError("the model's answer did not parse"))  # a bug, not an outage


# -- every transition, over fabricated times ---------------------------------------------------

CLOSED = BreakerState()
COUNTING = BreakerState("closed", failures=2, window_start=100.0)
OPEN = BreakerState("open", failures=3, opened_at=100.0, window_start=95.0)
HALF = BreakerState("half_open", opened_at=100.0)
HALF_ONE = BreakerState("half_open", successes=1, opened_at=100.0)


@pytest.mark.parametrize(
    ("state", "event", "now", "after"),
    [
        # closed: `before` and successes change nothing; failures count in a window
        (CLOSED, "before", 100.0, CLOSED),
        (CLOSED, "success", 100.0, CLOSED),
        (COUNTING, "success", 101.0, COUNTING),
        (COUNTING, "before", 101.0, COUNTING),
        (CLOSED, "failure", 100.0, BreakerState("closed", 1, window_start=100.0)),
        (
            BreakerState("closed", 1, window_start=100.0),
            "failure",
            109.9,
            BreakerState("closed", 2, window_start=100.0),
        ),
        # the window is over (at exactly window_seconds too): counting starts again
        (COUNTING, "failure", 110.0, BreakerState("closed", 1, window_start=110.0)),
        # the threshold within the window opens it
        (COUNTING, "failure", 109.0, BreakerState("open", 3, opened_at=109.0, window_start=100.0)),
        # open: refuses until the cool-down is over, then half-opens on the next `before`
        (OPEN, "before", 104.9, OPEN),
        (OPEN, "before", 105.0, HALF),
        (OPEN, "before", 500.0, HALF),
        # results of calls that started before it opened are stale
        (OPEN, "success", 101.0, OPEN),
        (OPEN, "failure", 101.0, OPEN),
        (OPEN, "success", 106.0, OPEN),
        # half-open: calls run; M successes close it, a failure reopens it
        (HALF, "before", 106.0, HALF),
        (HALF, "success", 106.0, HALF_ONE),
        (HALF_ONE, "success", 107.0, CLOSED),
        (HALF, "failure", 106.0, BreakerState("open", 1, opened_at=106.0)),
        (HALF_ONE, "failure", 107.0, BreakerState("open", 1, opened_at=107.0)),
    ],
)
def test_next_state(
    state: BreakerState, event: BreakerEvent, now: float, after: BreakerState
) -> None:
    assert next_state(state, event, now, P) == after


def test_one_success_closes_when_the_threshold_is_one() -> None:
    policy = BreakerPolicy(failure_threshold=1, success_threshold=1, cooldown_seconds=1)
    opened = next_state(CLOSED, "failure", 0.0, policy)
    assert opened == BreakerState("open", 1, opened_at=0.0, window_start=0.0)
    assert opened.retry_at(policy) == 1.0
    half = next_state(opened, "before", 1.0, policy)
    assert half.state == "half_open" and half.retry_at(policy) is None
    assert next_state(half, "success", 1.0, policy) == CLOSED


def test_unchanged_states_are_the_same_object() -> None:
    # the ledger flow writes nothing when the state does not change
    for state, event in [(CLOSED, "success"), (COUNTING, "before"), (OPEN, "before")]:
        assert next_state(state, event, 101.0, P) is state  # type: ignore[arg-type]


# -- the breaker on SQLite and PostgreSQL, sync and async --------------------------------------


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def before(breaker: CircuitBreaker, mode: str, key: str) -> BreakerTransition | None:
    if mode == "sync":
        return await asyncio.to_thread(breaker.before, key)
    return await breaker.abefore(key)


async def record(breaker: CircuitBreaker, mode: str, key: str, ok: bool) -> Any:
    if mode == "sync":
        return await asyncio.to_thread(breaker.record, key, ok)
    return await breaker.arecord(key, ok)


async def test_a_breaker_opens_fails_fast_half_opens_and_closes(
    ledger: Ledger, mode: str, clock: Any
) -> None:
    breaker = CircuitBreaker(ledger, P, clock=clock)
    key = "model:m"
    assert await before(breaker, mode, key) is None
    assert await record(breaker, mode, key, False) is None
    clock.now += 1
    assert await record(breaker, mode, key, True) is None  # successes do not reset the window
    assert await record(breaker, mode, key, False) is None
    clock.now += 1
    assert await record(breaker, mode, key, False) == BreakerTransition(
        key, "closed", "open", 1002.0, "3 failures within 10 s"
    )
    clock.now += 2
    with pytest.raises(CircuitOpen) as err:
        await before(breaker, mode, key)
    assert (err.value.retry_at, err.value.retry_after) == (1007.0, 3.0)
    assert await before(breaker, mode, "model:other") is None  # one breaker per key
    clock.now = 1007.0
    assert await before(breaker, mode, key) == BreakerTransition(
        key, "open", "half_open", 1007.0, "cool-down of 5 s over"
    )
    assert await before(breaker, mode, key) is None  # half-open lets calls through
    assert await record(breaker, mode, key, True) is None
    assert await record(breaker, mode, key, True) == BreakerTransition(
        key, "half_open", "closed", 1007.0, "2 successes while half-open"
    )
    assert breaker.state(key) == BreakerState()


async def test_a_failure_while_half_open_reopens(ledger: Ledger, mode: str, clock: Any) -> None:
    breaker = CircuitBreaker(
        ledger, BreakerPolicy(failure_threshold=1, cooldown_seconds=5), clock=clock
    )
    key = "tool:lookup"
    assert (await record(breaker, mode, key, False)).after == "open"
    clock.now += 5
    assert (await before(breaker, mode, key)).after == "half_open"
    assert await record(breaker, mode, key, False) == BreakerTransition(
        key, "half_open", "open", 1005.0, "a call failed while half-open"
    )
    with pytest.raises(CircuitOpen, match=r"half-opens in 5.00 s"):
        await before(breaker, mode, key)
    assert await breaker.astate(key) == BreakerState("open", 1, opened_at=1005.0)


async def test_a_success_after_a_closed_breaker_touches_no_row(
    ledger: Ledger, mode: str, clock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The healthy path: a closed breaker lets the call through, and its success costs nothing
    (a closed breaker ignores successes, and it cannot be half-open within a cooldown)."""
    breaker = CircuitBreaker(ledger, P, clock=clock)
    assert await before(breaker, mode, "model:m") is None
    used: list[str] = []

    def spied(name: str) -> Any:
        real = getattr(ledger, name)

        def spy(*args: Any) -> Any:
            used.append(name)
            return real(*args)

        return spy

    for name in ("run", "arun", "defer", "adefer"):
        monkeypatch.setattr(ledger, name, spied(name))
    clock.now += 4.9
    assert await record(breaker, mode, "model:m", True) is None
    with ledger.batch():
        assert await record(breaker, mode, "model:m", True) is None
    assert used == []
    assert await record(breaker, mode, "model:other", True) is None  # never seen: read
    assert await record(breaker, mode, "model:m", False) is None  # a failure always counts
    assert len(used) == 2


async def test_a_skipped_success_never_hides_a_half_open_trial(
    ledger: Ledger, db_url: str, mode: str, clock: Any
) -> None:
    """Attack the skip: another process opens the breaker right after ours saw it closed, and
    half-opens it once the cooldown is over. Before then it cannot be half-open; from then on
    our success is written and closes it."""
    other = Ledger(db_url)
    policy = BreakerPolicy(failure_threshold=1, cooldown_seconds=5, success_threshold=1)
    mine = CircuitBreaker(ledger, policy, clock=clock)
    theirs = CircuitBreaker(other, policy, clock=clock)
    try:
        key = "tool:lookup"
        assert await before(mine, mode, key) is None  # closed at 1000
        assert (await theirs.arecord(key, False)).after == "open"  # type: ignore[union-attr]
        clock.now = 1004.99
        with pytest.raises(CircuitOpen):  # not half-open within the cooldown: nothing to count
            await theirs.abefore(key)
        assert await record(mine, mode, key, True) is None
        assert (await mine.astate(key)).state == "open"
        clock.now = 1005.0
        assert (await theirs.abefore(key)).after == "half_open"  # type: ignore[union-attr]
        assert await record(mine, mode, key, True) == BreakerTransition(
            key, "half_open", "closed", 1005.0, "1 successes while half-open"
        )
    finally:
        await other.aclose()


def _reserve(key: str) -> Flow[int]:
    """A write that must not outlive a refusal: one more row `key`, then the count."""
    yield "INSERT INTO keel_breakers (key, failures) VALUES (?, 0)", (key,)
    rows = yield "SELECT COUNT(*) FROM keel_breakers WHERE key = ?", (key,)
    return int(rows[0][0])


async def admitting(breaker: CircuitBreaker, mode: str, key: str, then: Flow[Any]) -> Any:
    flow = breaker.admitting(key, then)
    if mode == "sync":
        return await asyncio.to_thread(breaker.ledger.run, flow)
    return await breaker.ledger.arun(flow)


async def test_admitting_checks_the_breaker_in_the_flow_s_own_transaction(
    ledger: Ledger, mode: str, clock: Any
) -> None:
    """`admitting` reads the breaker with the flow's first statements: closed, the flow goes
    on; open, `CircuitOpen` rolls back what the flow wrote; cooled down, the half-open change
    is made on the locked row (and audited) before the flow goes on."""
    policy = BreakerPolicy(failure_threshold=1, cooldown_seconds=5)
    breaker = CircuitBreaker(ledger, policy, clock=clock)
    key = "model:m"
    assert await admitting(breaker, mode, key, _reserve("r1")) == (None, 1)
    await record(breaker, mode, key, False)  # opens at 1000
    with pytest.raises(CircuitOpen, match=r"half-opens in 5.00 s"):
        await admitting(breaker, mode, key, _reserve("r2"))
    assert breaker.ledger.read(_count_of("r2")) == 0  # rolled back with the refusal
    clock.now += 5
    transition, count = await admitting(breaker, mode, key, _reserve("r3"))
    assert transition == BreakerTransition(
        key, "open", "half_open", 1005.0, "cool-down of 5 s over"
    )
    assert count == 1 and (await breaker.astate(key)).state == "half_open"
    audited = ledger.read(_audit_decisions())
    assert ("breaker", "half_open") in audited


def _count_of(key: str) -> Flow[int]:
    rows = yield "SELECT COUNT(*) FROM keel_breakers WHERE key = ?", (key,)
    return int(rows[0][0])


def _audit_decisions() -> Flow[list[tuple[str, str]]]:
    rows = yield "SELECT kind, decision FROM keel_audit", ()
    return [(str(k), str(v)) for k, v in rows]


async def test_state_is_shared_between_ledgers(ledger: Ledger, db_url: str) -> None:
    # a second Ledger on the same URL stands for another process: its own pool and connections
    other = Ledger(db_url)
    try:
        mine = CircuitBreaker(ledger, BreakerPolicy(failure_threshold=2))
        theirs = CircuitBreaker(other, BreakerPolicy(failure_threshold=2))
        await mine.arecord("model:m", False)
        assert (await theirs.arecord("model:m", False)).after == "open"  # type: ignore[union-attr]
        with pytest.raises(CircuitOpen):
            await mine.abefore("model:m")
    finally:
        await other.aclose()


async def test_concurrent_failures_are_all_counted(ledger: Ledger) -> None:
    breaker = CircuitBreaker(ledger, BreakerPolicy(failure_threshold=12))
    results = await asyncio.gather(
        *(
            asyncio.to_thread(breaker.record, "model:m", False)
            if i % 2
            else breaker.arecord("model:m", False)
            for i in range(12)
        )
    )
    assert [r.after for r in results if r is not None] == ["open"]  # exactly one transition
    assert (await breaker.astate("model:m")).failures == 12


def test_bad_keys_and_results_are_developer_errors(tmp_path: Path) -> None:
    breaker = CircuitBreaker(Ledger(f"sqlite:///{tmp_path}/k.db"))
    with pytest.raises(UserError, match=r"^A circuit breaker key must be a non-empty string"):
        breaker.before("")
    with pytest.raises(UserError, match=r"^CircuitBreaker.record\(ok=...\) must be True or False"):
        breaker.record("model:m", 1)  # type: ignore[arg-type]
    with pytest.raises(UserError, match=r"^CircuitBreaker needs a keel\.Ledger, got str\.$"):
        CircuitBreaker("sqlite:///x.db")  # type: ignore[arg-type]


# -- a chaos model drives the breaker through its cycle (real time) ----------------------------

HELLO: list[BaseMessage] = [HumanMessage(content="hello")]


def guarded_call(breaker: CircuitBreaker, model: Any, key: str = "model:chaos") -> BaseMessage:
    """The wiring `call_model` uses: before → call → record (only outages count)."""
    breaker.before(key)
    try:
        answer: BaseMessage = model.invoke(HELLO)
    except Exception as exc:
        breaker.record(key, ok=not is_outage(exc))
        raise
    breaker.record(key, ok=True)
    return answer


async def aguarded_call(breaker: CircuitBreaker, model: Any, key: str = "model:chaos") -> Any:
    await breaker.abefore(key)
    try:
        answer = await model.ainvoke(HELLO)
    except Exception as exc:
        await breaker.arecord(key, ok=not is_outage(exc))
        raise
    await breaker.arecord(key, ok=True)
    return answer


def test_a_chaos_model_opens_and_a_healthy_one_closes_the_breaker(db_url: str) -> None:
    ledger = Ledger(db_url)
    policy = BreakerPolicy(
        failure_threshold=3, window_seconds=10, cooldown_seconds=0.2, success_threshold=2
    )
    breaker = CircuitBreaker(ledger, policy)
    outage = ChaosChatModel(
        model=ScriptedChatModel(script=["ok"] * 10), policy=ChaosPolicy(server_error=1.0)
    )
    for _ in range(3):
        with pytest.raises(ChaosServerError):
            guarded_call(breaker, outage)
    assert breaker.state("model:chaos").state == "open"
    with pytest.raises(CircuitOpen):  # fails fast: the model is not called
        guarded_call(breaker, outage)
    assert outage.calls == 3
    time.sleep(0.25)
    healthy = ChaosChatModel(model=ScriptedChatModel(script=["ok"] * 10), policy=ChaosPolicy())
    assert isinstance(guarded_call(breaker, healthy), AIMessage)
    assert breaker.state("model:chaos").state == "half_open"
    guarded_call(breaker, healthy)
    assert breaker.state("model:chaos") == BreakerState()
    ledger.close()


async def test_rate_limits_do_not_open_the_breaker_and_half_open_reopens(db_url: str) -> None:
    ledger = Ledger(db_url)
    policy = BreakerPolicy(failure_threshold=2, cooldown_seconds=0.2, success_threshold=2)
    breaker = CircuitBreaker(ledger, policy)
    throttled = ChaosChatModel(
        model=ScriptedChatModel(script=["ok"] * 10),
        policy=ChaosPolicy(rate_limit=1.0, retry_after=0),
    )
    for _ in range(4):  # 429s: the provider is up
        with pytest.raises(ChaosRateLimitError):
            await aguarded_call(breaker, throttled)
    assert (await breaker.astate("model:chaos")).state == "closed"
    down = ChaosChatModel(
        model=ScriptedChatModel(script=["ok"] * 10),
        policy=ChaosPolicy(server_error=0.5, timeout=0.5, seed=3),
    )
    for _ in range(2):
        with pytest.raises((ChaosServerError, TimeoutError)):
            await aguarded_call(breaker, down)
    with pytest.raises(CircuitOpen):
        await aguarded_call(breaker, down)
    await asyncio.sleep(0.25)
    with pytest.raises((ChaosServerError, TimeoutError)):  # the trial call fails: open again
        await aguarded_call(breaker, down)
    assert (await breaker.astate("model:chaos")).state == "open"
    assert down.calls == 3
    await ledger.aclose()
