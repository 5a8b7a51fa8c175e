"""Whether a difference between two variants is beyond seed noise: a paired t-test over synthesis
seeds.

The demo synthesises each variant once per synthesis seed (vanilla and DiRe from the same seed
start from the same images and draw the same random numbers) and trains the same student seeds
on each set. Students are nested in their set: two students of one set share its luck, so they
are not independent samples of the variant. The independent unit is the synthesis seed: each
seed gives one paired difference (for accuracy, the mean over its paired students), and the test
asks whether the mean of those differences is zero (two-sided; ``n - 1`` degrees of freedom).

Standard library only: the two-sided p-value of Student's t is the regularised incomplete beta
function ``I_{df/(df+t²)}(df/2, 1/2)``, computed by its continued fraction.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Optional, Sequence

__all__ = ["ALPHA", "PairedTest", "paired_t", "t_two_sided_p"]

#: The threshold: a difference is beyond seed noise when the test's p-value is below it.
ALPHA = 0.05


def _beta_cf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta ``I_x(a, b)`` for ``0 <= x <= 1``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_cf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_cf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: int) -> float:
    """``P(|T| >= |t|)`` for Student's t with ``df`` degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return _betainc(df / 2.0, 0.5, df / (df + t * t))


@dataclass(frozen=True)
class PairedTest:
    """The paired differences' mean and sample std, their number, t and the two-sided p-value
    (``None`` with fewer than two pairs, or the same non-zero difference in every pair: no spread
    to test against)."""

    mean: float
    std: float
    n: int
    t: Optional[float]
    p: Optional[float]

    @property
    def beyond_noise(self) -> Optional[bool]:
        """``p < ALPHA``; ``None`` when there is no test."""
        return None if self.p is None else self.p < ALPHA


def paired_t(differences: Sequence[float]) -> PairedTest:
    """The paired t-test of ``differences`` (one per synthesis seed) against a mean of zero."""
    diffs = [float(d) for d in differences]
    n = len(diffs)
    if n == 0:
        raise ValueError("paired_t needs at least one difference")
    mean = statistics.fmean(diffs)
    if n < 2:
        return PairedTest(mean, 0.0, n, None, None)
    std = statistics.stdev(diffs)
    if std == 0.0:
        # The same difference in every seed (coverage moves in steps of one real image): t is not
        # defined, and a p of 0 would claim certainty from a tie. Identical zeros are no difference.
        return PairedTest(mean, 0.0, n, 0.0, 1.0) if mean == 0.0 else PairedTest(mean, 0.0, n, None, None)
    t = mean / (std / math.sqrt(n))
    return PairedTest(mean, std, n, t, t_two_sided_p(t, n - 1))
