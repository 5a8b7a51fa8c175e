"""Child Python environments for the tests: a fresh venv that holds the product as users get it
(a wheel) and sees the test interpreter's packages (torch is GBs; it is not installed again)."""
import site
import subprocess
import sys
import venv
from pathlib import Path
from typing import Iterable

ROOT = Path(__file__).resolve().parents[1]


def demo_script(path: Path) -> bool:
    """A file of one of the demo's script folders (``dire_plugin/demo/{recover,dwa,dm,mtt}/``, its
    ``__init__`` aside): run as upstream scripts are, importing siblings (``utils``) that are no
    module of ours, so the import checks leave them out."""
    from dire_plugin.demo.spec import SCRIPT_FOLDERS

    rel = path.resolve().relative_to(ROOT).parts
    return rel[:2] == ("dire_plugin", "demo") and len(rel) > 3 and rel[2] in SCRIPT_FOLDERS and path.name != "__init__.py"

# Loaded by a .pth line of the child: makes the named top-level packages unimportable, as if an
# optional extra had not been installed.
_BLOCKER = '''"""Written by dire-plugin's tests: hides packages an optional extra would install."""
import sys


class _Hidden:
    names = frozenset({names!r})

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {{fullname!r}}", name=fullname)
        return None


sys.meta_path.insert(0, _Hidden())
'''


def build_wheel(out: Path) -> Path:
    """The project's wheel in ``out``. No build isolation: CI reaches only the package
    registries, and the test extra brings setuptools and wheel."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out)], check=True, cwd=out, capture_output=True)
    (wheel,) = out.glob("dire_plugin-*.whl")
    return wheel


def site_packages(py: Path) -> Path:
    """The purelib folder of the environment of ``py``."""
    out = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True).stdout.strip()
    return Path(out)


def child_venv(env_dir: Path, wheel: Path, hide: Iterable[str] = ()) -> Path:
    """A venv at ``env_dir`` with ``wheel`` installed (no dependencies) that finds every other
    package in this interpreter's site-packages, after its own; returns its python.

    Not ``system_site_packages``: when the tests themselves run in a venv (CI does), that would
    reach the base interpreter, which has no torch. The extra paths are plain ``sys.path``
    entries, so the parent's own ``.pth`` files (an editable install's finder) do not run there.
    """
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, capture_output=True)
    own = site_packages(py)
    parents = [p for p in site.getsitepackages() + [site.getusersitepackages()] if Path(p).is_dir()]
    (own / "zz_dire_test_parent.pth").write_text("".join(f"{p}\n" for p in parents))
    hide = sorted(set(hide))
    if hide:
        (own / "_dire_test_hidden.py").write_text(_BLOCKER.format(names=hide))
        (own / "_dire_test_hidden.pth").write_text("import _dire_test_hidden\n")
    return py
