"""scikit-learn's bundled digits, as the demo uses them: no download, works offline.

Pixels are quantised to 8 bits once, at load time, so that the tensors the teacher trains on and
the PNGs the DiRe bank reads (through ImageFolder) hold exactly the same values.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

import numpy as np
import torch
from torch import Tensor

from .spec import MEAN, NUM_CLASSES, SPLIT_SEED, STD, TEST_SIZE

__all__ = ["Digits", "load_digits_split", "normalise", "denormalise", "real_subset", "write_image_folder"]


@dataclass(frozen=True)
class Digits:
    """The stratified split, as normalised ``[N, 3, 8, 8]`` float tensors and int64 labels."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    train_u8: np.ndarray  # [N, 8, 8] uint8, for the ImageFolder copy


def normalise(pixels: Tensor) -> Tensor:
    """``[N, 8, 8]`` values in [0, 1] → ``[N, 3, 8, 8]`` normalised (grey replicated)."""
    x = pixels.float().unsqueeze(1).expand(-1, 3, -1, -1)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def denormalise(x: Tensor) -> Tensor:
    """Normalised images → pixel values in [0, 1]."""
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1)


def load_digits_split() -> Digits:
    """1,797 digits → 1,347 train / 450 test, stratified with seed 0."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # Digits hold 0..16: map to 8-bit like a PNG would store them.
    u8 = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    xtr, xte, ytr, yte = train_test_split(
        u8, digits.target, test_size=TEST_SIZE, stratify=digits.target, random_state=SPLIT_SEED
    )
    as_x = lambda a: normalise(torch.from_numpy(a.astype(np.float32) / 255.0))  # noqa: E731
    return Digits(as_x(xtr), torch.from_numpy(ytr).long(), as_x(xte), torch.from_numpy(yte).long(), xtr)


def real_subset(data: Digits, ipc: int, seed: int) -> Tuple[Tensor, Tensor]:
    """``ipc`` random training images per class (the reference row of the report)."""
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in range(NUM_CLASSES):
        idx = torch.nonzero(data.train_y == c).flatten()
        picks.append(idx[torch.randperm(len(idx), generator=g)[:ipc]])
    idx = torch.cat(picks)
    return data.train_x[idx], data.train_y[idx]


def write_image_folder(root: os.PathLike, data: Digits) -> Path:
    """The training split as ``root/{class}/{i:04d}.png`` (RGB), written once.

    Written to a temporary sibling and renamed, so an interrupted run never leaves a half
    folder that a later run (or the bank's cache key, which counts images) would trust.
    """
    from PIL import Image

    root = Path(root)
    done = root / ".complete"
    if done.is_file() and done.read_text().strip() == str(len(data.train_u8)):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    labels = data.train_y.tolist()
    for i, (img, c) in enumerate(zip(data.train_u8, labels)):
        folder = tmp / str(c)
        folder.mkdir(exist_ok=True)
        Image.fromarray(np.repeat(img[:, :, None], 3, axis=2), mode="RGB").save(folder / f"{i:04d}.png")
    (tmp / ".complete").write_text(str(len(data.train_u8)))
    if root.exists():
        shutil.rmtree(root)
    os.replace(tmp, root)
    return root
