"""Content guards: what may reach the model (input guard) and what may leave it (output guard).

Both are pure decision functions over text, with no LangGraph imports, so the graph's nodes and
LangChain middleware share them:

- `check_input(text, policy, source="user" | "tool")`: a size limit and prompt-injection
  heuristics (instruction override, role spoofing, hidden instructions, tool-result injection);
- `check_output(text, policy)`: PII and secrets in the final answer (see `keel.redact`).

Each returns a `ContentVerdict`: the action taken (`allow`, `flag`, `redact`, `block`), the
findings with their rule names and spans, the text to use, and for a block the message to show.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

from keel.errors import UserError
from keel.redact import PII_KINDS, PiiKind, PiiMatch, find_pii

__all__ = [
    "INJECTION_RULES",
    "ContentFinding",
    "ContentVerdict",
    "GuardAction",
    "InputGuardPolicy",
    "InputSource",
    "OutputGuardPolicy",
    "check_input",
    "check_output",
]

GuardAction = Literal["flag", "redact", "block"]
"""`flag` records and passes the text on, `redact` replaces the matched spans, `block` refuses."""

InputSource = Literal["user", "tool"]
"""Where an input comes from: the user's message or a tool's result."""

VerdictAction = Literal["allow", "flag", "redact", "block"]

INJECTION_RULES = (
    "instruction_override",
    "role_spoofing",
    "hidden_characters",
    "hidden_html",
    "encoded_instructions",
    "tool_result_injection",
)
"""The prompt-injection heuristics, by name (as in `ContentFinding.rule`)."""

_ACTIONS: tuple[GuardAction, ...] = ("flag", "redact", "block")
_SOURCES: tuple[InputSource, ...] = ("user", "tool")
_SEVERITY: dict[VerdictAction, int] = {"allow": 0, "flag": 1, "redact": 2, "block": 3}


# -- config ------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class InputGuardPolicy:
    """What the input guard checks in user messages and tool results, and what it does.

    Example:
        ```python
        InputGuardPolicy(max_chars=8_000, injection_action="block", sources=frozenset({"tool"}))
        ```
    """

    max_chars: int | None = 50_000
    """The longest input accepted, in characters. `None` disables the size limit."""

    size_action: GuardAction = "block"
    """What to do with a longer input: `block` refuses it, `redact` cuts it to `max_chars`
    (with a marker saying how much was cut), `flag` only records it."""

    injection_action: GuardAction = "flag"
    """What to do when a prompt-injection heuristic matches: `flag` records it, `redact`
    replaces the matched span (hidden characters are removed), `block` refuses the input."""

    sources: frozenset[InputSource] = frozenset(_SOURCES)
    """Which inputs are checked: `user` messages, `tool` results, or both. Others pass as is."""

    disabled_rules: frozenset[str] = frozenset()
    """Injection rules to skip, by name (see `INJECTION_RULES`), e.g. when one misfires on
    your data."""

    def __post_init__(self) -> None:
        if self.max_chars is not None and (
            isinstance(self.max_chars, bool) or not isinstance(self.max_chars, int)
        ):
            raise UserError(
                f"InputGuardPolicy.max_chars must be an int or None, got {self.max_chars!r}."
            )
        if self.max_chars is not None and self.max_chars <= 0:
            raise UserError(
                f"InputGuardPolicy.max_chars must be greater than 0 (or None to disable the "
                f"size limit), got {self.max_chars!r}."
            )
        for name in ("size_action", "injection_action"):
            _check_action(f"InputGuardPolicy.{name}", getattr(self, name))
        for attr, allowed in (("sources", _SOURCES), ("disabled_rules", INJECTION_RULES)):
            value = getattr(self, attr)
            if isinstance(value, str) or not isinstance(value, frozenset | set | tuple | list):
                raise UserError(
                    f"InputGuardPolicy.{attr} must be a set of names from {list(allowed)}, "
                    f"got {value!r}."
                )
            unknown = sorted(set(value) - set(allowed))
            if unknown:
                raise UserError(
                    f"InputGuardPolicy.{attr} has unknown names {unknown}; use some of "
                    f"{list(allowed)}."
                )
            object.__setattr__(self, attr, frozenset(value))


@dataclass(frozen=True, kw_only=True, slots=True)
class OutputGuardPolicy:
    """What the output guard does with PII and secrets in the final answer.

    Example:
        ```python
        OutputGuardPolicy(pii_kinds=frozenset({"card", "secret"}), pii_action="block")
        ```
    """

    pii_action: GuardAction = "redact"
    """What to do when the answer contains PII: `redact` replaces it with `[EMAIL]`, `[CARD]`,
    …; `flag` only records it; `block` withholds the whole answer."""

    pii_kinds: frozenset[PiiKind] = frozenset(PII_KINDS)
    """Which kinds of PII to look for (see `keel.redact.PII_KINDS`)."""

    max_chars: int | None = None
    """The longest answer passed on, in characters; longer ones are cut. `None`: no limit."""

    def __post_init__(self) -> None:
        _check_action("OutputGuardPolicy.pii_action", self.pii_action)
        kinds: object = self.pii_kinds
        if isinstance(kinds, str) or not isinstance(kinds, frozenset | set | tuple | list):
            raise UserError(
                f"OutputGuardPolicy.pii_kinds must be a set of kinds from {list(PII_KINDS)}, "
                f"got {kinds!r}."
            )
        unknown = sorted(set(kinds) - set(PII_KINDS))
        if unknown:
            raise UserError(
                f"OutputGuardPolicy.pii_kinds has unknown kinds {unknown}; use some of "
                f"{list(PII_KINDS)}."
            )
        object.__setattr__(self, "pii_kinds", frozenset(kinds))
        if self.max_chars is not None and (
            isinstance(self.max_chars, bool)
            or not isinstance(self.max_chars, int)
            or self.max_chars <= 0
        ):
            raise UserError(
                f"OutputGuardPolicy.max_chars must be greater than 0 (or None to disable the "
                f"limit), got {self.max_chars!r}."
            )


def _check_action(name: str, value: object) -> None:
    if value not in _ACTIONS:
        raise UserError(f"{name} must be one of {list(_ACTIONS)}, got {value!r}.")


# -- outcomes ----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class ContentFinding:
    """One thing a content guard found: which rule, where, and what it matched."""

    rule: str
    """The rule's name: `max_chars`, an injection rule (`INJECTION_RULES`) or `pii:<kind>`."""
    start: int
    """Index of the first matched character, in the text that was checked."""
    end: int
    """Index after the last matched character."""
    excerpt: str
    """The matched text (at most 80 characters; secrets and PII are not repeated in full)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ContentVerdict:
    """What a content guard decided about one text. Build it with the named constructors."""

    action: VerdictAction
    """`allow` (nothing found), `flag` (found, passed on), `redact` (found, replaced), or
    `block` (refused)."""
    text: str
    """The text to pass on: the original, or the redacted one. Empty for a block."""
    findings: tuple[ContentFinding, ...] = ()
    """What was found; spans refer to the text that was checked, not to `text`."""
    message: str | None = None
    """For a block: why, in words fit to show to the user or to the model."""

    @classmethod
    def allow(cls, text: str) -> ContentVerdict:
        """Nothing found: pass `text` on."""
        return cls(action="allow", text=text)

    @classmethod
    def flag(cls, text: str, findings: tuple[ContentFinding, ...]) -> ContentVerdict:
        """Something found and recorded; `text` passes on unchanged."""
        return cls(action="flag", text=text, findings=findings)

    @classmethod
    def redact(cls, text: str, findings: tuple[ContentFinding, ...]) -> ContentVerdict:
        """Something found and replaced: pass the redacted `text` on."""
        return cls(action="redact", text=text, findings=findings)

    @classmethod
    def block(cls, message: str, findings: tuple[ContentFinding, ...]) -> ContentVerdict:
        """Refused: nothing passes on; `message` says why."""
        return cls(action="block", text="", findings=findings, message=message)

    @property
    def blocked(self) -> bool:
        """Whether the text was refused."""
        return self.action == "block"

    @property
    def rules(self) -> tuple[str, ...]:
        """The names of the rules that matched, in order of first match, without repeats."""
        return tuple(dict.fromkeys(f.rule for f in self.findings))


# -- injection heuristics ----------------------------------------------------------------------

_I = re.IGNORECASE | re.MULTILINE
_OVERRIDE = re.compile(
    r"\b(?:ignore|disregard|forget|override|bypass|skip)\s+(?:all\s+|any\s+|the\s+|your\s+|"
    r"of\s+|my\s+|these\s+|those\s+)*(?:previous|prior|above|earlier|preceding|former|"
    r"original|system|initial|existing)\s+(?:instructions?|prompts?|rules|directions|"
    r"guidelines|directives|messages|context|constraints)"
    r"|\b(?:forget|ignore)\s+(?:everything|all)\s+(?:you\s+(?:were|have\s+been)\s+told|above|"
    r"before|so\s+far)"
    r"|\byou\s+are\s+now\s+(?:in\s+)?(?:DAN|developer\s+mode|jailbroken|unrestricted|"
    r"no\s+longer\s+bound)"
    r"|\b(?:new|updated|revised)\s+(?:system\s+)?instructions\s*:"
    r"|\b(?:reveal|print|repeat|show|output)\s+(?:me\s+)?(?:your|the)\s+(?:full\s+|entire\s+)?"
    r"(?:system\s+prompt|hidden\s+instructions|initial\s+instructions)",
    _I,
)
_ROLE_SPOOF = re.compile(
    r"<\|(?:im_start|start_header_id)\|>(?:[ \t]*(?:system|user|assistant|developer)\b"
    r"(?:<\|end_header_id\|>)?)?"
    r"|<\|(?:im_end|system|user|assistant|endoftext|eot_id|end_header_id|begin_of_text)\|>"
    r"|\[/?INST\]|<</?SYS>>"
    r"|^[ \t]*(?:#{2,6}[ \t]*(?:system|assistant|developer|user)[ \t]*:?[ \t]*$"
    r"|(?:system|assistant|developer)[ \t]*:)",
    _I,
)
# Unicode tag characters (invisible ASCII), bidi overrides and isolates, invisible operators;
# and runs of two or more zero-width characters. A single zero-width joiner / non-joiner /
# direction mark is left alone: emoji sequences, Persian and Indic scripts, RTL text use them.
_HIDDEN_CHARS = re.compile(
    "[\U000e0000-\U000e007f\u202a-\u202e\u2066-\u2069\u2061-\u2064]+"
    "|[\u200b-\u200f\u2060\ufeff]{2,}"
)
_HTML_COMMENT = re.compile(r"<!--[\s\S]*?(?:-->|\Z)")
_HIDDEN_ELEMENT = re.compile(
    r"<(?P<tag>[a-zA-Z][\w-]*)\b[^>]*?(?:\bhidden\b|style\s*=\s*[\"'][^\"']*(?:display\s*:\s*"
    r"none|visibility\s*:\s*hidden|font-size\s*:\s*0(?![.\d]*[1-9])|opacity\s*:\s*0(?![.\d]*"
    r"[1-9])))[^>]*>[\s\S]*?</(?P=tag)\s*>",
    re.IGNORECASE,
)
# words that make hidden text an instruction for the model rather than page furniture
_INSTRUCTION_CUE = re.compile(
    r"\b(?:ignore|disregard|instructions?|assistant|AI|LLM|language\s+model|chatbot|agent|"
    r"you\s+(?:must|should|will|are)|do\s+not\s+(?:tell|mention|reveal)|system\s+prompt|"
    r"call\s+the|send|forward|exfiltrate)\b",
    re.IGNORECASE,
)
_BASE64 = re.compile(r"(?<![A-Za-z0-9+/=_-])[A-Za-z0-9+/]{24,}={0,2}(?![A-Za-z0-9+/=_-])")
_TOOL_INJECTION = re.compile(
    r"\b(?:AI|assistant|agent|model|LLM|chatbot|Claude|ChatGPT|GPT)\b[,:]?\s+(?:you\s+must\s+|"
    r"must\s+|should\s+|please\s+|now\s+|immediately\s+)*(?:call|invoke|use|run|execute|send|"
    r"email|forward|post|upload)\b"
    r"|\b(?:call|invoke|execute|run|use)\s+the\s+[`'\"]?\w+[`'\"]?\s+(?:tool|function)\b"
    r"|\b(?:send|forward|post|upload|email|exfiltrate|leak|transmit|copy)\s+(?:\w+\s+){0,4}?"
    r"(?:the\s+|all\s+|your\s+|any\s+|this\s+)*(?:conversation|chat\s+history|system\s+prompt|"
    r"instructions|api[\s_-]?keys?|credentials|passwords?|secrets?|tokens?|personal\s+data|"
    r"user\s+data|customer\s+data|emails?|contacts)\b[^.\n]{0,40}?\b(?:to|into)\b",
    re.IGNORECASE,
)

Span = tuple[int, int]


def _spans(pattern: re.Pattern[str]) -> Callable[[str], Iterator[Span]]:
    def find(text: str) -> Iterator[Span]:
        for m in pattern.finditer(text):
            yield m.span()

    return find


def _hidden_html(text: str) -> Iterator[Span]:
    for pattern in (_HTML_COMMENT, _HIDDEN_ELEMENT):
        for m in pattern.finditer(text):
            if _INSTRUCTION_CUE.search(m.group()):
                yield m.span()


def _encoded_instructions(text: str) -> Iterator[Span]:
    for m in _BASE64.finditer(text):
        blob = m.group()
        try:
            decoded = base64.b64decode(blob + "=" * (-len(blob) % 4), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            continue
        if any(not (ch.isprintable() or ch.isspace()) for ch in decoded):
            continue
        if any(p.search(decoded) for p in (_OVERRIDE, _ROLE_SPOOF, _TOOL_INJECTION)):
            yield m.span()


_RULES: dict[str, Callable[[str], Iterator[Span]]] = {
    "instruction_override": _spans(_OVERRIDE),
    "role_spoofing": _spans(_ROLE_SPOOF),
    "hidden_characters": _spans(_HIDDEN_CHARS),
    "hidden_html": _hidden_html,
    "encoded_instructions": _encoded_instructions,
    "tool_result_injection": _spans(_TOOL_INJECTION),
}
_TOOL_ONLY = frozenset({"tool_result_injection"})


# -- the decisions -----------------------------------------------------------------------------


def check_input(text: str, policy: InputGuardPolicy, *, source: InputSource) -> ContentVerdict:
    """Check one input to the model: the user's message or a tool's result.

    The size limit is checked first; an input refused for its size is not scanned further.
    `tool_result_injection` (text telling the model to call tools or send data somewhere) is
    checked in tool results only: users may legitimately ask for that.

    Args:
        text: The input.
        policy: What to check and what to do.
        source: `user` for the user's message, `tool` for a tool's result.

    Example:
        ```python
        verdict = check_input(
            "Ignore all previous instructions.",
            InputGuardPolicy(injection_action="block"),
            source="tool",
        )
        assert verdict.blocked and verdict.rules == ("instruction_override",)
        ```
    """
    if source not in _SOURCES:
        raise UserError(f"check_input(source=...) must be one of {list(_SOURCES)}, got {source!r}.")
    if source not in policy.sources:
        return ContentVerdict.allow(text)
    what = "The user input" if source == "user" else "The tool result"
    findings: list[ContentFinding] = []
    action: VerdictAction = "allow"
    if policy.max_chars is not None and len(text) > policy.max_chars:
        size = ContentFinding(
            rule="max_chars",
            start=policy.max_chars,
            end=len(text),
            excerpt=_excerpt(text[policy.max_chars :]),
        )
        if policy.size_action == "block":
            return ContentVerdict.block(
                f"{what} was blocked by the input guard: it has {len(text)} characters, more "
                f"than max_chars={policy.max_chars}. Send a shorter input, or raise "
                "InputGuardPolicy.max_chars.",
                (size,),
            )
        findings.append(size)
        action = policy.size_action
        if policy.size_action == "redact":
            cut = len(text) - policy.max_chars
            text = f"{text[: policy.max_chars]}\n[TRUNCATED: {cut} more characters]"

    injections = _injections(text, policy, source)
    if injections:
        findings.extend(injections)
        action = max(action, policy.injection_action, key=_SEVERITY.__getitem__)
    if not findings:
        return ContentVerdict.allow(text)
    if action == "block":
        found = ", ".join(f"{f.rule} at {f.start}-{f.end} ({f.excerpt!r})" for f in injections)
        return ContentVerdict.block(
            f"{what} was blocked by the input guard: it looks like a prompt injection: {found}.",
            tuple(findings),
        )
    if action == "redact" and injections and policy.injection_action == "redact":
        text = _replace(text, injections)
    if action == "flag":
        return ContentVerdict.flag(text, tuple(findings))
    return ContentVerdict.redact(text, tuple(findings))


def check_output(text: str, policy: OutputGuardPolicy) -> ContentVerdict:
    """Check the model's final answer for PII and secrets (and its length).

    Args:
        text: The answer.
        policy: What to look for and what to do.

    Example:
        ```python
        verdict = check_output("Mail jane@example.com", OutputGuardPolicy())
        assert verdict.text == "Mail [EMAIL]"
        ```
    """
    matches = find_pii(text, kinds=policy.pii_kinds)
    findings = [
        ContentFinding(rule=f"pii:{m.kind}", start=m.start, end=m.end, excerpt=f"[{m.kind}]")
        for m in matches
    ]
    if matches and policy.pii_action == "block":
        kinds = ", ".join(dict.fromkeys(m.kind for m in matches))
        many = "es" if len(matches) > 1 else ""
        return ContentVerdict.block(
            f"The answer was withheld by the output guard: it contains {kinds} "
            f"({len(matches)} match{many}). Answer without personal data or secrets.",
            tuple(findings),
        )
    changed = bool(matches) and policy.pii_action == "redact"
    if changed:
        text = _replace_pii(text, matches)
    if policy.max_chars is not None and len(text) > policy.max_chars:
        findings.append(
            ContentFinding(
                rule="max_chars",
                start=policy.max_chars,
                end=len(text),
                excerpt=_excerpt(text[policy.max_chars :]),
            )
        )
        text, changed = text[: policy.max_chars], True
    if changed:
        return ContentVerdict.redact(text, tuple(findings))
    if findings:
        return ContentVerdict.flag(text, tuple(findings))
    return ContentVerdict.allow(text)


def _replace_pii(text: str, matches: list[PiiMatch]) -> str:
    parts: list[str] = []
    last = 0
    for m in matches:
        parts.extend((text[last : m.start], f"[{m.kind.upper()}]"))
        last = m.end
    return "".join([*parts, text[last:]])


def _injections(text: str, policy: InputGuardPolicy, source: InputSource) -> list[ContentFinding]:
    found: list[ContentFinding] = []
    for rule, find in _RULES.items():
        if rule in policy.disabled_rules or (rule in _TOOL_ONLY and source != "tool"):
            continue
        found.extend(
            ContentFinding(rule=rule, start=s, end=e, excerpt=_excerpt(text[s:e]))
            for s, e in find(text)
        )
    return sorted(found, key=lambda f: (f.start, f.end))


def _replace(text: str, findings: list[ContentFinding]) -> str:
    """Replace each finding's span with a marker (hidden characters are just removed)."""
    merged: list[tuple[int, int, str]] = []
    for f in sorted(findings, key=lambda f: (f.start, -f.end)):
        if merged and f.start < merged[-1][1]:
            start, end, rule = merged[-1]
            merged[-1] = (start, max(end, f.end), rule)
        else:
            merged.append((f.start, f.end, f.rule))
    out, last = [], 0
    for start, end, rule in merged:
        out.append(text[last:start])
        out.append("" if rule == "hidden_characters" else f"[REMOVED: {rule}]")
        last = end
    out.append(text[last:])
    return "".join(out)


def _excerpt(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    text = "".join(ch if ch.isprintable() else f"\\u{ord(ch):04x}" for ch in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"
