"""A package facade whose names load on first use (PEP 562).

Importing a light module of the package (`keel.errors`, say) then loads no LangGraph, LangChain
or database driver, as an eager facade's imports did:

    if typing.TYPE_CHECKING:  # what type checkers and readers see
        from keel.db.ledger import Ledger
    else:
        _lazy_facade(__name__, {"keel.db.ledger": ("Ledger",)})

`from package import Ledger` and `package.Ledger` import `keel.db.ledger` then, once. A
submodule's name (`package.ledger`) imports that submodule, as an eager facade had loaded it;
where an exported name is also a submodule's (`keel.evals.capture`, the function, and the
module of that name), the export wins, as it did after the eager facade's import.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["lazy_facade"]


def lazy_facade(package: str, exports: Mapping[str, Sequence[str]]) -> None:
    """Make the package `package` (being initialized) export `{module: names}` lazily."""
    home = {name: module for module, names in exports.items() for name in names}

    class Facade(types.ModuleType):
        def __getattr__(self, name: str) -> Any:
            module = home.get(name)
            if module is not None:
                value = getattr(importlib.import_module(module), name)
            elif not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}"):
                value = importlib.import_module(f"{package}.{name}")
            else:
                raise AttributeError(f"module {package!r} has no attribute {name!r}")
            vars(self)[name] = value  # loaded once: later lookups do not come here
            return value

        def __setattr__(self, name: str, value: Any) -> None:
            if name in home and isinstance(value, types.ModuleType):
                return  # the import system binding the submodule `name`: the export wins
            super().__setattr__(name, value)

        def __dir__(self) -> list[str]:
            return sorted({*vars(self), *home})

    sys.modules[package].__class__ = Facade
