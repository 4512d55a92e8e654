"""Reading a user's YAML, JSON and TOML files strictly: one loader for every kind of file.

keel's policy files (`Policy.from_file`), SLO files (`keel report --slo`) and eval suites
(`keel.evals.load_suite`) are written by hand. Two mistakes the parsers let through here:

- a key given twice in one mapping: PyYAML and `json` keep the last silently (a case's second
  `expect:` dropped its first, a policy's second `budget:` its first); TOML refuses it itself
  (`tomllib.TOMLDecodeError`, "Cannot overwrite a value");
- brackets nested thousands deep (a paste gone wrong): PyYAML, `json` and `tomllib` recurse per
  level and raise a bare `RecursionError`.

Both are a `keel.errors.UserError` naming the file (and, for a key given twice, the key and line).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import yaml

from keel.errors import UserError

__all__ = ["JSON_ERRORS", "UniqueKeyLoader", "load_data_file", "too_deep", "unique_pairs"]


class UniqueKeyLoader(yaml.SafeLoader):
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


def unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a key given twice (`json` keeps the last silently)."""
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise _GivenTwice(f"{key!r} is given twice in one object: keep one")
        data[key] = value
    return data


JSON_ERRORS: tuple[type[ValueError], ...] = (json.JSONDecodeError, _GivenTwice)
"""What `json.loads(text, object_pairs_hook=unique_pairs)` raises on a file that is not JSON."""


def too_deep(where: str, exc: RecursionError, needs: str = "") -> UserError:
    """The `UserError` for a file nested past the parser's recursion (`where` names the file)."""
    return UserError(
        f"{where} nests lists or mappings too deeply to read ({exc}); {needs}check its brackets."
    )


def load_data_file(path: Path, what: str) -> Any:
    """Parse a `.toml`, `.yaml` or `.yml` file; errors name it as `what` (`"Policy file"`)."""
    if path.is_dir():
        raise UserError(f"{what} {str(path)!r} is a directory: pass the file itself.")
    if not path.is_file():
        raise UserError(f"{what} {str(path)!r} does not exist.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{what} {str(path)!r} is not UTF-8 text: {exc.reason} at byte {exc.start}."
        ) from None
    except OSError as exc:
        raise UserError(f"{what} {str(path)!r} cannot be read: {exc.strerror}.") from None
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise UserError(
            f"{what} {str(path)!r}: use a .toml, .yaml or .yml file, not {path.suffix!r}."
        )
    try:
        if path.suffix == ".toml":
            return tomllib.loads(text)
        return yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader
    except tomllib.TOMLDecodeError as exc:
        twice = "; a key or table is given twice: keep one" if _redeclared(exc) else ""
        raise UserError(f"{what} {str(path)!r} is not valid TOML: {exc}{twice}.") from exc
    except yaml.YAMLError as exc:
        raise UserError(f"{what} {str(path)!r} is not valid YAML: {exc}.") from exc
    except RecursionError as exc:  # the parsers recurse per level of nesting
        raise too_deep(f"{what} {str(path)!r}", exc) from exc


def _redeclared(exc: tomllib.TOMLDecodeError) -> bool:
    """Whether `tomllib` refused a key or table given twice (its words for it, Python 3.11+)."""
    return str(exc).startswith(("Cannot overwrite a value", "Cannot declare"))
