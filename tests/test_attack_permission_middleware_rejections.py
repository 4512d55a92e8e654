"""A hostile model asks `PermissionMiddleware` again for a call a human rejected.

`create_agent` guarded by keel's `PermissionMiddleware`; keel's scripted model mints fresh
tool-call ids every turn (as an injected model would: a new id, the same call). A reviewer's
rejection is kept in the thread's state (`keel_rejections`) under the digest of the call as
the tool reads it (`keel.tools._args.approval_digests`, as `build_agent` stores decisions): the
call asked again (`10`, `10.0`, `"10"`, a default spelled out, beside another call) is answered
rejected, as `build_agent`'s `execute_tools` answers it, and the reviewer is not asked again;
other arguments are asked. A client cannot write an approval into that state, and a plain
resume sent after a forged rejection approves nothing. `build_agent` answers the same repeat
the same way (one rule). Real SQLite and PostgreSQL checkpointers, sync and async; the tool
records what really ran.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain.agents.middleware.types import AgentState
from langchain_core.messages import AIMessage, ToolCall, ToolMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from langgraph.graph import START, StateGraph
from langgraph.types import Command, Overwrite

from keel import Ledger, Persistence, RunContext, UserError, build_agent, tool
from keel.evals import ScriptedChatModel
from keel.guards import BreakerPolicy, CircuitBreakerMiddleware, PermissionMiddleware, Policy, Rule
from keel.tools._args import approval_digests
from keel.tools.registry import registered

CTX = RunContext(user_id="u1", roles=("support",))
POLICY = Policy(
    rules=(
        Rule(role="support", tool="lookup_*", action="allow"),
        Rule(role="support", tool="issue_refund", action="ask", reason="refunds need a manager"),
    )
)
REJECTED = "Rejected by a human reviewer; issue_refund was not run."
KEY = "keel_rejections"


def turn(*calls: tuple[str, dict[str, Any]]) -> AIMessage:
    """One model turn asking for `calls` (ids minted by the model: `fresh_ids=True`)."""
    return AIMessage(
        content="", tool_calls=[ToolCall(name=n, args=dict(a), id=None) for n, a in calls]
    )


def refund(amount: Any, **more: Any) -> tuple[str, dict[str, Any]]:
    return ("issue_refund", {"order_id": "A1", "amount": amount, **more})


@tool(risk="write")
def issue_refund(order_id: str, amount: int, currency: str = "USD") -> str:
    """Refund an order."""
    RAN.append(f"issue_refund {order_id} {amount} {currency}")
    return f"refunded {amount} {currency} on {order_id}"


@tool
def lookup_order(order_id: str) -> str:
    """Look an order up."""
    RAN.append(f"lookup_order {order_id}")
    return f"order {order_id}: shipped"


RAN: list[str] = []


@dataclass
class Agent:
    send: Callable[[Any], dict[str, Any]]
    snapshot: Callable[[], Any]
    update: Callable[[dict[str, Any]], Any]
    asked: list[dict[str, Any]] = field(default_factory=list)
    """Every question a reviewer was shown (the interrupts' values, in order)."""

    def waiting(self) -> list[Any]:
        found = list(self.snapshot().interrupts)
        self.asked.extend(i.value for i in found if i.value not in self.asked)
        return found

    def run(self, payload: Any) -> dict[str, Any]:
        result = self.send(payload)
        self.waiting()
        return result


@contextmanager
def agent(
    mode: str, tmp_path: Path, *script: Any, url: str = "", outer: tuple[Any, ...] = ()
) -> Iterator[Agent]:
    """The agent on a thread of its own; `outer` middleware wraps `PermissionMiddleware`."""
    RAN.clear()

    def graph(saver: Any) -> Any:
        return create_agent(
            ScriptedChatModel(script=[*script, "Done."], fresh_ids=True),
            [issue_refund, lookup_order],
            middleware=[*outer, PermissionMiddleware(POLICY)],
            context_schema=RunContext,
            checkpointer=saver,
        )

    config: Any = {"configurable": {"thread_id": uuid.uuid4().hex}}
    with saver_for(mode, str(tmp_path / "checkpoints.db"), url) as (saver, done):
        g, aio = graph(saver), mode == "ainvoke"
        yield Agent(
            lambda p: done((g.ainvoke if aio else g.invoke)(p, config, context=CTX)),
            lambda: done((g.aget_state if aio else g.get_state)(config)),
            lambda v: done(
                (g.aupdate_state if aio else g.update_state)(config, v, as_node="model")
            ),
        )


@contextmanager
def saver_for(mode: str, path: str, url: str) -> Iterator[tuple[Any, Callable[[Any], Any]]]:
    """The thread's checkpointer (LangGraph's SQLite saver at `path`, or keel's for `url`),
    sync or async by `mode`, and what turns a call's return into its result (an async call's
    coroutine is run on a loop of the test's own)."""
    if mode == "invoke":
        with Persistence(url).checkpointer() if url else SqliteSaver.from_conn_string(path) as s:
            yield s, lambda returned: returned
        return
    opened = Persistence(url).acheckpointer() if url else AsyncSqliteSaver.from_conn_string(path)
    loop = asyncio.new_event_loop()
    try:
        yield loop.run_until_complete(opened.__aenter__()), loop.run_until_complete
    finally:
        loop.run_until_complete(opened.__aexit__(None, None, None))
        loop.close()


def replies(result: dict[str, Any]) -> list[ToolMessage]:
    return [m for m in result["messages"] if isinstance(m, ToolMessage)]


def calls(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each tool call of the run by id."""
    return {
        c["id"] or "": c["args"]
        for m in result["messages"]
        if isinstance(m, AIMessage)
        for c in m.tool_calls
    }


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
@pytest.mark.parametrize("store", ["sqlite", "postgres"])
def test_a_rejected_call_asked_again_however_spelled_is_rejected_without_asking(
    mode: str, store: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = str(request.getfixturevalue("fresh_postgres_url")) if store == "postgres" else ""
    script = [
        turn(refund(10)),
        turn(refund(10.0)),
        turn(refund("10"), ("lookup_order", {"order_id": "A1"})),
        turn(refund(10, currency="USD"), refund(20)),
    ]
    with agent(mode, tmp_path, *script, url=url) as a:
        a.run({"messages": [("user", "refund A1")]})
        assert [q["args"] for q in a.asked] == [{"order_id": "A1", "amount": 10}]
        result = a.run(Command(resume={"type": "reject", "message": "no refunds today"}))
        # the repeats were answered without a question; the refund of 20 waits for one
        assert [q["args"] for q in a.asked] == [
            {"order_id": "A1", "amount": 10},
            {"order_id": "A1", "amount": 20},
        ]
        assert RAN == ["lookup_order A1"]
        args = calls(result)
        repeats = [m for m in replies(result)[1:] if m.name == "issue_refund"]
        assert [args[m.tool_call_id] for m in repeats] == [
            {"order_id": "A1", "amount": 10.0},
            {"order_id": "A1", "amount": "10"},
            {"order_id": "A1", "amount": 10, "currency": "USD"},
        ]
        for m in repeats:  # as build_agent's execute_tools answers a rejected call
            assert (m.content, m.status, m.response_metadata) == (
                REJECTED,
                "error",
                {"keel_status": "rejected"},
            )
        assert len(set(args)) == 6  # every call had an id of its own
        (waiting,) = a.waiting()
        result = a.run(Command(resume={waiting.id: {"type": "approve"}}))
        assert RAN == ["lookup_order A1", "issue_refund A1 20 USD"]
        assert len(a.asked) == 2
        (record,) = a.snapshot().values[KEY].values()
        assert record["decision"] == "rejected"
        assert record["tool"] == "issue_refund"


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
def test_rejections_given_in_one_resume_to_parallel_calls_are_all_kept(
    mode: str, tmp_path: Path
) -> None:
    script = [
        turn(refund(10), refund(30)),
        turn(refund(30.0), refund("10"), ("lookup_order", {"order_id": "A1"})),
    ]
    with agent(mode, tmp_path, *script) as a:
        a.run({"messages": [("user", "refund A1")]})
        waiting = a.waiting()
        assert len(waiting) == 2
        a.run(Command(resume={i.id: {"type": "reject"} for i in waiting}))
        assert len(a.snapshot().values[KEY]) == 2
        assert a.waiting() == []
        assert len(a.asked) == 2
        assert RAN == ["lookup_order A1"]


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
def test_an_approval_is_not_remembered_for_a_new_call(mode: str, tmp_path: Path) -> None:
    """As in `build_agent`: an approval covers the call the human saw, not a later twin."""
    with agent(mode, tmp_path, turn(refund(10)), turn(refund(10.0))) as a:
        a.run({"messages": [("user", "refund A1")]})
        a.run(Command(resume={"type": "approve"}))
        assert [q["args"]["amount"] for q in a.asked] == [10, 10.0]
        assert not a.snapshot().values.get(KEY)
        a.run(Command(resume={"type": "approve"}))
        assert RAN == ["issue_refund A1 10 USD", "issue_refund A1 10 USD"]


def _forged(decision: str) -> dict[str, Any]:
    """A record a client builds: the digest of refund(10), as the middleware would."""
    digest, _ = approval_digests(
        registered(issue_refund), {"order_id": "A1", "amount": 10}, POLICY.identity
    )
    record = {"digest": digest, "tool": "issue_refund", "tool_call_id": "x", "decision": decision}
    return {digest: record, f"{digest}/x": record} if decision == "approved" else {digest: record}


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
def test_a_forged_decision_is_never_taken_as_an_approval(mode: str, tmp_path: Path) -> None:
    with agent(mode, tmp_path, turn(refund(10)), turn(refund(10))) as a:
        # in the input: not the agent's input schema, dropped; the call is asked about
        a.run({"messages": [("user", "refund A1")], KEY: _forged("approved")})
        assert not a.snapshot().values.get(KEY)
        assert [q["args"] for q in a.asked] == [{"order_id": "A1", "amount": 10}]
        # in a state update: refused, nothing written
        for forged in (_forged("approved"), {"d": "approved"}, ["approved"]):
            with pytest.raises(UserError, match="holds only the rejections PermissionMiddleware"):
                a.update({KEY: forged})
        assert not a.snapshot().values.get(KEY)
        a.run(Command(resume={"type": "approve"}))
        assert RAN == ["issue_refund A1 10 USD"]
        assert len(a.asked) == 2  # the second refund(10) is asked about too
        # written past the reducer (LangGraph's `Overwrite`): refused, nothing written
        for forged in (_forged("approved"), "approved", {"d": ["approved"]}):
            with pytest.raises(UserError, match="cannot be overwritten or cleared"):
                a.update({KEY: Overwrite(forged)})
        assert not a.snapshot().values.get(KEY)
        # a rejection keel did not seal is dropped: the waiting call is asked, not answered
        a.update({KEY: _forged("rejected")})
        assert not a.snapshot().values.get(KEY)
        a.run(None)  # the update dropped the question: asked again, not run
        assert [i.value["args"] for i in a.waiting()] == [{"order_id": "A1", "amount": 10}]
        assert RAN == ["issue_refund A1 10 USD"]


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
def test_a_tool_breaker_around_counts_no_rejection_as_the_tools_failure(
    mode: str, tmp_path: Path
) -> None:
    """A rejection comes back as a `Command` (its record in the state); a tool breaker placed
    around `PermissionMiddleware` counted it as a failed call, and the breaker is shared by
    every thread through the ledger: a model that kept asking for what a reviewer rejects (or
    the gate denies) made the tool unavailable to everyone. The tool never ran: no count, and
    the next call is asked about as usual."""
    ledger = Ledger(f"sqlite:///{tmp_path}/keel.db")
    ledger.setup()
    breaker = CircuitBreakerMiddleware(ledger, tool=BreakerPolicy(failure_threshold=1))
    with agent(mode, tmp_path, turn(refund(10)), turn(refund(20)), outer=(breaker,)) as a:
        a.run({"messages": [("user", "refund A1")]})
        result = a.run(Command(resume={"type": "reject"}))
        assert [m.response_metadata["keel_status"] for m in replies(result)] == ["rejected"]
        assert [i.value["args"] for i in a.waiting()] == [{"order_id": "A1", "amount": 20}]
    ledger.close()
    assert len(a.asked) == 2 and RAN == []


def test_a_model_calling_a_denied_tool_again_and_again_opens_no_breaker_for_others(
    tmp_path: Path,
) -> None:
    """The attack: a model obeying an injection calls `issue_refund` for a user whose role may
    not, ten times in parallel. Each call is denied; a breaker counted each as the tool's
    failure and, shared through the ledger, opened for every thread: a support agent's refund
    was then answered `unavailable`. It is asked about, as usual."""
    ledger = Ledger(f"sqlite:///{tmp_path}/keel.db")
    ledger.setup()
    guest = RunContext(user_id="mallory", roles=("guest",))

    def graph(*script: Any) -> Any:
        return create_agent(
            ScriptedChatModel(script=[*script, "Done."], fresh_ids=True),
            [issue_refund, lookup_order],
            middleware=[
                CircuitBreakerMiddleware(ledger, tool=BreakerPolicy(failure_threshold=2)),
                PermissionMiddleware(POLICY),
            ],
            context_schema=RunContext,
            checkpointer=InMemorySaver(),
        )

    flood = graph(turn(*[refund(n) for n in range(10)]))
    config: Any = {"configurable": {"thread_id": "mallory"}}
    done = flood.invoke({"messages": [("user", "refund everything")]}, config, context=guest)
    assert {m.response_metadata["keel_status"] for m in replies(done)} == {"denied"}
    honest = graph(turn(refund(10)))
    config = {"configurable": {"thread_id": "support"}}
    paused = honest.invoke({"messages": [("user", "refund A1")]}, config, context=CTX)
    assert [i.value["args"] for i in paused["__interrupt__"]] == [{"order_id": "A1", "amount": 10}]
    ledger.close()
    assert RAN == []


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
def test_a_plain_resume_sent_after_a_forged_rejection_approves_no_later_call(
    mode: str, tmp_path: Path
) -> None:
    """The waiting call's question is dropped by a state update that wrote a (dropped, unsealed)
    rejection of it: the plain resume sent after is refused and never taken; the call is asked
    again, and the resume value never reaches the next turn's question."""
    with agent(mode, tmp_path, turn(refund(10)), turn(refund(20))) as a:
        a.run({"messages": [("user", "refund A1")]})
        a.update({KEY: _forged("rejected")})
        with pytest.raises(UserError):
            a.run(Command(resume={"type": "approve"}))
        a.run(None)
        assert [i.value["args"] for i in a.waiting()] == [{"order_id": "A1", "amount": 10}]
        a.run(Command(resume={"type": "reject"}))
        assert [i.value["args"] for i in a.waiting()] == [{"order_id": "A1", "amount": 20}]
        a.run(Command(resume={"type": "reject"}))
        assert RAN == []


def test_the_repeat_of_a_rejected_call_is_answered_as_build_agent_answers_it(
    tmp_path: Path,
) -> None:
    """One rule for both ways of guarding an agent: the same rejected refund asked again as
    `10.0` under a new id gets the same answer from `build_agent` (in its next run) and from
    `PermissionMiddleware` (its run goes on)."""
    script = [turn(refund(10)), "ok", turn(refund(10.0)), "done"]
    config: Any = {"configurable": {"thread_id": "b"}}
    with Persistence(f"sqlite:///{tmp_path / 'keel.db'}").checkpointer() as saver:
        keel_agent = build_agent(
            ScriptedChatModel(script=script, fresh_ids=True),
            [issue_refund, lookup_order],
            policy=POLICY,
            checkpointer=saver,
        )
        keel_agent.invoke({"messages": [("user", "refund A1")]}, config, context=CTX)
        keel_agent.invoke(Command(resume={"type": "reject"}), config, context=CTX)
        again = keel_agent.invoke({"messages": [("user", "refund A1!")]}, config, context=CTX)
    assert "__interrupt__" not in again
    with agent("invoke", tmp_path, turn(refund(10)), turn(refund(10.0))) as a:
        a.run({"messages": [("user", "refund A1")]})
        result = a.run(Command(resume={"type": "reject"}))
    assert len(a.asked) == 1 and RAN == []
    ours, theirs = replies(result)[-1], replies(again)[-1]
    assert theirs.response_metadata["keel_status"] == "rejected"
    assert (ours.content, ours.status, ours.response_metadata) == (
        theirs.content,
        theirs.status,
        theirs.response_metadata,
    )


@pytest.mark.parametrize("kept", [True, False], ids=["checkpointer=True", "checkpointer=None"])
def test_under_a_parent_graph_rejections_last_as_long_as_the_agents_own_state(
    kept: bool, tmp_path: Path
) -> None:
    """LangGraph's behaviour, pinned (README): the rejections are the agent's own state, not
    its output. As a node of a parent graph, an agent compiled with `checkpointer=True` keeps
    its state for the thread, and the rejection answers the next run's repeat; by default it
    starts each of the parent's runs afresh, and the repeat is asked about again."""
    script = [turn(refund(10)), "ok", turn(refund(10.0)), "done"]
    made = create_agent(
        ScriptedChatModel(script=script, fresh_ids=True),
        [issue_refund],
        middleware=[PermissionMiddleware(POLICY)],
        context_schema=RunContext,
        checkpointer=True if kept else None,
    )
    parent = StateGraph(AgentState, context_schema=RunContext)
    parent.add_node("agent", made)
    parent.add_edge(START, "agent")
    config: Any = {"configurable": {"thread_id": "p"}}
    RAN.clear()
    with SqliteSaver.from_conn_string(str(tmp_path / "parent.db")) as saver:
        g = parent.compile(checkpointer=saver)
        g.invoke({"messages": [("user", "refund A1")]}, config, context=CTX)
        g.invoke(Command(resume={"type": "reject"}), config, context=CTX)
        g.invoke({"messages": [("user", "refund A1!")]}, config, context=CTX)
        waiting = [i.value["args"] for i in g.get_state(config).interrupts]
    assert waiting == ([] if kept else [{"order_id": "A1", "amount": 10.0}])
    assert RAN == []


CLEARS = [Overwrite({}), {"__overwrite__": {}}, {"type": "__overwrite__", "value": {}}]
"""LangGraph's `Overwrite`, typed and in the JSON forms a served client sends."""


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
@pytest.mark.parametrize("store", ["sqlite", "postgres"])
@pytest.mark.parametrize("clear", CLEARS, ids=["Overwrite", "json", "json-typed"])
@pytest.mark.parametrize("how", ["update_state", "Command(update)"])
def test_a_client_cannot_clear_the_rejections(
    mode: str, store: str, clear: Any, how: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The attack: a client writes an overwrite to the rejections (written past the reducer,
    LangGraph takes it as the key's whole value). It cleared them, and the rejected refund,
    asked again by the model in the next run, went to a reviewer again. Refused with a
    `UserError`; the rejection is kept and answers the repeat."""
    url = str(request.getfixturevalue("fresh_postgres_url")) if store == "postgres" else ""
    with agent(mode, tmp_path, turn(refund(10)), "ok", turn(refund(10.0)), url=url) as a:
        a.run({"messages": [("user", "refund A1")]})
        a.run(Command(resume={"type": "reject"}))
        kept = a.snapshot().values[KEY]
        with pytest.raises(UserError, match="cannot be overwritten or cleared"):
            if how == "update_state":
                a.update({KEY: clear})
            else:
                a.run(Command(update={KEY: clear}))
        a.update({KEY: None})  # nothing to merge: nothing changes
        assert a.snapshot().values[KEY] == kept
        result = a.run({"messages": [("user", "refund A1 again")]})
        assert replies(result)[-1].content == REJECTED
        assert len(a.asked) == 1 and RAN == []


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
def test_a_client_cannot_forge_a_rejection_nor_who_gave_it(mode: str, tmp_path: Path) -> None:
    """A rejection names who rejected (the decision's `reviewer`, embedded), in its record and
    on its tool message, for the audit. A client's copy of the kept record under another
    call's digest, with another reviewer, or with a made-up seal is dropped: refund(20) is
    asked about, and the record still names alice."""
    with agent(mode, tmp_path, turn(refund(10)), "ok", turn(refund(20))) as a:
        a.run({"messages": [("user", "refund A1")]})
        with pytest.raises(UserError, match="'reviewer' names who answered"):
            a.run(Command(resume={"type": "reject", "reviewer": ["alice"]}))
        result = a.run(Command(resume={"type": "reject", "reviewer": "alice"}))
        assert replies(result)[0].response_metadata == {
            "keel_status": "rejected",
            "keel_reviewer": "alice",
        }
        ((digest, kept),) = a.snapshot().values[KEY].items()
        assert kept["reviewer"] == "alice"
        other, _ = approval_digests(
            registered(issue_refund), {"order_id": "A1", "amount": 20}, POLICY.identity
        )
        for forged in (
            {other: {**kept, "digest": other}},
            {other: {**kept, "digest": other, "reviewer": "mallory"}},
            {digest: {**kept, "reviewer": "mallory"}},
            {other: {**kept, "digest": other, "seal": "0" * 64}},
        ):
            a.update({KEY: forged})
        assert a.snapshot().values[KEY] == {digest: kept}
        a.run({"messages": [("user", "refund 20 then")]})
        assert [q["args"]["amount"] for q in a.asked] == [10, 20]
        result = a.run(Command(resume={"decisions": [{"type": "reject"}], "reviewer": "bob"}))
        assert {r["reviewer"] for r in a.snapshot().values[KEY].values()} == {"alice", "bob"}
        assert RAN == []


def test_a_short_approval_secret_is_refused_when_the_middleware_is_made(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The secret seals each rejection: a bad one is refused up front, not at a rejection."""
    monkeypatch.setenv("KEEL_APPROVAL_SECRET", "short")
    with pytest.raises(UserError, match="KEEL_APPROVAL_SECRET is 5 bytes long"):
        PermissionMiddleware(POLICY)
