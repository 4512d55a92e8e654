"""Evals run offline: with tracing switched on but no LangSmith key, nothing reaches LangSmith
(a local stand-in endpoint records every request), judge and trajectory evaluators included."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from test_tracing import StandIn, _stand_in

from keel.evals import ScriptedChatModel, Suite, arun_suite

SUITE = {
    "name": "offline",
    "model": "keel:demo",
    "cases": [
        {
            "id": "refund",
            "input": "Order A1001 arrived damaged; mail jane.doe@example.com. Please refund it.",
            "expect": {
                "trajectory": {"mode": "superset", "args": "ignore", "calls": ["lookup_order"]}
            },
            "rubric": "States the amount refunded.",
        }
    ],
}


@pytest.fixture
def keyless_stand_in(monkeypatch: pytest.MonkeyPatch) -> Iterator[StandIn]:
    yield from _stand_in(monkeypatch, 200, None)


async def test_keyless_evals_send_nothing_to_langsmith(keyless_stand_in: StandIn) -> None:
    judge = ScriptedChatModel(structured={"score": {"reasoning": "yes", "score": True}})
    result = await arun_suite(Suite.from_dict(SUITE), judge=judge)
    assert result.pass_rate == 1.0, result.runs[0].scores
    await asyncio.sleep(1.0)
    # no run, judge or evaluator result is posted; keel's agent binds a silent tracer, whose
    # langsmith client still reads the server's /info once (keel.observe, not evals)
    assert keyless_stand_in.bodies() == b""
    assert {(m, p) for m, p, _ in keyless_stand_in.requests} <= {("GET", "/info")}
