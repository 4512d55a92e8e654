"""Scenario suites as files: cases with input, identity, model, expectations, rubric and budgets.

A suite is a YAML file (a `.json` file is read as JSON; in Python, the same shape as a dict,
`Suite.from_dict`):

```yaml
name: refunds
graph: keel.evals.builtin:demo_agent   # optional; `keel eval --graph` overrides it
model: keel:demo                        # the default model of every case
cases:
  - id: refund-approved
    input: Order A1001 arrived damaged. Please refund it.
    identity: {user: alice, tenant: acme, roles: [support]}
    approvals: approve                  # how a human answers each approval request
    expect:
      status: success
      terminated_reason: completed
      trajectory:
        mode: strict                    # strict | unordered | subset | superset
        args: exact                     # exact | ignore | subset | superset
        calls:
          - {name: lookup_order, args: {order_id: A1001}}
    rubric: The answer tells the customer the refund amount.
    budgets: {usd: 0.05, steps: 20}
```

A case's `model` is a model string (`keel:demo`, `openai:gpt-4o-mini`, `package.module:attr`) or
an inline script for keel's `ScriptedChatModel` (`script`, `structured`), optionally wrapped in
faults (`chaos`: the rates of a `ChaosPolicy`). A case may name its own `graph` factory (the
chaos suite's cases with a failing ledger or memory store do): it runs on that graph whatever
the suite's graph or `keel eval --graph` say.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, ToolCall

from keel._data_files import Format, parse_text, read_text
from keel.errors import UserError
from keel.evals.chaos import ChaosChatModel, ChaosPolicy
from keel.evals.scripted import ScriptedChatModel
from keel.models import resolve_model
from keel.pricing import finite_number, is_count
from keel.state import OutcomeStatus, RunContext, TerminatedReason

__all__ = [
    "ArgsMatch",
    "Budgets",
    "Case",
    "Expect",
    "ModelSpec",
    "Suite",
    "TrajectoryMatch",
    "TrajectoryMode",
    "load_suite",
]

TrajectoryMode = Literal["strict", "unordered", "subset", "superset"]
"""How the run's tool calls are compared with the expected ones (agentevals' modes)."""
ArgsMatch = Literal["exact", "ignore", "subset", "superset"]
"""How a tool call's arguments are compared with the expected ones."""
_MODES = ("strict", "unordered", "subset", "superset")
_ARGS = ("exact", "ignore", "subset", "superset")
_BUDGETS: tuple[str, ...] = ("usd", "input_tokens", "output_tokens", "total_tokens", "steps")
_BUDGETS += ("model_calls", "tool_calls", "latency_seconds")
_COUNTS = frozenset(_BUDGETS) - {"usd", "latency_seconds"}
"""The budgets that count (tokens, steps, calls): whole numbers, as `Budgets` declares them."""


@dataclass(frozen=True, kw_only=True, slots=True)
class TrajectoryMatch:
    """The tool calls a case expects, and how strictly they are matched."""

    calls: tuple[ToolCall, ...]
    """The expected calls, in order (`name` and `args`)."""
    mode: TrajectoryMode = "strict"
    """`strict`: same calls in the same order; `unordered`: same calls, any order; `subset`: the
    run made no call outside these; `superset`: the run made at least these calls."""
    args: ArgsMatch = "exact"
    """How arguments are compared; `ignore` compares tool names only."""
    overrides: Mapping[str, Any] = field(default_factory=dict)
    """Per tool: an `ArgsMatch` or a function `(actual_args, expected_args) -> bool`."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Budgets:
    """Limits a case's run must stay within (`None` disables a limit)."""

    usd: float | None = None
    """Dollars, from keel's price table."""
    input_tokens: int | None = None
    """Input tokens over all model calls."""
    output_tokens: int | None = None
    """Output tokens over all model calls."""
    total_tokens: int | None = None
    """Input plus output tokens."""
    steps: int | None = None
    """Node executions (LangGraph `updates`) the run took, resumes included."""
    model_calls: int | None = None
    """Model calls."""
    tool_calls: int | None = None
    """Tool calls."""
    latency_seconds: float | None = None
    """Wall-clock seconds, approvals included."""

    def __post_init__(self) -> None:
        for name in _BUDGETS:
            problem = _budget_problem(name, getattr(self, name))
            if problem is not None:
                raise UserError(f"Budgets.{problem}")

    def limits(self) -> dict[str, float]:
        """The limits that are set, by name."""
        return {k: float(v) for k in _BUDGETS if (v := getattr(self, k)) is not None}


