"""How an unchanged upstream command finds out that DiRe is applied.

``dire-apply`` writes ``<checkout>/.dire/<method>.json`` (one file per applied method, so SRe²L
and CDA applied to one clone of VILA-Lab/SRe2L each keep their settings; the folder is hidden by
``.git/info/exclude``) and lists the checkout in one ``.pth`` file in site-packages. Python runs
that line at every start; it only compares ``sys.argv[0]`` with the listed roots and the
``DIRE_ACTIVATE`` variable, so an unrelated process pays a few string operations and imports
nothing. A match imports :mod:`dire_plugin.activation.startup`, which installs the patch of the method
covering the script and exports ``DIRE_ACTIVATE`` so child processes (``mp.spawn``, ``torchrun``
workers) activate too.

Edits of the ``.pth`` file and of a checkout's configs are read-modify-write: each runs under an
exclusive lock on the folder, and writes go through a temporary file of the writer's own.
"""
from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..errors import DiReInputError
from ..upstream.checkout import CONFIG_DIR
from ..io.files import atomic_write, locked

__all__ = [
    "CONFIG_DIR",
    "ENV_ACTIVATE",
    "ENV_DISABLE",
    "ENV_SITE_DIR",
    "EXCLUDE_RECORD",
    "LEGACY_CONFIG",
    "PTH_NAME",
    "applied_checkouts",
    "applied_methods",
    "config_path",
    "find_checkout",
    "migrate_legacy_config",
    "read_config",
    "read_exclude_record",
    "refresh_startup_line",
    "register_checkout",
    "remove_config",
    "site_dir",
    "unregister_checkout",
    "write_config",
    "write_exclude_record",
]

#: ``.dire/<method>.json`` holds a method's settings; this file holds what ``.git/info/exclude``
#: looked like before the first apply, so the last ``--remove`` restores it byte for byte.
EXCLUDE_RECORD = "exclude.json"
#: One settings file for the whole checkout, as dire-apply 0.1 wrote it (a second method replaced
#: the first): the next dire-apply converts it.
LEGACY_CONFIG = "config.json"
PTH_NAME = "dire_plugin_activate.pth"
#: JSON ``{"root": ..., ...}`` of the active run; inherited by child processes.
ENV_ACTIVATE = "DIRE_ACTIVATE"
#: On (``1/true/yes/on``; see :func:`dire_plugin.io.environ.env_flag`) runs the checkout vanilla (the baseline).
ENV_DISABLE = "DIRE_DISABLE"
#: Where the ``.pth`` goes (default: this interpreter's site-packages); tests point it elsewhere.
ENV_SITE_DIR = "DIRE_SITE_DIR"

_MARK = "# dire-plugin roots: "
_NOT_METHODS = (EXCLUDE_RECORD, LEGACY_CONFIG)


def site_dir() -> Path:
    """The site-packages folder that holds our ``.pth`` file (``DIRE_SITE_DIR`` overrides it)."""
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
            try:
                roots = json.loads(line[len(_MARK):])
            except ValueError:
                roots = None
            if not isinstance(roots, list) or not all(isinstance(r, str) for r in roots):
                raise DiReInputError(f"{_pth_path()} is damaged (its list of checkouts is not a JSON list of "
                                     f"paths): delete it, then re-run dire-apply for each checkout")
            return roots
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
        "and __import__('dire_plugin.activation.startup').activation.startup.activate_from_startup()"
    )
    return f"{_MARK}{json.dumps(roots)}\n{gate}\n"


def _edit_roots(edit) -> Path:
    """Apply ``edit(roots) -> roots`` to the ``.pth`` file under the site folder's lock; the
    line is always rewritten, so a ``.pth`` of an older dire-plugin gets today's gate."""
    path = _pth_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path.parent):
        roots = edit(applied_checkouts())
        if roots:
            atomic_write(path, _pth_text(sorted(set(roots))))
        else:
            path.unlink(missing_ok=True)
    return path


def register_checkout(root: os.PathLike) -> Path:
    """List ``root`` in the ``.pth`` file (idempotent, safe against concurrent callers)."""
    root_s = str(Path(root).resolve())
    return _edit_roots(lambda roots: roots + [root_s])


