"""The permission matrix: ordered `(role, tool glob, resource glob) → allow | deny | ask` rules.

First match wins; a call no rule matches is denied (default deny). Roles come from the run's
`RunContext` (never from the model or tool arguments); the resource from the tool's resource
extractor, which gets the call's arguments as the tool reads them. A tool whose `ToolSpec`
requires approval is asked about even when a rule allows it: the stricter of the two wins.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from keel.errors import UserError
from keel.guards.gate import GateDecision
from keel.guards.policy import Policy, Rule
from keel.redact import sanitized_logger
from keel.state import RunContext
from keel.tools._args import as_called
from keel.tools.registry import RegisteredTool

__all__ = ["PermissionMatrix"]

log = sanitized_logger("keel.guards")


@dataclass(frozen=True, slots=True)
class PermissionMatrix:
    """A `Gate` that decides by ordered rules with default deny.

    Example:
        ```python
        matrix = PermissionMatrix.of(
            Rule(role="support", tool="lookup_*", action="allow"),
            Rule(role="support", tool="issue_refund", resource="orders/*", action="ask"),
        )
        agent = build_agent(model, tools, gate=matrix)
        ```
    """

    rules: tuple[Rule, ...]

    @classmethod
    def of(cls, *rules: Rule) -> PermissionMatrix:
        """A matrix of these rules, in order."""
        return cls(tuple(rules))

    @classmethod
    def from_policy(cls, policy: Policy) -> PermissionMatrix:
        """The matrix of a policy's rules."""
        return cls(policy.rules)

    def check_tools(self, names: Sequence[str], *, policy: str = "the policy") -> None:
        """Fail on a rule naming a tool that is not in `names`; log a glob that matches none.

        A misspelt name in a `deny` rule would let a later, broader `allow` through, so it is an
        error when the agent is built, not a silent no-op at the first request.
        """
        for rule in self.rules:
            if rule.tool == "*" or any(fnmatchcase(n, rule.tool) for n in names):
                continue
            if any(c in rule.tool for c in "*?["):
                log.warning(
                    "%s: the rule %s matches none of the agent's tools (%s).",
                    policy,
                    rule.describe(),
                    ", ".join(names) or "none",
                )
                continue
            raise UserError(
                f"{policy} has a rule for tool {rule.tool!r}, which the agent does not have "
                f"(its tools: {', '.join(names) or 'none'}). Fix the name, add the tool, or give "
                "this agent a policy of its own."
            )

    def match(self, roles: Sequence[str], tool: str, resource: str) -> Rule | None:
        """The first rule matching any of `roles`, `tool` and `resource`, or None."""
        for rule in self.rules:
            if (
                (rule.role == "*" or rule.role in roles)
                and fnmatchcase(tool, rule.tool)
                and fnmatchcase(resource, rule.resource)
            ):
                return rule
        return None

    def __call__(
        self, tool: RegisteredTool, args: Mapping[str, Any], context: RunContext
    ) -> GateDecision:
        """Decide one call of `tool` with `args` for the run's roles.

        The resource is read from the arguments as the tool reads them (`as_called`): `" ADMIN"`
        is `admin` to a tool whose schema strips and lowercases it, and `"05"` is `5` to an
        `int`, so no spelling the tool runs alike escapes a rule.
        """
        try:
            read = args if tool.spec.resource is None else as_called(tool, dict(args))
            resource = tool.spec.resource_of(read)
        except Exception as exc:  # a broken extractor must not open the gate
            return GateDecision.deny(
                f"cannot tell what {tool.name} would touch ({type(exc).__name__}: {exc})",
                rule="resource extractor failed",
            )
        rule = self.match(context.roles, tool.name, resource)
        if rule is None:
            return GateDecision.deny(
                f"no rule allows {tool.name} on {resource} for roles "
                f"{', '.join(context.roles) or '(none)'}; keel denies by default",
                rule="default deny",
            )
        why = rule.reason or f"{tool.name} on {resource}"
        if rule.action == "deny":
            return GateDecision.deny(why, rule=rule.describe())
        if rule.action == "ask" or tool.spec.requires_approval:
            reason = why if rule.action == "ask" else f"{tool.name} is {tool.spec.risk}"
            return GateDecision.ask(f"{reason}; a human must approve", rule=rule.describe())
        return GateDecision.allow(rule.describe())
