"""Tool-call arguments checked against the tool's schema, before a call runs or an edit is taken."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.tools import BaseTool
from pydantic import BaseModel, ValidationError, create_model

from keel.approvals import approval_digest, canonical_args, plain_keys
from keel.db.tables import storable
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
    "unique_ids",
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
            (_read_by(entry.tool, schema).own or schema).model_validate(args)
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
    A tool whose `args_schema` has validators or config of its own (`_reading`) has them
    read by it: `" ADMIN"` is `admin` when its validator says so. A default its factory makes
    anew at each reading (a time, a uuid) is left out (`_made_anew`).
    """
    schema = entry.tool.tool_call_schema
    if (
        not isinstance(args, dict)
        or spoofed(entry.injected, args)
        or not (isinstance(schema, type) and issubclass(schema, BaseModel))
    ):
        return args
    reading = _read_by(entry.tool, schema)
    own = reading.own
    try:  # validated once (`invalid_args`'s check, the same call): the loop guard reads each
        # call of the task at every step
        if own is None:  # the usual tool: `tool_call_schema` reads the arguments as it does
            model = schema.model_validate(args)
            dumped: dict[str, Any] = model.model_dump(mode="json")
        else:  # the values the tool's own schema made, written as `tool_call_schema` writes
            # them (never by the schema's serializers: one that masks a value would make two
            # calls one)
            read = own.model_validate(args)
            values = {k: getattr(read, k) for k in schema.model_fields}
            model = schema.model_construct(read.model_fields_set, **values)
            dumped = model.model_dump(mode="json", warnings=False)
        if reading.sets:
            dumped = _sets_in_order(model.model_dump(), dumped)
        if reading.factories:
            for name in _made_anew(model, reading.factories):
                del dumped[name]
    except Exception:  # do not fit (`invalid_args` says why), or validate but do not dump
        return args
    return dumped


@dataclass(frozen=True, slots=True)
class _Reading:
    """How keel reads one tool's calls (`_reading`)."""

    own: type[BaseModel] | None
    """The model that reads them as the tool does when `tool_call_schema` does not."""
    sets: bool
    """Whether `tool_call_schema` has a set anywhere (JSON Schema's `uniqueItems`), or cannot
    tell: the sets' order is made canonical (`_sets_in_order`)."""
    factories: tuple[str, ...]
    """The fields whose default a factory makes (`Field(default_factory=...)`)."""


_READING_CONFIG = (
    "str_strip_whitespace",
    "str_to_lower",
    "str_to_upper",
    "str_min_length",
    "str_max_length",
    "strict",
    "coerce_numbers_to_str",
    "use_enum_values",
    "validate_default",
    "alias_generator",
    "regex_engine",
)
"""The `model_config` keys that change how a model reads its input (not only how it writes)."""


def _read_by(tool: BaseTool, schema: type[BaseModel]) -> _Reading:
    """`_reading` of `tool` whose `tool_call_schema` is `schema`."""
    own = tool.args_schema  # a JSON schema has a JSON `tool_call_schema`: never read here
    return _reading(None if isinstance(own, dict) else own, schema)


@functools.lru_cache(maxsize=1024)
def _reading(args_schema: Any, call_schema: type[BaseModel]) -> _Reading:
    """How to read a tool's calls: one lookup per reading, whatever the tool.

    Once per pair of schemas (a tool keeps its `tool_call_schema`).

    `own`: LangChain's `tool_call_schema` (what the model is shown, and what keel reads
    arguments with) copies the fields of the tool's `args_schema` but not its validators
    (`field_validator`, `model_validator`), its config (`str_strip_whitespace`, `strict`,
    `extra="forbid"`, ...) nor its aliases: a tool whose schema strips and lowercases an
    account id runs `" ADMIN"` as `admin`. For such a schema, the `args_schema` itself, with
    each injected parameter (what `tool_call_schema` leaves out) optional and `None`: its
    validators run without the values the agent injects. `None` (the usual tool, a function's
    schema among them): `call_schema` reads them as the tool does.
    """
    factories = tuple(k for k, f in call_schema.model_fields.items() if f.default_factory)
    return _Reading(_own_model(args_schema, call_schema), _has_sets(call_schema), factories)


def _own_model(args_schema: Any, call_schema: type[BaseModel]) -> type[BaseModel] | None:
    if not (isinstance(args_schema, type) and issubclass(args_schema, BaseModel)):
        return None  # none, or a pydantic v1 model (a JSON schema never gets here)
    found = args_schema.__pydantic_decorators__
    config = args_schema.model_config
    own = (
        bool(found.validators or found.field_validators)
        or bool(found.root_validators or found.model_validators)
        or any(config.get(key) for key in _READING_CONFIG)
        or config.get("extra") == "forbid"
        or any(f.alias or f.validation_alias for f in args_schema.model_fields.values())
    )
    if args_schema is call_schema or not own:
        return None
    injected: dict[str, Any] = {
        name: (Any, None)
        for name in args_schema.model_fields
        if name not in call_schema.model_fields
    }
    if not injected:
        return args_schema
    made: type[BaseModel] = create_model(args_schema.__name__, __base__=args_schema, **injected)
    return made


def _has_sets(schema: type[BaseModel]) -> bool:
    try:
        return '"uniqueItems": true' in json.dumps(schema.model_json_schema())
    except Exception:  # a type JSON Schema cannot describe: look at the values
        return True


