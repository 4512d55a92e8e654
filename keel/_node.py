"""Helpers every node uses: node factory, the run's identity, the policy identity.

A node from a sync and an async function (`make_node`), the run's `RunContext` (`context_of`),
the policy identity bound into approvals (`policy_id`), a peek at a resume value.
This is the one module of keel that touches LangGraph's private modules.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, NamedTuple, TypeVar

from langchain_core.runnables import Runnable, RunnableConfig
from langgraph._internal._constants import (
    CONFIG_KEY_CHECKPOINT_MAP,
    CONFIG_KEY_CHECKPOINT_NS,
    CONFIG_KEY_CHECKPOINTER,
    CONFIG_KEY_DURABILITY,
    CONFIG_KEY_RUNTIME,
    CONFIG_KEY_SCRATCHPAD,
    CONFIG_KEY_SEND,
    CONFIG_KEY_TASK_ID,
    ERROR,
    INTERRUPT,
    NS_SEP,
    NULL_TASK_ID,
    RESUME,
)
from langgraph._internal._retry import default_retry_on
from langgraph._internal._runnable import RunnableCallable
from langgraph.checkpoint.base import CheckpointTuple
from langgraph.config import get_config
from langgraph.errors import GraphInterrupt
from langgraph.runtime import Runtime
from langgraph.types import Interrupt, _interrupt_id, interrupt

from keel._drive import Steps, adrive, both, drive
from keel.errors import UserError
from keel.identity import context_from_user, server_user
from keel.state import AgentState, RunContext

__all__ = [
    "Asked",
    "ERROR",
    "INTERRUPT",
    "NO_RESUME",
    "NS_SEP",
    "ask",
    "asked_before",
    "RunnableCallable",
    "context_of",
    "default_retry_on",
    "handed_at",
    "inside_task",
    "interrupt_pending",
    "make_node",
    "peek_resume",
    "refused_resume",
    "unsaved_checkpoint",
    "void_resume",
    "policy_id",
    "runtime_in",
    "saver_in",
    "thread_of",
]

_DEFAULT_CONTEXT = RunContext()


def make_node(
    name: str,
    func: Callable[..., Any],
    afunc: Callable[..., Awaitable[Any]],
) -> RunnableCallable:
    """A LangGraph node that runs `func` under `invoke` and `afunc` under `ainvoke`.

    LangGraph's `RunnableCallable` is what `StateGraph.add_node` wraps plain functions in, so a
    keel node costs no more than a hand-written function node.
    """
    return RunnableCallable(func, afunc, name=name, trace=False)


StepsNode = Callable[[Any, RunnableConfig, Runtime[RunContext]], Steps[dict[str, Any]]]
"""A node written once as `keel._drive` steps: `(state, config, runtime) -> Steps[update]`."""


def steps_node(name: str, steps: StepsNode) -> RunnableCallable:
    """A LangGraph node that drives `steps` under `invoke` (`drive`) and `ainvoke` (`adrive`)."""

    def invoke(state: Any, config: RunnableConfig, runtime: Runtime[RunContext]) -> Any:
        return drive(steps(state, config, runtime))

    async def ainvoke(state: Any, config: RunnableConfig, runtime: Runtime[RunContext]) -> Any:
        return await adrive(steps(state, config, runtime))

    return make_node(name, invoke, ainvoke)


def context_of(runtime: Runtime[RunContext] | None) -> RunContext:
    """The run's `RunContext`; the anonymous default when the caller passed none.

    Under LangGraph server with auth, the identity is the authenticated user's (see
    `keel.identity`): whatever `context` the client sent is ignored.
    """
    user = server_user(runtime)
    if user is not None:
        return context_from_user(user, _run_metadata())
    ctx = runtime.context if runtime is not None else None
    if ctx is None:
        return _DEFAULT_CONTEXT
    if isinstance(ctx, RunContext):
        return ctx
    if isinstance(ctx, dict):  # type: ignore[unreachable]  # e.g. from the LangGraph server
        return RunContext(**ctx)
    raise UserError(
        f"keel nodes need context=RunContext(...), got {type(ctx).__name__}. "
        "Pass context=RunContext(user_id=..., tenant_id=..., roles=(...)) to invoke."
    )


def _run_metadata() -> dict[str, Any] | None:
    """The running node's config metadata (the server merges the thread's into it), if any."""
    try:
        metadata = get_config().get("metadata")
    except RuntimeError:  # outside a runnable (no config in context)
        return None
    return metadata if isinstance(metadata, dict) else None


def runtime_in(config: RunnableConfig) -> Runtime[RunContext] | None:
    """The run's `Runtime`, from a runnable's config; None when no run is going on.

    LangGraph hands a node or route its `Runtime` only while a run executes: `update_state` runs
    the routes of the node it writes as with a config that carries none (a route that asks for
    `runtime` then fails with "Missing required config key 'N/A'").
    """
    runtime: Runtime[RunContext] | None = config.get("configurable", {}).get(CONFIG_KEY_RUNTIME)
    return runtime


def thread_of(runtime: Runtime[Any] | None) -> str:
    """The run's `thread_id`, or `""` outside a thread (no checkpointer)."""
    info = getattr(runtime, "execution_info", None)
    return str(getattr(info, "thread_id", None) or "")


