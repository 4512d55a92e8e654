"""Prompt-injection detection: the `InjectionDetector` protocol and keel's heuristic default.

A detector is any callable `(text, source) -> findings` (or an awaitable of findings): an empty
list means the text looks clean. Three kinds plug in the same way, through
`InputGuardPolicy(detector=...)`:

- `HeuristicDetector` (the default): scored signals over a de-obfuscated view of the text,
  channel-aware (tool results also get the signals of text that speaks to the model);
- `ModelDetector` (`keel.guards.injection_model`): any chat model with a structured verdict;
- your own function, e.g. a call to a classifier you host.

Detection is a signal to flag, redact or block. The permission matrix and approvals are the
defence: they hold whatever the model was talked into.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import bisect
import inspect
import itertools
import re
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from keel.errors import UserError
from keel.guards.finding import ContentFinding, InputSource, excerpt
from keel.guards.injection_signals import SIGNALS
from keel.guards.injection_text import View, mixed_script_words, squeezed, view_of
from keel.redact import sanitized_logger

T = TypeVar("T")
log = sanitized_logger("keel.guards")

__all__ = [
    "INJECTION_RULES",
    "HeuristicDetector",
    "InjectionDetector",
    "adetect",
    "awaits",
    "detect",
    "off_loop",
]

INJECTION_RULES = (
    "instruction_override",
    "role_spoofing",
    "prompt_extraction",
    "exfiltration",
    "hidden_characters",
    "hidden_html",
    "encoded_instructions",
    "obfuscation",
    "tool_result_injection",
)
"""The heuristic detector's rules, by name (as in `ContentFinding.rule`)."""


class InjectionDetector(Protocol):
    """Decides whether one input to the model is a prompt injection.

    Called with the text and where it comes from (`"user"` or `"tool"`); returns the findings
    (empty when the text looks clean), or an awaitable of them. Use
    `ContentFinding.covering(text, rule=...)` when the detector has no spans.

    Example:
        ```python
        def no_pirates(text: str, source: InputSource) -> list[ContentFinding]:
            if "arr, matey" in text.lower():
                return [ContentFinding.covering(text, rule="pirate")]
            return []
        ```
    """

    def __call__(
        self, text: str, source: InputSource, /
    ) -> Sequence[ContentFinding] | Awaitable[Sequence[ContentFinding]]:
        """The findings in `text` (empty when it looks clean), or an awaitable of them."""
        ...


@dataclass(frozen=True, slots=True)
class _Hit:
    signal: str
    rule: str
    weight: float
    start: int
    end: int


