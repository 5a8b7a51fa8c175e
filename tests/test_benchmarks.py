"""The benchmark scripts name only modules and attributes that exist.

CI runs only some of ``benchmarks/`` (through ``gpu_check.sh --device cpu``); the others are run
by hand, seldom, and many import inside functions, so a module that moves breaks them silently.
This reads every ``dire_plugin`` import of every script (module level or not) and resolves it.
"""
from __future__ import annotations

import ast
import importlib
from pathlib import Path
from typing import Iterator, Tuple

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _imports(path: Path) -> Iterator[Tuple[int, str, str]]:
    """(line, module, name) for every ``from dire_plugin... import name`` and ``import dire_plugin...``."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("dire_plugin"):
            for alias in node.names:
                yield node.lineno, node.module, alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("dire_plugin"):
                    yield node.lineno, alias.name, ""


SCRIPTS = sorted(BENCHMARKS.glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_benchmark_imports_resolve(script: Path) -> None:
    broken = []
    for line, module, name in _imports(script):
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            broken.append(f"{script.name}:{line}: {module}: {exc}")
            continue
        if name and not hasattr(mod, name):
            try:  # `from package import submodule`
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                broken.append(f"{script.name}:{line}: {module} has no {name}")
    assert not broken, "\n".join(broken)


def test_the_scan_sees_lazy_imports() -> None:
    # _overhead_dm imports the patch inside a function: the scan must reach it, or it checks nothing there.
    found = {(module, name) for _, module, name in _imports(BENCHMARKS / "_overhead_dm.py")}
    assert ("dire_plugin.patches", "dm") in found
