"""Whose thread: a thread belongs to the identity its first run was for.

A thread's history, its pending approvals and its tools' effects are one user's. An app that
takes the `thread_id` from its client (the usual web app) would otherwise let any user who
learns or guesses another's thread id read that thread's history in the run's result, answer
its pending approvals, or carry on its task in the owner's name. So every checkpoint a run
writes carries the thread's owner (`OWNER_METADATA`, in the checkpoint's metadata, where
LangGraph copies the run's `config["metadata"]`), and a run for anyone else is refused with a
`UserError` before anything is written. The one exception mirrors the server's: a user with
the role `reviewer` of the owner's tenant may answer what the thread waits for
(`None` or `Command(resume=...)`), not send it a new task. The owner stays the owner.

A thread saved before keel stamped owners (no stamp) is adopted by its next run, unless the
agent's ledger has records of the thread id acting for another identity: a thread deleted (its
checkpoints and stamp gone) leaves its runs, audited decisions and its side-effecting calls'
recorded results in the ledger under its id, and a new thread with that id would read them as
its own (a call with the same id answered with the other user's recorded result, the tool never
run). Records of the default identity (no `RunContext`) name no one. A state
update (`update_state`) is the app's own act, not a user's: it keeps the stamp it finds.
Under LangGraph server the check agrees with keel's auth, which already keeps users to their
own threads: the run's identity is the server's user (a reviewer's run acts for the owner).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import CheckpointTuple
from langgraph.types import Command, StateSnapshot

from keel.db.ledger import Flow
from keel.db.runs import thread_users_flow
from keel.errors import UserError
from keel.identity import REVIEWER_ROLE
from keel.redact import sanitized_logger
from keel.state import RunContext

__all__ = ["OWNER_METADATA", "owned", "owner_of", "readable", "stamped", "unseen", "users_seen"]

log = sanitized_logger(__name__)

OWNER_METADATA = "keel_thread_owner"
"""Checkpoint metadata key: the thread's owner, `["<tenant_id>", "<user_id>"]` as JSON."""


def _owner(context: RunContext) -> str:
    return _pair(context.tenant_id, context.user_id)


def _pair(tenant: str, user: str) -> str:
    return json.dumps([tenant, user], ensure_ascii=False)


def _reviews(context: RunContext, owner: str, input: Any) -> bool:
    """Whether `context` is a reviewer of the owner's tenant answering what the thread waits for."""
    if REVIEWER_ROLE not in context.roles or not (input is None or isinstance(input, Command)):
        return False
    try:
        tenant = json.loads(owner)[0]
    except (ValueError, TypeError, IndexError, KeyError):
        return False
    return bool(tenant == context.tenant_id)


def stamped(config: RunnableConfig | None, owner: str | None) -> RunnableConfig:
    """`config` whose checkpoints carry `owner`, and no owner a caller wrote in it.

    LangGraph copies string values of `config["metadata"]` and `config["configurable"]` into
    each checkpoint's metadata: a caller's own `keel_thread_owner` is dropped from both.
    """
    out: RunnableConfig = {**(config or {})}
    for part in ("metadata", "configurable"):
        found = out.get(part)
        if isinstance(found, Mapping) and OWNER_METADATA in found:
            out[part] = {k: v for k, v in found.items() if k != OWNER_METADATA}
    if owner is not None:
        metadata = out.get("metadata")
        out["metadata"] = {
            **(metadata if isinstance(metadata, Mapping) else {}),
            OWNER_METADATA: owner,
        }
    return out


DEFAULT = (RunContext().tenant_id, RunContext().user_id)
"""The identity of a run without a `RunContext`: records of it name no owner."""


def users_seen(config: RunnableConfig | None, state: StateSnapshot | None) -> Flow[Any] | None:
    """The ledger flow that says whom an unstamped thread was run for, or None to ask nothing.

    A thread id outlives its thread: deleted (a server's `threads.delete`), its checkpoints are
    gone, and with them the owner stamp, while the ledger keeps its records under the id
    (among them the recorded results of its side-effecting calls, which answer the same call
    id in that thread again). A new thread with that id would be adopted by anyone's first
    run, and read another user's recorded results as its own.
    """
    if owner_of(state) is not None or not _thread(config):
        return None
    return thread_users_flow(str(_thread(config)))


def unseen(config: RunnableConfig | None, exc: Exception) -> list[tuple[str, str]]:
    """No records to go by: the ledger could not say whom the thread was run for (logged).

    The run goes on and adopts the thread: a ledger that cannot be read answers no call from
    another user's record either (the run's own ledger work fails as it would have).
    """
    log.warning(
        "keel could not read the ledger's records of thread %r (%s): its run adopts it",
        _thread(config),
        exc,
    )
    return []


def owner_of(state: StateSnapshot | CheckpointTuple | None) -> str | None:
    """The owner stamped on a thread's checkpoint (its snapshot or its saved tuple), if any."""
    found = (state.metadata or {}).get(OWNER_METADATA) if state is not None else None
    return found if isinstance(found, str) else None


def owned(
    input: Any,
    config: RunnableConfig | None,
    state: StateSnapshot | None,
    context: RunContext,
    seen: Sequence[tuple[str, str]] = (),
) -> RunnableConfig:
    """`config` stamped with the thread's owner, once `context` may run on the thread.

    `seen` is whom the ledger has seen the thread act for (`users_seen`), asked when the
    thread has no owner stamp. Raises `UserError` for a run on a thread another identity owns
    (see the module's doc), or, unstamped, one the ledger knows as another's.
    """
    if not _thread(config):
        return config or {}  # no thread: nothing to own
    owner = owner_of(state)
    me = _owner(context)
    if owner is None:
        owner = next((o for t, u in seen if (t, u) != DEFAULT and (o := _pair(t, u)) != me), None)
    if owner is not None and owner != me and not _reviews(context, owner, input):
        raise UserError(
            f"Thread {_thread(config)!r} belongs to another user, and this run is for user "
            f"{context.user_id!r} of tenant {context.tenant_id!r}: a thread's history, pending "
            "approvals and tools act for the user who started it. Start a new thread for this "
            "user (a new thread_id), or check that the thread_id came from this user's own "
            "session. A reviewer (role 'reviewer', same tenant) may answer what a thread waits "
            "for with Command(resume=...)."
        )
    return stamped(config, owner or me)


def readable(config: RunnableConfig | None, owner: str | None, context: RunContext) -> None:
    """Raise `UserError` unless `context` may read the thread `owner` owns (`owner_of`).

    Its owner may, and a reviewer of the owner's tenant (who reads what waits for review); a
    thread with no owner yet (new, or saved before keel stamped owners) is anyone's.
    """
    if owner is None or owner == _owner(context) or _reviews(context, owner, None):
        return
    raise UserError(
        f"Thread {_thread(config)!r} belongs to another user, and this read is for user "
        f"{context.user_id!r} of tenant {context.tenant_id!r}: a thread's state and history are "
        "its owner's. Check that the thread_id came from this user's own session; a reviewer "
        "(role 'reviewer', same tenant) may read a thread of the tenant."
    )


def _thread(config: RunnableConfig | None) -> Any:
    return ((config or {}).get("configurable") or {}).get("thread_id")
