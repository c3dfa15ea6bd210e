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


def test_what_lightning_offers_only_when_installed_and_we_rely_on_is_a_core_dependency():
    """Lightning gates some features on an optional package (``_RICH_AVAILABLE``): where the package reads such a flag,
    the feature is part of the product, so the package must come with a plain ``pip install`` (the README's first
    command), not only with an extra the test suite happens to install (rich came in through transformers' typer,
    while the demo's plain install fell back to a bar redrawn at every step in a log file and no progress lines)."""

    core = {_name(r) for r in _pyproject()["project"]["dependencies"]}
    gated: dict[str, str] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            # from any library's module (lightning's utilities.imports, litdata.constants, a callback's module)
            if not isinstance(node, ast.ImportFrom) or node.level or node.module.split(".")[0] == PACKAGE.name:
                continue
            for name in (alias.name for alias in node.names if alias.name.endswith("_AVAILABLE")):
                requirement = getattr(getattr(importlib.import_module(node.module), name), "requirement", None)
                if requirement:
                    gated.setdefault(_name(requirement), f"{name} in {path.relative_to(REPO)}")
    assert gated, "the scan found no flag: it no longer sees how the package reads them"
    missing = {name: where for name, where in gated.items() if name not in core}
    assert not missing, f"declare in pyproject.toml's dependencies: {missing}"


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
    project = _pyproject()["project"]
    requirements = [
        *project["dependencies"],
        *(r for extra in project["optional-dependencies"].values() for r in extra),
    ]
    outside = []
    for constraints in (".ci/constraints.txt", ".ci/constraints-oldest.txt"):
        pins = _pins((REPO / constraints).read_text())
        outside += [f"{constraints}: {problem}" for problem in _pins_outside(requirements, pins)]
    assert not outside
    readme_commands = re.findall(r"^python3 -m venv .*$", (REPO / "README.md").read_text(), re.MULTILINE)
    ci_command = next(
        line for line in (REPO / ".ci/run").read_text().splitlines() if line.startswith("python3 -m venv")
    )
    assert readme_commands and ci_command.startswith(readme_commands[-1] + " ||"), (readme_commands, ci_command)


def _pins(constraints: str) -> dict[str, str]:
    """The exact version of each distribution a constraints file pins for this Python, by normalized name (pip's
    reading: a comment after `` #``, a marker, options such as ``--extra-index-url`` are not the version)."""
    from packaging.requirements import Requirement

    pins = {}
    for line in constraints.splitlines():
        text = re.split(r"(?:^|\s)#", line, maxsplit=1)[0].strip()
        if not text or text.startswith("-"):
            continue
        requirement = Requirement(text)
        exact = [s.version for s in requirement.specifier if s.operator in ("==", "===")]
        if exact and (requirement.marker is None or requirement.marker.evaluate()):
            pins[_name(requirement.name)] = exact[0]
    return pins


def _pins_outside(requirements: list[str], pins: dict[str, str]) -> list[str]:
    """``name==pin outside requirement`` for each pin a requirement's range does not allow (one whose marker this
    Python does not meet does not apply)."""
    from packaging.requirements import Requirement

    outside = []
    for requirement in map(Requirement, requirements):
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        pinned = pins.get(_name(requirement.name))
        if pinned is not None and not requirement.specifier.contains(pinned, prereleases=True):
            outside.append(f"{requirement.name}=={pinned} outside {requirement}")
    return outside


def test_pins_inside_ranges_are_read_as_pip_reads_them():
    """Legitimate lines of a constraints file and of pyproject.toml: a pin with a marker or a comment after it, a local
    version (torch's +cpu), ranges with ~= and !=, extras, a requirement whose marker this Python does not meet."""
    pins = _pins(
        "# a comment\n"
        'torch==2.13.0+cpu ; sys_platform == "linux"\n'
        "Jinja2==3.1.6  # chat templates\n"
        "numpy==2.4.6\n"
        "    # via pandas\n"
        "jsonargparse==4.53.0\n"
        "--extra-index-url https://download.pytorch.org/whl/cpu\n"
    )
    assert pins == {"torch": "2.13.0+cpu", "jinja2": "3.1.6", "numpy": "2.4.6", "jsonargparse": "4.53.0"}
    requirements = [
        "torch>=2.6,<=2.13.0",
        "jinja2~=3.1.2",
        "jsonargparse[signatures]>=4.49,!=4.50.0",
        'numpy<2; python_version < "3.0"',
        "numpy>=2,<=2.4.6",
    ]
    assert _pins_outside(requirements, pins) == []
    assert _pins_outside(["numpy>=2,!=2.4.6"], pins) == ["numpy==2.4.6 outside numpy!=2.4.6,>=2"]
