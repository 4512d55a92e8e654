"""Tool arguments whose mappings have keys JSON cannot write (tuples, frozensets, mixed types).

A tool's schema can read `dict[tuple[int, int], str]`; a model made in Python (or a reviewer's
edit, embedded) can hand it such keys, at any depth. JSON cannot write them: the approval
digest (`canonical_args`) raised `TypeError` in the tool gate and the run ended in a traceback;
the checkpoint could not store the model's answer (the run ended on a storage failure, its
thread unsaved); and the audit log never took the call's records (`json.dumps` raised on each
write). The run now ends with an outcome, and the audit row holds the arguments readably, each
such key written as its canonical JSON (`(1, 2)` as `"[1,2]"`). Real SQLite and PostgreSQL.
"""

from __future__ import annotations

import uuid
from typing import Any

from langchain_core.messages import AIMessage, ToolCall, ToolMessage
from langgraph.types import Command

from keel import Ledger, Persistence, RunContext, build_agent, tool
from keel.approvals import canonical_args, json_text
from keel.db.audit import AuditLog
from keel.evals import ScriptedChatModel
from keel.guards import Policy, Rule

CTX = RunContext(user_id="u1")
ARGS = {"grid": {(1, 2): "x", (0, 0): "o"}, "notes": [{frozenset({"b", "a"}): 1}]}
READABLE = {"grid": {"[1,2]": "x", "[0,0]": "o"}, "notes": [{'["a","b"]': 1}]}


@tool
def place(grid: dict[tuple[int, int], str], notes: list[dict[frozenset[str], int]] = []) -> str:  # noqa: B006
    """Place marks on a grid."""
    return f"placed {sorted(grid)}"


def _agent(ledger: Ledger, saver: Any, action: str, args: dict[str, Any]) -> Any:
    turn = AIMessage(content="", tool_calls=[ToolCall(name="place", args=args, id="c1")])
    policy = Policy(rules=(Rule(role="*", tool="place", action=action),))
    return build_agent(
        ScriptedChatModel(script=[turn, "Done."]),
        [place],
        policy=policy,
        ledger=ledger,
        checkpointer=saver,
    )


def _tool_rows(ledger: Ledger) -> list[Any]:
    return [r for r in AuditLog(ledger).query() if r.tool == "place"]


def test_a_model_giving_tuple_keys_ends_with_an_outcome_and_a_readable_audit_row(
    db_url: str,
) -> None:
    ledger = Ledger(db_url)
    ledger.setup()
    config: Any = {"configurable": {"thread_id": uuid.uuid4().hex}}
    try:
        with Persistence(db_url).checkpointer() as saver:
            for action in ("allow", "ask"):
                agent = _agent(ledger, saver, action, ARGS)
                config = {"configurable": {"thread_id": uuid.uuid4().hex}}
                result = agent.invoke({"messages": [("user", "place")]}, config, context=CTX)
                assert result["outcome"]["terminated_reason"] == "completed", result["outcome"]
                # JSON carries no tuple: the schema reads the keys as a provider's, and says so
                (answer,) = [m for m in result["messages"] if isinstance(m, ToolMessage)]
                assert answer.response_metadata["keel_status"] == "invalid_args"
                assert "grid.[1,2].[key]: Input should be a valid tuple" in answer.text
                stored = agent.get_state(config).values["messages"][1].tool_calls[0]["args"]
                assert stored == READABLE
        rows = _tool_rows(ledger)
        assert [r.args for r in rows] == [READABLE, READABLE]
        assert {r.status for r in rows} == {"invalid_args"}
    finally:
        ledger.close()


def test_a_reviewers_edit_with_tuple_keys_runs_and_is_audited_readably(db_url: str) -> None:
    ledger = Ledger(db_url)
    ledger.setup()
    config: Any = {"configurable": {"thread_id": uuid.uuid4().hex}}
    try:
        with Persistence(db_url).checkpointer() as saver:
            agent = _agent(ledger, saver, "ask", {"grid": {}})
            paused = agent.invoke({"messages": [("user", "place")]}, config, context=CTX)
            assert paused["outcome"]["terminated_reason"] == "awaiting_approval"
            edit = {"type": "edit", "args": {"grid": {(1, 2): "x"}}, "reviewer": "alice"}
            result = agent.invoke(Command(resume=edit), config, context=CTX)
        assert result["outcome"]["terminated_reason"] == "completed"
        (answer,) = [m for m in result["messages"] if isinstance(m, ToolMessage)]
        assert answer.text == "placed [(1, 2)]"  # the tool read the reviewer's tuple keys
        rows = {(r.kind, r.decision): r for r in _tool_rows(ledger)}
        assert rows[("approval", "edited")].args == {"grid": {"[1,2]": "x"}}
        assert rows[("approval", "edited")].approver == "alice"
        assert rows[("tool", "ask")].args == {"grid": {"[1,2]": "x"}}
        assert rows[("tool", "ask")].status == "success"
    finally:
        ledger.close()


def test_json_writes_any_key_and_keeps_the_digests_it_wrote_before() -> None:
    # mixed key types cannot be sorted; a tuple inside a list inside a dict; a frozenset key
    odd = {"m": {1: "a", "b": 2}, "deep": [{"k": {(1, (2, 3)): {frozenset({2, 1}): None}}}]}
    assert canonical_args(odd) == (
        '{"deep":[{"k":{"[1,[2,3]]":{"[1,2]":null}}}],"m":{"1":"a","b":2}}'
    )
    assert json_text({True: 1, None: 2, 1.5: 3}) == '{"true": 1, "null": 2, "1.5": 3}'
    # what JSON wrote already is written as before: stored approvals keep their digests
    assert canonical_args({"a": {9: 1, 10: 2}}) == '{"a":{"9":1,"10":2}}'
    assert canonical_args({"s": {3, 1, 2}}) == '{"s":[1,2,3]}'
