"""The `keel` command: the demo without a terminal, threads, resume, and clear errors."""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from keel.app.cli import main
from keel.errors import UserError

Keel = Callable[..., subprocess.CompletedProcess[str]]
"""conftest's `keel_command`: `keel args` as a user runs it, in a process of its own."""


def test_demo_without_a_terminal_approves_from_the_scenario(
    tmp_path: Path, keel_command: Keel
) -> None:
    done = keel_command("demo", "--thread", "d1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "scripted model" in out  # says, in one line, that it runs offline
    assert "[plan]" in out
    assert "[approval needed] issue_refund" in out
    assert "scenario's answer is used: approve" in out
    assert "← issue_refund [success]: Refunded $42.50 on order A1001" in out
    assert "[outcome] success / completed" in out
    assert (tmp_path / ".keel" / "keel.db").exists()  # the embedded default
    assert "[reflect] stored a lesson of this run in long-term memory" in out
    assert (tmp_path / ".keel" / "chroma").is_dir()  # embedded Chroma beside it

    listed = keel_command("threads", cwd=tmp_path)
    assert listed.returncode == 0
    assert "d1" in listed.stdout and "completed" in listed.stdout

    again = keel_command("demo", "--thread", "d1-again", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "[recall] 1 memory of this user put into the context" in again.stdout  # the lesson


def test_demo_reject_flag_stops_with_rejected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = f"sqlite:///{tmp_path}/k.db"
    assert main(["demo", "--reject", "--db", db, "--thread", "d2"]) == 1
    out = capsys.readouterr().out
    assert "rejected (--reject)" in out
    assert "[outcome] stopped / rejected" in out
    assert "Refunded" not in out
    from chromadb.api.shared_system_client import SharedSystemClient

    assert (tmp_path / "chroma").is_dir()  # the demo's memory, closed as the command ended
    assert str(tmp_path / "chroma") not in SharedSystemClient._identifier_to_system


def test_a_blank_keel_model_is_no_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`KEEL_MODEL= keel demo` plays the scripted scenario; it was `model must be ..., got ' '`."""
    monkeypatch.setenv("KEEL_MODEL", "  ")
    assert main(["demo", "--wait", "--db", f"sqlite:///{tmp_path}/k.db"]) == 0
    assert "no KEEL_MODEL set, so the demo plays a bundled scenario" in capsys.readouterr().out
    assert main(["run", "hi", "--db", f"sqlite:///{tmp_path}/k.db"]) == 2
    assert "keel run needs a model: pass --model" in capsys.readouterr().err


def test_run_needs_a_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    os.environ.pop("KEEL_MODEL", None)
    assert main(["run", "hello", "--db", f"sqlite:///{tmp_path}/k.db"]) == 2
    err = capsys.readouterr().err
    assert "keel run needs a model" in err and "keel demo" in err


def test_run_on_a_model_keel_cannot_price_needs_a_price(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The demo's policy holds each run to $0.50: an unpriced model would count as $0."""
    db = f"sqlite:///{tmp_path}/k.db"
    house = ["run", "hi", "--model", "serve.house_model:model", "--db", db, "--approve"]
    assert main(house) == 2
    err = capsys.readouterr().err
    assert "no price for model 'house-model'" in err and "--price house-model=" in err
    assert main([*house, "--price", "house-model=1,2"]) == 0
    assert "[outcome] success / completed" in capsys.readouterr().out
    assert main([*house, "--price", "house-model=nan,2"]) == 2
    assert "--price 'house-model=nan,2': give MODEL=INPUT,OUTPUT" in capsys.readouterr().err


def test_bad_db_url_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["threads", "--db", "mysql://nope"]) == 2
    assert "mysql://nope" in capsys.readouterr().err


def test_resume_of_a_thread_that_waits_for_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = f"sqlite:///{tmp_path}/k.db"
    assert main(["demo", "--approve", "--db", db, "--thread", "d3"]) == 0
    capsys.readouterr()
    os.environ["KEEL_MODEL"] = "not-a-provider-string"
    try:
        code = main(["run", "--thread", "d3", "--db", db])
    finally:
        os.environ.pop("KEEL_MODEL", None)
    assert code == 2
    assert "not-a-provider-string" in capsys.readouterr().err


def test_serve_without_a_server_config_says_what_to_pass(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("KEEL_SERVER_CONFIG", raising=False)
    assert main(["serve", "--port", "8765"]) == 2
    assert (
        "keel serve needs --server-config FILE (or KEEL_SERVER_CONFIG)." in capsys.readouterr().err
    )
    missing = str(tmp_path / "nope.toml")
    assert main(["serve", "--server-config", missing]) == 2
    assert f"Server config {missing!r} does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command",
    [["audit"], ["report"], ["threads"], ["threads", "prune", "--keep", "1"]],
    ids=["audit", "report", "threads", "prune"],
)
def test_reading_a_database_that_is_not_there_says_so_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    """A mistyped --db is an error naming the path, not an empty database and "no records"."""
    missing = tmp_path / "typo" / "keel.db"
    assert main([*command, "--db", f"sqlite:///{missing}"]) == 2
    err = capsys.readouterr().err
    assert f"No keel database at {missing}: check --db" in err
    assert not missing.parent.exists()
    too_long = tmp_path / ("x" * 300) / "keel.db"
    assert main([*command, "--db", f"sqlite:///{too_long}"]) == 2
    assert f"No keel database at {too_long}: check --db" in capsys.readouterr().err
    assert main([*command, "--db", "sqlite:///:memory:"]) == 2  # empty each time: never
    assert "sqlite:///:memory: is a new, empty database each time" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command", [["audit"], ["report"], ["threads"]], ids=["audit", "report", "threads"]
)
def test_a_postgres_database_that_is_not_there_is_an_error_at_once(
    postgres_url: str, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    """Not after the ledger's pool has retried for 10 seconds."""
    typo = postgres_url.rsplit("/", 1)[0] + "/keel_no_such_db"
    start = time.monotonic()
    assert main([*command, "--db", typo]) == 2
    assert time.monotonic() - start < 5
    err = capsys.readouterr().err
    assert f"keel: cannot reach PostgreSQL at {typo}: " in err
    assert 'database "keel_no_such_db" does not exist. Create the database' in err


@pytest.mark.parametrize(
    "command", [["audit"], ["report"], ["threads"]], ids=["audit", "report", "threads"]
)
def test_no_postgres_server_is_an_error_at_once_without_the_password(
    capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    nothing = "postgresql://postgres:hunter2@127.0.0.1:1/test"  # no server on port 1
    assert main([*command, "--db", nothing]) == 2
    err = capsys.readouterr().err
    assert err.startswith("keel: cannot reach PostgreSQL at postgresql://postgres:***@127.0.0.1:1/")
    assert err.endswith("Is the server running? Check the URL / KEEL_DB_URL.\n")
    assert "hunter2" not in err


def test_an_slo_path_that_is_a_directory_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "keel.db"
    db.touch()
    assert main(["report", "--db", f"sqlite:///{db}", "--slo", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"keel: SLO file {str(tmp_path)!r} is a directory: pass the file itself.\n"
    )


@pytest.mark.parametrize("where", ["missing-dir/report.html", "."], ids=["no-dir", "a-dir"])
def test_an_html_report_that_cannot_be_written_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    db = f"sqlite:///{tmp_path}/k.db"
    assert main(["db", "setup", "--db", db]) == 0
    target = tmp_path / where
    assert main(["report", "--db", db, "--html", str(target)]) == 2
    assert f"keel: Cannot write --html {target}: " in capsys.readouterr().err


@pytest.mark.parametrize("task", ["", "   ", "\n\t"], ids=["empty", "spaces", "blank-lines"])
def test_a_blank_task_is_no_task(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], task: str
) -> None:
    db = f"sqlite:///{tmp_path}/k.db"
    assert main(["run", task, "--model", "keel:demo", "--db", db]) == 2
    assert 'Give a task (keel run "…") or a thread' in capsys.readouterr().err
    assert main(["threads", "--db", db]) == 2  # nothing ran: no database was even made


@pytest.mark.parametrize(
    ("command", "option"),
    [
        (["threads", "--limit", "99999999999999999999"], "--limit"),
        (["threads", "--limit", "0"], "--limit"),
        (["audit", "--limit", "-1"], "--limit"),
        (["audit", "--limit", "10000000000"], "--limit"),
        (["threads", "prune", "--keep", "0"], "--keep"),
        (["threads", "prune", "--idle-days", "nan"], "--idle-days"),
        (["threads", "prune", "--idle-days", "inf"], "--idle-days"),
        (["threads", "prune", "--idle-days", "1e30"], "--idle-days"),
    ],
    ids=[
        "huge-limit",
        "zero-limit",
        "negative-limit",
        "audit-huge",
        "keep-0",
        "nan",
        "inf",
        "1e30",
    ],
)
def test_a_count_or_days_out_of_range_is_a_usage_error_with_the_range(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str], option: str
) -> None:
    """argparse's exit 2 and usage line, naming the range, before any database is read."""
    db = f"sqlite:///{tmp_path}/k.db"
    assert main(["db", "setup", "--db", db]) == 0
    with pytest.raises(SystemExit) as exited:
        main([*command, "--db", db])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: " in err
    assert "from 1 to 1,000,000,000" in err or "above 0 and at most 36500" in err


@pytest.mark.parametrize(
    ("command", "named"),
    [
        (["audit", "--thread", "\udcff"], "--thread '\\udcff'"),
        (["audit", "--user", "a\udcffb"], "--user 'a\\udcffb'"),
        (["report", "--tenant", "t\x00"], "--tenant 't\\x00'"),
        (["run", "--thread", "\udcff"], "--thread '\\udcff'"),
        (["run", "refund \udce9", "--model", "keel:demo"], "the task 'refund \\udce9'"),
        (["run", "hi", "--model", "keel:demo\udcff"], "--model 'keel:demo\\udcff'"),
        (["run", "hi", "--agent", "m\x00:g"], "--agent 'm\\x00:g'"),
        (["run", "hi", "--model", "m", "--price", "m\udcff=1,2"], "--price 'm\\udcff=1,2'"),
        (["demo", "--user", "\udcffbob"], "--user '\\udcffbob'"),
        (["demo", "--tenant", "acme\x00"], "--tenant 'acme\\x00'"),
    ],
    ids=[
        "audit-thread",
        "audit-user",
        "report-nul",
        "run-thread",
        "run-task",
        "run-model",
        "run-agent-nul",
        "run-price",
        "demo-user",
        "demo-tenant-nul",
    ],
)
def test_text_keel_cannot_store_is_refused_naming_the_argument(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str], named: str
) -> None:
    """A lone surrogate (a non-UTF-8 terminal's bytes) or a NUL: exit 2, nothing run."""
    db = f"sqlite:///{tmp_path}/k.db"
    assert main(["db", "setup", "--db", db]) == 0
    capsys.readouterr()
    assert main([*command, "--db", db]) == 2
    out = capsys.readouterr()
    assert f"keel: {named} holds a lone surrogate" in out.err
    assert "pass it as UTF-8 text" in out.err
    assert out.out == ""


