"""The synthetic sets the demo compares: vanilla SRe²L and SRe²L + DiRe with given weights."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

__all__ = ["Variant", "VANILLA", "MAIN_VARIANTS", "ABLATION_VARIANTS", "REAL_KEY", "REAL_LABEL"]

#: The reference row: a random subset of the real training images, same images per class.
REAL_KEY = "real"
REAL_LABEL = "real random subset (reference)"


def _num(x: float) -> str:
    return f"{x:g}"


@dataclass(frozen=True)
class Variant:
    """One way of synthesising: ``r_c is None`` is the vanilla script (no DiRe)."""

    key: str
    label: str
    r_c: Optional[float] = None
    r_e: Optional[float] = None
    components: Optional[Tuple[str, ...]] = None  # None: every term (the runtime's default)

    @property
    def dire(self) -> bool:
        return self.r_c is not None

    @classmethod
    def with_dire(cls, r_c: float, r_e: float, components: Optional[Tuple[str, ...]] = None) -> "Variant":
        """``+ DiRe (r_c 1, r_e 0)``, or ``+ DiRe CD+CDM`` for an ablation row."""
        if components is None:
            key = f"dire_rc{_num(r_c)}_re{_num(r_e)}"
            label = f"+ DiRe (r_c {_num(r_c)}, r_e {_num(r_e)})"
        else:
            key = "dire_" + "_".join(components)
            label = "+ DiRe " + "+".join(c.upper() for c in components)
        return cls(key, label, r_c, r_e, components)


VANILLA = Variant("vanilla", "vanilla")

#: DEMO-FINDINGS: r_e = 0 wins within-class diversity, r_e = 0.01 wins coverage; show both.
MAIN_VARIANTS = (VANILLA, Variant.with_dire(1.0, 0.0), Variant.with_dire(1.0, 0.01))

#: The paper's Table 14: every non-empty subset of the three terms, at weights where EDM counts.
_COMBOS = (("cd",), ("cdm",), ("edm",), ("cd", "cdm"), ("cd", "edm"), ("cdm", "edm"), ("cd", "cdm", "edm"))
ABLATION_VARIANTS = (VANILLA,) + tuple(Variant.with_dire(1.0, 0.01, c) for c in _COMBOS)
