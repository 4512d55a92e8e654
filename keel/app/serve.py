"""`keel serve`: run keel's graphs under `langgraph dev` (in-memory LangGraph server), offline.

The command it runs is built by `serve_command` so that tests and notebooks start the server the
same way users do.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from keel._data_files import parse_text, read_text
from keel.app.server_config import CONFIG_ENV
from keel.errors import SetupError, UserError

__all__ = ["LANGGRAPH_JSON", "read_langgraph_json", "serve_command", "serve_env"]

LANGGRAPH_JSON = {
    "dependencies": ["."],
    "graphs": {"agent": "keel.app.server:agent", "supervisor": "keel.app.server:supervisor"},
    # without disable_studio_auth, `langgraph dev` lets any request with the header
    # `x-auth-scheme: langsmith` in as a Studio user, no token checked
    "auth": {"path": "keel.app.auth:auth", "disable_studio_auth": True},
    # liveness, readiness and the semantic check under /keel/health/ (keel.app.http)
    "http": {"app": "keel.app.http:app"},
    # a run's webhook (where the server POSTs its output): https only, and no private address
    # (LangGraph refuses loopback and link-local ones already), checked on every address its
    # name resolves to, at creation and at each call (keel.app.auth refuses addresses as sent)
    "webhooks": {"url": {"require_https": True, "disable_private_ips": True}},
}
"""What `keel serve` writes to `.keel/langgraph.json` when the directory has no langgraph.json."""

_OFFLINE = {
    "LANGGRAPH_CLI_NO_ANALYTICS": "1",
    "LANGGRAPH_NO_VERSION_CHECK": "true",
    "LANGSMITH_TRACING": "false",
}


def serve_env(server_config: str | Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The server's environment: `KEEL_SERVER_CONFIG`, no analytics, no version check.

    LangSmith tracing is off unless `base` (default: this process's environment) has
    `LANGSMITH_API_KEY` and `LANGSMITH_TRACING=true`.
    """
    env = dict(os.environ if base is None else base)
    tracing = env.get("LANGSMITH_TRACING", "").lower() == "true" and env.get("LANGSMITH_API_KEY")
    env.update(_OFFLINE)
    if tracing:
        env["LANGSMITH_TRACING"] = "true"
    path = Path(server_config).expanduser()
    fix = (
        "Pass --server-config FILE (tokens, tenants and their agents; see the README's Serving "
        "section)."
    )
    read_text(path, "Server config", missing=fix)  # only checked: the server reads it again
    env[CONFIG_ENV] = str(path.resolve())
    return env


def serve_command(
    *, port: int, host: str = "127.0.0.1", config: str | Path | None = None, reload: bool = False
) -> list[str]:
    """The `langgraph dev` command line for keel's graphs (never `--allow-blocking`)."""
    if not isinstance(port, int) or not 0 < port < 65536:
        raise UserError(f"--port must be a TCP port (1-65535), got {port!r}.")
    _check_listen(host, port)
    cli = shutil.which("langgraph") or str(Path(sys.executable).with_name("langgraph"))
    if not Path(cli).exists():
        raise SetupError(
            "`langgraph` (the LangGraph CLI) is not installed: pip install 'langgraph-cli[inmem]'."
        )
    cmd = [cli, "dev", "--port", str(port), "--host", host, "--no-browser"]
    cmd += ["--config", str(_langgraph_json(config))]
    if not reload:
        cmd.append("--no-reload")
    return cmd


def _check_listen(host: str, port: int) -> None:
    """Refuse a `--host` / `--port` the server could not listen on, before it starts.

    `langgraph dev` dies on an unknown host in a traceback, and on a port in use it serves on
    another one, so a client sent to `--port` would reach whatever server holds it.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise UserError(f"--host {host!r} names no address of this machine ({exc}).") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does
        try:
            probe.bind(address)
        except OSError as exc:
            raise UserError(
                f"cannot serve on {host}:{port}: {exc.strerror or exc} (another server on that "
                "port? pass --port a free one; --host an address of this machine)."
            ) from None


def read_langgraph_json(config: str | Path) -> dict[str, Any]:
    """A langgraph.json file's object, or a `UserError` saying why it cannot be one.

    Read before the server starts: `langgraph dev` would die on it in a traceback.
    """
    path = Path(config)
    text = read_text(path, "langgraph config")
    spec = parse_text(text, "json", f"langgraph config {str(path)!r}")  # a key twice refused
    if not isinstance(spec, dict):
        raise UserError(
            f'langgraph config {str(path)!r} is not a JSON object (with "graphs", "auth", '
            f"...): it holds a {type(spec).__name__}."
        )
    return spec


def _langgraph_json(config: str | Path | None) -> Path:
    if config is not None:
        read_langgraph_json(config)
        return Path(config)
    if Path("langgraph.json").is_file():
        return Path("langgraph.json")
    path = Path(".keel/langgraph.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = {**LANGGRAPH_JSON, "dependencies": ["langgraph-keel"]}  # keel, installed
    path.write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
    return path
