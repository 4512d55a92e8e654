"""`Policy`: every limit and rule a run is held to, in one frozen, validated object.

Load it from Python, a dict, or a TOML / YAML file. Every field that is `None` disables its
limit. A policy's `name` and `version` go into every approval digest (and, later, audit record),
so changing the rules invalidates old approvals.

Example (TOML):
    ```toml
    name = "support"
    version = "3"

    [budget]
    usd = 0.50
    model_calls = 20

    [[rules]]
    role = "support"
    tool = "lookup_*"
    action = "allow"

    [[rules]]
    role = "support"
    tool = "issue_refund"
    resource = "orders/*"
    action = "ask"

    [[rate_limits]]
    rpm = 500
    tpm = 200000

    [model_breaker]
    failure_threshold = 5
    cooldown_seconds = 30
    ```
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

from keel._data_files import load_data_file
from keel.errors import UserError
from keel.guards.admission import AdmissionPolicy
from keel.guards.breaker import BreakerPolicy
from keel.guards.content import InputGuardPolicy, OutputGuardPolicy
from keel.guards.ratelimit import RateLimit
from keel.guards.spend import PeriodBudget
from keel.pricing import finite_number, is_count

__all__ = ["Action", "Budget", "LoopPolicy", "Policy", "Rule"]

Action = Literal["allow", "deny", "ask"]
_ACTIONS: tuple[str, ...] = get_args(Action)


@dataclass(frozen=True, kw_only=True, slots=True)
class Budget:
    """Per-run limits. `None` disables a limit; a run that reaches one stops cleanly.

    The run ends with `outcome.terminated_reason == "budget_exceeded"` and a partial answer;
    the detail names the limit and the numbers.
    """

    steps: int | None = None
    """Agent steps (model turns plus tool rounds)."""
    model_calls: int | None = None
    """Model calls."""
    tool_calls: int | None = None
    """Tool calls executed."""
    input_tokens: int | None = None
    """Input (prompt) tokens, summed over model calls."""
    output_tokens: int | None = None
    """Output (completion) tokens, summed over model calls."""
    usd: float | None = None
    """US dollars, from the price table. Under it every model keel calls must have a price:
    `build_agent` (and the other builders) refuse a model the table does not know, and a call
    priced by neither the reported nor the configured model name ends the run."""
    wall_seconds: float | None = None
    """Seconds since the task's first model call (time waiting for a human counts)."""
    soft_ratio: float = 0.8
    """Share of a limit at which a warning is recorded (`state["warnings"]`)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "soft_ratio":
                if (number := finite_number(value)) is None or not 0 < number <= 1:
                    raise UserError(
                        f"Budget.soft_ratio must be a number in (0, 1], e.g. 0.8; got {value!r}."
                    )
            elif value is None:
                continue
            elif f.name in _AMOUNTS:
                if (number := finite_number(value)) is None or number <= 0:
                    raise UserError(
                        f"Budget.{f.name} must be a finite number greater than 0 "
                        f"(e.g. {f.name}=0.5), or None to disable it; got {value!r}."
                    )
            elif not is_count(value) or value <= 0:
                raise UserError(
                    f"Budget.{f.name} is a count: a whole number greater than 0 "
                    f"(e.g. {f.name}=20), or None to disable it; got {value!r}."
                )

    def limits(self) -> dict[str, float]:
        """The limits that are set, by name."""
        names = _LIMIT_NAMES.get(type(self))
        if names is None:  # listed once per class, not with `fields()` on every call
            names = tuple(f.name for f in fields(self) if f.name != "soft_ratio")
            _LIMIT_NAMES[type(self)] = names
        return {name: value for name in names if (value := getattr(self, name)) is not None}


_AMOUNTS = frozenset({"usd", "wall_seconds"})
"""The limits that are amounts (dollars, seconds); the others count (calls, tokens, steps)."""

_LIMIT_NAMES: dict[type[Budget], tuple[str, ...]] = {}
"""The names of a `Budget` class's limits: every field but `soft_ratio`."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Rule:
    """One permission rule: `(role, tool glob, resource glob) → allow | deny | ask`.

    Rules are checked in order and the first match wins; a call no rule matches is denied.
    """

    action: Action
    """What happens to a matching call."""
    role: str = "*"
    """A role from `RunContext.roles`, or `*` for any role."""
    tool: str = "*"
    """A tool name glob (`lookup_*`)."""
    resource: str = "*"
    """A resource glob (`orders/*`), matched against the tool's resource extractor."""
    reason: str = ""
    """Why, shown to the reviewer (ask) or the model (deny)."""

    def __post_init__(self) -> None:
        if self.action not in _ACTIONS:
            raise UserError(
                f"Rule.action must be one of {list(_ACTIONS)}, got {self.action!r} "
                f"(rule for tool {self.tool!r})."
            )
        for name in ("role", "tool", "resource"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise UserError(
                    f"Rule.{name} must be a non-empty string (use '*' for any), got {value!r}."
                )

    def describe(self) -> str:
        """The rule as one line: `support | issue_refund | orders/* → ask`."""
        return f"{self.role} | {self.tool} | {self.resource} → {self.action}"


@dataclass(frozen=True, kw_only=True, slots=True)
class LoopPolicy:
    """When repeated tool calls count as a loop, and what then."""

    max_repeats: int = 3
    """The same tool with the same arguments this many times in a row is a loop."""
    max_cycles: int = 2
    """An A-B-A-B… cycle repeated this many times is a loop (0 disables cycle detection)."""
    on_loop: Literal["stop", "wrap_up"] = "stop"
    """`stop` ends the run as `loop_detected`; `wrap_up` forces one final turn without tools."""

    def __post_init__(self) -> None:
        repeats, cycles = self.max_repeats, self.max_cycles
        if not is_count(repeats) or repeats < 2:
            raise UserError(
                f"LoopPolicy.max_repeats must be a whole number, 2 or more (e.g. 3); "
                f"got {repeats!r}."
            )
        if not is_count(cycles) or cycles < 0 or cycles == 1:
            raise UserError(
                f"LoopPolicy.max_cycles must be 2 or more, or 0 to disable cycle detection; "
                f"got {self.max_cycles!r}."
            )
        if self.on_loop not in ("stop", "wrap_up"):
            raise UserError(
                f"LoopPolicy.on_loop must be 'stop' or 'wrap_up', got {self.on_loop!r}."
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class Policy:
    """Everything a run is held to: budgets, rules, rate limits, breakers, the loop guard.

    Attributes are documented on each field. Build one in Python, or load it with
    `Policy.from_dict(...)` / `Policy.from_file("policy.toml")` (TOML or YAML).
    """

    name: str = "default"
    """The policy's name; it appears in approval digests and audit records."""
    version: str = "1"
    """The policy's version; a new version invalidates approvals given under the old one."""
    budget: Budget | None = None
    """Per-run limits."""
    rules: tuple[Rule, ...] = field(default=())
    """Permission rules, first match wins, default deny. Empty: every tool call is denied."""
    loop: LoopPolicy | None = field(default_factory=LoopPolicy)
    """The loop guard; `None` disables it."""
    period_budgets: tuple[PeriodBudget, ...] = field(default=())
    """Per-user / per-tenant budgets per day or month, kept in the ledger
    (`build_agent(..., ledger=Ledger(url))`)."""
    rate_limits: tuple[RateLimit, ...] = field(default=())
    """RPM / TPM limits per model and per tenant, shared through the ledger; a model call
    waits for room up to each limit's `max_wait`, then falls back or stops."""
    model_breaker: BreakerPolicy | None = None
    """A circuit breaker per model (key `model:<name>`), shared through the ledger; an open one
    fails fast to the next fallback model. `None` disables it."""
    tool_breaker: BreakerPolicy | None = None
    """A circuit breaker per tool (key `tool:<name>`), shared through the ledger; while open,
    the tool is not run and the model is told it is unavailable. `None` disables it."""
    input_guard: InputGuardPolicy | None = field(default_factory=InputGuardPolicy)
    """What the model may read: user messages and tool results are checked for size and
    prompt injection before the model sees them (`flag`, `redact` or `block`; by default
    injections are flagged and inputs over 50,000 characters blocked). `None` disables it.
    Findings go to the audit log and the run record. Detection is a signal, not the defence:
    the permission matrix and approvals hold whatever the model does."""
    output_guard: OutputGuardPolicy | None = field(default_factory=OutputGuardPolicy)
    """What the user may get: PII and secrets in final and partial answers are redacted by
    default (`flag`, `redact` or `block`). `None` disables it."""
    admission: AdmissionPolicy | None = None
    """Caps on the runs a tenant and each user have running and queued at once, kept in the
    ledger (`keel.guards.admission`); over them a run ends as `stopped` / `overloaded` with a
    retry-after. `None`: no caps."""

    def __post_init__(self) -> None:
        for name in ("name", "version"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise UserError(f"Policy.{name} must be a non-empty string, got {value!r}.")
        rules = _items(self.rules, "rules", "Rule(action=..., tool=...)")
        for i, rule in enumerate(rules):
            if not isinstance(rule, Rule):
                raise UserError(
                    f"Policy.rules[{i}] must be a Rule(action=..., role=..., tool=..., "
                    f"resource=...), got {rule!r}."
                )
        object.__setattr__(self, "rules", rules)
        periods = _items(self.period_budgets, "period_budgets", "PeriodBudget(usd=...)")
        for i, budget in enumerate(periods):
            if not isinstance(budget, PeriodBudget):
                raise UserError(
                    f"Policy.period_budgets[{i}] must be a PeriodBudget(scope=..., period=..., "
                    f"usd=...), got {budget!r}."
                )
        object.__setattr__(self, "period_budgets", periods)
        limits = _items(self.rate_limits, "rate_limits", "RateLimit(rpm=...)")
        for i, limit in enumerate(limits):
            if not isinstance(limit, RateLimit):
                raise UserError(
                    f"Policy.rate_limits[{i}] must be a RateLimit(rpm=..., tpm=...), got {limit!r}."
                )
        scopes = [(limit.scope, limit.model) for limit in limits]
        if len(set(scopes)) != len(scopes):
            raise UserError(
                "Policy.rate_limits has two limits with the same scope and model glob; they would "
                "share buckets. Merge them into one RateLimit(rpm=..., tpm=...)."
            )
        object.__setattr__(self, "rate_limits", limits)
        for name, kind in (
            ("model_breaker", BreakerPolicy),
            ("tool_breaker", BreakerPolicy),
            ("input_guard", InputGuardPolicy),
            ("output_guard", OutputGuardPolicy),
            ("admission", AdmissionPolicy),
        ):
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise UserError(
                    f"Policy.{name} must be a {kind.__name__}(...) or None, got {value!r}."
                )

    @property
    def ledger_features(self) -> list[str]:
        """The parts of this policy whose state lives in the ledger (they need one)."""
        wanted = {
            "period_budgets": bool(self.period_budgets),
            "rate_limits": bool(self.rate_limits),
            "model_breaker": self.model_breaker is not None,
            "tool_breaker": self.tool_breaker is not None,
            "admission": self.admission is not None,
        }
        return [name for name, on in wanted.items() if on]

    @property
    def identity(self) -> str:
        """`name@version`, as bound into approval digests."""
        return f"{self.name}@{self.version}"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Policy:
        """Build a policy from plain data (as parsed from TOML, YAML or JSON)."""
        if not isinstance(data, Mapping):
            raise UserError(f"A policy must be a mapping of fields, got {type(data).__name__}.")
        known = {
            "name",
            "version",
            "budget",
            "rules",
            "loop",
            "period_budgets",
            "rate_limits",
            "model_breaker",
            "tool_breaker",
            "input_guard",
            "output_guard",
            "admission",
        }
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"Unknown policy field(s) {unknown}; the fields are {sorted(known)}.")
        kwargs: dict[str, Any] = {}
        for key in ("name", "version"):
            if key in data:
                if isinstance(data[key], int) and not isinstance(data[key], bool):
                    kwargs[key] = str(data[key])  # version = 3 is unambiguous
                    continue
                if not isinstance(data[key], str):
                    raise UserError(
                        f"Policy {key} must be a string, got {data[key]!r}: quote it in the file "
                        f'({key} = "{data[key]}"), so that e.g. 1.10 is not read as the number 1.1.'
                    )
                kwargs[key] = data[key]
        if "budget" in data:
            kwargs["budget"] = _build(Budget, data["budget"], "budget")
        if "loop" in data:
            kwargs["loop"] = (
                None if data["loop"] is None else _build(LoopPolicy, data["loop"], "loop")
            )
        guards: tuple[tuple[str, type[Any]], ...] = (
            ("model_breaker", BreakerPolicy),
            ("tool_breaker", BreakerPolicy),
            ("input_guard", InputGuardPolicy),
            ("output_guard", OutputGuardPolicy),
            ("admission", AdmissionPolicy),
        )
        for key, kind in guards:
            if key in data:
                raw = data[key]
                kwargs[key] = None if raw is None or raw is False else _build(kind, raw, key)
        for key, kind in (
            ("period_budgets", PeriodBudget),
            ("rate_limits", RateLimit),
            ("rules", Rule),
        ):
            if key in data:
                kwargs[key] = _build_list(kind, data[key], key)
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: str | Path) -> Policy:
        """Load a policy from a `.toml`, `.yaml` or `.yml` file (`~` is the home folder)."""
        p = Path(path).expanduser()
        data = load_data_file(p, "Policy file")
        try:
            return cls.from_dict(data)
        except UserError as exc:
            raise UserError(f"Policy file {str(p)!r}: {exc}") from exc


def _items(value: Any, name: str, example: str) -> tuple[Any, ...]:
    """`Policy.<name>` as a tuple; one item given alone (or a string, a mapping) is refused.

    `tuple(Rule(...))` raised a bare `TypeError`, and `tuple("...")` would split a string.
    """
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
        raise UserError(
            f"Policy.{name} must be a list or tuple, got {value!r}: write {name}=({example},)."
        )
    return tuple(value)


def _build_list(kind: type[Any], raw: Any, where: str) -> tuple[Any, ...]:
    if not isinstance(raw, Sequence) or isinstance(raw, str):
        raise UserError(f"Policy '{where}' must be a list of tables/mappings.")
    return tuple(_build(kind, item, f"{where}[{i}]") for i, item in enumerate(raw))


def _build(kind: type[Any], raw: Any, where: str) -> Any:
    if not isinstance(raw, Mapping):
        raise UserError(f"Policy '{where}' must be a table/mapping, got {raw!r}.")
    names = {f.name for f in fields(kind)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise UserError(
            f"Unknown field(s) {unknown} in policy '{where}'; allowed: {sorted(names)}."
        )
    try:
        return kind(**raw)
    except UserError as exc:
        raise UserError(f"In policy '{where}': {exc}") from exc
    except TypeError as exc:
        raise UserError(f"In policy '{where}': {exc}") from exc
