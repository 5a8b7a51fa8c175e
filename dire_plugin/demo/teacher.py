"""Squeeze: train the demo's teacher once and cache it, keyed on everything that shapes it.

The cache file ``teacher-{dataset}-{settings key}-{data key}.pt`` holds the weights, the settings
and the data key they were trained with, and a checksum of the weights. Each use checks all of
them: a file that cannot be loaded, was trained on something else or whose weights are not the
ones written is retrained with one warning line, never reused and never a crash.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..errors import DiReInputError
from ..io.digest import hash_tensor, tensors_sha256
from ..io.files import atomic_torch_save, load_torch_file
from .data import DemoData
from .log import warn
from .model import Augmentation, build_model, nhwc
from .spec import DIGITS, DatasetSpec

__all__ = ["TeacherSettings", "teacher_settings", "load_or_train_teacher", "load_teacher", "accuracy", "autocast",
           "data_key"]


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


def data_key(data: DemoData) -> str:
    """sha256 of the training images and labels (shapes and dtypes included): the teacher is
    trained on them, so its cache is keyed on them, not on where they were read from."""
    return tensors_sha256((data.train_x, data.train_y))


def _weights_digest(state: Mapping[str, Tensor]) -> str:
    """sha256 of every tensor's name, shape, dtype and bytes: torch loads a file whose tensor data
    was damaged without a word, so the checkpoint carries this to be checked."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(f"{name};".encode())
        hash_tensor(h, state[name])
    return h.hexdigest()


def _model_from(ckpt: Any, what: str) -> nn.Module:
    """The teacher a loaded checkpoint describes, on the CPU; a one-line error when it does not."""
    try:
        s = TeacherSettings(**ckpt["settings"])
        model = build_model(s.arch, s.num_classes)
        model.load_state_dict(ckpt["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # missing keys, foreign settings, other shapes
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DiReInputError(f"{what} is not a teacher checkpoint of this demo ({first})") from None
    return model


def load_teacher(path: os.PathLike, device: torch.device = torch.device("cpu")) -> nn.Module:
    """The cached teacher, in eval mode; loaded as data (``weights_only``), so a cache file can run
    no code. A file that is not one is a one-line :class:`~dire_plugin.errors.DiReInputError`."""
    ckpt = load_torch_file(path, "teacher checkpoint")
    return nhwc(_model_from(ckpt, f"teacher checkpoint {path}")).to(device).eval()


def _cached_teacher(path: Path, settings: TeacherSettings, data: str, device: torch.device) -> Optional[nn.Module]:
    """The teacher cached at ``path`` if it is sound and this key's; otherwise ``None`` after one
    warning line (nothing there: ``None`` without one). What is there is removed when it is not a file."""
    if not path.exists() and not path.is_symlink():
        return None
    if not path.is_file():
        warn(f"cached teacher {path} is not a file; replacing it and retraining")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        return None
    try:
        ckpt = load_torch_file(path, "teacher checkpoint")
        if not isinstance(ckpt, dict):
            raise DiReInputError(f"teacher checkpoint {path} holds a {type(ckpt).__name__}, not a dict")
        problem = None
        if ckpt.get("settings") != asdict(settings):
            problem = "was trained with other settings"
        elif ckpt.get("data") != data:
            problem = "was trained on other data"
        elif (not isinstance(ckpt.get("state_dict"), dict)
              or not all(isinstance(v, Tensor) for v in ckpt["state_dict"].values())
              or ckpt.get("weights") != _weights_digest(ckpt["state_dict"])):
            problem = "holds weights that do not match their checksum (damaged)"
        else:
            return nhwc(_model_from(ckpt, f"teacher checkpoint {path}")).to(device).eval()
    except DiReInputError as e:
        warn(f"cached teacher unusable: {e}; retraining it")
        return None
    warn(f"cached teacher {path} {problem}; retraining it")
    return None


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
    """``(checkpoint path, teacher, test accuracy, cache hit)``; trains only when no sound cached
    teacher of these settings and this training data exists (see the module doc)."""
    data_digest = data_key(data)
    path = Path(cache_dir) / f"teacher-{settings.dataset}-{settings.key()}-{data_digest[:12]}.pt"
    model = _cached_teacher(path, settings, data_digest, device)
    hit = model is not None
    if model is None:
        model = _train(data, settings, device, progress)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        # Atomic: a concurrent demo, the recover runs and the students never read half a file.
        atomic_torch_save(path, {"state_dict": state, "settings": asdict(settings), "data": data_digest,
                                 "weights": _weights_digest(state)})
    return path, model, accuracy(model, data.test_x, data.test_y), hit
