"""keel.nodes: node factories to use in `build_agent` or in your own `StateGraph`.

Each factory returns a LangGraph node that runs under both `invoke` and `ainvoke`:

- `plan`: a structured plan with step status; a new plan after a failed step.
- `call_model`: one model turn, with token and dollar accounting, checks and retries inside.
- `execute_tools`: the tool-execution contract (one `ToolMessage` per call, always).
- `human_review`: `interrupt()` for calls needing approval; typed resume.
- `verify`: rule checks and an optional model judge of the final answer.
- `respond`: a partial answer and the reason when a run is cut short.
"""

from keel.nodes.call_model import BeforeModel, call_model
from keel.nodes.execute_tools import ToolStatus, execute_tools
from keel.nodes.history import valid_history
from keel.nodes.human_review import ReviewRequest, ReviewResponse, human_review
from keel.nodes.plan import Plan, plan
from keel.nodes.respond import respond
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
    "plan",
    "respond",
    "valid_history",
    "verify",
]
