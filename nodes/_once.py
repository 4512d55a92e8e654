"""At most once: a side-effecting call goes through the idempotency ledger.

`once_steps` is the decision, written once as a generator (as `httpx` writes `auth_flow`): it
yields `("ledger", flow)`, `("record", flow)` (a result nobody reads: deferred to the node's
ledger batch), `("run", None)` or `("reconcile", None)` and is sent each step's result;
`drive_once` and `adrive_once` are its sync and async drivers.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable, Collection, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from langchain_core.messages import AIMessage, BaseMessage, ToolCall, ToolMessage
from langchain_core.runnables import RunnableConfig

from keel._node import unsaved_checkpoint
from keel.approvals import call_digest
from keel.db.checkpoint.saved import Key, SaveWatch, checkpoint_key, request_key
from keel.db.idempotency import CallRecord, claim_flow, finish_flow, resolve_flow
from keel.db.ledger import Flow, Ledger
from keel.errors import UserError
from keel.tools.registry import RegisteredTool

__all__ = [
    "Unknown",
    "adrive_once",
    "drive_once",
    "known_call_ids",
    "ledger_key",
    "recorded",
    "tool_message",
    "await_saved",
    "wait_saved",
]

SAVE_WAIT = 30.0
"""Seconds a side-effecting call waits for the checkpoint holding its request to be saved."""

Step = tuple[Literal["ledger", "record", "run", "reconcile"], Flow[Any] | None]
_FAILED = object()  # a reconcile function raised: the outcome stays unknown


@dataclass(frozen=True, slots=True)
class Unknown:
    """A call that started and never finished: a human must say whether it happened."""

    call: ToolCall
    record: CallRecord


def _pauses() -> Iterator[float]:
    waited, pause = 0.0, 0.001
    while waited < SAVE_WAIT:
        yield pause
        waited, pause = waited + pause, min(pause * 2, 0.05)


def wait_saved(config: RunnableConfig, request: BaseMessage | None = None) -> bool:
    """Wait until the checkpoint this task runs from is saved (`False`: it never was).

    A side-effecting call may run only once the model message that requested it is durable:
    otherwise a crash loses the request, the model asks again under a new tool-call id, and the
    ledger cannot tell it is the same call. keel's graphs save synchronously by default; this
    covers runs started with `durability="async"` (LangGraph server's default).

    `request`: the model message that asked for the calls. With keel's saver the wait also
    ends when an earlier checkpoint whose newest message is this request was saved (the
    checkpoint `call_model` made, before `tool_gate`'s).
    """
    found = unsaved_checkpoint(config)
    if found is None:
        return True
    watch, keys = _watch(found, request)
    for pause in _pauses():
        # keel's saver is told when the save returns
        if watch is not None and keys and watch.wait(keys, _WATCHED):
            return True
        if found[0].get_tuple(found[1]) is not None:
            return True
        time.sleep(pause)
    return False


async def await_saved(config: RunnableConfig, request: BaseMessage | None = None) -> bool:
    """`wait_saved` under `ainvoke`."""
    found = unsaved_checkpoint(config)
    if found is None:
        return True
    watch, keys = _watch(found, request)
    for pause in _pauses():
        if watch is not None and keys and await watch.await_(keys, _WATCHED):
            return True
        if await found[0].aget_tuple(found[1]) is not None:
            return True
        await asyncio.sleep(pause)
    return False


_WATCHED = 0.05
"""Seconds to wait for keel's saver to report the save before asking the database."""


def _watch(
    found: tuple[Any, RunnableConfig], request: BaseMessage | None
) -> tuple[SaveWatch | None, list[Key]]:
    """The saver's `SaveWatch` (keel's savers have one) and the keys that end the wait."""
    watch = getattr(found[0], "keel_saves", None)
    if not isinstance(watch, SaveWatch):
        return None, []
    keys = [checkpoint_key(found[1]), request_key(found[1], request)]
    return watch, [k for k in keys if k is not None]


def ledger_key(
    entry: RegisteredTool, call: ToolCall, config: RunnableConfig, ledger: Ledger | None
) -> tuple[str, str, str, str] | None:
    """`(thread_id, tool_call_id, tool, digest)` when the call runs through the ledger.

    Only side-effecting tools do, and only in a thread (a checkpointer and a `thread_id`):
    without a thread there is nothing to resume, and tool-call ids need not be unique.
    """
    thread = (config.get("configurable") or {}).get("thread_id")
    call_id = call.get("id")
    if ledger is None or not entry.spec.side_effects or not thread or not call_id:
        return None
    digest = call_digest(entry.name, call["args"], entry.spec.version)
    return str(thread), call_id, entry.name, digest


def known_call_ids(messages: Sequence[BaseMessage]) -> frozenset[str]:
    """The ids of every tool call the thread's history holds (orphan detection)."""
    return frozenset(
        tc["id"] for m in messages if isinstance(m, AIMessage) for tc in m.tool_calls if tc["id"]
    )


def tool_message(call: ToolCall, content: Any, status: str, **metadata: Any) -> ToolMessage:
    """The `ToolMessage` answering `call`, its keel status in `response_metadata`."""
    return ToolMessage(
        content=content,
        tool_call_id=call.get("id") or "",
        name=call["name"],
        status="success" if status in ("success", "respond") else "error",
        response_metadata={"keel_status": status, **metadata},
    )


def recorded(call: ToolCall, result: dict[str, Any]) -> ToolMessage:
    """The recorded result of a call, as the `ToolMessage` the model sees again."""
    return tool_message(call, result["content"], result["keel_status"], keel_ledger="recorded")


def _fields(message: ToolMessage) -> dict[str, Any]:
    status = message.response_metadata.get("keel_status", message.status)
    return {"content": message.content, "keel_status": status}


def once_steps(
    entry: RegisteredTool,
    call: ToolCall,
    key: tuple[str, str, str, str],
    known: Collection[str] | None = None,
) -> Generator[Step, Any, ToolMessage | Unknown]:
    """Claim, run and record one call; or return its recorded result, or `Unknown`.

    `known`: the tool-call ids in the thread's history; an orphaned `started` call of the
    same tool (its request lost in a crash) makes this call `Unknown` (see `claim_flow`).
    """
    thread, call_id, _, _ = key
    claim = yield "ledger", claim_flow(*key, known=known)
    if claim.action == "unknown":
        rerun = entry.spec.idempotent
        if not rerun and entry.spec.reconcile is not None:
            found = yield "reconcile", None
            if found is not _FAILED and found is not None:
                message = succeeded(entry, call, found)
                yield "ledger", resolve_flow(thread, call_id, "completed", _fields(message))
                return message
            rerun = found is None
        if rerun:
            claim = yield "ledger", claim_flow(*key, rerun_unknown=True)
    if claim.action == "conflict":
        return tool_message(
            call,
            f"Error: tool_call_id {call_id!r} was already used in this thread for a call to "
            f"{claim.record.tool if claim.record else entry.name} with other arguments; not run.",
            "error",
        )
    if claim.record is not None and claim.action == "recorded":
        assert claim.record.result is not None
        return recorded(call, claim.record.result)
    if claim.record is not None and claim.action == "unknown":
        return Unknown(call, claim.record)
    ran: ToolMessage = yield "run", None
    success = ran.response_metadata.get("keel_status") == "success"
    done: Literal["completed", "failed"] = "completed" if success else "failed"
    yield "record", finish_flow(thread, call_id, done, _fields(ran))
    return ran


def succeeded(entry: RegisteredTool, call: ToolCall, result: Any) -> ToolMessage:
    """The `ToolMessage` for a call that returned `result`."""
    if isinstance(result, ToolMessage):
        status = "success" if result.status == "success" else "error"
        result.response_metadata = {**result.response_metadata, "keel_status": status}
        result.name = result.name or entry.name
        return result
    return tool_message(call, str(result), "success")


def drive_once(
    entry: RegisteredTool,
    call: ToolCall,
    key: tuple[str, str, str, str],
    ledger: Ledger,
    run: Callable[[], ToolMessage],
    known: Collection[str] | None = None,
) -> ToolMessage | Unknown:
    """Run `once_steps` with the sync ledger and the sync tool runner."""
    steps = once_steps(entry, call, key, known)
    value: Any = None
    try:
        while True:
            kind, flow = steps.send(value)
            if kind == "ledger":
                assert flow is not None
                value = ledger.run(flow)
            elif kind == "record":
                assert flow is not None
                ledger.defer(flow)
                value = None
            elif kind == "run":
                value = run()
            else:
                value = _reconcile(entry, call, sync=True)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


async def adrive_once(
    entry: RegisteredTool,
    call: ToolCall,
    key: tuple[str, str, str, str],
    ledger: Ledger,
    run: Callable[[], Any],
    known: Collection[str] | None = None,
    *,
    alone: bool = True,
) -> ToolMessage | Unknown:
    """Run `once_steps` with the async ledger and the async tool runner.

    `alone`: the only call of its step. A call run beside others records its result at once
    (it must not wait in the node's batch for a slower sibling).
    """
    steps = once_steps(entry, call, key, known)
    value: Any = None
    try:
        while True:
            kind, flow = steps.send(value)
            if kind == "ledger":
                assert flow is not None
                value = await ledger.arun(flow)
            elif kind == "record":
                assert flow is not None
                value = await (ledger.adefer(flow) if alone else ledger.arun(flow))
            elif kind == "run":
                value = await run()
            else:
                value = _reconcile(entry, call, sync=False)
                if inspect.isawaitable(value):
                    value = await _awaited(value)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


def _reconcile(entry: RegisteredTool, call: ToolCall, *, sync: bool) -> Any:
    assert entry.spec.reconcile is not None
    try:
        value = entry.spec.reconcile(call["args"])
    except Exception:
        return _FAILED
    if sync and inspect.isawaitable(value):
        close = getattr(value, "close", None)
        if close is not None:
            close()
        raise UserError(
            f"{entry.name}'s reconcile is async; run the agent with `ainvoke` (or give a "
            "sync reconcile function)."
        )
    return value


async def _awaited(value: Any) -> Any:
    try:
        return await value
    except Exception:
        return _FAILED
