"""keel runs reported to OpenTelemetry (the SDK's in-memory reader and exporter, real SDK)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from langgraph.types import Command
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from keel import Ledger, Persistence, RunContext, build_agent
from keel.db.runs import RunLog
from keel.evals import ScriptedChatModel
from keel.evals.scripted import call
from keel.guards import Policy
from keel.observe import otel
from keel.tools import tool


@tool(name="lookup")
def lookup(key: str) -> str:
    """Look a key up."""
    if key == "bad":
        raise ValueError("no such key")
    return f"value of {key}"


def _points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    data = reader.get_metrics_data()
    assert data is not None
    return {
        m.name: list(m.data.data_points)
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }


def test_finished_runs_become_metrics_and_spans(tmp_path: Path) -> None:
    reader = InMemoryMetricReader()
    spans = InMemorySpanExporter()
    tracing = TracerProvider()
    tracing.add_span_processor(SimpleSpanProcessor(spans))
    otel.use(MeterProvider(metric_readers=[reader]), tracing)
    try:
        model = ScriptedChatModel(
            script=[call("lookup", key="a"), call("lookup", key="bad"), "done"]
        )
        agent = build_agent(model, [lookup], ledger=Ledger(f"sqlite:///{tmp_path}/k.db"))
        agent.invoke({"messages": [("user", "go")]}, context=RunContext(tenant_id="acme"))
    finally:
        otel.use()  # back to the global (no-op) providers

    points = _points(reader)
    (runs,) = points["keel.db.runs"]
    assert runs.value == 1 and runs.attributes == {
        "graph": "keel_agent",
        "tenant": "acme",
        "status": "success",
        "terminated_reason": "completed",
    }
    (duration,) = points["keel.run.duration"]
    assert duration.count == 1 and duration.sum > 0
    tools = {p.attributes["outcome"]: p.value for p in points["keel.tool.calls"]}
    assert tools == {"success": 1, "failure": 1}
    tokens = {p.attributes["direction"]: p.value for p in points["keel.run.tokens"]}
    assert tokens["input"] > 0 and tokens["output"] > 0
    (span,) = spans.get_finished_spans()
    assert span.name == "keel.run keel_agent"
    assert span.attributes is not None and span.attributes["tool_calls"] == 2
    assert span.end_time is not None and span.start_time is not None
    assert span.end_time > span.start_time


@tool(name="refund", risk="write")
def refund(order: str) -> str:
    """Refund an order."""
    return f"refunded {order}"


def test_a_paused_run_is_reported_once_when_it_ends_with_its_own_usage(tmp_path: Path) -> None:
    """A pause reports nothing; the finished run is one run; a second task counts only its own
    tokens, not the thread's running total."""
    reader = InMemoryMetricReader()
    spans = InMemorySpanExporter()
    tracing = TracerProvider()
    tracing.add_span_processor(SimpleSpanProcessor(spans))
    url = f"sqlite:///{tmp_path}/k.db"
    policy = Policy.from_dict({"rules": [{"tool": "refund", "action": "ask"}]})
    model = ScriptedChatModel(script=[call("refund", order="A1"), "Refunded.", "Anything else?"])
    config: Any = {"configurable": {"thread_id": "t"}}
    otel.use(MeterProvider(metric_readers=[reader]), tracing)
    try:
        with Persistence(url).checkpointer() as saver:
            agent = build_agent(
                model, [refund], policy=policy, ledger=Ledger(url), checkpointer=saver
            )
            paused = agent.invoke({"messages": [("user", "refund A1")]}, config)
            assert paused["outcome"]["status"] == "interrupted"
            assert reader.get_metrics_data() is None and not spans.get_finished_spans()
            first = agent.invoke(Command(resume={"type": "approve"}), config)["usage"]
            second = agent.invoke({"messages": [("user", "thanks")]}, config)["usage"]
    finally:
        otel.use()

    points = _points(reader)
    (runs,) = points["keel.db.runs"]
    assert runs.value == 2 and runs.attributes["status"] == "success"
    tokens = {p.attributes["direction"]: p.value for p in points["keel.run.tokens"]}
    assert tokens == {"input": second["input_tokens"], "output": second["output_tokens"]}
    assert first["input_tokens"] < second["input_tokens"]  # the thread's total grew
    assert [s.attributes["model_calls"] for s in spans.get_finished_spans()] == [2, 1]


