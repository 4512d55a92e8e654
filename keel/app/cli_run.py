"""`keel demo` and `keel run`: run an agent (keel's or the user's) on a thread, or resume one.

Loaded by `keel.app.cli` only when one of them runs: it brings LangGraph, LangChain, the
database drivers and the demo's memory (Chroma), which the rest of the `keel` command, and its
`--help`, do without.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TextIO, cast

from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.runnables import RunnableConfig
from langgraph.pregel import Pregel
from langgraph.types import Command

from keel.app.cli_agent import load_agent, thread_origin
from keel.app.cli_prices import price_table
from keel.app.demo import DEMO_TASK, SYSTEM_PROMPT, demo_memory, demo_policy, demo_tools
from keel.db.ledger import Ledger
from keel.db.persistence import Persistence
from keel.errors import KeelError
from keel.graphs.agent import Agent, build_agent
from keel.models import price_name_of, resolve_model
from keel.state import RunContext

if TYPE_CHECKING:  # chromadb loads only when the demo's memory opens
    from keel.memory.chroma import ChromaStore

__all__ = ["drive", "run"]


def run(args: argparse.Namespace) -> int:
    """Run `keel demo` or `keel run`; returns the exit code (130 on Ctrl-C, the thread named)."""
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:  # Ctrl-C: asyncio.run has cancelled the run and closed its loop
        if not getattr(args, "interrupt_said", False):
            print(f"\nkeel: {_interrupted(getattr(args, 'running_thread', None))}", file=sys.stderr)
        return 130


def _interrupted(thread: str | None) -> str:
    if thread is None:
        return "interrupted."
    return (
        f"interrupted; thread {thread} is saved up to its last step (`keel threads` lists it): "
        f"`keel run --thread {thread}` resumes it if it waits for an approval, `keel run "
        f'--thread {thread} "…"` gives it a new task.'
    )


async def _run(args: argparse.Namespace) -> int:
    task: str | None = DEMO_TASK if args.command == "demo" else args.task
    if task is not None and not task.strip():
        task = None  # blank is no task: it would run as one
    ref = getattr(args, "agent", None)
    if args.command == "run":
        if not task and not args.thread:
            raise KeelError('Give a task (keel run "…") or a thread to resume (--thread ID).')
        if ref is not None and not ref.strip():
            raise KeelError(
                "--agent is empty: name your graph as module:attribute (e.g. "
                "myapp.agent:graph), or drop --agent to run keel's own agent."
            )
        if ref:
            _no_model_options(args, "--agent names an agent of your own")
    for option in ("user", "tenant"):
        if not getattr(args, option).strip():  # RunContext's own message names no option
            raise KeelError(
                f"--{option} is empty: give the {option} id the run is for, or leave --{option} "
                "out for the default."
            )
    persistence = Persistence(args.db)
    thread = args.thread or f"{args.command}-{uuid.uuid4().hex[:8]}"
    args.running_thread = thread  # for the message on Ctrl-C
    context = RunContext(user_id=args.user, tenant_id=args.tenant)
    # the audit log and run records, for `keel audit` / `keel report` (not for :memory:)
    ledger = None if persistence.url.endswith(":memory:") else Ledger(persistence.url)
    store: ChromaStore | None = None  # the demo agent's memory, closed with the ledger
    try:
        async with persistence.acheckpointer() as saver:
            origin = {}
            if args.command == "run" and args.thread:  # rebuild what made the thread, for a
                origin = await thread_origin(saver, thread, must_exist=not task)  # new task too
            if not ref and origin.get("keel_agent"):
                ref = origin["keel_agent"]
                _no_model_options(args, f"thread {thread} runs the agent {ref}")
            if ref:
                agent: Any = load_agent(ref, saver)
                metadata = {"keel_agent": ref}
                print(f"keel: thread {thread} on {persistence.safe_url}; agent {ref}")
            else:
                agent, metadata, store = _keel_agent(args, origin, saver, ledger, persistence)
                print(f"keel: thread {thread} on {persistence.safe_url}")
            if task and args.thread and await _waiting(agent, thread):
                # a new task would pile onto the pending approval: answer it instead
                print(f"keel: thread {thread} waits for an approval; resuming it")
                task = None
            decide = _decider(args)
            result = await drive(agent, task, thread, context, decide, sys.stdout, metadata)
    except asyncio.CancelledError:  # Ctrl-C: said at once, though a step that blocks a thread
        print(f"\nkeel: {_interrupted(thread)}", file=sys.stderr, flush=True)  # is waited for
        args.interrupt_said = True
        raise
    finally:
        if store is not None:
            await store.aclose()
        if ledger is not None:
            await ledger.aclose()
    status = (result.get("outcome") or {}).get("status")
    return 0 if status in ("success", "interrupted") else 1


def _no_model_options(args: argparse.Namespace, why: str) -> None:
    """Refuse --model and --price off keel's own agent: they would be ignored there."""
    if args.model:
        raise KeelError(
            f"--model sets the model of keel's own agent, but {why}, which has its own: "
            "drop --model."
        )
    if args.price:
        raise KeelError(
            f"--price prices the model of keel's own agent, but {why}, which has its own price "
            "table: drop --price, and build that agent with build_agent(..., "
            "prices=PriceTable({...}))."
        )


