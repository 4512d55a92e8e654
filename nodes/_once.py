"""At most once: a side-effecting call goes through the idempotency ledger.

`once_steps` is the decision, written once as a generator of `keel._drive` steps (as `httpx`
writes `auth_flow`): the ledger's flows, the run, the reconcile, and the call's result (a write
nobody reads in this step: deferred to the node's ledger batch); `keel._drive.drive` and
`adrive` run it.

When the ledger itself fails (`StorageError`: the database is gone, locked, corrupt), the call
is answered with a `ToolMessage` carrying `STORAGE_KEY` in its metadata: before the call ran,
an error saying it was not made (so it cannot happen twice); after it ran, its result (which
the ledger could not record: a resume finds it `started` and asks a human). The node then ends
the run with an outcome of error category `storage`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from langchain_core.messages import AIMessage, BaseMessage, ToolCall, ToolMessage
from langchain_core.runnables import RunnableConfig

from keel import outcome
from keel._drive import Op, Steps, both, sleep
from keel._node import saved_thread, unsaved_checkpoint
from keel.approvals import call_digest
from keel.db.checkpoint.saved import Key, SaveWatch, checkpoint_key, request_key
from keel.db.idempotency import CallRecord, ClaimGate, claim_flow, finish_flow, resolve_flow
from keel.db.ledger import Flow, Ledger
from keel.db.runs import STORAGE_FAILED
from keel.errors import StorageError, UserError
from keel.nodes._command import command_answer, is_command
from keel.state import Outcome
from keel.tools._args import as_called
from keel.tools.registry import RegisteredTool

__all__ = [
    "STORAGE_KEY",
    "not_recorded",
    "storage_outcome",
    "Unknown",
    "once_steps",
    "known_call_ids",
    "ledger_key",
    "recorded",
    "tool_message",
    "saved_steps",
]

SAVE_WAIT = 30.0
"""Seconds a side-effecting call waits for the checkpoint holding its request to be saved."""

_FAILED = object()  # a reconcile function raised: the outcome stays unknown
STORAGE_KEY = "keel_storage_failed"
"""`response_metadata` key of a call's `ToolMessage` when the ledger failed around it."""


def _storage_failed(call: ToolCall, exc: StorageError, ran: ToolMessage | None) -> ToolMessage:
    """The answer to a call whose ledger step raised: not run, or run but not recorded."""
    if ran is None:
        return tool_message(
            call,
            f"Error: not run: keel's ledger failed ({exc.reason}), so this call was not made (it "
            "could not be recorded to happen at most once).",
            "error",
            **{STORAGE_KEY: f"before the call: {exc.reason}"},
        )
    return not_recorded(ran, exc)


def not_recorded(message: ToolMessage, exc: StorageError) -> ToolMessage:
    """`message`, the result of a call that ran, marked as one the ledger could not record."""
    metadata = {**message.response_metadata, STORAGE_KEY: f"after the call: {exc.reason}"}
    return message.model_copy(update={"response_metadata": metadata})


def storage_outcome(lost: Sequence[ToolMessage], where: str) -> Outcome:
    """The outcome of a run whose ledger failed around the calls answered by `lost`.

    `where`: when it failed (the `STORAGE_KEY` mark, or what the caller knows of it).
    """
    names = ", ".join(sorted({m.name or "?" for m in lost}))
    around = f" around a call to {names}" if names else ""
    return outcome.failed(
        f"{STORAGE_FAILED}: the ledger raised{around} ({where}); side effects cannot be kept "
        "to at most once without it. Resume the thread once the database is back."
    )


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


