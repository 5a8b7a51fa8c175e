"""Small frozen teachers, their BN prior and random banks for the in-process tests of the
decoupled capture (imported by name, like ``lookalike``)."""
from typing import Sequence

import torch
from torch import nn

from dire_plugin import RealEmbeddingBank


def frozen_teacher(seed: int, classes: int, widths: Sequence[int]) -> nn.Sequential:
    """A 3×3 conv, BatchNorm and ReLU per width, global average pooling and a linear classifier
    (the embedding is its input), in eval mode with every parameter frozen; the BN running means
    are moved off zero, so a BN prior is not trivially small."""
    torch.manual_seed(seed)
    layers = []
    for before, width in zip((3, *widths), widths):
        layers += [nn.Conv2d(before, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], classes))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
    net.eval()
    for p in net.parameters():
        p.requires_grad = False
    return net


class BNPrior:
    """SRe²L's BN prior in our own lines: a forward hook on each BatchNorm layer of ``model`` keeps
    the distance of the batch statistics to the running ones; the loop reads :meth:`loss` *after*
    its criterion call, as the upstream scripts do."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        self.values = {}
        for m in self.layers:
            m.register_forward_hook(self.hook)

    def hook(self, module, inputs, output):
        x = inputs[0]
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
        self.values[module] = torch.norm(module.running_var - var, 2) + torch.norm(module.running_mean - mean, 2)

    def loss(self) -> torch.Tensor:
        return torch.stack([self.values[m] for m in self.layers]).sum()


def random_bank(classes: int, per_class: int, dim: int, seed: int = 1) -> RealEmbeddingBank:
    """``per_class`` positive random embeddings per class (post-ReLU features are non-negative)."""
    g = torch.Generator().manual_seed(seed)
    return RealEmbeddingBank.from_tensors(torch.rand(classes * per_class, dim, generator=g) + 0.1,
                                          torch.arange(classes).repeat(per_class))
