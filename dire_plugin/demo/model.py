"""The demo's network: teacher and students share it."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor, nn

from .spec import NUM_CLASSES

__all__ = ["DigitsConvNet", "shift", "shift_offsets", "apply_shift", "nhwc"]


class DigitsConvNet(nn.Module):
    """3 × (conv3×3-BN-ReLU: 32/64/128), max-pooling after the first two, global average
    pooling, then ``classifier`` (the last ``nn.Linear``: its input is the embedding DiRe uses).

    BatchNorm matters: the recover script's BN prior is what SRe²L distils from.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, widths: tuple = (32, 64, 128)) -> None:
        super().__init__()
        layers = []
        cin = 3
        for i, cout in enumerate(widths):
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def nhwc(x):
    """Channels-last copy of a module or 4-D tensor (a module is converted in place).

    On CPU, oneDNN runs these tiny convolutions and max-pools 1.5-2.5x faster in NHWC than in
    NCHW (measured for a training step and a forward at batch 100); results agree to float
    round-off.
    """
    if isinstance(x, nn.Module):
        return x.to(memory_format=torch.channels_last)
    return x.contiguous(memory_format=torch.channels_last)


def shift_offsets(n: int, generator: torch.Generator, max_shift: int = 1) -> Tuple[Tensor, Tensor]:
    """Random per-image offsets ``(dy, dx)``, each in ``[0, 2·max_shift]`` (``max_shift`` is no shift)."""
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    return dy, dx


def apply_shift(x: Tensor, dy: Tensor, dx: Tensor, max_shift: int = 1) -> Tensor:
    """Shift image ``i`` by ``(dy[i] - max_shift, dx[i] - max_shift)`` pixels, filling with the
    border (zero-padding would invent a colour the normalised data never has)."""
    n, _, h, w = x.shape
    padded = nn.functional.pad(x, (max_shift,) * 4, mode="replicate")
    rows = dy[:, None] + torch.arange(h)[None, :]  # n × h
    cols = dx[:, None] + torch.arange(w)[None, :]  # n × w
    idx = torch.arange(n)[:, None, None]
    # out[i, c, y, x] = padded[i, c, rows[i, y], cols[i, x]]
    return padded.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def shift(x: Tensor, generator: torch.Generator, max_shift: int = 1) -> Tensor:
    """Shift every image of a batch by its own random offset in [-max_shift, max_shift] pixels."""
    return apply_shift(x, *shift_offsets(len(x), generator, max_shift), max_shift)
