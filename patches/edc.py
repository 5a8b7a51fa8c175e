"""EDC (shaoshitong/EDC, NeurIPS 2024): G-VBSM's loop (several teachers, one per iteration, in
``mp.spawn`` workers) with real-image initialisation and class-wise ("category-aware") statistics.

The capture and the core's per-teacher keys are G-VBSM's (:mod:`.gvbsm`). Each branch runs
``recover.py`` (what its ``recover.sh`` runs); the G-VBSM-named script left beside it in the CIFAR
branches is not EDC (EDC#2).

Smoke runs: as G-VBSM's, plus made-up real images for ``--initial-img-dir`` and made-up
statistics in ``--statistic-path`` (a folder outside the checkout). At the pin the statistics
the checkout commits do not match the names ``recover.py`` asks for, and the class-wise ones are
not committed at all. Missing ones are computed from the training set and saved, but the hooks
stack their per-class lists into tensors only when they load them from files (``utils.py`` L153,
L328), and index them with the batch's targets (L226, L505): read from the code (not run here), a
run that computes them stops there and the next one loads them. The smoke writes files of the
shapes the teachers need instead.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Sequence, Tuple

from dire_plugin.hooks.declare import ScriptSpec, Weights, option_value
from dire_plugin.hooks.patcher import method_patch

from .gvbsm import (CIFAR10, CIFAR100, CIFAR_TEACHERS, PRETRAINED, TINY_GVBSM, Teachers, branch_targets,
                    require_upstream_imports, spawned_spec, write_statistics, write_teachers)
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
    # 20 as for G-VBSM (memory).
    "Branch_full_ImageNet_1k/recover/recover.py": _spec(
        IMAGENET, 1000, ("--batch-size", "20", "--ipc-number", "1", "--iteration", "1", "--l2-scale", "0",
                         "--tv-l2", "0", "--nuc-norm", "1."), 3600),
}

#: G-VBSM's Adam on CE + feature matching: the released SRe²L weights, as for G-VBSM.
DEFAULT_WEIGHTS = Weights(why="SRe²L's loss and Adam optimiser with several teachers: the released SRe²L weights")

TARGETS = branch_targets("recover.py", ("BNFeatureHook", "ConvFeatureHook", "PreImgPathCache"))


# --- smoke runs (dire-apply --verify --smoke) -----------------------------------------------------


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
