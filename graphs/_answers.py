"""Streams under an output guard: answers are sent once checked, in every mode that carries them.

LangGraph relays a model's tokens as they arrive and drops a later message with an id it has
already streamed, so the output guard's redacted copy of an answer would never reach a client
of the `messages` stream: it would read the raw tokens. With an output guard, keel's graphs hold
each AI message's tokens until the message is complete (LangChain ends every streamed message
with a `chunk_position="last"` chunk), check it as `output_guard` does (`screen_answer`), and
send it as one chunk: redacted, flagged or withheld. (Under an output guard `call_model` asks its
model with LangGraph's `nostream` tag, so its answers reach a `messages` stream whole, as the
node returns them, in a user's graph that embeds the agent too; the holding here is for any
other AI message a keel graph's stream relays token by token. keel's structured calls, a plan,
a route, a verdict, are asked `nostream` always (`keel.guards.model_call.unstreamed`): they
reach no `messages` stream, this one included.)

The `values` and `updates` modes carry the state between `call_model` and `output_guard` too
(the state after `call_model`'s step, and `call_model`'s own update): an AI answer there that is
not the output guard's own copy (`is_checked_answer`: its text and note as the guard wrote them
in this process; a note on another text, which a model or a client can write, does not count)
is sent checked.

Each answer is scanned once in all: `screen_answer` keeps the verdicts of the answers it
checked, keyed on a digest of their text, so the node that wrote an answer, `output_guard` and
this check read one verdict (the first of them to read the text reaches it).
The thread's history, as the stream's first `values` of a graph (or subgraph) holds it, is sent
as it is saved: its answers were checked by their own runs, and reading them again on every run
would cost each run a check of the whole history. What a caller wrote that the input guard has
not read yet (marked `SENT_KEY`: a state update's or a `Command(update=...)`'s assistant turn)
is no history: it is checked as an answer (in a graph without an input guard nothing is
marked, and a caller's turns are history as saved).

A turn that calls tools is sent as it is, and so are tool results (the output guard checks
answers, not tool calls). The other modes (`debug`, `tasks`, `checkpoints`, `custom`) are not
touched.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import add_ai_message_chunks

from keel.graphs._chunks import ChunkShape
from keel.guards.content import OutputGuardPolicy
from keel.guards.screening import SENT_KEY, is_checked_answer, screen_answer

__all__ = ["AnswerStream"]


def _merged(parts: list[AIMessageChunk]) -> AIMessageChunk:
    """One message of its streamed chunks, merged at once (the text copied once)."""
    return parts[0] if len(parts) == 1 else add_ai_message_chunks(parts[0], *parts[1:])


class AnswerStream:
    """Holds a `messages` stream's AI messages until checked; checks `values` / `updates`."""

    def __init__(self, policy: OutputGuardPolicy, shape: ChunkShape) -> None:
        self.policy = policy
        self.shape = shape
        self._held: dict[str, tuple[list[AIMessageChunk], Any, Any, Any]] = {}
        """The chunks of each message being held, merged once it is complete: added one by one,
        each sum copied the text so far (a 1 MB answer in 170,000 tokens: about 10 s)."""
        self._screened: dict[int, tuple[AIMessage, AIMessage]] = {}
        self._namespaces: set[str] = set()
        """The namespaces whose first `values` (their history) went by."""
        self._known: set[str] = set()
        """The ids of the history's messages (of every namespace): sent as saved."""

    def feed(self, chunk: Any) -> list[Any]:
        """The chunks to send now for `chunk` (none while an answer is being held)."""
        parts = self.shape.parts(chunk)
        if parts is not None and parts[1] in ("values", "updates"):
            ns, mode, payload = parts
            if mode == "values":
                self._first(ns, payload)
            checked = self._state(payload) if mode == "values" else self._updates(payload)
            return [chunk if checked is payload else self.shape.make(ns, mode, checked, chunk)]
        if parts is None or parts[1] != "messages":
            return [chunk]
        ns, _, payload = parts
        if not (isinstance(payload, tuple | list) and len(payload) == 2):
            return [chunk]
        message, meta = payload
        if not isinstance(message, AIMessage):
            return [chunk]
        key = f"{ns}/{message.id}"
        held = self._held.pop(key, None)
        if isinstance(message, AIMessageChunk):
            pieces = held[0] if held is not None else []
            pieces.append(message)
            if message.chunk_position != "last":
                self._held[key] = (pieces, meta, ns, chunk)
                return []
            message = _merged(pieces)
        return [self._checked(message, meta, ns, chunk)]

    def flush(self) -> list[Any]:
        """What is still held (a stream that ended mid-message), checked."""
        held, self._held = self._held, {}
        return [self._checked(_merged(p), meta, ns, like) for p, meta, ns, like in held.values()]

    def _checked(self, message: AIMessage, meta: Any, ns: Any, like: Any) -> Any:
        if not message.tool_calls and not getattr(message, "tool_call_chunks", None):
            message = self._guarded(message)
        return self.shape.make(ns, "messages", (message, meta), like)

    def _guarded(self, message: AIMessage) -> AIMessage:
        """An answer as the output guard lets a client read it (its own copy goes as it is)."""
        if is_checked_answer(message, self.policy):  # its note on another text is checked
            return message
        return screen_answer(message, self.policy) or message

    def _first(self, ns: Any, values: Any) -> bool:
        """Whether `values` is the first of its namespace: the history, kept as saved."""
        key = "|".join(map(str, ns)) if isinstance(ns, tuple | list) else str(ns)
        if key in self._namespaces:
            return False
        self._namespaces.add(key)
        messages = values.get("messages") if isinstance(values, dict) else None
        # what a caller wrote this run (`SENT_KEY`: a state update, Command(update=...), input)
        # is no history: an assistant turn of the caller's making is checked as an answer
        self._known |= {
            m.id
            for m in messages or []
            if isinstance(m, BaseMessage) and m.id and SENT_KEY not in m.response_metadata
        }
        return True

    def _updates(self, payload: Any) -> Any:
        """An `updates` payload (`{node: update}`) with its unchecked answers checked."""
        if not isinstance(payload, dict):
            return payload
        checked = {node: self._state(update) for node, update in payload.items()}
        same = all(checked[node] is update for node, update in payload.items())
        return payload if same else checked

    def _state(self, values: Any) -> Any:
        """State values (or one node's update) with the answers no output guard checked, checked.

        `values` itself when there is nothing to change.
        """
        messages = values.get("messages") if isinstance(values, dict) else None
        if not isinstance(messages, list):
            return values
        checked: list[Any] | None = None  # a copy from the first message the guard changes
        known = self._known
        for i, message in enumerate(messages):
            if (
                isinstance(message, AIMessage)
                and not message.tool_calls
                and message.id not in known
            ):
                new = self._answer(message)
            else:
                new = message  # no answer, or one read before: as it is
            if checked is not None:
                checked.append(new)
            elif new is not message:
                checked = [*messages[:i], new]
        return values if checked is None else {**values, "messages": checked}

    def _answer(self, message: AIMessage) -> Any:
        """`message` (an answer no one has read) as the output guard lets a client read it."""
        seen = self._screened.get(id(message))
        if seen is not None and seen[0] is message:  # each message is read once a stream
            return seen[1]
        screened = self._guarded(message)
        self._screened[id(message)] = (message, screened)
        return screened

    def guard(self, chunks: Iterator[Any]) -> Iterator[Any]:
        """`chunks`, with answers held until checked."""
        for chunk in chunks:
            yield from self.feed(chunk)
        yield from self.flush()

    async def aguard(self, chunks: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """`guard` for an async stream."""
        async for chunk in chunks:
            for out in self.feed(chunk):
                yield out
        for out in self.flush():
            yield out