def refresh_startup_line() -> bool:
    """Rewrite the ``.pth`` file if its start-up line is not today's (written by an older
    dire-plugin, whose line may import a module that no longer exists); True if rewritten."""
    path = _pth_path()
    if not path.is_file():
        return False
    with locked(path.parent):
        roots = applied_checkouts()
        current = path.read_text() if path.is_file() else ""
        if not roots or current == _pth_text(sorted(set(roots))):
            return False
        atomic_write(path, _pth_text(sorted(set(roots))))
    return True


def unregister_checkout(root: os.PathLike) -> None:
    """Remove ``root`` from the ``.pth`` file; the file goes when no root is left."""
    root_s = str(Path(root).resolve())
    _edit_roots(lambda roots: [r for r in roots if r != root_s])


# --- a checkout's settings --------------------------------------------------------------------------


def config_path(root: os.PathLike, method: str) -> Path:
    """``ROOT/.dire/METHOD.json``: where ``method``'s settings for the checkout live."""
    return Path(root) / CONFIG_DIR / f"{method}.json"


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise DiReInputError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise DiReInputError(f"{path} is not valid JSON ({e}): fix it, or re-run dire-apply") from None
    if not isinstance(data, dict):
        raise DiReInputError(f"{path} does not hold a JSON object: fix it, or re-run dire-apply")
    return data


def read_config(root: os.PathLike, method: str) -> Optional[Dict[str, Any]]:
    """The settings of ``method`` in the checkout ``root`` (``None`` when it is not applied).

    A file that cannot be read or parsed is a one-line :class:`DiReInputError` naming it.
    """
    return _read_json(config_path(root, method))


def write_config(root: os.PathLike, method: str, config: Dict[str, Any]) -> Path:
    """Write ``method``'s settings for the checkout atomically; returns the file."""
    return atomic_write(config_path(root, method), json.dumps(config, indent=2, sort_keys=True) + "\n")


def remove_config(root: os.PathLike, method: str) -> None:
    """Delete ``method``'s settings file (nothing happens when there is none)."""
    config_path(root, method).unlink(missing_ok=True)


def applied_methods(root: os.PathLike) -> List[str]:
    """Methods with a settings file in the checkout, sorted."""
    folder = Path(root) / CONFIG_DIR
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.json") if p.name not in _NOT_METHODS)


def read_exclude_record(root: os.PathLike) -> Optional[Dict[str, Any]]:
    """What ``hide_config_dir`` did to ``.git/info/exclude`` (``None`` before the first apply)."""
    return _read_json(Path(root) / CONFIG_DIR / EXCLUDE_RECORD)


def write_exclude_record(root: os.PathLike, record: Dict[str, Any]) -> Path:
    """Store the record :func:`read_exclude_record` returns; the last ``--remove`` undoes it."""
    return atomic_write(Path(root) / CONFIG_DIR / EXCLUDE_RECORD, json.dumps(record, indent=2, sort_keys=True) + "\n")


def migrate_legacy_config(root: os.PathLike) -> Optional[str]:
    """Turn the single ``.dire/config.json`` of dire-plugin 0.1 into today's per-method file.

    Returns a line to print when the old file could not be read: it is dropped (it can only have
    stopped every run), so re-applying and ``--remove`` still work; ``None`` otherwise.
    """
    legacy = Path(root) / CONFIG_DIR / LEGACY_CONFIG
    if not legacy.is_file():
        return None
    note = None
    try:
        data = _read_json(legacy) or {}
    except DiReInputError:
        data, note = {}, f"{legacy} (written by dire-plugin 0.1) could not be read: dropped; re-apply the method it held"
    record = data.pop("git_exclude", None)
    if data.get("method"):
        write_config(root, data["method"], data)
    try:
        known = read_exclude_record(root)
    except DiReInputError:
        known = {}  # a broken record of its own is for the caller to report, not to overwrite here
    if known is None:
        write_exclude_record(root, record or {"added": False})
    legacy.unlink()
    return note


def find_checkout(script: os.PathLike) -> Optional[Path]:
    """The applied checkout (a folder with a ``.dire/`` settings folder) that contains ``script``."""
    path = Path(script).resolve()
    for parent in [path] + list(path.parents):
        if (parent / CONFIG_DIR).is_dir() and (applied_methods(parent) or (parent / CONFIG_DIR / LEGACY_CONFIG).is_file()):
            return parent
    return None
