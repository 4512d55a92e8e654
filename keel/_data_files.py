"""Reading a user's YAML, JSON and TOML files strictly: one reader for every kind of file.

keel's policy files (`Policy.from_file`), SLO files (`keel report --slo`), eval suites
(`keel.evals.load_suite`), server configs (`ServerConfig.from_file`) and the langgraph.json of
`keel serve --config` are written by hand. `read_text` reads one (a directory, a missing file,
bytes that are not UTF-8, a file the OS will not read: each is an error naming it and the fix),
`parse_text` parses it, refusing two mistakes the parsers let through:

- a key given twice in one mapping: PyYAML and `json` keep the last silently (a case's second
  `expect:` dropped its first, a policy's second `budget:` its first); TOML refuses it itself
  (`tomllib.TOMLDecodeError`, "Cannot overwrite a value");
- brackets nested thousands deep (a paste gone wrong): PyYAML, `json` and `tomllib` recurse per
  level and raise a bare `RecursionError`.

Each is a `keel.errors.UserError` naming the file (and, for a key given twice, the key and
line), or the caller's error class (`SetupError` for the server's config).
"""

from __future__ import annotations

import json
import stat
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml

from keel.errors import KeelError, UserError

__all__ = ["Format", "load_data_file", "parse_text", "read_text"]


class _UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.SafeLoader`, refusing a key given twice in one mapping (naming it and its line).

    PyYAML keeps the last silently: a case's second `expect:` would drop its first.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *case`: the keys after it override the merged ones, as YAML says
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str):
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"{key!r} is given twice in one mapping: keep one",
                        key_node.start_mark,
                    )  # fmt: skip
                seen.add(key)
        return super().construct_mapping(node, deep)


class _GivenTwice(ValueError):
    """A JSON object names a key twice."""


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a key given twice (`json` keeps the last silently)."""
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise _GivenTwice(f"{key!r} is given twice in one object: keep one")
        data[key] = value
    return data


_JSON_ERRORS: tuple[type[ValueError], ...] = (json.JSONDecodeError, _GivenTwice)
"""What `json.loads(text, object_pairs_hook=_unique_pairs)` raises on a file that is not JSON."""


def read_text(
    path: Path, what: str, *, error: type[KeelError] = UserError, missing: str = ""
) -> str:
    """A hand-written file's text, or `error` naming it as `what` and saying why not.

    A directory, a file that is not there, a pipe or device, bytes that are not UTF-8, a file
    the OS will not read (no permission; a name too long: text pasted for a path) each say so;
    `missing` is the fix appended when the file is not there ("Set KEEL_SERVER_CONFIG ...").
    """
    where = f"{what} {str(path)!r}"
    try:
        mode = path.stat().st_mode  # not `is_file`: it hides why (and raises on 3.11 for some)
    except (FileNotFoundError, NotADirectoryError):
        raise error(f"{where} does not exist." + (f" {missing}" if missing else "")) from None
    except OSError as exc:
        raise error(f"{where} cannot be read ({exc.strerror or exc}): check the path.") from None
    if stat.S_ISDIR(mode):
        raise error(f"{where} is a directory: pass the file itself.")
    if not stat.S_ISREG(mode):  # a FIFO would block the reader, a device has no end
        raise error(f"{where} is not a regular file: save it to a file and pass that.")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise error(
            f"{where} is not UTF-8 text ({exc.reason} at byte {exc.start}): save it as UTF-8."
        ) from None
    except OSError as exc:
        raise error(
            f"{where} cannot be read ({exc.strerror or exc}): check its permissions."
        ) from None


Format = Literal["toml", "yaml", "json"]


def parse_text(
    text: str,
    kind: Format,
    where: str,
    *,
    error: type[KeelError] = UserError,
    needs: str = "",
) -> Any:
    """`text` parsed as `kind`, a key given twice refused; `error` names the file as `where`.

    `needs` goes before "check its brackets" when the text nests too deeply to parse.
    """
    try:
        if kind == "toml":
            return tomllib.loads(text)
        if kind == "json":
            return json.loads(text, object_pairs_hook=_unique_pairs)
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader
    except tomllib.TOMLDecodeError as exc:
        twice = "; a key or table is given twice: keep one" if _redeclared(exc) else ""
        raise error(f"{where} is not valid TOML: {exc}{twice}.") from exc
    except _JSON_ERRORS as exc:
        raise error(f"{where} is not valid JSON: {exc}.") from exc
    except yaml.YAMLError as exc:
        raise error(f"{where} is not valid YAML: {_yaml_reason(exc)}.") from exc
    except RecursionError as exc:  # the parsers recurse per level of nesting
        raise error(
            f"{where} nests lists or mappings too deeply to read ({exc}); {needs}check its "
            "brackets."
        ) from exc


def load_data_file(path: Path, what: str) -> Any:
    """Parse a `.toml`, `.yaml` or `.yml` file; errors name it as `what` (`"Policy file"`)."""
    text = read_text(path, what)
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise UserError(
            f"{what} {str(path)!r}: use a .toml, .yaml or .yml file, not {path.suffix!r}."
        )
    return parse_text(text, "toml" if path.suffix == ".toml" else "yaml", f"{what} {str(path)!r}")


def _yaml_reason(exc: yaml.YAMLError) -> str:
    """PyYAML's reason on one line, with its line and column (counted from 1).

    PyYAML's own text spans lines (`in "<unicode string>", line 2, column 3:` and the line
    quoted under a caret), which a one-line error would cut after "here".
    """
    if not isinstance(exc, yaml.MarkedYAMLError):
        return " ".join(str(exc).split())

    def at(mark: Any) -> str:
        return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""

    problem = " ".join((exc.problem or "").split()) + at(exc.problem_mark)
    context = " ".join((exc.context or "").split())
    if context and exc.context_mark is not None and exc.context_mark != exc.problem_mark:
        context += at(exc.context_mark)
    return f"{problem} ({context})" if context and problem.strip() else (problem or context)


def _redeclared(exc: tomllib.TOMLDecodeError) -> bool:
    """Whether `tomllib` refused a key or table given twice (its words for it, Python 3.11+)."""
    return str(exc).startswith(("Cannot overwrite a value", "Cannot declare"))
