"""Who a served run is for: the server's authenticated user, turned into a `RunContext`.

Under LangGraph server, a run's `context` comes from the client's request, so it can say
anything. keel's auth (`keel.app.auth`) returns a user record with the identity it authenticated;
LangGraph puts it on the run as `runtime.server_info.user`, after (and over) anything the client
sent. `context_of` (used by every keel node) prefers that record to the client's context for
`user_id`, `tenant_id`, `roles` and `policy`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from keel.errors import UserError
from keel.state import RunContext

__all__ = ["context_from_user", "server_user", "user_field", "user_record"]


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

    LangGraph's server hands keel's auth record back as a mapping (`user["tenant_id"]`); Aegra
    hands it back as a pydantic model whose fields are attributes (`user.tenant_id`).
    """
    try:
        return user[name]
    except (KeyError, TypeError):
        pass
    try:
        return getattr(user, name)
    except AttributeError:
        raise KeyError(name) from None


def context_from_user(user: Any) -> RunContext:
    """The `RunContext` of a server user record made by `user_record` (fails closed)."""
    try:
        fields = {
            key: user_field(user, key) for key in ("identity", "tenant_id", "roles", "policy")
        }
    except KeyError as exc:
        raise UserError(
            f"The server's authenticated user {_identity(user)!r} has no {exc} field, so keel "
            "cannot tell its tenant and roles. Serve keel graphs with keel's auth "
            '(langgraph.json: "auth": {"path": "keel.app.auth:auth"}), or return '
            "keel.identity.user_record(...) from your own @auth.authenticate."
        ) from exc
    roles = fields["roles"]
    if isinstance(roles, str) or not isinstance(roles, Sequence | Mapping):
        raise UserError(f"The server user's roles must be a list of names, got {roles!r}.")
    return RunContext(
        user_id=str(fields["identity"]),
        tenant_id=str(fields["tenant_id"]),
        roles=tuple(str(r) for r in roles),
        policy=str(fields["policy"]),
    )


def _identity(user: Any) -> str:
    return str(getattr(user, "identity", user))
