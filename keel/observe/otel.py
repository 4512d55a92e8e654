"""OpenTelemetry metrics and traces for keel runs (the `otel` extra: `langgraph-keel[otel]`).

When a run record is written (see `keel.observe`), the finished run is also reported to
OpenTelemetry, through the global providers (a no-op until your application configures the
SDK) or the ones passed to `use(...)`:

- `keel.run.duration` (histogram, s), `keel.db.runs` (counter), with `graph`, `tenant`,
  `status`, `terminated_reason`;
- `keel.run.tokens` (counter, attribute `direction`: `input` / `output`), `keel.run.cost`
  (counter, USD);
- `keel.tool.calls` (counter, attributes `tool`, `outcome`: `success` / `failure`);
- one span `keel.run <graph>` per run, from its start to its end, with the same attributes.

A run is counted once, under the end it first recorded; a later write of its record adds only
what the run added since (the counters add up to the run records).

Without `opentelemetry-api` installed nothing happens.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from keel._version import __version__
from keel.db.runs import RunRecord

__all__ = ["Telemetry", "active", "use"]

_active: Telemetry | None = None


class Telemetry:
    """keel's OpenTelemetry instruments on a meter and a tracer provider (global by default)."""

    def __init__(self, meter_provider: Any = None, tracer_provider: Any = None) -> None:
        from opentelemetry import metrics, trace

        meter = metrics.get_meter("keel", __version__, meter_provider=meter_provider)
        self._tracer = trace.get_tracer("keel", __version__, tracer_provider=tracer_provider)
        self._duration = meter.create_histogram("keel.run.duration", unit="s")
        self._runs = meter.create_counter("keel.db.runs", unit="{run}")
        self._tokens = meter.create_counter("keel.run.tokens", unit="{token}")
        self._cost = meter.create_counter("keel.run.cost", unit="USD")
        self._tools = meter.create_counter("keel.tool.calls", unit="{call}")

    def record_run(self, record: RunRecord, *, before: RunRecord | None = None) -> None:
        """Report a finished run once (paused runs are reported when they finish).

        `before`: the run's record as stored before this one. If it said how the run ended (a
        later write: a storage failure found after the end, a resume that finished the run),
        the run was reported then: only the tokens, cost and tool calls it added are.
        """
        if record.status == "interrupted":
            return
        first = before if before is not None and before.status != "interrupted" else None
        end = first or record  # a run is counted once, under the end it first recorded
        attrs = {
            "graph": record.graph or "",
            "tenant": record.tenant_id or "",
            "status": end.status,
            "terminated_reason": end.terminated_reason,
        }
        added = _added(record, first)
        self._tokens.add(added.input_tokens, {**attrs, "direction": "input"})
        self._tokens.add(added.output_tokens, {**attrs, "direction": "output"})
        self._cost.add(added.usd, attrs)
        for tool, counts in added.tools.items():
            ok = counts.get("calls", 0) - counts.get("failures", 0)
            base = {"graph": attrs["graph"], "tool": tool}
            self._tools.add(ok, {**base, "outcome": "success"})
            self._tools.add(counts.get("failures", 0), {**base, "outcome": "failure"})
        if first is not None:
            return
        self._duration.record(record.latency_s, attrs)
        self._runs.add(1, attrs)
        span = self._tracer.start_span(
            f"keel.run {record.graph or ''}".strip(),
            start_time=int(record.started_at * 1e9),
            attributes={
                **attrs,
                "thread_id": record.thread_id or "",
                "model_calls": record.model_calls,
                "tool_calls": record.tool_calls,
                "usd": record.usd,
            },
        )
        span.end(end_time=int(record.ended_at * 1e9))


def _added(record: RunRecord, before: RunRecord | None) -> RunRecord:
    """`record`'s usage less what `before` reported (never below 0: a run only adds)."""
    if before is None:
        return record
    tools = {
        tool: {k: max(0, n - before.tools.get(tool, {}).get(k, 0)) for k, n in counts.items()}
        for tool, counts in record.tools.items()
    }
    return replace(
        record,
        input_tokens=max(0, record.input_tokens - before.input_tokens),
        output_tokens=max(0, record.output_tokens - before.output_tokens),
        usd=max(0.0, record.usd - before.usd),
        tools=tools,
    )


def use(meter_provider: Any = None, tracer_provider: Any = None) -> Telemetry:
    """Report keel runs to these providers (the global ones when omitted)."""
    global _active
    _active = Telemetry(meter_provider, tracer_provider)
    return _active


def active() -> Telemetry | None:
    """The instruments in use: those of `use(...)`, else the global providers'.

    None when `opentelemetry-api` is not installed.
    """
    global _active
    if _active is None:
        try:
            _active = Telemetry()
        except ImportError:
            return None
    return _active
