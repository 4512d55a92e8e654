"""keel.evals: test doubles for models, and (later) scenarios, evaluators and replay.

- `ScriptedChatModel`, `say`, `call`: a deterministic chat model that plays a script.
- `ChaosChatModel`, `ChaosPolicy`: wrap a model and inject timeouts, 429s, 5xx, malformed or
  unknown tool calls and loops at set rates, with a seed.
- `forbid_model_requests`: make any real chat-model call an error (tests, offline evals).
- `injection_corpus`, `detection_rates` (`InjectionCase`, `DetectionRates`): the labelled
  prompt-injection corpus shipped with keel, and how any `InjectionDetector` does on it.
"""

from keel.evals.chaos import (
    ChaosChatModel,
    ChaosPolicy,
    ChaosRateLimitError,
    ChaosServerError,
)
from keel.evals.injection import (
    DetectionRates,
    InjectionCase,
    adetection_rates,
    detection_rates,
    injection_corpus,
)
from keel.evals.requests import forbid_model_requests, model_requests_forbidden
from keel.evals.scripted import ScriptedChatModel, ScriptEntry, ScriptExhausted, call, say

__all__ = [
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
    "model_requests_forbidden",
    "say",
]
