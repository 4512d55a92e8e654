"""The audit log and run records, written by real agent runs on SQLite and PostgreSQL."""

from __future__ import annotations

import _thread
import asyncio
import importlib
import json
import logging
import pkgutil
import re
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langgraph.types import Command

from keel import Ledger, Persistence, RunContext, build_agent
from keel.db.audit import AuditLog, AuditRecord
from keel.db.runs import RunLog, error_category
from keel.errors import UserError
from keel.evals import ScriptedChatModel
from keel.evals.scripted import call
from keel.guards import BreakerPolicy, CircuitBreaker, Policy
from keel.tools import tool

CTX = RunContext(user_id="u1", tenant_id="acme", roles=("support",))
POLICY = {
    "name": "support",
    "version": "3",
    "rules": [
        {"role": "support", "tool": "lookup_*", "action": "allow"},
        {"tool": "delete_*", "action": "deny"},
        {"tool": "issue_refund", "action": "ask"},
    ],
}


def _tools() -> list[Any]:
    @tool(name="lookup_customer")
    def lookup_customer(email: str) -> str:
        """Find a customer by email."""
        return f"Customer {email}: 2 orders, phone +1 415 555 0199."

    @tool(name="delete_account")
    def delete_account(customer: str) -> str:
        """Delete an account."""
        raise AssertionError("a denied call must never run")

    @tool(name="issue_refund", version="2")
    def issue_refund(order_id: str, amount: float) -> str:
        """Refund an order."""
        return f"Refunded ${amount:.2f} on {order_id}."

    return [lookup_customer, delete_account, issue_refund]


def _model(*extra: Any) -> ScriptedChatModel:
    return ScriptedChatModel(
        script=[
            call("lookup_customer", email="jane.doe@example.com"),
            call("delete_account", customer="jane.doe@example.com"),
            call("issue_refund", order_id="A1", amount=10.0),
            "Refunded order A1.",
            *extra,
        ]
    )


def _agent(ledger: Ledger, saver: Any) -> Any:
    return build_agent(
        _model("Second answer."),
        _tools(),
        policy=Policy.from_dict(POLICY),
        ledger=ledger,
        checkpointer=saver,
    )


APPROVE = Command(resume={"type": "approve", "reviewer": "alice"})
FIRST = {"messages": [("user", "refund jane")]}
SECOND = {"messages": [("user", "anything else?")]}
RUN_1, RUN_2 = "0a0a0a0a-0000-4000-8000-000000000001", "0a0a0a0a-0000-4000-8000-000000000002"


def _three_runs_sync(db_url: str, ledger: Ledger, config: Any) -> list[dict[str, Any]]:
    with Persistence(db_url).checkpointer() as saver:
        agent = _agent(ledger, saver)
        return [agent.invoke(p, config, context=CTX) for p in (FIRST, APPROVE, SECOND)]


async def _three_runs_async(db_url: str, ledger: Ledger, config: Any) -> list[dict[str, Any]]:
    async with Persistence(db_url).acheckpointer() as saver:
        agent = _agent(ledger, saver)
        return [await agent.ainvoke(p, config, context=CTX) for p in (FIRST, APPROVE, SECOND)]


@pytest.mark.parametrize("use_async", [False, True], ids=["invoke", "ainvoke"])
def test_a_run_writes_its_audit_trail_and_run_record(db_url: str, use_async: bool) -> None:
    ledger = Ledger(db_url)
    config = {"configurable": {"thread_id": "t-1"}}
    if use_async:
        paused, done, _ = asyncio.run(_three_runs_async(db_url, ledger, config))
    else:
        paused, done, _ = _three_runs_sync(db_url, ledger, config)
    assert paused["outcome"]["status"] == "interrupted"
    assert done["outcome"]["terminated_reason"] == "completed"

    records = AuditLog(ledger).query(thread="t-1")
    seen = [(r.kind, r.tool, r.decision, r.status) for r in records]
    assert seen == [
        ("tool", "lookup_customer", "allow", "success"),
        ("tool", "delete_account", "deny", "denied"),
        ("approval", "issue_refund", "approved", ""),
        ("tool", "issue_refund", "ask", "success"),
    ]
    lookup, delete, approval, refund = records
    assert lookup.args == {"email": "[EMAIL]"}, "arguments are stored sanitized"
    assert lookup.result == "Customer [EMAIL]: 2 orders, phone [PHONE]."
    assert delete.rule is not None and "delete_*" in delete.rule
    assert approval.approver == "alice" and approval.args == {"order_id": "A1", "amount": 10.0}
    assert refund.result == "Refunded $10.00 on A1."
    for r in records:
        assert (r.user_id, r.tenant_id, r.thread_id, r.policy) == ("u1", "acme", "t-1", "support@3")
    # the tool's version is in every record of its calls and approvals
    assert [r.tool_version for r in records] == ["1", "1", "2", "2"]

    first, second = RunLog(ledger).query()
    assert (first.status, first.terminated_reason, first.interrupts) == ("success", "completed", 1)
    assert (first.model_calls, first.tool_calls, first.tool_failures) == (4, 3, 0)
    assert first.tools == {
        "lookup_customer": {"calls": 1, "failures": 0},
        "delete_account": {"calls": 1, "failures": 0},
        "issue_refund": {"calls": 1, "failures": 0},
    }
    assert (first.user_id, first.tenant_id, first.graph, first.policy) == (
        "u1",
        "acme",
        "keel_agent",
        "support@3",
    )
    assert first.input_tokens > 0 and first.latency_s > 0
    # the second task on the thread: its own usage, not the thread's totals
    assert (second.model_calls, second.tool_calls, second.interrupts) == (1, 0, 0)
    assert second.input_tokens > 0 and second.run_key != first.run_key