@dataclass(frozen=True, kw_only=True, slots=True)
class Expect:
    """What a case's run must end with."""

    status: str | None = None
    """The outcome's `status` (`success`, `stopped`, `error`, `interrupted`)."""
    terminated_reason: str | None = None
    """The outcome's `terminated_reason` (`completed`, `denied`, `budget_exceeded`, ...)."""
    trajectory: TrajectoryMatch | None = None
    """The expected tool calls."""
    tools_succeed: bool = False
    """Every tool call that ran must have succeeded."""
    forbidden_tools: tuple[str, ...] = ()
    """Tools that must never execute in this case (counted as unauthorized executions)."""
    no_pii: bool = False
    """The answers must not contain PII (emails, phones, cards, IBANs, SSNs, keys)."""
    valid_history: bool = False
    """The run must end with an outcome and a history every provider accepts."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelSpec:
    """A case's model: a model string, or an inline script, optionally with chaos."""

    name: str | None = None
    """A model string (`keel:demo`, `openai:gpt-4o-mini`, `package.module:attr`)."""
    script: tuple[Any, ...] = ()
    """Turns for `ScriptedChatModel`: text, `{call: name, args: {...}}` or `{calls: [...]}`."""
    structured: Mapping[str, Any] = field(default_factory=dict)
    """Structured-output answers for `ScriptedChatModel`, by schema name."""
    chaos: Mapping[str, Any] | None = None
    """`ChaosPolicy` fields; the model is wrapped in `ChaosChatModel` when set."""

    def build(self) -> BaseChatModel:
        """A fresh model for one run (scripted and chaos models keep per-instance state)."""
        model: BaseChatModel
        if self.name is not None:
            model = resolve_model(self.name)
        else:
            script = [_turn(t) for t in self.script]
            model = ScriptedChatModel(script=script, structured=dict(self.structured))
        if self.chaos is not None:
            model = ChaosChatModel(model=model, policy=ChaosPolicy(**self.chaos))
        return model

    @property
    def label(self) -> str:
        """A short name for reports."""
        base = self.name or f"script({len(self.script)} turns)"
        return f"chaos({base})" if self.chaos is not None else base


