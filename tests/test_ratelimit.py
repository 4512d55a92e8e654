"""RPM / TPM token buckets: the pure math over fabricated times, then the ledger on both backends.

The issue's guarantee: two processes against one PostgreSQL share one bucket (tested with two
real processes, one sync and one async).
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import Clock, eventually, until
from forking import ForkServer

from keel import Ledger, UserError
from keel.guards import RateLimit, RateLimited, RateLimiter
from keel.guards.ratelimit import (
    Admit,
    Bucket,
    Permit,
    Wait,
    acquire_flow,
    settle_flow,
    take_tokens,
)

# -- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "RateLimit needs a limit: set rpm=… and/or tpm=…."),
        (
            {"rpm": 0},
            "RateLimit.rpm must be a whole number greater than 0, or None to disable it; got 0.",
        ),
        (
            {"tpm": 1.5},
            "RateLimit.tpm must be a whole number greater than 0, or None to disable it; got 1.5.",
        ),
        ({"rpm": 1, "scope": "user"}, "RateLimit.scope must be 'model' or 'tenant', got 'user'."),
        (
            {"rpm": 1, "model": ""},
            "RateLimit.model must be a non-empty glob ('*' for any), got ''.",
        ),
        (
            {"rpm": 1, "max_wait": -1},
            "RateLimit.max_wait must be between 0 and 3600 seconds, got -1.",
        ),
    ],
)
def test_rate_limit_rejects_bad_values(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        RateLimit(**kwargs)


def test_bucket_keys_per_model_and_per_tenant() -> None:
    assert RateLimit(rpm=60, tpm=1000).bucket_keys("gpt-4o", "acme") == [
        ("rpm:model:gpt-4o", 60, "rpm"),
        ("tpm:model:gpt-4o", 1000, "tpm"),
    ]
    assert RateLimit(tpm=1000, scope="tenant").bucket_keys("gpt-4o", "acme") == [
        ("tpm:tenant:acme", 1000, "tpm")
    ]
    assert RateLimit(rpm=5, scope="tenant", model="gpt-*").bucket_keys("gpt-4o", "acme") == [
        ("rpm:tenant:acme|gpt-*", 5, "rpm")
    ]
    assert RateLimit(rpm=5, model="gpt-*").applies_to("gpt-4o")
    assert not RateLimit(rpm=5, model="gpt-*").applies_to("claude-3")


def test_limiter_rejects_limits_that_would_share_buckets(tmp_path: Path) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path}/keel.db")
    with pytest.raises(UserError, match="same scope and model glob"):
        RateLimiter(ledger, [RateLimit(rpm=5), RateLimit(tpm=5)])
    with pytest.raises(UserError, match=r"^RateLimiter limits\[0\] must be a RateLimit"):
        RateLimiter(ledger, [{"rpm": 5}])  # type: ignore[list-item]
    with pytest.raises(UserError, match=r"^RateLimiter needs a keel\.Ledger, got str\.$"):
        RateLimiter("sqlite:///x.db", [])  # type: ignore[arg-type]


def test_rate_limited_says_what_happened_and_the_fix() -> None:
    err = RateLimited("rpm:model:gpt-4o", 60, 2.5, waited=1.0)
    assert str(err) == (
        "Rate limit of 60 requests per minute reached for model:gpt-4o (rpm:model:gpt-4o): room "
        "in 2.50 s, after waiting 1.00 s; that is beyond the limit's max_wait. Raise "
        "RateLimit.max_wait or the limit, or fall back to another model."
    )
    assert (err.key, err.limit, err.retry_after, err.waited) == ("rpm:model:gpt-4o", 60, 2.5, 1.0)
    tpm = RateLimited("tpm:tenant:acme", 1000, 0.5)
    assert str(tpm).startswith("Rate limit of 1000 tokens per minute reached for tenant:acme ")


# -- the bucket math, over fabricated times ----------------------------------------------------


def test_a_bucket_refills_its_limit_per_minute_up_to_the_limit() -> None:
    empty = Bucket("rpm:model:m", 60, 0.0, 100.0)  # 1 a second
    assert empty.at(100.5) == Bucket("rpm:model:m", 60, 0.5, 100.5)
    assert empty.at(130.0).tokens == 30.0
    assert empty.at(1000.0).tokens == 60.0  # never above the limit
    # a clock behind the row's (another process's clock) refills nothing and moves nothing back
    assert Bucket("k", 60, 5.0, 100.0).at(99.0) == Bucket("k", 60, 5.0, 100.0)


def test_take_admits_and_charges_every_bucket() -> None:
    rpm = Bucket("rpm:model:m", 60, 60.0, 0.0)
    tpm = Bucket("tpm:model:m", 6000, 6000.0, 0.0)
    assert take_tokens([(rpm, 1), (tpm, 250)], 0.0) == Admit(
        (Bucket("rpm:model:m", 60, 59.0, 0.0), Bucket("tpm:model:m", 6000, 5750.0, 0.0))
    )


def test_take_is_all_or_nothing_and_waits_for_the_slowest_bucket() -> None:
    rpm = Bucket("rpm:model:m", 60, 0.5, 10.0)  # 1 a second: 0.5 s to one request
    tpm = Bucket("tpm:model:m", 6000, 100.0, 10.0)  # 100 a second: 3 s to 400 tokens
    assert take_tokens([(rpm, 1), (tpm, 400)], 10.0) == Wait(3.0, "tpm:model:m", 6000)
    assert take_tokens([(rpm, 1), (tpm, 50)], 10.0) == Wait(0.5, "rpm:model:m", 60)
    # 3 s later both have room
    admitted = take_tokens([(rpm, 1), (tpm, 400)], 13.0)
    assert isinstance(admitted, Admit)
    assert [b.tokens for b in admitted.buckets] == [2.5, 0.0]


def test_take_caps_a_call_above_the_whole_limit_and_waits_off_a_debt() -> None:
    # a call estimated above the limit waits for a full bucket and empties it
    assert take_tokens([(Bucket("t", 1000, 1000.0, 0.0), 5000)], 0.0) == Admit(
        (Bucket("t", 1000, 0.0, 0.0),)
    )
    assert take_tokens([(Bucket("t", 1000, 999.0, 0.0), 5000)], 0.0) == Wait(0.06, "t", 1000)
    # usage above the estimate leaves a debt: 300 owed + 100 wanted at 10 a second
    assert take_tokens([(Bucket("t", 600, -300.0, 0.0), 100)], 0.0) == Wait(40.0, "t", 600)


def test_take_without_buckets_admits() -> None:
    assert take_tokens([], 0.0) == Admit(())


# -- the limiter on SQLite and PostgreSQL, sync and async --------------------------------------


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def acquire(limiter: RateLimiter, mode: str, *args: Any, **kwargs: Any) -> Permit:
    if mode == "sync":
        return await asyncio.to_thread(limiter.acquire, *args, **kwargs)
    return await limiter.aacquire(*args, **kwargs)


async def settle(limiter: RateLimiter, mode: str, permit: Permit, used: int) -> None:
    if mode == "sync":
        await asyncio.to_thread(limiter.settle, permit, used)
    else:
        await limiter.asettle(permit, used)


async def test_rpm_admits_up_to_the_limit_then_raises(
    ledger: Ledger, mode: str, clock: Any
) -> None:
    limiter = RateLimiter(ledger, [RateLimit(rpm=3, max_wait=0)], clock=clock)
    for _ in range(3):
        assert (await acquire(limiter, mode, "m")).waited == 0.0
    with pytest.raises(RateLimited) as err:
        await acquire(limiter, mode, "m")
    assert str(err.value) == (
        "Rate limit of 3 requests per minute reached for model:m (rpm:model:m): room in 20.00 s, "
        "after waiting 0.00 s; that is beyond the limit's max_wait. Raise RateLimit.max_wait or "
        "the limit, or fall back to another model."
    )
    assert await acquire(limiter, mode, "other-model")  # a bucket per model
    clock.now += 20.0  # one request's worth refilled
    await acquire(limiter, mode, "m")
    with pytest.raises(RateLimited):
        await acquire(limiter, mode, "m")


async def test_tenant_limits_are_per_tenant_across_models(
    ledger: Ledger, mode: str, clock: Any
) -> None:
    limiter = RateLimiter(ledger, [RateLimit(rpm=2, scope="tenant", max_wait=0)], clock=clock)
    await acquire(limiter, mode, "a", "acme")
    await acquire(limiter, mode, "b", "acme")
    with pytest.raises(RateLimited, match=r"reached for tenant:acme \(rpm:tenant:acme\)"):
        await acquire(limiter, mode, "c", "acme")
    await acquire(limiter, mode, "a", "globex")


async def test_a_limit_for_other_models_takes_nothing(
    ledger: Ledger, mode: str, clock: Any
) -> None:
    limiter = RateLimiter(ledger, [RateLimit(rpm=1, model="gpt-*", max_wait=0)], clock=clock)
    for _ in range(3):
        assert await acquire(limiter, mode, "claude") == Permit((), 0, 0.0)
    await acquire(limiter, mode, "gpt-4o")
    with pytest.raises(RateLimited, match=r"\(rpm:model:gpt-4o\|gpt-\*\)"):
        await acquire(limiter, mode, "gpt-4o")


async def test_settle_corrects_the_tpm_estimate(ledger: Ledger, mode: str, clock: Any) -> None:
    limiter = RateLimiter(ledger, [RateLimit(tpm=1000, max_wait=0)], clock=clock)
    permit = await acquire(limiter, mode, "m", tokens=800)
    assert permit == Permit((("tpm:model:m", 1000, 800.0),), 800, 0.0)
    with pytest.raises(RateLimited, match=r"room in 36.00 s"):  # 800 - 200 left, 60 s/1000
        await acquire(limiter, mode, "m", tokens=800)
    await settle(limiter, mode, permit, 200)  # it used 200: 600 back
    second = await acquire(limiter, mode, "m", tokens=800)  # 800 left: fits
    await settle(limiter, mode, second, 1000)  # it used 1000: a debt of 200
    with pytest.raises(RateLimited, match=r"room in 12.06 s"):  # (1 + 200) tokens at 1000/min
        await acquire(limiter, mode, "m", tokens=1)
    await settle(limiter, mode, Permit((), 5, 0.0), 9)  # no TPM bucket: nothing to correct


@pytest.mark.parametrize(
    ("tokens", "updated_at", "now", "amount"),
    [
        (100.0, 10.0, 40.0, 50.0),  # refilled past the limit: capped
        (-50.0, 10.0, 16.0, 30.0),  # a debt, partly refilled, then a refund
        (20.0, 10.0, 13.0, -45.5),  # more used than estimated: a deeper debt
        (20.0, 50.0, 13.0, 7.0),  # a clock behind the row's: no refill, the row's time kept
        (999.0, 10.0, 10.0, 0.25),  # full already
    ],
)
async def test_the_refund_statement_is_the_bucket_math(
    ledger: Ledger, tokens: float, updated_at: float, now: float, amount: float
) -> None:
    """The refund is one SQL statement (no read back): on both backends it must agree with
    `Bucket.at(now)` plus `amount`, capped at the limit, which the acquire side uses."""
    key, limit = "tpm:model:m", 1000
    await ledger.arun(_put_bucket(key, tokens, updated_at))
    await ledger.arun(settle_flow([(key, limit, amount)], now))
    at = Bucket(key, limit, tokens, updated_at).at(now)
    expected = (min(float(limit), at.tokens + amount), at.updated_at)
    assert await ledger.arun(_bucket_row(key)) == pytest.approx(expected, abs=1e-9)


async def test_a_refund_to_a_bucket_that_is_gone_starts_from_a_full_one(ledger: Ledger) -> None:
    await ledger.arun(settle_flow([("tpm:model:m", 1000, -300.0)], 5.0))
    assert await ledger.arun(_bucket_row("tpm:model:m")) == pytest.approx((700.0, 5.0))


def _put_bucket(key: str, tokens: float, updated_at: float) -> Any:
    yield (
        "INSERT INTO keel_rate_buckets (key, tokens, updated_at) VALUES (?, ?, ?)",
        (key, tokens, updated_at),
    )


def _bucket_row(key: str) -> Any:
    rows = yield "SELECT tokens, updated_at FROM keel_rate_buckets WHERE key = ?", (key,)
    return tuple(float(v) for v in rows[0])


class _CountedClock(Clock):
    """A `Clock` that counts how often it was read."""

    reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now


async def test_a_short_bucket_waits_then_admits(ledger: Ledger, mode: str) -> None:
    """The limiter sleeps and asks again while the bucket refills, then admits; the refill is
    the test's clock moving, so the wait is exactly what the clock says."""
    clock = _CountedClock()
    limiter = RateLimiter(ledger, [RateLimit(tpm=6000, max_wait=2)], clock=clock)  # 100 a second
    await acquire(limiter, mode, "m", tokens=6000)
    reads = clock.reads
    waiting = asyncio.create_task(acquire(limiter, mode, "m", tokens=20))  # 0.2 s of refill
    await until(lambda: clock.reads > reads + 2, "the limiter to start and ask")
    assert not waiting.done()  # the clock stands: no refill, it sleeps and asks again
    clock.now += 0.25
    permit = await asyncio.wait_for(waiting, 60)
    assert permit.waited == pytest.approx(0.25)