def test_budget_events_and_failures_are_recorded(db_url: str) -> None:
    ledger = Ledger(db_url)
    policy = Policy.from_dict({**POLICY, "budget": {"model_calls": 1}})
    model = ScriptedChatModel(script=[call("lookup_customer", email="a@b.example")])
    agent = build_agent(model, _tools(), policy=policy, ledger=ledger)
    result = agent.invoke({"messages": [("user", "hi")]}, context=CTX)
    assert result["outcome"]["terminated_reason"] == "budget_exceeded"

    budget = [r for r in AuditLog(ledger).query() if r.kind == "budget"]
    assert [(r.decision, r.result) for r in budget] == [("exceeded", result["outcome"]["detail"])]
    (run,) = RunLog(ledger).query()
    assert (run.status, run.error_category, run.thread_id) == ("stopped", "budget_exceeded", None)


def test_breaker_transitions_are_audited_in_the_same_transaction(tmp_path: Any) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path}/keel.db")
    now = [1000.0]
    breaker = CircuitBreaker(
        ledger, BreakerPolicy(failure_threshold=1, cooldown_seconds=5), clock=lambda: now[0]
    )
    assert breaker.record("tool:lookup", ok=False) is not None
    now[0] += 10
    breaker.before("tool:lookup")
    records = AuditLog(ledger).query()
    assert [(r.kind, r.tool, r.decision, r.result) for r in records] == [
        ("breaker", "tool:lookup", "open", "closed -> open: 1 failures within 60 s"),
        ("breaker", "tool:lookup", "half_open", "open -> half_open: cool-down of 5 s over"),
    ]
    assert records[0].at == 1000.0
    quiet = CircuitBreaker(ledger, BreakerPolicy(failure_threshold=1), audit=False)
    quiet.record("tool:other", ok=False)
    assert len(AuditLog(ledger).query()) == 2


def test_decisions_are_logged_as_json_lines(tmp_path: Any, caplog: Any) -> None:
    agent = build_agent(_model(), _tools(), policy=Policy.from_dict(POLICY))
    with caplog.at_level(logging.INFO, logger="keel.decisions"):
        agent.invoke({"messages": [("user", "hi")]}, context=CTX)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "keel.decisions"]
    assert lines[0] == {
        "node": "input_guard",
        "choice": "call_model",
        "reason": "",
    }
    assert lines[1] == {
        "node": "call_model",
        "choice": "execute_tools",  # the gate allows it untouched: no tool_gate step
        "reason": "tool calls: lookup_customer",
    }  # no "confidence": keel has none to give (it was always null)
    assert lines[-1]["node"] == "tool_gate" and lines[-1]["choice"] == "human_review"
    assert lines[-1]["reason"] == "awaiting approval for issue_refund"


def test_a_decision_is_not_sanitized_when_nobody_logs_it(monkeypatch: Any) -> None:
    from keel.observe import observer

    def fail(value: Any) -> Any:
        raise AssertionError(f"sanitized {value!r} for a logger that drops it")

    monkeypatch.setattr(observer, "sanitize", fail)
    monkeypatch.setattr(observer.decision_log, "level", logging.WARNING)
    observer._decision("execute_tools", "allow", "", tool="lookup_customer")


def test_audit_writes_are_append_only_and_query_checks_its_input(tmp_path: Any) -> None:
    log = AuditLog(Ledger(f"sqlite:///{tmp_path}/keel.db"))
    log.write([AuditRecord(kind="tool", decision="allow", tool="x", at=5.0, user_id="a")])
    log.write([AuditRecord(kind="tool", decision="deny", tool="x", at=9.0, user_id="b")])
    assert [r.decision for r in log.query(since=6)] == ["deny"]
    assert [r.decision for r in log.query(user="a")] == ["allow"]
    with pytest.raises(UserError, match=re.escape("AuditLog.query(limit=...) must be 1 or more")):
        log.query(limit=0)
    with pytest.raises(UserError, match=re.escape("AuditLog needs a keel.Ledger")):
        AuditLog("sqlite:///x.db")  # type: ignore[arg-type]


def test_error_categories() -> None:
    assert error_category({"terminated_reason": "completed"}) is None
    assert error_category({"terminated_reason": "denied"}) == "denied"
    detail = "model call failed after 3 attempt(s): ConnectionError: refused"
    assert error_category({"terminated_reason": "error", "detail": detail}) == (
        "model:ConnectionError"
    )
    assert error_category({"terminated_reason": "error", "detail": "boom"}) == "error"


