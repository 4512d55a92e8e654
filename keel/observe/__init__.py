"""keel.observe: instrumentation of runs.

- `keel.observe.observer`: audit records, run records and decision logs written as nodes run
  (`Observer`, `recorded`, `audited`, `decision_log`).
- `keel.observe.tracing`: LangSmith tracing with sanitized inputs and outputs, a no-op without a
  key (`trace_config`, `tracing_enabled`).
- `keel.observe.switch`: whether tracing is switched on, and keyed (light: no LangChain).
- `keel.observe.otel`: OpenTelemetry metrics and spans (the `otel` extra).
"""

import typing

from keel._lazy import lazy_facade as _lazy_facade

if typing.TYPE_CHECKING:
    from keel.observe.observer import Observer, decision_log
    from keel.observe.switch import tracing_enabled
    from keel.observe.tracing import trace_config
else:
    _lazy_facade(
        __name__,
        {
            "keel.observe.observer": ("Observer", "decision_log"),
            "keel.observe.switch": ("tracing_enabled",),
            "keel.observe.tracing": ("trace_config",),
        },
    )

__all__ = ["Observer", "decision_log", "trace_config", "tracing_enabled"]
