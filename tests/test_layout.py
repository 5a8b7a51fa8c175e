"""The package's plan, checked: imports run downward through the role packages, no module imports
itself back through others (lazy imports inside functions included), and nothing but
``__init__``, ``auto`` and ``errors`` sits directly under ``dire_plugin/``."""
import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

from envs import demo_script

ROOT = Path(__file__).resolve().parents[1]

#: Lower layers first; a module may import its own layer and the ones before it.
LAYERS = [
    {"dire_plugin", "dire_plugin.errors", "dire_plugin.io"},
    {"dire_plugin.regularizer"},
    {"dire_plugin.embeddings"},
    {"dire_plugin.hooks", "dire_plugin.metrics", "dire_plugin.patches"},
    {"dire_plugin.upstream"},
    {"dire_plugin.activation"},
    {"dire_plugin.demo"},
    {"dire_plugin.cli", "dire_plugin.auto"},
]


def _sources() -> Dict[str, Path]:
    """Module name → file, with ``patches/`` under its installed name ``dire_plugin.patches``."""
    out = {}
    for base, package in ((ROOT / "dire_plugin", "dire_plugin"), (ROOT / "patches", "dire_plugin.patches")):
        for path in base.rglob("*.py"):
            if demo_script(path):
                continue  # the demo's family scripts run as upstream scripts do, not as our modules
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def _imports(name: str, path: Path, modules: Set[str]) -> Set[str]:
    """The modules of ours that ``name`` imports anywhere in its file (function bodies too)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # ``from pkg import mod`` imports the module pkg.mod; ``from mod import name`` the module.
            targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> Dict[str, Set[str]]:
    sources = _sources()
    modules = set(sources)
    return {name: _imports(name, path, modules) for name, path in sources.items()}


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _layer(module: str) -> int:
    best, rank = "", None
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
                best, rank = prefix, i
    assert rank is not None, f"{module} is in no layer of tests/test_layout.py"
    return rank


def _upward(graph: Dict[str, Set[str]]) -> List[str]:
    bad = []
    for module, targets in graph.items():
        for target in targets:
            # A package's __init__ may re-export from its own modules.
            if target.startswith(module + "."):
                continue
            if _layer(target) > _layer(module):
                bad.append(f"{module} -> {target}")
    return sorted(bad)


def test_no_import_cycle():
    assert _cycles(import_graph()) == []


def test_imports_run_downward():
    assert _upward(import_graph()) == []


def test_the_checks_see_a_back_import():
    # The two tests above would pass vacuously if the graph were empty or the parser blind.
    graph = import_graph()
    assert "dire_plugin.regularizer.functional" in graph["dire_plugin.regularizer.loss"]
    graph["dire_plugin.regularizer.kernels"] = graph["dire_plugin.regularizer.kernels"] | {"dire_plugin.hooks.runtime"}
    assert _cycles(graph) and _upward(graph) == ["dire_plugin.regularizer.kernels -> dire_plugin.hooks.runtime"]


def test_only_the_entry_points_sit_at_the_top():
    top = sorted(p.name for p in (ROOT / "dire_plugin").iterdir() if p.is_file() and p.suffix == ".py")
    assert top == ["__init__.py", "auto.py", "errors.py"]


@pytest.mark.parametrize("package", sorted(p.name for p in (ROOT / "dire_plugin").iterdir() if (p / "__init__.py").is_file()))
def test_every_package_says_what_lives_there(package):
    doc = ast.get_docstring(ast.parse((ROOT / "dire_plugin" / package / "__init__.py").read_text()))
    assert doc and len(doc.split()) >= 12, f"dire_plugin/{package}/__init__.py needs a docstring: what lives there"