@pytest.mark.parametrize("use_async", [False, True], ids=["invoke", "ainvoke"])
def test_a_broken_ledger_is_logged_and_never_fails_the_run(
    tmp_path: Any, caplog: Any, use_async: bool
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    agent = build_agent(
        _model(),
        _tools(),
        policy=Policy.from_dict(POLICY),
        ledger=Ledger(f"sqlite:///{blocker}/k.db"),
    )
    payload = {"messages": [("user", "hi")]}
    with caplog.at_level(logging.ERROR, logger="keel.observe"):
        if use_async:
            result = asyncio.run(agent.ainvoke(payload, context=CTX))
        else:
            result = agent.invoke(payload, context=CTX)
    assert result["outcome"]["status"] == "interrupted"  # the run went on to the approval
    errors = [r.getMessage() for r in caplog.records if r.name == "keel.observe"]
    assert errors and errors[0].startswith("keel could not write the audit log: ")
    assert any(e.startswith("keel could not write the run record: ") for e in errors)


@contextmanager
def _paused(tmp_path: Any, thread: str) -> Iterator[tuple[Any, Ledger, Any]]:
    """An agent on SQLite whose thread `thread` waits for the refund's approval."""
    url = f"sqlite:///{tmp_path}/keel.db"
    ledger = Ledger(url)
    config = {"configurable": {"thread_id": thread}}
    with Persistence(url).checkpointer() as saver:
        agent = _agent(ledger, saver)
        agent.invoke(FIRST, config, context=CTX)
        yield agent, ledger, config


@pytest.mark.parametrize(
    ("answer", "decision", "args", "reason"),
    [
        (
            {"type": "reject", "reviewer": "bob"},
            "rejected",
            {"order_id": "A1", "amount": 10.0},
            "rejected",
        ),
        (
            {"type": "edit", "args": {"order_id": "A1", "amount": 5.0}, "reviewer": "bob"},
            "edited",
            {"order_id": "A1", "amount": 5.0},
            "completed",
        ),
        (
            {"type": "respond", "message": "mail jo@example.org", "reviewer": "bob"},
            "responded",
            {"order_id": "A1", "amount": 10.0},
            "completed",
        ),
    ],
    ids=["reject", "edit", "respond"],
)
def test_every_kind_of_human_decision_is_audited(
    tmp_path: Any,
    caplog: Any,
    answer: dict[str, Any],
    decision: str,
    args: dict[str, Any],
    reason: str,
) -> None:
    decisions = caplog.at_level(logging.INFO, logger="keel.decisions")
    with _paused(tmp_path, "t-h") as (agent, ledger, config), decisions:
        done = agent.invoke(Command(resume=answer), config, context=CTX)
    # and one decision line for it, text redacted
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "keel.decisions"]
    (line,) = [line for line in lines if line["node"] == "human_review" and "tool" in line]
    assert (line["choice"], line["tool"]) == (decision, "issue_refund")
    assert line["approver"] == answer.get("reviewer") and "jo@example.org" not in line["reason"]
    assert done["outcome"]["terminated_reason"] == reason
    (human,) = [r for r in AuditLog(ledger).query() if r.kind == "approval"]
    assert (human.tool, human.decision, human.args) == ("issue_refund", decision, args)
    assert human.tool_version == "2"
    assert human.approver == answer.get("reviewer")
    if decision == "responded":
        assert human.result == "A human answered instead of running issue_refund: mail [EMAIL]"
    (run,) = RunLog(ledger).query()
    assert (run.terminated_reason, run.interrupts) == (reason, 1)


@pytest.mark.parametrize("filler", [455, 465, 472, 480, 490])
def test_a_long_tool_result_is_redacted_before_it_is_cut(tmp_path: Any, filler: int) -> None:
    """The audit keeps 500 characters of a result: a card or email cut in two is not let out."""

    @tool(name="lookup_customer")
    def lookup_customer(email: str) -> str:
        """Find a customer by email."""
        return "x" * filler + " card 4111 1111 1111 1111 of jane.doe@example.com"

    ledger = Ledger(f"sqlite:///{tmp_path}/keel.db")
    model = ScriptedChatModel(script=[call("lookup_customer", email="a@b.example"), "Done."])
    agent = build_agent(model, [lookup_customer], ledger=ledger)
    agent.invoke({"messages": [("user", "hi")]}, context=CTX)
    (record,) = AuditLog(ledger).query()
    kept = record.result[filler:].removesuffix("…")
    assert len(record.result) <= 500 and record.result.startswith("x" * filler)
    assert "4111" not in kept and "jane" not in kept and "example" not in kept, kept
    assert kept.startswith(" card [CARD]"[: len(kept)]), kept


def _provider_error(messages: Any) -> Any:
    raise ValueError("provider refused 'jane@example.com\x00\ud800'")


