"""Argument checks shared by the `keel` commands: counts, days, text keel can store, folders.

A count or a number of days out of range is a usage error (argparse's: the usage line and exit
2), named with the range it must be in, not a traceback from the database it reaches. Text that
holds a lone surrogate (bytes that are not UTF-8, e.g. from a Latin-1 terminal) or a NUL
character is refused before anything runs: no database or model can store it.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable
from pathlib import Path

from keel.errors import UserError

__all__ = ["MAX_COUNT", "MAX_DAYS", "check_text", "count", "days", "folder", "refuse_empty"]

MAX_COUNT = 1_000_000_000
"""The largest `--limit` / `--keep`: far past any database, well inside SQLite's integers."""
MAX_DAYS = 36_500.0
"""The largest `--idle-days` (100 years)."""


def count(text: str) -> int:
    """For argparse `type=`: a whole number from 1 to `MAX_COUNT`."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_COUNT:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a whole number from 1 to {MAX_COUNT:,} (e.g. 20)"
        )
    return value


def days(text: str) -> float:
    """For argparse `type=`: a number of days above 0 and at most `MAX_DAYS`."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= MAX_DAYS:  # NaN fails both
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of days above 0 and at most {MAX_DAYS:g} (e.g. 30 or 0.5)"
        )
    return value


def check_text(
    args: argparse.Namespace, *, skip: Iterable[str] = (), positional: Iterable[str] = ("task",)
) -> None:
    """Refuse a text argument with a lone surrogate or a NUL character, naming it.

    `skip` names arguments that are paths (a file name may be any bytes); `positional`, those
    named without dashes ("the task").

    Raises:
        UserError: an argument holds text that cannot be stored, and how to pass it.
    """
    skipped, bare = set(skip), set(positional)
    for name, value in vars(args).items():
        if name in skipped:
            continue
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and _unstorable(item):
                option = f"the {name}" if name in bare else f"--{name.replace('_', '-')}"
                raise UserError(
                    f"{option} {item!r} holds a lone surrogate (bytes that are not UTF-8, e.g. "
                    "from a terminal set to another encoding) or a NUL character, which keel "
                    "cannot store: pass it as UTF-8 text."
                )


def refuse_empty(args: argparse.Namespace, *names: str, required: Iterable[str] = ()) -> None:
    """Refuse an option given as empty text (`--out ""`, an unset variable), naming it.

    It was taken for the option left out, and the command did something else than asked,
    without a word.

    Raises:
        UserError: naming the option, and to give it a value (or leave it out, if it may be).
    """
    must = set(required)
    for name in (*names, *must):
        value = getattr(args, name, None)
        if isinstance(value, str) and not value.strip():
            option = f"--{name.replace('_', '-')}"
            fix = "give it a value" + ("" if name in must else f", or leave {option} out")
            raise UserError(f"{option} is empty: {fix}.")


def _unstorable(text: str) -> bool:
    return "\x00" in text or any("\ud800" <= c <= "\udfff" for c in text)


def folder(path: Path, what: str, option: str) -> Path:
    """Make the folder `path` (`what` it is for, the `option` naming it), or say why it cannot be.

    Made before the command does its work, so that a file in its place or no permission is one
    line (a `UserError`), not a traceback once the work is done.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        why = "a file is in its place" if path.is_file() else exc.strerror or str(exc)
        raise UserError(
            f"cannot make the {what} {str(path)!r}: {why}. Pass {option} a folder keel can write."
        ) from None
    return path
