"""Every hand-written file keel reads, given each careless-user mistake, is one keel error.

keel reads five kinds of file a person writes: policies (`Policy.from_file`), SLO files
(`keel report --slo`), eval suites (`keel eval SUITE`), the server config (`KEEL_SERVER_CONFIG`,
`keel serve --server-config`) and the langgraph.json of `keel serve --config`. All go through
`keel._data_files.read_text` / `parse_text`; this file tries each bad file against each entry
point a user calls. Found: a server config nested too deeply was a bare RecursionError
traceback, and a langgraph.json too; a path too long for the OS (text pasted for a path) was an
OSError traceback from every reader; a suite the OS would not read was a PermissionError; a
langgraph.json naming a key twice was taken with its last value; a KEEL_SERVER_CONFIG naming a
directory said it did not exist.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_cli import SMALL_SERVER

from keel.app.cli import main
from keel.app.server_config import CONFIG_ENV, server_config
from keel.errors import KeelError, SetupError, UserError
from keel.guards import Policy

DEEP = "[" * 100_000 + "]" * 100_000


@dataclass(frozen=True)
class Reader:
    """One entry point: its file's name, how it writes nesting and a key twice, how it fails."""

    name: str
    file: str
    deep: str
    twice: str
    read: Callable[[Path, Path, pytest.CaptureFixture[str]], str]
    """Reads the file (given the test's folder), returns the error's one line."""


def _raises(kind: type[KeelError], call: Callable[[], object]) -> str:
    with pytest.raises(kind) as info:
        call()
    assert type(info.value) is kind
    return str(info.value)


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("keel") and "Traceback" not in err, err  # YAML's say where: 2 lines
    return err


def _policy(path: Path, _: Path, __: pytest.CaptureFixture[str]) -> str:
    return _raises(UserError, lambda: Policy.from_file(path))


def _server_config_env(path: Path, _: Path, __: pytest.CaptureFixture[str]) -> str:
    os.environ[CONFIG_ENV] = str(path)  # restored by the test's monkeypatch
    return _raises(SetupError, server_config)


def _serve_server_config(path: Path, _: Path, capsys: pytest.CaptureFixture[str]) -> str:
    # `--port 0` is refused only after the config is read: no server starts either way
    return _cli(["serve", "--server-config", str(path), "--port", "0"], capsys)


def _serve_config(path: Path, folder: Path, capsys: pytest.CaptureFixture[str]) -> str:
    server = folder / "good-server.toml"
    server.write_text(SMALL_SERVER, encoding="utf-8")
    # `--aegra-config` reads --config as serving does, and never execs a server
    argv = ["serve", "--server-config", str(server), "--config", str(path)]
    return _cli([*argv, "--aegra-config", str(folder / "deploy")], capsys)


def _eval(path: Path, _: Path, capsys: pytest.CaptureFixture[str]) -> str:
    return _cli(["eval", str(path)], capsys)


def _report_slo(path: Path, folder: Path, capsys: pytest.CaptureFixture[str]) -> str:
    db = folder / "keel.db"
    db.touch()
    return _cli(["report", "--db", f"sqlite:///{db}", "--slo", str(path)], capsys)


READERS = [
    Reader("policy", "policy.toml", f"x = {DEEP}\n", "name = 'a'\nname = 'b'\n", _policy),
    Reader("KEEL_SERVER_CONFIG", "s.toml", f"a = {DEEP}\n", "a = 1\na = 2\n", _server_config_env),
    Reader(
        "serve --server-config", "s.toml", f"a = {DEEP}\n", "a = 1\na = 2\n", _serve_server_config
    ),
    Reader("serve --config", "langgraph.json", DEEP, '{"graphs": {}, "graphs": {}}', _serve_config),
    Reader("eval", "suite.yaml", f"cases: {DEEP}\n", "name: a\nname: b\ncases: []\n", _eval),
    Reader("report --slo", "slo.yaml", f"slo: {DEEP}\n", "slo: {}\nslo: {}\n", _report_slo),
]


def _directory(folder: Path, reader: Reader) -> Path:
    path = folder / reader.file
    path.mkdir()
    return path


