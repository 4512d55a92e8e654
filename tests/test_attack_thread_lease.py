"""One run per thread across processes: web workers that share a ledger and a checkpointer.

A user who sends twice, with the two requests landing in two worker processes: without a lease
both runs start from the same checkpoint and the one that saves last erases the other's
messages. With a ledger, a run takes the thread's lease in it first (`keel_thread_leases`);
the other process's run waits for it. Each process here is a real OS process running
`_SCRIPT` (a keel agent on the shared SQLite file or PostgreSQL database), forked with keel
imported (`tests/forking.py`).
"""

from __future__ import annotations

import asyncio
import textwrap
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import eventually
from forking import ForkServer

import keel.graphs._one_run as one_run
from keel import Ledger, Persistence, RunContext
from keel.evals import ScriptedChatModel
from keel.graphs import build_agent
from keel.graphs._one_run import ThreadLeases

CTX = RunContext(user_id="u1", tenant_id="acme")

_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, os, sys, time
    from keel import Ledger, Persistence, RunContext
    from keel.evals import ScriptedChatModel
    from keel.graphs import build_agent
    from keel.graphs._one_run import ThreadLeases

    url, thread, text, reply, latency, lease_s, mode, go = sys.argv[1:]
    ledger = Ledger(url)
    ledger.setup()
    model = ScriptedChatModel(script=[reply, reply], latency=float(latency))  # turn 1 or 2
    config = {"configurable": {"thread_id": thread}}
    message = {"messages": [("user", text)]}
    context = RunContext(user_id="u1", tenant_id="acme")

    def agent_on(saver):
        agent = build_agent(model, [], ledger=ledger, checkpointer=saver)
        agent.keel_thread_leases = ThreadLeases(ledger, lease_s=float(lease_s))
        print("READY", flush=True)
        while not os.path.exists(go):  # the test starts both processes' runs at once
            time.sleep(0.005)
        return agent

    if mode == "sync":
        with Persistence(url).checkpointer() as saver:
            result = agent_on(saver).invoke(message, config, context=context)
    else:
        async def main():
            async with Persistence(url).acheckpointer() as saver:
                agent = agent_on(saver)
                return await agent.ainvoke(message, config, context=context)
        result = asyncio.run(main())
    print("DONE", result["outcome"]["status"], flush=True)
    print(result["outcome"], file=sys.stderr)
    """
)


@dataclass(frozen=True)
class _Script:
    """Where a test's worker processes come from (a fork server, keel imported) and run."""

    forks: ForkServer
    folder: Path


class _Worker:
    """One OS process running one agent run (`_SCRIPT`), started on `go()`.

    Forked with keel imported (`tests/forking.py`); it goes when the test makes its `go` file.
    """

    def __init__(self, script: _Script, url: str, thread: str, text: str, reply: str, **kw: Any):
        self.go_file = script.folder / f"go-{uuid.uuid4().hex}"
        args = [url, thread, text, reply, str(kw.get("latency", 0.5))]
        args += [str(kw.get("lease_s", 30.0)), kw.get("mode", "sync"), str(self.go_file)]
        self.proc = script.forks.start_code(_SCRIPT, *args, cwd=script.folder)
        self.proc.wait_for_line("READY")
        self.errors = ""

    def go(self) -> None:
        self.go_file.touch()

    def result(self, timeout: float = 60) -> str:
        """What it printed after READY, once it ended (0, or the test fails)."""
        code = self.proc.finish(timeout)
        out, self.errors = self.proc.output()
        assert code == 0, self.errors
        return out.removeprefix("READY\n").strip()

    def kill(self) -> None:
        """SIGKILL: no finally, no atexit: the lease stays behind (its process waited for)."""
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def script(tmp_path: Path, forks: ForkServer) -> _Script:
    return _Script(forks, tmp_path)


@pytest.fixture
def workers() -> Iterator[list[_Worker]]:
    started: list[_Worker] = []
    yield started
    for worker in started:
        if worker.proc.returncode is None:
            worker.kill()


