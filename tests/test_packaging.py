"""The wheel holds the package, the patches as ``dire_plugin.patches`` and the lock file, and a
non-editable install works from any directory."""
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    # No build isolation: CI has no network beyond the registries and the test extra brings
    # setuptools and wheel; isolation would download them again for every run.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)],
        check=True, cwd=out, capture_output=True,
    )
    (path,) = out.glob("dire_plugin-*.whl")
    return path


def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "dire_plugin/__init__.py" in names
    assert "dire_plugin/patches/__init__.py" in names
    assert "dire_plugin/upstream.lock" in names
    assert not any(n.startswith(("patches/", "tests/", "benchmarks/")) for n in names), sorted(names)
    lock = zipfile.ZipFile(wheel).read("dire_plugin/upstream.lock")
    assert lock == (ROOT / "upstream.lock").read_bytes()


def test_non_editable_install_works_from_any_directory(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    # System site-packages provide torch (GBs); the project itself comes only from the wheel.
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        check=True, capture_output=True,
    )
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
    assert init.startswith(str(env_dir)) and patches.startswith(str(env_dir))
    assert int(lock_len) > 0
