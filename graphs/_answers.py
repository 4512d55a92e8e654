"""`stream_mode="messages"` under an output guard: answers are sent once checked.

LangGraph relays a model's tokens as they arrive and drops a later message with an id it has
already streamed, so the output guard's redacted copy of an answer would never reach a client
of the `messages` stream: it would read the raw tokens. With an output guard, keel's graphs hold
each AI message's tokens until the message is complete (LangChain ends every streamed message
with a `chunk_position="last"` chunk), check it as `output_guard` does (`screen_answer`), and
send it as one chunk: redacted, flagged or withheld. A turn that calls tools is sent as it is
(the output guard checks answers, not tool calls). The other modes are not touched.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.messages import AIMessage, AIMessageChunk

from keel.graphs._chunks import ChunkShape
from keel.guards.content import OutputGuardPolicy
from keel.guards.screening import screen_answer

__all__ = ["AnswerStream"]


class AnswerStream:
    """Holds the AI messages of a `messages` stream until the output guard checked them."""

    def __init__(self, policy: OutputGuardPolicy, shape: ChunkShape) -> None:
        self.policy = policy
        self.shape = shape
        self._held: dict[str, tuple[AIMessageChunk, Any, Any, Any]] = {}

    def feed(self, chunk: Any) -> list[Any]:
        """The chunks to send now for `chunk` (none while an answer is being held)."""
        parts = self.shape.parts(chunk)
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
            if held is not None:
                message = held[0] + message
            if message.chunk_position != "last":
                self._held[key] = (message, meta, ns, chunk)
                return []
        return [self._checked(message, meta, ns, chunk)]

    def flush(self) -> list[Any]:
        """What is still held (a stream that ended mid-message), checked."""
        held, self._held = self._held, {}
        return [self._checked(m, meta, ns, like) for m, meta, ns, like in held.values()]

    def _checked(self, message: AIMessage, meta: Any, ns: Any, like: Any) -> Any:
        if not message.tool_calls and not getattr(message, "tool_call_chunks", None):
            message = screen_answer(message, self.policy) or message
        return self.shape.make(ns, "messages", (message, meta), like)

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
