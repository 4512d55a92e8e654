"""Agent versions: run records, audit records and traces name the version that served a run.

A careless user changes a prompt without relabelling: the records must still tell the two builds
apart (`auto-<digest>`). A labelled build reports its label. LangSmith receives the same.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from test_tracing import _flush, _stand_in

from keel import Ledger, RunContext, build_agent
from keel.db.audit import AuditLog
from keel.db.runs import RunLog
from keel.errors import UserError
from keel.evals import ScriptedChatModel
from keel.evals.scripted import call
from keel.observe.tracing import trace_config
from keel.tools import tool
from keel.versions import AgentVersion, prompt_hash

CTX = RunContext(user_id="u1", tenant_id="acme")


@tool(name="lookup_order", version="7")
def lookup_order(order_id: str) -> str:
    """Look an order up."""
    return f"Order {order_id}: shipped."


def _agent(ledger: Ledger | None, *, prompt: str = "Be brief.", version: str | None = None) -> Any:
    model = ScriptedChatModel(script=[call("lookup_order", order_id="A1"), "Shipped."])
    return build_agent(
        model, [lookup_order], system_prompt=prompt, ledger=ledger, version=version, name="shop"
    )


def _run(agent: Any, thread: str) -> dict[str, Any]:
    config = trace_config(CTX, {"configurable": {"thread_id": thread}})
    result: dict[str, Any] = agent.invoke(
        {"messages": [("user", "where is A1?")]}, config, context=CTX
    )
    assert result["outcome"]["terminated_reason"] == "completed"
    return result


def test_records_name_the_model_prompt_tools_policy_and_label(db_url: str) -> None:
    ledger = Ledger(db_url)
    _run(_agent(ledger), "t-auto")
    _run(_agent(ledger, prompt="Be very brief."), "t-prompt")  # a prompt change, no new label
    _run(_agent(ledger, version="v2"), "t-v2")
    runs = {r.thread_id: r for r in RunLog(ledger).query()}
    auto, changed, labelled = runs["t-auto"], runs["t-prompt"], runs["t-v2"]

    assert auto.model == "scripted" and auto.tool_versions == {"lookup_order": "7"}
    assert auto.prompt_hash == prompt_hash("Be brief.") != changed.prompt_hash
    assert auto.version is not None and auto.version.startswith("auto-")
    assert changed.version is not None and changed.version.startswith("auto-")
    assert auto.version != changed.version, "a changed prompt is a different version"
    assert labelled.version == "v2" and labelled.prompt_hash == auto.prompt_hash
    # the audit records of each run carry the same version as its run record
    for thread, run in runs.items():
        records = AuditLog(ledger).query(thread=thread)
        assert records and {(r.version, r.model, r.prompt_hash) for r in records} == {
            (run.version, run.model, run.prompt_hash)
        }
    ledger.close()


def test_the_same_build_is_the_same_version_and_the_digest_covers_every_part() -> None:
    parts: dict[str, Any] = {
        "model": "m",
        "prompt_hash": "p",
        "tool_versions": {"a": "1"},
        "policy": "x@1",
    }
    base = AgentVersion(**parts)
    assert base.id == AgentVersion(**parts).id
    for change in (
        {"model": "m2"},
        {"prompt_hash": "q"},
        {"tool_versions": {"a": "2"}},
        {"policy": "x@2"},
    ):
        other = AgentVersion(**{**parts, **change})
        assert other.id != base.id, change
    assert prompt_hash(None) == "none" and len(prompt_hash("")) == 12


@pytest.mark.parametrize("label", ["", "  ", 2])
def test_a_bad_version_label_is_refused_with_the_fix(label: Any) -> None:
    with pytest.raises(UserError, match="version='v2'"):
        _agent(None, version=label)


def test_traces_carry_the_version(monkeypatch: pytest.MonkeyPatch) -> None:
    server = next(gen := _stand_in(monkeypatch, 200, "ls-test-key"))
    try:
        agent = _agent(None, version="v2")
        _run(agent, "t-trace")
        _flush(agent)
        sent = server.bodies()
        assert b"version:v2" in sent  # the tag
        for key, value in {
            "version": "v2",
            "model": "scripted",
            "prompt_hash": prompt_hash("Be brief."),
            "policy": "default@1",
        }.items():
            assert json.dumps({key: value}, separators=(",", ":"))[1:-1].encode() in sent, key
        assert b'"tool_versions":{"lookup_order":"7"}' in sent
    finally:
        gen.close()