def test_a_run_whose_error_quotes_nul_and_a_lone_surrogate_is_recorded(db_url: str) -> None:
    """The run record of a failed run is written on every backend, PII redacted, text escaped."""
    ledger = Ledger(db_url)
    agent = build_agent(ScriptedChatModel(script=[_provider_error]), [], ledger=ledger)
    config = {"configurable": {"thread_id": "t-nul"}}
    result = agent.invoke({"messages": [("user", "hi")]}, config, context=CTX)
    assert result["outcome"]["terminated_reason"] == "error"
    (run,) = RunLog(ledger).query()
    assert (run.thread_id, run.status, run.error_category) == ("t-nul", "error", "model:ValueError")
    assert run.detail.endswith("ValueError: provider refused '[EMAIL]\\x00\\ud800'")


_PACKAGES = ("keel", "keel.graphs", "keel.nodes", "keel.tools", "keel.memory", "keel.guards")
_SERVED_ONLY = {"keel.app.auth"}  # reads KEEL_SERVER_CONFIG when imported; logs nothing


def test_every_keel_logger_redacts_what_it_logs(caplog: Any) -> None:
    """README: every `keel.*` logger redacts PII and secrets (a filter on a parent logger does
    not see a child's records, so each logger keel uses must carry its own)."""
    for package in _PACKAGES:
        path = importlib.import_module(package).__path__
        for module in pkgutil.walk_packages(path, f"{package}."):
            if module.name in _SERVED_ONLY:
                continue
            try:
                importlib.import_module(module.name)
            except ModuleNotFoundError as exc:  # an optional extra that is not installed
                assert exc.name is not None and not exc.name.startswith("keel"), exc
    names = sorted(
        name
        for name, logger in logging.root.manager.loggerDict.items()
        if isinstance(logger, logging.Logger) and (name == "keel" or name.startswith("keel."))
    )
    assert {"keel.memory", "keel.guards.admission", "keel.decisions"} <= set(names)
    for name in names:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=name):
            logging.getLogger(name).warning("store failed for %s", "jane.doe@example.com")
        assert [r.getMessage() for r in caplog.records] == ["store failed for [EMAIL]"], name


def test_a_logged_traceback_is_redacted_and_never_formatted_raw() -> None:
    """README: `log.exception(...)` on a keel logger keeps a redacted `exc_text` (chained
    causes included) and clears `exc_info`, so no handler formats the raw exception."""
    import io

    from keel.redact import sanitized_logger

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    seen: list[logging.LogRecord] = []
    handler.addFilter(lambda record: seen.append(record) or True)
    logger = sanitized_logger("keel.observe")
    logger.addHandler(handler)
    try:
        try:
            try:
                raise KeyError("card 4111 1111 1111 1111")
            except KeyError as cause:
                raise ValueError("no customer jane.doe@example.com") from cause
        except ValueError:
            logger.exception("lookup for %s failed", "jo@example.org", stack_info=True)
    finally:
        logger.removeHandler(handler)
    (record,) = seen
    assert record.exc_info is None and record.exc_text is not None
    text = out.getvalue()
    assert "lookup for [EMAIL] failed" in text and "Traceback" in text and "Stack (most" in text
    assert "ValueError: no customer [EMAIL]" in text and "KeyError: 'card [CARD]'" in text
    for raw in ("jane.doe@example.com", "4111 1111 1111 1111", "jo@example.org"):
        assert raw not in text


def _no_drafts(answer: str, state: Any) -> str | None:
    return "it is a draft" if "DRAFT" in answer else None


def test_a_run_revised_after_verification_is_one_run_with_all_its_usage(tmp_path: Any) -> None:
    """The verifier's feedback to the model is keel's, not a new task: the run paused for an
    approval and revised after a failed check keeps one record (the paused one, updated)."""
    url = f"sqlite:///{tmp_path}/keel.db"
    ledger = Ledger(url)
    model = ScriptedChatModel(
        script=[call("issue_refund", order_id="A1", amount=10.0), "DRAFT: refunded", "Refunded."]
    )
    config = {"configurable": {"thread_id": "t-v"}}
    with Persistence(url).checkpointer() as saver:
        agent = build_agent(
            model,
            _tools(),
            policy=Policy.from_dict(POLICY),
            checks=[_no_drafts],
            ledger=ledger,
            checkpointer=saver,
        )
        before = time.time()
        agent.invoke(FIRST, config, context=CTX)
        done = agent.invoke(APPROVE, config, context=CTX)
    assert done["outcome"]["detail"] == "answer verified" and done["revisions"] == 1
    (run,) = RunLog(ledger).query()
    assert (run.status, run.interrupts, run.model_calls, run.tool_calls) == ("success", 1, 3, 1)
    assert run.input_tokens == done["usage"]["input_tokens"] and run.started_at <= before + 1


