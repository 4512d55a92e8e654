"""keel.nodes: node factories to use in `build_agent` or in your own `StateGraph`.

Each factory returns a LangGraph node that runs under both `invoke` and `ainvoke`:

- `plan`: a structured plan with step status; a new plan after a failed step.
- `input_guard`: the user's new messages checked (size, prompt injection) before the model;
  `route_after_input_guard` sends a blocked input to `respond`.
- `call_model`: one model turn, with token and dollar accounting, checks and retries inside.
- `tool_gate`: loop guard, run budget and permission gate over the model's tool calls; routed
  by `route_after_gate` (allow → `execute_tools`, ask → `human_review`, deny → answered).
- `execute_tools`: the tool-execution contract (one `ToolMessage` per call, always).
- `human_review`: `interrupt()` for calls needing approval; typed resume.
- `verify`: rule checks and an optional model judge of the final answer.
- `respond`: a partial answer and the reason when a run is cut short.
- `output_guard`: PII and secrets redacted (or the answer withheld) before the end.

Checks that only admit or refuse inside a call (budget reservation, rate limit, breaker, the
idempotency ledger) run inside `call_model` and `execute_tools`.
"""

from keel.history import valid_history
from keel.nodes.call_model import BeforeModel, call_model
from keel.nodes.content_guards import input_guard, output_guard, route_after_input_guard
from keel.nodes.execute_tools import ToolStatus, execute_tools
from keel.nodes.human_review import ReviewRequest, ReviewResponse, human_review
from keel.nodes.plan import Plan, plan
from keel.nodes.respond import respond
from keel.nodes.tool_gate import route_after_gate, tool_gate
from keel.nodes.verify import Check, JudgeVerdict, verify

__all__ = [
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
]
