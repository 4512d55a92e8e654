"""Attacks on "Durable side effects" and approvals with a tool that takes a set.

keel reads a call's arguments as the tool does (`keel.tools._args.as_called`: pydantic's
validation, dumped as JSON) and hashes them: the ledger's claim, the orphan a crashed call left,
a reviewer's decision and the loop guard all go by that digest. pydantic writes a `set[str]`
as a list in the set's own order, and a set of strings is ordered by their hashes, which
change with each process's hash seed (`PYTHONHASHSEED`, random by default). So the same call
had another digest in the next process: after a crash, the refund the model asked for again
(under a fresh id, the request lost with the process) was not found to be the lost one and ran
a second time; a decision stored by one worker did not answer the call in another. The digest
is now the same in every process (a set's items in canonical order).

Real parts: SQLite files and a PostgreSQL database, real processes started with chosen hash
seeds (a fork would keep its parent's seed), one killed by SIGKILL right after the effect; the
model is keel's `ScriptedChatModel` with fresh tool-call ids.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

SEEDS = ("1", "2", "3")
"""Hash seeds under which the five tags below come out of a set in three different orders."""
TAGS = ["vip", "refund", "late", "x", "y"]

DIGESTS = textwrap.dedent(
    """
    import json, sys

    from keel import tool
    from keel.approvals import call_digest, canonical_args
    from keel.tools._args import approval_digests, as_called, read_call
    from keel.tools.registry import registered


    @tool(risk="write")
    def tag_order(
        order_id: str,
        tags: set[str],
        groups: list[frozenset[str]] = [],
        labels: dict[str, set[str]] = {},
    ) -> str:
        "Tag an order."
        return "tagged"


    entry = registered(tag_order)
    seen = []
    for args in json.loads(sys.argv[1]):
        read = as_called(entry, args)
        seen.append({
            "read": canonical_args(read),
            "ledger": call_digest("tag_order", read, entry.spec.version),
            "approvals": approval_digests(entry, args, "p"),
            "loop": read_call("tag_order", args, lambda name: entry),
            "python set": canonical_args({"tags": set(args["tags"])}),
        })
    print(json.dumps(seen))
    """
)


def _in_process_with_seed(script: Path, seed: str, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONHASHSEED": seed, "LANGSMITH_TRACING": "false"}
    return subprocess.run(  # cwd: the repository's `keel/` folder would shadow the package
        [sys.executable, script.name, *argv],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=script.parent,
        env=env,
    )


def test_a_calls_digests_are_the_same_in_every_process(tmp_path: Path) -> None:
    """The ledger's digest, a decision's digests and the loop guard's key of one call, computed
    under three hash seeds: one value each (they were three, one per seed)."""
    script = tmp_path / "digests.py"
    script.write_text(DIGESTS)
    args = {
        "order_id": "A1",
        "tags": TAGS,
        "groups": [TAGS, ["a", "b", "c", "d"]],
        "labels": {"k": TAGS},
    }
    reordered = {**args, "tags": TAGS[::-1]}  # the model's order is no part of a set
    seen = []
    for seed in SEEDS:
        proc = _in_process_with_seed(script, seed, json.dumps([args, reordered]))
        assert proc.returncode == 0, proc.stderr
        seen.append(json.loads(proc.stdout))
    assert seen[0] == seen[1] == seen[2], seen
    (call, again) = seen[0]
    read = json.loads(call["read"])
    assert read["tags"] == sorted(TAGS) and read["labels"] == {"k": sorted(TAGS)}
    assert read["groups"] == [sorted(TAGS), ["a", "b", "c", "d"]]
    assert json.loads(call["python set"]) == {"tags": sorted(TAGS)}
    assert again["ledger"] == call["ledger"] and again["loop"] == call["loop"]
    assert again["approvals"][0] == call["approvals"][0]  # as read; as spelled they differ


CHILD = textwrap.dedent(
    """
    import json, os, signal, sys

    from langchain_core.messages import AIMessage, ToolCall

    from keel import Ledger, Persistence, RunContext, build_agent, tool
    from keel.evals import ScriptedChatModel

    url, effects, kill, tags = sys.argv[1:]
    call = ToolCall(name="tag_refund", args={"order_id": "A1", "tags": json.loads(tags)}, id=None)
    model = ScriptedChatModel(script=[AIMessage("", tool_calls=[call]), "Done."], fresh_ids=True)


    @tool(risk="write")
    def tag_refund(order_id: str, tags: set[str]) -> str:
        "Refund an order, tagged."
        with open(effects, "a") as f:
            print("refund", order_id, file=f, flush=True)
            os.fsync(f.fileno())
        if kill == "kill":
            os.kill(os.getpid(), signal.SIGKILL)  # after the effect, before its record
        return "refunded"


    ledger = Ledger(url)
    with Persistence(url).checkpointer() as saver:
        agent = build_agent(model, [tag_refund], checkpointer=saver, ledger=ledger)
        result = agent.invoke(
            {"messages": [("user", "refund A1")]},
            {"configurable": {"thread_id": "t1"}},
            context=RunContext(user_id="u1"),
            durability="exit",
        )
    ledger.close()
    asked = [r.get("kind") for i in result.get("__interrupt__") or [] for r in i.value]
    print(json.dumps({"asked": asked, "outcome": result.get("outcome")}, default=str))
    """
)


def test_the_lost_refund_asked_again_in_a_process_of_another_hash_seed_is_not_run_twice(
    db_url: str, tmp_path: Path
) -> None:
    """A process (hash seed 1) is killed right after a refund tagged with a set; nothing of
    the run was saved (`durability="exit"`): the ledger's `started` row is all that is left.
    The next process (hash seed 2) is sent the task again and the model asks for the same
    refund under a fresh id, its tags in another order. It is the lost call: asked about
    ("did this happen?"), not run (it ran a second time: the two processes' digests differed)."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    effects = tmp_path / "effects.txt"
    first = _in_process_with_seed(script, "1", db_url, str(effects), "kill", json.dumps(TAGS))
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert effects.read_text().splitlines() == ["refund A1"]

    again = json.dumps(TAGS[::-1])
    second = _in_process_with_seed(script, "2", db_url, str(effects), "live", again)
    assert second.returncode == 0, second.stderr
    assert effects.read_text().splitlines() == ["refund A1"]  # once
    assert json.loads(second.stdout.splitlines()[-1])["asked"] == ["outcome_unknown"]


def test_the_seeds_really_order_the_tags_differently(tmp_path: Path) -> None:
    """What the tests above rely on: under these seeds a set of the tags iterates in other
    orders (else they would pass without the fix)."""
    script = tmp_path / "order.py"
    script.write_text(f"print(list(set({TAGS!r})))\n")
    orders: list[Any] = []
    for seed in SEEDS:
        proc = _in_process_with_seed(script, seed)
        orders.append(proc.stdout.strip())
    assert len(set(orders)) == len(SEEDS), orders
