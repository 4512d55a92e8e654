"""keel.evals: test doubles for models, and (later) scenarios, evaluators and replay.

- `ScriptedChatModel`, `say`, `call`: a deterministic chat model that plays a script.
- `forbid_model_requests`: make any real chat-model call an error (tests, offline evals).
"""

from keel.evals.requests import forbid_model_requests, model_requests_forbidden
from keel.evals.scripted import ScriptedChatModel, ScriptEntry, ScriptExhausted, call, say

__all__ = [
    "ScriptEntry",
    "ScriptExhausted",
    "ScriptedChatModel",
    "call",
    "forbid_model_requests",
    "model_requests_forbidden",
    "say",
]
