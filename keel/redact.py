"""PII and secret detection and redaction: the one sanitizer for answers, logs and audit.

`find_pii` finds emails, phone numbers, payment cards (Luhn), IBANs (mod-97), SSN-like numbers,
IPv4/IPv6 addresses and API keys / secrets; `redact` replaces them; `sanitize` does the same over
nested data (tool arguments, message content blocks, LangChain messages).

Precision comes first: a number is a card only if it passes Luhn and has a card-network prefix,
an IBAN only if its country length and mod-97 checksum match, a phone only with a leading `+` or
the separators of a North American number. What it deliberately leaves alone is listed in
`find_pii`'s docstring.
"""

from __future__ import annotations

import bisect
import ipaddress
import logging
import re
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from langchain_core.messages import BaseMessage

from keel.errors import UserError

__all__ = [
    "PII_KINDS",
    "PiiKind",
    "PiiMatch",
    "find_pii",
    "iban_valid",
    "luhn_valid",
    "redact",
    "SanitizingFilter",
    "sanitize",
    "sanitized_logger",
    "secret_key",
]

PiiKind = Literal["secret", "email", "iban", "card", "ssn", "ip", "phone"]
"""What a match is. `secret` covers API keys, tokens, passwords and private keys."""

PII_KINDS: tuple[PiiKind, ...] = ("secret", "email", "iban", "card", "ssn", "ip", "phone")
"""Every kind, in priority order: when two matches overlap, the earlier kind wins."""

Replacement = Callable[[PiiKind], str]
T = TypeVar("T")


def _default_replacement(kind: PiiKind) -> str:
    return f"[{kind.upper()}]"


@dataclass(frozen=True, slots=True)
class PiiMatch:
    """One piece of PII found in a text: `text[start:end] == value`."""

    kind: PiiKind
    """What was found."""
    start: int
    """Index of the first character."""
    end: int
    """Index after the last character."""
    value: str
    """The matched text."""


# -- validators ------------------------------------------------------------------------------


def luhn_valid(digits: str) -> bool:
    """Whether a string of digits passes the Luhn checksum (payment cards)."""
    if not digits.isdigit():
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


# ISO 13616 registry: country -> IBAN length.
_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26,
    "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20,
    "LV": 21, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18,
    "NO": 15, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24,
    "SC": 31, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "ST": 25, "SV": 28, "TL": 23, "TN": 24,
    "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}  # fmt: skip


def iban_valid(iban: str) -> bool:
    """Whether `iban` (spaces allowed) has its country's length and a valid mod-97 checksum."""
    compact = iban.replace(" ", "").upper()
    if _IBAN_LENGTHS.get(compact[:2]) != len(compact) or not compact.isalnum():
        return False
    if not compact[2:4].isdigit():
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def _card_network(digits: str) -> bool:
    """Whether the number has a real card network's prefix and length (IIN ranges)."""
    n, first2, first4 = len(digits), int(digits[:2]), int(digits[:4])
    if digits[0] == "4":
        return n in (13, 16, 19)  # Visa
    if 51 <= first2 <= 55 or 2221 <= first4 <= 2720:
        return n == 16  # Mastercard
    if first2 in (34, 37):
        return n == 15  # American Express
    if digits.startswith("6011") or first2 == 65 or 644 <= int(digits[:3]) <= 649:
        return 16 <= n <= 19  # Discover
    if first2 == 35:
        return 16 <= n <= 19  # JCB
    if first2 in (36, 38, 39) or 300 <= int(digits[:3]) <= 305:
        return 14 <= n <= 19  # Diners Club
    if first2 == 62:
        return 16 <= n <= 19  # UnionPay
    if first2 == 50 or 56 <= first2 <= 69:
        return 12 <= n <= 19  # Maestro
    return False


# -- patterns --------------------------------------------------------------------------------

