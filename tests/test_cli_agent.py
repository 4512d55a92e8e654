"""`keel run --agent module:attr`, resuming `keel demo` threads, and tracing with no key.

The `keel` command runs as users run it: a subprocess in a fresh folder holding the user's
module, SQLite in that folder, no terminal. Bad `--agent` strings are checked in process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import ctrl_c_as_in_a_terminal

from keel.app.cli import main

USER_AGENTS = textwrap.dedent(
    '''
    import asyncio
    import os
    import time
    from typing import Any

    from langchain.agents import create_agent
    from langchain_core.messages import AIMessage
    from langchain_core.tools import tool
    from langgraph.graph import END, START, MessagesState, StateGraph

    from keel.evals import ScriptedChatModel, call
    from keel.graphs import build_agent
    from keel.tools import tool as keel_tool

    REFUNDS = []


    @tool
    def shout(text: str) -> str:
        """Shout a text."""
        return text.upper()


    # a LangChain agent: keel adds its checkpointer; its state keeps no keel outcome
    graph = create_agent(
        ScriptedChatModel(script=[call("shout", text="hello"), "I shouted HELLO."]), tools=[shout]
    )


    def refund_agent(checkpointer: Any = None) -> Any:
        """A factory: keel's agent with a refund that needs a human's approval."""

        @keel_tool(name="refund", risk="destructive")
        def refund(order_id: str) -> str:
            """Refund an order."""
            REFUNDS.append(order_id)
            return f"refunded {order_id}"

        model = ScriptedChatModel(script=[call("refund", order_id="A1"), "Done: A1 refunded."])
        return build_agent(model, [refund], checkpointer=checkpointer, name="refunds")


    def _one_node(node: Any) -> Any:
        builder = StateGraph(MessagesState)
        builder.add_node("only", node)
        builder.add_edge(START, "only")
        builder.add_edge("only", END)
        return builder


    def _boom(state: MessagesState) -> dict[str, Any]:
        raise RuntimeError("the inventory service is down")


    async def _work(state: MessagesState) -> dict[str, Any]:
        print("working", flush=True)  # the test's cue to press Ctrl-C
        await asyncio.sleep(60)
        return {}


    def _block(state: MessagesState) -> dict[str, Any]:
        print("working", flush=True)
        time.sleep(4)  # a sync step: its thread runs on after Ctrl-C
        return {}


    def _in_stock(state: MessagesState) -> dict[str, Any]:
        if os.path.exists("inventory-down"):  # the test's switch for an outage
            raise RuntimeError("the inventory service is down")
        return {"messages": [AIMessage("A1 is in stock.")]}


    def crashing() -> Any:
        return _one_node(_boom)


    def flaky() -> Any:
        return _one_node(_in_stock)


    def slow() -> Any:
        return _one_node(_work)


    def blocking() -> Any:
        return _one_node(_block)


    NOT_A_GRAPH = 42


    def needs_two(a: int, b: int) -> Any:
        return graph
    '''
)


_commands: list[Callable[..., subprocess.CompletedProcess[str]]] = []


@pytest.fixture(autouse=True)
def _keel_command(keel_command: Callable[..., subprocess.CompletedProcess[str]]) -> Iterator[None]:
    _commands.append(keel_command)
    yield
    _commands.remove(keel_command)


def _keel(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`keel args` in `cwd` (no stdin, no KEEL_MODEL, no LangSmith): conftest's `keel_command`,
    the console script run in a process forked with keel imported (`tests/forking.py`)."""
    (run,) = _commands
    return run(*args, cwd=cwd)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "user_agents.py").write_text(USER_AGENTS, encoding="utf-8")
    return tmp_path