def _made_anew(model: BaseModel, factories: tuple[str, ...]) -> list[str]:
    """The fields of `factories` the call left out whose factory makes another value each time.

    `at: datetime = Field(default_factory=now)` read a new time at each reading: no two
    readings of one call were alike, so a human's approval never matched the call it approved
    (`needs_approval` for good), a repeat was never a duplicate, a loop never one. Such a
    default is not part of the call; a constant one (`default_factory=list`) stays.
    """
    fields, sent = type(model).model_fields, model.model_fields_set
    data = dict(model)
    return [
        k
        for k in factories
        if k not in sent
        and fields[k].get_default(call_default_factory=True, validated_data=data) != data[k]
    ]


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


_MAX_CALL_ID = 40
"""The longest tool-call id keel mints when it renames one (OpenAI refuses longer ids)."""
_MAX_KEPT_ID = 128
"""The longest tool-call id keel keeps as a model named it (providers' ids are 9 to 40 long)."""


def unique_ids(answer: AIMessage, history: Sequence[BaseMessage]) -> AIMessage:
    """`answer` with each tool call under an id no other call of the thread has.

    A sloppy or hostile model can name two calls of a turn alike, reuse an id of an earlier
    turn, or name a call not at all. Everything downstream tells calls apart by id: an approval
    is bound to `digest/tool_call_id` and a resume is keyed by `tool_call_id` (one "approve"
    would cover both calls), the ledger by `(thread, tool_call_id)` (the second call would be
    answered "conflict", or get the first one's recorded result), and each `ToolMessage`
    answers one id. So before anything else sees the answer, the first call under an id that
    is new to the thread keeps it and every other call gets `<id>_<n>` (`call_<n>` when it had
    none), the smallest `n` that is free. The renamed answer is what the checkpoint stores, so a
    resume sees the same ids, and the same history and answer give the same names. An id no
    database stores, or a huge one, counts as none (`_storable_id`).
    Unparsable calls (`invalid_tool_calls`) are named too; so are `tool_use` content blocks
    (Anthropic's), in order, so the message stays consistent for its provider.
    """
    calls = [*answer.tool_calls, *answer.invalid_tool_calls]
    if not calls:
        return answer  # a final answer: no history to read
    ids = [c.get("id") or "" for c in calls]
    used = _used_ids(history)
    good = [i if _storable_id(i) else "" for i in ids]  # a bad id is as good as none
    if all(good) and len(set(ids)) == len(ids) and used.isdisjoint(ids):
        return answer  # the usual answer: no copy
    taken, kept, fresh = used | set(good), set(), []
    for old in good:
        if old and old not in used and old not in kept:
            kept.add(old)
            fresh.append(old)
            continue
        n, base = (2, old) if old else (1, "call")
        while (new := _numbered(base, n)) in taken:
            n += 1
        taken.add(new)
        fresh.append(new)
    log.warning(
        "the model named its tool calls %s (an id twice, an id already used in this thread, "
        "none, or one no database stores); keel renamed them %s",
        ids,
        fresh,
    )
    valid = len(answer.tool_calls)
    update: dict[str, Any] = {
        "tool_calls": [
            {**c, "id": i} for c, i in zip(answer.tool_calls, fresh[:valid], strict=True)
        ],
        "invalid_tool_calls": [
            {**c, "id": i} for c, i in zip(answer.invalid_tool_calls, fresh[valid:], strict=True)
        ],
    }
    if isinstance(answer.content, list):
        update["content"] = _renamed_blocks(answer.content, ids, fresh)
    return answer.model_copy(update=update)


def _storable_id(call_id: str) -> bool:
    r"""Whether keel keeps a model's call id as it is: one every database stores whole.

    A lone surrogate (`"c\ud800"`) is no UTF-8 and PostgreSQL's text holds no NUL: the call's
    claim in the idempotency ledger failed, a bare `UnicodeEncodeError` out of `invoke` or the
    run ended `error/storage`, for an id the model made up. An id longer than
    `_MAX_KEPT_ID` would make the ledger's keys a model's to size.
    """
    return 0 < len(call_id) <= _MAX_KEPT_ID and storable(call_id) == call_id


def _used_ids(history: Sequence[BaseMessage]) -> set[str]:
    """Every tool-call id the thread's history holds: its calls' and its results'."""
    used: set[str] = set()
    for m in history:
        if isinstance(m, AIMessage):
            used.update(c.get("id") or "" for c in [*m.tool_calls, *m.invalid_tool_calls])
        elif isinstance(m, ToolMessage):
            used.add(m.tool_call_id)
    used.discard("")
    return used


def _numbered(base: str, n: int) -> str:
    suffix = f"_{n}"
    return base[: _MAX_CALL_ID - len(suffix)] + suffix


def _renamed_blocks(content: list[Any], ids: list[str], fresh: list[str]) -> list[Any]:
    """`content` with its `tool_use` blocks renamed as the calls they carry, in order."""
    queues: dict[str, list[str]] = {}
    for old, new in zip(ids, fresh, strict=True):
        queues.setdefault(old, []).append(new)
    out: list[Any] = []
    for block in content:
        if isinstance(block, dict) and block.get("type") == "tool_use":
            queue = queues.get(block.get("id") or "")
            if queue:
                block = {**block, "id": queue.pop(0)}
        out.append(block)
    return out
