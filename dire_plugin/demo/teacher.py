"""Squeeze: train the demo's teacher once and cache it, keyed on everything that shapes it."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import nn
from tqdm import tqdm

from .data import DemoData
from .model import Augmentation, build_model, nhwc
from .spec import DIGITS, DatasetSpec

__all__ = ["TeacherSettings", "teacher_settings", "load_or_train_teacher", "load_teacher", "accuracy", "autocast"]


@dataclass(frozen=True)
class TeacherSettings:
    """What determines the teacher's weights (and so its cache key)."""

    dataset: str = "digits"
    arch: str = "convnet"
    num_classes: int = 10
    seed: int = 0
    epochs: int = 15
    batch_size: int = 32  # digits: 99.1-99.6 % over seeds 0-3; 64 gave 97.8-99.3 %
    max_lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    max_shift: int = 1
    flip: bool = False
    #: CPU threads while training (0: torch's default). Digits: batches of 32 tiny images leave
    #: a second thread nothing but synchronisation (measured slower with two on 2 cores).
    threads: int = 1
    #: Bumped when the architecture or the data pipeline changes, so old caches are not reused.
    version: int = 2

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def teacher_settings(spec: DatasetSpec, epochs: Optional[int] = None) -> TeacherSettings:
    """The teacher recipe for ``spec``: digits as DEMO-FINDINGS measured it; CIFAR a ResNet-18
    one-cycle run (SRe²L trains its CIFAR teachers far longer; this is a demo's budget)."""
    base = TeacherSettings(dataset=spec.name, arch=spec.arch, num_classes=spec.num_classes,
                           max_shift=spec.max_shift, flip=spec.flip)
    if spec is not DIGITS:
        base = replace(base, epochs=30, batch_size=256, max_lr=0.2, threads=0)
    return replace(base, epochs=epochs) if epochs else base


def autocast(device: torch.device):
    """bfloat16 autocast on a GPU (tensor cores for ResNet-18 on CIFAR); nothing on the CPU,
    where the demo's small networks gain nothing from it."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy (fraction) of ``model`` in eval mode, on the device of its weights."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    with autocast(device):
        for i in range(0, len(x), batch_size):
            pred = model(nhwc(x[i:i + batch_size].to(device))).argmax(1)
            correct += int((pred.cpu() == y[i:i + batch_size]).sum())
    model.train(was_training)
    return correct / len(x)


def load_teacher(path: os.PathLike, device: torch.device = torch.device("cpu")) -> nn.Module:
    """The cached teacher, in eval mode; ``weights_only`` so a cache file can run no code."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    s = TeacherSettings(**ckpt["settings"])
    model = build_model(s.arch, s.num_classes)
    model.load_state_dict(ckpt["state_dict"])
    return nhwc(model).to(device).eval()


def _train(data: DemoData, s: TeacherSettings, device: torch.device, progress: bool) -> nn.Module:
    threads = torch.get_num_threads()
    if s.threads:
        torch.set_num_threads(s.threads)
    try:
        return _train_loop(data, s, device, progress)
    finally:
        torch.set_num_threads(threads)


def _train_loop(data: DemoData, s: TeacherSettings, device: torch.device, progress: bool) -> nn.Module:
    torch.manual_seed(s.seed)
    g = torch.Generator().manual_seed(s.seed)
    augment = Augmentation(s.max_shift, s.flip)
    model = nhwc(build_model(s.arch, s.num_classes)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=s.max_lr, momentum=s.momentum, weight_decay=s.weight_decay, nesterov=True)
    train_x, train_y = data.train_x.to(device), data.train_y.to(device)
    n = len(train_x)
    steps_per_epoch = (n + s.batch_size - 1) // s.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s.max_lr, epochs=s.epochs, steps_per_epoch=steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in tqdm(range(s.epochs), desc=f"squeeze: teacher ({s.arch} on {s.dataset})", unit="epoch", leave=False,
                  disable=not progress):
        order = torch.randperm(n, generator=g).to(device)
        for i in range(0, n, s.batch_size):
            idx = order[i:i + s.batch_size]
            with autocast(device):
                loss = loss_fn(model(nhwc(augment(train_x[idx], g))), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def load_or_train_teacher(data: DemoData, cache_dir: os.PathLike, settings: TeacherSettings,
                          device: torch.device = torch.device("cpu"),
                          progress: bool = True) -> Tuple[Path, nn.Module, float, bool]:
    """``(checkpoint path, teacher, test accuracy, cache hit)``; trains only on a cache miss.

    A CIFAR teacher is also keyed on the data folder, so two copies of CIFAR never share one.
    """
    key = settings.key()
    if settings.dataset != DIGITS.name:
        key += "-" + hashlib.sha256(str(data.real_dir).encode()).hexdigest()[:8]
    path = Path(cache_dir) / f"teacher-{settings.dataset}-{key}.pt"
    hit = path.is_file()
    if hit:
        model = load_teacher(path, device)
    else:
        model = _train(data, settings, device, progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        state = {k: v.cpu() for k, v in model.state_dict().items()}
        torch.save({"state_dict": state, "settings": asdict(settings)}, tmp)
        os.replace(tmp, path)  # concurrent demos never read a half-written file
    return path, model, accuracy(model, data.test_x, data.test_y), hit
