"""Packages depend downwards only: schemas -> processors -> sinks -> api -> leadstream. A module never imports
a package above its own (processors once imported sinks for the webhook delivery log: a cycle, since the
sinks run on processors.runtime)."""

from __future__ import annotations

import ast

import pytest

from schemas.settings import REPO_ROOT

LAYERS = ("schemas", "processors", "sinks", "api", "leadstream")


def imported_packages(path) -> set[str]:
    packages = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            packages |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            packages.add(node.module.split(".")[0])
    return packages


@pytest.mark.parametrize("layer", LAYERS[:-1])
def test_no_module_imports_a_package_above_its_own(layer):
    above = set(LAYERS[LAYERS.index(layer) + 1:])
    upward = {str(path.relative_to(REPO_ROOT)): sorted(imported_packages(path) & above)
              for path in (REPO_ROOT / layer).rglob("*.py")}
    assert {module: packages for module, packages in upward.items() if packages} == {}