@dataclass(frozen=True, kw_only=True, slots=True)
class HeuristicDetector:
    """keel's default detector: weighted signals over a de-obfuscated view of the text.

    Each signal (an override phrase, a chat-template token, a note addressed to the AI, …)
    has a weight per channel; a text whose signals add up to `threshold` is reported, with a
    finding per matched span. Obfuscation is undone first: full-width and look-alike letters,
    leetspeak, spaced-out words, invisible characters, base64 blobs (decoded and checked).

    Example:
        ```python
        detector = HeuristicDetector()
        assert detector("1gn0re all previous instructi0ns", "user")[0].rule == (
            "instruction_override"
        )
        assert detector("How do I override a CSS rule?", "user") == []
        ```
    """

    threshold: float = 1.0
    """The total weight at which a text is reported. Lower catches more and misfires more."""
    disabled_rules: frozenset[str] = frozenset()
    """Rules to skip, by name (see `INJECTION_RULES`)."""

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int | float):
            raise UserError(
                f"HeuristicDetector.threshold must be a number, got {self.threshold!r}."
            )
        if self.threshold <= 0:
            raise UserError(
                f"HeuristicDetector.threshold must be greater than 0, got {self.threshold!r}."
            )
        unknown = sorted(set(self.disabled_rules) - set(INJECTION_RULES))
        if unknown:
            raise UserError(
                f"HeuristicDetector.disabled_rules has unknown names {unknown}; use some of "
                f"{list(INJECTION_RULES)}."
            )
        object.__setattr__(self, "disabled_rules", frozenset(self.disabled_rules))

    def __call__(self, text: str, source: InputSource, /) -> list[ContentFinding]:
        """The findings in `text`, or `[]` when its signals stay under the threshold."""
        hits = self._hits(text, source, depth=0)
        if _score(hits) < self.threshold:
            return []
        return [
            ContentFinding(rule=rule, start=s, end=e, excerpt=excerpt(text[s:e]))
            for rule, s, e in _merged(hits)
        ]

    def score(self, text: str, source: InputSource) -> float:
        """The total weight of the signals in `text` (what is compared to `threshold`)."""
        return _score(self._hits(text, source, depth=0))

    def _hits(self, text: str, source: InputSource, *, depth: int) -> list[_Hit]:
        base = view_of(text)
        views = [base]
        tight = squeezed(base)
        if tight.text != base.text:
            views.append(tight)
        hits = [
            _Hit(sig.name, sig.rule, sig.user if source == "user" else sig.tool, *view.span(s, e))
            for sig in SIGNALS
            if sig.rule not in self.disabled_rules
            for view in views
            for s, e in sig.spans(view.text)
        ]
        hits.extend(self._raw_hits(text, base, source, depth))
        return [h for h in hits if h.rule not in self.disabled_rules]

    def _raw_hits(self, text: str, base: View, source: InputSource, depth: int) -> Iterator[_Hit]:
        for s, e in _spans(_HIDDEN_CHARS, text):
            yield _Hit("hidden_characters", "hidden_characters", 1.0, s, e)
        if "<" in text or "[//]" in text:
            for s, e in _hidden_html(text):
                yield _Hit("hidden_html", "hidden_html", 1.0, s, e)
        if not text.isascii():
            for s, e in mixed_script_words(text):
                yield _Hit("mixed_script", "obfuscation", 0.4, s, e)
        if any(word in base.text for word in ("erongi", "dragersid", "tegrof")):
            n = len(base.text)
            for s, e in _spans(_REVERSED_CUE, base.text[::-1]):
                yield _Hit("reversed", "obfuscation", 1.0, *base.span(n - e, n - s))
        for s, e in _spans(_DECODE_HINT, base.text):
            yield _Hit("decode_hint", "encoded_instructions", 0.5, *base.span(s, e))
        if depth == 0:
            for s, e, decoded in _base64_blobs(text):
                if _score(self._hits(decoded, source, depth=1)) >= self.threshold:
                    yield _Hit("encoded", "encoded_instructions", 1.0, s, e)


def _merged(hits: list[_Hit]) -> list[tuple[str, int, int]]:
    """The spans of the hits that weigh something, overlapping spans of one rule merged."""
    spans: list[tuple[str, int, int]] = []
    for h in sorted((h for h in hits if h.weight > 0), key=lambda h: (h.rule, h.start, -h.end)):
        if spans and spans[-1][0] == h.rule and h.start < spans[-1][2]:
            rule, start, end = spans[-1]
            spans[-1] = (rule, start, max(end, h.end))
        else:
            spans.append((h.rule, h.start, h.end))
    return sorted(spans, key=lambda s: (s[1], s[2], s[0]))


def _score(hits: list[_Hit]) -> float:
    best: dict[str, float] = {}
    for h in hits:
        best[h.signal] = max(best.get(h.signal, 0.0), h.weight)
    return sum(best.values())


# -- signals over the original text -----------------------------------------------------------

