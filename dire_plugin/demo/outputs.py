"""``synthetic.pt``: the one file every demo family script writes for the pipeline besides its
upstream-shaped outputs: the final images (normalised) and labels, the CPU seconds and optimizer
steps of its synthesis loop, and what else the evaluation needs (MTT's learnt ``syn_lr``).

CPU time, not wall time: the demo runs several scripts at once on a machine that may be busy, and
CPU time is what a run costs whatever runs beside it.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Dict, Iterator, Optional

import torch
from torch import Tensor

__all__ = ["SYNTHETIC_FILE", "LoopTimer", "save_synthetic", "synthetic_extras"]

SYNTHETIC_FILE = "synthetic.pt"


class LoopTimer:
    """CPU seconds inside :meth:`timing` blocks and the synthesis steps counted by :meth:`step`."""

    def __init__(self) -> None:
        self.cpu_seconds = 0.0
        self.steps = 0

    @contextlib.contextmanager
    def timing(self) -> Iterator[None]:
        start = time.process_time()
        try:
            yield
        finally:
            self.cpu_seconds += time.process_time() - start

    def step(self) -> None:
        self.steps += 1


def save_synthetic(folder: str, images: Tensor, labels: Tensor, timer: LoopTimer, **extra: Any) -> str:
    """Write ``{folder}/synthetic.pt`` (tensors and plain numbers only: loadable as data)."""
    path = os.path.join(folder, SYNTHETIC_FILE)
    torch.save({"images": images.detach().cpu(), "labels": labels.detach().cpu(), "cpu_seconds": timer.cpu_seconds,
                "steps": timer.steps, **extra}, path)
    return path


def synthetic_extras(data: Dict[str, Any]) -> Dict[str, Optional[float]]:
    """The numbers of a loaded ``synthetic.pt`` besides images and labels (``None`` where absent)."""
    out: Dict[str, Optional[float]] = {}
    for key in ("cpu_seconds", "steps", "syn_lr"):
        value = data.get(key)
        out[key] = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    return out
