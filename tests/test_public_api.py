"""The public surface is small and deliberate: this test pins it (as httpx does)."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys

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
        "SetupError",
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
        "claim_flow",
        "finish_flow",
        "records_flow",
        "resolve_flow",
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
    "keel.db.audit": ["AuditKind", "AuditLog", "AuditRecord", "insert_flow"],
    "keel.db.runs": ["RunLog", "RunRecord", "error_category", "run_record"],
    "keel.app.report": [
        "Objective",
        "Report",
        "breaches",
        "build_report",
        "load_objectives",
        "render_html",
    ],
    "keel.app.health": [
        "Check",
        "Health",
        "acheck_health",
        "check_health",
        "liveness",
        "readiness",
        "semantic_check",
    ],
    "keel.observe": ["Observer", "decision_log", "trace_config", "tracing_enabled"],
    "keel.observe.observer": [
        "Derive",
        "Observer",
        "Who",
        "audited",
        "budget_records",
        "decision_log",
        "recorded",
        "review_records",
        "tool_records",
    ],
    "keel.observe.otel": ["Telemetry", "active", "use"],
    "keel.observe.tracing": [
        "sanitized",
        "sanitizing_client",
        "trace_config",
        "tracer",
        "tracing_enabled",
    ],
    "keel.models": ["BUNDLED_MODELS", "model_name_of", "resolve_model"],
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
        "plan",
        "respond",
        "valid_history",
        "verify",
    ],
    "keel.tools": [
        "KeelTool",
        "Reconciler",
        "RegisteredTool",
        "ResourceExtractor",
        "Risk",
        "ToolRegistry",
        "ToolSpec",
        "spec_of",
        "tool",
    ],
    "keel.guards": [
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
        "InputGuardPolicy",
        "LoopGuardMiddleware",
        "LoopPolicy",
        "ModelGuard",
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
        "usage_from_messages",
    ],
    "keel.evals": [
        "Case",
        "CaseRun",
        "ChaosChatModel",
        "ChaosPolicy",
        "ChaosRateLimitError",
        "ChaosServerError",
        "Feedback",
        "RubricJudge",
        "Score",
        "ScriptEntry",
        "ScriptExhausted",
        "ScriptedChatModel",
        "Suite",
        "SuiteResult",
        "afeedback_for",
        "arecord_feedback",
        "arun_suite",
        "builtin_suite",
        "call",
        "default_evaluators",
        "feedback_for",
        "forbid_model_requests",
        "load_suite",
        "match_trajectory",
        "model_requests_forbidden",
        "new_feedback",
        "record_execution",
        "record_feedback",
        "run_suite",
        "say",
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
