"""Lessons: what a finished run teaches (asked, outcome, why, tools, errors), not a transcript."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from langchain_core.messages import AIMessage, AnyMessage, ToolMessage

from keel.state import AgentState, task_start

__all__ = ["Lesson", "extract_lesson"]

_CLIP = 300


@dataclass(frozen=True, kw_only=True, slots=True)
class Lesson:
    """What one run taught."""

    asked: str
    """The user's request (the last human message)."""
    status: str
    """The run's outcome status: `success`, `stopped`, `error`."""
    reason: str
    """Why it ended: `terminated_reason`, plus the detail when there is one."""
    tools_used: tuple[str, ...]
    """Tools called, in first-use order."""
    errors: tuple[str, ...]
    """Tool failures the run met (tool name and message)."""
    answer: str
    """The final answer, clipped."""

    @property
    def worked(self) -> bool:
        """Whether the run reached its goal."""
        return self.status == "success"

    def text(self) -> str:
        """One paragraph a later run can read (and that is embedded for search)."""
        tools = ", ".join(self.tools_used) or "no tools"
        parts = [
            f"Asked: {self.asked}",
            f"Outcome: {self.status} ({self.reason}) using {tools}.",
        ]
        if self.errors:
            parts.append("Failed along the way: " + "; ".join(self.errors) + ".")
        verdict = "worked" if self.worked else "did not work"
        parts.append(f"Its answer then ({verdict}): {self.answer or '(no answer)'}")
        return " ".join(parts)

    def value(self) -> dict[str, Any]:
        """The store value: `text` (indexed) plus the fields, for filters."""
        out = asdict(self)
        out["tools_used"] = list(self.tools_used)
        out["errors"] = list(self.errors)
        return {"text": self.text(), "kind": "lesson", **out}


def extract_lesson(state: AgentState) -> Lesson | None:
    """The lesson of a finished run; `None` while it runs, is paused, or asked nothing."""
    outcome = state.get("outcome")
    thread: Sequence[AnyMessage] = state.get("messages") or []
    start = task_start(thread)  # this run's task: earlier tasks have their own lessons
    asked = thread[start].text if start >= 0 else ""
    if outcome is None or outcome["status"] == "interrupted" or not asked:
        return None
    messages = thread[start:]
    tools: list[str] = []
    for m in messages:
        if isinstance(m, AIMessage):
            names = (_clip(tc["name"], 80) for tc in m.tool_calls)  # a model's, made up or not
            tools.extend(n for n in names if n not in tools)
    errors = [
        f"{m.name or 'tool'}: {_clip(m.text, 120)}"
        for m in messages
        if isinstance(m, ToolMessage) and m.status == "error"
    ]
    answer = next((m.text for m in reversed(messages) if isinstance(m, AIMessage) and m.text), "")
    reason: str = outcome["terminated_reason"]
    if outcome.get("detail"):
        reason = f"{reason}: {_clip(outcome['detail'], 120)}"
    return Lesson(
        asked=_clip(asked, _CLIP),
        status=outcome["status"],
        reason=reason,
        tools_used=tuple(tools),
        errors=tuple(errors),
        answer=_clip(answer, _CLIP),
    )


def _clip(text: str, n: int) -> str:
    """One line of at most `n` characters, as the store can keep it (a lone surrogate is `?`)."""
    text = " ".join(text.encode("utf-8", "replace").decode().split())
    return text if len(text) <= n else text[: n - 1] + "…"
