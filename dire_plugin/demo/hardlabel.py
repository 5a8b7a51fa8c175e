"""The matching methods' evaluation protocol (DC-BENCH's and MTT's ``evaluate_synset``): a freshly
initialised network of the synthesis architecture learns a distilled set from its **hard** labels
and is tested on the held-out images. No teacher: DM and MTT distil without one.

As those methods do it: ``SGD(lr, momentum 0.9, weight decay 5e-4)``, cross-entropy on the set's
own labels, DSA on every batch, the learning rate divided by ten after half of the training. DM
evaluates at ``lr`` 0.01; MTT at the student learning rate it learnt with the images (``syn_lr``).
Written for the demo from that description (not upstream code); steps instead of epochs so that a
set of any size trains for the same number of updates.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .dsa import DEFAULT_STRATEGY, DiffAugment
from .model import build_model
from .teacher import accuracy

__all__ = ["HardLabelSettings", "train_hard_label"]


@dataclass(frozen=True)
class HardLabelSettings:
    """One protocol: the network, its optimiser and schedule. ``lr`` is DM's 0.01 unless a set
    comes with its own (MTT's learnt ``syn_lr``: :meth:`with_lr`)."""

    steps: int = 200
    batch_size: int = 256
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    strategy: str = DEFAULT_STRATEGY
    arch: str = "matching_convnet"
    num_classes: int = 10

    def with_lr(self, lr: float) -> "HardLabelSettings":
        return replace(self, lr=float(lr))

    def describe(self) -> str:
        return (f"fresh {self.arch}, {self.steps} steps, batch {self.batch_size}, SGD lr {self.lr:g} (/10 at half), "
                f"momentum {self.momentum:g}, wd {self.weight_decay:g}, DSA {self.strategy}, hard labels")

    def train(self, images: Tensor, labels: Tensor, teacher: nn.Module, test_x: Tensor, test_y: Tensor,
              seed: int) -> float:
        """The student pool's entry point (the teacher is not used)."""
        return train_hard_label(images, labels, test_x, test_y, seed, self, device=next(teacher.parameters()).device)


def train_hard_label(images: Tensor, labels: Tensor, test_x: Tensor, test_y: Tensor, seed: int,
                     settings: HardLabelSettings = HardLabelSettings(),
                     device: torch.device = torch.device("cpu")) -> float:
    """Test accuracy (fraction) of a fresh network trained on ``(images, labels)`` (see module doc)."""
    with torch.random.fork_rng(devices=[]):  # the pool's worker keeps its own stream
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        net = build_model(settings.arch, settings.num_classes).to(device)
        opt = torch.optim.SGD(net.parameters(), lr=settings.lr, momentum=settings.momentum,
                              weight_decay=settings.weight_decay)
        images, labels = images.to(device), labels.to(device).long()
        n = len(images)
        batch = min(settings.batch_size, n)
        order, pos = torch.randperm(n, generator=g), 0
        net.train()
        for step in range(settings.steps):
            if step == settings.steps // 2:
                for group in opt.param_groups:
                    group["lr"] = settings.lr * 0.1
            if pos + batch > n:
                order, pos = torch.randperm(n, generator=g), 0
            idx = order[pos:pos + batch].to(device)
            pos += batch
            x = DiffAugment(images[idx], settings.strategy)  # per image, from the generator seeded above
            loss = F.cross_entropy(net(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return accuracy(net, test_x, test_y)