async def test_a_wait_beyond_max_wait_fails_at_once_without_sleeping(
    ledger: Ledger, mode: str, clock: Any
) -> None:
    limiter = RateLimiter(ledger, [RateLimit(tpm=6000, max_wait=2)], clock=clock)
    await acquire(limiter, mode, "m", tokens=6000)
    steps = limiter.acquiring("m", "default", 5000)  # 50 s of refill
    ask = next(steps)  # the one step: the ledger's answer, a wait
    answer = await (asyncio.to_thread(ask.run) if mode == "sync" else ask.arun())
    with pytest.raises(RateLimited) as err:  # raised on it, not a sleep step
        steps.send(answer)
    assert err.value.retry_after == pytest.approx(50.0)


async def test_concurrent_acquisitions_never_exceed_the_bucket(ledger: Ledger, clock: Any) -> None:
    limiter = RateLimiter(ledger, [RateLimit(rpm=5, max_wait=0)], clock=clock)

    async def one(i: int) -> bool:
        try:
            await acquire(limiter, "sync" if i % 2 else "async", "m")
        except RateLimited:
            return False
        return True

    results = await asyncio.gather(*(one(i) for i in range(16)))
    assert sum(results) == 5


def test_acquire_rejects_bad_token_counts(tmp_path: Path) -> None:
    limiter = RateLimiter(Ledger(f"sqlite:///{tmp_path}/k.db"), [RateLimit(rpm=1)])
    with pytest.raises(UserError, match=r"^RateLimiter tokens must be an int ≥ 0, got -1.$"):
        limiter.acquire("m", tokens=-1)
    with pytest.raises(UserError, match=r"^RateLimiter.settle\(used=...\) must be an int ≥ 0"):
        limiter.settle(Permit((), 1, 0.0), -5)