_SECRET_PATTERNS = [
    # PEM private key blocks, also when truncated (no END line)
    r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----[\s\S]*?"
    r"(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----|\Z)",
    r"(?<![\w-])sk-[A-Za-z0-9_-]{20,}",  # OpenAI / Anthropic (sk-proj-…, sk-ant-…)
    r"(?<![A-Za-z0-9])(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}(?![A-Za-z0-9])",  # AWS access key id
    r"(?<![A-Za-z0-9_])gh[pousr]_[A-Za-z0-9]{36,}",  # GitHub tokens
    r"(?<![A-Za-z0-9_])github_pat_[A-Za-z0-9_]{22,}",
    r"(?<![\w-])xox[abposr]-[A-Za-z0-9-]{10,}",  # Slack
    r"(?<![A-Za-z0-9_])[sr]k_(?:live|test)_[A-Za-z0-9]{16,}",  # Stripe
    r"(?<![\w-])AIza[0-9A-Za-z_-]{35}",  # Google API key
    r"(?<![\w-])eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",  # JWT
    # the token after "Bearer", the value after api_key= / password: / "secret": …
    r"(?i:\bbearer)\s+(?P<secret>[A-Za-z0-9._~+/-]{16,}=*)",
    # an Authorization header's credentials: `Authorization: Basic Zm9v...`
    r"(?i:\b(?:proxy-)?authorization[\"']?\s*[:=]\s*[\"']?(?:basic|bearer|digest|token)\s+)"
    r"(?P<secret>[A-Za-z0-9._~+/-]{4,}=*)",
    # (the key's name may have words before it, `my_api_key`: read as the keyword after a
    # `_`; matching the words, `(?:[a-z0-9]+[_-])*`, ran to the end of a text of `12-12-…`
    # from each word in it, quadratic: 100,000 characters took minutes)
    r"(?i:(?:\b|(?<=_))(?:api[_-]?key|apikey|secret(?:[_-]?(?:access[_-]?)?key)?|"
    r"access[_-]?key|access[_-]?token|auth[_-]?token|refresh[_-]?token|client[_-]?secret|"
    r"private[_-]?key|password|passwd|pwd|token)\b)"
    r"[\"']?\s*[:=]\s*[\"']?(?P<secret>[^\s\"'`,;()\[\]{}<>]{6,}(?<![.]))",
]


def _compile(pattern: str) -> re.Pattern[str]:
    """Compile with a redaction marker (`[EMAIL]`) counting as a word at either side.

    Without it, redacting one match could turn its neighbour's context from a word character
    into `]` and expose a new match, so redacting twice would differ from redacting once.
    """
    return re.compile(pattern.replace("(?<![", "(?<![\\]").replace("(?![", "(?![\\["))


_SECRETS = [_compile(p) for p in _SECRET_PATTERNS]

_UNSPACED = re.compile(
    "[\u0e00-\u0e7f\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
    "\uac00-\ud7af\uf900-\ufaff\uff66-\uff9f]+"
)
"""Letters of scripts written without spaces between words (Thai, kana, CJK ideographs, Hangul
syllables, whose particles attach to the word before them). The finders read each as a NUL, a
character no pattern takes for part of PII or of a word: `カード4111 1111 1111 1111です` is a card
as it reads, where `カ` and `で`, word characters, made it part of a longer word."""