def test_a_callers_message_marked_as_keels_own_still_starts_its_own_run(tmp_path: Any) -> None:
    """A client cannot fold its next task into the previous run (overwriting its record)."""
    url = f"sqlite:///{tmp_path}/keel.db"
    ledger = Ledger(url)
    config = {"configurable": {"thread_id": "t-m"}}
    with Persistence(url).checkpointer() as saver:
        agent = build_agent(
            ScriptedChatModel(script=[_provider_error, "Fine."]),
            [],
            ledger=ledger,
            checkpointer=saver,
        )
        agent.invoke(FIRST, config, context=CTX)
        marked = HumanMessage("again", additional_kwargs={"keel_verification": True})
        agent.invoke({"messages": [marked]}, config, context=CTX)
    first, second = RunLog(ledger).query()
    assert (first.status, second.status) == ("error", "success")


def test_a_soft_budget_threshold_passed_is_audited(tmp_path: Any) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path}/keel.db")
    policy = Policy.from_dict({**POLICY, "budget": {"model_calls": 5, "soft_ratio": 0.5}})
    lookups = [call("lookup_customer", email=f"c{i}@b.example") for i in range(3)]
    model = ScriptedChatModel(script=[*lookups, "Done."])
    agent = build_agent(model, _tools(), policy=policy, ledger=ledger)
    result = agent.invoke({"messages": [("user", "hi")]}, context=CTX)
    assert result["outcome"]["terminated_reason"] == "completed"
    budget = [(r.decision, r.result) for r in AuditLog(ledger).query() if r.kind == "budget"]
    assert budget == [("warning", w) for w in result["budget_warnings"]] and budget


def test_a_tool_name_the_model_made_up_is_redacted_in_audit_and_run_record(
    tmp_path: Any,
) -> None:
    """An injected model may call a tool no one has, named after what it was told to leak."""
    ledger = Ledger(f"sqlite:///{tmp_path}/keel.db")
    made_up = "send_to_jane.doe@example.com"
    model = ScriptedChatModel(script=[call(made_up, body="hi"), "Done."])
    agent = build_agent(model, _tools(), policy=Policy.from_dict(POLICY), ledger=ledger)
    agent.invoke({"messages": [("user", "hi")]}, context=CTX)
    (record,) = AuditLog(ledger).query()
    assert (record.decision, record.status, record.tool) == ("deny", "unknown_tool", "[EMAIL]")
    (run,) = RunLog(ledger).query()
    assert run.tools == {"[EMAIL]": {"calls": 1, "failures": 1}}


def test_a_card_pasted_with_no_break_spaces_is_redacted_in_audit_and_run_record(
    db_url: str,
) -> None:
    """A card number copied from a PDF or a web page has U+00A0 / U+202F between its groups:
    the audit log's arguments and result and the run record's detail hold it redacted."""
    pasted = "4111\u00a01111\u00a01111\u00a01111"

    @tool(name="lookup_card")
    def lookup_card(card: str) -> str:
        """Find the orders paid with a card."""
        raise ValueError(f"no orders for 4111\u202f1111\u202f1111\u202f1111 ({card})")

    ledger = Ledger(db_url)
    try:
        model = ScriptedChatModel(script=[call("lookup_card", card=pasted), "None."])
        agent = build_agent(model, [lookup_card], ledger=ledger)
        agent.invoke({"messages": [("user", f"orders on {pasted}?")]}, context=CTX)
        (record,) = AuditLog(ledger).query(user=CTX.user_id)
        assert record.args == {"card": "[CARD]"}
        assert "[CARD]" in record.result and "1111" not in record.result, record.result
        (run,) = RunLog(ledger).query()
        assert "1111" not in json.dumps(run.to_dict()), run
    finally:
        ledger.close()


def test_audit_and_run_queries_on_odd_ids_find_nothing_and_a_since_must_be_a_number(
    db_url: str,
) -> None:
    """Filters are matched as records are written (NUL and lone surrogates escaped): PostgreSQL
    refused a NUL in a filter and both backends a lone surrogate, as bare driver errors."""
    ledger = Ledger(db_url)
    try:
        agent = build_agent(ScriptedChatModel(script=["Hi."]), [], ledger=ledger)
        agent.invoke({"messages": [("user", "hi")]}, context=CTX)
        assert len(RunLog(ledger).query(user=CTX.user_id)) == 1
        for odd in ("u1\x00", "u1\ud800"):
            assert AuditLog(ledger).query(user=odd, thread=odd) == []
            assert RunLog(ledger).query(user=odd, tenant=odd) == []
        with pytest.raises(UserError, match="since must be a Unix time"):
            AuditLog(ledger).query(since="1d")  # type: ignore[arg-type]
        with pytest.raises(UserError, match="since must be a Unix time"):
            RunLog(ledger).query(since="7d")  # type: ignore[arg-type]
    finally:
        ledger.close()


