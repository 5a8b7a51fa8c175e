"""The checks every entry point runs before work starts: ``dire-apply``, ``dire-run``, the start-up
of a patched script (``.dire/<method>.json``, maybe edited by hand) and ``DIRE_ACTIVATE``.

One place, so a value refused by one door is refused by all of them, with the same one line.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .defaults import COMPONENTS, REDUCTIONS, check_weights
from .errors import DiReInputError

__all__ = ["check_cache_dir", "check_real_data_for_script", "check_real_data_for_scripts", "check_run_settings"]


def _whole(value: Any, name: str, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DiReInputError(f"{where}{name} must be a whole number >= {minimum}, got {value!r}")
    return value


def check_run_settings(settings: Mapping[str, Any], where: str = "") -> Dict[str, Any]:
    """The run settings with their values checked; ``where`` prefixes every message (the file or
    flag they came from). Unknown keys pass through (the config also records provenance)."""
    out = dict(settings)
    r_c, r_e = check_weights(out.get("r_c", 0.1), out.get("r_e", 0.001), where)
    components = out.get("components", COMPONENTS)
    if isinstance(components, str) or not isinstance(components, (list, tuple)) or not components or any(
        c not in COMPONENTS for c in components
    ):
        raise DiReInputError(f"{where}components must be a non-empty list of {', '.join(COMPONENTS)}, got {components!r}")
    weights = {"cd": r_c, "cdm": r_c, "edm": r_e}
    if not any(weights[c] for c in components):
        raise DiReInputError(
            f"{where}the weights of {', '.join(components)} are all 0, so the run would add nothing: "
            "set r_c/r_e, or run vanilla with DIRE_DISABLE=1"
        )
    reduction = out.get("reduction", "mean")
    if reduction not in REDUCTIONS:
        raise DiReInputError(f"{where}reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    _whole(out.get("log_every", 100), "log_every", where, 0)
    if out.get("bank_max_per_class") is not None:
        _whole(out["bank_max_per_class"], "bank_max_per_class", where, 1)
    for key in ("real_data", "cache_dir", "manifest_dir", "method", "script", "commit", "root"):
        if key in out and not isinstance(out[key], str):
            raise DiReInputError(f"{where}{key} must be a string, got {out[key]!r}")
    out.update(r_c=r_c, r_e=r_e, components=list(components))
    return out


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
    out = []
    for rel, spec in scripts.items():
        out.append((rel, spec))
        if spec.by_option is not None:
            out += [(f"{rel} {spec.by_option[0]} {value}", choice) for value, choice in spec.by_option[1]]
    return out


def check_real_data_for_script(path: os.PathLike, spec: Any) -> Path:
    """Refuse real data the script's teacher cannot be compared with (layout, readable images,
    the teacher's class count), before anything is built."""
    from .realdata import check_real_data

    return check_real_data(path, spec.real_data, spec.num_classes)


def check_real_data_for_scripts(path: os.PathLike, scripts: Mapping[str, Any]) -> List[str]:
    """The covered scripts whose teacher fits the real data at ``path`` (at least one, or a
    one-line :class:`DiReInputError`: ``dire-apply`` does not know yet which script will run)."""
    from .realdata import check_real_data, torchvision_cifar_root

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
    raise errors[0][1]


def _count_fits(path: os.PathLike, spec: Any) -> bool:
    from .realdata import check_real_data

    try:
        check_real_data(path, spec.real_data, spec.num_classes)
    except DiReInputError:
        return False
    return True
