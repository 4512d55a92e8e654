"""The public surface is small and deliberate: this test pins it (as httpx does)."""

from __future__ import annotations
import __future__

import ast
import importlib
import importlib.util
import pickle
import subprocess
import sys
import types
from pathlib import Path

import pytest

PUBLIC = {
    "keel": [
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
    ],
    "keel.db.checkpoint": [
        "AsyncPooledPostgresSaver",
        "CheckpointPolicy",
        "CheckpointSizeWarning",
        "CheckpointTooLarge",
        "PruneReport",
        "UnserializableState",
    ],
    "keel.db.idempotency": [
        "CallRecord",
        "CallState",
        "Claim",
        "ClaimGate",
        "claim_flow",
        "finish_flow",
        "records_flow",
        "resolve_flow",
        "untold_flow",
    ],
    "keel.db": [
        "AuditLog",
        "AuditRecord",
        "Flow",
        "Ledger",
        "Persistence",
        "PruneReport",
        "RunLog",
        "RunRecord",
        "ThreadSummary",
        "default_db_url",
    ],
    "keel.db.migrations": [
        "LATEST",
        "MIGRATIONS",
        "Migration",
        "migrate_flow",
        "statements",
        "version_flow",
    ],
    "keel.db.tables": [
        "ADMISSION_LEASES",
        "ADMISSION_SCOPES",
        "AUDIT",
        "BREAKERS",
        "Column",
        "FEEDBACK",
        "Index",
        "MIGRATIONS_TABLE",
        "RATE_BUCKETS",
        "RESERVATIONS",
        "RUNS",
        "SPEND",
        "STANDING_APPROVALS",
        "TABLES",
        "THREAD_LEASES",
        "TOOL_CALLS",
        "Table",
        "storable",
        "where_clause",
    ],
    "keel.errors": [
        "CheckpointSizeWarning",
        "CheckpointTooLarge",
        "CircuitOpen",
        "KeelError",
        "ModelBehaviorError",
        "ModelRequestsForbidden",
        "RateLimited",
        "SchemaVersionError",
        "ScriptExhausted",
        "SetupError",
        "StorageError",
        "UnserializableState",
        "UserError",
    ],
    "keel.db.audit": ["AuditKind", "AuditLog", "AuditRecord", "insert_flow"],
    "keel.versions": ["AgentVersion", "prompt_hash"],
    "keel.app.canary": ["bucket", "serves_candidate"],
    "keel.db.runs": [
        "Recorded",
        "RunLog",
        "RunRecord",
        "error_category",
        "orphans_note",
        "record_flow",
        "recorded_flow",
        "run_record",
        "scores_flow",
        "thread_users_flow",
        "unsaved_flow",
        "upsert_flow",
    ],
    "keel.app.report": [
        "Objective",
        "Report",
        "VersionStats",
        "breaches",
        "build_report",
        "by_version",
        "load_objectives",
        "percentile",
        "render_html",
        "render_text",
        "render_versions",
    ],
    "keel.app.health": [
        "Check",
        "Health",
        "acheck_health",
        "check_health",
        "liveness",
        "readiness",
        "semantic_check",
        "served_readiness",
    ],
    "keel.observe": ["Observer", "decision_log", "trace_config", "tracing_enabled"],
    "keel.observe.observer": [
        "Derive",
        "Observer",
        "Route",
        "UNWRITTEN_MAX",
        "Who",
        "audited",
        "budget_records",
        "content_records",
        "decision_log",
        "paused",
        "recorded",
        "review_records",
        "tool_records",
        "with_runtime",
    ],
    "keel.observe.otel": ["Telemetry", "active", "use"],
    "keel.observe.tracing": [
        "NO_KEY_WARNING",
        "graph_config",
        "sanitized",
        "sanitizing_client",
        "trace_config",
        "tracer",
        "tracing_enabled",
        "tracing_without_key",
    ],
    "keel.models": ["BUNDLED_MODELS", "model_name_of", "price_name_of", "resolve_model"],
    "keel.local_model": [
        "FINAL_ANSWER",
        "LocalChatModel",
        "last_chunk",
        "load_llama",
        "local_chat_model",
    ],
    "keel.model_files": [
        "DEFAULT_LOCAL_MODEL",
        "INSTALL_HINT",
        "LOCAL_MODELS",
        "LocalModelFile",
        "assemble",
        "is_assembled",
        "local_model_file",
        "models_dir",
        "sha256_of",
    ],
    "keel.graphs": [
        "FINISH",
        "Route",
        "build_agent",
        "build_supervisor",
        "route_after_model",
        "route_after_review",
        "route_after_tools",
    ],
    "keel.nodes": [
        "BeforeModel",
        "Check",
        "JudgeVerdict",
        "Plan",
        "ReviewRequest",
        "ReviewResponse",
        "ToolStatus",
        "call_model",
        "execute_tools",
        "human_review",
        "input_guard",
        "output_guard",
        "plan",
        "respond",
        "route_after_gate",
        "route_after_input_guard",
        "tool_gate",
        "valid_history",
        "verify",
    ],
    "keel.tools": [
        "KeelTool",
        "Reconciler",
        "RegisteredTool",
        "ResourceExtractor",
        "Risk",
        "StubAnswer",
        "ToolRegistry",
        "ToolSpec",
        "ToolStub",
        "spec_of",
        "stubbing",
        "tool",
    ],
    "keel.guards": [
        "Admission",
        "AdmissionPolicy",
        "AgentGuards",
        "BreakerPolicy",
        "BreakerTransition",
        "Budget",
        "BudgetMiddleware",
        "BudgetVerdict",
        "CircuitBreaker",
        "CircuitBreakerMiddleware",
        "CircuitOpen",
        "ContentFinding",
        "ContentVerdict",
        "Gate",
        "GateDecision",
        "HeuristicDetector",
        "InjectionDetector",
        "InjectionVerdict",
        "InputGuardMiddleware",
        "InputGuardPolicy",
        "Lease",
        "LoopGuardMiddleware",
        "LoopPolicy",
        "ModelDetector",
        "ModelGuard",
        "OutputGuardMiddleware",
        "GuardedModel",
        "ModelAnswer",
        "ModelCallGuards",
        "ModelTimeoutPolicy",
        "OutputGuardPolicy",
        "PeriodBudget",
        "PermissionMatrix",
        "PermissionMiddleware",
        "PiiMatch",
        "Policy",
        "RateLimit",
        "RateLimitMiddleware",
        "RateLimited",
        "RateLimiter",
        "Rule",
        "SpendMeter",
        "ToolGuard",
        "WaitingRoom",
        "acheck_input",
        "after_failure",
        "approval_gate",
        "check_budget",
        "check_input",
        "check_output",
        "detect_loop",
        "find_pii",
        "outcome_of",
        "redact",
        "sanitize",
        "screen_answer",
        "screen_inputs",
        "screen_tool_result",
        "usage_from_messages",
    ],
    "keel.evals": [
        "Case",
        "CaseRun",
        "ChaosChatModel",
        "ChaosPolicy",
        "ChaosRateLimitError",
        "ChaosServerError",
        "DetectionRates",
        "InjectionCase",
        "ScriptEntry",
        "ScriptExhausted",
        "ScriptedChatModel",
        "adetection_rates",
        "call",
        "detection_rates",
        "forbid_model_requests",
        "injection_corpus",
        "Feedback",
        "RubricJudge",
        "Score",
        "Suite",
        "SuiteResult",
        "afeedback_for",
        "arecord_feedback",
        "arun_experiment",
        "arun_suite",
        "builtin_suite",
        "default_evaluators",
        "feedback_for",
        "forward_feedback",
        "load_suite",
        "match_trajectory",
        "model_requests_forbidden",
        "new_feedback",
        "record_execution",
        "record_feedback",
        "run_suite",
        "say",
        "Cassette",
        "ReplayDiff",
        "ShadowResult",
        "StoredThread",
        "acapture",
        "aload_thread",
        "areplay",
        "ashadow",
        "ashadow_threads",
        "capture",
        "replay",
        "shadow",
    ],
    "keel.memory": [
        "ChromaEmbeddings",
        "ChromaStore",
        "Lesson",
        "MiniLMEmbeddings",
        "WorkingMemory",
        "default_index",
        "extract_lesson",
        "memory_tools",
        "recall",
        "reflect",
        "user_namespace",
    ],
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_exported_members(module: str) -> None:
    mod = importlib.import_module(module)
    assert sorted(mod.__all__) == sorted(PUBLIC[module])
    for name in mod.__all__:
        assert hasattr(mod, name), f"{module}.{name} is in __all__ but missing"


def leaks(mod: types.ModuleType) -> list[str]:
    """Public names `mod` offers outside its `__all__` (as httpx's test_exported_members).

    A package offers every public name in its namespace; a module, the public functions,
    classes and objects it defines (its imports are its own business).
    """
    package = hasattr(mod, "__path__")
    offered = {
        name
        for name, value in vars(mod).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType | __future__._Feature)
        and (package or getattr(value, "__module__", None) == mod.__name__)
    }
    return sorted(offered - set(mod.__all__))


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_all_is_what_the_module_really_exports(module: str) -> None:
    leaked = leaks(importlib.import_module(module))
    assert not leaked, f"{module} offers {leaked} outside __all__: add them, or make them _private"