def _leases(url: str) -> list[tuple[Any, ...]]:
    def flow() -> Any:
        rows = yield "SELECT thread_id, checkpoint_ns, holder FROM keel_thread_leases", ()
        return [tuple(r) for r in rows]

    ledger = Ledger(url)
    try:
        return list(ledger.run(flow()))
    finally:
        ledger.close()


def _history(url: str, thread: str) -> list[str]:
    agent = build_agent(ScriptedChatModel(script=[]), [], ledger=None)
    with Persistence(url).checkpointer() as saver:
        state = agent.copy({"checkpointer": saver}).get_state(
            {"configurable": {"thread_id": thread}}
        )
    return [m.text for m in state.values["messages"]]


def _thread(name: str) -> dict[str, Any]:
    return {"configurable": {"thread_id": name}}


def _within(seconds: float, stuck: str, agent: Any, message: Any, thread: str) -> dict[str, Any]:
    """`agent.invoke(message)` on `thread`, in an OS thread (a run stuck waiting fails, `stuck`)."""
    result: dict[str, Any] = {}
    run = threading.Thread(
        target=lambda: result.update(agent.invoke(message, _thread(thread), context=CTX)),
        daemon=True,
    )
    run.start()
    run.join(timeout=seconds)
    assert not run.is_alive(), stuck
    return result


@pytest.mark.parametrize("first", ["both at once", "sync first", "async first"])
def test_two_processes_sending_to_one_thread_at_once_both_keep_their_messages(
    db_url: str, script: _Script, workers: list[_Worker], first: str
) -> None:
    """Two worker processes (one sync, one async) get a message each for one thread at once
    (or the second while the first runs); each run outlasts its lease's lifetime, renewed
    while it streams."""
    Ledger(db_url).setup()
    # each run's model takes 2 s, two lifetimes of its lease: only renewals keep it (without
    # them the waiting run takes the thread within 1.5 s and both start from one checkpoint)
    ask = {"latency": 2.0, "lease_s": 1.0}
    workers.append(_Worker(script, db_url, "twice", "Where is A1?", "A1 shipped.", **ask))
    workers.append(_Worker(script, db_url, "twice", "And B2?", "B2 too.", mode="async", **ask))
    one, two = workers[::-1] if first == "async first" else workers
    one.go()
    if first != "both at once":
        eventually(lambda: _leases(db_url) != [], "the first run's lease")
    two.go()
    done = [w.result() for w in workers]
    assert done == ["DONE success", "DONE success"], [w.errors for w in workers]
    texts = _history(db_url, "twice")
    # one run after the other: each question with its own answer, none erased
    assert texts in (
        ["Where is A1?", "A1 shipped.", "And B2?", "B2 too."],
        ["And B2?", "B2 too.", "Where is A1?", "A1 shipped."],
    ), texts
    assert _leases(db_url) == []  # both gave the thread back


def _holding(script: _Script, url: str, thread: str, lease_s: float) -> _Worker:
    """A worker process whose run holds `thread`'s lease (its model takes a minute)."""
    worker = _Worker(script, url, thread, "Slow?", "never", latency=60, lease_s=lease_s)
    worker.go()
    eventually(lambda: _leases(url) != [], "the worker's lease")
    return worker


def test_a_killed_process_lease_expires_and_another_process_run_proceeds(
    db_url: str, script: _Script, workers: list[_Worker]
) -> None:
    """A worker SIGKILLed mid-run never releases its lease: the next run waits for it to expire
    (on another host: one of this host is taken over at once, see the next test)."""
    Ledger(db_url).setup()
    workers.append(_holding(script, db_url, "crashed", lease_s=1.5))
    workers[0].kill()
    ledger = Ledger(db_url)

    def elsewhere() -> Any:  # the dead worker ran on another host
        yield (
            "UPDATE keel_thread_leases SET holder = ? WHERE thread_id = ?",
            (
                "other-host/pid:[1]/4242/run",
                "crashed",
            ),
        )

    ledger.run(elsewhere())
    agent = build_agent(ScriptedChatModel(script=["Back."]), [], ledger=ledger)
    with Persistence(db_url).checkpointer() as saver:
        agent = agent.copy({"checkpointer": saver})
        message = {"messages": [("user", "Hello?")]}
        result = _within(30, "the dead process's lease never expired", agent, message, "crashed")
    assert result["outcome"]["status"] == "success"
    assert _history(db_url, "crashed")[-2:] == ["Hello?", "Back."]
    assert _leases(db_url) == []
    ledger.close()


