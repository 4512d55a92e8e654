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
        "KeelError",
        "Ledger",
        "ModelRequestsForbidden",
        "Outcome",
        "Persistence",
        "Price",
        "PriceTable",
        "RunContext",
        "SetupError",
        "ToolSpec",
        "Usage",
        "UserError",
        "__version__",
        "build_agent",
        "tool",
    ],
    "keel.checkpoint": ["AsyncPooledPostgresSaver", "PruneReport"],
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
        "BudgetVerdict",
        "CircuitBreaker",
        "CircuitOpen",
        "ContentFinding",
        "ContentVerdict",
        "Gate",
        "GateDecision",
        "InputGuardPolicy",
        "LoopPolicy",
        "OutputGuardPolicy",
        "PeriodBudget",
        "PermissionMatrix",
        "PiiMatch",
        "Policy",
        "RateLimit",
        "RateLimited",
        "RateLimiter",
        "Rule",
        "SpendMeter",
        "approval_gate",
        "check_budget",
        "check_input",
        "check_output",
        "detect_loop",
        "find_pii",
        "redact",
        "sanitize",
    ],
    "keel.evals": [
        "ChaosChatModel",
        "ChaosPolicy",
        "ChaosRateLimitError",
        "ChaosServerError",
        "ScriptEntry",
        "ScriptExhausted",
        "ScriptedChatModel",
        "call",
        "forbid_model_requests",
        "model_requests_forbidden",
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
