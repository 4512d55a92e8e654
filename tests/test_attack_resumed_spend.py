"""The run record of a run resumed after its checkpointer failed counts what the run spent.

The checkpointer's database refuses (a trigger, the database up otherwise) both the writes and
the checkpoint of the step that holds the model's second answer: the run ends `error/storage`,
its record counting the two calls it made and paid for, while the saved state holds one. The
resume (`invoke(None, config)`, as the detail says) runs the lost step again: a third call. The
record said two calls (the resumed state's totals, never lowered), while three were made and the
period budget's ledger had all three. README, Observability: usage is the run's own, and a run
whose last step's checkpoint failed to save is recorded with the calls it made and paid for.

Real parts: SQLite and PostgreSQL (checkpointer and ledger in one database), the scripted model.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from typing import Any

import psycopg
import pytest

from keel import Ledger, Persistence, RunContext, build_agent, tool
from keel.db.runs import UNSAVED_KEY, RunLog
from keel.evals import ScriptedChatModel, call
from keel.guards import PeriodBudget, Policy, Rule, SpendMeter
from keel.pricing import Price, PriceTable

CTX = RunContext(user_id="u1", tenant_id="acme")
PRICES = PriceTable({"m": Price(input_per_mtok=1000.0, output_per_mtok=1000.0)})
BUDGET = PeriodBudget(scope="user", period="month", usd=1000)
LOST = "answer one"
"""The answer whose step's checkpoint the database refuses."""


def _refuse_the_answer(url: str) -> None:
    """Triggers that refuse any checkpoint row holding `LOST` (writes, checkpoint, blobs)."""
    if url.startswith("sqlite"):
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as db:
            for table, column in (("writes", "value"), ("checkpoints", "checkpoint")):
                db.execute(
                    f"CREATE TRIGGER refuse_{table} BEFORE INSERT ON {table} "
                    f"WHEN instr(NEW.{column}, CAST('{LOST}' AS BLOB)) > 0 "
                    "BEGIN SELECT RAISE(ABORT, 'disk says no'); END"
                )
            db.commit()
        return
    with psycopg.connect(url, autocommit=True) as db:
        db.execute(
            "CREATE FUNCTION refuse_answer() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"IF position(convert_to('{LOST}', 'UTF8') in NEW.blob) > 0 THEN "
            "RAISE EXCEPTION 'disk says no'; END IF; RETURN NEW; END $$"
        )
        for table in ("checkpoint_writes", "checkpoint_blobs"):
            db.execute(
                f"CREATE TRIGGER refuse_{table} BEFORE INSERT ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION refuse_answer()"
            )


def _allow_the_answer(url: str) -> None:
    if url.startswith("sqlite"):
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as db:
            db.execute("DROP TRIGGER refuse_writes")
            db.execute("DROP TRIGGER refuse_checkpoints")
            db.commit()
        return
    with psycopg.connect(url, autocommit=True) as db:
        db.execute("DROP FUNCTION refuse_answer() CASCADE")


def _agent(model: ScriptedChatModel, ledger: Ledger, saver: Any) -> Any:
    @tool
    def lookup(order_id: str) -> str:
        """Look up an order."""
        return f"order {order_id}: delivered"

    policy = Policy(
        name="p", rules=(Rule(tool="lookup", action="allow"),), period_budgets=(BUDGET,)
    )
    return build_agent(
        model, [lookup], policy=policy, prices=PRICES, ledger=ledger, checkpointer=saver
    )


def _spent(model: ScriptedChatModel) -> tuple[int, int, int, float]:
    """(calls, input tokens, output tokens, usd) of every answer the model gave."""
    usage = [a.usage_metadata or {} for a in model.answers]
    tokens_in = sum(int(u.get("input_tokens", 0)) for u in usage)
    tokens_out = sum(int(u.get("output_tokens", 0)) for u in usage)
    return len(model.answers), tokens_in, tokens_out, (tokens_in + tokens_out) / 1000


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
def test_a_run_resumed_after_its_checkpoint_failed_records_every_call_it_paid_for(
    db_url: str, mode: str
) -> None:
    loop = asyncio.new_event_loop()
    ledger = Ledger(db_url)
    model = ScriptedChatModel(
        script=[call("lookup", order_id="A1"), LOST, "answer two"], model_name="m", fresh_ids=True
    )
    config: Any = {"configurable": {"thread_id": f"lost-{mode}"}}

    def run(saver: Any, payload: Any) -> Any:
        agent = _agent(model, ledger, saver)
        if mode == "invoke":
            return agent.invoke(payload, config, context=CTX)
        return loop.run_until_complete(agent.ainvoke(payload, config, context=CTX))

    try:
        with contextlib.ExitStack() as stack:
            if mode == "invoke":
                saver = stack.enter_context(Persistence(db_url).checkpointer())
            else:
                saving = Persistence(db_url).acheckpointer()
                saver = loop.run_until_complete(saving.__aenter__())
                stack.callback(lambda: loop.run_until_complete(saving.__aexit__(None, None, None)))
            _refuse_the_answer(db_url)
            failed = run(saver, {"messages": [("user", "where is A1?")]})
            assert failed["outcome"]["terminated_reason"] == "storage", failed["outcome"]
            [record] = RunLog(ledger).query()
            assert (record.terminated_reason, record.model_calls) == ("storage", 2)

            _allow_the_answer(db_url)
            done = run(saver, None)  # the resume the detail says: it asks the model again
        assert done["outcome"]["terminated_reason"] == "completed", done["outcome"]
        calls, tokens_in, tokens_out, usd = _spent(model)
        assert calls == 3
        assert done["usage"]["model_calls"] == 2  # the saved state lost one of them
        [record] = RunLog(ledger).query()
        assert record.terminated_reason == "completed"
        # the record counts all three calls, as the period budget's ledger does
        got = (record.model_calls, record.input_tokens, record.output_tokens)
        assert got == (calls, tokens_in, tokens_out), record
        assert record.usd == pytest.approx(usd)
        assert SpendMeter(ledger, [BUDGET]).spent(BUDGET, CTX)[0] == pytest.approx(usd)
    finally:
        loop.run_until_complete(ledger.aclose())
        loop.close()


def test_a_callers_own_unsaved_usage_is_dropped(db_url: str) -> None:
    """A hostile caller's `keel_unsaved_usage` in the config of a continuation adds nothing."""
    ledger = Ledger(db_url)
    model = ScriptedChatModel(script=[call("lookup", order_id="A1"), "done"], model_name="m")
    with Persistence(db_url).checkpointer() as saver:
        agent = _agent(model, ledger, saver)
        config: Any = {"configurable": {"thread_id": "forged"}}
        paused = agent.invoke(
            {"messages": [("user", "hi")]}, config, context=CTX, interrupt_after=["call_model"]
        )
        assert paused["outcome"]["terminated_reason"] == "breakpoint", paused["outcome"]
        [record] = RunLog(ledger).query()
        forged = {"graph": record.graph, "run_key": record.run_key, "usage": {"usd": 1e6}}
        forging = {"configurable": {"thread_id": "forged", UNSAVED_KEY: forged}}
        done = agent.invoke(None, forging, context=CTX)
        assert done["outcome"]["terminated_reason"] == "completed", done["outcome"]
    [record] = RunLog(ledger).query()
    assert record.usd == pytest.approx(done["usage"]["usd"]) and record.usd < 1
    assert record.model_calls == 2
    ledger.close()
