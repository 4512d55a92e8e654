"""Approval digests: a human's decision is bound to one exact call (tool + args + policy)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

__all__ = ["approval_digest", "approval_key", "canonical_args"]


def canonical_args(args: Mapping[str, Any]) -> str:
    """The arguments as canonical JSON: sorted keys, no spaces, so equal calls hash equally."""
    return json.dumps(args, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def approval_digest(tool: str, args: Mapping[str, Any], policy: str) -> str:
    """The digest an approval is stored under: sha256 of tool, canonical args and policy."""
    payload = _digest_bytes(f"{tool}\n{canonical_args(args)}\n{policy}")
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
