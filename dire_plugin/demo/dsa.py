"""Differentiable Siamese augmentation (DSA, Zhao & Bilen 2021) at the digits' scale: what the
demo's DM and MTT scripts augment real and synthetic batches with, and what their hard-label
students train with (the matching methods' evaluation protocol).

Written for the demo from the method's description, not taken from DC-BENCH: each call applies one
operation of ``strategy`` (``"scale_rotate_crop"``: scale, rotate, or a one-pixel translation),
drawn at random; gradients flow to the input (``grid_sample``). ``seed != -1`` is the Siamese
mode: one draw from that seed for the whole batch, so DM's real and synthetic batches of a class,
given the same seed, get the same transformation. ``seed == -1``: a draw per image from the global
torch generator (a seeded script stays reproducible).

No flip: a mirrored 2 or 5 is another glyph.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["ParamDiffAug", "DiffAugment", "DEFAULT_STRATEGY"]

DEFAULT_STRATEGY = "scale_rotate_crop"


@dataclass
class ParamDiffAug:
    """Ranges of the operations: scale factors in ``[1/ratio_scale, ratio_scale]``, rotations up
    to ``ratio_rotate`` degrees, translations up to ``ratio_crop_pad`` of the image side."""

    ratio_scale: float = 1.2
    ratio_rotate: float = 15.0
    ratio_crop_pad: float = 0.125


def _uniform(rows: int, generator: Optional[torch.Generator]) -> Tensor:
    return torch.rand(rows, generator=generator)


def _theta(op: str, rows: int, size: int, param: ParamDiffAug, generator: Optional[torch.Generator]) -> Tensor:
    """``[rows, 2, 3]`` affine matrices (``affine_grid``'s normalised coordinates) of one operation."""
    theta = torch.zeros(rows, 2, 3)
    if op == "scale":
        sx = _uniform(rows, generator) * (param.ratio_scale - 1 / param.ratio_scale) + 1 / param.ratio_scale
        sy = _uniform(rows, generator) * (param.ratio_scale - 1 / param.ratio_scale) + 1 / param.ratio_scale
        theta[:, 0, 0], theta[:, 1, 1] = sx, sy
    elif op == "rotate":
        angle = (_uniform(rows, generator) - 0.5) * 2 * param.ratio_rotate * math.pi / 180
        theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle), -torch.sin(angle)
        theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle), torch.cos(angle)
    elif op == "crop":
        # Whole-pixel translations: with align_corners a pixel is 2 / (size - 1) in these coordinates.
        limit = int(round(size * param.ratio_crop_pad))
        shift = torch.randint(-limit, limit + 1, (rows, 2), generator=generator).float()
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0
        theta[:, :, 2] = shift * 2 / (size - 1)
    else:
        raise ValueError(f"unknown DSA operation {op!r}: one of scale, rotate, crop")
    return theta


def DiffAugment(x: Tensor, strategy: str = DEFAULT_STRATEGY, seed: int = -1,
                param: Optional[ParamDiffAug] = None) -> Tensor:
    """``x [N, C, H, W]`` under one random operation of ``strategy`` (see the module doc); a new
    tensor, ``x`` itself for ``strategy`` ``""``/``"none"``."""
    if strategy in ("", "none", "None"):
        return x
    param = param or ParamDiffAug()
    generator = torch.Generator().manual_seed(int(seed)) if seed != -1 else None
    ops = strategy.split("_")
    op = ops[int(torch.randint(0, len(ops), (1,), generator=generator))]
    rows = 1 if generator is not None else x.shape[0]
    theta = _theta(op, rows, x.shape[-1], param, generator).to(device=x.device, dtype=x.dtype)
    theta = theta.expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)
