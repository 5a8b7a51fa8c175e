"""The synthetic sets the demo compares for each family: vanilla, + DiRe at the method's default
weights, + DiRe at one common gradient share (and the ablation's component subsets)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

__all__ = ["Variant", "VANILLA", "DEFAULT", "COMMON_SHARE", "SHARED", "MAIN_VARIANTS", "ABLATION_VARIANTS", "REAL_KEY",
           "REAL_LABEL"]

#: The reference row: a random subset of the real training images, same images per class.
REAL_KEY = "real"
REAL_LABEL = "real random subset (reference)"

#: The share every family is also calibrated to (``dire-run --share``), so that the rows compare
#: across families at one strength: DiRe's gradient at 0.4 of the method's on the images. It is
#: the share that r_c 1, r_e 0.01 (the weights DEMO-FINDINGS saw help SRe²L on digits) give the
#: demo's SRe²L script on its first steps (measured: 0.36-0.42), ten times REFERENCE_SHARE (0.04),
#: the share of the released weights, at which DM and MTT run by default.
COMMON_SHARE = 0.4


def _num(x: float) -> str:
    return f"{x:g}"


@dataclass(frozen=True)
class Variant:
    """One way of synthesising. Vanilla runs the script alone; the others go through the launcher
    with the method's default weights (``default``), a share to calibrate to, or given weights."""

    key: str
    label: str
    r_c: Optional[float] = None
    r_e: Optional[float] = None
    share: Optional[float] = None
    default: bool = False
    components: Optional[Tuple[str, ...]] = None  # None: every term (the runtime's default)
    r_d: Optional[float] = None  # the logdet term's weight, with "logdet" in components
    logdet_kernel: Optional[str] = None

    @property
    def dire(self) -> bool:
        return self.default or self.share is not None or self.r_c is not None

    def launcher_flags(self) -> List[str]:
        """The weight flags of ``dire-run`` for this variant (none: the method's default)."""
        flags: List[str] = []
        if self.share is not None:
            flags += ["--share", repr(self.share)]
        if self.r_c is not None:
            flags += ["--r-c", repr(self.r_c), "--r-e", repr(self.r_e)]
        if self.components:
            flags += ["--components", ",".join(self.components)]
        if self.r_d is not None:
            flags += ["--r-d", repr(self.r_d)]
        if self.logdet_kernel is not None:
            flags += ["--logdet-kernel", self.logdet_kernel]
        return flags

    @classmethod
    def with_dire(cls, r_c: float, r_e: float, components: Optional[Tuple[str, ...]] = None,
                  r_d: Optional[float] = None, logdet_kernel: Optional[str] = None) -> "Variant":
        """``+ DiRe (r_c 1, r_e 0)``, or ``+ DiRe CD+CDM`` for an ablation row (``... (rbf)`` for
        the logdet term with the RBF kernel)."""
        if components is None:
            key = f"dire_rc{_num(r_c)}_re{_num(r_e)}"
            label = f"+ DiRe (r_c {_num(r_c)}, r_e {_num(r_e)})"
        else:
            key = "dire_" + "_".join(components) + (f"_{logdet_kernel}" if logdet_kernel else "")
            label = "+ DiRe " + "+".join(c.upper() for c in components) + (f" ({logdet_kernel})" if logdet_kernel else "")
        return cls(key, label, r_c, r_e, components=components, r_d=r_d, logdet_kernel=logdet_kernel)

    @classmethod
    def at_share(cls, share: float) -> "Variant":
        return cls(f"dire_share{_num(share)}", f"+ DiRe (share {_num(share)})", share=share)


VANILLA = Variant("vanilla", "vanilla")
#: What ``dire-run METHOD`` gives without a weight flag: the real patch's DEFAULT_WEIGHTS.
DEFAULT = Variant("dire_default", "+ DiRe (method default)", default=True)
SHARED = Variant.at_share(COMMON_SHARE)

MAIN_VARIANTS = (VANILLA, DEFAULT, SHARED)

#: The paper's Table 14: every non-empty subset of the three terms, at weights where EDM counts.
_COMBOS = (("cd",), ("cdm",), ("edm",), ("cd", "cdm"), ("cd", "edm"), ("cdm", "edm"), ("cd", "cdm", "edm"))
#: Beyond the paper: the determinantal term (r_d 1, as r_c) alone, in place of CD and beside it,
#: with each of its two kernels, on the same seeds.
_LOGDET = (("logdet",), ("logdet", "cdm", "edm"), ("cd", "cdm", "edm", "logdet"))
ABLATION_VARIANTS = (VANILLA,) + tuple(Variant.with_dire(1.0, 0.01, c) for c in _COMBOS) + tuple(
    Variant.with_dire(1.0, 0.01, c, r_d=1.0, logdet_kernel=k) for k in ("cosine", "rbf") for c in _LOGDET
)