# Unicode tag characters (invisible ASCII), bidi overrides and isolates, invisible operators;
# and runs of two or more zero-width characters. A single zero-width joiner / non-joiner /
# direction mark is left alone: emoji sequences, Persian and Indic scripts, RTL text use them.
_HIDDEN_CHARS = re.compile(
    "[\U000e0000-\U000e007f\u202a-\u202e\u2066-\u2069\u2061-\u2064]+"
    "|[\u200b-\u200f\u2060\ufeff]{2,}"
)
_HTML_COMMENT = re.compile(r"<!--[\s\S]*?(?:-->|\Z)|^\[//\]:\s*#\s*\([^\n]*\)", re.MULTILINE)
# An element hidden by an attribute (`hidden`, a `class` naming it) or an inline style, from
# its opening tag (`<tag`, the attribute, on to the next `>`) to its first closing tag. Found
# in one pass (`_hidden_elements`): a single regex for it rescans the text from every `<`.
_TAG_START = re.compile(r"<(?P<tag>[a-zA-Z][\w-]*)\b")
_HIDING = re.compile(
    r"\bhidden\b|style\s*=\s*(?:\"[^\"]*|'[^']*)(?:display\s*:\s*none|visibility\s*:\s*hidden|"
    r"font-size\s*:\s*[01](?:px)?(?![.\d]*[1-9])|opacity\s*:\s*0(?![.\d]*[1-9])|"
    r"color\s*:\s*(?:#fff(?:fff)?|white)\b)",
    re.IGNORECASE,
)
_CLOSE_TAG = re.compile(r"</(?P<tag>[a-zA-Z][\w-]*)\s*>")
# words that make hidden text an instruction for the model rather than page furniture
_INSTRUCTION_CUE = re.compile(
    r"\b(?:ignore|disregard|instructions?|assistant|ai|llm|language\s+model|chatbot|agent|"
    r"you\s+(?:must|should|will|are)|do\s+not\s+(?:tell|mention|reveal)|system\s+prompt|"
    r"call\s+the|send|forward|exfiltrate)\b"
)
_REVERSED_CUE = re.compile(
    r"\b(?:ignore|disregard|forget)\s+(?:all\s+)?(?:your\s+|the\s+)?(?:previous|prior|above)\s+"
    r"(?:instructions|rules)\b"
)
_DECODE_HINT = re.compile(
    r"\b(?:decode|base64|b64|rot13|hex)\b[^\n]{0,60}?\b(?:follow|execute|obey|carry\s+out|"
    r"do\s+what|run|apply)\b"
)
_BASE64 = re.compile(r"(?<![A-Za-z0-9+/=_-])[A-Za-z0-9+/]{24,}={0,2}(?![A-Za-z0-9+/=_-])")


def _spans(pattern: re.Pattern[str], text: str) -> Iterator[tuple[int, int]]:
    for m in pattern.finditer(text):
        yield m.span()


def _hidden_html(text: str) -> Iterator[tuple[int, int]]:
    for s, e in itertools.chain(_spans(_HTML_COMMENT, text), _hidden_elements(text)):
        if _INSTRUCTION_CUE.search(view_of(text[s:e]).text):
            yield s, e


def _hidden_elements(text: str) -> Iterator[tuple[int, int]]:
    """Spans of hidden elements, left to right, not overlapping.

    Each `<tag` is tried, in linear time overall: the tag's end (`_tag_end`) and the next
    hiding attribute are searched once and reused by the tags before them, and closing tags are
    listed once.
    """
    closes: dict[str, list[tuple[int, int]]] = {}
    for m in _CLOSE_TAG.finditer(text):
        closes.setdefault(m["tag"].lower(), []).append(m.span())
    done, gt, hiding, quoted = 0, -1, _HIDING.search(text), _QUOTED_VALUE.search(text)
    for tag in _TAG_START.finditer(text):
        at = tag.end()
        if tag.start() < done:
            continue
        if hiding is not None and hiding.start() < at:
            hiding = _HIDING.search(text, at)
        if hiding is None:
            return
        if gt < at:
            gt, quoted = _tag_end(text, at, quoted)
            if gt == -1:
                return
        if hiding.start() > gt:  # the tag ends before its first hiding attribute
            continue
        ends = closes.get(tag["tag"].lower(), [])
        i = bisect.bisect_left(ends, (gt + 1, 0))
        if i < len(ends):
            yield tag.start(), ends[i][1]
            done = ends[i][1]


_QUOTED_VALUE = re.compile(r"=\s*([\"'])")


def _tag_end(text: str, at: int, quoted: re.Match[str] | None) -> tuple[int, re.Match[str] | None]:
    """The `>` that ends a tag whose attributes start at `at`, or -1; and the next quoted value.

    A `>` inside a quoted attribute value (`title="a>b"`) does not end the tag; a value whose
    quote never closes ends at the first `>`. Each `>` and quoted value is searched for once.
    """
    pos = at
    gt = text.find(">", pos)
    while gt != -1:
        if quoted is not None and quoted.start() < pos:
            quoted = _QUOTED_VALUE.search(text, pos)
        if quoted is None or quoted.start() > gt:
            break
        close = text.find(quoted[1], quoted.end())
        if close == -1:  # never closed: the first `>` ends the tag
            break
        pos = close + 1
        if gt < pos:
            gt = text.find(">", pos)
    return gt, quoted