@pytest.mark.parametrize("reviewer", [{"name": "bob"}, 42, ["bob"]], ids=["dict", "int", "list"])
def test_a_reviewer_that_is_not_text_is_refused_not_left_out_of_the_audit(
    tmp_path: Any, reviewer: Any
) -> None:
    """A resume naming its reviewer as anything but text failed the audit write: the approval
    went unaudited. It is refused; the thread keeps waiting for a proper answer."""
    with _paused(tmp_path, "t-r") as (agent, ledger, config):
        bad = Command(resume={"type": "approve", "reviewer": reviewer})
        with pytest.raises(UserError, match=re.escape("'reviewer' names who answered, as text")):
            agent.invoke(bad, config, context=CTX)
        assert agent.get_state(config).interrupts, "the approval still waits"
        agent.invoke(APPROVE, config, context=CTX)
    approvals = [(r.decision, r.approver) for r in AuditLog(ledger).query() if r.kind == "approval"]
    assert approvals == [("approved", "alice")]


async def test_a_cancelled_runs_usage_is_not_counted_in_the_next_run(tmp_path: Any) -> None:
    """A run cancelled mid-way is recorded `stopped/cancelled` with what it used; the thread's
    next run still records only its own model calls and tokens (not the cancelled run's too)."""

    @tool(name="lookup_customer")
    async def slow_lookup(email: str) -> str:
        """Find a customer by email."""
        await asyncio.sleep(30)
        return "never"

    url = f"sqlite:///{tmp_path}/keel.db"
    ledger = Ledger(url)
    config = {"configurable": {"thread_id": "t-c"}}
    model = ScriptedChatModel(script=[call("lookup_customer", email="a@b.example"), "x", "Hi."])
    async with Persistence(url).acheckpointer() as saver:
        agent = build_agent(model, [slow_lookup], ledger=ledger, checkpointer=saver)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(agent.ainvoke(FIRST, config, context=CTX), 0.5)
        cancelled = (await agent.aget_state(config)).values["usage"]
        done = await agent.ainvoke(SECOND, config, context=CTX)
    stopped, run = await RunLog(ledger).aquery()
    assert (stopped.status, stopped.terminated_reason, stopped.error_category) == (
        "stopped",
        "cancelled",
        "cancelled",
    )
    assert (stopped.model_calls, stopped.input_tokens) == (1, cancelled["input_tokens"])
    assert (run.status, run.model_calls) == ("success", 1)
    assert run.input_tokens == done["usage"]["input_tokens"] - cancelled["input_tokens"]


async def test_a_served_run_cancelled_while_resumed_ends_cancelled(tmp_path: Any) -> None:
    """A served run streams `updates` and `debug` (LangGraph server adds it), not `values`:
    cancelled after the approval, while the refund runs, the run that was recorded as waiting
    is recorded `cancelled`, not left `interrupted` as if it still waited for a human."""

    @tool(name="issue_refund", version="2")
    async def slow_refund(order_id: str, amount: float) -> str:
        """Refund an order."""
        await asyncio.sleep(30)
        return "never"

    url = f"sqlite:///{tmp_path}/keel.db"
    ledger = Ledger(url)
    config = {"configurable": {"thread_id": "t-srv"}}
    model = ScriptedChatModel(script=[call("issue_refund", order_id="A1", amount=10.0), "x"])
    async with Persistence(url).acheckpointer() as saver:
        policy = Policy.from_dict(POLICY)
        agent = build_agent(model, [slow_refund], policy=policy, ledger=ledger, checkpointer=saver)
        await agent.ainvoke(FIRST, config, context=CTX)
        (waiting,) = await RunLog(ledger).aquery()
        assert waiting.status == "interrupted"

        async def serve() -> None:
            approve = Command(resume={"type": "approve"})
            modes = ["updates", "debug"]
            async for _ in agent.astream(approve, config, context=CTX, stream_mode=modes):
                pass

        with pytest.raises(TimeoutError):
            await asyncio.wait_for(serve(), 0.5)
    (run,) = await RunLog(ledger).aquery()
    assert (run.run_key, run.status, run.terminated_reason) == (
        waiting.run_key,
        "stopped",
        "cancelled",
    )
    assert run.interrupts == 1


@pytest.mark.parametrize("where", ["mid-run", "after-its-end"])
def test_a_reader_that_stops_reading_cancels_the_run_unless_it_ended(
    tmp_path: Any, where: str
) -> None:
    """A caller that stops reading a run's stream ends the run (LangGraph runs no further):
    mid-run, it is recorded `cancelled`; once its end was recorded (the last step's update
    streamed), its `success` stands."""
    url = f"sqlite:///{tmp_path}/keel.db"
    ledger = Ledger(url)
    config = {"configurable": {"thread_id": "t-end"}}
    model = ScriptedChatModel(script=[call("lookup_customer", email="a@b.example"), "Hi."])
    stop = "execute_tools" if where == "mid-run" else "output_guard"
    with Persistence(url).checkpointer() as saver:
        agent = build_agent(model, _tools(), policy=Policy.from_dict(POLICY), ledger=ledger,
                            checkpointer=saver)  # fmt: skip
        for mode, chunk in agent.stream(
            FIRST, config, context=CTX, stream_mode=["values", "updates"]
        ):
            if mode == "updates" and stop in chunk:
                break  # the stream is closed at once: its reader is gone
    (run,) = RunLog(ledger).query()
    if where == "mid-run":
        assert (run.status, run.terminated_reason, run.model_calls) == ("stopped", "cancelled", 1)
    else:
        assert (run.status, run.terminated_reason, run.model_calls) == ("success", "completed", 2)


