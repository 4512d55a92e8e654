"""The tool gate: the seam where a permission decision (allow / ask / deny) is made per call.

`build_agent(gate=...)` takes any `Gate`. The default, `approval_gate`, asks a human for tools
whose `ToolSpec.requires_approval` is set and allows the rest; the permission matrix of the
guards issue is another `Gate`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from keel.state import RunContext
from keel.tools.registry import RegisteredTool

__all__ = ["Gate", "GateDecision", "approval_gate"]


@dataclass(frozen=True, kw_only=True, slots=True)
class GateDecision:
    """What may happen to one tool call."""

    action: Literal["allow", "ask", "deny"]
    """`allow` runs it, `ask` needs a human's approval first, `deny` never runs it."""
    reason: str = ""
    """Why, in words a reviewer (for `ask`) or the model (for `deny`) can act on."""
    rule: str | None = None
    """The rule that matched, for audit records and the reviewer."""

    @classmethod
    def allow(cls, reason: str = "") -> GateDecision:
        """Run the call."""
        return cls(action="allow", reason=reason)

    @classmethod
    def ask(cls, reason: str, rule: str | None = None) -> GateDecision:
        """Run the call only with a human's approval of these exact arguments."""
        return cls(action="ask", reason=reason, rule=rule)

    @classmethod
    def deny(cls, reason: str, rule: str | None = None) -> GateDecision:
        """Never run the call; the model is told why."""
        return cls(action="deny", reason=reason, rule=rule)


class Gate(Protocol):
    """Decides, for one tool call of a known tool, whether it may run."""

    def __call__(
        self, tool: RegisteredTool, args: Mapping[str, Any], context: RunContext
    ) -> GateDecision:
        """Return the decision for calling `tool` with `args` on behalf of `context`.

        `args` are the model's, as it spelled them (`" ADMIN"`, `"05"`); the tool may read
        them otherwise (`PermissionMatrix` hands its resource extractor the arguments as the
        tool reads them). A gate of your own that decides on an argument's value sees it as
        spelled: normalize it as the tool does, or decide in a resource extractor.
        """
        ...


def approval_gate(
    tool: RegisteredTool, args: Mapping[str, Any], context: RunContext
) -> GateDecision:
    """The default gate: ask for tools that require approval, allow the others."""
    if tool.spec.requires_approval:
        return GateDecision.ask(
            f"{tool.name} is a {tool.spec.risk} tool and requires approval",
            rule=f"ToolSpec(requires_approval=True) on {tool.name}",
        )
    return GateDecision.allow()