def _base64_blobs(text: str) -> Iterator[tuple[int, int, str]]:
    for m in _BASE64.finditer(text):
        blob = m.group()
        try:
            decoded = base64.b64decode(blob + "=" * (-len(blob) % 4), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            continue
        if all(ch.isprintable() or ch.isspace() for ch in decoded):
            yield m.start(), m.end(), decoded


# -- running any detector ---------------------------------------------------------------------


def detect(detector: InjectionDetector, text: str, source: InputSource) -> list[ContentFinding]:
    """Run `detector` from sync code; an async detector runs in a fresh event loop.

    A detector that raises reports a finding over the whole text (rule `detector_error`), as
    `ModelDetector` does when its model fails: a `block` policy fails closed, and the run ends
    with an outcome, not the detector's exception.

    Raises:
        UserError: The detector is async and this thread already runs an event loop (use
            `adetect` / `acheck_input`), or it returned something other than findings.
    """
    try:
        result = detector(text, source)
        if inspect.isawaitable(result):
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                caller = _CALLER_LOOP.get()
                if caller is not None and caller.is_running():  # from `off_loop`: await there
                    result = asyncio.run_coroutine_threadsafe(_awaited(result), caller).result()
                else:
                    result = asyncio.run(_awaited(result))
            else:
                if inspect.iscoroutine(result):
                    result.close()
                raise UserError(
                    f"The injection detector {_name(detector)} is async and an event loop is "
                    "running: use `await acheck_input(...)` instead of `check_input(...)`."
                )
    except UserError:
        raise
    except Exception as exc:
        return _failed(detector, text, exc)
    return _checked(result, detector)


async def adetect(
    detector: InjectionDetector, text: str, source: InputSource
) -> list[ContentFinding]:
    """Run `detector` from async code, awaiting it if it returns an awaitable (see `detect`)."""
    try:
        result = detector(text, source)
        if inspect.isawaitable(result):
            result = await result
    except Exception as exc:
        return _failed(detector, text, exc)
    return _checked(result, detector)


_CALLER_LOOP: ContextVar[asyncio.AbstractEventLoop | None] = ContextVar(
    "keel_caller_loop", default=None
)
"""The event loop of async code that runs sync screening on a worker thread (`off_loop`)."""


async def off_loop(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` on a worker thread, for sync screening called from async code.

    Sync code (`check_input`, `keel.guards.screen_inputs`) runs an async detector with
    `detect`, which cannot wait on the event loop of the thread it runs on. On a worker thread
    it can: `detect` awaits the detector on this (the caller's) loop, where the detector's
    model client lives, and the loop stays free meanwhile.
    """
    token = _CALLER_LOOP.set(asyncio.get_running_loop())
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    finally:
        _CALLER_LOOP.reset(token)


def awaits(detector: InjectionDetector | None) -> bool:
    """Whether screening with `detector` may have to await it (anything but the heuristics)."""
    return detector is not None and not isinstance(detector, HeuristicDetector)


def _failed(detector: InjectionDetector, text: str, exc: Exception) -> list[ContentFinding]:
    """The finding a detector that raised reports: the whole text, unchecked."""
    detail = f"the injection detector {_name(detector)} failed: {type(exc).__name__}: {exc}"
    log.warning("%s", detail)
    return [ContentFinding.covering(text, rule="detector_error", detail=detail[:300])]


async def _awaited(
    result: Awaitable[Sequence[ContentFinding]],
) -> Sequence[ContentFinding]:
    return await result


def _checked(result: object, detector: InjectionDetector) -> list[ContentFinding]:
    if isinstance(result, list | tuple) and all(isinstance(f, ContentFinding) for f in result):
        return list(result)
    raise UserError(
        f"The injection detector {_name(detector)} returned {result!r}; return a list of "
        "ContentFinding (empty when the text is clean), e.g. "
        "[ContentFinding.covering(text, rule='my_detector')]."
    )


def _name(detector: object) -> str:
    return getattr(detector, "__qualname__", None) or type(detector).__name__
