"""The input checks every entry point runs before work starts (``dire-apply``, ``dire-run``, the
start-up of a patched script): the real data against the covered scripts' teachers, the cache
folder. The run settings themselves are checked by :func:`dire_plugin.hooks.settings.check_run_settings`.

One place, so a value refused by one door is refused by all of them, with the same one line.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple

from ..errors import DiReInputError

__all__ = ["check_cache_dir", "check_environment", "check_real_data_for_script", "check_real_data_for_scripts"]


def check_environment() -> None:
    """The ``DIRE_*`` variables a run reads later (``DIRE_DIST_TIMEOUT`` at its first exchange
    between ranks), so a bad value is one line at start-up, not after the teacher has loaded."""
    from ..embeddings.collectives import exchange_timeout

    exchange_timeout()


def check_cache_dir(path: os.PathLike, what: str = "--cache-dir") -> Path:
    """``path`` resolved, if it is or can become a folder: nothing on its way is a regular file."""
    resolved = Path(path).expanduser().resolve()
    for folder in [resolved, *resolved.parents]:
        if folder.exists():
            if not folder.is_dir():
                where = "exists and is not a directory" if folder == resolved else f"lies under the file {folder}"
                raise DiReInputError(f"{what} {resolved} {where}")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise DiReInputError(f"{what} {resolved}: {folder} is not writable")
            break
    return resolved


def _specs(scripts: Mapping[str, Any]) -> List[Tuple[str, Any]]:
    """``(script, spec)`` of every way a covered script can run (a ``by_option`` script's choices)."""
    return [(f"{rel} {options}" if options else rel, spec) for rel, top in scripts.items() for options, spec in top.choices()]


def check_real_data_for_script(path: os.PathLike, spec: Any) -> Path:
    """Refuse real data the script's teacher cannot be compared with (layout, readable images,
    the teacher's class count), before anything is built."""
    from ..embeddings.realdata import check_real_data

    return check_real_data(path, spec.real_data, spec.num_classes)


def check_real_data_for_scripts(path: os.PathLike, scripts: Mapping[str, Any]) -> List[str]:
    """The covered scripts whose teacher fits the real data at ``path`` (at least one, or a
    one-line :class:`DiReInputError`: ``dire-apply`` does not know yet which script will run)."""
    from ..embeddings.realdata import check_real_data, torchvision_cifar_root

    groups: Dict[Tuple[Any, ...], List[Tuple[str, Any]]] = {}
    for rel, spec in _specs(scripts):
        groups.setdefault((spec.real_data.kind,), []).append((rel, spec))
    fits: List[str] = []
    errors: List[Tuple[str, DiReInputError]] = []
    for (kind,), members in groups.items():
        counts = sorted({spec.num_classes for _, spec in members})
        try:
            check_real_data(path, members[0][1].real_data, counts if len(counts) > 1 else counts[0])
        except DiReInputError as e:
            errors.append((kind, e))
            continue
        fits += [rel for rel, spec in members if _count_fits(path, spec)]
    if fits:
        return fits
    cifar = torchvision_cifar_root(Path(path).expanduser())
    for kind, error in errors:
        if (cifar is not None) == kind.startswith("cifar"):
            raise error
    if errors:
        raise errors[0][1]
    # Every group's data passed, yet no script's class count fits on its own.
    raise DiReInputError(f"--real-data {path}: its class count fits none of the covered scripts' teachers")


def _count_fits(path: os.PathLike, spec: Any) -> bool:
    from ..embeddings.realdata import check_real_data

    try:
        check_real_data(path, spec.real_data, spec.num_classes)
    except DiReInputError:
        return False
    return True
