"""Approval digests and grants: a human's decision is bound to one exact call, and sealed.

The digest names a call: tool, tool version, canonical arguments and policy (`name@version`);
keel's nodes take it over the arguments as the tool reads them (`read=True`, computed by
`keel.tools._args.approval_digests`, which also gives the digest keel used before, of the
arguments as spelled, that decisions stored then are still found under).
It is shown to the reviewer in the interrupt, so it is no secret. What makes a decision a
*grant* is its seal: an HMAC-SHA256 under a server-side secret the client never sees, over the
record, the thread it was given in (for a user-scoped standing approval: none) and the user.
`execute_tools` runs an `ask` call only on a grant whose seal verifies; a record a client
copied, built from a digest, or moved to another thread or user, is ignored. A rejection needs
no seal: it can only stop a call.

The secret is `build_agent(approval_secret=...)`, else the `KEEL_APPROVAL_SECRET` environment
variable, else a random one made when keel is imported. A secret you set must be at least
`MIN_SECRET_BYTES` (16) long. The default is secure but lasts one process: a grant sealed before
a restart is not trusted after it (the call is asked about again, the safe side). Set a secret to
keep grants across restarts and processes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from keel.errors import UserError
from keel.state import Approval, RunContext

__all__ = [
    "MIN_SECRET_BYTES",
    "REVIEWER_META",
    "SECRET_ENV",
    "Grants",
    "RunGrants",
    "approval_digest",
    "approval_key",
    "call_digest",
    "canonical_args",
    "decided",
    "decision_of",
    "json_text",
    "plain_keys",
]

SECRET_ENV = "KEEL_APPROVAL_SECRET"
"""The environment variable keel reads the approval secret from."""

MIN_SECRET_BYTES = 16
"""The shortest approval secret keel takes (128 bits): a short one could be guessed."""

REVIEWER_META = "keel_reviewer"
"""The `response_metadata` key naming who answered in a tool's place (a `respond`, or a
rejection: of a call whose outcome was unknown, or of a call `PermissionMiddleware` asked)."""

_PROCESS_SECRET = secrets.token_bytes(32)


def canonical_args(args: Mapping[str, Any]) -> str:
    """The arguments as canonical JSON: sorted keys, no spaces, so equal calls hash equally.

    In every process alike: a set (or frozenset) is written as a list in canonical order (a
    set's own order changes with each process's string hash seed, so a digest of it would
    differ in the process that resumes the call), anything else JSON cannot write as `str`.
    """
    return _canonical(args)


def _canonical(value: Any) -> str:
    return json_text(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def json_text(value: Any, **options: Any) -> str:
    """`value` as JSON (`json.dumps(value, **options)`), whatever keys its mappings have.

    A set is written as a list in canonical order, anything else JSON cannot write as `str`. A
    mapping key JSON cannot write (a tuple, a frozenset; or keys of mixed types under
    `sort_keys`, which cannot be ordered) is written as its own canonical JSON (`(1, 2)` as
    `"[1,2]"`), at any depth (`plain_keys`): tool arguments a tool's schema reads as
    `dict[tuple[int, int], str]` are written, digested and audited instead of ending the run in
    a `TypeError`. Values JSON writes already are written as before.
    """
    try:
        return json.dumps(value, default=_json_default, **options)
    except TypeError:  # a key JSON cannot write, or keys that cannot be sorted
        return json.dumps(plain_keys(value), default=_json_default, **options)


def plain_keys(value: Any) -> Any:
    """`value` with its mappings' keys as strings, at any depth (see `json_text`).

    A string key is kept; an int, float, bool or `None` is written as JSON writes it (`1` as
    `"1"`, `True` as `"true"`); any other key as its canonical JSON. `value` itself when every
    key is a string already (a model's arguments, parsed from JSON, always are).
    """
    if isinstance(value, Mapping):
        items = [(k, v, plain_keys(v)) for k, v in value.items()]
        if isinstance(value, dict) and all(isinstance(k, str) and p is v for k, v, p in items):
            return value
        return {_key_text(k): p for k, _, p in items}
    if isinstance(value, list | tuple):
        found = [plain_keys(v) for v in value]
        if any(p is not v for p, v in zip(found, value, strict=True)):
            return found
    return value


def _key_text(key: Any) -> str:
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, bool | int | float):
        return json.dumps({key: 0})[2:-5]  # as JSON writes the key itself
    return _canonical(key)


def _json_default(value: Any) -> Any:
    if isinstance(value, set | frozenset):
        return sorted(value, key=_canonical)
    return str(value)


def approval_digest(
    tool: str, args: Mapping[str, Any], policy: str, *, version: str, read: bool = False
) -> str:
    """The digest an approval is stored under: sha256 of tool, version, canonical args, policy.

    `read=True`: `args` are the arguments as the tool reads them (`keel.tools._args.as_called`;
    `approval_digests` computes both), and the digest says so, so it never equals the digest
    of arguments as a model spelled them (what keel stored decisions under before): a record
    of either kind matches only a call of its own kind.
    """
    text = f"{tool}\n{version}\n{canonical_args(args)}\n{policy}"
    payload = _digest_bytes(f"{_READ}{text}" if read else text)
    return hashlib.sha256(payload).hexdigest()


_READ = "keel-read-args\0"
"""What a digest of arguments as the tool reads them hashes first (a tool name holds no NUL)."""


def call_digest(tool: str, args: Mapping[str, Any], version: str) -> str:
    """The idempotency ledger's digest of a call: sha256 of tool, canonical args, `tool@version`.

    A call id recorded with another digest (other arguments, or another tool version) conflicts.
    A lone surrogate hashes as `?`, as LangGraph's checkpoint stores it: a call resumed from
    its checkpoint must hash as it did when it was claimed.
    """
    payload = f"{tool}\n{canonical_args(args)}\ntool@{version}".encode("utf-8", "replace")
    return hashlib.sha256(payload).hexdigest()


def _digest_bytes(text: str) -> bytes:
    r"""`text` as the bytes a digest hashes: UTF-8, with lone surrogates kept (`surrogatepass`).

    A model's arguments can hold a lone surrogate (`"\ud800"`), which strict UTF-8 refuses;
    hashing must never fail on them. Valid text encodes exactly as plain UTF-8.
    """
    return text.encode("utf-8", "surrogatepass")


def approval_key(digest: str, tool_call_id: str, decision: str) -> str:
    """Where a decision is stored in `state["approvals"]`.

    A rejection is stored under the digest alone: that exact call can never run, whatever its
    id. An approval is stored per call (`digest/tool_call_id`): it covers the call a human
    saw, not later identical calls.
    """
    return digest if decision == "rejected" else f"{digest}/{tool_call_id}"


def decided(approvals: Mapping[str, Any], digests: Sequence[str], tool_call_id: str) -> bool:
    """Whether a human's decision in `approvals` (trusted ones) already answers this call.

    A rejection of the same exact call anywhere on the thread, or an approval of this call: no
    human is asked (`human_review` asks only about the others; `execute_tools` answers a
    rejected call `rejected`), so the run does not pause for it. `digests` are the call's
    (`keel.tools._args.approval_digests`: as the tool reads its arguments, then as spelled).
    """
    return decision_of(approvals, digests, tool_call_id) is not None


def decision_of(
    approvals: Mapping[str, Approval], digests: Sequence[str], tool_call_id: str
) -> Approval | None:
    """The decision in `approvals` that answers the call of `digests`: a rejection first."""
    for digest in digests:
        if digest in approvals:
            return approvals[digest]
    for digest in digests:
        found = approvals.get(approval_key(digest, tool_call_id, "approved"))
        if found is not None:
            return found
    return None


@dataclass(frozen=True, slots=True)
class Grants:
    """Seals approvals with a server-side secret and keeps only verified ones."""

    secret: bytes = field(repr=False)

    @classmethod
    def from_secret(cls, secret: str | bytes | None = None) -> Grants:
        """From `secret`, else `KEEL_APPROVAL_SECRET`, else this process's random secret."""
        where = "build_agent(approval_secret=...)"
        if secret is None:
            secret = os.environ.get(SECRET_ENV) or None
            where = f"${SECRET_ENV}"
        if secret is None:
            return cls(_PROCESS_SECRET)
        if not isinstance(secret, str | bytes) or not secret:
            raise UserError(f"{where} must be a non-empty string or bytes, got {secret!r}.")
        try:
            key = secret.encode() if isinstance(secret, str) else secret
        except UnicodeEncodeError:
            raise UserError(f"{where} holds a lone surrogate: give UTF-8 text or bytes.") from None
        if len(key) < MIN_SECRET_BYTES:
            raise UserError(
                f"{where} is {len(key)} bytes long: an approval secret seals grants (HMAC-SHA256) "
                f"and must be at least {MIN_SECRET_BYTES} bytes, or anyone who guesses it can "
                f'forge an approval. Make one with: python -c "import secrets; '
                f'print(secrets.token_hex(32))"'
            )
        return cls(key)

    def for_run(self, thread: str, context: RunContext) -> RunGrants:
        """The grants of one run: bound to its thread (`""` without one) and its user."""
        return RunGrants(self, thread, context.key())

    def sign(self, key: str, approval: Mapping[str, Any], thread: str, user: str) -> str:
        """The seal of `approval` stored under `key`, given in `thread` to `user`."""
        where = "*" if approval.get("scope") == "user" else thread
        fields = (
            key,
            approval.get("digest"),
            approval.get("tool"),
            approval.get("tool_call_id"),
            approval.get("decision"),
            approval.get("expires_at"),
            approval.get("scope", "thread"),
            where,
            user,
        )
        return self._mac(fields)

    def sign_rejection(self, key: str, rejection: Mapping[str, Any]) -> str:
        """The seal of a `rejection` `PermissionMiddleware` keeps in an agent's state under `key`.

        Over the record and who rejected (`reviewer`): a client that may update the thread's
        state cannot write one (`keel.guards.middleware.RejectionsChannel` drops a record whose
        seal does not verify), nor change who a kept one names.
        """
        fields = ("keel-rejection", key, *(rejection.get(f) for f in _REJECTION_FIELDS))
        return self._mac(fields)

    def _mac(self, fields: Sequence[Any]) -> str:
        message = json.dumps(list(fields), separators=(",", ":")).encode()
        return hmac.new(self.secret, message, hashlib.sha256).hexdigest()


_REJECTION_FIELDS = ("digest", "tool", "tool_call_id", "decision", "reviewer")


@dataclass(frozen=True, slots=True)
class RunGrants:
    """`Grants` bound to one run's thread and user."""

    grants: Grants
    thread: str
    user: str

    def seal(self, key: str, approval: Approval) -> Approval:
        """`approval` with its seal."""
        unsealed = {k: v for k, v in approval.items() if k != "seal"}
        sealed: Approval = {**approval}
        sealed["seal"] = self.grants.sign(key, unsealed, self.thread, self.user)
        return sealed

    def trusted(self, approvals: Mapping[str, Approval] | None) -> dict[str, Approval]:
        """The rejections, and the approvals whose seal verifies for this thread and user."""
        out: dict[str, Approval] = {}
        for key, approval in (approvals or {}).items():
            if approval.get("decision") == "rejected" or self.verifies(key, approval):
                out[key] = approval
        return out

    def verifies(self, key: str, approval: Mapping[str, Any]) -> bool:
        """Whether `approval`'s seal is keel's, for this key, thread and user."""
        seal = approval.get("seal")
        if not isinstance(seal, str):
            return False
        unsealed = {k: v for k, v in approval.items() if k != "seal"}
        return hmac.compare_digest(seal, self.grants.sign(key, unsealed, self.thread, self.user))