@pytest.mark.parametrize(
    "argv",
    [["demo", "--user", ""], ["run", "hi", "--model", "keel:demo", "--tenant", "  "]],
    ids=["demo-user", "run-tenant"],
)
def test_an_empty_user_or_tenant_is_refused_naming_the_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    """It said `RunContext.user_id must be a non-empty string … RunContext(user_id='acme')`."""
    assert main([*argv, "--db", f"sqlite:///{tmp_path}/k.db"]) == 2
    option = argv[-2]
    assert capsys.readouterr().err == (
        f"keel: {option} is empty: give the {option[2:]} id the run is for, or leave {option} "
        "out for the default.\n"
    )
    assert not (tmp_path / "k.db").exists()  # before anything ran


def test_a_database_that_cannot_be_opened_ends_in_one_line_not_a_traceback(
    tmp_path: Path, keel_command: Keel
) -> None:
    """A process of its own: aiosqlite's thread used to report to the closed event loop at
    exit."""
    done = keel_command("demo", "--db", f"sqlite:///{tmp_path}", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith(f"keel: cannot open the SQLite database at sqlite:///{tmp_path}")
    assert "Traceback" not in done.stderr


def test_a_chroma_folder_that_cannot_be_opened_ends_in_one_line_not_a_traceback(
    tmp_path: Path, keel_command: Keel
) -> None:
    """The demo's memory beside its database: a file where its folder should be, exit 2."""
    (tmp_path / ".keel").mkdir()
    (tmp_path / ".keel" / "chroma").write_text("not a folder")
    done = keel_command("demo", "--thread", "c1", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        f"keel: Cannot open the Chroma store at {tmp_path / '.keel' / 'chroma'} (FileExistsError: "
        f"[Errno 17] File exists: '{tmp_path / '.keel' / 'chroma'}'): it must be a folder keel "
        "can write, empty or holding a Chroma database. Check the folder and its permissions, "
        "or give another one.\n"
    )
    assert "[outcome]" not in done.stdout  # nothing ran


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"[[[ nope", "is not valid TOML: "),
        (b"\xff\xfe garbage", "is not UTF-8 text (invalid start byte at byte 0): save it as UTF-8"),
        (b"", "it needs at least one [tenants.<id>] table"),
        (None, "is a directory: pass the file itself."),
    ],
    ids=["syntax", "not-utf8", "empty", "a-directory"],
)
def test_serve_checks_the_server_config_before_starting_the_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | None, says: str
) -> None:
    """Not a server that starts and then dies in tracebacks. (`--port 0` is refused after
    the config is read: were the config not checked, the test still would not exec a server.)"""
    config = tmp_path / "server.toml"
    if content is None:
        config.mkdir()
    else:
        config.write_bytes(content)
    assert main(["serve", "--server-config", str(config), "--port", "0"]) == 2
    assert says in capsys.readouterr().err