def _missing(folder: Path, reader: Reader) -> Path:
    return folder / reader.file


def _not_utf8(folder: Path, reader: Reader) -> Path:
    path = folder / reader.file
    path.write_bytes(b"\xff\xfe garbage")
    return path


def _name_too_long(folder: Path, reader: Reader) -> Path:
    return folder / ("x" * 300 + reader.file)  # past NAME_MAX: the OS refuses it, root too


def _unreadable(folder: Path, reader: Reader) -> Path:
    path = folder / reader.file
    path.write_text(reader.twice, encoding="utf-8")
    path.chmod(0)
    if os.access(path, os.R_OK):
        pytest.skip(
            "this user reads a chmod 000 file (root): 'name too long' covers the OS refusal"
        )
    return path


def _a_pipe(folder: Path, reader: Reader) -> Path:
    path = folder / reader.file
    os.mkfifo(path)  # with no writer, reading it would block for ever
    return path


def _too_deep(folder: Path, reader: Reader) -> Path:
    path = folder / reader.file
    path.write_text(reader.deep, encoding="utf-8")
    return path


def _key_twice(folder: Path, reader: Reader) -> Path:
    path = folder / reader.file
    path.write_text(reader.twice, encoding="utf-8")
    return path


BAD_FILES: list[tuple[Callable[[Path, Reader], Path], str]] = [
    (_directory, "is a directory"),
    (_missing, "does not exist."),
    (_not_utf8, "is not UTF-8 text (invalid start byte at byte 0): save it as UTF-8."),
    (_name_too_long, "cannot be read (File name too long): check the path."),
    (_unreadable, "cannot be read (Permission denied): check its permissions."),
    (_a_pipe, "is not a regular file: save it to a file and pass that."),
    (_too_deep, "nests lists or mappings too deeply to read"),
    (_key_twice, "given twice"),
]


@pytest.mark.parametrize(("bad", "says"), BAD_FILES, ids=[b.__name__[1:] for b, _ in BAD_FILES])
@pytest.mark.parametrize("reader", READERS, ids=[r.name for r in READERS])
def test_each_bad_file_is_one_keel_error_naming_it_from_each_reader(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    reader: Reader,
    bad: Callable[[Path, Reader], Path],
    says: str,
) -> None:
    monkeypatch.setenv(CONFIG_ENV, "")  # `_server_config_env` sets it; restored after
    path = bad(tmp_path, reader)
    message = reader.read(path, tmp_path, capsys)
    assert says in message, message
    assert repr(str(path)) in message, message


def test_a_path_under_home_written_with_a_tilde_is_read_from_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python callers get no shell to expand `~` (nor does a quoted `KEEL_SERVER_CONFIG`):
    `Policy.from_file("~/p.toml")` looked for a folder named `~` in the working folder."""
    from keel.app.report import load_objectives
    from keel.app.server_config import ServerConfig
    from keel.evals import load_suite

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    (home / "p.toml").write_text('name = "mine"\n', encoding="utf-8")
    (home / "suite.yaml").write_text(
        "name: s\ncases:\n  - id: c1\n    input: hi\n    expect: {status: success}\n",
        encoding="utf-8",
    )
    (home / "server.toml").write_text(SMALL_SERVER, encoding="utf-8")
    (home / "slo.toml").write_text("[slo]\nlatency_p95 = { max = 2.0 }\n", encoding="utf-8")
    assert Policy.from_file("~/p.toml").name == "mine"
    assert [o.metric for o in load_objectives("~/slo.toml")] == ["latency_p95"]
    # `--slo=~/...` is one word the shell leaves alone; the report's HTML goes under home too
    assert main(["db", "setup"]) == 0
    assert main(["report", "--slo=~/slo.toml", "--html=~/report.html"]) == 0  # no runs, no breach
    assert "latency" in (home / "report.html").read_text(encoding="utf-8")
    assert load_suite("~/suite.yaml").name == "s"
    assert ServerConfig.from_file("~/server.toml").users[0].user_id == "alice"
    monkeypatch.setenv(CONFIG_ENV, "~/server.toml")
    assert server_config().users[0].user_id == "alice"
    assert not (tmp_path / "~").exists()