def last_ai_index(state: AgentState) -> int:
    """Index of the last AI message in the state's messages, or -1."""
    messages = state.get("messages") or []
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].type == "ai":
            return i
    return -1


def policy_id(context: RunContext, policy_version: str, policy_name: str | None = None) -> str:
    """The policy identity bound into approval digests: `name@version`.

    The name is the agent's `Policy.name` when it has one, else `RunContext.policy`.
    """
    return f"{policy_name or context.policy}@{policy_version}"


NO_RESUME = object()
"""What `peek_resume` returns when the run is not being resumed."""


VOIDED = "__keel_voided_resume__"
"""What `void_resume` saves over a refused plain resume value: no answer to any question."""


def void_resume(config: RunnableConfig) -> Steps[None]:
    """Void the plain resume value saved in the checkpoint the task `config` belongs to runs from.

    LangGraph saves a `Command(resume=value)` in the checkpoint before any task runs, and keeps
    it there until a step ends, even when the task it reached refused it; a question asked from
    that checkpoint later would take it as its answer. Saved over (the savers replace a
    checkpoint's resume write), it is no answer: `peek_resume` and `ask` pass it by.
    """
    conf = config.get("configurable") or {}
    saver = conf.get(CONFIG_KEY_CHECKPOINTER)
    at = _checkpoint_address(config)
    if saver is None or at is None:
        return
    at = yield from _resume_address(saver, at, conf.get(CONFIG_KEY_CHECKPOINT_MAP) or {})
    yield both(saver.put_writes, saver.aput_writes, at, [(RESUME, VOIDED)], NULL_TASK_ID)


def _resume_address(saver: Any, at: RunnableConfig, saved: Mapping[str, Any]) -> Steps[Any]:
    """Where the plain resume value a task reads is saved: `at`, or the nearest parent's.

    A graph run as a subgraph reads the value its parent graph saved when it has none of its
    own. Voided in the subgraph's checkpoint instead, the void would stay there, in front of
    every plain resume the parent saves later: the question could never be answered plainly.
    `at` when no checkpoint holds one.
    """
    ns = str(at["configurable"]["checkpoint_ns"])
    while True:
        here = saved.get(ns)
        if here is not None:
            found = {**at["configurable"], "checkpoint_ns": ns, "checkpoint_id": here}
            place: RunnableConfig = {"configurable": found}
            kept: CheckpointTuple | None = yield both(saver.get_tuple, saver.aget_tuple, place)
            writes = kept.pending_writes or [] if kept is not None else []
            if any(w[0] == NULL_TASK_ID and w[1] == RESUME for w in writes):
                return place
        if not ns:
            return at
        ns = ns.rpartition(NS_SEP)[0]


def ask(value: Any) -> Any:
    """`interrupt(value)`, to which a voided plain resume value (`void_resume`) is no answer."""
    config = get_config()
    if _peek(config) != VOIDED:
        return interrupt(value)
    conf = config["configurable"]
    scratchpad = conf[CONFIG_KEY_SCRATCHPAD]
    scratchpad.interrupt_counter()
    ns = conf[CONFIG_KEY_CHECKPOINT_NS]
    raise GraphInterrupt((Interrupt(value=value, id=_interrupt_id(ns, len(scratchpad.resume))),))


def peek_resume(config: RunnableConfig) -> Any:
    """The resume value the task's next `interrupt()` would return, unconsumed (or `NO_RESUME`).

    A task that asks more than once (a middleware around the asking one runs it again) has an
    answer per question, in order: the next question's is the one after those already taken.
    A voided value (`void_resume`) is none.
    """
    value = _peek(config)
    return NO_RESUME if value == VOIDED else value


def _peek(config: RunnableConfig) -> Any:
    """`peek_resume`, a voided value as it is."""
    scratchpad = config.get("configurable", {}).get(CONFIG_KEY_SCRATCHPAD)
    if scratchpad is None:
        return NO_RESUME
    index = _interrupts_taken(scratchpad.interrupt_counter)
    if index < len(scratchpad.resume):
        return scratchpad.resume[index]
    value = scratchpad.get_null_resume(False)
    return NO_RESUME if value is None else value


