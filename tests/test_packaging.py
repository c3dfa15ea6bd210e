"""The package as a wheel installs it: what it imports is declared in pyproject.toml, with the range we test."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from fnmatch import fnmatch
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "epas_lightning"


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _name(requirement: str) -> str:
    """The normalized distribution name of a requirement string (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group()).lower()


def _imported_modules() -> dict[str, str]:
    """Every third-party top-level module the package imports, with one file that imports it."""
    modules: dict[str, str] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "epas_lightning":
                    modules.setdefault(top, str(path.relative_to(REPO)))
    return modules


def test_every_module_the_package_imports_is_declared():
    """A module imported from a dependency's dependency (yaml through jsonargparse, fastapi and starlette through
    litserve) installs today, in a version nothing caps, and goes missing the day that dependency drops it."""
    project = _pyproject()["project"]
    declared = {_name(r) for r in project["dependencies"]}
    declared |= {_name(r) for extra in project["optional-dependencies"].values() for r in extra}
    installed = importlib.metadata.packages_distributions()  # a module not installed here: its own name
    undeclared = [
        f"{module} ({', '.join(installed.get(module, [module]))}, imported in {where})"
        for module, where in _imported_modules().items()
        if not {_name(d) for d in installed.get(module, [module])} & declared
    ]
    assert not undeclared, f"declare in pyproject.toml: {undeclared}"


def test_every_requirement_has_an_upper_bound_and_the_license_builds():
    """The build backend too: a setuptools release past the tested one decides whether ``pip install`` builds at all
    (setuptools deprecates the ``license = {text = ...}`` table, the SPDX string replaces it from 77 on)."""
    pyproject = _pyproject()
    project = pyproject["project"]
    requirements = [*pyproject["build-system"]["requires"], *project["dependencies"]]
    requirements += [r for extra in project["optional-dependencies"].values() for r in extra]
    uncapped = [r for r in requirements if not re.search(r"(<|==)", r.split(";")[0])]
    assert not uncapped, f"cap at the newest release tested: {uncapped}"
    assert isinstance(project["license"], str), "an SPDX expression: license = 'Apache-2.0'"
    assert all((REPO / path).is_file() for path in project["license-files"])


def test_the_wheel_carries_every_file_of_the_package():
    """The tests run on the source tree, where every file is there; a wheel holds the packages setuptools finds (a
    folder of modules without ``__init__.py`` is left out) and, beside modules, only what package-data names."""
    globs = _pyproject()["tool"]["setuptools"]["package-data"]["epas_lightning"]
    files = [p.relative_to(PACKAGE) for p in PACKAGE.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    unshipped = [str(f) for f in files if f.suffix != ".py" and not any(fnmatch(str(f), glob) for glob in globs)]
    assert not unshipped, f"add to [tool.setuptools.package-data]: {unshipped}"
    no_init = sorted(
        {str(f.parent) for f in files if f.suffix == ".py" and not (PACKAGE / f.parent / "__init__.py").is_file()}
    )
    assert not no_init, f"not in the wheel without an __init__.py: {no_init}"


def test_ci_installs_versions_inside_the_declared_ranges_with_the_readme_command():
    """CI's exact versions (.ci/constraints.txt, .ci/constraints-oldest.txt) must be ones pyproject.toml allows, or
    the pip install of .ci/run fails to resolve (or tests what no user gets); and .ci/run runs the README's command."""
    from packaging.requirements import Requirement

    project = _pyproject()["project"]
    requirements = [
        *project["dependencies"],
        *(r for extra in project["optional-dependencies"].values() for r in extra),
    ]
    outside = []
    for constraints in (".ci/constraints.txt", ".ci/constraints-oldest.txt"):
        pins = dict(
            (_name(line), line.split("==")[1].strip())
            for line in (REPO / constraints).read_text().splitlines()
            if "==" in line and not line.startswith("#")
        )
        for requirement in map(Requirement, requirements):
            pinned = pins.get(_name(requirement.name))
            if pinned is not None and not requirement.specifier.contains(pinned, prereleases=True):
                outside.append(f"{constraints}: {requirement.name}=={pinned} outside {requirement}")
    assert not outside
    readme_commands = re.findall(r"^python3 -m venv .*$", (REPO / "README.md").read_text(), re.MULTILINE)
    ci_command = next(
        line for line in (REPO / ".ci/run").read_text().splitlines() if line.startswith("python3 -m venv")
    )
    assert readme_commands and ci_command.startswith(readme_commands[-1] + " ||"), (readme_commands, ci_command)
