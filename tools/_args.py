"""Tool-call arguments checked against the tool's schema, before a call runs or an edit is taken."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sized
from typing import Any

from langchain_core.messages import AIMessage
from pydantic import BaseModel, ValidationError

from keel.approvals import approval_digest, canonical_args, plain_keys
from keel.errors import _one_line
from keel.redact import sanitized_logger
from keel.tools._injected import spoofed
from keel.tools.registry import RegisteredTool

__all__ = [
    "ToolLookup",
    "approval_digests",
    "as_called",
    "invalid_args",
    "json_args",
    "read_call",
    "validation_problem",
]

log = sanitized_logger("keel.tools.args")

ToolLookup = Callable[[str], RegisteredTool | None]
"""A graph's tool by name (`ToolRegistry.get`): how its calls' arguments are read."""


def invalid_args(entry: RegisteredTool, args: Any) -> str | None:
    """Why `args` do not fit the tool's schema (`None`: they do); checked before a call runs.

    Arguments that name a parameter the agent injects (`InjectedState`, `InjectedStore`,
    `ToolRuntime`, `InjectedToolCallId`, ...) never fit: the model cannot set them.
    """
    if not isinstance(args, dict):
        return f"arguments must be a JSON object, got {type(args).__name__}"
    forged = spoofed(entry.injected, args)
    if forged:
        names = ", ".join(repr(k) for k in forged)
        return (
            f"{names}: not an argument of this tool (the agent fills it, never a tool call); "
            "leave it out"
        )
    schema = entry.tool.tool_call_schema
    if isinstance(schema, type) and issubclass(schema, BaseModel):
        try:
            schema.model_validate(args)
        except ValidationError as exc:
            return validation_problem(exc)
        except Exception as exc:  # the tool's own validator failed on them
            # pydantic wraps only ValueError / AssertionError; a validator's bug (a division by
            # an argument that is 0, a KeyError) would end the run in a traceback, on arguments
            # the model chose: the tool never runs on them, and the model is told why
            failed = f"{type(exc).__name__}: {_one_line(exc)}"
            return f"the tool's own check of these arguments failed ({failed})"
    return None


def as_called(entry: RegisteredTool, args: dict[str, Any]) -> dict[str, Any]:
    """`args` as the tool's schema reads them: coerced, defaults filled, unknown keys dropped.

    Two calls whose arguments read the same (`5` and `5.0`, a default sent or left out) run the
    tool the same way. Arguments that do not fit the schema are returned as they are.
    """
    schema = entry.tool.tool_call_schema
    if (
        not isinstance(args, dict)
        or spoofed(entry.injected, args)
        or not (isinstance(schema, type) and issubclass(schema, BaseModel))
    ):
        return args
    try:  # validated once (`invalid_args`'s check, the same call): the loop guard reads each
        # call of the task at every step
        model = schema.model_validate(args)
        dumped: dict[str, Any] = model.model_dump(mode="json")
        if _has_sets(schema):
            dumped = _sets_in_order(model.model_dump(), dumped)
    except Exception:  # do not fit (`invalid_args` says why), or validate but do not dump
        return args
    return dumped


@functools.lru_cache(maxsize=1024)
def _has_sets(schema: type[BaseModel]) -> bool:
    """Whether the schema has a set anywhere (JSON Schema's `uniqueItems`), or cannot tell."""
    try:
        return '"uniqueItems": true' in json.dumps(schema.model_json_schema())
    except Exception:  # a type JSON Schema cannot describe: look at the values
        return True


def _sets_in_order(python: Any, dumped: Any) -> Any:
    """`dumped` (`model_dump(mode="json")`) with each list that was a set in canonical order.

    pydantic writes a set as a list in the set's own order, which changes with each process's
    string hash seed: the same call read in another process (a resume, another worker) would
    have other digests, so a crashed call's orphan would not be found and a decision not
    matched. `python` is the same model dumped in Python mode, where sets are still sets.
    """
    if isinstance(python, set | frozenset) and isinstance(dumped, list):
        return sorted(dumped, key=lambda item: json.dumps(item, sort_keys=True))
    alike = isinstance(python, Sized) and isinstance(dumped, Sized)
    if not alike or len(python) != len(dumped):
        return dumped  # a scalar, or another shape (a custom serializer's): no set inside
    if isinstance(python, dict) and isinstance(dumped, dict):
        pairs = zip(python.values(), dumped.items(), strict=True)
        return {k: _sets_in_order(p, v) for p, (k, v) in pairs}
    if isinstance(python, list | tuple) and isinstance(dumped, list):
        return [_sets_in_order(p, v) for p, v in zip(python, dumped, strict=True)]
    return dumped


def read_call(name: str, args: Any, tools: ToolLookup | None) -> tuple[str, str]:
    """`(name, canonical arguments)` of a call: how the loop guard and left-behind repeats compare.

    The arguments as the tool reads them when `tools` knows it (`as_called`), else as spelled.
    """
    entry = tools(name) if tools is not None else None
    return name, canonical_args(as_called(entry, args) if entry is not None else args)


def approval_digests(
    entry: RegisteredTool, args: Mapping[str, Any], policy: str
) -> tuple[str, str]:
    """The digests a human's decision on this call is stored under: `(read, spelled)`.

    `read` is of the arguments as the tool reads them (`as_called`): `10`, `10.0` and `"10"`
    for an `int`, or a default sent or left out, are one call, so a rejection answers them all
    and an approval (a `same_args` standing one too) covers them all. keel stores decisions
    under it. `spelled` is of the arguments as the model spelled them: keel stored decisions
    under it before, and a decision found under it (a thread paused across the upgrade, a
    standing approval in the ledger) still answers this exact call.
    """
    version = entry.spec.version
    read = as_called(entry, dict(args))
    return (
        approval_digest(entry.name, read, policy, version=version, read=True),
        approval_digest(entry.name, args, policy, version=version),
    )


def validation_problem(exc: ValidationError) -> str:
    """What a `ValidationError` found, per field, without the values it was given.

    Pydantic's own message quotes the input (`input_value=...`): for a tool invoked with what
    the agent injects, the run's state or store, which neither the model nor the audit log
    may read.
    """
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'arguments'}: {err['msg']}"
        for err in exc.errors(include_input=False, include_url=False)
    )


def json_args(answer: AIMessage) -> AIMessage:
    """`answer` with each tool call's arguments as JSON carries them: keys are strings.

    A provider sends arguments as JSON text, so their keys are strings; a model made in Python
    can give any key. The checkpoint cannot store some (a frozenset key: the run ended on a
    storage failure, its thread left unsaved), and JSON cannot write a tuple or a frozenset for
    the audit, the ledger or an approval's digest. Arguments holding such a key are written as
    JSON would write them, each such key as its canonical JSON (`(1, 2)` as `"[1,2]"`,
    `keel.approvals.plain_keys`); the tool's schema then reads them as it reads a provider's,
    and says what does not fit. Arguments JSON writes as they are are kept as they are.
    """
    if all(_writable(c["args"]) for c in answer.tool_calls):
        return answer  # the usual answer: no copy
    calls = [{**c, "args": plain_keys(c["args"])} for c in answer.tool_calls]
    log.warning(
        "the model gave tool arguments with keys JSON cannot carry; keel wrote them as text"
    )
    return answer.model_copy(update={"tool_calls": calls})


def _writable(args: Any) -> bool:
    """Whether JSON writes `args` as they are (at C speed: a model's usual arguments)."""
    try:
        json.dumps(args, default=str)
    except TypeError:
        return False
    return True