async def _waiting(agent: Any, thread: str) -> bool:
    snapshot = await agent.aget_state({"configurable": {"thread_id": thread}})
    return bool(snapshot.interrupts)


def _keel_agent(
    args: argparse.Namespace,
    origin: dict[str, str],
    saver: Any,
    ledger: Ledger | None,
    persistence: Persistence,
) -> tuple[Agent, dict[str, str], ChromaStore]:
    """The support agent of `keel demo` (its tools, policy and memory) on the chosen model."""
    # a blank KEEL_MODEL (`KEEL_MODEL= keel demo`) is no model, as a blank --model is
    model_name = getattr(args, "model", None) or os.environ.get("KEEL_MODEL", "").strip()
    if args.command == "demo" and model_name:
        print(f"keel: demo on {model_name} (KEEL_MODEL)")
    elif args.command == "demo":
        print(
            "keel: no KEEL_MODEL set, so the demo plays a bundled scenario on keel's "
            "scripted model (offline, no API key)."
        )
        model_name = "keel:demo"
    elif not model_name and origin.get("keel_model"):
        model_name = origin["keel_model"]  # the thread's own, e.g. keel:demo for a demo thread
        print(f"keel: resuming on {model_name}, the model this thread was made with")
    elif not model_name:
        raise KeelError(
            "keel run needs a model: pass --model openai:gpt-4o-mini (or set KEEL_MODEL). "
            "To try keel offline, run `keel demo`."
        )
    model = resolve_model(model_name)
    policy, prices = demo_policy(), price_table(args.price)
    name = price_name_of(model)
    if policy.budget is not None and policy.budget.usd and prices.price_of(name) is None:
        raise KeelError(
            f"keel has no price for model {name!r}, and the demo's policy holds each run to "
            f"${policy.budget.usd:g}: its calls would count as $0. Price it: --price "
            f"{name}=INPUT,OUTPUT (USD per 1M tokens, e.g. --price {name}=1.25,10)."
        )
    store = demo_memory(persistence.sqlite_path)
    print(f"keel: memory in {store}")
    agent = build_agent(
        model,
        demo_tools(),
        system_prompt=SYSTEM_PROMPT,
        plan=True,
        judge=model,  # the answer is judged (by the same model) before it is final
        policy=policy,
        prices=prices,
        checkpointer=saver,
        ledger=ledger,
        store=store,
        memory=True,
    )
    return agent, {"keel_model": model_name}, store


async def drive(
    agent: Pregel[Any, Any, Any, Any],
    task: str | None,
    thread: str,
    context: RunContext,
    decide: Any,
    out: TextIO,
    metadata: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Run (or resume) a thread to its end, printing each step and asking `decide` on approvals.

    `decide(requests)` returns the resume value, or None to leave the thread waiting.
    `metadata` is recorded on the thread's checkpoints (what made it, for a later resume).
    An error the graph raises ends the run as `error`, printed; the thread stays resumable.
    """
    config: RunnableConfig = {"configurable": {"thread_id": thread}}
    if metadata:
        config["metadata"] = dict(metadata)
    payload: Any = {"messages": [("user", task)]} if task else None
    go = task is not None
    if task is None:
        snapshot = await agent.aget_state(config)
        if not snapshot.interrupts and not snapshot.next:
            raise KeelError(
                f"Thread {thread} is not waiting for anything; give a task to continue it."
            )
        go = not snapshot.interrupts  # a step that raised (or was cut short) runs again
        if go:
            print(f"keel: thread {thread} stopped before its end; running on from there", file=out)
    while True:
        if go:
            try:
                async for update in agent.astream(
                    payload, config, context=context, stream_mode="updates"
                ):
                    _print_update(cast(dict[str, Any], update), out)
            except Exception as exc:  # the user's graph raised: an outcome, not a traceback
                return _failed(exc, thread, out)
        snapshot = await agent.aget_state(config)
        if not snapshot.interrupts:
            break
        requests = snapshot.interrupts[0].value
        if not _is_approval_request(requests):
            print(f"[interrupt] {json.dumps(requests, default=str)}", file=out)
            print(f"keel: left waiting; resume it from your own code (thread {thread})", file=out)
            break
        _print_requests(requests, out)
        answer = await decide(requests)
        if answer is None:
            print(f"keel: left waiting; resume with `keel run --thread {thread}`", file=out)
            break
        payload, go = Command(resume=answer), True
    values = _with_outcome(dict(snapshot.values), bool(snapshot.interrupts))
    _print_outcome(values, out)
    return values


def _is_approval_request(value: object) -> bool:
    """Whether an interrupt's value is keel's approval request list (human_review)."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(r, dict) and "action_request" in r for r in value)
    )