def _interrupts_taken(counter: Any) -> int:
    """How many `interrupt()` calls the task made: its counter's next value, not consumed.

    LangGraph's counter is a lazily made `itertools.count(0).__next__`, whose count reads
    `count(n)`.
    """
    if not hasattr(counter, "_counter"):
        raise RuntimeError(f"keel cannot read LangGraph's interrupt counter {counter!r}.")
    made = counter._counter
    if made is None:
        return 0
    taken = re.fullmatch(r"count\((\d+)\)", repr(getattr(made, "__self__", None)))
    if taken is None:
        raise RuntimeError(f"keel cannot read LangGraph's interrupt counter {made!r}.")
    return int(taken.group(1))


class Asked(NamedTuple):
    """What the checkpoint a task runs from says of its question (`asked_before`)."""

    before: bool
    """The task asked a human before: its interrupt (or the answer it took) is saved there."""
    updated: bool
    """The checkpoint is a state update's: `update_state` keeps none of the pending interrupts
    of the checkpoint it follows, so a question asked there is no longer waiting, and its tasks
    run anew."""
    questions: tuple[Any, ...] = ()
    """What the task asked (its saved interrupts' values), in order. LangGraph names a task
    sent by a `Send` by its place among the step's sends, not by what it carries: a client's
    `Command(goto=Send(...))` on a waiting thread puts a call of its own making in the place
    (and under the id) of the task that asked, which must not take the answer to that task's
    question."""


def asked_before(config: RunnableConfig) -> Steps[Asked]:
    """Whether the task `config` belongs to asked a human before (`interrupt()`), as steps.

    A plain `Command(resume=...)` answers whichever task of the step it resumes calls
    `interrupt()` first, not only one that asked: a task the step runs for the first time (sent
    by a `Command(goto=Send(...))`, or left unrun by a crash) would take it for a question it
    never showed anyone. A task that asked has its interrupt (or the answer it took) saved in
    the checkpoint it runs from; one that did not, has neither, or no saved checkpoint yet.
    `before` without a checkpointer: nothing is ever resumed. One read of the checkpoint tells
    also whether a state update wrote it (`Asked.updated`).
    """
    conf = config.get("configurable") or {}
    if conf.get(CONFIG_KEY_CHECKPOINTER) is None:
        return Asked(before=True, updated=False)
    saved = yield from _task_checkpoint(config)
    if saved is None:
        return Asked(before=False, updated=False)
    task = conf.get(CONFIG_KEY_TASK_ID)
    writes = saved.pending_writes or []
    asked = [w[2] for w in writes if w[0] == task and w[1] == INTERRUPT]
    return Asked(
        before=bool(asked) or any(w[0] == task and w[1] == RESUME for w in writes),
        updated=(saved.metadata or {}).get("source") == "update",
        questions=tuple(
            i.value if isinstance(i, Interrupt) else i
            for found in asked
            for i in (found if isinstance(found, list | tuple) else [found])
        ),
    )


def _task_checkpoint(config: RunnableConfig) -> Steps[CheckpointTuple | None]:
    """The saved checkpoint the task `config` belongs to runs from (None if not saved)."""
    conf = config.get("configurable") or {}
    saver, at = conf.get(CONFIG_KEY_CHECKPOINTER), _checkpoint_address(config)
    if saver is None or at is None:
        return None
    saved: CheckpointTuple | None = yield both(saver.get_tuple, saver.aget_tuple, at)
    return saved


def _checkpoint_address(config: RunnableConfig) -> RunnableConfig | None:
    """The config naming the checkpoint the task `config` belongs to runs from (None if none)."""
    conf = config.get("configurable") or {}
    parent = str(conf.get(CONFIG_KEY_CHECKPOINT_NS) or "").rpartition(NS_SEP)[0]
    checkpoint = (conf.get(CONFIG_KEY_CHECKPOINT_MAP) or {}).get(parent)
    thread = conf.get("thread_id")
    if not conf.get(CONFIG_KEY_TASK_ID) or not checkpoint or not thread:
        return None
    return {
        "configurable": {"thread_id": thread, "checkpoint_ns": parent, "checkpoint_id": checkpoint}
    }


_INVALID_RESUME = "_langgraph_invalid_resume"
"""The attribute `langgraph.errors.is_invalid_resume` reads (LangGraph's private name)."""

E = TypeVar("E", bound=BaseException)


