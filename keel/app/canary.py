"""The canary router: a stable share of users goes to a candidate version of an agent.

A server config names a candidate for an agent (another graph, prompt, model or policy) and a
share (see `keel.app.server_config`, `canary = {...}`). `bucket(user, salt)` maps a user to a
number in [0, 1) from a SHA-256 of the salt (the tenant and agent) and the user id: the same
user always lands in the same place, so a user never flips between versions from one request
to the next, and raising the share only moves users from stable to candidate. Users whose
bucket is below the share are served the candidate. The version that served a run is in its run
record, audit records and trace (`keel.versions`, `keel report --by version`).
"""

from __future__ import annotations

import hashlib

__all__ = ["bucket", "serves_candidate"]


def bucket(user_id: str, salt: str) -> float:
    """Where `user_id` falls in [0, 1) for the canary named by `salt` (stable, uniform)."""
    # surrogatepass: a lone surrogate in an id hashes instead of raising (other text: UTF-8)
    digest = hashlib.sha256(f"{salt}\x00{user_id}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def serves_candidate(user_id: str, share: float, salt: str) -> bool:
    """Whether the candidate serves `user_id`: its bucket is below `share` (0 to 1)."""
    return bucket(user_id, salt) < share
