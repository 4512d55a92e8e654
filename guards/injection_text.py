"""Text views for injection detection: obfuscation undone, with a map back to the original.

Detection runs its patterns over a *view* of the text, not the text itself: lower-cased,
NFKC-folded (full-width letters become ASCII), invisible characters dropped, look-alike
Cyrillic / Greek letters inside Latin words folded to Latin, leetspeak inside words read as
letters (`1gn0r3` → `ignore`) and spaced-out words joined (`I G N O R E`, `r.u.l.e.s`). A view
keeps, for every character, the index of the original character it came from, so a finding's
span always points into the text that was checked.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

__all__ = ["View", "squeezed", "view_of"]

# zero-width and formatting characters that render as nothing; Unicode tag characters too
_INVISIBLE = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e"
    "\u2060-\u2064\u2066-\u206f\ufe00-\ufe0f\ufeff\U000e0000-\U000e007f]"
)
# Cyrillic and Greek letters that look like Latin ones (after casefold), by the Latin letter
_LOOKALIKES = {
    "a": "\u0430\u03b1",
    "b": "\u0432\u03b2",
    "c": "\u0441\u03f2",
    "d": "\u0501",
    "e": "\u0435\u03b5",
    "h": "\u04bb\u043d",
    "i": "\u0456\u03b9",
    "j": "\u0458",
    "k": "\u043a\u03ba",
    "l": "\u04cf",
    "m": "\u043c",
    "n": "\u03b7",
    "o": "\u043e\u03bf",
    "p": "\u0440\u03c1",
    "q": "\u051b",
    "s": "\u0455",
    "t": "\u0442\u03c4",
    "u": "\u03c5",
    "v": "\u03bd",
    "w": "\u051d",
    "x": "\u0445\u03c7",
    "y": "\u0443",
}
_HOMOGLYPHS = str.maketrans({c: latin for latin, cs in _LOOKALIKES.items() for c in cs})
_HOMOGLYPH_CHARS = frozenset("".join(_LOOKALIKES.values()))
_LEET = str.maketrans("013457", "oieast")
# from a word's start only: `\w*` tried from every letter of a long ASCII word (a base64 blob
# in a tool's result) read the rest of it each time, in time the square of its length
_NON_ASCII_WORD = re.compile(r"(?<!\w)\w*[^\x00-\x7f]\w*")
_ASCII_RUN_OR_CHAR = re.compile(r"[\x00-\x7f]+|[^\x00-\x7f]")
_LEET_WORD = re.compile(r"(?<![\w@.])(?=[a-z0-9]*[a-z])(?=[a-z0-9]*[013457])[a-z0-9]+")
# three or more single letters, each followed by one separator: "i g n o r e", "r.u.l.e.s"
_SPACED = re.compile(r"(?<![^\W\d_])(?:[^\W\d_][ .\-_*·|/]){2,}[^\W\d_](?![^\W\d_])")
_SPACED_SEP = re.compile(r"[ .\-_*·|/]")
# a word with punctuation inside: "ig.nore", "prev-ious"; squeezed only when that hides a
# word detection looks for (domains, file names and snake_case stay as they are). Matched from
# a word's start, possessively: else a long run of letters costs time quadratic in its length.
_PUNCTUATED_WORD = re.compile(r"(?<![a-z])[a-z]++(?:[.\-_*·'][a-z]++)+")
_INNER_PUNCT = re.compile(r"[.\-_*·']")
_HIDDEN_STEMS = (
    "ignor",
    "disregard",
    "forget",
    "overrid",
    "bypass",
    "instruct",
    "previous",
    "prior",
    "prompt",
    "system",
    "rules",
    "guideline",
    "assistant",
    "reveal",
    "password",
    "secret",
)


@dataclass(frozen=True, slots=True)
class View:
    """A transformed text and, per character, the index of the original character."""

    text: str
    origin: tuple[int, ...]

    def span(self, start: int, end: int) -> tuple[int, int]:
        """The original span of `text[start:end]` (a non-empty match)."""
        return self.origin[start], self.origin[max(start, end - 1)] + 1

    def without(self, drop: set[int]) -> View:
        """The view with the characters at the indices in `drop` removed."""
        if not drop:
            return self
        keep = [i for i in range(len(self.text)) if i not in drop]
        return View("".join(self.text[i] for i in keep), tuple(self.origin[i] for i in keep))


def view_of(text: str) -> View:
    """The base view: folded, de-obfuscated letters, same words."""
    if text.isascii() and not _INVISIBLE.search(text):
        folded, origin = text.lower(), tuple(range(len(text)))
    else:
        pieces: list[str] = []
        where: list[int] = []
        for m in _ASCII_RUN_OR_CHAR.finditer(text):
            start, chunk = m.start(), m.group()
            if chunk.isascii():
                pieces.append(chunk.lower())
                where.extend(range(start, m.end()))
            elif not _INVISIBLE.match(chunk):
                folded_char = unicodedata.normalize("NFKC", chunk).casefold()
                pieces.append(folded_char)
                where.extend([start] * len(folded_char))
        folded, origin = _fold_homoglyphs("".join(pieces)), tuple(where)
    folded = _LEET_WORD.sub(lambda m: m.group().translate(_LEET), folded)
    drop = {
        m.start() + i
        for m in _SPACED.finditer(folded)
        for i, ch in enumerate(m.group())
        if _SPACED_SEP.fullmatch(ch)
    }
    return View(folded, origin).without(drop)


def squeezed(view: View) -> View:
    """`view` with punctuation inside words removed where it hides a word (`ig.nore`)."""
    drop: set[int] = set()
    for m in _PUNCTUATED_WORD.finditer(view.text):
        word = m.group()
        joined = _INNER_PUNCT.sub("", word)
        if any(stem in joined and stem not in word for stem in _HIDDEN_STEMS):
            drop.update(m.start() + p.start() for p in _INNER_PUNCT.finditer(word))
    return view.without(drop)


def mixed_script_words(text: str) -> list[tuple[int, int]]:
    """Spans of words that mix Latin letters with Cyrillic / Greek look-alikes."""
    spans = []
    for m in _NON_ASCII_WORD.finditer(text):
        word = m.group().lower()
        if any("a" <= c <= "z" for c in word) and _HOMOGLYPH_CHARS.intersection(word):
            spans.append(m.span())
    return spans


def _fold_homoglyphs(text: str) -> str:
    if text.isascii():
        return text
    parts: list[str] = []
    last = 0
    for start, end in mixed_script_words(text):
        parts.extend((text[last:start], text[start:end].translate(_HOMOGLYPHS)))
        last = end
    return "".join([*parts, text[last:]])