_INVISIBLE = "\u00ad\u200b\u200c\u200d\u2060\ufeff"
"""Characters that show as nothing (a soft hyphen, zero-width ones): a card number, an email,
an SSN, a phone number or an IBAN written with them inside reads as if they were not there."""
_SPACES = "\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000"
"""Spaces other than ` ` (no-break, thin, figure, ideographic, ...): they show as a space."""
_I = f"[{_INVISIBLE}]*"
_LABEL = rf"[A-Za-z0-9](?:[A-Za-z0-9{_INVISIBLE}-]*[A-Za-z0-9])?"
_DOTS = ".\uff0e\u3002\uff61"
"""A dot, and what reads as one in an address: full-width, ideographic (CJK input methods type
`。` for `.`) and half-width ideographic full stops."""
_DOT = rf"{_I}[{_DOTS}]{_I}"
_EMAIL = _compile(  # as it reads: invisible characters inside, a full-width @, any dot above
    rf"(?<![\w.%+-])[A-Za-z0-9](?:{_I}[A-Za-z0-9_%+{_DOTS}-]){{0,63}}{_I}[@\uff20]{_I}"
    rf"{_LABEL}(?:{_DOT}{_LABEL})*{_DOT}[A-Za-z](?:{_I}[A-Za-z])+"
    rf"(?![\w-]|[{_DOTS}][A-Za-z0-9]|[{_INVISIBLE}]+(?:[\w-]|[{_DOTS}][A-Za-z0-9]))"
)
_WIDE_CAPS = "\uff21-\uff3a"
"""Full-width capitals (U+FF21-FF3A): a CJK input method types an IBAN's letters as these."""
_IBAN_START = _compile(  # letters ASCII or full-width, digits of any script (full-width too)
    rf"(?<![A-Za-z0-9\uff10-\uff19\uff21-\uff3a\uff41-\uff5a])[A-Z{_WIDE_CAPS}]{{2}}\d{{2}}"
    rf"(?=[ {_SPACES}{_INVISIBLE}]?(?:[A-Z{_WIDE_CAPS}]|\d))"
)
_CARD = _compile(rf"(?<![\w.,-])\d(?:[ \-{_SPACES}{_INVISIBLE}]{{0,3}}\d){{11,18}}(?![\w-]|[.,]\d)")
_SSN = _compile(  # digits 3-2-4 split by dashes or spaces (any kind), invisibles anywhere
    rf"(?<![\w.-])\d(?:{_I}\d){{2}}{_I}[ {_SPACES}-]{_I}\d{_I}\d{_I}[ {_SPACES}-]"
    rf"{_I}\d(?:{_I}\d){{3}}(?![\w-]|[.,]\d|[{_INVISIBLE}]+(?:[\w-]|[.,]\d))"
)
_SSN_READ = re.compile(r"(?!000|666|9)\d{3}(?P<sep>[- ])(?!00)\d{2}(?P=sep)(?!0000)\d{4}")
_READ_SPACES = re.compile(rf"[ {_SPACES}]")
_READ_INVISIBLE = re.compile(f"[{_INVISIBLE}]")
_INVISIBLE_RUNS = re.compile(f"[{_INVISIBLE}]+")
_SPACE_SET = frozenset(ch for ch in map(chr, range(0x3001)) if _READ_SPACES.match(ch))
_SPACED_DIGIT_BEFORE = re.compile(rf"\d{_I}[ {_SPACES}]{_I}\Z")
_SPACED_DIGIT_AFTER = re.compile(rf"{_I}[ {_SPACES}]{_I}\d")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = _compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w]|\.\d)")
_IPV6 = _compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{1,4}|:)?(?::[0-9A-Fa-f]{0,4}){2,7}(?:\.\d{1,3}){0,3}(?![\w:])"
)
_PHONE = _compile(
    # international: +CC then 2-6 groups (E.164 digit count checked in code)
    # (any space may be a no-break / thin one: it reads as a space)
    rf"(?<![\w+])\+\d{{1,3}}(?:[ .{_SPACES}-]?\(?\d{{1,4}}\)?){{2,6}}(?![\w-]|[.,]\d)"
    # North American: (NXX) NXX-XXXX, NXX-NXX-XXXX, NXX.NXX.XXXX, 1-NXX-NXX-XXXX
    rf"|(?<![\w+.-])(?:1[ .{_SPACES}-])?"
    rf"(?:\([2-9]\d{{2}}\)[ {_SPACES}]?[2-9]\d{{2}}[ .{_SPACES}-]\d{{4}}"
    rf"|[2-9]\d{{2}}(?:(?P<sep>[.-])[2-9]\d{{2}}(?P=sep)|[ {_SPACES}][2-9]\d{{2}}[ {_SPACES}])"
    r"\d{4})(?![\w-]|[.,]\d)"
)


def _secret_spans(text: str) -> Iterator[tuple[int, int]]:
    for pattern in _SECRETS:
        for m in pattern.finditer(text):
            yield m.span("secret") if "secret" in pattern.groupindex else m.span()


def _iban_spans(text: str) -> Iterator[tuple[int, int]]:
    for m in _IBAN_START.finditer(text):
        length = _IBAN_LENGTHS.get(_read(m.group()[:2]))
        if length is None:
            continue
        i, count = m.end(), 4
        while count < length and i < len(text):
            if text[i] in _INVISIBLE:  # as it reads: invisible characters are not there
                i += 1
                continue
            if text[i] in _SPACE_SET and i + 1 < len(text) and text[i + 1] not in _SPACE_SET:
                i += 1
                continue
            ch = text[i]  # a capital (ASCII or full-width), or a digit in any script (0-9)
            if not ((ch.isascii() and ch.isupper()) or _wide_cap(ch) or ch.isdecimal()):
                break
            i, count = i + 1, count + 1
        after = i
        while after < len(text) and text[after] in _INVISIBLE:
            after += 1
        at_end = not (after < len(text) and (text[after].isalnum() or text[after] == "["))
        if count == length and at_end and iban_valid(_read(text[m.start() : i])):
            yield m.start(), i


