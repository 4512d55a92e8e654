"""A fork server: processes that start with keel already imported, for tests that kill them.

A test that SIGKILLs agent processes starts many of them, and a fresh interpreter spends ~2 s
(more on a loaded machine) importing keel and LangGraph before it does anything. `ForkServer`
is one interpreter that imports what the children import, then forks a process per `start`:
the child runs a script file (`runpy`, as `python script.py args` would) or code (`-c`), its
stdout and stderr in files, and is a real process a test can SIGKILL. The server forks before
it has any thread, event loop or connection, so the child opens its own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Mapping, Sequence
from contextlib import suppress
from pathlib import Path

from conftest import ctrl_c_as_in_a_terminal, eventually

CHECKPOINTERS = (
    "psycopg",
    "psycopg_pool",
    "langgraph.checkpoint.sqlite",
    "langgraph.checkpoint.sqlite.aio",
    "langgraph.checkpoint.postgres",
    "langgraph.checkpoint.postgres.aio",
)
"""What keel's `Persistence` and `Ledger` load when first used: worth importing before forking."""

SERVER = textwrap.dedent(
    """
    import contextlib, json, os, runpy, sys
    for name in json.loads(sys.argv[1]):  # what the children import, imported once
        with contextlib.suppress(ImportError):
            __import__(name)
    import gc
    gc.freeze()  # what it imported: not the children's garbage (a child's exit is 0.5 s faster)
    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if "wait" in request:
            _, status = os.waitpid(request["wait"], 0)
            print(os.waitstatus_to_exitcode(status), flush=True)
            continue
        pid = os.fork()
        if pid:
            print(pid, flush=True)
            continue
        # the child: set up as `python script args` would be, run, and end as it would (an
        # uncaught exception printed, exit 1; `sys.exit` and the interpreter's shutdown as usual)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # not the server's requests
        sys.stdin = open(0, closefd=False)
        for fd, path in ((1, request["out"]), (2, request["err"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        os.chdir(request["cwd"])
        if "script" in request:
            sys.argv = [request["script"], *request["args"]]
            sys.path[0] = os.path.dirname(request["script"])
            runpy.run_path(request["script"], run_name="__main__")
        else:
            sys.argv = ["-c", *request["args"]]
            exec(compile(request["code"], "<string>", "exec"), {"__name__": "__main__"})
        sys.exit(0)
    """
)


class Forked:
    """A process the fork server started: its pid, its output files."""

    def __init__(self, server: ForkServer, pid: int, out: Path, err: Path) -> None:
        self.server, self.pid, self.out, self.err = server, pid, out, err
        self.returncode: int | None = None

    def output(self) -> tuple[str, str]:
        """What it wrote to stdout and to stderr."""
        return self.out.read_text(), self.err.read_text()

    def lines(self) -> list[str]:
        """What it printed so far, line by line."""
        return self.out.read_text().splitlines()

    def wait_for_line(self, line: str) -> None:
        """Wait until it printed `line` (or ended); fail if it ended without."""
        eventually(lambda: line in self.lines() or not self._running(), f"{line!r} from {self}")
        assert line in self.lines(), self.err.read_text()

    def ended(self) -> bool:
        """Whether it has ended (waited for or not)."""
        return not self._running()

    def finish(self, seconds: float = 120) -> int:
        """Its exit code (-9: SIGKILLed) once it ended on its own; fail if it did not end
        within `seconds` (it is killed then, not left running)."""
        try:
            eventually(self.ended, f"{self} to end", seconds)
        finally:
            self.kill()  # (one that did not end, or a zombie: nothing)
        return self.wait()

    def kill(self) -> None:
        """SIGKILL it (nothing once it was waited for: its pid may be another process's now)."""
        if self.returncode is not None:
            return
        with suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    def wait(self) -> int:
        """Its exit code (-9: SIGKILLed), once it ended."""
        if self.returncode is None:
            self.returncode = int(self.server.ask({"wait": self.pid}))
        return self.returncode

    def _running(self) -> bool:
        """Whether it has not ended yet (a zombie, not yet waited for, has ended)."""
        if self.returncode is not None:
            return False  # waited for: its pid may be another process's now
        try:
            state = Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()[0]
        except FileNotFoundError:
            return False
        return state != "Z"

    def __repr__(self) -> str:
        return f"Forked(pid={self.pid})"


class ForkServer:
    """`start` a script or code in a process forked from an interpreter that imported `preload`.

    `env` is the whole environment of the server and so of every child (default: this one's).
    """

    def __init__(
        self, preload: Sequence[str], folder: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.folder, self._count = folder, 0
        with (folder / "server-stderr").open("w") as stderr:  # the server keeps its own copy
            self._proc = subprocess.Popen(
                [sys.executable, "-c", SERVER, json.dumps(list(preload))],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                cwd=folder,  # (the repository's `keel/` folder would shadow the package)
                env=dict(os.environ if env is None else env),
                preexec_fn=ctrl_c_as_in_a_terminal,  # a test's SIGINT reaches a child's Python
            )
        assert self._read() == "ready", (folder / "server-stderr").read_text()

    def start_script(self, script: Path, *args: str, cwd: Path | None = None) -> Forked:
        """`python script args` (in `cwd`, default the server's folder)."""
        return self._start({"script": str(script), "args": list(args)}, cwd)

    def start_code(self, code: str, *args: str, cwd: Path | None = None) -> Forked:
        """`python -c code args` (in `cwd`, default the server's folder)."""
        return self._start({"code": code, "args": list(args)}, cwd)

    def killed_code(self, code: str, *args: str) -> None:
        """Run `python -c code args`, which must end SIGKILLed (it kills itself: a crash)."""
        proc = self.start_code(code, *args)
        assert proc.finish() == -signal.SIGKILL, proc.output()[1]

    def ask(self, request: dict[str, object]) -> str:
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        """End the server (once its children were waited for, or are left to init)."""
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.close()
        self._proc.wait(60)
        self._proc.stdout.close()

    def _start(self, request: dict[str, object], cwd: Path | None) -> Forked:
        self._count += 1
        out, err = (self.folder / f"{self._count}.{name}" for name in ("out", "err"))
        out.touch()
        err.touch()
        where = str(cwd or self.folder)
        pid = int(self.ask({**request, "out": str(out), "err": str(err), "cwd": where}))
        return Forked(self, pid, out, err)

    def _read(self) -> str:
        assert self._proc.stdout is not None
        return self._proc.stdout.readline().rstrip("\n")
