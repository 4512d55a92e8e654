"""keel: take LangGraph agents from prototype to production.

The spine re-exports what most programs need; each capability lives in its subpackage
(`keel.graphs`, `keel.nodes`, `keel.tools`, `keel.memory`, `keel.guards`, `keel.evals`).
Each name loads when first used (`keel._lazy`): `import keel.errors` alone, as the `keel`
command does before it knows its subcommand, loads no LangGraph.
"""

import typing

from keel._lazy import lazy_facade as _lazy_facade
from keel._version import __version__

if typing.TYPE_CHECKING:
    from keel.db.audit import AuditLog, AuditRecord
    from keel.db.ledger import Ledger
    from keel.db.persistence import Persistence
    from keel.db.runs import RunLog, RunRecord
    from keel.errors import (
        KeelError,
        ModelRequestsForbidden,
        SchemaVersionError,
        SetupError,
        StorageError,
        UserError,
    )
    from keel.graphs import build_agent
    from keel.pricing import Price, PriceTable
    from keel.state import AgentState, Outcome, RunContext, Usage
    from keel.tools import ToolSpec, tool
else:
    _lazy_facade(
        __name__,
        {
            "keel.db.audit": ("AuditLog", "AuditRecord"),
            "keel.db.ledger": ("Ledger",),
            "keel.db.persistence": ("Persistence",),
            "keel.db.runs": ("RunLog", "RunRecord"),
            "keel.errors": (
                "KeelError",
                "ModelRequestsForbidden",
                "SchemaVersionError",
                "SetupError",
                "StorageError",
                "UserError",
            ),
            "keel.graphs": ("build_agent",),
            "keel.pricing": ("Price", "PriceTable"),
            "keel.state": ("AgentState", "Outcome", "RunContext", "Usage"),
            "keel.tools": ("ToolSpec", "tool"),
        },
    )

__all__ = [
    "AgentState",
    "AuditLog",
    "AuditRecord",
    "KeelError",
    "Ledger",
    "ModelRequestsForbidden",
    "Outcome",
    "Persistence",
    "Price",
    "PriceTable",
    "RunContext",
    "RunLog",
    "RunRecord",
    "SchemaVersionError",
    "SetupError",
    "StorageError",
    "ToolSpec",
    "Usage",
    "UserError",
    "__version__",
    "build_agent",
    "tool",
]
