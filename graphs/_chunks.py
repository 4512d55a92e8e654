"""The shapes of LangGraph's stream chunks: split one into (namespace, mode, payload), or make one.

v1 has four shapes (one mode or several, with or without subgraphs); v2 yields stream parts
(`{"type", "ns", "data", ...}`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["ChunkShape"]


class ChunkShape:
    """How a stream called with `kwargs` (or the graph's `graph_mode`) shapes its chunks."""

    def __init__(self, graph_mode: Any, kwargs: dict[str, Any]) -> None:
        modes = kwargs.get("stream_mode") or graph_mode
        self.single = isinstance(modes, str)
        self.modes: Sequence[str] = [modes] if isinstance(modes, str) else list(modes)
        self.subgraphs = bool(kwargs.get("subgraphs"))
        self.v2 = kwargs.get("version") == "v2"

    def parts(self, chunk: Any) -> tuple[Any, Any, Any] | None:
        """`(namespace, mode, payload)` of `chunk`, or `None` for a shape it does not know."""
        try:
            if self.v2:
                return chunk["ns"], chunk["type"], chunk["data"]
            if self.single:
                ns, payload = chunk if self.subgraphs else ((), chunk)
                return ns, self.modes[0], payload
            if self.subgraphs:
                ns, mode, payload = chunk
                return ns, mode, payload
            mode, payload = chunk
            return (), mode, payload
        except (TypeError, ValueError, KeyError):
            return None

    def make(self, ns: Any, mode: str, payload: Any, like: Any = None) -> Any:
        """A chunk of `mode` carrying `payload` (a v2 part copies `like`'s other keys)."""
        if self.v2:
            base = dict(like) if isinstance(like, dict) else {}
            return {**base, "type": mode, "ns": ns, "data": payload}
        if self.single:
            return (ns, payload) if self.subgraphs else payload
        return (ns, mode, payload) if self.subgraphs else (mode, payload)
