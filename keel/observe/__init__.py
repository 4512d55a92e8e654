"""keel.observe: instrumentation of runs.

- `keel.observe.observer`: audit records, run records and decision logs written as nodes run
  (`Observer`, `recorded`, `audited`, `decision_log`).
- `keel.observe.tracing`: LangSmith tracing with sanitized inputs and outputs, a no-op without a
  key (`trace_config`, `tracing_enabled`).
- `keel.observe.otel`: OpenTelemetry metrics and spans (the `otel` extra).
"""

from keel.observe.observer import Observer, decision_log
from keel.observe.tracing import trace_config, tracing_enabled

__all__ = ["Observer", "decision_log", "trace_config", "tracing_enabled"]