def _wide_cap(ch: str) -> bool:
    return "\uff21" <= ch <= "\uff3a"


def _read(value: str) -> str:
    """`value` as it reads: invisible characters dropped, spaces ` `, digits 0-9, capitals ASCII.

    Any space is a space, a digit of any script its 0-9, a full-width capital its ASCII letter.
    """
    value = _READ_SPACES.sub(" ", _READ_INVISIBLE.sub("", value))
    if value.isascii():
        return value
    return "".join(
        str(int(ch)) if ch.isdecimal() else chr(ord(ch) - 0xFEE0) if _wide_cap(ch) else ch
        for ch in value
    )


def _ssn_spans(text: str) -> Iterator[tuple[int, int]]:
    for m in _SSN.finditer(text):
        value = _read(m.group())
        if not _SSN_READ.fullmatch(value):
            continue
        # split by spaces, it must stand alone: not a group of a longer spaced number
        if " " in value and (
            _SPACED_DIGIT_BEFORE.search(text, max(0, m.start() - 8), m.start())
            or _SPACED_DIGIT_AFTER.match(text, m.end())
        ):
            continue
        yield m.span()


def _card_spans(text: str) -> Iterator[tuple[int, int]]:
    for m in _CARD.finditer(text):
        value = _read(m.group())
        if re.search(r"[ -]{2}", value):
            continue
        separators = {ch for ch in value if not ch.isdigit()}
        groups = re.split(r"[ -]", value)
        if len(separators) > 1 or (separators and min(len(g) for g in groups) < 3):
            continue
        digits = "".join(groups)
        if len(set(digits)) > 1 and _card_network(digits) and luhn_valid(digits):
            yield m.span()


def _ip_spans(text: str) -> Iterator[tuple[int, int]]:
    for m in _IPV4.finditer(text):
        yield m.span()
    for m in _IPV6.finditer(text):
        value = m.group()
        if not any(ch.isdigit() for ch in value) or value.count(":") < 2:
            continue
        try:
            ipaddress.IPv6Address(value)
        except ValueError:
            continue
        yield m.span()


def _phone_spans(text: str) -> Iterator[tuple[int, int]]:
    """Phone numbers as they read: in the text without its invisible characters, mapped back."""
    if _READ_INVISIBLE.search(text) is None:
        yield from _visible_phone_spans(text)
        return
    cuts: list[int] = []  # where, in the text without them, each run of invisibles was
    shifts: list[int] = [0]  # how many were dropped before the text's k-th kept part
    for run in _INVISIBLE_RUNS.finditer(text):
        cuts.append(run.start() - shifts[-1])
        shifts.append(shifts[-1] + run.end() - run.start())
    for start, end in _visible_phone_spans(_INVISIBLE_RUNS.sub("", text)):
        last = end - 1
        yield (
            start + shifts[bisect.bisect_right(cuts, start)],
            last + shifts[bisect.bisect_right(cuts, last)] + 1,
        )


def _visible_phone_spans(text: str) -> Iterator[tuple[int, int]]:
    for m in _PHONE.finditer(text):
        if not m.group().startswith("+"):
            yield m.span()
            continue
        # E.164 has at most 15 digits (11 for +1): drop trailing groups that belong to
        # something else, e.g. a year after the number
        limit = 11 if re.match(r"\+1(?!\d)", m.group()) else 15
        digits, end = 0, m.start()
        for group in re.finditer(r"\d+\)?", m.group()):
            if digits + sum(ch.isdigit() for ch in group.group()) > limit:
                break
            digits += sum(ch.isdigit() for ch in group.group())
            end = m.start() + group.end()
        if digits >= 8:
            yield m.start(), end


def _simple(pattern: re.Pattern[str]) -> Callable[[str], Iterator[tuple[int, int]]]:
    def spans(text: str) -> Iterator[tuple[int, int]]:
        for m in pattern.finditer(text):
            yield m.span()

    return spans


# Every finder yields only spans of matches of its patterns, so a text none of them matches
# holds no PII: one search of their union (named groups made plain, PHONE's kept once) answers
# most texts without running each finder.
_ANY_PATTERN = re.compile(
    "|".join(
        f"(?:{p.pattern})" for p in (*_SECRETS, _EMAIL, _IBAN_START, _CARD, _SSN, _IPV4, _IPV6)
    ).replace("(?P<secret>", "(?:")
    + f"|(?:{_PHONE.pattern})"
)


