"""Standing approvals: "always allow this tool (optionally with these arguments) here", expiring.

A reviewer answers an `ask` with `{"type": "approve", "always": {"ttl_seconds": 3600}}` (add
`"same_args": True` to cover only these exact arguments). The decision is stored in the
thread's `approvals` under `always/<digest>` (of the arguments as the tool reads them, so
`10` and `10.0` for an `int` are the same arguments) with an expiry; until then, calls it covers are
allowed without asking. With `"scope": "user"` it is also kept in the ledger
(`StandingStore`), and `call_model` loads the user's standing approvals into the thread at the
start of each task (each new user message), so it holds in the user's other threads too.
It is bound to the policy (`name@version`) and the tool's version like every approval, so a
new policy or tool version asks again. The record names who gave it (`reviewer`); a served
reviewer answering another user's thread may give one for that thread only (`human_review`
refuses their `"scope": "user"`). keel seals it (`keel.approvals.Grants`): a record the
client wrote, or copied from another thread or user, is not trusted. It never overrides a
`deny` rule, and a call a human rejected can still never run: the rejection of its exact
arguments wins.

The pieces: `Always` (the parsed `always` field), `standing_approval` (the record and its key),
`covering` (the pure check) and `allowing(gate, approvals, policy)`, the `Gate` every node uses.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from keel.approvals import Grants, approval_digest
from keel.db.ledger import Flow, Ledger
from keel.errors import UserError, _one_line
from keel.guards.gate import Gate, GateDecision
from keel.redact import sanitized_logger
from keel.state import Approval, RunContext
from keel.tools._args import as_called
from keel.tools.registry import RegisteredTool

log = sanitized_logger("keel.guards")

__all__ = ["Always", "StandingStore", "allowing", "covering", "standing_approval"]

PREFIX = "always/"
"""Where standing approvals live among a thread's `approvals`."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Always:
    """The `always` part of an approval: how far and how long it stands."""

    scope: Literal["thread", "user"] = "thread"
    """Where it stands: the thread it was given in, or all the user's threads (the ledger)."""
    ttl_seconds: float = 3600.0
    """Seconds it stands for."""
    same_args: bool = False
    """Cover only calls with the approved call's exact arguments (else: any arguments)."""

    @classmethod
    def parse(cls, raw: Any) -> Always:
        """Read an approval's `always` field (`True`, or a mapping of these fields)."""
        if raw is True:
            return cls()
        if not isinstance(raw, Mapping) or set(raw) - {"scope", "ttl_seconds", "same_args"}:
            raise UserError(
                f"'always' must be true or {{'scope': 'thread', 'ttl_seconds': 3600, "
                f"'same_args': False}}, got {raw!r}."
            )
        scope, ttl = raw.get("scope", "thread"), raw.get("ttl_seconds", 3600.0)
        if scope not in ("thread", "user"):
            raise UserError(f"'always.scope' must be 'thread' or 'user', got {scope!r}.")
        if (
            isinstance(ttl, bool)
            or not isinstance(ttl, int | float)
            or not math.isfinite(ttl)
            or ttl <= 0
        ):  # NaN passed `ttl <= 0`, and no database keeps its expiry as it keeps a number
            raise UserError(f"'always.ttl_seconds' must be a finite number > 0, got {ttl!r}.")
        same = raw.get("same_args", False)
        if not isinstance(same, bool):
            raise UserError(f"'always.same_args' must be true or false, got {same!r}.")
        return cls(scope=scope, ttl_seconds=float(ttl), same_args=same)


def _key(
    tool: str, args: Mapping[str, Any] | None, policy: str, version: str, *, read: bool = True
) -> str:
    if args is not None:
        return PREFIX + approval_digest(tool, args, policy, version=version, read=read)
    return PREFIX + hashlib.sha256(f"{tool}\n{version}\n*\n{policy}".encode()).hexdigest()


def standing_approval(
    always: Always,
    tool: str,
    args: Mapping[str, Any],
    policy: str,
    tool_call_id: str,
    *,
    version: str,
    now: float | None = None,
) -> tuple[str, Approval]:
    """The key and record (unsealed) of a standing approval given on the call `tool_call_id`.

    `args` are the call's arguments as the tool reads them (`keel.tools._args.as_called`).
    """
    key = _key(tool, args if always.same_args else None, policy, version)
    expires = (time.time() if now is None else now) + always.ttl_seconds
    record: Approval = {
        "digest": key.removeprefix(PREFIX),
        "tool": tool,
        "tool_call_id": tool_call_id,
        "decision": "approved",
        "expires_at": expires,
        "scope": always.scope,
    }
    return key, record


def covering(
    approvals: Mapping[str, Approval],
    tool: str,
    args: Mapping[str, Any],
    policy: str,
    now: float,
    *,
    version: str,
    spelled: Mapping[str, Any] | None = None,
) -> Approval | None:
    """The unexpired standing approval among `approvals` covering this call, or `None`.

    `args` are the call's arguments as the tool reads them (`keel.tools._args.as_called`),
    `spelled` as the model spelled them (default: `args`): keel stored decisions under those
    before, and a rejection or a `same_args` approval stored so still counts for the very
    same spelling. Pass only trusted approvals (`keel.approvals.RunGrants.trusted`). A call
    whose exact arguments a human rejected is never covered.
    """
    spelled = args if spelled is None else spelled
    for digest in (
        approval_digest(tool, args, policy, version=version, read=True),
        approval_digest(tool, spelled, policy, version=version),
    ):
        rejected = approvals.get(digest)
        if rejected is not None and rejected["decision"] == "rejected":
            return None
    keys = (
        _key(tool, args, policy, version),
        _key(tool, spelled, policy, version, read=False),
        _key(tool, None, policy, version),
    )
    for key in keys:
        found = approvals.get(key)
        if found is not None and found.get("expires_at", 0.0) > now:
            return found
    return None


