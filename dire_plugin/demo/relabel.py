"""Relabel and evaluate: a fresh student learns a distilled set from the teacher's soft labels.

As in SRe²L's relabel step, the hard labels of the set are not used: every batch is shifted and
the student matches, by KL divergence at temperature T, the teacher's soft label of exactly the
shifted image it sees. A ±1 px shift has only nine outcomes, so the teacher labels all nine
versions of every image once, up front: the same targets as labelling each batch on the fly,
for a ninth of the teacher's forwards at IPC 50 (and none repeated per step).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .model import DigitsConvNet, apply_shift, nhwc, shift_offsets
from .teacher import accuracy

__all__ = ["StudentSettings", "soft_labels_per_shift", "train_student"]


@dataclass(frozen=True)
class StudentSettings:
    steps: int = 400
    batch_size: int = 100
    lr: float = 2e-3
    weight_decay: float = 0.01
    temperature: float = 4.0
    max_shift: int = 1


@torch.no_grad()
def soft_labels_per_shift(teacher: nn.Module, images: Tensor, temperature: float, max_shift: int = 1,
                          batch_size: int = 500) -> Tensor:
    """``[2s+1, 2s+1, N, C]``: the teacher's softened prediction for every image under every shift."""
    teacher.eval()
    span = 2 * max_shift + 1
    n = len(images)
    rows = []
    for dy in range(span):
        row = []
        for dx in range(span):
            shifted = apply_shift(images, torch.full((n,), dy), torch.full((n,), dx), max_shift)
            logits = torch.cat([teacher(nhwc(shifted[i:i + batch_size])) for i in range(0, n, batch_size)])
            row.append(F.softmax(logits / temperature, dim=1))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def train_student(images: Tensor, teacher: nn.Module, test_x: Tensor, test_y: Tensor, seed: int,
                  settings: StudentSettings = StudentSettings()) -> float:
    """Test accuracy (fraction) of a student trained on ``images`` with ``teacher``'s soft labels."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    student = nhwc(DigitsConvNet())
    t, s = settings.temperature, settings.max_shift
    targets = soft_labels_per_shift(nhwc(teacher), images, t, s)
    opt = torch.optim.AdamW(student.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    n = len(images)
    batch = min(settings.batch_size, n)
    order, pos = torch.randperm(n, generator=g), 0
    student.train()
    for step in range(settings.steps):
        for group in opt.param_groups:  # cosine decay to zero
            group["lr"] = 0.5 * settings.lr * (1 + math.cos(math.pi * step / settings.steps))
        if pos + batch > n:
            order, pos = torch.randperm(n, generator=g), 0
        idx = order[pos:pos + batch]
        pos += batch
        dy, dx = shift_offsets(len(idx), g, s)
        x = nhwc(apply_shift(images[idx], dy, dx, s))
        loss = F.kl_div(F.log_softmax(student(x) / t, dim=1), targets[dy, dx, idx], reduction="batchmean") * t * t
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return accuracy(student, test_x, test_y)
