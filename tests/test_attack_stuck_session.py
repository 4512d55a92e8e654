"""A keel process stopped inside a ledger transaction, on a real PostgreSQL.

A process that stops mid-transaction (SIGSTOP, a debugger, a paused VM, a network gone while
the server still sees the connection: the kernel answers TCP keepalives for a stopped process)
held its row locks for as long as it stayed stopped. The rate limits' and breakers' rows are
shared by every run of a model, a period budget's by a whole tenant: every other process's run
waited its reply timeout (60 s) out and ended `storage`, one after another. keel's ledger
sessions now end when idle in a transaction longer than `IDLE_IN_TRANSACTION` (30 s), unless
the URL sets its own `idle_in_transaction_session_timeout`.
"""

from __future__ import annotations

import time
from urllib.parse import quote

import psycopg
import pytest
from forking import ForkServer

from keel import Ledger, RunContext, build_agent
from keel.db.pools import IDLE_IN_TRANSACTION
from keel.evals import ScriptedChatModel
from keel.guards import Policy, RateLimit, Rule

STUCK = """
import os, signal, sys
import keel.db.pools
from keel import Ledger

keel.db.pools.IDLE_IN_TRANSACTION = "2s"  # keel's 30 s, shortened for the test
ledger = Ledger(sys.argv[1])


def stuck():
    key = "rpm:model:scripted"
    yield (
        "INSERT INTO keel_rate_buckets (key, tokens, updated_at) VALUES (?, 1000000, 0) "
        "ON CONFLICT (key) DO NOTHING"
    ), (key,)
    rows = yield "SELECT tokens FROM keel_rate_buckets WHERE key = ? FOR UPDATE", (key,)
    print("locked", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)  # stopped with the row locked, its session open
    return rows


ledger.run(stuck())
"""


def _with_option(url: str, option: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}options={quote(option)}"


def test_a_process_stopped_mid_transaction_holds_no_run_of_another_for_long(
    fresh_postgres_url: str, forks: ForkServer
) -> None:
    url = fresh_postgres_url
    Ledger(url).setup()
    stuck = forks.start_code(STUCK, url)
    ledger = Ledger(url)
    try:
        stuck.wait_for_line("locked")
        policy = Policy(
            name="limited",
            rules=(Rule(tool="*", action="allow"),),
            rate_limits=(RateLimit(rpm=600),),
        )
        agent = build_agent(ScriptedChatModel(script=["Hello."]), policy=policy, ledger=ledger)
        began = time.monotonic()
        done = agent.invoke({"messages": [("user", "hi")]}, context=RunContext(user_id="u"))
        waited = time.monotonic() - began
        assert done["outcome"]["terminated_reason"] == "completed", done["outcome"]
        assert waited < 30, waited  # the stopped session was ended, not waited out (60 s)
    finally:
        stuck.kill()
        stuck.wait()
        ledger.close()


@pytest.mark.parametrize(
    ("option", "shown"),
    [("", IDLE_IN_TRANSACTION), ("-c idle_in_transaction_session_timeout=0", "0")],
)
def test_keel_s_ledger_sessions_end_when_idle_in_a_transaction(
    fresh_postgres_url: str, option: str, shown: str
) -> None:
    url = _with_option(fresh_postgres_url, option) if option else fresh_postgres_url
    ledger = Ledger(url)
    try:
        (row,) = ledger.read(_show())
        assert row[0] == shown
    finally:
        ledger.close()
    with psycopg.connect(fresh_postgres_url) as plain:  # the server's own default: none
        assert plain.execute("SHOW idle_in_transaction_session_timeout").fetchone() == ("0",)


def _show() -> object:
    rows = yield "SELECT current_setting('idle_in_transaction_session_timeout')", ()
    return rows
