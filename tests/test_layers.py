"""keel's floors, as a test: imports go one way, and nothing works around a cycle.

core ← db ← tools ← guards / memory ← nodes ← observe ← graphs ← app; `keel.evals` may import
anything and nothing imports it. Every import counts: at module level, inside a function, under
`TYPE_CHECKING`. The package root (`keel/__init__.py`) is the public facade: it re-exports
from every floor, so importing a name from it counts as importing the top floor.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {
    "keel": ROOT / "keel",
    "keel.graphs": ROOT / "graphs",
    "keel.nodes": ROOT / "nodes",
    "keel.tools": ROOT / "tools",
    "keel.memory": ROOT / "memory",
    "keel.guards": ROOT / "guards",
    "keel.evals": ROOT / "evals",
}

# Lower number = lower floor. A module may import its own floor and any floor below it.
FLOORS: dict[str, int] = {
    "keel": 0,  # core vocabulary: errors, state, outcome, approvals, identity, pricing, models
    "keel.db": 1,
    "keel.tools": 2,
    "keel.guards": 3,
    "keel.memory": 3,
    "keel.nodes": 4,
    "keel.observe": 5,
    "keel.graphs": 6,
    "keel.app": 7,
    "keel.evals": 8,
}
FACADE = 7  # `from keel import X` (a name, not a submodule) imports the facade: everything


def floor_of(module: str) -> str:
    """The floor a module belongs to: its longest prefix among `FLOORS`."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in FLOORS:
            return prefix
    raise AssertionError(f"{module} is on no floor")


def modules() -> Iterator[tuple[str, Path]]:
    for package, folder in FOLDERS.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("").parts
            if package == "keel" and rel and rel[0] in {"graphs", "nodes"}:
                continue
            name = ".".join([package, *(p for p in rel if p != "__init__")])
            yield name, path


MODULES = dict(modules())
MODULE_NAMES = set(MODULES)


def imports(path: Path) -> Iterator[tuple[int, str, bool]]:
    """(line, imported module, is it the package root's facade) for every keel import.

    `from keel.memory import base` imports the module `keel.memory.base`; `from keel import
    RunContext` imports the facade.
    """
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "keel" or alias.name.startswith("keel."):
                    yield node.lineno, alias.name, alias.name == "keel"
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module != "keel" and not node.module.startswith("keel."):
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                if sub in MODULE_NAMES:
                    yield node.lineno, sub, False
                else:
                    yield node.lineno, node.module, node.module == "keel"


def test_every_module_is_on_a_floor() -> None:
    assert len(MODULES) > 50
    for name in MODULES:
        floor_of(name)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down(module: str) -> None:
    if module == "keel":
        return  # the facade re-exports every floor
    mine = FLOORS[floor_of(module)]
    upward = []
    for line, target, facade in imports(MODULES[module]):
        theirs = FACADE if facade else FLOORS[floor_of(target)]
        if floor_of(target) == "keel.evals" and floor_of(module) != "keel.evals":
            upward.append(f"line {line}: {target} (nothing imports keel.evals)")
        elif theirs > mine:
            upward.append(f"line {line}: {target}")
    assert not upward, f"{module} ({floor_of(module)}) imports upward: {upward}"


def test_no_import_works_around_a_cycle() -> None:
    hint = re.compile(r"import.*(cycle|circular)|(cycle|circular).*import", re.IGNORECASE)
    found = [
        f"{name}:{n}"
        for name, path in MODULES.items()
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if "#" in line and hint.search(line.split("#", 1)[1])
    ]
    assert not found, f"comments about an import cycle: {found}"


def test_no_cycles_between_modules() -> None:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for _, target, facade in imports(path):
            if facade or name == "keel":
                continue
            # a module's import of `keel.x.y` loads `keel.x` too, but that is the package's
            # own business: edges go to the module named
            if target in graph and target != name:
                graph[name].add(target)
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert not cycles, f"import cycles: {cycles}"


def test_the_rule_catches_an_upward_import(tmp_path: Path) -> None:
    # The checker itself: a core module that imports a guard, inside a function, is caught.
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from keel.guards.gate import Gate\n    from keel import x\n")
    found = list(imports(bad))
    assert found == [(2, "keel.guards.gate", False), (3, "keel", True)]
    assert FLOORS[floor_of("keel.guards.gate")] > FLOORS[floor_of("keel.state")]


def test_the_production_server_path_carries_no_demo_or_test_double() -> None:
    # Run from / so the checkout is not on sys.path: what the installed server imports.
    code = (
        "import sys, keel.app.server;"
        "print(sorted(m for m in sys.modules"
        " if m.startswith('keel.evals') or m == 'keel.app.demo'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