def refused_resume(exc: E) -> E:
    """`exc`, marked as a refused resume value (`langgraph.errors.is_invalid_resume`).

    LangGraph marks so a resume value that fails an interrupt's `response_schema`; it then
    lets the task's siblings (the other calls answered in the same resume) finish and save
    their results before it raises, instead of cutting them off after their side effects, to
    run again on the next resume; and `ToolNode` never hands it to the model.
    """
    setattr(exc, _INVALID_RESUME, True)
    return exc


G = TypeVar("G", bound=Runnable[Any, Any])


def saver_in(configurable: Mapping[str, Any]) -> Any:
    """The checkpointer LangGraph put in a task's configurable (`None` when it has none)."""
    return configurable.get(CONFIG_KEY_CHECKPOINTER)


def saved_thread(config: RunnableConfig) -> str | None:
    """The run's thread id when its graph keeps one (a checkpointer is set), else None.

    A `thread_id` in the config of a graph with no checkpointer names nothing: no state is kept
    under it, nothing can resume, and another run may pass the same one.
    """
    conf = config.get("configurable") or {}
    thread = conf.get("thread_id")
    return str(thread) if thread and conf.get(CONFIG_KEY_CHECKPOINTER) is not None else None


def unsaved_checkpoint(config: RunnableConfig) -> tuple[Any, RunnableConfig] | None:
    """The saver and address of the checkpoint a task runs from, if it may not be saved yet.

    Under `durability="async"` LangGraph saves a step's checkpoint while the next step runs;
    `None` when the run saves synchronously (`"sync"`: already saved), only at exit (`"exit"`:
    never saved mid-run), or has no checkpointer or thread.
    """
    conf = config.get("configurable") or {}
    saver, thread = conf.get(CONFIG_KEY_CHECKPOINTER), conf.get("thread_id")
    if conf.get(CONFIG_KEY_DURABILITY, "async") != "async" or saver is None or not thread:
        return None
    ns = str(conf.get(CONFIG_KEY_CHECKPOINT_NS) or "")
    parent = ns.rpartition(NS_SEP)[0]
    checkpoint = (conf.get(CONFIG_KEY_CHECKPOINT_MAP) or {}).get(parent)
    if not checkpoint:
        return None
    where = {"thread_id": thread, "checkpoint_ns": parent, "checkpoint_id": checkpoint}
    return saver, {"configurable": where}


def handed_at(config: RunnableConfig) -> float:
    """When the conversation a node runs in began (0.0 at the top: a thread, one conversation).

    A subgraph (a supervisor's agent) runs a fresh conversation in each task its parent hands
    it, under the parent's thread: this is the time in the id of the parent's checkpoint the
    task runs from (LangGraph's ids are UUIDv6), the same on a resume of that task. 0.0 when
    the id is not one (no bound).
    """
    conf = config.get("configurable") or {}
    # a node's namespace: its graph's (`<agent>:<task>` in a parent, else none), then its own
    graph_ns = str(conf.get(CONFIG_KEY_CHECKPOINT_NS) or "").rpartition(NS_SEP)[0]
    if not graph_ns:
        return 0.0
    checkpoint = (conf.get(CONFIG_KEY_CHECKPOINT_MAP) or {}).get(graph_ns.rpartition(NS_SEP)[0])
    try:
        uid = uuid.UUID(str(checkpoint))
    except ValueError:
        return 0.0
    if uid.version != 6:
        return 0.0
    ticks = (uid.int >> 80) << 12 | (uid.int >> 64) & 0x0FFF  # 100 ns since 1582-10-15
    return (ticks - _UUID_EPOCH) / 1e7


_UUID_EPOCH = 0x01B21DD213814000
"""The 100-ns intervals between the UUID epoch (1582-10-15) and the Unix epoch."""


def inside_task(config: RunnableConfig | None) -> bool:
    """Whether a graph runs as a node of another graph (a subgraph), not as the caller's run.

    LangGraph gives a task's config its id and the callable that collects the task's writes. A
    caller can put an id in a run's config (a served client sends any JSON there), never the
    callable: an id alone would let a caller's run skip what only a subgraph may skip (the
    thread checks, admission control, the input guard's list of the messages it sent).
    """
    conf = (config or {}).get("configurable") or {}
    return CONFIG_KEY_TASK_ID in conf and callable(conf.get(CONFIG_KEY_SEND))


def interrupt_pending(saved: CheckpointTuple | None) -> bool:
    """Whether a saved checkpoint has a pending `interrupt()` (a node waits for a human).

    Read from the checkpoint's pending writes, without building LangGraph's whole state snapshot.
    """
    return saved is not None and any(w[1] == INTERRUPT for w in saved.pending_writes or ())
