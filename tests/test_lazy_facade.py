"""keel's package facades (`keel`, `keel.db`, `keel.observe`, `keel.evals`) load each name on
first use (`keel._lazy`) and give what the eager imports gave: the same objects, the exported
name over a submodule of that name, a submodule by attribute, an unknown name refused.

Each case runs in a fresh interpreter: this one has loaded everything already.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest


def _fresh(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd="/",  # not the checkout: its `keel/` folder would shadow the package
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize("package", ["keel", "keel.db", "keel.observe", "keel.evals"])
def test_every_exported_name_is_its_modules_object(package: str) -> None:
    out = _fresh(
        f"""
        import importlib, sys
        package = importlib.import_module({package!r})
        before = set(sys.modules)
        for name in package.__all__:
            value = getattr(package, name)
            home = getattr(value, "__module__", None)
            if home and home.startswith("keel") and hasattr(sys.modules[home], name):
                assert getattr(sys.modules[home], name) is value, name
        assert set(package.__all__) <= set(dir(package))
        print(len(set(sys.modules) - before) > 0)
        """
    )
    assert out == "True"  # the names loaded their modules when first used, not before


def test_an_exported_name_wins_over_the_submodule_of_that_name() -> None:
    # keel.evals.capture is a module and the function keel.evals exports: importing the module
    # first (as keel eval capture does) left the module where the function was expected
    out = _fresh(
        """
        import importlib, types
        for name in ("capture", "replay", "shadow"):
            importlib.import_module(f"keel.evals.{name}")
            import keel.evals
            value = getattr(keel.evals, name)
            assert callable(value) and not isinstance(value, types.ModuleType), (name, value)
        from keel.evals import capture, replay, shadow
        print(capture.__module__, replay.__name__, shadow.__name__)
        """
    )
    assert out == "keel.evals.capture replay shadow"


def test_a_submodule_by_attribute_and_an_unknown_name() -> None:
    out = _fresh(
        """
        import keel
        print(keel.db.ledger.Ledger is keel.Ledger)
        try:
            from keel import Ledgr
        except ImportError as exc:
            print(type(exc).__name__, "Ledgr" in str(exc))
        """
    )
    assert out.splitlines() == ["True", "ImportError True"]


def test_importing_a_light_module_loads_no_langgraph() -> None:
    out = _fresh(
        """
        import sys
        import keel.errors, keel.db.url, keel.observe.switch, keel.evals.suites
        print(sorted(m for m in ("langgraph", "langchain_core", "psycopg") if m in sys.modules))
        """
    )
    assert out == "[]"
