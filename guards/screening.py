"""The content guards applied to messages: what the model reads, and what the user gets.

`check_input` / `check_output` (`keel.guards.content`) decide about one text; these functions
apply them to LangChain messages, for the graph's guard nodes (`keel.nodes.input_guard`,
`keel.nodes.output_guard`), `execute_tools` and the `create_agent` middleware alike:

- `screen_inputs(messages, policy, sent=...)`: the user's messages of the new task (those after
  the last AI message, and every one the run's input sent, AI and system turns included), and
  the results of the last round of tool calls (and any the input sent);
- `screen_answer(message, policy)`: a final or partial answer.

A message a guard acted on (flag, redact or block) is returned as a copy with the same id, so
LangGraph's `add_messages` replaces it in state, and carries what was found in
`response_metadata["keel_guard"]` (`GuardNote`), which the audit log and the run record read.
"""

from __future__ import annotations

import copy
import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from langchain_core.messages import (
    AIMessage,
    AnyMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from typing_extensions import TypedDict

from keel import outcome
from keel.guards.content import (
    ContentFinding,
    ContentVerdict,
    InputGuardPolicy,
    OutputGuardPolicy,
    check_input,
    check_output,
)
from keel.guards.injection import awaits, off_loop
from keel.state import Outcome

__all__ = [
    "GUARD_KEY",
    "SENT_KEY",
    "GuardNote",
    "Screened",
    "ascreen_human_text",
    "ascreen_inputs",
    "ascreen_tool_result",
    "checked_answer",
    "guard_note",
    "guard_notes",
    "is_checked_answer",
    "mark_sent",
    "screen_answer",
    "screen_human_text",
    "screen_inputs",
    "screen_tool_result",
]

T = TypeVar("T")

GUARD_KEY = "keel_guard"
"""The `response_metadata` key of a message a content guard acted on."""

SENT_KEY = "keel_sent"
"""`response_metadata` key marking a message a caller wrote (a run's input, or a state update)
that the input guard has not read yet; keel's graphs set it, and `input_guard` removes it once
it read the message. A caller that sets it only has its message checked."""

_SEVERITY = {"allow": 0, "flag": 1, "redact": 2, "block": 3}
_WHOSE = {
    "human": "user's message",
    "ai": "assistant turn the caller sent",
    "system": "system message the caller sent",
}


class GuardNote(TypedDict):
    """What a content guard did to one message (in `response_metadata["keel_guard"]`)."""

    guard: Literal["input", "output"]
    source: Literal["user", "tool", "answer", "memory"]
    action: str
    """`flag`, `redact` or `block`."""
    rules: list[str]
    excerpts: list[str]


@dataclass(frozen=True, slots=True)
class Screened:
    """The outcome of screening messages: replacements to write and a block, if any."""

    messages: list[BaseMessage] = field(default_factory=list)
    """Copies (same ids) of the messages a guard acted on, to replace the originals."""
    blocked: str | None = None
    """Why a user message was refused (the run ends); `None` when none was."""


def screen_inputs(
    messages: Sequence[AnyMessage], policy: InputGuardPolicy, *, sent: Collection[str] = ()
) -> Screened:
    """Screen what the model is about to read for the first time.

    That is every user message after the last AI message (the new task) and the tool results
    after it (the last round of calls); and, wherever they are, the user messages and tool
    results a caller wrote: those marked `SENT_KEY` (keel's graphs mark what a run's input or a
    state update writes, which may hold AI turns of the caller's making) or whose ids are in
    `sent`. A marked message comes back without its mark. An AI or system message a caller
    wrote is the caller's text too (the model would read it as its own turn, or as its
    instructions), so it is checked as a user message is. A blocked user, AI or system message
    is replaced by a notice and ends the run (`blocked`); a blocked tool result is replaced by
    an error result the model can act on. A `keel_guard` note already on a message is trusted
    only as far as checking it again gives the same: only keel writes it, but a client can
    send one.
    """
    start = next(
        (i + 1 for i in range(len(messages) - 1, -1, -1) if isinstance(messages[i], AIMessage)),
        0,
    )
    sent = frozenset(sent)
    out: list[BaseMessage] = []
    blocked: str | None = None
    for i, m in enumerate(messages):
        marked = SENT_KEY in m.response_metadata
        caller = marked or m.id in sent
        if i < start and not caller:
            continue
        read = _without(m, SENT_KEY) if marked else m
        screened: BaseMessage | None = None
        if isinstance(read, HumanMessage) or (
            isinstance(read, AIMessage | SystemMessage) and caller
        ):
            screened, message = _screen_user(read, policy)
            blocked = blocked or message
        elif isinstance(read, ToolMessage):
            screened = screen_tool_result(read, policy)
        # A message a guard acted on before (a tool result checked as it came in) comes out as
        # it went in: nothing to replace, nothing to audit again. A note keel did not write
        # (a client can send one) does not: the message is replaced by its checked copy. A
        # marked message is replaced by its copy without the mark: it has been read.
        result = read if screened is None else screened
        if result != m:
            out.append(result)
    return Screened(out, blocked)


async def ascreen_inputs(
    messages: Sequence[AnyMessage], policy: InputGuardPolicy, *, sent: Collection[str] = ()
) -> Screened:
    """`screen_inputs` for async code: an async detector (`ModelDetector`) is awaited."""
    return await _off_loop(policy, screen_inputs, messages, policy, sent=sent)


async def ascreen_tool_result(message: ToolMessage, policy: InputGuardPolicy) -> ToolMessage | None:
    """`screen_tool_result` for async code: an async detector (`ModelDetector`) is awaited."""
    return await _off_loop(policy, screen_tool_result, message, policy)


async def ascreen_human_text(text: str, policy: InputGuardPolicy) -> tuple[str, GuardNote | None]:
    """`screen_human_text` for async code: an async detector (`ModelDetector`) is awaited."""
    return await _off_loop(policy, screen_human_text, text, policy)


async def _off_loop(policy: InputGuardPolicy, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)`, here with keel's heuristics, else on a worker thread.

    There `detect` awaits the detector on this loop (`keel.guards.injection.off_loop`).
    """
    if not awaits(policy.detector):
        return fn(*args, **kwargs)
    return await off_loop(fn, *args, **kwargs)


def mark_sent(message: BaseMessage) -> BaseMessage:
    """A copy of `message` marked as written by a caller (`SENT_KEY`): the input guard reads it."""
    meta = {**message.response_metadata, SENT_KEY: True}
    return message.model_copy(update={"response_metadata": meta})


def _without(message: BaseMessage, key: str) -> BaseMessage:
    """A copy of `message` without `key` in its `response_metadata` (keel's mark or note)."""
    meta = {k: v for k, v in message.response_metadata.items() if k != key}
    return message.model_copy(update={"response_metadata": meta})


def screen_tool_result(message: ToolMessage, policy: InputGuardPolicy) -> ToolMessage | None:
    """A tool result as the model may read it, or `None` when the guard leaves it as it is."""
    verdict = _verdict(
        message.content,
        lambda text: check_input(text, policy, source="tool"),
        policy.max_chars,
    )
    if verdict is None:
        return None
    action, content, findings, _ = verdict
    note = guard_note("input", "tool", action, findings)
    meta = {**message.response_metadata, GUARD_KEY: note}
    if action == "block":
        meta["keel_status"] = "blocked"
        return message.model_copy(
            update={
                "content": f"Error: the result of {message.name or 'this tool'} was withheld by "
                f"the input guard ({_refusal(findings)}). Go on without it, or tell the user.",
                "status": "error",
                "response_metadata": meta,
            }
        )
    return message.model_copy(update={"content": content, "response_metadata": meta})


def _screen_user(
    message: BaseMessage, policy: InputGuardPolicy
) -> tuple[BaseMessage | None, str | None]:
    verdict = _verdict(
        message.content,
        lambda text: check_input(text, policy, source="user"),
        policy.max_chars,
    )
    if verdict is None:
        if isinstance(message, HumanMessage) and GUARD_KEY in message.response_metadata:
            # only keel writes this note on a user's message (an answer's is the output guard's)
            return _without(message, GUARD_KEY), None
        return None, None
    action, content, findings, _ = verdict
    meta = {**message.response_metadata, GUARD_KEY: guard_note("input", "user", action, findings)}
    if action == "block":
        notice = f"[withheld by the input guard: {', '.join(_rules(findings))}]"
        why = f"the input guard blocked the {_WHOSE[message.type]} ({_refusal(findings)})"
        return message.model_copy(update={"content": notice, "response_metadata": meta}), why
    return message.model_copy(update={"content": content, "response_metadata": meta}), None


def screen_human_text(text: str, policy: InputGuardPolicy) -> tuple[str, GuardNote | None]:
    """A human reviewer's text as the model may read it, and the guard's note (or `None`).

    That is a `respond` answer or a rejection's message. It comes from a client, as a user's
    message does, so it is checked as one (`source="user"`); a blocked text is replaced by a
    notice naming the rules.
    """
    verdict = _verdict(text, lambda t: check_input(t, policy, source="user"))
    if verdict is None:
        return text, None
    action, content, findings, _ = verdict
    if action == "block":
        content = f"[withheld by the input guard: {', '.join(_rules(findings))}]"
    return str(content), guard_note("input", "user", action, findings)


def screen_answer(message: AIMessage, policy: OutputGuardPolicy) -> AIMessage | None:
    """An answer as the user may see it, or `None` when the guard leaves it as it is.

    An answer is checked once (`_ANSWERS`): the node that writes it, the `output_guard` node
    and a stream's answer check (`keel.graphs._answers`) all read the same text, and each
    reads the verdict the first one reached.
    """
    verdict = _ANSWERS.verdict(message.content, policy)
    if verdict is None:
        return None
    action, content, findings, why = verdict
    note = guard_note("output", "answer", action, findings)
    if action == "block":
        content = why
    _ANSWERS.produced(content, note, policy)
    meta = {**message.response_metadata, GUARD_KEY: note}
    return message.model_copy(update={"content": content, "response_metadata": meta})


def is_checked_answer(message: AIMessage, policy: OutputGuardPolicy) -> bool:
    """Whether `message` is a copy `screen_answer` made in this process under `policy`.

    That is its text and its `keel_guard` note together, as the guard wrote them. The note
    alone proves nothing: a model or a client can write one on any text.
    """
    note = message.response_metadata.get(GUARD_KEY)
    if not isinstance(note, dict) or note.get("guard") != "output":
        return False
    return _ANSWERS.was_produced(message.content, note, policy)


class _Kept:
    """The last `entries` values by key, holding `chars` characters of them at most in all.

    Not locked: its owner holds its lock around each call.
    """

    def __init__(self, entries: int, chars: int) -> None:
        self.entries, self.most = entries, chars
        self.chars = 0
        """The characters the values kept hold (as `put` was told)."""
        self._values: OrderedDict[Any, tuple[Any, int]] = OrderedDict()

    def find(self, key: Any) -> tuple[bool, Any]:
        """Whether `key` is kept, and its value (made the most recent)."""
        found = self._values.get(key)
        if found is None:
            return False, None
        self._values.move_to_end(key)
        return True, found[0]

    def put(self, key: Any, value: Any, chars: int = 0) -> None:
        """Keep `value` (of `chars` characters), dropping the oldest past either bound."""
        if chars > self.most:
            return  # kept, it would push out every other
        _, was = self._values.pop(key, (None, 0))
        self._values[key] = (value, chars)
        self.chars += chars - was
        while len(self._values) > self.entries or self.chars > self.most:
            _, (_, size) = self._values.popitem(last=False)
            self.chars -= size


class _CheckedAnswers:
    """The verdicts of the last answers checked in this process, keyed on their text's digest.

    `check_output` reads nothing but the text and the policy, so an answer read again (by
    `output_guard` after the node that wrote it, by a stream's answer check) gets the verdict
    without being scanned again: about 0.25 µs a character each time. Keyed on a BLAKE2 digest
    of the text itself, nothing a model or a client writes on a message (an id, a note in its
    metadata) makes a text pass as checked: only the text that was checked does. The guard's
    own copies (redacted or withheld) are kept with their note (`was_produced`), so that a
    stream sends them as they are; a note on any other text is checked again. Two threads that
    ask about one text at once (a sync stream's answer check beside the run's node) share one
    read of it. What is kept is bounded twice: the last `_SIZE` texts, and `_CHARS` characters
    of the guard's copies in all (a server that redacts many long answers keeps the last few).
    """

    _SIZE = 256
    _CHARS = 16_000_000

    def __init__(self, *, chars: int | None = None) -> None:
        self._lock = threading.Lock()
        self._verdicts = _Kept(self._SIZE, self._CHARS if chars is None else chars)
        """`_Verdict | None` by (policy, digest of the text read)."""
        self._produced = _Kept(self._SIZE, self._CHARS)
        """The guard's note by (policy, digest of the copy it made)."""
        self._reading: dict[tuple[OutputGuardPolicy, bytes], threading.Event] = {}
        """The texts a thread is checking now: another thread that asks waits for its verdict."""

    def verdict(self, content: Any, policy: OutputGuardPolicy) -> _Verdict | None:
        key = _digest(content)
        if key is None:  # not JSON-like: checked every time
            return _verdict(content, lambda text: check_output(text, policy), policy.max_chars)
        while True:
            with self._lock:
                kept, found = self._verdicts.find((policy, key))
                if kept:
                    return _copied(found)
                reading = self._reading.get((policy, key))
                if reading is None:  # this thread reads it; another one asking waits for it
                    reading = self._reading[policy, key] = threading.Event()
                    break
            reading.wait()  # then the verdict is kept (or the read failed: read it here)
        try:
            found = _verdict(content, lambda text: check_output(text, policy), policy.max_chars)
            size = 0 if found is None else _size(found[1])
            with self._lock:
                self._verdicts.put((policy, key), _copied(found), size)
        finally:
            with self._lock:
                del self._reading[policy, key]
            reading.set()
        return found

    def produced(self, content: Any, note: GuardNote, policy: OutputGuardPolicy) -> None:
        key = _digest(content)
        if key is not None:
            with self._lock:
                self._produced.put((policy, key), copy.deepcopy(note))

    def was_produced(self, content: Any, note: Any, policy: OutputGuardPolicy) -> bool:
        key = _digest(content)
        if key is None:
            return False
        with self._lock:
            kept, found = self._produced.find((policy, key))
        return kept and found == note

    @property
    def kept_chars(self) -> int:
        """The characters of answers the kept verdicts hold (bounded by `_CHARS`)."""
        return self._verdicts.chars


def _digest(content: Any) -> bytes | None:
    """A digest of a message's content (text or blocks), or `None` for content JSON can't hold."""
    if isinstance(content, str):
        kind, text = b"s", content
    else:
        try:
            kind, text = b"j", json.dumps(content, sort_keys=True, ensure_ascii=False)
        except (TypeError, ValueError):
            return None
    data = text.encode("utf-8", "surrogatepass")
    return hashlib.blake2b(kind + data, digest_size=32).digest()


def _size(content: Any) -> int:
    """About how many characters `content` (a text, or content blocks) holds."""
    if isinstance(content, str):
        return len(content)
    return len(json.dumps(content, ensure_ascii=False, default=str))


def _copied(verdict: _Verdict | None) -> _Verdict | None:
    """`verdict` with its own content and findings (a caller may change what it got)."""
    if verdict is None:
        return None
    action, content, findings, why = verdict
    return action, copy.deepcopy(content), list(findings), why


_ANSWERS = _CheckedAnswers()


def checked_answer(
    message: AIMessage, policy: OutputGuardPolicy | None, result: Outcome
) -> tuple[AIMessage, Outcome]:
    """An answer as the user may see it, and the run's outcome with it.

    The node that writes an answer checks it, so the thread never saves the unchecked one (its
    history would show it). The outcome is `result`, or `stopped/blocked` when the guard
    withholds the answer.
    """
    screened = screen_answer(message, policy) if policy is not None else None
    if screened is None:
        return message, result
    if screened.response_metadata[GUARD_KEY]["action"] == "block":
        return screened, outcome.stopped("blocked", screened.text)
    return screened, result


def guard_notes(messages: Sequence[BaseMessage]) -> list[GuardNote]:
    """The notes content guards left on `messages`, in order."""
    out = []
    for m in messages:
        note = m.response_metadata.get(GUARD_KEY)
        if isinstance(note, dict) and note.get("action") in _SEVERITY:
            out.append(note)
    return out  # type: ignore[return-value]


# -- one text or a list of content blocks ----------------------------------------------------

_Verdict = tuple[str, Any, list[ContentFinding], str]


def _verdict(
    content: Any, check: Callable[[str], ContentVerdict], max_chars: int | None = None
) -> _Verdict | None:
    """`(action, new content, findings, block message)`, or `None` when nothing was found.

    For a list of content blocks every text block is checked; the most severe action wins. The
    model reads the blocks as one text, so their text is checked as one too: when that finds
    more (an injection or a secret split across blocks), or the blocks are longer together than
    `max_chars` (the policy's size limit holds for the message's whole text), the verdict is
    the whole text's, and a redacted or blocked text becomes one text block.
    """
    if isinstance(content, str):
        v = check(content)
        if v.action == "allow":
            return None
        return v.action, v.text, list(v.findings), v.message or ""
    if not isinstance(content, list):
        return None
    return _with_other_texts(_text_blocks_verdict(content, check, max_chars), content, check)


def _text_blocks_verdict(
    content: list[Any], check: Callable[[str], ContentVerdict], max_chars: int | None
) -> _Verdict | None:
    """`_verdict` of the text blocks of `content` (see there)."""
    texts = [t for t in map(_block_text, content) if t is not None]
    blockwise = _blockwise(content, check)
    if len(texts) < 2:
        return blockwise
    over = max_chars is not None and sum(map(len, texts)) > max_chars
    whole = _verdict("".join(texts), check)
    if whole is None or not (over or _finds_more(whole, blockwise)):
        return None if over else blockwise
    verdict, text, found, message = whole
    if verdict != "flag":  # a flag passes the blocks on as they are
        rest = [b for b in content if _block_text(b) is None]
        content = [{"type": "text", "text": text}, *rest]
    return verdict, content, found, message


def _with_other_texts(
    verdict: _Verdict | None, content: list[Any], check: Callable[[str], ContentVerdict]
) -> _Verdict | None:
    """`verdict` with the other texts of the blocks checked too, each on its own.

    A model's `thinking` or `reasoning` block, a citation's title, an `output_text` block are
    in the saved answer as a client reads it, and a hostile or injected model writes there what
    the guard would redact from a `text` block. Only keys that are no one's text (`_OPAQUE`:
    ids, signatures, encoded data, URLs) are left as they are.
    """
    blocks = content if verdict is None else verdict[1]
    others: list[ContentVerdict] = []
    checked = [
        b
        if isinstance(b, str)
        else _texts_checked(b, check, others, skip="text" if _block_text(b) is not None else "")
        for b in blocks
    ]
    if not others:
        return verdict
    action, found, why = (
        ("allow", [], "") if verdict is None else (verdict[0], verdict[2], verdict[3])
    )
    for v in others:
        if _SEVERITY[v.action] > _SEVERITY[action]:
            action, why = v.action, v.message or why
    return action, checked, [*found, *(f for v in others for f in v.findings)], why


_OPAQUE = frozenset(
    {"type", "id", "signature", "index", "data", "base64", "mime_type", "encrypted_content"}
    | {"url", "image_url", "file_id", "source_type"}
)
"""The keys of a content block that hold no one's text (an id, a signature, encoded data)."""


def _texts_checked(
    value: Any, check: Callable[[str], ContentVerdict], found: list[ContentVerdict], skip: str = ""
) -> Any:
    """`value` (a block or a part of one) with each text in it checked.

    A dict's `skip` key is left out (checked already); the verdicts that found something are
    added to `found`.
    """
    if isinstance(value, str):
        v = check(value)
        if v.action == "allow":
            return value
        found.append(v)
        return v.text
    if isinstance(value, dict):
        return {
            k: v if k in _OPAQUE or k == skip else _texts_checked(v, check, found)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_texts_checked(v, check, found) for v in value]
    return value


def _blockwise(content: list[Any], check: Callable[[str], ContentVerdict]) -> _Verdict | None:
    """The verdict of checking each text block of `content` on its own."""
    action, why = "allow", ""
    findings: list[ContentFinding] = []
    blocks: list[Any] = []
    for block in content:
        text = _block_text(block)
        if text is None:
            blocks.append(block)
            continue
        v = check(text)
        findings.extend(v.findings)
        if _SEVERITY[v.action] > _SEVERITY[action]:
            action, why = v.action, v.message or why
        blocks.append(v.text if isinstance(block, str) else {**block, "text": v.text})
    if action == "allow":
        return None
    return action, blocks, findings, why


def _finds_more(whole: _Verdict, blockwise: _Verdict | None) -> bool:
    """Whether checking the whole text found what checking block by block missed."""
    if blockwise is None:
        return True
    return _SEVERITY[whole[0]] > _SEVERITY[blockwise[0]] or len(whole[2]) > len(blockwise[2])


def _block_text(block: Any) -> str | None:
    if isinstance(block, str):
        return block
    if (
        isinstance(block, dict)
        and block.get("type") == "text"
        and isinstance(block.get("text"), str)
    ):
        return str(block["text"])
    return None


def _refusal(findings: Sequence[ContentFinding]) -> str:
    """Why an input was refused, in rule names only: the refused text is never repeated."""
    rules = _rules(findings)
    size = next((f for f in findings if f.rule == "max_chars"), None)
    parts = [f"{size.end} characters, more than max_chars={size.start}"] if size else []
    injections = [r for r in rules if r != "max_chars"]
    if injections:
        parts.append(f"it looks like a prompt injection: {', '.join(injections)}")
    return "; ".join(parts)


def _rules(findings: Sequence[ContentFinding]) -> list[str]:
    return list(dict.fromkeys(f.rule for f in findings))


def guard_note(
    guard: Literal["input", "output"],
    source: Literal["user", "tool", "answer", "memory"],
    action: str,
    findings: Sequence[ContentFinding],
) -> GuardNote:
    """The note a guard leaves on a message it acted on (rules and excerpts, no full text)."""
    return {
        "guard": guard,
        "source": source,
        "action": action,
        "rules": _rules(findings),
        "excerpts": list(dict.fromkeys(f.excerpt for f in findings))[:5],
    }
