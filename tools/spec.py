"""The tool contract: what keel must know about a tool beyond its name and schema."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from keel.errors import UserError
from keel.pricing import finite_number, is_count
from keel.tools._injected import Injections, injections

if TYPE_CHECKING:
    from langchain_core.tools import BaseTool

__all__ = ["Reconciler", "RegisteredTool", "ResourceExtractor", "Risk", "ToolSpec"]

Risk = Literal["read", "write", "destructive"]
ResourceExtractor = Callable[[Mapping[str, Any]], str]
Reconciler = Callable[[Mapping[str, Any]], Any]
"""`reconcile(args) -> result | None` (or a coroutine): did an interrupted call take effect?"""
_RISKS: tuple[Risk, ...] = ("read", "write", "destructive")


MAX_TOOL_TIMEOUT = 86_400
"""The longest `ToolSpec.timeout`, a day (as a model call's `attempt_timeout`)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ToolSpec:
    """What a tool does to the world, and how keel must run it.

    Example:
        ```python
        ToolSpec(risk="destructive", side_effects=True, timeout=10,
                 resource=lambda args: f"orders/{args['order_id']}")
        ```
    """

    version: str = "1"
    """The tool's version; it is part of every audit record of the tool's calls and approvals
    (`AuditRecord.tool_version`), of every approval digest (a new version asks again), of the
    idempotency ledger's call digest, and of the tool's LangChain metadata."""

    risk: Risk = "read"
    """`read` only looks, `write` changes something reversible, `destructive` cannot be undone."""

    side_effects: bool | None = None
    """Whether a call changes the outside world. `None` means: `True` unless `risk` is `read`.
    Tools with side effects are never retried."""

    timeout: float | None = 30.0
    """Seconds one call may take before it is answered with a timeout, at most a day. `None`
    disables it."""

    retries: int = 2
    """Extra attempts, with exponential backoff, for a call that raised. Only for tools without
    side effects; a `ToolException` (the tool's own message for the model) is never retried."""

    retry_wait: float = 0.2
    """Seconds before the first retry; doubled for each further retry (at most 5 s)."""

    requires_approval: bool | None = None
    """Whether a human must approve each call. `None` means: only `destructive` tools."""

    resource: ResourceExtractor | None = None
    """What the call touches, from its arguments (e.g. `orders/42`); `*` when not given.

    The permission rules call it with the arguments as the tool reads them (JSON-shaped:
    coerced, defaults filled, the tool's `args_schema` validators applied), not as the model
    spelled them: `"05"` for an `int` order id is `5`."""

    idempotent: bool = False
    """Whether repeating a call is harmless (e.g. "set status to shipped"). A side-effecting
    call that started but never finished (the process died) is then run again on resume;
    otherwise its outcome is unknown and a human is asked "did this happen?"."""

    reconcile: Reconciler | None = None
    """Checks the outside world for a call that started but never finished: returns the call's
    result when it took effect (recorded as if the call had completed), or `None` when it did
    not (the call runs again). Sync or async; an exception leaves the outcome unknown."""

    def __post_init__(self) -> None:
        if self.risk not in _RISKS:
            raise UserError(f"ToolSpec.risk must be one of {list(_RISKS)}, got {self.risk!r}.")
        # NaN passes every comparison's `not`, infinity every bound: a NaN or infinite count of
        # retries retried a failing tool forever; a timeout past a day (infinity, 1e12) failed
        # every sync call (a thread's wait refuses it: "timestamp out of range")
        timeout = self.timeout
        if timeout is not None and not 0 < (finite_number(timeout) or 0) <= MAX_TOOL_TIMEOUT:
            raise UserError(
                f"ToolSpec.timeout must be a number of seconds greater than 0 and at most "
                f"{MAX_TOOL_TIMEOUT:,} (a day), or None to wait as long as the tool takes; "
                f"got {timeout!r}."
            )
        if not is_count(self.retries) or self.retries < 0:
            raise UserError(
                f"ToolSpec.retries is a count: a whole number, 0 or more; got {self.retries!r}."
            )
        if (wait := finite_number(self.retry_wait)) is None or wait < 0:
            raise UserError(
                f"ToolSpec.retry_wait must be a finite number of seconds, 0 or more; "
                f"got {self.retry_wait!r}."
            )
        if not isinstance(self.version, str) or not self.version:
            raise UserError(f"ToolSpec.version must be a non-empty string, got {self.version!r}.")
        if self.reconcile is not None and not callable(self.reconcile):
            raise UserError(
                f"ToolSpec.reconcile must be a function (args) -> result | None, got "
                f"{self.reconcile!r}."
            )
        if self.side_effects is None:
            object.__setattr__(self, "side_effects", self.risk != "read")
        if self.requires_approval is None:
            object.__setattr__(self, "requires_approval", self.risk == "destructive")

    @property
    def attempts(self) -> int:
        """How many times a failing call may run in all."""
        return 1 if self.side_effects else 1 + self.retries

    def resource_of(self, args: Mapping[str, Any]) -> str:
        """The resource a call with `args` touches; `*` when the tool has no extractor."""
        if self.resource is None:
            return "*"
        return str(self.resource(args))


@dataclass(frozen=True, slots=True)
class RegisteredTool:
    """A tool and its spec, as the registry lists them."""

    tool: BaseTool
    spec: ToolSpec
    declared: bool = True
    """Whether `spec` was declared (keel's `tool(...)`, or a spec given to `ToolRegistry.add`)
    rather than defaulted (a plain function, a LangChain tool): a defaulted spec says `read`
    without anyone having said so."""

    @property
    def name(self) -> str:
        """The tool's name, as the model calls it."""
        return self.tool.name

    @property
    def injected(self) -> Injections:
        """The arguments the agent injects (state, store, runtime), never the model's.

        The same as LangGraph's `ToolNode` injects (`keel.tools._injected`).
        """
        return injections(self.tool)

    @property
    def read_only(self) -> bool:
        """Whether the tool is declared to only look: `risk="read"`, no side effects, declared.

        A replay or a shadow run lets only such a tool run for real when it has no recorded
        result (`keel.evals`); every other call is answered without running the tool.
        """
        return self.declared and self.spec.risk == "read" and not self.spec.side_effects