def test_the_leak_check_catches_a_leak() -> None:
    leaky = types.ModuleType("leaky")
    exec("import json\n__all__ = ['kept']\ndef kept(): ...\ndef helper(): ...", vars(leaky))
    assert leaks(leaky) == ["helper"]
    leaky.__path__ = []  # as a package, everything public in its namespace counts
    assert leaks(leaky) == ["helper"]


# Stand-ins for a provider's errors (the chaos model raises them as a provider would): not keel's.
# stand-ins for a provider's errors, and pytest's failure of an eval case (an AssertionError)
NOT_KEEL_ERRORS = {
    "keel.evals.chaos.ChaosRateLimitError",
    "keel.evals.chaos.ChaosServerError",
    "keel.evals.testing.CaseFailed",
}


def _error_classes() -> set[str]:
    """`module.Class` of every public exception or warning class keel's source defines."""
    import keel.errors

    root = Path(__file__).resolve().parents[1]
    folders = {"keel": "keel", **{f"keel.{f}": f for f in ("graphs", "nodes", "tools")}}
    folders |= {f"keel.{f}": f for f in ("memory", "guards", "evals")}
    errorish = {"Exception", "BaseException", "Warning", *keel.errors.__all__}
    found = set()
    for package, folder in folders.items():
        for path in (root / folder).rglob("*.py"):
            parts = path.relative_to(root / folder).with_suffix("").parts
            module = ".".join([package, *(p for p in parts if p != "__init__")])
            for node in ast.parse(path.read_text()).body:
                if not isinstance(node, ast.ClassDef) or node.name.startswith("_"):
                    continue
                bases = {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases}
                if bases & errorish or any(b.endswith(("Error", "Warning")) for b in bases):
                    found.add(f"{module}.{node.name}")
    return found


