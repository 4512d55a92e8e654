"""A package facade whose names load on first use (PEP 562).

Importing a light module of the package (`keel.errors`, say) then loads no LangGraph, LangChain
or database driver, as an eager facade's imports did:

    if typing.TYPE_CHECKING:  # what type checkers and readers see
        from keel.db.ledger import Ledger
    else:
        __getattr__, __dir__ = _lazy_facade(__name__, {"keel.db.ledger": ("Ledger",)})

`from package import Ledger` and `package.Ledger` import `keel.db.ledger` then, once; a
submodule's name (`package.ledger`) imports that submodule, as an eager facade had loaded it.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["lazy_facade"]


def lazy_facade(
    package: str, exports: Mapping[str, Sequence[str]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module `__getattr__` and `__dir__` of `package`, exporting `{module: names}`."""
    home = {name: module for module, names in exports.items() for name in names}
    namespace = sys.modules[package].__dict__  # the package, being initialized

    def __getattr__(name: str) -> Any:
        module = home.get(name)
        if module is not None:
            value = getattr(importlib.import_module(module), name)
        elif not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}"):
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value  # loaded once: later lookups do not come here
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *home})

    return __getattr__, __dir__