def test_the_flow_creates_each_bucket_full(tmp_path: Path) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path}/k.db")
    decision = ledger.run(acquire_flow([("tpm:model:m", 100, 30.0), ("rpm:model:m", 2, 1.0)], 5.0))
    assert decision == Admit(
        (Bucket("rpm:model:m", 2, 1.0, 5.0), Bucket("tpm:model:m", 100, 70.0, 5.0))
    )


# -- two processes share one bucket on PostgreSQL ----------------------------------------------

WORKER = """
import asyncio, json, sys, time
from pathlib import Path
from keel import Ledger
from keel.guards import RateLimit, RateLimited, RateLimiter

url, mode, attempts = sys.argv[1], sys.argv[2], int(sys.argv[3])
ledger = Ledger(url)
limiter = RateLimiter(ledger, [RateLimit(rpm=10, tpm=100_000, max_wait=0)])

def once(admitted):
    try:
        limiter.acquire("shared", "acme", 100)
        admitted.append(time.time())
    except RateLimited:
        pass

async def aonce(admitted):
    try:
        await limiter.aacquire("shared", "acme", 100)
        admitted.append(time.time())
    except RateLimited:
        pass

async def amain():
    admitted = []
    for _ in range(attempts):
        await aonce(admitted)
    await ledger.aclose()
    return admitted

Path(f"ready-{mode}").touch()  # keel is imported: wait at the line for the other process
while not Path("go").exists():
    time.sleep(0.002)
if mode == "sync":
    admitted = []
    for _ in range(attempts):
        once(admitted)
    ledger.close()
else:
    admitted = asyncio.run(amain())
print(json.dumps(admitted))
"""