def test_every_public_error_is_in_the_one_tree() -> None:
    import keel.errors

    found = _error_classes() - NOT_KEEL_ERRORS
    assert found == {f"keel.errors.{n}" for n in keel.errors.__all__}
    tree = keel.errors.__doc__ or ""
    assert [n for n in keel.errors.__all__ if n not in tree] == []  # each is drawn in the tree


def test_user_mistakes_are_user_errors_and_errors_pickle() -> None:
    from keel import RunContext
    from keel.errors import (
        CheckpointTooLarge,
        CircuitOpen,
        ModelBehaviorError,
        RateLimited,
        SchemaVersionError,
        StorageError,
        UnserializableState,
        UserError,
    )

    with pytest.raises(UserError, match=r"RunContext\.user_id must be a non-empty string"):
        RunContext(user_id="")
    assert issubclass(UnserializableState, UserError) and issubclass(UnserializableState, TypeError)
    samples = [
        UnserializableState("messages[0]", "x.Y"),
        CheckpointTooLarge("t1", 2_000, 1_000),
        RateLimited("rpm:model:m", 10, 1.5, waited=0.5),
        CircuitOpen("model:m", 100.0, retry_after=2.0),
        SchemaVersionError(found=3, known=2),
        ModelBehaviorError("scripted", "returned str, not an AIMessage"),
        StorageError("the ledger failed", fix="Resume the run.", in_doubt=True),
    ]
    for error in samples:
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is type(error) and str(again) == str(error)
    stored = pickle.loads(pickle.dumps(samples[-1]))
    assert isinstance(stored, StorageError) and stored.in_doubt
    assert (stored.reason, stored.fix) == ("the ledger failed", "Resume the run.")


def test_folders_are_subpackages_of_keel_only() -> None:
    # Nothing named tools, memory, graphs… lands at top level after install. Run in a clean
    # interpreter from / so the repository root is not on sys.path.
    names = ["graphs", "nodes", "tools", "memory", "guards", "evals"]
    code = (
        "import importlib.util, json, keel.graphs;"
        f"print(json.dumps([importlib.util.find_spec(n) is not None for n in {names!r}]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[false, false, false, false, false, false]"
    for name in names:
        spec = importlib.util.find_spec(f"keel.{name}")
        assert spec is not None and spec.origin is not None
        assert spec.origin.replace("\\", "/").endswith(f"keel/{name}/__init__.py")
