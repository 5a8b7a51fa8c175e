"""EDC (shaoshitong/EDC, NeurIPS 2024): G-VBSM's loop (several teachers, one per iteration, in
``mp.spawn`` workers) with real-image initialisation and class-wise ("category-aware") statistics.

The capture and the core's per-teacher keys are G-VBSM's (:mod:`.gvbsm`). Each branch runs
``recover.py`` (what its ``recover.sh`` runs); the G-VBSM-named script left beside it in the CIFAR
branches is not EDC (EDC#2).

Smoke runs: as G-VBSM's, plus made-up real images for ``--initial-img-dir`` and made-up
statistics in ``--statistic-path`` (a folder outside the checkout). At the pin the statistics
the checkout commits do not match the names ``recover.py`` asks for, and the class-wise ones are
not committed at all: a first run computes them from the training set, then stops
(``category_running_*_list[targets]`` indexes a Python list with a tensor until a run loads them
from files), so users run it twice; the smoke writes files of the shapes the teachers need.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from dire_plugin.hooks.declare import ScriptSpec, Weights, option_value
from dire_plugin.hooks.patcher import method_patch

from .gvbsm import (CIFAR10, CIFAR100, CIFAR_TEACHERS, PRETRAINED, TINY_GVBSM, Teachers, branch_targets,
                    require_upstream_imports, spawned_spec, write_teachers)
from .sre2l import IMAGENET

METHOD = "edc"

CIFAR_EDC_TEACHERS = (*CIFAR_TEACHERS, "ConvNetD1", "ConvNetD2", "ConvNetW32")
IMAGENET_TEACHERS = ("resnet18", "mobilenet_v2", "efficientnet_b0", "shufflenet_v2_x0_5", "alexnet")

#: Script → its teachers (built from checkpoints; ImageNet's are torchvision's, pretrained).
TEACHERS: Dict[str, Teachers] = {
    "Branch_CIFAR_10/recover/recover.py": Teachers("CIFAR-10", CIFAR_EDC_TEACHERS, 10, 32),
    "Branch_CIFAR_100/recover/recover.py": Teachers("CIFAR-100", CIFAR_EDC_TEACHERS, 100, 32),
    "Branch_Tiny_ImageNet/recover/recover.py": Teachers("Tiny-ImageNet", CIFAR_TEACHERS, 200, 64),
}

#: Script → how ``main_worker`` names a layer's statistics folder (``{cls}``: the teacher's class,
#: ``{aux}``: its name in ``aux_teacher``, ``{module}``: the layer's name) and the side of the
#: square patches its ``ConvFeatureHook`` averages over (``div_four_mul``/``div_sixteen_mul``).
STATISTICS: Dict[str, Tuple[str, int]] = {
    "Branch_CIFAR_10/recover/recover.py": ("{cls}_{aux}={module}", 4),
    "Branch_CIFAR_100/recover/recover.py": ("{cls}_{aux}={module}", 4),
    "Branch_Tiny_ImageNet/recover/recover.py": ("{cls}={module}", 4),
    "Branch_full_ImageNet_1k/recover/recover.py": ("{cls}={module}", 16),
}

# recover.sh's settings on two CPU workers (see gvbsm.py); the statistics and the images the
# synthesis starts from are made up outside the checkout; --train-data-path is then never read.
_SMOKE = ("--exp-name", "smoke", "--syn-data-path", "{out}", "--category-aware", "global", "--lr", "0.05",
          "--drop-rate", "0.0", "--training-momentum", "0.8", "--r-loss", "0.01", "--verifier",
          "--store-best-images", "--gpu-id", "0,1", "--statistic-path", "{work}/statistic",
          "--initial-img-dir", "{init}", "--train-data-path", "{work}/train")


def _spec(real: Any, classes: int, args: Sequence[str], timeout: int = 900) -> ScriptSpec:
    return spawned_spec(real, classes, (*_SMOKE, *args), timeout, smoke_init="folders",
                        smoke_prepare="dire_plugin.patches.edc:prepare_smoke")


SCRIPTS = {
    "Branch_CIFAR_10/recover/recover.py": _spec(
        CIFAR10, 10, (*PRETRAINED, "--batch-size", "10", "--ipc-number", "2", "--iteration", "4")),
    "Branch_CIFAR_100/recover/recover.py": _spec(
        CIFAR100, 100, (*PRETRAINED, "--batch-size", "20", "--ipc-number", "1", "--iteration", "2")),
    "Branch_Tiny_ImageNet/recover/recover.py": _spec(
        TINY_GVBSM, 200, (*PRETRAINED, "--batch-size", "40", "--ipc-number", "1", "--iteration", "1"), 1800),
    # 1000 classes at 224 px, five torchvision teachers and their class-wise statistics; batches of
    # 50 as for G-VBSM (memory).
    "Branch_full_ImageNet_1k/recover/recover.py": _spec(
        IMAGENET, 1000, ("--batch-size", "50", "--ipc-number", "1", "--iteration", "1", "--l2-scale", "0",
                         "--tv-l2", "0", "--nuc-norm", "1."), 3600),
}

#: G-VBSM's Adam on CE + feature matching: the released SRe²L weights, as for G-VBSM.
DEFAULT_WEIGHTS = Weights(why="SRe²L's loss and Adam optimiser with several teachers: the released SRe²L weights")

TARGETS = branch_targets("recover.py", ("BNFeatureHook", "ConvFeatureHook", "PreImgPathCache"))


# --- smoke runs (dire-apply --verify --smoke) -----------------------------------------------------


def write_statistics(teachers: List[Tuple[str, Any]], size: int, classes: int, options: Dict[str, Any]) -> int:
    """Made-up statistics for every BatchNorm and convolution of ``teachers`` (``(aux name, model)``)
    in the files ``utils.BNFeatureHook``/``ConvFeatureHook`` load with ``--category-aware global``:
    ``<root>/ConvFeatureHook/<layer>/running.npz`` and, per class ``c``,
    ``<root>/{BN,Conv}FeatureHook/class_<c>/<layer>/running.npz``; ``options``: ``root``, ``name``
    and ``patch`` (see :data:`STATISTICS`). The shapes come from one forward of each teacher at
    ``size`` px. Returns the number of files."""
    import numpy as np
    import torch
    from torch import nn

    root, form, patch = Path(options["root"]), options["name"], int(options["patch"])
    rng = np.random.default_rng(0)
    written = 0
    for aux, net in teachers:
        inputs: Dict[str, Tuple[int, ...]] = {}

        def record(module: Any, args: Any, output: Any, name: str = "") -> None:  # None: the output stays
            inputs.setdefault(name, tuple(args[0].shape))

        hooks = [m.register_forward_hook(functools.partial(record, name=n))
                 for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
        with torch.no_grad():
            net.eval()(torch.zeros(1, 3, size, size))
        for h in hooks:
            h.remove()
        for name, module in net.named_modules():
            if name not in inputs:
                continue
            layer = form.format(cls=type(net).__name__, aux=aux, module=name)
            _, channels, height, width = inputs[name]
            stats = {"running_dd_var": 1 + 0.1 * rng.random(channels, dtype=np.float32),
                     "running_dd_mean": 0.1 * rng.standard_normal(channels, dtype=np.float32)}
            if isinstance(module, nn.Conv2d):
                patches = math.ceil(height / patch) * math.ceil(width / patch)
                stats.update(running_patch_var=1 + 0.1 * rng.random(patches, dtype=np.float32),
                             running_patch_mean=0.1 * rng.standard_normal(patches, dtype=np.float32))
                folders = [root / "ConvFeatureHook" / layer] + [root / "ConvFeatureHook" / f"class_{c}" / layer
                                                                for c in range(classes)]
            else:
                folders = [root / "BNFeatureHook" / f"class_{c}" / layer for c in range(classes)]
            for folder in folders:
                folder.mkdir(parents=True, exist_ok=True)
                np.savez(folder / "running.npz", **stats)
            written += len(folders)
    return written


def prepare_smoke(work: Path, args: Sequence[str], env: Dict[str, str], script: Path) -> None:
    """Made-up teacher checkpoints (``--pre-train-path``) and statistics (``--statistic-path``)."""
    import json

    require_upstream_imports(script)
    rel = next(r for r in STATISTICS if script.as_posix().endswith(r))
    form, patch = STATISTICS[rel]
    options = {"root": option_value(args, "--statistic-path"), "name": form, "patch": patch}
    if rel in TEACHERS:
        write_teachers(script, TEACHERS[rel], Path(option_value(args, "--pre-train-path")), env,
                       json.dumps({**options, "statistics": True}))
        return
    import torch
    import torchvision

    built = []
    for name in IMAGENET_TEACHERS:  # the shapes of the teachers the shim builds random
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            built.append((name, torchvision.models.get_model(name, weights=None)))
    write_statistics(built, 224, SCRIPTS[rel].num_classes, options)


# The patch itself needs torch: built on first use, so that reading SCRIPTS/TARGETS stays fast.
patch, unpatch = method_patch(METHOD, lambda: SCRIPTS, TARGETS, capture="decoupled")
