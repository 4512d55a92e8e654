"""The `keel` command's entry point: Ctrl-C while keel is still loading ends in one line.

A KeyboardInterrupt raised while a module loads would print a traceback of whichever module
was loading. This module imports nothing of keel's until `main` runs, so it can catch one while
`keel.app.cli` loads; `keel.app.cli` catches one while a subcommand's machinery (LangChain,
LangGraph, the database drivers: a second or more) loads, after the arguments are parsed.
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def main() -> int:
    """Load `keel.app.cli` and run it; Ctrl-C while loading exits 130 with one line."""
    try:
        from keel.app.cli import main as keel_main
    except KeyboardInterrupt:
        print("\nkeel: interrupted while starting; nothing ran.", file=sys.stderr)
        return 130
    return keel_main()


if __name__ == "__main__":
    raise SystemExit(main())
