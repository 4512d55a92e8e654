"""keel's custom auth for LangGraph server (`"auth": {"path": "keel.app.auth:auth"}`).

- **Who:** `Authorization: Bearer <token>` is looked up in the server config file
  (`KEEL_SERVER_CONFIG`); the user record carries user, tenant, roles and the policy name. keel's
  nodes take the run's identity from it (`keel.identity`), never from the client's `context`.
- **Whose:** threads, runs and assistants are stamped with `keel_tenant` / `keel_owner`
  metadata on create and filtered by them on every read, search, update, delete and run, so
  another tenant (or user) gets 404s and empty searches (the graphs' own assistants stay
  readable by all; a client's assistant may not carry their mark, `created_by`: 422). Store
  namespaces must be the caller's own memory namespace `(kind, tenant, user, ...)`; anything
  else is refused with 403.
- **Reviewers:** a user whose token carries the role `reviewer` also reads and searches the
  threads of their tenant (`threads.search(status="interrupted")` lists the waiting ones) and may
  resume any of them with a run that only answers the interrupt (`command={"resume": ...}`,
  through the thread's own assistant, no `configurable` but `thread_id`: the agent that asked
  answers, not another of the tenant's: a reviewer reads, and changes none of, the tenant's
  assistants); the run acts for the thread's owner and the audit
  names the reviewer (`keel.identity`). Anything else a reviewer does on another user's thread
  (new input, update, delete, another assistant or agent) gets 404 as before.
  Another tenant's threads stay invisible to them.
- **No copies:** `threads.copy` is refused with 403 for every user. The ledger keeps a
  side-effecting call at most once per thread, and a copy is another thread with the same
  calls: approved on both, a waiting refund ran twice (and a copy of a thread whose refund ran
  could ask for it again). Time travel in the thread itself is covered by the ledger.
  keel's metadata keys (`keel_owner`, ...) in a config the server hands to the run as sent (an
  assistant's; a run's under Aegra) are refused with 422: they would say whom the run acts for.
- **Not crons:** creating one is refused with 422. The server's cron scheduler starts a cron's
  runs as a bare user id, without the tenant and roles keel's auth returned, so each would fail.
- **Where to:** a run's `webhook` (the server POSTs the run's output there) must be an
  `http(s)` URL whose host is not a loopback, link-local (cloud metadata), reserved or, unless
  the server config says `[webhooks] private = true`, private address or name (`*.internal`,
  ...), nor `localhost` or a cloud's metadata service: 422. A name is not
  resolved here (it could resolve elsewhere when the server calls it): LangGraph's own policy,
  `"webhooks": {"url": {"disable_private_ips": true}}` in langgraph.json, resolves it at
  creation and again at each call.
- **How many:** with `[tenants.<id>.admission]` in the server config, a new run of a tenant (or
  user) whose running and queued runs are at their caps is refused with 429 and `Retry-After`
  before it is created (`keel.guards.admission`; a run that gets past this check and finds no
  slot when it starts ends as `stopped` / `overloaded` instead).
- **What:** a run's `input` and `command.update` may set only what a caller may send
  (`keel.state.AgentInput`: messages, none of them a `system` or `developer` message: the
  system prompt is the agent's; none a removal: a run does not delete the thread's record);
  a key only keel writes (approvals, usage, outcome, plan, `keel_rejections`, ...) or one of
  LangGraph's own channels (`branch:to:<node>`, `__pregel_tasks`, ...) is refused with 422
  before the run is created, and so is input the graph would refuse as it starts whatever the
  thread holds (`keel.graphs.threads.input_refusal`: no message, unreadable or blank ones; an
  A2A message with such parts gets it as a JSON-RPC error), and so is a config or context (a
  run's, an assistant's) that sets one of LangGraph's own keys (`__pregel_checkpointer`, ...).
  A run streamed as LangGraph's events (`stream_mode="events"`, or its event streaming
  protocol v2, `/threads/{id}/commands`) is refused with 422 too: that stream carries each
  model call's raw output, before the output guard checks the answer. A
  thread's `update_state` reaches auth
  without its values (LangGraph passes only the thread id), so keel's graph refuses it itself
  (`keel.graphs._protected`): the server answers 400 with the same message.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Mapping
from typing import Any, NoReturn
from urllib.parse import urlsplit

from langchain_core.messages import convert_to_messages
from langgraph_sdk import Auth

from keel.app.server import admission_of
from keel.app.server_config import server_config
from keel.errors import KeelError
from keel.graphs._protected import langgraphs_channel
from keel.graphs.supervisor import SupervisorState
from keel.graphs.threads import input_refusal
from keel.guards.middleware import REJECTIONS_KEY
from keel.identity import (
    OWNER_KEY,
    REVIEWER_KEY,
    REVIEWER_ROLE,
    ROLES_KEY,
    TENANT_KEY,
    user_field,
    user_record,
)
from keel.memory.scope import label

__all__ = [
    "PROTECTED_KEYS",
    "auth",
    "is_review_run",
    "owner_filter",
    "protected_keys_in",
    "system_messages_in",
    "store_namespace_allowed",
]

auth = Auth()
server_config()  # read the file at startup (a missing or bad one stops the server with why)

PROTECTED_KEYS = (
    frozenset(SupervisorState.__required_keys__ | SupervisorState.__optional_keys__)
    - {"messages", "remaining_steps"}
) | {REJECTIONS_KEY}
"""State keys only keel writes (in an agent's or a supervisor's state, `PermissionMiddleware`'s)."""

KEEL_KEYS = frozenset({TENANT_KEY, OWNER_KEY, ROLES_KEY, REVIEWER_KEY})
"""Metadata keys only keel's auth writes (a client sending one is refused, or overwritten)."""


def owner_filter(user: Any) -> dict[str, str]:
    """The metadata every resource of this user carries (and is filtered by).

    A user keel did not authenticate (e.g. `langgraph dev`'s Studio user) has no tenant and is
    refused with 403.
    """
    try:
        return {
            TENANT_KEY: str(user_field(user, "tenant_id")),
            OWNER_KEY: str(user_field(user, "identity")),
        }
    except (KeyError, TypeError, AttributeError):
        raise Auth.exceptions.HTTPException(
            status_code=403, detail="Not a keel user: authenticate with a keel bearer token."
        ) from None


def store_namespace_allowed(user: Any, namespace: tuple[str, ...] | None) -> bool:
    """Whether `namespace` is inside the user's own `(kind, tenant, user)` memory namespace."""
    if namespace is None or len(namespace) < 3:
        return False
    tenant, identity = str(user_field(user, "tenant_id")), str(user_field(user, "identity"))
    return namespace[1] == label(tenant) and namespace[2] == label(identity)


def is_reviewer(user: Any) -> bool:
    """Whether the user's token carries the `reviewer` role."""
    try:
        roles = user_field(user, "roles")
    except (KeyError, TypeError):
        return False
    return isinstance(roles, list | tuple) and REVIEWER_ROLE in roles


def _steers(key: str) -> bool:
    """Whether a review run's `configurable` key would steer the owner's run.

    A review run may send the thread's address (`thread_id`); LangGraph's server adds its own
    (`langgraph_auth_user`, `__request_start_time_ms__`, ...) over anything a client sent.
    Any other would steer: `agent` picks another of the tenant's agents (and LangGraph's server
    keeps a run's config on the thread, for the owner's later runs too), `checkpoint_id` /
    `checkpoint_map` / `checkpoint` aim at an older checkpoint than the latest.
    """
    ours = key == "thread_id" or key.startswith("langgraph_")
    return not (ours or (key.startswith("__") and key.endswith("__")))


_REVIEW_RUN_FIELDS: dict[str, Callable[[Any], bool]] = {
    # the run's address and what LangGraph's server fills in
    "thread_id": lambda v: v is not None,
    "assistant_id": lambda v: True,  # checked against the thread (`owned` returns the filter)
    "run_id": lambda v: True,
    "status": lambda v: v in (None, "pending"),
    "metadata": lambda v: True,  # the run's own; keel's keys in it are stamped over
    "prevent_insert_if_inflight": lambda v: True,  # keeps the answer out, never the owner's
    "if_not_exists": lambda v: v in (None, "reject"),  # "create" would make a thread
    # cancelling or deleting the owner's run in flight is no answer
    "multitask_strategy": lambda v: v not in ("interrupt", "rollback"),
    "action": lambda v: v is None,
    "after_seconds": lambda v: not v,  # a delayed answer: a run scheduled on the owner's thread
    "kwargs": lambda v: isinstance(v, dict),
}
"""What a reviewer's run on another user's thread may carry (each field: the values it may take).

The top-level fields of LangGraph's `create_run` value; the run's own are in `_REVIEW_RUN_KWARGS`.
A field named in neither (a later server's) may only be empty.
"""

_REVIEW_RUN_KWARGS: dict[str, Callable[[Any], bool]] = {
    "input": lambda v: v is None,
    "command": lambda v: True,  # `resume` only: checked by `is_review_run`
    "config": lambda v: True,  # `configurable` and `metadata` only: checked by `is_review_run`
    "context": lambda v: isinstance(v, dict | None) and not any(map(_steers, v or {})),
    # how the reviewer watches the run (their stream, not the owner's)
    "stream_mode": lambda v: True,
    "subgraphs": lambda v: True,
    "resumable": lambda v: True,
    # a breakpoint would stop the owner's run past the answer, at no one's request
    "interrupt_before": lambda v: not v,
    "interrupt_after": lambda v: not v,
    # the owner's run's output sent to the reviewer's URL, feedback on it, checkpoints kept
    # less often than the server's default: each the reviewer's setting for the owner's run
    "webhook": lambda v: not v,
    "feedback_keys": lambda v: not v,
    "temporary": lambda v: not v,
    "checkpoint_during": lambda v: v in (None, True),
    "durability": lambda v: v in (None, "async"),  # LangGraph server's default
}
"""The run's own fields a review run may carry (LangGraph's server nests them under `kwargs`)."""


def _review_fields(fields: dict[str, Any], allowed: dict[str, Callable[[Any], bool]]) -> bool:
    return all(allowed[k](v) if k in allowed else not v for k, v in fields.items())


def is_review_run(run: Any) -> bool:
    """Whether a run only answers an interrupt (what a reviewer may start on another's thread).

    That is `command={"resume": ...}` with no input, update or goto, on an existing thread, at
    its latest checkpoint (a `checkpoint_id` would re-answer an approval the owner already
    settled), in the agent the thread waits in (no `configurable` but `thread_id`: an `agent`
    would answer with another of the tenant's agents), without breakpoints of its own
    (`interrupt_before` / `interrupt_after`), with no other config (a `recursion_limit` of 1
    ended the owner's thread as `budget_exceeded`), without cancelling a run in flight
    (`multitask_strategy` interrupt, rollback), and with no run field but stream options and
    the server's defaults (`_REVIEW_RUN_FIELDS`, `_REVIEW_RUN_KWARGS`: no `webhook`,
    `durability`, `after_seconds`, ...). That it goes through the thread's own assistant is
    checked against the thread (`owned` returns the filter).
    """
    kwargs = run.get("kwargs") if isinstance(run, dict) else None
    if not isinstance(kwargs, dict) or not _review_fields(run, _REVIEW_RUN_FIELDS):
        return False
    if not _review_fields(kwargs, _REVIEW_RUN_KWARGS):
        return False
    config = kwargs.get("config") or {}
    if not isinstance(config, dict) or set(config) - {"configurable", "metadata"}:
        return False  # `recursion_limit`, `tags`, ...: a reviewer's settings for the owner's run
    configurable = config.get("configurable")
    if not isinstance(configurable, dict | None) or any(map(_steers, configurable or {})):
        return False
    command = kwargs.get("command")
    if not isinstance(command, dict) or command.get("resume") is None:
        return False
    return not ({k for k, v in command.items() if v is not None} - {"resume"}) and (
        run.get("thread_id") is not None
    )


def _is_thread_copy(value: Any) -> bool:
    """Whether a thread `create` is `threads.copy` (its new thread reported by its id alone).

    LangGraph's server checks a copy as a `read` of the source thread and a `create` of the new
    one, whose metadata is the source's: a plain `threads.create` always reports `metadata`
    (and `if_exists`).
    """
    return isinstance(value, dict) and "metadata" not in value


@auth.authenticate
async def authenticate(authorization: str | Mapping[str, str] | None) -> dict[str, Any]:
    """Map a bearer token to its user record (401 without a known token).

    LangGraph's server passes the `Authorization` header by parameter name; Aegra passes the
    whole headers dict as the only argument.
    """
    if isinstance(authorization, Mapping):
        authorization = authorization.get("authorization")
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Auth.exceptions.HTTPException(
            status_code=401, detail="Send 'Authorization: Bearer <token>'."
        )
    try:
        config = server_config()
    except KeelError as exc:
        raise Auth.exceptions.HTTPException(status_code=500, detail=str(exc)) from exc
    entry = config.authenticate(token.strip())
    if entry is None:
        raise Auth.exceptions.HTTPException(status_code=401, detail="Unknown token.")
    tenant = config.tenant(entry.tenant)
    spec = tenant.agents[tenant.agent]
    policy = spec.policy.name if spec.policy is not None else "default"
    return user_record(
        user_id=entry.user_id, tenant_id=entry.tenant, roles=entry.roles, policy=policy
    )


def protected_keys_in(run: Any) -> list[str]:
    """The protected keys a run's `input` or `command.update` would set (sorted).

    That is keel's (`PROTECTED_KEYS`) and LangGraph's own channels (`branch:to:<node>`,
    `__pregel_tasks`, ...), which would start a node past the guards before it.
    """
    keys = {str(k) for sent in _sent_values(run) for k in sent}
    return sorted(k for k in keys if k in PROTECTED_KEYS or langgraphs_channel(k))


_SYSTEM_ROLES = frozenset({"system", "developer"})


def system_messages_in(run: Any) -> list[str]:
    """The system roles (`system`, `developer`) among the messages a run sends, sorted.

    That is its `input` and its `command.update`, in any form LangChain reads (a dict with
    `role` or `type`, a `(role, content)` pair).
    """
    return sorted(_roles_sent(run) & _SYSTEM_ROLES)


def _roles_sent(run: Any) -> set[str]:
    """The roles (`user`, `remove`, ...) of the messages a run's input and update send."""
    sent: list[Any] = []
    for values in _sent_values(run):
        messages = values.get("messages")
        if isinstance(messages, list | tuple):
            sent.extend(messages)
        elif messages is not None:
            sent.append(messages)
    return {role for m in sent if (role := _role_of(m)) is not None}


def _sent_values(run: Any) -> list[dict[Any, Any]]:
    """What a run writes: its `input` and its `command.update` (pairs read as a dict).

    LangGraph's server nests them under `kwargs`; Aegra passes the request body as is.
    """
    kwargs = run.get("kwargs", run) if isinstance(run, dict) else None
    if not isinstance(kwargs, dict):
        return []
    command = kwargs.get("command")
    update = command.get("update") if isinstance(command, dict) else None
    if isinstance(update, list | tuple):
        pairs = [item for item in update if isinstance(item, list | tuple) and item]
        update = {item[0]: item[1] if len(item) > 1 else None for item in pairs}
    return [v for v in (kwargs.get("input"), update) if isinstance(v, dict)]


def _input_of(run: Any) -> Any:
    """What a run's graph is sent as input (None when a `command` is sent instead).

    LangGraph's server nests both under `kwargs`; Aegra passes the body as is.
    """
    kwargs = run.get("kwargs", run) if isinstance(run, dict) else None
    if not isinstance(kwargs, dict) or kwargs.get("command"):
        return None
    return kwargs.get("input")


def _role_of(message: Any) -> str | None:
    """The role of a sent message as LangGraph will read it (`convert_to_messages`).

    That reads LangChain's serialized form too (`{"lc": 1, "type": "constructor", "id": [...,
    "SystemMessage"], ...}`), whose `type` says nothing of the role. A message LangChain cannot
    read has the role it names (the graph refuses it).
    """
    try:
        (read,) = convert_to_messages([message])
    except Exception:  # langchain-core raises NotImplementedError, ValueError, ...
        return _named_role(message)
    if read.type == "system" and read.additional_kwargs.get("__openai_role__") == "developer":
        return "developer"
    return {"human": "user"}.get(read.type, read.type)


def _named_role(message: Any) -> str | None:
    if isinstance(message, dict):
        role = message.get("role", message.get("type"))
    elif isinstance(message, list | tuple) and len(message) == 2:
        role = message[0]
    else:
        return None
    return str(role).lower() if isinstance(role, str) else None


@auth.on
async def owned(ctx: Auth.types.AuthContext, value: Any) -> dict[str, str]:
    """Threads, runs, crons, assistants: stamp the owner on create, filter by it everywhere.

    A run whose input or `command.update` sets a key only keel writes is refused with 422, and
    so is metadata that sets one of keel's own keys (`keel_owner`, ...) on an update, and a new
    cron, and a thread copy. A reviewer reads the tenant's threads and resumes them (see the
    module docstring).
    """
    owner = owner_filter(ctx.user)
    reviewer = is_reviewer(ctx.user) and ctx.resource == "threads"
    if ctx.resource == "crons" and ctx.action == "create":
        raise Auth.exceptions.HTTPException(
            status_code=422,
            detail=(
                "keel's served graphs take no crons: the server's cron scheduler starts their "
                "runs as a bare user id, without the tenant and roles keel's auth gave the "
                "cron's creator, so keel could not tell whom they act for (each would fail). "
                "Start the runs from your own scheduler with the user's token."
            ),
        )
    if ctx.resource == "threads" and ctx.action == "create" and _is_thread_copy(value):
        _refuse_copy()
    if ctx.action == "create_run":
        _refuse_unsendable(value)
        _refuse_raw_streams(value)
        _refuse_webhook(value)
    if ctx.action == "update" and isinstance(value, dict):
        _refuse_keel_metadata(value.get("metadata"))
    if ctx.resource == "assistants" and ctx.action in ("create", "update"):
        _refuse_system_mark(value)
    if ctx.action in ("create", "create_run", "update") and isinstance(value, dict):
        _refuse_keel_config_metadata(value)
        _refuse_internal_config(value)
    if reviewer and ctx.action == "create_run" and is_review_run(value):
        await _refuse_if_full(owner[TENANT_KEY], None)
        _stamp(value, {TENANT_KEY: owner[TENANT_KEY], REVIEWER_KEY: owner[OWNER_KEY]})
        # the thread's own assistant (LangGraph's server keeps the last run's on the thread):
        # another one (the supervisor, the reviewer's own with an `agent` in its config) would
        # answer with an agent that did not ask, and be kept on the thread for the owner
        return {TENANT_KEY: owner[TENANT_KEY], "assistant_id": str(value.get("assistant_id"))}
    if ctx.action == "create_run":
        await _refuse_if_full(owner[TENANT_KEY], owner[OWNER_KEY])
    if ctx.action in ("create", "create_run") and isinstance(value, dict):
        roles = [str(r) for r in user_field(ctx.user, "roles")]
        _stamp(value, {**owner, ROLES_KEY: roles})
    if reviewer and ctx.action in ("read", "search"):
        return {TENANT_KEY: owner[TENANT_KEY]}
    return owner


def _refuse_copy() -> NoReturn:
    """403 for `threads.copy`, whoever asks: a copy would run its side effects a second time.

    keel's ledger runs each side-effecting call at most once per thread, keyed by the thread and
    the call's id; LangGraph's copy writes the source's checkpoints under the new thread's id
    (every mention of the old id replaced), so nothing marks the copy's calls as the source's.
    A waiting call, approved on both threads, ran twice; so did a call that had run, once a run
    from the copy's checkpoint before its approval asked again and was approved (refusing only
    waiting threads would not do). The hook cannot tell what the source holds either: the
    server checks a copy as a `read` of the source and a `create` of a thread named by its new
    id alone.
    """
    raise Auth.exceptions.HTTPException(
        status_code=403,
        detail=(
            "keel's served graphs copy no threads: keel runs each side-effecting tool call "
            "at most once per thread, and a copy is another thread holding the same calls, so "
            "a call waiting for approval (or one that ran, asked again from the copy's "
            "checkpoint before its approval) would run once on each. Go back in the same "
            "thread instead (a run with checkpoint_id from threads.get_history, where keel "
            "answers a call that ran with its recorded result), or start a new thread."
        ),
    )


def _refuse_unsendable(run: Any) -> None:
    """422 when a run writes what a served client may not.

    That is keel's keys, a system message, or a removal (`{"type": "remove", "id": ...}`), in
    its input or its `command.update`.
    """
    if kinds := system_messages_in(run):
        detail = (
            f"The run sends a {' and a '.join(kinds)} message: a served client sends user "
            "messages (and may resend the conversation's AI turns), while the system prompt "
            "is the agent's (build_agent(system_prompt=...)); a client's system message "
            "would speak with its authority. Put the instruction in a user message."
        )
    elif "remove" in _roles_sent(run):
        detail = (
            "The run removes messages (a message of type 'remove' in its input or "
            "command.update): a run sends messages, and a removal would delete the thread's "
            "record as the run starts (a pending tool call, a call already answered, the turns "
            "the audit log points to). The thread's owner edits its history with "
            "threads.update_state."
        )
    elif bad := protected_keys_in(run):
        detail = (
            f"The run's input sets {', '.join(repr(k) for k in bad)}: only keel writes "
            "these (keel's record of the run; LangGraph's own channels start the graph's "
            "nodes). Send 'messages'."
        )
    elif (problem := input_refusal(_input_of(run))) is not None:
        detail = problem  # the graph would refuse it as the run starts: the run failed
    else:
        return
    raise Auth.exceptions.HTTPException(status_code=422, detail=detail)


async def _refuse_if_full(tenant: str, user: str | None) -> None:
    """429 with `Retry-After` when the tenant's (or the user's) runs are at their caps.

    Also when the run could only wait (a running cap is reached) and this process's waiting
    room is full (`queued_per_process`): it would be refused as it starts. The room is the
    process's own: where the runs run in the process that creates them (`langgraph dev`).
    """
    admission = admission_of(tenant)
    if admission is None:
        return
    policy = admission.policy
    scopes: list[tuple[str, int | None, int, str | None]] = [
        ("tenant", policy.tenant_running, policy.tenant_queued, None)
    ]
    if user is not None:
        scopes.append(("user", policy.user_running, policy.user_queued, user))
    waits: str | None = None  # whose running cap the run would wait behind
    for scope, running, queued, who in scopes:
        if running is None:
            continue
        held = await admission.aheld(tenant, who)
        whose = f"user {who!r} of tenant {tenant!r}" if scope == "user" else f"tenant {tenant!r}"
        if held["running"] + held["queued"] >= running + queued:
            _overloaded(
                f"{whose} has {running} run(s) running and {queued} queued, its caps",
                policy.retry_after,
            )
        if waits is None and held["running"] >= running:
            waits = whose
    room = admission.waiting_room
    if waits is not None and room is not None and room.waiting >= room.limit:
        _overloaded(
            f"{waits} has no free run slot, and this process has {room.limit} run(s) waiting "
            "for one already, its cap (queued_per_process)",
            policy.retry_after,
        )


def _overloaded(why: str, retry_after: int) -> NoReturn:
    raise Auth.exceptions.HTTPException(
        status_code=429,
        detail=f"Overloaded: {why}; retry after {retry_after} s.",
        headers={"Retry-After": str(retry_after)},
    )


def _refuse_keel_config_metadata(value: dict[str, Any]) -> None:
    """422 when a config sent as is (an assistant's, a run's under Aegra) sets keel's metadata.

    A node reads who a run acts for from its config's metadata (`keel.identity`). LangGraph's
    server nests a run's config under `kwargs`, where `_stamp` replaces those keys; Aegra hands
    the request body as is and ignores a handler's changes to it (the handler returns a filter),
    so there a forged key would reach the run: refused instead.
    """
    if "kwargs" in value:
        return
    config = value.get("config")
    if isinstance(config, dict):
        _refuse_keel_metadata(config.get("metadata"))


_INTERNAL = "__pregel_"
"""The prefix of LangGraph's own `configurable` keys (its checkpointer, a task's id, ...)."""
RAW_STREAM_KEY = "__event_streaming_v2"
"""The `configurable` key that runs a run under LangGraph's event streaming protocol (v2)."""


def _config_keys(value: dict[str, Any]) -> set[str]:
    """The keys of a run's (or an assistant's) `configurable` and `context`.

    LangGraph's server nests the config under `kwargs` (and has copied `context` into it);
    Aegra passes the body as is.
    """
    keys: set[str] = set()
    for holder in (value, value.get("kwargs")):
        if not isinstance(holder, dict):
            continue
        config = holder.get("config")
        for part in (
            config.get("configurable") if isinstance(config, dict) else None,
            holder.get("context"),
        ):
            if isinstance(part, dict):
                keys.update(str(k) for k in part)
    return keys


def _refuse_internal_config(value: dict[str, Any]) -> None:
    """422 when a run's (or an assistant's) config or context sets one of LangGraph's own keys.

    LangGraph reads them from the run's config as its own: `__pregel_checkpointer: null` runs
    without the server's checkpointer (nothing saved, nothing to approve, no at-most-once on a
    retry), `__pregel_task_id` passes for a subgraph's run, and `__event_streaming_v2` streams
    the run under LangGraph's event streaming protocol, raw (see `_refuse_raw_streams`).
    """
    keys = _config_keys(value)
    if RAW_STREAM_KEY in keys:
        _refuse_raw_stream(f"The config sets {RAW_STREAM_KEY!r}, which streams the run under")
    if bad := sorted(k for k in keys if k.startswith(_INTERNAL)):
        raise Auth.exceptions.HTTPException(
            status_code=422,
            detail=(
                f"The config sets {', '.join(repr(k) for k in bad)}: only LangGraph "
                "sets these (how it runs and saves the run). Leave them out."
            ),
        )


def _refuse_raw_streams(run: Any) -> None:
    """422 for a run streamed as LangGraph's `events`: each model call's raw output.

    `stream_mode="events"` (and LangGraph's event streaming protocol, v2: `POST
    /threads/{id}/commands`, whose runs carry `__event_streaming_v2`) streams what each model
    call says as it says it, before keel's output guard has checked the answer: a card
    number or an email the guard redacts everywhere else would reach the client as sent.
    """
    kwargs = run.get("kwargs") if isinstance(run, dict) else None
    for holder in (run, kwargs):
        modes = holder.get("stream_mode") if isinstance(holder, dict) else None
        modes = [modes] if isinstance(modes, str) else modes
        if isinstance(modes, list | tuple) and "events" in modes:
            _refuse_raw_stream("The run asks for stream_mode 'events', which streams it under")


_NEVER_NAMES = frozenset(
    {
        "localhost",
        "host.docker.internal",
        "metadata",
        "metadata.google.internal",
        "metadata.amazonaws.com",
        "instance-data",
    }
)
"""Host names of this machine, its container host and a cloud's metadata service: refused."""
_NEVER_SUFFIXES = (".localhost", ".svc.cluster.local")
"""Name suffixes refused always: this machine, Kubernetes' internal services."""
_PRIVATE_SUFFIXES = (".internal", ".local", ".localdomain", ".lan", ".intranet")
"""Name suffixes of the private network, refused unless `[webhooks] private = true`."""
_METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "169.254.170.2", "100.100.100.200")
) | {ipaddress.ip_address("fd00:ec2::254")}
"""Cloud metadata services (AWS, ECS, Alibaba, AWS over IPv6): refused always."""


