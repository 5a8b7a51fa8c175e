r"""DiRe's share of the gradient a method's optimizer applies, and the calibration behind ``--share``.

The same weights mean very different things in different methods: SRe²L steps its images with
Adam at lr 0.25 on a CE + BN loss, MTT with SGD at lr 100–1000 on a small meta-gradient, DM with
SGD on a mean-matching loss. What carries over is the share::

    share = ‖∂L_DiRe/∂x‖ / ‖∂L_method/∂x‖

with ``x`` the tensor the method's optimizer updates (the synthetic images; INFER's compensator),
taken at the synthesis step, ‖·‖ the Frobenius norm over the whole tensor (under
``torch.distributed``: over every rank's rows together). :class:`ShareMeter` decides which steps
are measured (the first :data:`FIRST_STEPS`, then every :data:`EVERY`-th) and keeps the values.

Calibration (``share=S``): DiRe's gradient is linear in its weights, ``∂(k·L)/∂x = k·∂L/∂x``, so
the share at weights ``k·(r_c, r_e)`` is exactly ``k`` times the share at ``(r_c, r_e)``. On each of
the first :data:`CALIBRATION_STEPS` measurable steps the step's DiRe gradient is scaled to give
exactly ``S``; then ``k`` = the median of those factors is kept for the rest of the run (the
weights become ``k·r_c, k·r_e``: the ratio ``r_e/r_c`` stays). After calibration the share drifts
as the images change; the recorded median says by how much.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["CALIBRATION_STEPS", "EVERY", "FIRST_STEPS", "ShareMeter"]

#: Synthesis steps measured at the start of a run (a calibration needs them early).
FIRST_STEPS = 5
#: Then every EVERY-th synthesis step: an input-only backward every 100 steps costs well under
#: 2 % of a run where DiRe's gradient is not separate (benchmarks/RESULTS.md).
EVERY = 100
#: Measurable steps a ``--share`` calibration takes the median over.
CALIBRATION_STEPS = 3


@dataclass
class ShareMeter:
    """Which synthesis steps are measured, what they measured, and the ``--share`` calibration.

    Args:
        target: the share ``S`` to calibrate to (``None``: the weights are kept as given).
        first, every: the schedule (steps ``1..first``, then multiples of ``every``).
        calibration_steps: measurable steps whose factors the calibration takes the median of.
    """

    target: Optional[float] = None
    first: int = FIRST_STEPS
    every: int = EVERY
    calibration_steps: int = CALIBRATION_STEPS
    #: ``(step, share)`` of every measured step, the share as the images got it (after calibration).
    records: List[Tuple[int, float]] = field(default_factory=list)
    #: Shares of the calibration steps at the starting weights, before their factors.
    uncalibrated: List[float] = field(default_factory=list)
    factors: List[float] = field(default_factory=list)
    #: The kept calibration factor ``k``, once calibrated.
    scale: Optional[float] = None
    #: Measured steps whose method gradient was zero or not finite (no share exists).
    unmeasurable: int = 0
    #: Time spent measuring (extra input-only backwards, norms, their exchange).
    seconds: float = 0.0

    @property
    def calibrating(self) -> bool:
        return self.target is not None and self.scale is None

    def due(self, step: int) -> bool:
        """Whether synthesis step ``step`` (1-based) is measured."""
        return self.calibrating or step <= self.first or (self.every > 0 and step % self.every == 0)

    def observe(self, step: int, dire_norm: float, method_norm: float) -> Tuple[float, bool]:
        """Record step ``step``; returns ``(factor, calibrated)``: the factor to scale this step's
        DiRe gradient by (1 unless calibrating), and whether the calibration finished here."""
        if not (method_norm > 0 and math.isfinite(method_norm) and math.isfinite(dire_norm)):
            self.unmeasurable += 1
            return 1.0, False
        share = dire_norm / method_norm
        factor, finished = 1.0, False
        if self.calibrating and share > 0:  # a step without DiRe gradient cannot be scaled to S
            self.uncalibrated.append(share)
            factor = self.target / share
            self.factors.append(factor)
            if len(self.factors) >= self.calibration_steps:
                self.scale = statistics.median(self.factors)
                finished = True
        self.records.append((step, share * factor))
        return factor, finished

    def summary(self) -> Dict[str, Any]:
        """For the manifest: median, min, max over the measured steps, each measured step's share,
        the schedule, the cost."""
        shares = [s for _, s in self.records]
        return {
            "median": statistics.median(shares) if shares else None,
            "min": min(shares) if shares else None,
            "max": max(shares) if shares else None,
            "steps_measured": len(shares),
            "steps_unmeasurable": self.unmeasurable,
            "schedule": f"steps 1-{self.first}, then every {self.every}" if self.every else f"steps 1-{self.first}",
            "first_steps": [round(s, 6) for _, s in self.records[: self.first]],
            # Every measured step as (step, share): how the share drifts over a run (the demo draws it).
            "measured": [[step, round(s, 6)] for step, s in self.records],
            "seconds": round(self.seconds, 4),
        }
