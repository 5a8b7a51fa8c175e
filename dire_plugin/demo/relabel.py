"""Relabel and evaluate: a fresh student learns a distilled set from the teacher's soft labels.

As in SRe²L's relabel step, the hard labels of the set are not used: every batch is augmented
and the student matches, by KL divergence at temperature T, the teacher's soft label of exactly
the augmented image it sees. The augmentation has few outcomes (nine ±1 px shifts on digits), so
when labelling every view of every image once costs fewer teacher forwards than labelling each
batch, the teacher does that up front: the same targets either way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .model import Augmentation, build_model, nhwc
from .teacher import accuracy, autocast

__all__ = ["StudentSettings", "soft_labels_per_view", "train_student"]


@dataclass(frozen=True)
class StudentSettings:
    steps: int = 400
    batch_size: int = 100
    lr: float = 2e-3
    weight_decay: float = 0.01
    temperature: float = 4.0
    max_shift: int = 1
    flip: bool = False
    arch: str = "convnet"
    num_classes: int = 10

    @property
    def augmentation(self) -> Augmentation:
        return Augmentation(self.max_shift, self.flip)

    def describe(self) -> str:
        flip = " and flip" if self.flip else ""
        return (f"fresh {self.arch}, {self.steps} steps, batch {self.batch_size}, AdamW {self.lr:g}, KL to the "
                f"teacher's soft labels at T={self.temperature:g}, ±{self.max_shift} px shift{flip}")

    def train(self, images: Tensor, labels: Tensor, teacher: nn.Module, test_x: Tensor, test_y: Tensor,
              seed: int) -> float:
        """The student pool's entry point: the set's own labels are not used (soft labels only)."""
        return train_student(images, teacher, test_x, test_y, seed, self)


@torch.no_grad()
def _soft_labels(teacher: nn.Module, x: Tensor, temperature: float) -> Tensor:
    with autocast(x.device):
        return F.softmax(teacher(nhwc(x)).float() / temperature, dim=1)


@torch.no_grad()
def soft_labels_per_view(teacher: nn.Module, images: Tensor, temperature: float, augment: Augmentation,
                         batch_size: int = 500) -> Tensor:
    """``[views, N, C]``: the teacher's softened prediction for every image in every view."""
    teacher.eval()
    n = len(images)
    table = []
    for v in range(augment.views):
        view = torch.full((n,), v)
        parts = [_soft_labels(teacher, augment.apply(images[i:i + batch_size], view[i:i + batch_size]), temperature)
                 for i in range(0, n, batch_size)]
        table.append(torch.cat(parts))
    return torch.stack(table)


def train_student(images: Tensor, teacher: nn.Module, test_x: Tensor, test_y: Tensor, seed: int,
                  settings: StudentSettings = StudentSettings()) -> float:
    """Test accuracy (fraction) of a student trained on ``images`` with ``teacher``'s soft labels,
    on the teacher's device."""
    device = next(teacher.parameters()).device
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    student = nhwc(build_model(settings.arch, settings.num_classes)).to(device)
    teacher.eval()
    images = images.to(device)
    t, augment = settings.temperature, settings.augmentation
    n = len(images)
    batch = min(settings.batch_size, n)
    table = None
    if augment.views * n <= settings.steps * batch:
        table = soft_labels_per_view(teacher, images, t, augment)
    opt = torch.optim.AdamW(student.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    order, pos = torch.randperm(n, generator=g), 0
    student.train()
    for step in range(settings.steps):
        for group in opt.param_groups:  # cosine decay to zero
            group["lr"] = 0.5 * settings.lr * (1 + math.cos(math.pi * step / settings.steps))
        if pos + batch > n:
            order, pos = torch.randperm(n, generator=g), 0
        idx = order[pos:pos + batch]
        pos += batch
        view = augment.sample(len(idx), g)
        x = augment.apply(images[idx.to(device)], view)
        target = table[view.to(device), idx.to(device)] if table is not None else _soft_labels(teacher, x, t)
        with autocast(device):
            logits = student(nhwc(x)).float()
        loss = F.kl_div(F.log_softmax(logits / t, dim=1), target, reduction="batchmean") * t * t
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return accuracy(student, test_x, test_y)