def webhook_refusal(url: Any, *, private: bool = False) -> str | None:
    """Why a run may not send its output to `url`, or None.

    Not an `http(s)` URL with a host; a host that is a loopback, link-local (the cloud metadata
    service at 169.254.169.254), unspecified, multicast or reserved address; or, unless
    `private`, a private address (10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7) or a
    private network's name (`*.internal`, `*.local`, ...); `localhost`, a cloud's metadata
    service and `*.svc.cluster.local` always. Addresses spelled as numbers
    (`http://2130706433/`, `http://0x7f.1/`) count as the address they are. A name is not
    resolved (LangGraph's `disable_private_ips` resolves it at creation and at each call).
    """
    if not isinstance(url, str):
        return f"the webhook must be a URL (a string), got {type(url).__name__}"
    try:
        parts = urlsplit(url.strip())
        host = (parts.hostname or "").rstrip(".").lower()
    except ValueError as exc:
        return f"the webhook {url!r} is not a URL ({exc})"
    if parts.scheme.lower() not in ("http", "https") or not host:
        return f"the webhook {url!r} is not an http(s) URL with a host"
    address = _address(host)
    if address is None:
        if host in _NEVER_NAMES or host.endswith(_NEVER_SUFFIXES):
            return f"the webhook's host {host!r} names this machine or an internal service"
        if host.endswith(_PRIVATE_SUFFIXES) and not private:
            return f"the webhook's host {host!r} is a private network's name"
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if (
        address in _METADATA_ADDRESSES
        or address.is_loopback
        or address.is_link_local
        or address.is_unspecified
        or address.is_multicast
        or address.is_reserved
    ):
        return (
            f"the webhook's host {host!r} is a loopback, link-local, metadata or reserved address"
        )
    if not address.is_global and not private:
        return f"the webhook's host {host!r} is a private address"
    return None


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address `host` spells (`10.0.0.1`, `[::1]`'s `::1`, `0x7f.1`, `2130706433`)."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if not all(c in "0123456789abcdefx." for c in host):
        return None
    try:  # the numeric forms the resolver reads as an IPv4 address (no lookup)
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def _refuse_webhook(run: Any) -> None:
    """422 for a run whose `webhook` would have the server POST its output somewhere internal.

    LangGraph's server sends the run's output (the thread's values) to the URL from inside the
    deployment: to the cloud's metadata service, the database, another service on the private
    network, it is a request the client could not make (SSRF).
    """
    kwargs = run.get("kwargs") if isinstance(run, dict) else None
    for holder in (run, kwargs):
        url = holder.get("webhook") if isinstance(holder, dict) else None
        if not url:
            continue
        if (why := webhook_refusal(url, private=server_config().private_webhooks)) is not None:
            raise Auth.exceptions.HTTPException(
                status_code=422,
                detail=(
                    f"Refused: {why}. The server POSTs the run's output to its webhook from "
                    "inside the deployment, so keel refuses webhooks to this machine, the "
                    "cloud's metadata service and (unless the server config says [webhooks] "
                    "private = true) the private network. Send a public http(s) URL."
                ),
            )


def _refuse_raw_stream(what: str) -> NoReturn:
    raise Auth.exceptions.HTTPException(
        status_code=422,
        detail=(
            f"{what} LangGraph's event stream: each model call's raw output, before keel's "
            "output guard checks the answer (a card number or an email it redacts would reach "
            "the client as the model wrote it). Stream the run with runs.stream's other modes "
            "('values', 'updates', 'messages-tuple', 'messages', 'debug', 'tasks', "
            "'checkpoints', 'custom'), which carry the checked answer."
        ),
    )


def _refuse_keel_metadata(metadata: Any) -> None:
    bad = sorted(KEEL_KEYS & set(metadata)) if isinstance(metadata, dict) else []
    if bad:
        raise Auth.exceptions.HTTPException(
            status_code=422,
            detail=(
                f"The metadata sets {', '.join(repr(k) for k in bad)}: only keel's auth writes "
                "these (whose the thread is). Leave them out."
            ),
        )


SYSTEM_MARK = "created_by"
"""The metadata key marking the graphs' own assistants (`"system"`), which every user reads."""


def _refuse_system_mark(value: Any) -> None:
    """422 for an assistant whose metadata sets `created_by`: only the server marks its own.

    Every tenant reads the assistants marked `created_by: system` (`read_assistants`): a
    client's assistant so marked would show its name, config and owner to every tenant, be
    listed as their MCP tool and run their threads with its config.
    """
    metadata = value.get("metadata") if isinstance(value, dict) else None
    if isinstance(metadata, dict) and SYSTEM_MARK in metadata:
        raise Auth.exceptions.HTTPException(
            status_code=422,
            detail=(
                f"The metadata sets {SYSTEM_MARK!r}: the server marks the graphs' own "
                "assistants with it, which every tenant reads. Leave it out."
            ),
        )


def _stamp(value: dict[str, Any], stamp: dict[str, Any]) -> None:
    """Replace the keel keys a client put in the metadata (the run's and its config's) by `stamp`.

    The run's metadata wins over the thread's, so a client's `keel_owner` must not get there.
    """
    for holder in (value, (value.get("kwargs") or {}).get("config") or {}):
        metadata = holder.get("metadata")
        if isinstance(metadata, dict):
            for key in KEEL_KEYS & set(metadata):
                del metadata[key]
    metadata = value.get("metadata")
    if not isinstance(metadata, dict):
        metadata = value["metadata"] = {}
    metadata.update(stamp)


@auth.on.assistants.read
async def read_assistants(ctx: Auth.types.AuthContext, value: Any) -> dict[str, Any]:
    """Your own assistants, and the graphs' own ones (one per graph in langgraph.json).

    A reviewer reads the tenant's: a waiting thread is resumed through the assistant its last
    run used, which may be its owner's own.
    """
    return {"$or": [{SYSTEM_MARK: "system"}, _assistants_of(ctx.user)]}


@auth.on.assistants.search
async def search_assistants(ctx: Auth.types.AuthContext, value: Any) -> dict[str, Any]:
    """Listing assistants shows your own and the graphs' own ones (a reviewer: the tenant's)."""
    return {"$or": [{SYSTEM_MARK: "system"}, _assistants_of(ctx.user)]}


def _assistants_of(user: Any) -> dict[str, str]:
    owner = owner_filter(user)
    return {TENANT_KEY: owner[TENANT_KEY]} if is_reviewer(user) else owner


@auth.on.store
async def own_store(ctx: Auth.types.AuthContext, value: Any) -> None:
    """Store items: only inside the caller's `(kind, tenant, user)` namespace."""
    owner_filter(ctx.user)  # refuses users without a tenant
    # a search names it `namespace` under LangGraph's server, `namespace_prefix` under Aegra
    namespace = value.get("namespace")
    if namespace is None:
        namespace = value.get("namespace_prefix")
    namespace = tuple(namespace) if namespace is not None else None
    if not store_namespace_allowed(ctx.user, namespace):
        tenant = label(str(user_field(ctx.user, "tenant_id")))
        user = label(str(user_field(ctx.user, "identity")))
        raise Auth.exceptions.HTTPException(
            status_code=403,
            detail=(
                f"Store namespace {namespace!r} is not yours: use (kind, {tenant!r}, {user!r}, "
                "...), e.g. ('memories', ...)."
            ),
        )