def _failed(exc: Exception, thread: str, out: TextIO) -> dict[str, Any]:
    detail = f"{type(exc).__name__}: {exc}"
    values = {"outcome": {"status": "error", "terminated_reason": "error", "detail": detail}}
    _print_outcome(values, out)
    print(f"keel: the thread is saved; resume with `keel run --thread {thread}`", file=out)
    return values


def _print_update(update: dict[str, Any], out: TextIO) -> None:
    for node, delta in update.items():
        if node == "reflect":
            print("[reflect] stored a lesson of this run in long-term memory", file=out)
        if node == "__interrupt__" or not isinstance(delta, dict):
            continue
        if node == "recall":
            found = [m for m in delta.get("messages") or [] if m.type == "system"]
            lines = found[0].text.count("\n- [") if found else 0
            what = "memory" if lines == 1 else "memories"
            print(f"[recall] {lines} {what} of this user put into the context", file=out)
        if delta.get("plan") and node == "plan":
            print("[plan]", file=out)
            for step in delta["plan"]:
                print(f"   {step['id']}. {step['description']}", file=out)
        for message in delta.get("messages") or []:
            if isinstance(message, AIMessage):
                for tc in message.tool_calls:
                    print(f"[{node}] → {tc['name']}({json.dumps(tc['args'])})", file=out)
                if message.text:
                    print(f"[{node}] {message.text}", file=out)
            elif isinstance(message, ToolMessage):
                status = message.response_metadata.get("keel_status", message.status)
                print(f"[{node}] ← {message.name} [{status}]: {message.text}", file=out)


def _print_requests(requests: list[dict[str, Any]], out: TextIO) -> None:
    for r in requests:
        action = r["action_request"]
        print(f"[approval needed] {action['action']}({json.dumps(action['args'])})", file=out)
        print(f"   why: {r['description']}", file=out)


def _print_outcome(values: dict[str, Any], out: TextIO) -> None:
    result = values["outcome"]
    print(
        f"[outcome] {result.get('status')} / {result.get('terminated_reason')}: "
        f"{result.get('detail')}",
        file=out,
    )
    usage = values.get("usage")
    if usage is None:  # a graph of the user's: keel counted nothing
        return
    print(
        f"[usage] model calls {usage.get('model_calls', 0)}, tool calls "
        f"{usage.get('tool_calls', 0)}, tokens {usage.get('input_tokens', 0)} in / "
        f"{usage.get('output_tokens', 0)} out, ${usage.get('usd', 0.0):.6f}",
        file=out,
    )


def _with_outcome(values: dict[str, Any], waiting: bool) -> dict[str, Any]:
    """`values` with keel's outcome; a graph of the user's keeps none, so it is derived."""
    if values.get("outcome"):
        return values
    if waiting:
        derived = {"status": "interrupted", "terminated_reason": "awaiting_input"}
        derived["detail"] = "the graph waits (interrupt)"
    else:
        derived = {"status": "success", "terminated_reason": "completed"}
        derived["detail"] = "the graph ended (its state has no keel outcome)"
    return {**values, "outcome": derived}


def _decider(args: argparse.Namespace) -> Any:
    async def decide(requests: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
        if args.approve:
            print("keel: approved (--approve)")
            return [{"type": "approve", "reviewer": "cli"} for _ in requests]
        if args.reject:
            print("keel: rejected (--reject)")
            return [{"type": "reject", "reviewer": "cli"} for _ in requests]
        if args.wait:
            return None
        if sys.stdin.isatty():
            return [await _ask(r) for r in requests]
        if args.command == "demo":
            print(
                "keel: no terminal, so the scenario's answer is used: approve "
                "(pass --reject to see a rejection)"
            )
            return [{"type": "approve", "reviewer": "demo-scenario"} for _ in requests]
        return None

    return decide


async def _ask(request: dict[str, Any]) -> dict[str, Any]:
    prompt = f"{request['action_request']['action']}: [a]pprove / [e]dit / [r]eject / re[s]pond? "
    while True:
        choice = (await asyncio.to_thread(input, prompt)).strip().lower()[:1]
        if choice == "a":
            return {"type": "approve", "reviewer": "cli"}
        if choice == "r":
            reason = await asyncio.to_thread(input, "reason (optional): ")
            return {"type": "reject", "message": reason, "reviewer": "cli"}
        if choice == "s":
            text = await asyncio.to_thread(input, "your answer to the agent: ")
            return {"type": "respond", "message": text, "reviewer": "cli"}
        if choice == "e":
            raw = await asyncio.to_thread(input, "new arguments as JSON: ")
            try:
                return {"type": "edit", "args": json.loads(raw), "reviewer": "cli"}
            except json.JSONDecodeError as exc:
                print(f"not JSON ({exc}); try again")
