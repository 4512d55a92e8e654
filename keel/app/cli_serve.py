"""`keel serve`: `langgraph dev` with keel's config, or the Aegra config for replicas.

Loaded by `keel.app.cli` only when it runs (writing the Aegra config loads keel's server).
"""

from __future__ import annotations

import argparse
import os

from keel.app.aegra import write_aegra_config
from keel.app.serve import serve_command, serve_env
from keel.app.server_config import ServerConfig
from keel.errors import KeelError

__all__ = ["run"]


def run(args: argparse.Namespace) -> int:
    """Run `keel serve`: write the Aegra config, or become the server (`os.execve`)."""
    if not args.server_config:
        raise KeelError("keel serve needs --server-config FILE (or KEEL_SERVER_CONFIG).")
    if args.aegra_config:
        path = write_aegra_config(args.aegra_config, args.server_config, args.config)
        print(f"keel: wrote {path} (start replicas with AEGRA_CONFIG={path.resolve()})")
        return 0
    env = serve_env(args.server_config)
    ServerConfig.from_file(args.server_config)  # a config the server cannot load fails here
    cmd = serve_command(port=args.port, host=args.host, config=args.config, reload=args.reload)
    print(f"keel: serving on http://{args.host}:{args.port} ({' '.join(cmd[1:])})", flush=True)
    os.execve(cmd[0], cmd, env)  # the server replaces this process: signals reach it directly