def test_run_agent_runs_the_users_graph_with_keels_persistence(project: Path) -> None:
    done = _keel(
        "run", "--agent", "user_agents:graph", "shout hello", "--thread", "u1", cwd=project
    )
    assert done.returncode == 0, done.stderr
    assert "agent user_agents:graph" in done.stdout
    assert "← shout [success]: HELLO" in done.stdout
    assert "[outcome] success / completed: the graph ended" in done.stdout
    listed = _keel("threads", cwd=project)
    assert "u1" in listed.stdout  # checkpointed in keel's database (.keel/keel.db)


def test_a_users_factory_waits_and_is_resumed_from_the_cli(project: Path) -> None:
    ref = "user_agents:refund_agent"
    first = _keel("run", "--agent", ref, "refund A1", "--thread", "r1", "--wait", cwd=project)
    assert first.returncode == 0, first.stderr
    assert "[approval needed] refund" in first.stdout
    assert "[outcome] interrupted / awaiting_approval" in first.stdout
    assert "resume with `keel run --thread r1`" in first.stdout
    # no --agent: the thread recorded what made it
    resumed = _keel("run", "--thread", "r1", "--approve", cwd=project)
    assert resumed.returncode == 0, resumed.stderr
    assert f"agent {ref}" in resumed.stdout
    assert "← refund [success]: refunded A1" in resumed.stdout
    assert "[outcome] success / completed" in resumed.stdout


def test_a_graph_that_raises_ends_as_an_error_not_a_traceback(project: Path) -> None:
    done = _keel("run", "--agent", "user_agents:crashing", "go", "--thread", "c1", cwd=project)
    assert done.returncode == 1
    assert "[outcome] error / error: RuntimeError: the inventory service is down" in done.stdout
    assert "Traceback" not in done.stderr


def _threads(project: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, list[str]]:
    """`keel threads` of the project's database: each thread's status and reason words."""
    capsys.readouterr()
    assert main(["threads", "--db", f"sqlite:///{project}/.keel/keel.db"]) == 0
    lines = capsys.readouterr().out.splitlines()
    return {line.split()[0]: line.split()[2:] for line in lines}