# A new finder's patterns go into `_ANY_PATTERN` too: a text the union misses is never read.
_FINDERS: dict[PiiKind, Callable[[str], Iterator[tuple[int, int]]]] = {
    "secret": _secret_spans,
    "email": _simple(_EMAIL),
    "iban": _iban_spans,
    "card": _card_spans,
    "ssn": _ssn_spans,
    "ip": _ip_spans,
    "phone": _phone_spans,
}


# -- the public API ----------------------------------------------------------------------------


def find_pii(text: str, *, kinds: Collection[PiiKind] | None = None) -> list[PiiMatch]:
    """Every piece of PII in `text`, in order, without overlaps.

    When two candidates overlap, the kind earlier in `PII_KINDS` wins (a secret over an email,
    an IBAN over a phone), then the longer one.

    Each is found as it reads: invisible characters (zero-width ones, a soft hyphen) inside an
    email, card number, SSN, phone number or IBAN are part of it, a no-break or thin space
    counts as a space, an email may have a full-width at sign and a full-width, ideographic
    (`。`) or half-width ideographic dot, and a card number, SSN or IBAN may be written in
    full-width or other non-ASCII digits.

    Deliberately not caught (precision over recall):

    - phone numbers without a leading `+` unless written as a North American number with
      separators (`(415) 555-0199`, `415-555-0199`, `415.555.0199`); bare digit runs, national
      formats such as `030 1234567`, and NANP numbers whose area code or exchange starts with
      0 or 1 (`123-456-7890`);
    - card numbers that fail Luhn, have no card-network prefix, mix separators, or are split
      into groups shorter than 3 digits;
    - emails whose local part (before the `@`) is longer than 64 characters, RFC 5321's limit
      (invisible characters not counted): reading further made the scan quadratic;
    - IBANs in lower case, with a wrong checksum, or from countries not in the registry;
    - SSNs written without separators, with dashes and spaces mixed, or with area 000, 666
      or 9xx;
    - secrets without a known prefix or a `key=value` / `Bearer` context (e.g. a bare 40-char
      AWS secret key), and values shorter than 6 characters;
    - names, postal addresses and dates of birth.

    Args:
        text: The text to scan.
        kinds: Only these kinds (all when None).
    """
    wanted = _check_kinds(kinds)
    scan = text if _UNSPACED.search(text) is None else _UNSPACED.sub(_nul, text)
    found = _find(scan, wanted)
    return (
        [PiiMatch(m.kind, m.start, m.end, text[m.start : m.end]) for m in found]
        if scan is not text
        else found
    )


def _nul(m: re.Match[str]) -> str:
    return "\0" * (m.end() - m.start())


def _find(text: str, wanted: Collection[PiiKind]) -> list[PiiMatch]:
    if _ANY_PATTERN.search(text) is None and (
        # a phone number with invisible characters inside reads as one once they are dropped
        _READ_INVISIBLE.search(text) is None or _PHONE.search(_READ_INVISIBLE.sub("", text)) is None
    ):
        return []
    candidates: list[tuple[int, int, int, PiiKind]] = []
    for rank, kind in enumerate(PII_KINDS):
        if kind in wanted:
            candidates.extend((rank, start, end, kind) for start, end in _FINDERS[kind](text))
    candidates.sort(key=lambda c: (c[0], c[1] - c[2], c[1]))
    # the spans taken so far, sorted (they do not overlap, so by start and by end alike): a
    # candidate is free when the span before it ends by its start and the next starts after
    # its end; bisecting keeps a text with thousands of matches linear, not quadratic
    starts: list[int] = []
    taken: list[PiiMatch] = []
    for _, start, end, kind in candidates:
        at = bisect.bisect_right(starts, start)
        free_before = at == 0 or taken[at - 1].end <= start
        if start < end and free_before and (at == len(starts) or starts[at] >= end):
            starts.insert(at, start)
            taken.insert(at, PiiMatch(kind, start, end, text[start:end]))
    return taken