def test_a_sync_run_stopped_with_ctrl_c_is_recorded_cancelled(tmp_path: Any, ctrl_c: None) -> None:
    """Ctrl-C, or Jupyter's stop button, raises KeyboardInterrupt in a sync run: the run left no
    record at all (as if it never ran). It is recorded `stopped/cancelled`, saying why, the
    interrupt still reaches the caller, and the thread takes its next run at once."""

    @tool(name="lookup_customer")
    def interrupted_lookup(email: str) -> str:
        """Find a customer by email."""
        _thread.interrupt_main()  # as SIGINT does: the main thread, waiting for this tool
        time.sleep(0.2)
        return "found"

    url = f"sqlite:///{tmp_path}/keel.db"
    ledger = Ledger(url)
    config = {"configurable": {"thread_id": "t-int"}}
    model = ScriptedChatModel(script=[call("lookup_customer", email="a@b.example"), "Hi."])
    with Persistence(url).checkpointer() as saver:
        agent = build_agent(model, [interrupted_lookup], ledger=ledger, checkpointer=saver)
        with pytest.raises(KeyboardInterrupt):
            agent.invoke(FIRST, config, context=CTX)
        done = agent.invoke(SECOND, config, context=CTX)
    assert done["outcome"]["status"] == "success"
    stopped, run = RunLog(ledger).query()
    assert (stopped.status, stopped.terminated_reason, stopped.model_calls) == (
        "stopped",
        "cancelled",
        1,
    )
    assert "KeyboardInterrupt" in stopped.detail, stopped.detail
    assert (run.status, run.model_calls) == ("success", 1)


def test_a_pending_call_answered_not_run_is_audited_like_every_tool_call(tmp_path: Any) -> None:
    """README: each record has user, tenant, thread, run, policy and agent version, and a tool
    call's has the tool's version: the `not_run` answer to a dropped pending call too."""
    with _paused(tmp_path, "t-n") as (agent, ledger, _):
        dropped = {"configurable": {"thread_id": "t-n", "run_id": "r-2", "keel_pending": "not_run"}}
        agent.invoke(SECOND, dropped, context=CTX)
    (record,) = [r for r in AuditLog(ledger).query() if r.decision == "not_run"]
    (run,) = RunLog(ledger).query()[-1:]
    assert (record.tool, record.tool_version, record.policy) == ("issue_refund", "2", "support@3")
    assert (record.user_id, record.tenant_id, record.thread_id) == ("u1", "acme", "t-n")
    assert (record.run_id, record.version, record.model) == ("r-2", run.version, "scripted")


@pytest.mark.parametrize("then", ["resumed", "dropped"])
def test_a_run_record_keeps_the_id_of_the_run_that_started_it(tmp_path: Any, then: str) -> None:
    """A run that paused is one run record across its pause: a resume, or a new message that
    drops its pending call, is another server run, whose id the record must not take."""
    url = f"sqlite:///{tmp_path}/keel.db"
    ledger = Ledger(url)
    with Persistence(url).checkpointer() as saver:
        agent = _agent(ledger, saver)
        agent.invoke(FIRST, {"configurable": {"thread_id": "t-id", "run_id": RUN_1}}, context=CTX)
        later = {"configurable": {"thread_id": "t-id", "run_id": RUN_2}}
        if then == "resumed":
            agent.invoke(APPROVE, later, context=CTX)
        else:
            later["configurable"]["keel_pending"] = "not_run"
            agent.invoke(SECOND, later, context=CTX)
    runs = sorted(RunLog(ledger).query(), key=lambda r: r.started_at)
    assert runs[0].run_id == RUN_1
    assert runs[0].terminated_reason == ("completed" if then == "resumed" else "cancelled")
    assert [r.run_id for r in runs[1:]] == ([] if then == "resumed" else [RUN_2])


def test_a_state_update_that_writes_a_turn_past_a_waiting_call_answers_it_not_run(
    tmp_path: Any,
) -> None:
    """`Command(update=...)` with an AI turn of the caller's on a thread that waits for the
    refund's approval leaves the call behind: it still gets its one answer, `not_run`, right
    after its request, and the audit log says so, as for a call a new message drops."""
    with _paused(tmp_path, "t-u") as (agent, ledger, config):
        final = agent.invoke(
            Command(update={"messages": [AIMessage("No refund after all.")]}), config, context=CTX
        )
    asked = next(i for i, m in enumerate(final["messages"]) if "issue_refund" in _called(m))
    answer, turn = final["messages"][asked + 1 : asked + 3]
    assert isinstance(answer, ToolMessage) and answer.response_metadata["keel_status"] == "not_run"
    assert turn.content == "No refund after all."
    (record,) = [r for r in AuditLog(ledger).query() if r.decision == "not_run"]
    assert (record.tool, record.tool_call_id, record.tool_version) == (
        "issue_refund",
        answer.tool_call_id,
        "2",
    )
    assert (record.user_id, record.thread_id, record.policy) == ("u1", "t-u", "support@3")


