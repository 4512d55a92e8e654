"""Who a served run is for: the server's authenticated user, turned into a `RunContext`.

Under LangGraph server, a run's `context` comes from the client's request, so it can say
anything. keel's auth (`keel.app.auth`) returns a user record with the identity it authenticated;
LangGraph puts it on the run as `runtime.server_info.user`, after (and over) anything the client
sent. `context_of` (used by every keel node) prefers that record to the client's context for
`user_id`, `tenant_id`, `roles` and `policy`.

A **reviewer** (a user with the role `reviewer`) may resume another user's waiting thread of the
same tenant. keel's auth marks such a run in its metadata (`keel_reviewer`); the thread's own
metadata says whose it is (`keel_owner`, `keel_roles`, stamped by keel's auth when it was
created). The run then acts for the thread's owner (their identity and roles: the tools, budgets
and memories are the owner's), and the reviewer is only who decided (`reviewer_of`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from keel.errors import UserError
from keel.state import RunContext

__all__ = [
    "OWNER_KEY",
    "REVIEWER_KEY",
    "REVIEWER_ROLE",
    "ROLES_KEY",
    "TENANT_KEY",
    "context_from_user",
    "reviewer_of",
    "server_user",
    "user_field",
    "user_record",
]

TENANT_KEY = "keel_tenant"
"""Metadata key: the tenant a thread (run, assistant, cron) belongs to."""
OWNER_KEY = "keel_owner"
"""Metadata key: the user a thread (run, assistant, cron) belongs to."""
ROLES_KEY = "keel_roles"
"""Metadata key: the owner's roles when the thread was made (a reviewer's run acts with them)."""
REVIEWER_KEY = "keel_reviewer"
"""Metadata key: the reviewer who resumes another user's thread (set by keel's auth only)."""
REVIEWER_ROLE = "reviewer"
"""The role that lets a user list and resume the waiting threads of their tenant."""


def user_record(
    *, user_id: str, tenant_id: str, roles: Sequence[str], policy: str
) -> dict[str, Any]:
    """The user record keel's auth returns to LangGraph (`identity` is LangGraph's user id)."""
    return {
        "identity": user_id,
        "tenant_id": tenant_id,
        "roles": list(roles),
        "policy": policy,
        "permissions": [],
    }


def server_user(runtime: object) -> Any | None:
    """The server's authenticated user of this run, or None outside a server (or without auth)."""
    info = getattr(runtime, "server_info", None)
    return getattr(info, "user", None) if info is not None else None


def user_field(user: Any, name: str) -> Any:
    """A field of a server user, by key or by attribute; `KeyError(name)` when it has none.

    The one place keel reads a server user's fields. LangGraph's server hands keel's auth record
    back as a mapping (`user["tenant_id"]`); Aegra hands it back as a pydantic model whose
    fields are attributes (`user.tenant_id`).
    """
    try:
        return user[name]
    except (KeyError, TypeError):
        pass
    try:
        return getattr(user, name)
    except AttributeError:
        raise KeyError(name) from None


def reviewer_of(user: Any) -> str | None:
    """The authenticated user's identity, as who decided on a review; None outside a server."""
    return None if user is None else str(user_field(user, "identity"))


def context_from_user(user: Any, metadata: Mapping[str, Any] | None = None) -> RunContext:
    """The `RunContext` of a server user record made by `user_record` (fails closed).

    `metadata` is the run's (the thread's, merged with the run's own): a reviewer's run on
    another user's thread acts for the thread's owner (see the module docstring).
    """
    try:
        fields = {
            key: user_field(user, key) for key in ("identity", "tenant_id", "roles", "policy")
        }
    except (KeyError, TypeError) as exc:
        raise UserError(
            f"The server's authenticated user {_identity(user)!r} has no {exc} field, so keel "
            "cannot tell its tenant and roles. Serve keel graphs with keel's auth "
            '(langgraph.json: "auth": {"path": "keel.app.auth:auth"}), or return '
            "keel.identity.user_record(...) from your own @auth.authenticate."
        ) from exc
    roles = fields["roles"]
    if isinstance(roles, str) or not isinstance(roles, Sequence | Mapping):
        raise UserError(f"The server user's roles must be a list of names, got {roles!r}.")
    context = RunContext(
        user_id=str(fields["identity"]),
        tenant_id=str(fields["tenant_id"]),
        roles=tuple(str(r) for r in roles),
        policy=str(fields["policy"]),
    )
    return _acting_for_owner(context, metadata) if metadata else context


def _acting_for_owner(reviewer: RunContext, metadata: Mapping[str, Any]) -> RunContext:
    """The thread owner's context when `reviewer` resumes their thread, else `reviewer`."""
    owner = metadata.get(OWNER_KEY)
    if (
        metadata.get(REVIEWER_KEY) != reviewer.user_id
        or REVIEWER_ROLE not in reviewer.roles
        or metadata.get(TENANT_KEY) != reviewer.tenant_id
        or not isinstance(owner, str)
        or not owner
        or owner == reviewer.user_id
    ):
        return reviewer
    roles = metadata.get(ROLES_KEY)
    owner_roles = tuple(str(r) for r in roles) if isinstance(roles, list | tuple) else ()
    return RunContext(
        user_id=owner, tenant_id=reviewer.tenant_id, roles=owner_roles, policy=reviewer.policy
    )


def _identity(user: Any) -> str:
    return str(getattr(user, "identity", user))
