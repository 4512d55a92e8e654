"""Tool stubs: answer tool calls without running the tools (replay, shadow runs, dry runs).

Inside `with stubbing(stub):` every tool call that keel's `execute_tools` (or, in a
`create_agent` graph, keel's `PermissionMiddleware`) would run, and every call of a `KeelTool`
whatever runs it (LangGraph's `ToolNode`, your own code), is first offered to
`stub(tool, call)`. A `StubAnswer` stands in for the tool's result and the tool's
body never runs (nor does `execute_tools` claim the call in its idempotency ledger or count it
in the tool's breaker: both may be production's); `None` lets the call run as usual. The
stub is a context variable, so it holds for the runs started in the block (LangGraph copies it
into tool tasks and threads) and for no other run of the process. Those runs are `isolated()`:
they write no run record, audit record, period spend or memory lesson to the graph's ledger
and store (which may be production's).

Example:
    ```python
    from keel.tools.stubs import StubAnswer, stubbing

    def canned(tool, call):
        return None if tool.read_only else StubAnswer("stubbed")

    with stubbing(canned):
        ...  # run the graph: tools declared read-only run, every other answers "stubbed"
    ```
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING

from langchain_core.messages import ToolCall, ToolMessage

if TYPE_CHECKING:
    from keel.tools.spec import RegisteredTool

__all__ = ["StubAnswer", "ToolStub", "isolated", "stub_answer", "stub_message", "stubbing"]


@dataclass(frozen=True, slots=True)
class StubAnswer:
    """What a stubbed tool call returns instead of running."""

    content: str
    """The result the model sees."""
    status: str = "success"
    """keel's status for the call (`success`, `error`, `timeout`, ...)."""


ToolStub = Callable[["RegisteredTool", ToolCall], StubAnswer | None]
"""`stub(tool, call)`: a `StubAnswer` instead of running the tool, or `None` to run it."""

_stub: ContextVar[ToolStub | None] = ContextVar("keel_tool_stub", default=None)


@contextmanager
def stubbing(stub: ToolStub) -> Iterator[None]:
    """Offer every tool call of the runs in this block to `stub` before running it."""
    token = _stub.set(stub)
    try:
        yield
    finally:
        _stub.reset(token)


def isolated() -> bool:
    """Whether the runs here are a replay, a shadow or a dry run (a tool stub is active).

    keel keeps such runs out of production's records, whatever ledger and store the graph
    was built on: they write no run record, no audit record, no period spend and no lesson to
    long-term memory.
    """
    return _stub.get() is not None


def stub_answer(tool: RegisteredTool, call: ToolCall) -> StubAnswer | None:
    """The active stub's answer to `call`, or `None` (no stub, or the stub lets it run)."""
    stub = _stub.get()
    return None if stub is None else stub(tool, call)


def stub_message(answer: StubAnswer, call_id: str, name: str) -> ToolMessage:
    """The `ToolMessage` of a stubbed call (`keel_status` the answer's, `keel_stub` set)."""
    return ToolMessage(
        content=answer.content,
        tool_call_id=call_id,
        name=name,
        status="success" if answer.status == "success" else "error",
        response_metadata={"keel_status": answer.status, "keel_stub": True},
    )
