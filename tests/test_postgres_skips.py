"""README, "Two commands": without `KEEL_TEST_POSTGRES_URL` the PostgreSQL tests skip with a
message naming the variable; in CI (`CI=true`) a missing PostgreSQL fails the run.

A PostgreSQL test of the suite is run in a pytest of its own with the variable unset, outside
CI and in it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
A_POSTGRES_TEST = (
    "tests/test_attack_storage_down.py::test_the_ledger_keeps_the_urls_options_beside_its_own"
)


def _pytest(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("CI", "KEEL_TEST_POSTGRES_URL")}
    base.pop("PYTEST_XDIST_WORKER", None)
    return subprocess.run(
        [str(Path(sys.executable).with_name("pytest")), "-q", "-n", "0", "-rsE", A_POSTGRES_TEST],
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_without_postgresql_its_tests_skip_naming_the_variable_and_fail_in_ci() -> None:
    reason = "PostgreSQL tests need KEEL_TEST_POSTGRES_URL"
    skipped = _pytest({})
    assert skipped.returncode == 0, skipped.stdout[-2000:]
    assert "1 skipped" in skipped.stdout and reason in skipped.stdout
    failed = _pytest({"CI": "true"})
    assert failed.returncode == 1, failed.stdout[-2000:]
    assert "1 error" in failed.stdout and reason in failed.stdout