SMALL_SERVER = """
[[users]]
token = "t"
user = "alice"
tenant = "acme"

[tenants.acme.agents.main]
model = "keel:demo"
"""


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "is a directory: pass the file itself."),
        (b"\xff\xfe{}", "is not UTF-8 text (invalid start byte at byte 0): save it as UTF-8."),
        (b"{graphs", "is not valid JSON: Expecting property name"),
        (b"[]", "is not a JSON object"),
    ],
    ids=["a-directory", "not-utf8", "syntax", "a-list"],
)
def test_serve_checks_its_langgraph_json_before_the_server_or_aegra_reads_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | None, says: str
) -> None:
    """Found by attack: `--config` naming a directory said it did not exist, and a langgraph.json
    that is not UTF-8 was a traceback from `--aegra-config`; for serving, keel started
    `langgraph dev` on any file, which died on it in a traceback. (`serve_command` is called
    directly: `main` would exec a server were the file not checked.)"""
    from keel.app.serve import serve_command

    spec = tmp_path / "langgraph.json"
    if content is None:
        spec.mkdir()
    else:
        spec.write_bytes(content)
    with pytest.raises(UserError, match=re.escape(f"langgraph config {str(spec)!r} {says}")):
        serve_command(port=8123, config=spec)
    server = tmp_path / "server.toml"
    server.write_text(SMALL_SERVER, encoding="utf-8")
    argv = ["serve", "--server-config", str(server), "--config", str(spec)]
    assert main([*argv, "--aegra-config", str(tmp_path / "deploy")]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("where", ["a-file", "a-file/deploy"])
def test_an_aegra_config_folder_keel_cannot_make_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    """Found by attack: `--aegra-config` naming a file (or a folder under one) was a traceback."""
    server = tmp_path / "server.toml"
    server.write_text(SMALL_SERVER, encoding="utf-8")
    (tmp_path / "a-file").write_text("")
    out = tmp_path / where
    assert main(["serve", "--server-config", str(server), "--aegra-config", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"keel: cannot make the Aegra config folder {str(out)!r}: ")
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    "command",
    [["threads"], ["threads", "prune", "--keep", "1"], ["run", "--thread", "t1", "--approve"]],
    ids=["threads", "prune", "resume"],
)
def test_a_file_that_is_not_a_database_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    """Found by attack: `file is not a database` is SQLite's DatabaseError, not the
    OperationalError keel turned into a line: these died in a traceback (`audit` and
    `report` did not)."""
    garbage = tmp_path / "keel.db"
    garbage.write_text("not a database\n")
    assert main([*command, "--db", f"sqlite:///{garbage}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("keel: cannot ") and "file is not a database" in err
    assert err.count("\n") == 1


def test_serve_refuses_a_port_in_use_or_a_host_it_cannot_listen_on() -> None:
    """Found by attack: `langgraph dev` serves on another port when `--port` is in use (a
    client sent to `--port` reached whatever held it), and an unknown `--host` was a
    traceback. (`serve_command` is called directly: `main` would exec a server.)"""
    import socket

    from keel.app.serve import serve_command

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"cannot serve on 127.0.0.1:{port}: "):
            serve_command(port=port)
    with pytest.raises(
        UserError, match=re.escape("--host 'no-such-host.invalid' names no address")
    ):
        serve_command(port=port, host="no-such-host.invalid")
