"""Capture: turn a stored (failed) thread into a regression case appended to a suite file.

`acapture(thread_id, "suite.yaml", db=URL)` writes a case of one run of the thread (its last by
default, the one that just failed; `run=` picks another): the conversation before it as text
and the run's own user message(s), its user and tenant (roles as given), how its approvals were
answered, the run's recorded model answers as an inline script (so the case runs offline, on any
graph factory) and its observed tool trajectory. The expected outcome is what SHOULD have
happened: pass `expect="success/completed"`, or edit the case where its `TODO` comment says.
The file is created if missing; an existing suite is checked before and after the case is
appended, and left as it was when the result would not load.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage

from keel.errors import UserError
from keel.evals._sync import sync
from keel.evals.cassette import Cassette
from keel.evals.runner import trajectory_of
from keel.evals.stored import StoredThread, aload_thread
from keel.evals.suite import load_suite, outcome_part
from keel.state import starts_task

__all__ = ["acapture", "capture", "case_of"]


def case_of(
    thread: StoredThread,
    *,
    case_id: str | None = None,
    expect: str | None = None,
    roles: tuple[str, ...] | None = None,
    run: int | None = None,
) -> dict[str, Any]:
    """The suite case (its YAML shape) for one run of a stored thread.

    Args:
        thread: The stored thread.
        case_id: The case's id (default `thread-<id>`, `thread-<id>-run-<n>` with `run`).
        expect: The outcome the run should have had, `status/terminated_reason` (either part
            may be empty: `success/`, `/completed`); default: none, to be filled in.
        roles: The user's roles (the ledger does not record them; default `[user]`).
        run: Which run (a task started by a user's message): 1 for the first, -1 (the
            default) for the last. The runs before it enter the case's messages as their
            text (user and assistant messages; their tool calls and results are left out),
            then the run's own input.

    Raises:
        UserError: the thread has no such run.
    """
    messages = thread.messages
    runs = runs_of(messages)
    start, first_ai, end = runs[_run_index(thread.thread_id, run, len(runs))]
    turns = messages[first_ai:end]  # up to the next user message: not verify's feedback
    history = _history(messages[:start])
    spoken = [m["content"] for m in history if m["role"] == "assistant"]
    cassette = Cassette.from_messages(turns, thread.calls)
    observed = trajectory_of(turns)
    rejected = any(c.status == "rejected" for c in cassette.calls)
    case: dict[str, Any] = {
        "id": case_id or _default_id(thread.thread_id, run, len(runs)),
        "messages": [*history, *map(_message, messages[start:first_ai])],
        "identity": {
            "user": thread.identity.user_id,
            "tenant": thread.identity.tenant_id,
            "roles": list(roles or thread.identity.roles),
        },
        "approvals": "reject" if rejected else "approve",
        # a scripted model plays the turn its conversation's AI messages count to: the
        # history's answers come first, and are never played again
        "model": {"script": [*spoken, *(_turn(a) for a in cassette.answers)]},
        "expect": {
            **_expected(expect),
            "trajectory": {
                "mode": "strict",
                "args": "exact",
                "calls": [{"name": t.name, "args": dict(t.args)} for t in observed],
            },
        },
        "tags": ["captured"],
    }
    return case


def runs_of(messages: Sequence[BaseMessage]) -> list[tuple[int, int, int]]:
    """Each run of a thread's `messages`: `(start, first answer, end)` indices, in order.

    A run starts with a user's message (`keel.state.starts_task`, not keel's own user-role
    messages such as `verify`'s feedback) and ends where the next one starts; its input is
    what comes before its first AI message. A thread always has one run, if an empty one.
    """
    out: list[tuple[int, int, int]] = []
    start, n = 0, len(messages)
    while True:
        first_ai = next((i for i in range(start, n) if isinstance(messages[i], AIMessage)), n)
        end = next((i for i in range(first_ai, n) if starts_task(messages[i])), n)
        out.append((start, first_ai, end))
        if end >= n:
            return out
        start = end


def _run_index(thread: str, run: int | None, count: int) -> int:
    """`run` (1-based, or negative from the end; `None`: the last) as an index into the runs."""
    if run is None:
        return count - 1
    if isinstance(run, bool) or not isinstance(run, int) or not (1 <= abs(run) <= count):
        said = (
            "it has 1 run: give 1 or -1"
            if count == 1
            else (f"it has {count} runs: give 1 to {count}, or -1 for the last")
        )
        raise UserError(f"Thread {thread!r} has no run {run!r}; {said}.")
    return run - 1 if run > 0 else count + run


def _default_id(thread: str, run: int | None, count: int) -> str:
    if run is None:
        return f"thread-{thread}"
    return f"thread-{thread}-run-{_run_index(thread, run, count) + 1}"


def _history(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    """Earlier runs as text: user, system and assistant messages that have any."""
    kept = (m for m in messages if isinstance(m, HumanMessage | SystemMessage | AIMessage))
    return [_message(m) for m in kept if str(m.text).strip()]


def _message(m: BaseMessage) -> dict[str, str]:
    role = (
        "user"
        if isinstance(m, HumanMessage)
        else "system"
        if isinstance(m, SystemMessage)
        else "assistant"
    )
    return {"role": role, "content": str(m.text)}


def _turn(answer: AIMessage) -> Any:
    if not answer.tool_calls:
        return str(answer.text)
    turn: dict[str, Any] = {
        "calls": [{"name": c["name"], "args": dict(c["args"])} for c in answer.tool_calls]
    }
    if answer.text:
        turn["text"] = str(answer.text)
    return turn


def _expected(expect: str | None) -> dict[str, str]:
    if expect is None:
        return {}
    status, sep, reason = expect.partition("/")
    if not sep or not (status or reason):
        raise UserError(
            f"--expect must be 'status/terminated_reason' (e.g. success/completed), got {expect!r}."
        )
    out = {"status": status} if outcome_part(status or None, "status", "--expect") else {}
    if outcome_part(reason or None, "terminated_reason", "--expect"):
        out["terminated_reason"] = reason
    return out


def render_case(
    case: dict[str, Any],
    thread: StoredThread,
    *,
    todo: bool,
    indent: str = "  ",
    run: int | None = None,
) -> str:
    """The case of `run` as a YAML list item (indented under `cases:`), with its provenance."""
    count = len(runs_of(thread.messages))
    index = _run_index(thread.thread_id, run, count)
    where = f"thread {thread.thread_id}" + (f", run {index + 1} of {count}" if count > 1 else "")
    if index == count - 1:  # the thread's outcome is its last run's
        seen = thread.outcome
        status, reason = seen.get("status", "-"), seen.get("terminated_reason", "-")
        observed = f"observed outcome: {status}/{reason}"
    else:
        observed = "its outcome is not kept: a later run followed"
    lines = [f"{indent}# captured from {where} ({observed})"]
    if todo:
        lines.append(
            f"{indent}# TODO: set the outcome this run SHOULD have had under `expect` (status, "
            "terminated_reason) and fix the trajectory if it was wrong; it is the observed one."
        )
    body = yaml.safe_dump([case], sort_keys=False, allow_unicode=True, width=100)
    lines += [indent + line if line else line for line in body.splitlines()]
    return "\n".join(lines) + "\n"


async def acapture(
    thread: str | StoredThread,
    suite: str | Path,
    *,
    db: str | None = None,
    case_id: str | None = None,
    expect: str | None = None,
    roles: tuple[str, ...] | None = None,
    graph: str | None = None,
    run: int | None = None,
) -> dict[str, Any]:
    """Append the case of a stored thread to the suite file `suite`; return the case.

    `graph` names the suite's graph factory when the file is created. See `case_of` for the
    other arguments.

    Raises:
        UserError: no such thread, an unreadable or `.json` suite, or a case id the suite
            already has.
    """
    if Path(suite).suffix.lower() == ".json":
        raise UserError(f"capture writes YAML; give a .yaml suite file, not {suite}.")
    if case_id is not None and not case_id.strip():
        raise UserError(
            "The case id is empty: give one (--id NAME), or leave it out for thread-<THREAD>."
        )
    stored = thread if isinstance(thread, StoredThread) else await aload_thread(thread, db=db)
    case = case_of(stored, case_id=case_id, expect=expect, roles=roles, run=run)
    _append(Path(suite), case, stored, todo=expect is None, graph=graph, run=run)
    return case


def _append(
    path: Path,
    case: dict[str, Any],
    stored: StoredThread,
    *,
    todo: bool,
    graph: str | None,
    run: int | None,
) -> None:
    path = path.expanduser()  # as load_suite reads it: `--suite=~/x.yaml` made a folder `~`
    if path.exists():
        existing = load_suite(path)
        found = re.search(
            r"^cases:[ \t]*\n(?:[ \t]*(?:#.*)?\n)*([ \t]*)- ",
            path.read_text(encoding="utf-8"),
            re.M,
        )
        indent = found.group(1) if found else "  "
        text = render_case(case, stored, todo=todo, indent=indent, run=run)
        if any(c.id == case["id"] for c in existing.cases):
            raise UserError(
                f"{path} already has a case {case['id']!r}; pass another id (--id NAME)."
            )
        before = path.read_text(encoding="utf-8")
        path.write_text(before.rstrip("\n") + "\n" + text, encoding="utf-8")
        try:
            after = load_suite(path)
        except UserError:
            path.write_text(before, encoding="utf-8")
            raise
        if len(after.cases) != len(existing.cases) + 1:
            path.write_text(before, encoding="utf-8")
            raise UserError(
                f"Could not append to {path}: its `cases:` list is not the last thing in the "
                "file. Move `cases:` to the end, or capture into a new suite file."
            )
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = render_case(case, stored, todo=todo, run=run)
        # as YAML scalars: a file named `*x.yaml` or `a: b.yaml` made `name: *x`, not YAML
        top = {"name": path.stem} | ({"graph": graph} if graph else {})
        head = yaml.safe_dump(top, sort_keys=False, allow_unicode=True, width=10_000)
        path.write_text(head + "cases:\n" + text, encoding="utf-8")
        try:
            load_suite(path)
        except UserError:
            path.unlink()  # a file made here that does not load is not left behind
            raise


def capture(thread: str | StoredThread, suite: str | Path, **options: Any) -> dict[str, Any]:
    """Sync entry point of `acapture` (not from a running event loop: await `acapture`)."""
    return sync("capture", lambda: acapture(thread, suite, **options))
