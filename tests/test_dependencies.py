"""Packages depend downwards: schemas (records, settings, topic catalog, Redis keys) at the bottom, then
processors (processors/runtime is the shared runtime), sinks, api, and the operator tools (leadstream) on
top. Read from the source with `ast`, every import (also those inside functions) counts."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
LAYERS = ("schemas", "processors", "sinks", "api", "leadstream")
RUNTIME = "processors.runtime"

def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every LeadStream module -> what it imports of LeadStream (`from a.b import c` counts as a.b.c)."""
    found: dict[str, set[str]] = {}
    for package in LAYERS:
        for path in (ROOT / package).rglob("*.py"):
            module, names = _module(path), set()
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names.update(f"{node.module}.{alias.name}" for alias in node.names)
            found[module] = {name for name in names if name.split(".")[0] in LAYERS}
    return found


def _layer(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


def test_no_package_imports_one_above_it():
    upward = {(module, name) for module, names in _imports().items() for name in names
              if _layer(name) > _layer(module)}
    assert upward == set()


def test_nothing_below_the_operator_tools_imports_them():
    offenders = {module for module, names in _imports().items()
                 if not module.startswith("leadstream") and any(name.startswith("leadstream") for name in names)}
    assert offenders == set()


def test_sinks_use_only_the_runtime_of_processors_and_the_runtime_no_processor():
    imports = _imports()
    sinks = {name for module, names in imports.items() if module.startswith("sinks") for name in names
             if name.startswith("processors")}
    assert all(name.startswith(RUNTIME) for name in sinks), sinks
    runtime = {name for module, names in imports.items() if module.startswith(RUNTIME) for name in names
               if name.startswith("processors") and not name.startswith(RUNTIME)}
    assert runtime == set()


def test_no_import_cycle_between_packages():
    """Top-level packages, with the runtime as a package of its own (sinks may use it, not the processors)."""
    def package(module: str) -> str:
        return RUNTIME if module.startswith(RUNTIME) else module.split(".")[0]

    graph: dict[str, set[str]] = {}
    for module, names in _imports().items():
        for name in names:
            if package(name) != package(module):
                graph.setdefault(package(module), set()).add(package(name))

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(step == goal or (step not in seen and reaches(step, goal, seen | {step}))
                   for step in graph.get(start, ()))

    assert [p for p in graph if reaches(p, p, {p})] == []