def allowing(
    gate: Gate, approvals: Mapping[str, Approval], policy: str, now: float | None = None
) -> Gate:
    """`gate`, except that an `ask` a standing approval covers becomes `allow`.

    Pass only trusted approvals (`keel.approvals.RunGrants.trusted`).
    """
    if not any(key.startswith(PREFIX) for key in approvals):
        return gate
    at = time.time() if now is None else now

    def decide(tool: RegisteredTool, args: Mapping[str, Any], context: RunContext) -> GateDecision:
        decision = gate(tool, args, context)
        if decision.action != "ask":
            return decision
        read = as_called(tool, dict(args))
        found = covering(
            approvals, tool.name, read, policy, at, version=tool.spec.version, spelled=args
        )
        if found is None:
            return decision
        return GateDecision.allow(
            f"standing approval from call {found['tool_call_id']} (until {found['expires_at']:.0f})"
        )

    return decide


# -- user scope: the ledger -------------------------------------------------------------------


class StandingStore:
    """A user's standing approvals (`"scope": "user"`), kept in the ledger.

    `human_review` saves them; `call_model` loads the unexpired ones at the start of each task,
    sealed with `grants` (the ledger is keel's own: what it holds is trusted).
    """

    def __init__(self, ledger: Ledger, grants: Grants | None = None) -> None:
        if not isinstance(ledger, Ledger):
            raise UserError(f"StandingStore needs a keel.Ledger, got {type(ledger).__name__}.")
        self.ledger = ledger
        self.grants = grants if grants is not None else Grants.from_secret()

    def load(self, context: RunContext) -> dict[str, Approval]:
        """The user's unexpired standing approvals, by key.

        One plain `SELECT` (`Ledger.read`): no transaction, so it never waits for a writer.

        Raises:
            StorageError: The ledger could not be read (see `for_task`, which fails closed).
        """
        return self._sealed(context, self.ledger.read(_load_flow(_who(context), time.time())))

    async def aload(self, context: RunContext) -> dict[str, Approval]:
        """The user's unexpired standing approvals, by key (async; see `load`)."""
        found = await self.ledger.aread(_load_flow(_who(context), time.time()))
        return self._sealed(context, found)

    def for_task(self, context: RunContext, state: Mapping[str, Any]) -> dict[str, Any]:
        """The state update that starts a task: the user's standing approvals.

        A ledger that cannot be read fails closed and visibly: no standing approval applies (the
        calls they would have allowed ask a human again; none is allowed without one), keel
        logs an error, and `state["warnings"]` says so, which the run record's detail shows.
        """
        try:
            return _loaded(self.load(context), state)
        except Exception as exc:  # any failure: none apply, and say so
            return _unreadable(exc, state)

    async def afor_task(self, context: RunContext, state: Mapping[str, Any]) -> dict[str, Any]:
        """`for_task`, async."""
        try:
            return _loaded(await self.aload(context), state)
        except Exception as exc:
            return _unreadable(exc, state)

    def _sealed(self, context: RunContext, found: Mapping[str, Approval]) -> dict[str, Approval]:
        grants = self.grants.for_run("", context)
        return {key: grants.seal(key, {**record, "scope": "user"}) for key, record in found.items()}

    def save(self, context: RunContext, approvals: Mapping[str, Approval]) -> None:
        """Keep `approvals` for the user (replacing any under the same keys)."""
        self.ledger.run(_save_flow(_who(context), approvals))

    async def asave(self, context: RunContext, approvals: Mapping[str, Approval]) -> None:
        """Keep `approvals` for the user (async)."""
        await self.ledger.arun(_save_flow(_who(context), approvals))


WARNING = "standing approvals: "
"""How `state["warnings"]` entries about the user's standing approvals begin."""


def _loaded(approvals: dict[str, Approval], state: Mapping[str, Any]) -> dict[str, Any]:
    warnings = list(state.get("warnings") or [])
    kept = [w for w in warnings if not str(w).startswith(WARNING)]
    return {"approvals": approvals, **({"warnings": kept} if kept != warnings else {})}


def _unreadable(exc: Exception, state: Mapping[str, Any]) -> dict[str, Any]:
    log.error("keel could not read standing approvals, so none apply (calls ask): %r", exc)
    kept = [w for w in state.get("warnings") or [] if not str(w).startswith(WARNING)]
    problem = _one_line(exc)[:200]
    note = f"{WARNING}could not be read ({type(exc).__name__}: {problem}); none applied"
    return {"approvals": {}, "warnings": [*kept, note]}


def _who(context: RunContext) -> str:
    return f"user:{context.key()}"


def _load_flow(who: str, now: float) -> Flow[dict[str, Approval]]:
    rows = yield (
        "SELECT key, record FROM keel_standing_approvals WHERE scope_key = ? AND expires_at > ?",
        (who, now),
    )
    return {str(key): json.loads(record) for key, record in rows}


def _save_flow(who: str, approvals: Mapping[str, Approval]) -> Flow[None]:
    for key, record in sorted(approvals.items()):
        yield (
            "INSERT INTO keel_standing_approvals (scope_key, key, record, expires_at) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (scope_key, key) DO UPDATE SET "
            "record = excluded.record, expires_at = excluded.expires_at",
            (who, key, json.dumps(record, sort_keys=True), record.get("expires_at", 0.0)),
        )
