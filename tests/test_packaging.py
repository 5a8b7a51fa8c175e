"""The wheel holds the package, the patches as ``dire_plugin.patches`` and the lock file; a
non-editable install works from any directory; every import the package makes is declared in
``setup.cfg``; and without the optional extras the core commands work while the ones that need
an extra say which, in one line."""
import ast
import configparser
import importlib.metadata
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from envs import ROOT, build_wheel, child_venv, demo_script

#: Imports of the package that are allowed to come from an optional extra only, and the extra.
OPTIONAL = {"sklearn": "demo", "matplotlib": "plot"}
#: Import name → distribution, where they differ.
DISTRIBUTION = {"PIL": "pillow", "git": "gitpython", "sklearn": "scikit-learn", "tomllib": None}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "dire_plugin/__init__.py" in names
    assert "dire_plugin/patches/__init__.py" in names
    assert "dire_plugin/upstream.lock" in names
    assert not any(n.startswith(("patches/", "tests/", "benchmarks/")) for n in names), sorted(names)
    lock = zipfile.ZipFile(wheel).read("dire_plugin/upstream.lock")
    assert lock == (ROOT / "upstream.lock").read_bytes()


def test_non_editable_install_works_from_any_directory(wheel, tmp_path):
    py = child_venv(tmp_path / "venv", wheel)
    code = (
        "import dire_plugin, dire_plugin.patches, importlib.resources as r;"
        "print(dire_plugin.__file__);"
        "print(dire_plugin.patches.__file__);"
        "print(len(r.files('dire_plugin').joinpath('upstream.lock').read_text()))"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([str(py), "-c", code], cwd=elsewhere, env=env, check=True, capture_output=True, text=True)
    init, patches, lock_len = out.stdout.split()
    assert init.startswith(str(tmp_path / "venv")) and patches.startswith(str(tmp_path / "venv"))
    assert int(lock_len) > 0


# --- declared dependencies ------------------------------------------------------------------------


def _requirement_names(lines: str) -> set:
    names = set()
    for line in lines.strip().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(re.split(r"[<>=!~;\[ ]", line, 1)[0].lower().replace("_", "-"))
    return names


def _declared():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    required = _requirement_names(cfg["options"]["install_requires"])
    extras = {name: _requirement_names(value) for name, value in cfg["options.extras_require"].items()}
    return required, extras


def _package_sources():
    for folder in (ROOT / "dire_plugin", ROOT / "patches"):
        for path in folder.rglob("*.py"):
            if not demo_script(path):
                yield path


def _third_party_imports():
    """``{top-level import name: [files]}`` of every import in the package, lazy ones included."""
    found = {}
    for path in _package_sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "dire_plugin":
                    found.setdefault(top, []).append(str(path.relative_to(ROOT)))
    return found


def _distribution(import_name):
    if import_name in DISTRIBUTION:
        return DISTRIBUTION[import_name]
    owners = importlib.metadata.packages_distributions().get(import_name)
    return (owners[0] if owners else import_name).lower().replace("_", "-")


def test_every_import_is_declared():
    required, extras = _declared()
    undeclared = {}
    for name, files in _third_party_imports().items():
        dist = _distribution(name)
        if dist is None or dist == "tomli":  # tomllib is stdlib from 3.11; tomli is declared for older ones
            continue
        if name in OPTIONAL:
            if dist not in extras[OPTIONAL[name]]:
                undeclared[name] = f"not in the {OPTIONAL[name]} extra ({files[0]})"
        elif dist not in required:
            undeclared[name] = f"{dist} not in install_requires ({', '.join(sorted(set(files)))})"
    assert not undeclared, undeclared


def test_the_dependency_check_sees_torchvision():
    # The check above would pass vacuously if it found nothing: torchvision is imported and declared.
    found = _third_party_imports()
    required, _ = _declared()
    assert "torchvision" in found and "torchvision" in required
    assert {"torch", "PIL", "numpy", "git", "wrapt", "tqdm"} <= set(found)


# --- without the optional extras ------------------------------------------------------------------


@pytest.fixture(scope="module")
def bare(wheel, tmp_path_factory):
    """A child environment where scikit-learn and matplotlib (the extras' packages) are hidden."""
    base = tmp_path_factory.mktemp("bare")
    py = child_venv(base / "venv", wheel, hide=["sklearn", "matplotlib"])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("DIRE_")}
    env["DIRE_SITE_DIR"] = str(base / "site")  # a dire-apply here must not touch the real site-packages

    def run(program, *args, cwd=base):
        """``program`` is ``python`` or one of the console scripts the wheel installed."""
        exe = py if program == "python" else py.parent / program
        return subprocess.run([str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)

    return run, base


def test_core_commands_work_without_extras(bare):
    run, _ = bare
    assert run("python", "-c", "import sklearn").returncode != 0  # the extras really are hidden there
    imports = run("python", "-c", "import dire_plugin, dire_plugin.patches.sre2l, dire_plugin.patches.cda; "
                        "from dire_plugin import DiReLoss, RealEmbeddingBank; import dire_plugin.metrics")
    assert imports.returncode == 0, imports.stderr
    listed = run("dire-apply", "--list")
    assert listed.returncode == 0 and "sre2l" in listed.stdout, listed.stderr
    helped = run("dire-metrics", "--help")
    assert helped.returncode == 0 and "usage: dire-metrics" in helped.stdout, helped.stderr


def test_demo_without_extras_names_the_extra(bare):
    run, base = bare
    out = run("dire", "demo", "--out", str(base / "demo"))
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr, out.stderr
    assert 'pip install "dire-plugin[demo]"' in out.stderr and "scikit-learn" in out.stderr
    assert not (base / "demo").exists()  # refused before any work


def test_metrics_plot_without_matplotlib_names_the_extra(bare, tmp_path):
    run, _ = bare
    real = tmp_path / "real" / "a"
    real.mkdir(parents=True)
    out = run("dire-metrics", str(tmp_path), "--real", str(tmp_path / "real"), "--arch", "resnet18",
              "--random-init", "--plot", "--out", str(tmp_path / "m"))
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr, out.stderr
    assert 'pip install "dire-plugin[plot]"' in out.stderr and "matplotlib" in out.stderr
    assert not (tmp_path / "m").exists()
