"""DELT (VILA-Lab/DELT): SRe²L's recover loop started from real images, with EarlyLate rounds that
forward a growing subset of a batch's images.

One script, ``recover/recover.py``; ``--dataset`` and ``--arch-name`` pick the teacher and what it
sees. The decoupled capture reads the rows each round forwards (``inputs[slicing_list[round]]``)
from the graph, so only those get the term, labelled by the targets the criterion receives, and
CD also pushes away from the last embeddings of the batch's other rows (module doc of
:mod:`dire_plugin.hooks.decoupled`). Nothing here is DELT-specific code in the capture: the patch
declares the script's data and teachers.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Tuple

from dire_plugin.embeddings.realdata import RealDataSpec
from dire_plugin.hooks.declare import ScriptSpec, Target, Weights
from dire_plugin.hooks.patcher import method_patch

from .sre2l import IMAGENET, SMOKE_ARCH, TINY

METHOD = "delt"
SCRIPT = "recover/recover.py"

#: ``--dataset`` → (classes, normalisation, input size of torchvision teachers, of the ConvNets),
#: as ``recover.py``'s ``parse_args`` and ``get_mean_std`` set them.
_CIFAR = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
_IMAGENET = (IMAGENET.mean, IMAGENET.std)
DATASETS: Dict[str, Tuple[int, str, Tuple[Any, Any], int, int]] = {
    "imagenet-1k": (1000, "imagefolder", _IMAGENET, 224, 64),
    "imagenet-100": (100, "imagefolder", _IMAGENET, 224, 128),
    "imagenet-woof": (10, "imagefolder", _IMAGENET, 224, 128),
    "imagenet-nette": (10, "imagefolder", _IMAGENET, 224, 128),
    "tinyimagenet": (200, "imagefolder", (TINY.mean, TINY.std), 64, 64),
    "cifar10": (10, "cifar10", _CIFAR, 32, 32),
    "cifar100": (100, "cifar100", _CIFAR, 32, 32),
}
#: ``--dataset`` when the option is absent (its argparse default).
DEFAULT_DATASET = "imagenet-1k"
#: ``load_model`` builds a ConvNet for any ``--arch-name`` containing "conv"; width 128, depth its last digit.
CONV_WIDTH = 128


def _real(kind: str, norm: Tuple[Any, Any], size: int) -> RealDataSpec:
    # The bank sees real images as the script prepares its own real start images (Resize to
    # size // 7 * 8, then CenterCrop): a synthetic image at step 0 and its real original then
    # give the same embedding, the zero-distance case DiRe's clamp exists for. At 224 px this is
    # ImageNet's usual 256/224 evaluation transform.
    return RealDataSpec(kind, crop=size, resize=size // 7 * 8, mean=norm[0], std=norm[1])


def convnet_path(dataset: str, arch: str) -> str:
    """Where ``load_model`` reads a ConvNet teacher, whatever ``--arch-path`` says."""
    return f"/workspace/save/{dataset}_{arch}.pth"


# Smoke runs: the init folder holds 2 classes of 3 images (the script synthesises the classes its
# init folder holds), batches of 4 (so class 1 straddles two batches), EarlyLate rounds of one
# iteration: rounds forward 1, 2, then 3 images of each class. The real data still has every class
# of the teacher (the bank's class count is checked against it).
SMOKE_CONV = "conv4"
_SMOKE = ("--init-data-path", "{init}", "--syn-data-path", "{out}", "--exp-name", "smoke", "--workers", "0",
          "--batch-size", "4", "--lr", "0.25", "--r-bn", "0.01", "--jitter", "0", "--easy2hard-mode", "cosine",
          "--milestone", "1", "--store-best-images")
_EARLY_LATE = ("--ipc", "3", "--iteration", "3", "--use-early-late", "--round-iterations", "1")
_SMOKE_INIT = dict(smoke_init="folders", smoke_init_classes=2, smoke_init_images=3)


def _spec(dataset: str, conv: bool) -> ScriptSpec:
    classes, kind, norm, size, conv_size = DATASETS[dataset]
    if conv:  # a ConvNet from the hard-coded path, {"model": ...} without "module."
        return ScriptSpec(
            _real(kind, norm, conv_size), num_classes=classes, arch=SMOKE_CONV, checkpoint_key="model",
            checkpoint_at=convnet_path(dataset, SMOKE_CONV), checkpoint_writer="dire_plugin.patches.delt:write_convnet",
            **_SMOKE_INIT,
        )
    # torchvision: weights="DEFAULT" (downloaded; the CPU shim builds it random), or with
    # --arch-path {"model": ...} at num_classes, with the CIFAR stem for CIFAR and Tiny.
    return ScriptSpec(_real(kind, norm, size), num_classes=classes, checkpoint_key="model",
                      cifar_stem=dataset in ("cifar10", "cifar100", "tinyimagenet"), **_SMOKE_INIT)


def _by_arch(dataset: str) -> ScriptSpec:
    return replace(_spec(dataset, conv=False), by_option=("--arch-name", (("*conv*", _spec(dataset, conv=True)),)))


SCRIPTS = {
    # The published commands: ImageNet-1K with ResNet-18 (EarlyLate at IPC 50 and 10, plain at IPC 1)
    # and with conv4 (scripts/*_synthesis.sh). This spec stands for the script's defaults (ImageNet-1K,
    # a torchvision teacher with downloaded weights: no checkpoint); --dataset, then --arch-name pick
    # the others. Smoke: a small torchvision teacher with EarlyLate; the ConvNet from its fixed path;
    # CIFAR-10 with an --arch-path checkpoint (no rounds).
    SCRIPT: replace(
        _by_arch(DEFAULT_DATASET), checkpoint_key=None,
        by_option=("--dataset", tuple((name, _by_arch(name)) for name in DATASETS), DEFAULT_DATASET),
        smoke_args=_SMOKE,
        smoke_variants=(
            ("early-late", ("--dataset", "imagenet-1k", "--arch-name", SMOKE_ARCH, *_EARLY_LATE)),
            ("conv4", ("--dataset", "imagenet-1k", "--arch-name", SMOKE_CONV, *_EARLY_LATE)),
            ("cifar10", ("--dataset", "cifar10", "--arch-name", "resnet18", "--arch-path", "{ckpt}", "--ipc", "1",
                         "--iteration", "2")),
        ),
    ),
}

#: SRe²L's loss (CE + 0.01 BN prior) and Adam (lr 0.25, betas 0.5/0.9) in its scripts: the released weights.
DEFAULT_WEIGHTS = Weights(why="SRe²L's loss and Adam optimiser: the released SRe²L weights")

TARGETS = (
    Target(SCRIPT, "get_images"),
    Target(SCRIPT, "get_round_imgs_indx"),
    Target(SCRIPT, "main_syn"),
    Target(SCRIPT, "save_images"),
    Target("recover/utils.py", "BNFeatureHook", module="utils"),
    Target("recover/utils.py", "ImageFolder", module="utils"),
    Target("recover/models.py", "load_model", module="models"),
)


def write_convnet(spec: ScriptSpec, path: Path, seed: int = 0) -> Path:
    """A random-init ConvNet teacher as ``load_model`` reads it (``{"model": state_dict}``): depth
    the last digit of ``spec.arch``, width 128, BatchNorm, average pooling, ``spec.real_data.crop``
    pixels. Built from layers of ours with the same parameter names and shapes, for smoke runs."""
    import torch
    from torch import nn

    depth, size = int(spec.arch[-1]), spec.real_data.crop
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers = nn.ModuleDict({
            "conv": nn.ModuleList(nn.Conv2d(3 if d == 0 else CONV_WIDTH, CONV_WIDTH, 3, padding=1) for d in range(depth)),
            "norm": nn.ModuleList(nn.BatchNorm2d(CONV_WIDTH) for _ in range(depth)),
        })
        classifier = nn.Linear(CONV_WIDTH * (size >> depth) ** 2, spec.num_classes)
    state = {f"layers.{k}": v for k, v in layers.state_dict().items()}
    state.update({f"classifier.{k}": v for k, v in classifier.state_dict().items()})
    torch.save({"model": state}, path)
    return path


# The patch itself needs torch: built on first use, so that reading SCRIPTS/TARGETS stays fast.
patch, unpatch = method_patch(METHOD, lambda: SCRIPTS, TARGETS, capture="decoupled")
