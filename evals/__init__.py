"""keel.evals: scenario suites, evaluators and reports, and the test doubles they run on.

Suites and runs:
- `load_suite`, `Suite`, `Case`: scenario suites as YAML files (input, identity, model, expected
  outcome and tool trajectory, rubric, budgets); `builtin_suite("adversarial" | "chaos" | "demo")`.
- `arun_suite` / `run_suite`: run a suite on a graph factory (`module:function`), `repeat` times,
  `concurrency` at once; a `SuiteResult` of `CaseRun`s with their `Score`s.
- Evaluators: outcome, trajectory (agentevals' modes), tool success, budgets, unauthorized
  executions, PII leaks, valid endings, and `RubricJudge` (openevals' LLM-as-judge).
- `record_execution`: tools of an eval graph record what really ran.
- `arun_experiment`: a suite as a LangSmith experiment (`keel eval --langsmith`; needs a key).
- Replay: `areplay` / `replay` re-run a stored thread (SQLite or PostgreSQL) from any checkpoint
  on a new graph version, with its recorded responses (`Cassette`) or live, and diff trajectory,
  outcome and cost (`ReplayDiff`); `aload_thread` reads a stored thread.
- `acapture` / `capture`: a stored (failed) thread becomes a regression case in a suite file.
- `ashadow` / `shadow`: a candidate version beside the current one on a suite, side-effecting
  tools stubbed (`ShadowResult`); `ashadow_threads` does it on stored threads.
- `record_feedback` / `feedback_for`: a person's score, comment or correction on a run, kept in
  the ledger beside the run records (`keel eval feedback RUN`), shown by `keel report` and
  forwarded to LangSmith with a key (`forward_feedback`).

Test doubles:
- `ScriptedChatModel`, `say`, `call`: a deterministic chat model that plays a script and, by
  default, refuses a tool-call history a provider refuses (`strict_history`).
- `ChaosChatModel`, `ChaosPolicy`: wrap a model and inject timeouts, 429s, 5xx, malformed or
  unknown tool calls and loops at set rates, with a seed (refusing such a history too).
- `forbid_model_requests`: make any real chat-model call an error (tests, offline evals).
- `injection_corpus`, `detection_rates` (`InjectionCase`, `DetectionRates`): the labelled
  prompt-injection corpus shipped with keel, and how any `InjectionDetector` does on it.

Each name loads when first used (`keel._lazy`), so that `keel eval --help` loads no runner.
"""

import typing

from keel._lazy import lazy_facade as _lazy_facade

if typing.TYPE_CHECKING:
    from keel.evals.builtin import builtin_suite
    from keel.evals.capture import acapture, capture
    from keel.evals.cassette import Cassette
    from keel.evals.chaos import (
        ChaosChatModel,
        ChaosPolicy,
        ChaosRateLimitError,
        ChaosServerError,
    )
    from keel.evals.evaluators import RubricJudge, default_evaluators, match_trajectory
    from keel.evals.executions import record_execution
    from keel.evals.experiment import arun_experiment
    from keel.evals.feedback import (
        Feedback,
        afeedback_for,
        arecord_feedback,
        feedback_for,
        forward_feedback,
        new_feedback,
        record_feedback,
    )
    from keel.evals.injection import (
        DetectionRates,
        InjectionCase,
        adetection_rates,
        detection_rates,
        injection_corpus,
    )
    from keel.evals.replay import ReplayDiff, areplay, replay
    from keel.evals.requests import forbid_model_requests, model_requests_forbidden
    from keel.evals.results import CaseRun, Score, SuiteResult
    from keel.evals.runner import arun_suite, run_suite
    from keel.evals.scripted import ScriptedChatModel, ScriptEntry, ScriptExhausted, call, say
    from keel.evals.shadow import ShadowResult, ashadow, ashadow_threads, shadow
    from keel.evals.stored import StoredThread, aload_thread
    from keel.evals.suite import Case, Suite, load_suite
else:
    _lazy_facade(
        __name__,
        {
            "keel.evals.builtin": ("builtin_suite",),
            "keel.evals.capture": ("acapture", "capture"),
            "keel.evals.cassette": ("Cassette",),
            "keel.evals.chaos": (
                "ChaosChatModel",
                "ChaosPolicy",
                "ChaosRateLimitError",
                "ChaosServerError",
            ),
            "keel.evals.evaluators": ("RubricJudge", "default_evaluators", "match_trajectory"),
            "keel.evals.executions": ("record_execution",),
            "keel.evals.experiment": ("arun_experiment",),
            "keel.evals.feedback": (
                "Feedback",
                "afeedback_for",
                "arecord_feedback",
                "feedback_for",
                "forward_feedback",
                "new_feedback",
                "record_feedback",
            ),
            "keel.evals.injection": (
                "DetectionRates",
                "InjectionCase",
                "adetection_rates",
                "detection_rates",
                "injection_corpus",
            ),
            "keel.evals.replay": ("ReplayDiff", "areplay", "replay"),
            "keel.evals.requests": ("forbid_model_requests", "model_requests_forbidden"),
            "keel.evals.results": ("CaseRun", "Score", "SuiteResult"),
            "keel.evals.runner": ("arun_suite", "run_suite"),
            "keel.evals.scripted": (
                "ScriptedChatModel",
                "ScriptEntry",
                "ScriptExhausted",
                "call",
                "say",
            ),
            "keel.evals.shadow": ("ShadowResult", "ashadow", "ashadow_threads", "shadow"),
            "keel.evals.stored": ("StoredThread", "aload_thread"),
            "keel.evals.suite": ("Case", "Suite", "load_suite"),
        },
    )

__all__ = [
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
]