def test_a_lease_of_a_dead_process_of_this_host_is_taken_over_without_waiting_it_out(
    db_url: str, script: _Script, workers: list[_Worker]
) -> None:
    """A worker of this host SIGKILLed mid-run (the crash a resume follows) holds a lease that
    would block its thread for the whole lease: its process is gone, so the next run takes
    it over at once."""
    Ledger(db_url).setup()
    workers.append(_holding(script, db_url, "killed", lease_s=600))
    ((_, _, dead),) = _leases(db_url)
    workers[0].kill()
    ledger = Ledger(db_url)
    agent = build_agent(ScriptedChatModel(script=["Back."]), [], ledger=ledger)
    with Persistence(db_url).checkpointer() as saver:
        agent = agent.copy({"checkpointer": saver})
        message = {"messages": [("user", "Hello?")]}
        result = _within(60, "the run waited out a dead process's lease", agent, message, "killed")
    assert result["outcome"]["status"] == "success"
    assert _history(db_url, "killed")[-2:] == ["Hello?", "Back."]
    assert _leases(db_url) == [] and dead.count("/") == 3  # (host, PID namespace, PID, run)
    ledger.close()


async def test_runs_on_other_threads_do_not_wait_for_another_process(
    db_url: str, script: _Script, workers: list[_Worker]
) -> None:
    Ledger(db_url).setup()
    workers.append(_holding(script, db_url, "busy", lease_s=30))
    ledger = Ledger(db_url)
    agent = build_agent(ScriptedChatModel(script=["Free."]), [], ledger=ledger)
    async with Persistence(db_url).acheckpointer() as saver:
        agent = agent.copy({"checkpointer": saver})
        message = {"messages": [("user", "Hi")]}
        run = agent.ainvoke(message, _thread("other"), context=CTX)
        result = await asyncio.wait_for(run, timeout=20)
    assert result["outcome"]["status"] == "success"
    assert [row[0] for row in _leases(db_url)] == ["busy"]  # the worker's, still held
    await ledger.aclose()


async def test_a_cancelled_or_closed_run_releases_its_thread_lease(db_url: str) -> None:
    ledger = Ledger(db_url)
    model = ScriptedChatModel(script=["never", "Hello again.", "Third."], latency=5)
    agent = build_agent(model, [], ledger=ledger)
    async with Persistence(db_url).acheckpointer() as saver:
        agent = agent.copy({"checkpointer": saver})
        config = _thread("left")
        message = {"messages": [("user", "hi")]}
        task = asyncio.create_task(agent.ainvoke(message, config, context=CTX))
        await asyncio.to_thread(eventually, lambda: _leases(db_url) != [], "the lease")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert _leases(db_url) == []  # cancelled: the thread is free for every process now

        model.latency = 0
        chunks = agent.astream(message, config, context=CTX)
        await anext(aiter(chunks))
        assert _leases(db_url) != []
        await chunks.aclose()  # the client went away
        assert _leases(db_url) == []
    await ledger.aclose()


def test_a_closed_sync_stream_releases_its_thread_lease(db_url: str) -> None:
    ledger = Ledger(db_url)
    agent = build_agent(ScriptedChatModel(script=["one"]), [], ledger=ledger)
    with Persistence(db_url).checkpointer() as saver:
        agent = agent.copy({"checkpointer": saver})
        chunks = agent.stream({"messages": [("user", "hi")]}, _thread("sync"), context=CTX)
        next(iter(chunks))
        assert [row[0] for row in _leases(db_url)] == ["sync"]
        chunks.close()
        assert _leases(db_url) == []
    ledger.close()


