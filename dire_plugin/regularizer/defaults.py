"""Default weights and the checks of the run settings, importable without torch (the CLIs print
and validate them before anything heavy is imported).

The defaults reproduce the paper's released SRe²L/CIFAR-100 code: ``multiplier · (r_cos·(CD + CDM) +
r_euc·EDM)`` with multiplier 0.1, r_cos 1.0, r_euc 0.01, per-class means summed over classes,
i.e. ``r_c = 0.1·1.0`` and ``r_e = 0.1·0.01``.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, Tuple

from ..errors import DiReInputError

__all__ = [
    "ALL_COMPONENTS", "COMPONENTS", "DEFAULT_R_C", "DEFAULT_R_D", "DEFAULT_R_E", "FLOAT32_MAX", "LOGDET_KERNELS", "REDUCTIONS",
    "check_active_weights", "check_share", "check_weight", "check_weights", "component_weights",
]

DEFAULT_R_C = 0.1
DEFAULT_R_E = 0.001
#: Weight of the determinantal diversity term (``logdet``), beyond the paper: off unless chosen.
DEFAULT_R_D = 0.1
#: The paper's three terms, the default: cosine among synthetic (CD), 1 − cosine to real (CDM),
#: distance to real (EDM).
COMPONENTS = ("cd", "cdm", "edm")
#: Every term that can be chosen: the paper's three and ``logdet``, −log det(Ê Êᵀ + I) per class
#: (:func:`dire_plugin.regularizer.kernels.logdet_diversity`), in place of CD or beside it.
ALL_COMPONENTS = (*COMPONENTS, "logdet")
#: Kernels of the log-det term: cosine (the Gram matrix of unit rows) or an RBF on unit rows.
LOGDET_KERNELS = ("cosine", "rbf")
REDUCTIONS = ("mean", "sum")
#: The largest float32 (``torch.finfo(torch.float32).max``): DiRe's terms are float32, so a larger
#: weight turns the first term into inf and the images' update into NaN.
FLOAT32_MAX = 3.4028234663852886e38


def check_weight(name: str, value: object, where: str = "") -> float:
    """``value`` as a float, if it is a finite number >= 0 that float32 holds; else a one-line
    :class:`DiReInputError` naming ``name`` (``where`` says where the value came from).

    A negative weight would invert the term (pull images together, push them off the real data),
    NaN would poison every image, and a weight beyond float32 turns the first term into inf.
    """
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or number < 0:
        raise DiReInputError(f"{where}{name} must be a finite number >= 0, got {value!r}")
    if number > FLOAT32_MAX:
        raise DiReInputError(f"{where}{name} must be at most {FLOAT32_MAX:.4g} (DiRe's terms are float32), got {value!r}")
    return number


def check_weights(r_c: object, r_e: object, where: str = "") -> Tuple[float, float]:
    """``(r_c, r_e)`` as floats, each checked by :func:`check_weight`."""
    return check_weight("r_c", r_c, where), check_weight("r_e", r_e, where)


def component_weights(r_c: float, r_e: float, r_d: float = DEFAULT_R_D) -> Dict[str, float]:
    """Weight of each component: ``r_c`` for both cosine terms, ``r_e`` for the Euclidean one,
    ``r_d`` for the determinantal one."""
    return {"cd": r_c, "cdm": r_c, "edm": r_e, "logdet": r_d}


def check_active_weights(components: Iterable[str], r_c: float, r_e: float, where: str = "",
                         r_d: float = DEFAULT_R_D) -> None:
    """Refuse weights that switch every chosen component off: the run (or loss) would add nothing,
    a silent no-op that looks like DiRe (:func:`component_weights` says which weighs which)."""
    weights = component_weights(r_c, r_e, r_d)
    components = tuple(components)
    if not any(weights.get(c) for c in components):
        raise DiReInputError(
            f"{where}the weights of {', '.join(components)} are all 0, so DiRe would add nothing: "
            "set r_c/r_e, or run vanilla with DIRE_DISABLE=1"
        )


def check_share(value: object, where: str = "") -> float:
    """``value`` as a float, if it is a finite number > 0: DiRe's share of the images' gradient
    (``‖∂L_DiRe/∂x‖ / ‖∂L_method/∂x‖``) that ``share`` calibrates the weights to."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or number <= 0:
        raise DiReInputError(f"{where}share must be a finite number > 0, got {value!r}")
    return number
