"""The settings of a patched run (:class:`RunConfig`) and their checks, without torch: ``dire-apply``,
``dire-run``, a hand-edited ``.dire/<method>.json`` and an inherited ``DIRE_ACTIVATE`` all go
through :func:`check_run_settings`, so a value refused by one door is refused by all of them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

from ..errors import DiReInputError
from ..regularizer.defaults import (
    ALL_COMPONENTS, COMPONENTS, DEFAULT_R_C, DEFAULT_R_D, DEFAULT_R_E, LOGDET_KERNELS, REDUCTIONS, check_active_weights,
    check_share, check_weight, check_weights,
)

__all__ = ["BANK_DTYPES", "SHARED_BY_RANKS", "RunConfig", "check_run_settings"]

BANK_DTYPES = ("float32", "float16", "bfloat16")

#: The settings every rank of a torch.distributed run must share: what the term depends on and
#: which code runs. Not among them: ``real_data`` (node-local copies of a dataset sit at different
#: paths; the data itself is compared through the bank key), ``cache_dir`` and ``manifest_dir``
#: (folders of each node), ``log_every`` (what is logged, not what is computed).
SHARED_BY_RANKS = ("method", "commit", "script", "r_c", "r_e", "r_d", "logdet_kernel", "share", "reduction",
                   "components", "memory", "bank_max_per_class", "bank_dtype")


def _whole(value: Any, name: str, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DiReInputError(f"{where}{name} must be a whole number >= {minimum}, got {value!r}")
    return value


def check_run_settings(settings: Mapping[str, Any], where: str = "") -> Dict[str, Any]:
    """The run settings with their values checked; ``where`` prefixes every message (the file or
    flag they came from). Unknown keys pass through (the config also records provenance)."""
    out = dict(settings)
    r_c, r_e = check_weights(out.get("r_c", DEFAULT_R_C), out.get("r_e", DEFAULT_R_E), where)
    r_d = check_weight("r_d", out.get("r_d", DEFAULT_R_D), where)
    components = out.get("components", COMPONENTS)
    if isinstance(components, str) or not isinstance(components, (list, tuple)) or not components or any(
        c not in ALL_COMPONENTS for c in components
    ):
        raise DiReInputError(f"{where}components must be a non-empty list of {', '.join(ALL_COMPONENTS)}, "
                             f"got {components!r}")
    check_active_weights(components, r_c, r_e, where, r_d=r_d)
    if out.get("logdet_kernel", "cosine") not in LOGDET_KERNELS:
        raise DiReInputError(f"{where}logdet_kernel must be one of {', '.join(LOGDET_KERNELS)}, "
                             f"got {out['logdet_kernel']!r}")
    share = out.get("share")
    if share is not None:
        out["share"] = check_share(share, where)
    reduction = out.get("reduction", "mean")
    if reduction not in REDUCTIONS:
        raise DiReInputError(f"{where}reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    _whole(out.get("log_every", 100), "log_every", where, 0)
    if out.get("bank_max_per_class") is not None:
        _whole(out["bank_max_per_class"], "bank_max_per_class", where, 1)
    if out.get("bank_dtype", "float32") not in BANK_DTYPES:
        raise DiReInputError(f"{where}bank_dtype must be one of {', '.join(BANK_DTYPES)}, got {out['bank_dtype']!r}")
    if not isinstance(out.get("memory", True), bool):  # a hand-edited "false" string would be truthy
        raise DiReInputError(f"{where}memory must be true or false, got {out['memory']!r}")
    for key in ("real_data", "cache_dir", "manifest_dir", "method", "script", "commit", "root"):
        if key in out and not isinstance(out[key], str):
            raise DiReInputError(f"{where}{key} must be a string, got {out[key]!r}")
    out.update(r_c=r_c, r_e=r_e, r_d=r_d, components=list(components))
    return out


@dataclass
class RunConfig:
    """Everything a patched run needs; written by ``dire-apply``, read at start-up."""

    method: str
    commit: str = ""
    script: str = ""
    r_c: float = DEFAULT_R_C
    r_e: float = DEFAULT_R_E
    #: Weight of the ``logdet`` component (used only when ``components`` holds it).
    r_d: float = DEFAULT_R_D
    logdet_kernel: str = "cosine"
    reduction: str = "mean"
    components: Tuple[str, ...] = COMPONENTS
    real_data: str = ""
    cache_dir: str = ""
    log_every: int = 100
    bank_max_per_class: Optional[int] = None
    #: Storage of the real-embedding bank: float16/bfloat16 halve its memory on a GPU (the sums the
    #: terms use stay float32; README "Scaling" bounds the error).
    bank_dtype: str = "float32"
    memory: bool = True
    manifest_dir: str = ""
    #: DiRe's share of the images' gradient to calibrate ``r_c``/``r_e`` to on the first steps
    #: (their ratio kept), ``None``: the weights as given (:mod:`dire_plugin.hooks.share`).
    share: Optional[float] = None
    #: The upstream checkout the script belongs to: the manifest is never written inside it.
    root: str = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "") -> "RunConfig":
        """The config of ``data`` (checked: a bad value is one line prefixed with ``where``)."""
        data = check_run_settings(data, where)
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["components"] = tuple(kwargs.get("components", COMPONENTS))
        return cls(**kwargs)