def redact(
    text: str,
    *,
    kinds: Collection[PiiKind] | None = None,
    replacement: Replacement = _default_replacement,
) -> str:
    """`text` with every piece of PII replaced by `replacement(kind)` (default `[EMAIL]`, …).

    Example:
        ```python
        redact("Mail jane@example.com or call +44 20 7946 0958")
        #> 'Mail [EMAIL] or call [PHONE]'
        ```
    """
    matches = find_pii(text, kinds=kinds)
    if not matches:
        return text
    parts: list[str] = []
    last = 0
    for m in matches:
        parts.append(text[last : m.start])
        parts.append(replacement(m.kind))
        last = m.end
    parts.append(text[last:])
    return "".join(parts)


def sanitize(
    value: T,
    *,
    kinds: Collection[PiiKind] | None = None,
    replacement: Replacement = _default_replacement,
) -> T:
    """A copy of `value` with PII redacted in every string inside it.

    Walks dicts (keys and values: a key holding PII is redacted as a value is, and keeps its
    value, a `#2` after it if another key reads the same once redacted; the whole value of a
    key naming a secret, such as `password`, `token`, `api_key`, `secret` or `authorization`,
    see `secret_key`), lists, tuples (named tuples too), sets and LangChain messages (content,
    tool-call and invalid-tool-call arguments). Binary payloads of content
    blocks (`data`/`base64` of image, audio and file blocks, `data:` URLs) are left intact. An
    int, or a float that is a whole number, whose digits are a card number becomes the
    replacement string. Bytes (and a bytearray) are read as UTF-8, bytes that are not UTF-8
    kept as they are (`surrogateescape`), and redacted like a string: the result is bytes,
    equal to the input wherever no PII was found. Other values are returned as they are.

    Example:
        ```python
        sanitize({"to": "jane@example.com", "cc": ["+1 415 555 0199"], "n": 3})
        #> {'to': '[EMAIL]', 'cc': ['[PHONE]'], 'n': 3}
        ```
    """
    _check_kinds(kinds)
    return _Sanitizer(kinds, replacement).walk(value)  # type: ignore[no-any-return]


_SECRET_KEY = re.compile(
    r"(?:^|_)(?:password|passwd|passphrase|pwd|secret|secret_?key|api_?key|apikey|token|access_?key|"
    r"private_?key|authorization|auth|cookie|set_cookie|credentials?|"
    r"x_api_key|client_secret)$"
)


def secret_key(key: object) -> bool:
    """Whether a mapping key names a secret (`password`, `api_key`, `Authorization`, ...).

    The key's value is hidden whatever it looks like. Counts such as `input_tokens` or
    `max_tokens` are not secrets; `access_token`, `X-Api-Key` and `db_password` are, and so are
    their camelCase spellings (`accessToken`, `XApiKey`, `dbPassword`).
    """
    if not isinstance(key, str) or len(key) > 64:
        return False
    words = _CAMEL.sub("_", key)  # accessToken, XApiKey: the words JSON APIs run together
    name = re.sub(r"[^a-z0-9]+", "_", words.lower()).strip("_")
    return bool(_SECRET_KEY.search(name))


_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
"""Where a camelCase (or PascalCase, `XApiKey`) name starts a word."""


_BINARY_KEYS = frozenset({"data", "base64"})
_SCANNED_KEYS = (int, float, bytes, tuple, frozenset)
"""Keys other than strings that `sanitize` redacts as values: each gives a hashable value back."""
_CLEAN_KEYS: set[str] = set()
"""Keys read once and found clean of every kind (`type`, `content`, `args`, ...): the same key
in the next record is not read again. Only short keys, and at most `_CLEAN_KEYS_MAX`."""
_CLEAN_KEYS_MAX = 4096
_BINARY_BLOCKS = frozenset(
    {"image", "image_url", "audio", "input_audio", "video", "file", "document", "input_file"}
)


