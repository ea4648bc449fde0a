"""The package layering of DESIGN.md: a lower package never imports a higher one."""

import pathlib
import re

import pylux

ORDER = ["core", "nn", "diffeq", "nonlinear", "sensitivity", "regularize", "layers", "training", "experiments"]


def test_lower_packages_never_import_higher_ones():
    root = pathlib.Path(pylux.__file__).parent
    rank = {name: i for i, name in enumerate(ORDER)}
    upward = []
    for path in root.rglob("*.py"):
        package = path.relative_to(root).parts[0]
        if package not in rank:
            continue
        for match in re.finditer(r"^\s*from \.\.(\w+)|^\s*(?:from|import) pylux\.(\w+)", path.read_text(), re.M):
            target = match.group(1) or match.group(2)
            if target in rank and rank[target] > rank[package]:
                upward.append(f"{path.relative_to(root)} imports pylux.{target}")
    assert not upward, upward
    assert all((root / name).is_dir() for name in ORDER)
