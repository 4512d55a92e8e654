"""The suites keel ships, as YAML files in this folder (`keel.evals.builtin` loads them)."""

__all__ = ["BUILTIN_SUITES"]

BUILTIN_SUITES = ("adversarial", "chaos", "demo")
"""The suites shipped in `keel/evals/suites/`."""
