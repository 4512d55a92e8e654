"""`keel --help`, a subcommand's `--help` and a mistyped command answer without loading keel's
stack: the arguments are parsed with argparse and keel's light modules, and a subcommand's
machinery (LangGraph, LangChain, Chroma, the database drivers) loads only when it runs.

Pinned structurally, not by a clock: the console script runs as a user runs it, under
`python -X importtime`, and the modules it imported are read from that list
(`bench/cli_startup.py` has the times).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("langgraph", "langchain_core", "langchain", "chromadb", "onnxruntime", "psycopg")
"""Packages a `keel --help` must not load (each took 0.3-2 s to import)."""


def _keel(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run the `keel` console script; its result and the top-level packages it imported."""
    keel = Path(sys.executable).with_name("keel")
    env = {**os.environ, "LANGSMITH_TRACING": "false"}
    done = subprocess.run(
        [sys.executable, "-X", "importtime", str(keel), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    imported = {
        line.rpartition("|")[2].strip().split(".")[0]
        for line in done.stderr.splitlines()
        if line.startswith("import time:")
    }
    return done, imported


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["demo", "--help"],
        ["run", "--help"],
        ["threads", "prune", "--help"],
        ["db", "--help"],
        ["audit", "--help"],
        ["report", "--help"],
        ["health", "--help"],
        ["models", "install", "--help"],
        ["serve", "--help"],
        ["eval", "--help"],
    ],
    ids=" ".join,
)
def test_help_loads_no_heavy_package(args: list[str], tmp_path: Path) -> None:
    done, imported = _keel(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: keel")
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["audti"], "invalid choice: 'audti'"),
        (["threads", "--limit", "0"], "'0' is not a whole number from 1"),
        (["run", "--approve", "--reject"], "not allowed with argument"),
        (["eval", "--repeat", "0", "demo"], "'0' is not a whole number from 1"),
    ],
    ids=["typo", "bad-count", "exclusive-options", "eval-bad-count"],
)
def test_a_usage_error_loads_no_heavy_package(args: list[str], said: str, tmp_path: Path) -> None:
    done, imported = _keel(*args, cwd=tmp_path)
    assert done.returncode == 2
    assert said in done.stderr
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


def test_a_command_that_runs_loads_its_machinery(tmp_path: Path) -> None:
    # the check above sees an import: `keel threads` on a missing database loads the
    # checkpointers (LangGraph, psycopg) before it says there is no database
    done, imported = _keel("threads", "--db", f"sqlite:///{tmp_path}/none.db", cwd=tmp_path)
    assert done.returncode == 2
    assert "No keel database at" in done.stderr
    assert {"langgraph", "psycopg"} <= imported