def test_a_state_update_that_leaves_a_waiting_call_asked_answers_nothing(tmp_path: Any) -> None:
    """An update that writes no later AI turn (a system note) drops nothing: the thread still
    waits for the approval, and no call is answered `not_run`."""
    with _paused(tmp_path, "t-s") as (agent, ledger, config):
        update = Command(update={"messages": [SystemMessage("Answer briefly.")]})
        again = agent.invoke(update, config, context=CTX)
    assert again["__interrupt__"] and again["outcome"]["status"] == "interrupted"
    assert not [r for r in AuditLog(ledger).query() if r.decision == "not_run"]


def _called(message: Any) -> list[str]:
    return [c["name"] for c in getattr(message, "tool_calls", None) or []]


def test_a_waiting_run_whose_pending_call_is_dropped_ends_cancelled(tmp_path: Any) -> None:
    """The run that waited for the approval never resumes once its call is answered `not_run`:
    its record ends `stopped/cancelled` (not `interrupted` forever, a run `keel report` would
    count as waiting), with its own usage and the dropped call; the new run has its own row."""
    with _paused(tmp_path, "t-d") as (agent, ledger, config):
        (waiting,) = RunLog(ledger).query()
        dropped = {"configurable": {**config["configurable"], "keel_pending": "not_run"}}
        agent.invoke(SECOND, dropped, context=CTX)
    ended, new = RunLog(ledger).query()
    assert (ended.run_key, ended.status, ended.terminated_reason) == (
        waiting.run_key,
        "stopped",
        "cancelled",
    )
    assert ended.error_category == "cancelled" and "issue_refund" in ended.detail
    assert (ended.interrupts, ended.model_calls) == (1, waiting.model_calls)
    assert ended.tools["issue_refund"] == {"calls": 1, "failures": 0}  # answered not_run
    assert (new.status, new.model_calls, new.interrupts) == ("success", 1, 0)


def test_a_run_refused_by_admission_names_its_policy_like_the_runs_other_records(
    tmp_path: Any,
) -> None:
    from dataclasses import replace

    from keel.guards import Admission, AdmissionPolicy

    ledger = Ledger(f"sqlite:///{tmp_path}/keel.db")
    cap = AdmissionPolicy(tenant_running=1, tenant_queued=0)
    policy = replace(Policy.from_dict(POLICY), admission=cap)
    agent = build_agent(_model(), _tools(), policy=policy, ledger=ledger)
    held = Admission(ledger, cap).acquire(CTX)  # the tenant's one slot is taken
    try:
        result = agent.invoke({"messages": [("user", "hi")]}, context=CTX)
    finally:
        Admission(ledger, cap).release(held)
    assert result["outcome"]["terminated_reason"] == "overloaded"
    (audit,) = AuditLog(ledger).query()
    (run,) = RunLog(ledger).query()
    assert (audit.kind, audit.policy, run.policy) == ("admission", "support@3", "support@3")


@asynccontextmanager
async def _invoking(url: str, driver: str, **options: Any) -> AsyncIterator[Any]:
    """`build_agent(**options)` on the database at `url`: its `invoke` (on a sync saver) or its
    `ainvoke` (on an async one), as `await run(payload, config)`."""
    if driver == "async":
        async with Persistence(url).acheckpointer() as asaver:
            agent = build_agent(checkpointer=asaver, **options)
            yield lambda payload, config: agent.ainvoke(payload, config, context=CTX)
        return
    with Persistence(url).checkpointer() as saver:
        agent = build_agent(checkpointer=saver, **options)

        async def run(payload: Any, config: Any) -> Any:
            return agent.invoke(payload, config, context=CTX)

        yield run


@pytest.mark.parametrize("driver", ["sync", "async"])
async def test_a_run_paused_by_verification_asking_a_human_is_recorded_as_interrupted(
    tmp_path: Any, driver: str
) -> None:
    """`verify(escalate=True)` pauses the run inside the node: no route sees it, yet the run is
    recorded as `interrupted` while it waits and counts as a human intervention when it ends
    (under `invoke` and `ainvoke`)."""
    url = f"sqlite:///{tmp_path}/keel.db"
    ledger = Ledger(url)
    config = {"configurable": {"thread_id": "t-e"}}
    model = ScriptedChatModel(script=["DRAFT: refunded"])
    options = {"checks": [_no_drafts], "max_revisions": 0, "escalate": True, "ledger": ledger}
    async with _invoking(url, driver, model=model, **options) as run:
        assert (await run(FIRST, config))["__interrupt__"]
        (waiting,) = RunLog(ledger).query()
        assert (waiting.status, waiting.interrupts) == ("interrupted", 1)
        assert waiting.detail == "awaiting a human: the answer failed verification: it is a draft"
        await run(Command(resume={"type": "approve"}), config)
    (ended,) = RunLog(ledger).query()
    assert (ended.status, ended.interrupts, ended.run_key) == ("success", 1, waiting.run_key)