def saved_steps(config: RunnableConfig, request: BaseMessage | None = None) -> Steps[bool]:
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
    saver, where = found
    watch, keys = _watch(found, request)
    for pause in _pauses():
        if watch is not None and keys:  # keel's saver is told when the save returns
            told = yield Op(
                lambda: watch.wait(keys, _WATCHED), lambda: watch.await_(keys, _WATCHED)
            )
            if told:
                return True
        if (yield Op(lambda: saver.get_tuple(where), lambda: saver.aget_tuple(where))) is not None:
            return True
        yield sleep(pause)
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
    without a thread there is nothing to resume, and tool-call ids need not be unique. The
    digest is of the arguments as the tool reads them (`as_called`): `10` and `10.0` for an
    `int`, or a default sent or left out, are one call, as duplicates in a turn are.
    """
    thread = saved_thread(config)
    call_id = call.get("id")
    if ledger is None or not entry.spec.side_effects or thread is None or not call_id:
        return None
    digest = call_digest(entry.name, as_called(entry, call["args"]), entry.spec.version)
    return thread, call_id, entry.name, digest


def _spelled(entry: RegisteredTool, call: ToolCall) -> str:
    """The digest of `call`'s arguments as the model spelled them (`claim_flow`'s `spelled`)."""
    return call_digest(entry.name, call["args"], entry.spec.version)


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
    ledger: Ledger,
    run: Callable[[], Steps[ToolMessage]],
    known: Collection[str] | None = None,
    *,
    alone: bool = True,
    gate: ClaimGate | None = None,
    since: float = 0.0,
) -> Steps[ToolMessage | Unknown]:
    """Claim, run (`run`) and record one call; or return its recorded result, or `Unknown`.

    `known`: the tool-call ids in the thread's history; an orphaned `started` call of the
    same tool and arguments (its request lost in a crash) makes this call `Unknown` (see
    `claim_flow`; one started before `since`, when the conversation began, is another
    conversation's). A ledger failure (`StorageError`) answers the call as `_storage_failed`
    says. `alone`: the only call of its step; under `ainvoke` a call run beside others
    records its result at once (it must not wait in the node's ledger batch for a slower
    sibling). `gate`: checked in the claim's transaction before a call may run (the tool's
    breaker); refused, the call is answered `unavailable` and nothing is recorded.
    """
    ran: list[ToolMessage] = []

    def tracked() -> Steps[ToolMessage]:
        message = yield from run()
        ran.append(message)
        return message

    try:
        orphans = (known, since)
        return (yield from _claimed(entry, call, key, ledger, tracked, orphans, alone, gate))
    except StorageError as exc:
        return _storage_failed(call, exc, ran[0] if ran else None)


def _claimed(
    entry: RegisteredTool,
    call: ToolCall,
    key: tuple[str, str, str, str],
    ledger: Ledger,
    run: Callable[[], Steps[ToolMessage]],
    orphans: tuple[Collection[str] | None, float],
    alone: bool,
    gate: ClaimGate | None,
) -> Steps[ToolMessage | Unknown]:
    """`once_steps` (`orphans`: its `known` and `since`)."""

    def flow(steps: Flow[Any]) -> Op:
        return both(ledger.run, ledger.arun, steps)

    thread, call_id, _, _ = key
    known, since = orphans
    spelled = _spelled(entry, call)
    args = call.get("args")
    claim = yield flow(
        claim_flow(*key, spelled=spelled, known=known, since=since, gate=gate, args=args)
    )
    if claim.action == "unknown":
        rerun = entry.spec.idempotent
        if not rerun and entry.spec.reconcile is not None:
            found = yield _reconcile(entry, call)
            if found is not _FAILED and found is not None:
                message = succeeded(entry, call, found)
                yield flow(resolve_flow(thread, call_id, "completed", _fields(message)))
                return message
            rerun = found is None
        if rerun:
            again = claim_flow(*key, rerun_unknown=True, spelled=spelled, gate=gate, args=args)
            claim = yield flow(again)
    if claim.action == "refused":
        assert claim.refusal is not None
        return tool_message(call, claim.refusal, "unavailable")
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
    ran = yield from run()
    success = ran.response_metadata.get("keel_status") == "success"
    done: Literal["completed", "failed"] = "completed" if success else "failed"
    yield _record(ledger, finish_flow(thread, call_id, done, _fields(ran)), alone)
    return ran


def _record(ledger: Ledger, flow: Flow[Any], alone: bool) -> Op:
    """A write nobody reads in this step, deferred to the node's ledger batch.

    See `Ledger.defer`; a call run beside others under `ainvoke` commits it at once.
    """
    return Op(
        lambda: ledger.defer(flow), lambda: ledger.adefer(flow) if alone else ledger.arun(flow)
    )


def succeeded(entry: RegisteredTool, call: ToolCall, result: Any) -> ToolMessage:
    """The `ToolMessage` for a call that returned `result`.

    A LangGraph `Command` gives its `ToolMessage` for the call, or an error when keel does not
    apply it (`keel.nodes._command`).
    """
    if is_command(result):
        answer = command_answer(call, result)
        if isinstance(answer, str):
            return tool_message(
                call,
                f"Error: {entry.name} returned {answer}",
                "error",
                keel_command="refused",
            )
        result = answer
    if isinstance(result, ToolMessage):
        status = "success" if result.status == "success" else "error"
        result.response_metadata = {**result.response_metadata, "keel_status": status}
        result.name = result.name or entry.name
        return result
    return tool_message(call, str(result), "success")


def _reconcile(entry: RegisteredTool, call: ToolCall) -> Op:
    """Ask the tool's `reconcile` whether the call happened (`_FAILED` when it raised)."""
    return Op(lambda: _reconciled(entry, call, sync=True), lambda: _areconciled(entry, call))


def _reconciled(entry: RegisteredTool, call: ToolCall, *, sync: bool) -> Any:
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


async def _areconciled(entry: RegisteredTool, call: ToolCall) -> Any:
    value = _reconciled(entry, call, sync=False)
    if not inspect.isawaitable(value):
        return value
    try:
        return await value
    except Exception:
        return _FAILED
