"""How an unchanged upstream command finds out that DiRe is applied.

``dire-apply`` writes ``<checkout>/.dire/config.json`` (hidden by ``.git/info/exclude``) and
lists the checkout in one ``.pth`` file in site-packages. Python runs that line at every start;
it only compares ``sys.argv[0]`` with the listed roots and the ``DIRE_ACTIVATE`` variable, so an
unrelated process pays a few string operations and imports nothing. A match imports
:mod:`dire_plugin._startup`, which installs the method's patch and exports ``DIRE_ACTIVATE``
so child processes (``mp.spawn``, ``torchrun`` workers) activate too.
"""
from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path
from typing import Any, Dict, List, Optional

__all__ = [
    "CONFIG_DIR",
    "CONFIG_FILE",
    "ENV_ACTIVATE",
    "ENV_DISABLE",
    "ENV_SITE_DIR",
    "PTH_NAME",
    "applied_checkouts",
    "find_checkout",
    "read_config",
    "register_checkout",
    "site_dir",
    "unregister_checkout",
    "write_config",
]

CONFIG_DIR = ".dire"
CONFIG_FILE = "config.json"
PTH_NAME = "dire_plugin_activate.pth"
#: JSON ``{"root": ..., ...}`` of the active run; inherited by child processes.
ENV_ACTIVATE = "DIRE_ACTIVATE"
#: Any non-empty value other than ``0`` runs the checkout vanilla (the baseline).
ENV_DISABLE = "DIRE_DISABLE"
#: Where the ``.pth`` goes (default: this interpreter's site-packages); tests point it elsewhere.
ENV_SITE_DIR = "DIRE_SITE_DIR"

_MARK = "# dire-plugin roots: "


def site_dir() -> Path:
    return Path(os.environ.get(ENV_SITE_DIR) or sysconfig.get_paths()["purelib"])


def _pth_path() -> Path:
    return site_dir() / PTH_NAME


def applied_checkouts() -> List[str]:
    """Roots listed in the ``.pth`` file (absolute paths, no trailing separator)."""
    try:
        text = _pth_path().read_text()
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK):])
    return []


def _pth_text(roots: List[str]) -> str:
    prefixes = tuple(r.rstrip(os.sep) + os.sep for r in roots)
    # One line, exec'd by site.py at every start: keep it to string checks and no imports beyond
    # sys/os, which are already loaded. ``-c``/``-m`` have no script path; children of an active
    # run carry DIRE_ACTIVATE instead.
    gate = (
        "import os, sys; "
        f"_d = {prefixes!r}; "
        "_a = sys.argv[0] if sys.argv and sys.argv[0] not in ('', '-c', '-m') else ''; "
        f"(os.environ.get({ENV_ACTIVATE!r}) or (_a and os.path.realpath(_a).startswith(_d))) "
        "and __import__('dire_plugin._startup')._startup.activate_from_startup()"
    )
    return f"{_MARK}{json.dumps(roots)}\n{gate}\n"


def _write_roots(roots: List[str]) -> None:
    path = _pth_path()
    if not roots:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(_pth_text(roots))
    os.replace(tmp, path)


def register_checkout(root: os.PathLike) -> Path:
    """List ``root`` in the ``.pth`` file (idempotent); returns the ``.pth`` path."""
    root_s = str(Path(root).resolve())
    roots = applied_checkouts()
    if root_s not in roots:
        _write_roots(sorted(roots + [root_s]))
    return _pth_path()


def unregister_checkout(root: os.PathLike) -> None:
    """Remove ``root`` from the ``.pth`` file; the file goes when no root is left."""
    root_s = str(Path(root).resolve())
    roots = applied_checkouts()
    if root_s in roots:
        _write_roots([r for r in roots if r != root_s])


def config_path(root: os.PathLike) -> Path:
    return Path(root) / CONFIG_DIR / CONFIG_FILE


def write_config(root: os.PathLike, config: Dict[str, Any]) -> Path:
    path = config_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def read_config(root: os.PathLike) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(config_path(root).read_text())
    except FileNotFoundError:
        return None


def find_checkout(script: os.PathLike) -> Optional[Path]:
    """The applied checkout (a folder with ``.dire/config.json``) that contains ``script``."""
    path = Path(script).resolve()
    for parent in [path] + list(path.parents):
        if config_path(parent).is_file():
            return parent
    return None
