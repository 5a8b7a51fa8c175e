"""The demo's networks (teacher and students share one architecture) and their augmentation."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["DigitsConvNet", "MatchingConvNet", "ARCHS", "build_model", "Augmentation", "nhwc"]


class DigitsConvNet(nn.Module):
    """3 × (conv3×3-BN-ReLU: 32/64/128), max-pooling after the first two, global average
    pooling, then ``classifier`` (the last ``nn.Linear``: its input is the embedding DiRe uses).

    BatchNorm matters: the recover script's BN prior is what SRe²L distils from.
    """

    def __init__(self, num_classes: int = 10, widths: tuple = (32, 64, 128)) -> None:
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


class MatchingConvNet(nn.Module):
    """The ConvNet of the matching methods (DC/DM in DC-BENCH, MTT), at the digits' scale: ``depth``
    blocks of conv3x3 (with bias) - instance norm (``GroupNorm`` with one group per channel, affine)
    - ReLU - 2x2 average pooling, then ``classifier``. ``embed`` returns the input of the classifier
    (what DM matches).

    No BatchNorm, as in those methods: DM's random networks need no statistics, and an MTT expert
    buffer holds parameters only. Width 32 and depth 2 (a 128-d embedding of an 8x8 digit) keep
    MTT's unrolled student affordable on a CPU.
    """

    def __init__(self, num_classes: int = 10, width: int = 32, depth: int = 2, channel: int = 3,
                 image_size: int = 8) -> None:
        super().__init__()
        layers = []
        cin, size = channel, image_size
        for _ in range(depth):
            layers += [nn.Conv2d(cin, width, 3, padding=1), nn.GroupNorm(width, width, affine=True),
                       nn.ReLU(inplace=True), nn.AvgPool2d(2)]
            cin, size = width, size // 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * size * size, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        return torch.flatten(self.features(x), 1)

    def forward(self, x: Tensor) -> Tensor:
        # Not through self.embed: DM's capture wraps embed, and a classification forward (training
        # or testing a network) must not look like one of DM's embed calls.
        return self.classifier(torch.flatten(self.features(x), 1))


def _cifar_resnet18(num_classes: int) -> nn.Module:
    """torchvision's ResNet-18 with the CIFAR stem SRe²L's CIFAR teachers use: a 3x3 stride-1
    ``conv1`` and no max-pool, so 32x32 inputs keep their resolution into ``layer1``."""
    import torchvision

    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


#: Architectures the demo (and its recover script's ``--arch-name``) builds by name.
ARCHS = {"convnet": DigitsConvNet, "matching_convnet": MatchingConvNet, "resnet18": _cifar_resnet18}


def build_model(arch: str, num_classes: int) -> nn.Module:
    """A freshly initialised network of ``arch`` (a key of :data:`ARCHS`)."""
    try:
        return ARCHS[arch](num_classes=num_classes)
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}: one of {', '.join(ARCHS)}") from None


def nhwc(x):
    """Channels-last copy of a module or 4-D tensor (a module is converted in place).

    On CPU, oneDNN runs these tiny convolutions and max-pools 1.5-2.5x faster in NHWC than in
    NCHW (measured for a training step and a forward at batch 100); results agree to float
    round-off.
    """
    if isinstance(x, nn.Module):
        return x.to(memory_format=torch.channels_last)
    return x.contiguous(memory_format=torch.channels_last)


@dataclass(frozen=True)
class Augmentation:
    """Random shift by up to ``max_shift`` pixels (border fill) and, with ``flip``, a random
    horizontal flip: SRe²L's random crop and flip at these image sizes.

    Every outcome is a *view* numbered ``0 .. views-1``, so a caller can draw views once and
    reuse them (the relabel step labels each view of an image with the teacher).
    """

    max_shift: int
    flip: bool = False

    @property
    def views(self) -> int:
        return (2 * self.max_shift + 1) ** 2 * (2 if self.flip else 1)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` random view numbers (on the CPU, where ``generator`` lives)."""
        return torch.randint(0, self.views, (n,), generator=generator)

    def apply(self, x: Tensor, view: Tensor) -> Tensor:
        """Image ``i`` of ``x`` in view ``view[i]``."""
        span = 2 * self.max_shift + 1
        view = view.to(x.device)
        flip, rest = view // (span * span), view % (span * span)
        dy, dx = rest // span, rest % span
        n, _, h, w = x.shape
        if self.flip:
            x = torch.where(flip.bool()[:, None, None, None], x.flip(3), x)
        # Border fill: zero-padding would invent a colour the normalised data never has.
        padded = nn.functional.pad(x, (self.max_shift,) * 4, mode="replicate")
        rows = dy[:, None] + torch.arange(h, device=x.device)[None, :]  # n × h
        cols = dx[:, None] + torch.arange(w, device=x.device)[None, :]  # n × w
        idx = torch.arange(n, device=x.device)[:, None, None]
        # out[i, c, y, x] = padded[i, c, rows[i, y], cols[i, x]]
        return padded.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Every image of ``x`` in its own random view."""
        return self.apply(x, self.sample(len(x), generator))