def test_a_thread_whose_graph_raised_is_saved_and_runs_on_from_the_cli(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`[outcome] error …` says `resume with keel run --thread ID`: that reruns the failed step
    (it was refused: `Thread … is not waiting for anything`, exit 2)."""
    (project / "inventory-down").touch()
    failed = _keel("run", "--agent", "user_agents:flaky", "stock?", "--thread", "f1", cwd=project)
    assert failed.returncode == 1, failed.stderr
    assert "[outcome] error / error: RuntimeError: the inventory service is down" in failed.stdout
    assert "keel: the thread is saved; resume with `keel run --thread f1`" in failed.stdout
    listed = _threads(project, capsys)
    assert listed["f1"][:2] == ["error", "RuntimeError('the"]  # it said "waiting"
    (project / "inventory-down").unlink()
    resumed = _keel("run", "--thread", "f1", cwd=project)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "keel: thread f1 stopped before its end; running on from there" in resumed.stdout
    assert "[only] A1 is in stock." in resumed.stdout
    assert "[outcome] success / completed" in resumed.stdout
    assert _threads(project, capsys)["f1"][0] == "-"  # ended; the graph writes no outcome
    again = _keel("run", "--thread", "f1", cwd=project)  # ended: nothing to run on
    assert again.returncode == 2
    assert "Thread f1 is not waiting for anything; give a task to continue it." in again.stderr


def test_a_new_task_on_a_thread_runs_on_the_agent_that_made_it(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What Ctrl-C's line promises (`keel run --thread ID "…"` gives it a new task): it was
    `keel run needs a model` for a thread of `--agent`, with no model set."""
    first = _keel("run", "--agent", "user_agents:flaky", "A1?", "--thread", "g1", cwd=project)
    assert first.returncode == 0, first.stderr  # (a new thread: --thread names no thread yet)
    again = _keel("run", "--thread", "g1", "and A2?", cwd=project)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "keel: thread g1 on sqlite:///.keel/keel.db; agent user_agents:flaky" in again.stdout
    assert "[only] A1 is in stock." in again.stdout
    db = f"sqlite:///{project}/.keel/keel.db"
    for option in (["--model", "keel:demo"], ["--price", "house=1,2"]):  # they were ignored
        capsys.readouterr()
        assert main(["run", "--thread", "g1", *option, "and A3?", "--db", db]) == 2
        err = capsys.readouterr().err
        assert f"{option[0]} " in err
        assert "but thread g1 runs the agent user_agents:flaky, which has its own" in err


def test_a_demo_thread_left_waiting_is_resumed_from_the_cli(project: Path) -> None:
    waiting = _keel("demo", "--wait", "--thread", "d1", cwd=project)
    assert waiting.returncode == 0, waiting.stderr
    assert "[approval needed] issue_refund" in waiting.stdout
    assert "Refunded" not in waiting.stdout
    listed = _keel("threads", cwd=project)
    assert "waiting" in [line.split()[2] for line in listed.stdout.splitlines() if "d1" in line]
    # no --model, no KEEL_MODEL: the demo's model, recorded on the thread
    resumed = _keel("run", "--thread", "d1", "--approve", cwd=project)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming on keel:demo, the model this thread was made with" in resumed.stdout
    assert "← issue_refund [success]: Refunded $42.50 on order A1001" in resumed.stdout
    assert "[outcome] success / completed" in resumed.stdout
    again = _keel("run", "--thread", "d1", "--approve", cwd=project)
    assert again.returncode == 2
    assert "Thread d1 is not waiting for anything" in again.stderr


def test_demo_on_a_waiting_thread_answers_the_approval_instead_of_a_new_task(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = f"sqlite:///{tmp_path}/k.db"
    assert main(["demo", "--wait", "--db", db, "--thread", "w1"]) == 0
    assert "[approval needed] issue_refund" in capsys.readouterr().out
    assert main(["demo", "--reject", "--db", db, "--thread", "w1"]) == 1
    out = capsys.readouterr().out
    assert "keel: thread w1 waits for an approval; resuming it" in out
    assert "[outcome] stopped / rejected" in out
    assert "[plan]" not in out  # no second task was started


def test_a_model_given_on_resume_wins_over_the_threads_own(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The demo's thread was made on keel:demo; --model names another, unpriced: refused."""
    db = f"sqlite:///{tmp_path}/k.db"
    assert main(["demo", "--wait", "--db", db, "--thread", "m1"]) == 0
    capsys.readouterr()
    resume = ["run", "--thread", "m1", "--approve", "--db", db]
    assert main([*resume, "--model", "serve.house_model:model"]) == 2
    assert "keel has no price for model 'house-model'" in capsys.readouterr().err
    assert main(resume) == 0  # still waiting: nothing ran; on the thread's own model it ends
    assert "resuming on keel:demo, the model this thread was made with" in capsys.readouterr().out


def test_a_graph_of_yours_that_interrupts_ends_interrupted_awaiting_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No keel outcome in its state, an interrupt() that is not keel's approval: exit 0."""
    module = f"asking_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(ASKING, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    db = f"sqlite:///{tmp_path}/k.db"
    assert main(["run", "--agent", f"{module}:asking", "buy a shirt", "--db", db]) == 0
    out = capsys.readouterr().out
    assert '[interrupt] {"question": "which size?"}' in out
    assert "[outcome] interrupted / awaiting_input: the graph waits (interrupt)" in out


ASKING = textwrap.dedent(
    """
    from langgraph.graph import END, START, MessagesState, StateGraph
    from langgraph.types import interrupt

    def ask(state):
        return {"messages": [("ai", f"size {interrupt({'question': 'which size?'})}")]}

    asking = StateGraph(MessagesState)
    asking.add_node("ask", ask)
    asking.add_edge(START, "ask")
    asking.add_edge("ask", END)
    """
)


def test_resuming_a_thread_that_does_not_exist_says_so(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--thread", "nope", "--db", f"sqlite:///{project}/k.db"]) == 2
    assert "There is no thread 'nope' in this database; `keel threads`" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("attr", "message"),
    [
        ("", "--agent must read 'package.module:attribute' (e.g. 'myapp.agent:graph'), got"),
        ("graph:extra", "--agent must read 'package.module:attribute'"),
        ("nope", "has no attribute 'nope'. Name the variable that holds your compiled graph"),
        ("NOT_A_GRAPH", "is int, not a LangGraph graph: name a compiled graph"),
        ("needs_two", "is a function keel cannot call"),
    ],
)
def test_bad_agent_strings_are_clear_errors(
    project: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    attr: str,
    message: str,
) -> None:
    module = f"agents_{uuid.uuid4().hex[:8]}"  # a fresh module: nothing cached between cases
    (project / f"{module}.py").write_text(USER_AGENTS, encoding="utf-8")
    monkeypatch.chdir(project)
    ref = f"{module}:{attr}" if attr else module
    assert main(["run", "--agent", ref, "hi", "--db", f"sqlite:///{project}/k.db"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (None, "': there is no module 'no_such_module_"),
        ("import no_such_dependency_here\n", "' failed: No module named 'no_such_dependency_here'"),
        ("raise RuntimeError('bad config')\n", "raised RuntimeError: bad config"),
    ],
)
def test_an_agent_module_that_cannot_be_imported_is_named(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    source: str | None,
    message: str,
) -> None:
    name = f"no_such_module_{uuid.uuid4().hex[:8]}"  # earlier cases' folders stay on sys.path
    if source is not None:
        (tmp_path / f"{name}.py").write_text(source, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    ref = f"{name}:graph"
    assert main(["run", "--agent", ref, "hi", "--db", f"sqlite:///{tmp_path}/k.db"]) == 2
    assert message in capsys.readouterr().err


def test_agent_and_model_together_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--agent", "m:g", "--model", "keel:demo", "hi"]) == 2
    assert "--model sets the model of keel's own agent" in capsys.readouterr().err


def test_agent_and_price_together_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """`--price` would be silently ignored: the user's agent builds its own price table."""
    assert main(["run", "--agent", "m:g", "--price", "house=1,2", "hi"]) == 2
    assert "--price prices the model of keel's own agent" in capsys.readouterr().err


# -- LANGSMITH_TRACING=true with no key: one line, no network ---------------------------------

GUARDED = textwrap.dedent(
    """
    import socket, sys

    def refuse(*args, **kwargs):
        sys.stderr.write(f"NETWORK ATTEMPT {args[1:] or args}\\n")
        raise OSError("network forbidden in this test")

    real_connect = socket.socket.connect

    def connect(self, address):
        if self.family == socket.AF_UNIX:
            return real_connect(self, address)
        return refuse(self, address)

    socket.socket.connect = connect
    socket.socket.connect_ex = lambda self, address: refuse(self, address)
    socket.getaddrinfo = refuse
    socket.create_connection = refuse
    """
)
CLI = "from keel.app.cli import main\nsys.exit(main(sys.argv[1:]))\n"
LIBRARY = textwrap.dedent(
    """
    import time
    from keel import RunContext
    from keel.evals import ScriptedChatModel
    from keel.graphs import build_agent

    agent = build_agent(ScriptedChatModel(script=["Hello!"]))
    result = agent.invoke({"messages": [("user", "hi")]}, context=RunContext(user_id="u1"))
    print("[outcome]", result["outcome"]["status"], "/", result["outcome"]["terminated_reason"])
    time.sleep(1)  # LangSmith's client works from a background thread: give it time to try
    """
)


@pytest.mark.parametrize(
    ("tail", "args"),
    [
        (CLI, ["demo", "--thread", "t1"]),
        (CLI, ["run", "--agent", "user_agents:graph", "hi", "--thread", "t2"]),
        (LIBRARY, []),
    ],
    ids=["keel-demo", "users-graph", "library"],
)
def test_tracing_on_without_a_key_prints_one_line_and_never_connects(
    project: Path, tail: str, args: list[str]
) -> None:
    """Pinned: langsmith's `Client()` asks api.smith.langchain.com for its limits from its
    batching thread at once, key or no key; keel's silent tracer uses one without that thread."""
    (project / "guarded.py").write_text(GUARDED + tail, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LANGSMITH_", "LANGCHAIN_"))}
    env.pop("KEEL_MODEL", None)
    env["LANGSMITH_TRACING"] = "true"
    done = subprocess.run(
        [sys.executable, "guarded.py", *args],
        cwd=project,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env=env,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "NETWORK ATTEMPT" not in done.stderr
    line = "LANGSMITH_TRACING is on but LANGSMITH_API_KEY is not set: keel sends no traces."
    assert done.stderr.count(line) == 1, done.stderr
    assert "Warning" not in done.stderr  # e.g. langsmith's LangSmithMissingAPIKeyWarning
    assert "[outcome] success / completed" in done.stdout


def test_an_empty_agent_is_refused_not_taken_for_none(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--agent", "", "hi"]) == 2  # it used to ask for a model instead
    assert "keel: --agent is empty: name your graph as module:attribute" in capsys.readouterr().err


def _interrupt(project: Path, *args: str, cue: str, stream: str) -> tuple[int, str, float]:
    """Run `keel ARGS`, press Ctrl-C (SIGINT) once `cue` shows on `stream`.

    Returns the exit code, stderr and the seconds until keel said it was interrupted.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEEL_MODEL", "LANGSMITH_"))}
    env["LANGSMITH_TRACING"] = "false"
    if stream == "stderr":
        env["PYTHONPROFILEIMPORTTIME"] = "1"  # a line per module imported: keel is loading
    with subprocess.Popen(
        [str(Path(sys.executable).with_name("keel")), *args],
        cwd=project,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # SIGINT reaches keel only, not pytest
        preexec_fn=ctrl_c_as_in_a_terminal,  # not ignored, even if this test run ignores it
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        watched = proc.stdout if stream == "stdout" else proc.stderr
        while cue not in (line := watched.readline()):
            assert line, f"keel ended before {cue!r}"
        proc.send_signal(signal.SIGINT)
        pressed, said = time.monotonic(), ""
        while "keel: interrupted" not in said and (line := proc.stderr.readline()):
            said += line
        waited = time.monotonic() - pressed
        _, err = proc.communicate(timeout=60)
    return proc.returncode, said + err, waited


@pytest.mark.parametrize("agent", ["slow", "blocking"])
def test_ctrl_c_during_a_run_ends_with_the_thread_to_resume_not_a_traceback(
    project: Path, agent: str
) -> None:
    """Said at once, even while a blocking step (a sync tool) runs on to its end."""
    ref = f"user_agents:{agent}"
    code, err, waited = _interrupt(
        project, "run", "go", "--agent", ref, "--thread", "t-c", cue="working", stream="stdout"
    )
    assert code == 130
    assert waited < 3  # the blocking step sleeps 4 s
    assert "Traceback" not in err
    assert err.strip().endswith(
        "keel: interrupted; thread t-c is saved up to its last step (`keel threads` lists it): "
        "`keel run --thread t-c` resumes it if it waits for an approval, `keel run --thread t-c "
        '"…"` gives it a new task.'
    )


def test_ctrl_c_while_keel_is_loading_ends_in_one_line(project: Path) -> None:
    code, err, _ = _interrupt(project, "threads", cue="langchain_core", stream="stderr")
    assert code == 130
    assert "Traceback" not in err
    assert err.strip().endswith("keel: interrupted while starting; nothing ran.")