async def test_two_runs_of_one_process_wait_in_memory_not_on_the_ledger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second run of a process waits on the in-process lock: it asks the ledger once."""
    url = f"sqlite:///{tmp_path / 'keel.db'}"
    asks: list[str] = []
    take = one_run._take_flow

    def counted(thread: str, *args: Any) -> Any:
        asks.append(thread)
        return take(thread, *args)

    monkeypatch.setattr(one_run, "_take_flow", counted)
    ledger = Ledger(url)
    agent = build_agent(ScriptedChatModel(script=["a", "b"], latency=0.5), [], ledger=ledger)
    async with Persistence(url).acheckpointer() as saver:
        agent = agent.copy({"checkpointer": saver})
        config = _thread("local")
        await asyncio.gather(
            agent.ainvoke({"messages": [("user", "q1")]}, config, context=CTX),
            agent.ainvoke({"messages": [("user", "q2")]}, config, context=CTX),
        )
    assert asks == ["local", "local"]
    await ledger.aclose()


def test_thread_leases_refuse_a_lease_that_is_not_a_positive_number(tmp_path: Path) -> None:
    from keel.errors import UserError

    with pytest.raises(UserError, match="lease_s"):
        ThreadLeases(Ledger(f"sqlite:///{tmp_path / 'k.db'}"), lease_s=0)


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
async def test_a_ledger_that_fails_at_the_lease_leaves_the_run_to_the_process_lock(
    tmp_path: Path, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The lease table is gone (a ledger restored from an old backup): the run still answers,
    as with keel's other ledger guards, and the log says the thread is only locked here."""
    url = f"sqlite:///{tmp_path / 'keel.db'}"
    ledger = Ledger(url)
    ledger.setup()

    def drop() -> Any:
        yield "DROP TABLE keel_thread_leases", ()

    ledger.run(drop())
    agent = build_agent(ScriptedChatModel(script=["Still here."]), [], ledger=ledger)
    async with Persistence(url).acheckpointer() as saver:
        agent = agent.copy({"checkpointer": saver})
        message = {"messages": [("user", "hi")]}
        if mode == "invoke":
            result = await asyncio.to_thread(agent.invoke, message, _thread("t"), context=CTX)
        else:
            result = await agent.ainvoke(message, _thread("t"), context=CTX)
    assert result["outcome"]["status"] == "success"
    assert "could not take the lease of thread 't'" in caplog.text
    await ledger.aclose()


def test_a_tool_running_another_agent_under_its_own_thread_id_does_not_wait_for_itself(
    tmp_path: Path,
) -> None:
    """A tool runs a second agent (its own checkpointer, the same ledger) under the thread id
    of the run that called it: that run holds the thread's lease and waits for the tool, so
    the inner run must not wait for the lease."""
    from langgraph.checkpoint.memory import InMemorySaver

    from keel import tool
    from keel.evals import call
    from keel.guards import Policy, Rule

    url = f"sqlite:///{tmp_path / 'keel.db'}"
    ledger = Ledger(url)
    inner = build_agent(
        ScriptedChatModel(script=["inner"]), [], ledger=ledger, checkpointer=InMemorySaver()
    )

    @tool(name="ask_helper")
    def ask_helper(question: str) -> str:
        """Ask the helper agent, under the caller's thread id."""
        out = inner.invoke({"messages": [("user", question)]}, _thread("shared"), context=CTX)
        return str(out["messages"][-1].text)

    model = ScriptedChatModel(script=[call("ask_helper", question="hi"), "Done."])
    policy = Policy(rules=[Rule(tool="ask_helper", action="allow")])
    with Persistence(url).checkpointer() as saver:
        outer = build_agent(model, [ask_helper], policy=policy, ledger=ledger, checkpointer=saver)
        stuck = "the helper's run waited for the lease its caller holds"
        result = _within(20, stuck, outer, {"messages": [("user", "go")]}, "shared")
    assert result["outcome"]["status"] == "success"
    assert [m.text for m in result["messages"]][-2:] == ["inner", "Done."]
    assert _leases(url) == []
    ledger.close()
