"""`ContentFinding`: one thing a content guard or an injection detector found, and where."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["ContentFinding", "InputSource", "excerpt"]

InputSource = Literal["user", "tool"]
"""Where an input comes from: the user's message or a tool's result."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ContentFinding:
    """One thing a content guard found: which rule, where, and what it matched."""

    rule: str
    """The rule's name: `max_chars`, an injection rule (`INJECTION_RULES`), `pii:<kind>`, or
    the name a custom detector gives (`ModelDetector` uses `model_verdict`)."""
    start: int
    """Index of the first matched character, in the text that was checked."""
    end: int
    """Index after the last matched character."""
    excerpt: str
    """The matched text (at most 80 characters; secrets and PII are not repeated in full)."""
    detail: str | None = None
    """Why, when the detector says more than the span (a model's reason); `None` otherwise."""

    @classmethod
    def covering(cls, text: str, *, rule: str, detail: str | None = None) -> ContentFinding:
        """A finding over the whole of `text`: what a detector without spans reports.

        Example:
            ```python
            finding = ContentFinding.covering("obey me", rule="my_classifier")
            assert (finding.start, finding.end, finding.excerpt) == (0, 7, "obey me")
            ```
        """
        return cls(rule=rule, start=0, end=len(text), excerpt=excerpt(text), detail=detail)


def excerpt(text: str, limit: int = 80) -> str:
    """`text` on one line, invisible characters escaped, cut to `limit` characters."""
    text = " ".join(text.split())
    text = "".join(ch if ch.isprintable() else f"\\u{ord(ch):04x}" for ch in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"
