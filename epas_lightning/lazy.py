"""Lazy package exports (PEP 562): ``import epas_lightning`` costs nothing until a name is used.

A package lists its public names as ordinary imports inside ``if TYPE_CHECKING:`` (so type checkers and IDEs see
them) and calls :func:`lazy_exports`, which reads that block from the package's source: the first access to a name
imports the module defining it, so a command imports only what it runs (``generate`` never pays for Lightning, the
top-level ``--help`` never pays for torch).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any


def lazy_exports(package: str) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """``__all__``, ``__getattr__`` and ``__dir__`` for ``package``, whose names are the ones its ``__init__.py``
    imports under ``if TYPE_CHECKING:``. A submodule is an attribute too, imported on first use."""
    namespace = importlib.import_module(package).__dict__
    origin = type_checking_imports(Path(namespace["__file__"]), package)

    def __getattr__(name: str) -> Any:
        if name in origin:
            value = getattr(importlib.import_module(origin[name]), name)
        elif not name.startswith("__") and importlib.util.find_spec(f"{package}.{name}") is not None:
            value = importlib.import_module(f"{package}.{name}")  # `epas_lightning.checkpoint`, as before
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value  # later lookups are plain attribute reads
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *origin})

    return sorted(origin), __getattr__, __dir__


def type_checking_imports(init_file: Path, package: str) -> dict[str, str]:
    """Each name imported under ``if TYPE_CHECKING:`` in ``init_file`` -> the absolute module it comes from."""
    origin: dict[str, str] = {}
    for node in ast.parse(init_file.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for statement in node.body:
                if isinstance(statement, ast.ImportFrom):
                    module = importlib.util.resolve_name("." * statement.level + (statement.module or ""), package)
                    origin |= {alias.asname or alias.name: module for alias in statement.names}
    return origin
