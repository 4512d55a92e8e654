"""Which version of an agent served a run: model, system prompt, tools, policy, and a label.

`build_agent` derives an `AgentVersion` from what it was built with and stamps it on every run
record, audit record and trace: the model's name, a hash of the system prompt, each tool's
`ToolSpec.version`, the policy's `name@version`, and the caller's label (`version="v2"`, or the
server config's). `AgentVersion.id` is the label when there is one, else a short digest of the
rest, so two builds that differ in any of them report as two versions (`keel report --by
version`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from keel.errors import UserError

__all__ = ["AgentVersion", "prompt_hash"]


def prompt_hash(system_prompt: str | None) -> str:
    """The first 12 hex digits of the SHA-256 of the system prompt (`"none"` without one)."""
    if system_prompt is None:
        return "none"
    return hashlib.sha256(system_prompt.encode("utf-8")).hexdigest()[:12]


@dataclass(frozen=True, kw_only=True, slots=True)
class AgentVersion:
    """What an agent was built from, as its records and traces name it.

    Example:
        ```python
        AgentVersion(model="gpt-4o-mini", prompt_hash=prompt_hash("Be brief."), label="v2").id
        ```
    """

    model: str | None = None
    """The chat model's name (`gpt-4o-mini`)."""
    prompt_hash: str = "none"
    """`keel.versions.prompt_hash` of the system prompt."""
    tool_versions: Mapping[str, str] = field(default_factory=dict)
    """Each tool's `ToolSpec.version`, by tool name."""
    policy: str | None = None
    """The policy's `name@version`."""
    label: str | None = None
    """The caller's name for this version (`build_agent(version="v2")`), if any."""

    def __post_init__(self) -> None:
        if self.label is not None and (not isinstance(self.label, str) or not self.label.strip()):
            raise UserError(
                f"An agent version label must be a non-empty string (version='v2'), got "
                f"{self.label!r}."
            )
        if self.label is not None and self.label.strip().lower() == "unversioned":
            raise UserError(
                "The agent version label 'unversioned' is keel report's group for records "
                "written before versions existed: pick another (version='v2')."
            )

    @property
    def digest(self) -> str:
        """A short digest of model, prompt hash, tool versions and policy (not the label)."""
        parts = [self.model, self.prompt_hash, sorted(self.tool_versions.items()), self.policy]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:10]

    @property
    def id(self) -> str:
        """The label when given, else `auto-<digest>`: what `keel report --by version` groups by."""
        return self.label if self.label is not None else f"auto-{self.digest}"

    def fields(self) -> dict[str, Any]:
        """The version as the columns of run and audit records (`version`, `model`, ...)."""
        return {"version": self.id, "model": self.model, "prompt_hash": self.prompt_hash}

    def metadata(self) -> dict[str, Any]:
        """The version as trace metadata."""
        return {
            "version": self.id,
            "model": self.model,
            "prompt_hash": self.prompt_hash,
            "tool_versions": dict(self.tool_versions),
            "policy": self.policy,
        }
