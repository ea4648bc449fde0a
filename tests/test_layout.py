"""The package layering of DESIGN.md: a lower package never imports a higher one."""

from __future__ import annotations

import ast
import pathlib

import pytest

import pylux

#: Every package under pylux/, lowest first. pylux.nonlinear sits below pylux.diffeq (implicit ODE
#: steppers may use its Newton solvers); distributed builds on training; interop holds the torch bridges
#: (StatefulLayer, odeint) and data imports no other pylux package today.
ORDER = ["core", "nn", "nonlinear", "diffeq", "sensitivity", "regularize", "layers", "training", "distributed",
         "interop", "data", "experiments"]
ROOT = pathlib.Path(pylux.__file__).parent
#: What ``from pylux import X`` (or ``from .. import X``) means when X is no package: the top-level
#: pylux namespace, which imports every package, so it counts as above all of them.
TOP = "pylux"


def imported_packages(source: str, module: tuple[str, ...]) -> dict[str, list[int]]:
    """The pylux packages a module imports, each with the lines that import it.

    ``module`` is the module's path below ``pylux/`` without ``.py``, e.g.
    ``("diffeq", "solve")`` or ``("diffeq", "__init__")``. Every spelling
    counts, wherever it stands (a function-level import too): ``from ..x import
    y``, ``from ..x.y import z``, ``from .. import x``, ``import pylux.x``,
    ``from pylux import x`` and ``from pylux.x import y``. A name imported from
    the top level that is not a package counts as :data:`TOP`.
    """
    package = ["pylux", *module[:-1]]  # the package holding the module (itself, for an __init__)
    found: dict[str, list[int]] = {}

    def add(parts: list[str], names: list[str], line: int) -> None:
        if not parts or parts[0] != "pylux":
            return
        if len(parts) > 1:
            found.setdefault(parts[1], []).append(line)
            return
        for name in names or [TOP]:  # `import pylux` itself is the top level
            found.setdefault(name if name in ORDER else TOP, []).append(line)

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name.split("."), [], node.lineno)
        elif isinstance(node, ast.ImportFrom):
            names = [alias.name for alias in node.names]
            tail = node.module.split(".") if node.module else []
            if node.level == 0:
                add(tail, names, node.lineno)
                continue
            if node.level - 1 >= len(package):
                raise ValueError(f"relative import beyond the top-level package at line {node.lineno}")
            base = package[:len(package) - (node.level - 1)]
            add(base + tail, names, node.lineno)
    return found


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if len(parts) > 1:  # files directly in pylux/ are the top level, not a package
            yield path, parts


def test_every_package_is_listed_once():
    packages = {path.parent.name for path in ROOT.glob("*/__init__.py")}
    assert len(ORDER) == len(set(ORDER))
    assert packages == set(ORDER), (sorted(packages - set(ORDER)), sorted(set(ORDER) - packages))
    stray = {path.parent.name for path in ROOT.glob("*/*.py")} - packages
    assert not stray, f"directories with Python files but no __init__.py: {sorted(stray)}"


def test_lower_packages_never_import_higher_ones():
    rank = {name: i for i, name in enumerate(ORDER)}
    rank[TOP] = len(ORDER)
    upward = []
    for path, parts in _modules():
        own = parts[0]
        for target, lines in imported_packages(path.read_text(), parts).items():
            assert target in rank, f"{path.relative_to(ROOT)} imports an unknown package pylux.{target}"
            if rank[target] > rank[own]:
                upward += [f"pylux/{path.relative_to(ROOT)}:{line} imports {target}" for line in lines]
    assert not upward, upward


def test_nonlinear_imports_only_core():
    targets = set()
    for path, parts in _modules():
        if parts[0] == "nonlinear":
            targets |= set(imported_packages(path.read_text(), parts))
    assert targets == {"nonlinear", "core"}


@pytest.mark.parametrize("module, source, expected", [
    (("nonlinear", "x"), "from .. import diffeq", {"diffeq"}),
    (("nonlinear", "x"), "from .. import diffeq, nn as n", {"diffeq", "nn"}),
    (("nonlinear", "x"), "from ..diffeq import solve", {"diffeq"}),
    (("nonlinear", "x"), "from ..diffeq.solve import solve", {"diffeq"}),
    (("nonlinear", "x"), "import pylux.diffeq", {"diffeq"}),
    (("nonlinear", "x"), "import pylux.diffeq.solve as s", {"diffeq"}),
    (("nonlinear", "x"), "from pylux import diffeq", {"diffeq"}),
    (("nonlinear", "x"), "from pylux.diffeq import solve", {"diffeq"}),
    (("nonlinear", "x"), "from pylux.diffeq.solve import solve", {"diffeq"}),
    (("nonlinear", "x"), "def f():\n    from ..layers import DEQ\n", {"layers"}),
    (("nonlinear", "x"), "from .. import Tsit5", {TOP}),
    (("nonlinear", "x"), "import pylux", {TOP}),
    (("nonlinear", "x"), "from . import gmres\nfrom .gmres import gmres", {"nonlinear"}),
    (("nonlinear", "x"), "import torch\nfrom torch import nn", set()),
    (("nonlinear", "__init__"), "from .. import diffeq\nfrom . import gmres", {"diffeq", "nonlinear"}),
    (("diffeq", "sub", "m"), "from ... import layers\nfrom .. import solve", {"layers", "diffeq"}),
    (("diffeq", "sub", "m"), "from ...nonlinear.gmres import gmres", {"nonlinear"}),
])
def test_the_import_scanner_sees_every_spelling(module, source, expected):
    assert set(imported_packages(source, module)) == expected


def test_the_import_scanner_reports_lines():
    found = imported_packages("import torch\nfrom ..diffeq import solve\n\nimport pylux.diffeq\n", ("nn", "x"))
    assert found == {"diffeq": [2, 4]}