@dataclass(frozen=True, kw_only=True, slots=True)
class Case:
    """One scenario: what is sent, for whom, on which model, and what must come out."""

    id: str
    """A unique id within the suite."""
    messages: tuple[tuple[str, str], ...]
    """The input messages as `(role, content)`."""
    identity: RunContext = field(default_factory=RunContext)
    """Who the run is for (user, tenant, roles)."""
    model: ModelSpec | None = None
    """The case's model; `None` uses the suite's (or `keel eval --model`)."""
    approvals: Literal["approve", "reject"] = "approve"
    """How every approval request of the run is answered."""
    expect: Expect = field(default_factory=Expect)
    """The expected outcome, trajectory and properties."""
    rubric: str | None = None
    """Criteria an LLM judge scores the final answer against."""
    budgets: Budgets = field(default_factory=Budgets)
    """Limits the run must stay within."""
    tags: tuple[str, ...] = ()
    """Free labels, for filtering and reports."""
    graph: str | None = None
    """The case's own graph factory, `module:function`; it wins over the suite's and `--graph`
    (for cases about the infrastructure a factory builds, such as a failing ledger)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Suite:
    """A named list of cases, with defaults for their graph and model."""

    name: str
    """The suite's name (reports, file names)."""
    cases: tuple[Case, ...]
    """The cases, in order."""
    graph: str | None = None
    """The default graph factory, `module:function` (`keel eval --graph` overrides it)."""
    model: ModelSpec | None = None
    """The default model of cases that name none."""
    judge: str | None = None
    """The model string of the rubric judge (`keel eval --judge` overrides it)."""
    path: Path | None = None
    """The file the suite was loaded from."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, path: Path | None = None) -> Suite:
        """Build a suite from its YAML shape (see the module docstring)."""
        where = str(path or "suite")
        data = _mapping(data, where, ("name", "cases", "graph", "model", "judge"))
        raw_cases = data.get("cases")
        if not isinstance(raw_cases, list) or not raw_cases:
            raise UserError(f"{where}: `cases` must be a non-empty list of cases.")
        cases = tuple(_case(c, f"{where}: cases[{i}]") for i, c in enumerate(raw_cases))
        ids = [c.id for c in cases]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise UserError(f"{where}: case ids must be unique; repeated: {duplicates}.")
        name = data.get("name")
        if isinstance(name, Mapping | list):  # a number or `yes` is a name (`1.yaml` is `1`)
            raise UserError(f"{where}: name must be a string, got {name!r}.")
        name = str(name or "") or (path.stem if path else "suite")
        model = data.get("model")
        return cls(
            name=str(name),
            cases=cases,
            graph=_opt_str(data.get("graph"), f"{where}: graph"),
            model=None if model is None else _model(model, f"{where}: model"),
            judge=_opt_str(data.get("judge"), f"{where}: judge"),
            path=path,
        )


def load_suite(path: str | Path) -> Suite:
    """Load a suite from a YAML file (or a `.json` one), with errors naming the file and field.

    Raises:
        UserError: the file is missing, is not YAML (a key given twice in one mapping
            included), or a case is malformed.
    """
    path = Path(path).expanduser()
    text = read_text(path, "Suite file", missing="Give the path of a YAML suite.")
    kind: Format = "json" if path.suffix.lower() == ".json" else "yaml"  # JSON: tabs are valid
    where = f"Suite file {str(path)!r}"
    data = parse_text(text, kind, where, needs="a suite needs a few levels: ")
    return Suite.from_dict(data, path=path)


# -- parsing -------------------------------------------------------------------------------------


def _mapping(value: Any, where: str, allowed: Sequence[str]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise UserError(f"{where} must be a mapping, got {type(value).__name__}.")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise UserError(f"{where}: unknown field(s) {unknown}; expected some of {list(allowed)}.")
    return value


_OUTCOME_PARTS: dict[str, tuple[str, ...]] = {
    "status": get_args(OutcomeStatus),
    "terminated_reason": get_args(TerminatedReason),
}


def outcome_part(value: Any, part: str, where: str) -> str | None:
    """An expected outcome's `status` or `terminated_reason`, one keel can end a run with.

    A misspelt one (`sucess`) would fail its case on every run, looking like the agent's fault.
    """
    text = _opt_str(value, f"{where}: {part}")
    known = _OUTCOME_PARTS[part]
    if text is not None and text not in known:
        raise UserError(f"{where}: {part} must be one of {list(known)}, got {text!r}.")
    return text


def _opt_str(value: Any, where: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise UserError(f"{where} must be a string, got {value!r}.")


def _text(value: Any, where: str) -> str:
    """A text field: a string, or a number YAML read as one (`input: 42`); not a list or null."""
    if isinstance(value, str) or (isinstance(value, int | float) and not isinstance(value, bool)):
        return str(value)
    raise UserError(f'{where} must be text, got {value!r}; quote it ("...") or "" for none.')


def _strings(value: Any, where: str) -> tuple[str, ...]:
    """A list of names (`[a, b]`); a lone string is refused, not read as its letters."""
    if value is None:
        return ()
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise UserError(f"{where} must be a list of names, like [a, b], got {value!r}.")
    return tuple(value)


def _flag(value: Any, where: str) -> bool:
    if value is None or isinstance(value, bool):
        return bool(value)
    raise UserError(f"{where} must be true or false, got {value!r}.")


def _dict(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise UserError(f"{where} must be a mapping, got {value!r}.")
    return dict(value)


def _tool_call(raw: Any, where: str) -> ToolCall:
    """`{name, args}` (or a bare tool name) as an expected or scripted tool call."""
    data = {"name": raw} if isinstance(raw, str) else _mapping(raw, where, ("name", "args"))
    if not isinstance(data.get("name"), str) or not data["name"]:
        raise UserError(f"{where}: every call needs a `name` (the tool's name), got {raw!r}.")
    return ToolCall(name=data["name"], args=_dict(data.get("args"), f"{where}: args"), id=None)


_CASE_FIELDS: tuple[str, ...] = (
    "id",
    "input",
    "messages",
    "identity",
    "model",
    "approvals",
    "expect",
)
_CASE_FIELDS += ("rubric", "budgets", "tags", "graph")


def _case(raw: Any, where: str) -> Case:
    data = _mapping(raw, where, _CASE_FIELDS)
    case_id = data.get("id")
    if not isinstance(case_id, str) or not case_id.strip():
        raise UserError(f"{where}: every case needs an `id` (a non-empty string).")
    where = f"{where} ({case_id})"
    approvals = data.get("approvals", "approve")
    if approvals not in ("approve", "reject"):
        raise UserError(f"{where}: approvals must be 'approve' or 'reject', got {approvals!r}.")
    model = data.get("model")
    return Case(
        id=case_id,
        messages=_messages(data, where),
        identity=_identity(data.get("identity") or {}, where),
        model=None if model is None else _model(model, f"{where}: model"),
        approvals=approvals,
        expect=_expect(data.get("expect") or {}, f"{where}: expect"),
        rubric=_opt_str(data.get("rubric"), f"{where}: rubric"),
        budgets=_budgets(data.get("budgets") or {}, f"{where}: budgets"),
        tags=_strings(data.get("tags"), f"{where}: tags"),
        graph=_opt_str(data.get("graph"), f"{where}: graph"),
    )


def _messages(data: Mapping[str, Any], where: str) -> tuple[tuple[str, str], ...]:
    if ("input" in data) == ("messages" in data):
        raise UserError(f"{where}: give either `input` (the user's text) or `messages`.")
    if "input" in data:
        if data["input"] is None:
            raise UserError(f'{where}: `input` is empty; give the user\'s text ("" for none).')
        return (("user", _text(data["input"], f"{where}: input")),)
    raw = data["messages"]
    if not isinstance(raw, list) or not raw:
        raise UserError(f"{where}: messages must be a non-empty list of {{role, content}}.")
    out = []
    for m in raw:
        m = _mapping(m, f"{where}: message", ("role", "content"))
        if m.get("role") not in ("user", "assistant", "system"):
            raise UserError(f"{where}: a message role must be user, assistant or system.")
        out.append((str(m["role"]), _text(m.get("content", ""), f"{where}: message content")))
    return tuple(out)


def _identity(raw: Any, where: str) -> RunContext:
    data = _mapping(raw, f"{where}: identity", ("user", "tenant", "roles", "policy"))
    roles = data.get("roles", ["user"])
    if isinstance(roles, str) or not isinstance(roles, list):
        raise UserError(f"{where}: identity.roles must be a list of role names, got {roles!r}.")
    fields = {"user": "user_id", "tenant": "tenant_id", "policy": "policy"}
    for key in fields:
        value = data.get(key, "-")
        if isinstance(value, bool) or not isinstance(value, str | int) or not str(value).strip():
            raise UserError(
                f"{where}: identity.{key} must be a non-empty name, got {value!r}; "
                f"leave it out for the default."
            )
    try:
        return RunContext(
            user_id=str(data.get("user", "eval-user")),
            tenant_id=str(data.get("tenant", "default")),
            roles=tuple(str(r) for r in roles),
            policy=str(data.get("policy", "default")),
        )
    except ValueError as exc:  # NUL, a lone surrogate: RunContext names its own field
        for key, name in fields.items():
            exc = ValueError(str(exc).replace(f"RunContext.{name}", f"identity.{key}"))
        raise UserError(f"{where}: {exc}") from None


def _model(raw: Any, where: str) -> ModelSpec:
    if isinstance(raw, str):
        return ModelSpec(name=raw)
    data = _mapping(raw, where, ("name", "script", "structured", "chaos"))
    script = data.get("script") or []
    if not isinstance(script, list):
        raise UserError(f"{where}: script must be a list of turns.")
    if data.get("name") is None and not script and not data.get("structured"):
        raise UserError(f"{where}: give a model `name` or a `script` of turns.")
    for i, turn in enumerate(script):
        _turn(turn, f"{where}: script[{i}]")
    chaos = data.get("chaos")
    if chaos is not None:
        _mapping(chaos, f"{where}: chaos", tuple(ChaosPolicy.__dataclass_fields__))
        try:
            ChaosPolicy(**chaos)  # validates the rates now, with ChaosPolicy's own messages
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from exc
    return ModelSpec(
        name=_opt_str(data.get("name"), f"{where}: name"),
        script=tuple(script),
        structured=_dict(data.get("structured"), f"{where}: structured"),
        chaos=None if chaos is None else dict(chaos),
    )


def _turn(raw: Any, where: str = "script turn") -> AIMessage | str:
    if isinstance(raw, str):
        return raw
    data = _mapping(raw, where, ("call", "args", "calls", "text"))
    if "calls" in data:
        calls = data["calls"]
        if not isinstance(calls, list | tuple):
            raise UserError(f"{where}: calls must be a list of {{name, args}}, got {calls!r}.")
    elif "call" in data:
        calls = [{"name": data["call"], "args": data.get("args")}]
    else:
        return _text(data.get("text", ""), f"{where}: text")
    tool_calls = [_tool_call(c, f"{where}: calls[{i}]") for i, c in enumerate(calls)]
    return AIMessage(content=_text(data.get("text", ""), f"{where}: text"), tool_calls=tool_calls)


def _expect(raw: Any, where: str) -> Expect:
    fields = ("status", "terminated_reason", "trajectory", "tools_succeed", "forbidden_tools")
    data = _mapping(raw, where, (*fields, "no_pii", "valid_history"))
    trajectory = data.get("trajectory")
    return Expect(
        status=outcome_part(data.get("status"), "status", where),
        terminated_reason=outcome_part(data.get("terminated_reason"), "terminated_reason", where),
        trajectory=None if trajectory is None else _trajectory(trajectory, f"{where}: trajectory"),
        tools_succeed=_flag(data.get("tools_succeed"), f"{where}: tools_succeed"),
        forbidden_tools=_strings(data.get("forbidden_tools"), f"{where}: forbidden_tools"),
        no_pii=_flag(data.get("no_pii"), f"{where}: no_pii"),
        valid_history=_flag(data.get("valid_history"), f"{where}: valid_history"),
    )


def _trajectory(raw: Any, where: str) -> TrajectoryMatch:
    if isinstance(raw, list):
        raw = {"calls": raw}
    data = _mapping(raw, where, ("calls", "mode", "args", "overrides"))
    mode = data.get("mode", "strict")
    args = data.get("args", "exact")
    if mode not in _MODES:
        raise UserError(f"{where}: mode must be one of {list(_MODES)}, got {mode!r}.")
    if args not in _ARGS:
        raise UserError(f"{where}: args must be one of {list(_ARGS)}, got {args!r}.")
    raw_calls = data.get("calls") or []
    if not isinstance(raw_calls, list | tuple):
        raise UserError(f"{where}: calls must be a list of tool names or {{name, args}}.")
    calls = [_tool_call(c, f"{where}: calls[{i}]") for i, c in enumerate(raw_calls)]
    overrides = _dict(data.get("overrides"), f"{where}: overrides")
    for tool_name, how in overrides.items():
        if how not in _ARGS:
            raise UserError(
                f"{where}: overrides[{tool_name!r}] must be one of {list(_ARGS)} in a file "
                "(pass a function in Python)."
            )
    return TrajectoryMatch(calls=tuple(calls), mode=mode, args=args, overrides=overrides)


def _budgets(raw: Any, where: str) -> Budgets:
    data = _mapping(raw, where, _BUDGETS)
    for name, value in data.items():
        problem = _budget_problem(name, value)
        if problem is not None:
            raise UserError(f"{where}: {problem}")
    return Budgets(**data)


def _budget_problem(name: str, value: object) -> str | None:
    """What is wrong with `value` as the budget `name` (None when it is a limit, or None)."""
    if value is None:
        return None
    if name in _COUNTS:  # 1.5 model calls, 2.0, True or infinity are no count
        if not is_count(value) or value < 0:
            return f"{name} is a count: a whole number >= 0, got {value!r}."
    elif (number := finite_number(value)) is None or number < 0:  # NaN, infinity: no limit
        return f"{name} must be a number >= 0, got {value!r}."
    return None