@pytest.mark.postgres
def test_two_processes_share_one_bucket(
    fresh_postgres_url: str, tmp_path: Path, forks: ForkServer
) -> None:
    """(The two processes are forked with keel imported, `tests/forking.py`.)"""
    ledger = Ledger(fresh_postgres_url)
    ledger.setup()  # once, so the workers never race to create the tables
    ledger.close()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    modes = ("sync", "async")
    workers = [forks.start_script(script, fresh_postgres_url, m, "15", cwd=tmp_path) for m in modes]
    try:

        def ready() -> bool:
            if any(w.ended() for w in workers):
                pytest.fail(f"a worker exited early: {[w.output()[1] for w in workers]}")
            return all((tmp_path / f"ready-{m}").exists() for m in modes)

        eventually(ready, "the workers to start")
        (tmp_path / "go").touch()
        codes = [w.finish(60) for w in workers]
    finally:
        for w in workers:
            w.kill()  # (one that ended: nothing)
    outputs = [w.output() for w in workers]
    for code, (_out, err) in zip(codes, outputs, strict=True):
        assert code == 0, err
    admitted: list[list[float]] = [json.loads(out) for out, _ in outputs]
    times = sorted(t for process in admitted for t in process)
    # Each process alone would get 10 of its 15 attempts. 10 a minute refills one request every
    # 6 s: within a shorter window the two together get exactly the one bucket's 10.
    assert times[-1] - times[0] < 6.0
    assert len(times) == 10