def test_a_run_whose_reader_leaves_after_its_end_is_reported_once(tmp_path: Path) -> None:
    """The reader stops after the run's end was recorded: the cancellation finds that end and
    keeps it, and OpenTelemetry hears of the run once, as it ended."""
    reader = InMemoryMetricReader()
    otel.use(MeterProvider(metric_readers=[reader]), TracerProvider())
    url = f"sqlite:///{tmp_path}/k.db"
    try:
        with Persistence(url).checkpointer() as saver:
            agent = build_agent(
                ScriptedChatModel(script=["done"]), [lookup], ledger=Ledger(url), checkpointer=saver
            )
            config: Any = {"configurable": {"thread_id": "t"}}
            go = {"messages": [("user", "go")]}
            for mode, chunk in agent.stream(go, config, stream_mode=["values", "updates"]):
                if mode == "updates" and "call_model" in chunk:
                    break  # the run's end is recorded as this step ends
    finally:
        otel.use()
    (runs,) = _points(reader)["keel.db.runs"]
    assert runs.value == 1 and runs.attributes["terminated_reason"] == "completed"


def test_a_run_resumed_after_a_storage_failure_adds_only_what_the_resume_used(
    tmp_path: Path,
) -> None:
    """The run's steps go on while its checkpoints fail to save: it records its end, then keel
    finds the failure and records `storage`; the database comes back and `None` resumes the
    run, which redoes its unsaved steps and ends again. The run is counted once; its tokens,
    cost and tool calls add up to its record's, where reporting each write would count its
    spend three times."""
    reader = InMemoryMetricReader()
    otel.use(MeterProvider(metric_readers=[reader]), TracerProvider())
    url = f"sqlite:///{tmp_path}/k.db"
    model = ScriptedChatModel(script=[call("breaks", key="a"), call("lookup", key="b"), "done"])
    config: Any = {"configurable": {"thread_id": "t"}}
    try:
        with Persistence(url).checkpointer() as saver:
            broken: list[str] = []

            @tool(name="breaks")
            def breaks(key: str) -> str:
                """Look a key up, as the database turns read-only (the first time)."""
                if not broken:
                    broken.append(key)
                    saver.conn.execute("PRAGMA query_only = ON")
                return f"value of {key}"

            agent = build_agent(model, [breaks, lookup], ledger=Ledger(url), checkpointer=saver)
            ended = agent.invoke({"messages": [("user", "go")]}, config)
            assert ended["outcome"]["terminated_reason"] == "storage", ended["outcome"]
            saver.conn.execute("PRAGMA query_only = OFF")
            done = agent.invoke(None, config)
            assert done["outcome"]["terminated_reason"] == "completed", done["outcome"]
    finally:
        otel.use()

    (runs,) = _points(reader)["keel.db.runs"]  # one run, counted under the end it first recorded
    assert runs.value == 1, runs
    total = RunLog(Ledger(url)).query()[0]
    assert _tokens(reader) == {"input": total.input_tokens, "output": total.output_tokens}
    costs = sum(p.value for p in _points(reader)["keel.run.cost"])
    assert costs == pytest.approx(total.usd) and total.usd > 0
    tools = {
        (p.attributes["tool"], p.attributes["outcome"]): p.value
        for p in _points(reader)["keel.tool.calls"]
    }
    assert tools[("breaks", "success")] == 1 and tools[("lookup", "success")] == 1


def _tokens(reader: InMemoryMetricReader) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in _points(reader)["keel.run.tokens"]:
        key = p.attributes["direction"]
        out[key] = out.get(key, 0) + p.value
    return out


def test_a_collector_that_is_down_never_fails_the_run_or_its_record(tmp_path: Path) -> None:
    """The OTLP exporters point at a port nobody listens on: spans are exported as each run
    ends (`SimpleSpanProcessor`, in the run's thread), metrics by the SDK's reader thread. The
    run still ends with its outcome and its record is written."""
    import socket

    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{probe.getsockname()[1]}"
    tracing = TracerProvider()
    tracing.add_span_processor(
        SimpleSpanProcessor(OTLPSpanExporter(f"{down}/v1/traces", timeout=1))
    )
    exporter = OTLPMetricExporter(f"{down}/v1/metrics", timeout=1)
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=50)
    meters = MeterProvider(metric_readers=[reader])
    otel.use(meters, tracing)
    ledger = Ledger(f"sqlite:///{tmp_path}/k.db")
    try:
        model = ScriptedChatModel(script=[call("lookup", key="a"), "done"])
        agent = build_agent(model, [lookup], ledger=ledger)
        result = agent.invoke({"messages": [("user", "go")]}, context=RunContext(tenant_id="acme"))
        assert result["outcome"]["terminated_reason"] == "completed"
        (record,) = RunLog(ledger).query()
        assert (record.status, record.terminated_reason, record.tool_calls) == (
            "success",
            "completed",
            1,
        )
    finally:
        otel.use()
        meters.shutdown(timeout_millis=2000)
        tracing.shutdown()
        ledger.close()
