"""Lazy package exports (PEP 562): ``import epas_lightning`` costs nothing until a name is used.

A package lists which module defines each public name; the first access imports that module, so a command imports
only what it runs (``generate`` never pays for Lightning, the top-level ``--help`` never pays for torch).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import Any


def lazy_exports(
    package: str, exports: dict[str, list[str]]
) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """``__all__``, ``__getattr__`` and ``__dir__`` for ``package``, whose ``exports`` map a module (relative to the
    package, e.g. ``".model"``) to the names it defines. A submodule is an attribute too, imported on first use."""
    origin = {name: module for module, names in exports.items() for name in names}
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str) -> Any:
        if name in origin:
            value = getattr(importlib.import_module(origin[name], package), name)
        elif not name.startswith("__") and importlib.util.find_spec(f"{package}.{name}") is not None:
            value = importlib.import_module(f"{package}.{name}")  # `epas_lightning.checkpoint`, as before
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value  # later lookups are plain attribute reads
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *origin})

    return sorted(origin), __getattr__, __dir__