@dataclass(frozen=True, slots=True)
class _Sanitizer:
    kinds: Collection[PiiKind] | None
    replacement: Replacement

    def walk(self, value: Any) -> Any:
        if isinstance(value, str):
            if value.startswith("data:") and ";base64," in value[:100]:
                return value
            return redact(value, kinds=self.kinds, replacement=self.replacement)
        if isinstance(value, bool) or value is None:
            return value
        if isinstance(value, float):  # 4111111111111111.0: a card number as a JSON number
            if value.is_integer() and abs(value) < 1e20:
                whole = self.walk(int(value))
                return value if isinstance(whole, int) else whole
            return value
        if isinstance(value, int):
            text = str(value)
            found = find_pii(text, kinds=self.kinds)
            if found and found[0].start == 0 and found[0].end == len(text):
                return self.replacement(found[0].kind)
            return value
        if isinstance(value, bytes | bytearray):
            text = bytes(value).decode("utf-8", "surrogateescape")
            clean = self.walk(text)
            return value if clean == text else type(value)(clean.encode("utf-8", "surrogateescape"))
        if isinstance(value, dict):
            return self._dict(value)
        if isinstance(value, list):
            return [self.walk(v) for v in value]
        if isinstance(value, tuple):
            items = [self.walk(v) for v in value]
            return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
        if isinstance(value, set | frozenset):
            return type(value)(self.walk(v) for v in value)
        if isinstance(value, BaseMessage):
            return self._message(value)
        return value

    def _dict(self, value: dict[Any, Any]) -> dict[Any, Any]:
        binary = value.get("type") in _BINARY_BLOCKS
        out: dict[Any, Any] = {}
        for k, v in value.items():
            if binary and k in _BINARY_KEYS:
                clean = v
            else:
                clean = self._secret(v) if secret_key(k) else self.walk(v)
            key = self._key(k)
            if key is not k and key != k:  # redacted: it must not take another key's place
                base, n = key, 2
                while key in out or key in value:
                    key, n = f"{base!s} #{n}", n + 1
            out[key] = clean
        return out

    def _key(self, key: Any) -> Any:
        if isinstance(key, str):
            if key in _CLEAN_KEYS:
                return key
            clean = self.walk(key)
            room = len(_CLEAN_KEYS) < _CLEAN_KEYS_MAX  # once full, a new key is read each time
            if clean == key and self.kinds is None and len(key) <= 64 and room:
                _CLEAN_KEYS.add(key)
            return clean
        return self.walk(key) if isinstance(key, _SCANNED_KEYS) else key

    def _secret(self, value: Any) -> Any:
        """The value of a secret's key (`password`, `api_key`, ...): every scalar is hidden."""
        if "secret" not in (self.kinds or PII_KINDS) or value is None or isinstance(value, bool):
            return self.walk(value)
        if isinstance(value, str | bytes | int | float):
            return self.replacement("secret") if value != "" else value
        if isinstance(value, dict):
            return {k: self._secret(v) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return type(value)(self._secret(v) for v in value)
        return self.walk(value)

    def _message(self, message: BaseMessage) -> BaseMessage:
        update: dict[str, Any] = {"content": self.walk(message.content)}
        for field in ("tool_calls", "invalid_tool_calls"):
            calls = getattr(message, field, None)
            if calls:
                update[field] = [{**c, "args": self.walk(c.get("args"))} for c in calls]
        return message.model_copy(update=update)


def _check_kinds(kinds: Collection[PiiKind] | None) -> Collection[PiiKind]:
    if kinds is None:
        return PII_KINDS
    if isinstance(kinds, str):
        raise UserError(f"kinds must be a collection of kinds, e.g. [{kinds!r}], not a string.")
    unknown = sorted(set(kinds) - set(PII_KINDS))
    if unknown:
        raise UserError(f"kinds has unknown PII kinds {unknown}; use some of {list(PII_KINDS)}.")
    return frozenset(kinds)


class SanitizingFilter(logging.Filter):
    """A `logging.Filter` that redacts PII and secrets from each record's message and traceback.

    keel's loggers carry one (`sanitized_logger`), so a model error or a tool result quoted in
    a log line does not leak what the audit log and traces redact. A traceback (`exc_info`,
    e.g. `log.exception(...)`) is rendered here, redacted, and kept as the record's `exc_text`
    (which `logging.Formatter` prints); `exc_info` is then cleared, so no handler formats the
    raw exception (whose message and chained causes may quote tool arguments) itself. The same
    goes for `stack_info`.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact the record's message and traceback in place; never drops a record."""
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[0] is not None:
            record.exc_text = redact(_FORMATTER.formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        record.exc_info = None
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


_FORMATTER = logging.Formatter()


def sanitized_logger(name: str) -> logging.Logger:
    """`logging.getLogger(name)` with a `SanitizingFilter` (added once)."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, SanitizingFilter) for f in logger.filters):
        logger.addFilter(SanitizingFilter())
    return logger


sanitized_logger("keel")  # the package's own logger redacts too, whoever logs through it
