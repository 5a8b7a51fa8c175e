"""INFER (zhangxin-xd/UFC): one universal feature compensator ``uni_perb`` (1×3×H×W) per batch of real
images, one image per class, optimised through a teacher that changes with the group of indices.

``ufc_generation/ufc_cifar.py`` (CIFAR-10 and CIFAR-100, picked by ``--dataset``). For ``ipc_id``
below ``ipc_init`` it saves the real images of ``tensor_{ipc_id}.pt`` as they are, with no
iteration; above, ``Adam([uni_perb])`` optimises the compensator of the inputs
``real + uni_perb`` through teacher ``ipc_id // ipc_init - 1`` (ResNet-18, MobileNetV2,
EfficientNet-B0, ShuffleNet-G2, reloaded at every ``ipc_id``).

What the patch declares, all of it options of the decoupled capture (no INFER code in it):

* ``compensator``: the optimised tensor is the 1×3×H×W compensator, not the images. DiRe's
  gradient at the embeddings of the 100 (or 10) images reaches it through INFER's own backward,
  the per-class terms of every class summed into that one tensor.
* ``saves``: ``utils.save_images``, and :func:`saved_images` to read what it saves. The real images
  saved with no iteration are never forwarded by INFER; they join each teacher's memory through
  one forward of ours per teacher (hooks hidden, eval mode, INFER's random streams untouched).
* The teachers: the core's per-teacher keys (one bank and one memory per teacher), as for G-VBSM.

``ufc_generation/ufc_imgnet.py`` does not run at the pin: ``get_images`` reads ``args.init``, which
its parser never defines (L58), and ``input_original``, which it never assigns (L79, where it
calls the tensor ``inputs_ori``). It is listed so that ``dire-apply --verify --smoke`` reports that
defect with file and line; with DiRe it stops where the vanilla script stops.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, Tuple

from dire_plugin.embeddings.realdata import RealDataSpec
from dire_plugin.hooks.declare import REFERENCE_SHARE, ScriptSpec, Target, Weights, option_value
from dire_plugin.hooks.patcher import method_patch

from .gvbsm import run_in_checkout
from .sre2l import IMAGENET

METHOD = "infer"
SCRIPT = "ufc_generation/ufc_cifar.py"
IMAGENET_SCRIPT = "ufc_generation/ufc_imgnet.py"

# The constants the script clips and denormalises with (utils.clip_image, denormalize_image), per
# --dataset: its teachers saw them.
DATASETS: Dict[str, Tuple[int, RealDataSpec]] = {
    "cifar10": (10, RealDataSpec("cifar10", crop=32, mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010))),
    "cifar100": (100, RealDataSpec("cifar100", crop=32, mean=(0.5071, 0.4867, 0.4408), std=(0.2675, 0.2565, 0.2761))),
}
#: ``--dataset`` when the option is absent (its argparse default).
DEFAULT_DATASET = "cifar100"
#: ``--M`` and ``--ipc`` defaults of the parser.
DEFAULT_M, DEFAULT_IPC = 4, 10
#: ``generation``'s teachers, in ``model_index`` order: the folder name of each checkpoint under
#: ``pretrained/<dataset>/`` and the builder of the checkout's own ``models/`` (ResNet-18:
#: torchvision's, with the CIFAR stem the script gives it).
TEACHERS = (("resnet18", "resnet18"), ("mobilenetV2", "mobilenetv2:MobileNetV2_{dataset}"),
            ("efficientnet", "efficientnet:EfficientNetB0_{dataset}"), ("shufflenet", "shufflenet:ShuffleNetG2_{dataset}"))


def checkpoint_path(dataset: str, teacher: str) -> str:
    """Where ``generation`` loads a teacher, relative to the folder the script runs from (the checkout)."""
    return f"pretrained/{dataset}/{teacher}_E200/ckpt.pth"


def ipc_init(ipc: int, m: int, classes: int) -> int:
    """The real images per class the script saves unoptimised (its ``__main__``: the UFCs of ``m``
    teachers count as ``m`` images spread over the classes)."""
    return int(ipc / (m / classes + 1))


# Smoke runs: every class in one batch, as the script needs (its targets are sliced by
# --batch-size, its inputs are the whole init tensor). CIFAR-100: one real set, two teachers, two
# iterations each; CIFAR-10: two real sets and all four teachers (EfficientNet's dropped BN hook,
# ShuffleNet), one iteration per compensator. The init tensors and teachers are made up by
# prepare_smoke.
_SMOKE = ("--syn-data-path", "{out}", "--exp-name", "smoke", "--wandb-name", "smoke", "--init_path", "{init}",
          "--store-best-images", "--batch-size", "100", "--lr", "0.25", "--r-bn", "1", "--jitter", "4")
# Two init tensors: ipc_init is at most 2 in either smoke run.
_CIFAR = dict(run_from="root", smoke_init="tensors", smoke_init_images=2, smoke_prepare="dire_plugin.patches.infer:prepare_smoke")


def _cifar(dataset: str) -> ScriptSpec:
    classes, real = DATASETS[dataset]
    return ScriptSpec(real, num_classes=classes, **_CIFAR)


SCRIPTS = {
    # The published command (sh/ufc_cifar.sh): CIFAR-100 at IPC 10 and 50; --dataset cifar10 the other.
    SCRIPT: ScriptSpec(
        DATASETS[DEFAULT_DATASET][1], num_classes=DATASETS[DEFAULT_DATASET][0],
        by_option=("--dataset", tuple((name, _cifar(name)) for name in DATASETS), DEFAULT_DATASET),
        smoke_args=_SMOKE,
        smoke_variants=(
            ("cifar100", ("--dataset", "cifar100", "--ipc", "2", "--M", "2", "--iteration", "2")),
            ("cifar10", ("--dataset", "cifar10", "--ipc", "3", "--M", "4", "--iteration", "1")),
        ),
        **_CIFAR,
    ),
    # Three torchvision ImageNet teachers (the CPU shim builds them random); stops at L58.
    IMAGENET_SCRIPT: ScriptSpec(
        IMAGENET, num_classes=1000, run_from="root", smoke_init="folders",
        smoke_args=("--syn-data-path", "{out}", "--exp-name", "smoke", "--wandb-name", "smoke", "--init_path", "{init}",
                    "--store-best-images", "--ipc", "2", "--iteration", "1"),
        known_defects=((IMAGENET_SCRIPT, "AttributeError"),),
    ),
}

#: One compensator receives the terms of every class of its batch, summed: the released weights,
#: tuned for SRe²L's one image per class, do not mean the same here (docs/methods/infer.md).
DEFAULT_WEIGHTS = Weights(share=REFERENCE_SHARE, why="one compensator receives every class's term: calibrated to "
                                                     "the share the released weights give SRe²L")

TARGETS = (
    Target(SCRIPT, "get_images"),  # uni_perb, model_index, the unoptimised ipc_ids, Adam, the save
    Target(SCRIPT, "generation"),  # the teachers, their checkpoint paths, DataParallel(...).cuda()
    Target("ufc_generation/utils.py", "save_images", module="utils"),
    Target("ufc_generation/utils.py", "denormalize_image", module="utils"),
    Target("ufc_generation/utils.py", "BNFeatureHook", module="utils"),
    Target(IMAGENET_SCRIPT, "get_images"),
    Target(IMAGENET_SCRIPT, "generation"),
)


def saved_images(args: tuple, kwargs: dict) -> Tuple[Any, Any]:
    """``(images, labels)`` that ``utils.save_images(args, images, targets, ipc_id)`` saves, the
    images as the teacher sees them: the script hands it images it denormalised
    (``denormalize_image``: ``x·std + mean`` clamped to [0, 1]), normalised back here with
    ``--dataset``'s constants."""
    import torch

    from dire_plugin.errors import DiReHookError

    names = ("args", "images", "targets")
    run_args, images, targets = (args[i] if len(args) > i else kwargs[name] for i, name in enumerate(names))
    dataset = getattr(run_args, "dataset", DEFAULT_DATASET)
    if dataset not in DATASETS:
        raise DiReHookError(f"the {METHOD} patch knows the normalisation of --dataset {' or '.join(DATASETS)}, "
                            f"not {dataset!r} (set DIRE_DISABLE=1 to run vanilla)")
    real = DATASETS[dataset][1]
    mean = torch.tensor(real.mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(real.std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    labels = targets.argmax(1) if targets.dim() == 2 else targets
    return (images - mean) / std, labels


# --- smoke runs (dire-apply --verify --smoke) -----------------------------------------------------


def prepare_smoke(work: Path, args: Any, env: Dict[str, str], script: Path) -> Dict[str, str]:
    """A random-initialised checkpoint of each of the four teachers ``ufc_cifar.py`` loads, built
    by the checkout's own model code, outside the checkout; returns the paths the script names →
    those files, for the CPU shim to load instead. Stops before the run where the smoke's options
    need more init tensors than the spec writes."""
    from dire_plugin.errors import DiReInputError

    args = list(args)
    dataset = option_value(args, "--dataset") or DEFAULT_DATASET
    spec = SCRIPTS[SCRIPT].for_argv(args)
    needed = ipc_init(int(option_value(args, "--ipc") or DEFAULT_IPC), int(option_value(args, "--M") or DEFAULT_M),
                      spec.num_classes)
    if needed > spec.smoke_init_images:
        raise DiReInputError(f"the smoke options need {needed} init tensors, the spec writes {spec.smoke_init_images}")
    write_teachers(script.parent.parent, dataset, work, env)
    return {checkpoint_path(dataset, name): str(work / checkpoint_path(dataset, name)) for name, _ in TEACHERS}


def write_teachers(root: Path, dataset: str, folder: Path, env: Dict[str, str]) -> None:
    """Random-initialised checkpoints of the four teachers under ``folder/pretrained/...``, as
    ``generation`` loads them (``{"state_dict": ...}`` of a DataParallel model): a child
    interpreter in the checkout (``sys.path`` gets its ``models/``, no bytecode written there)."""
    code = (f"from dire_plugin.patches.infer import build_in_checkout; "
            f"build_in_checkout({dataset!r}, {str(folder)!r})")
    run_in_checkout(code, root, env, f"build the teachers of {SCRIPT}")


def build_in_checkout(dataset: str, folder: str) -> None:
    """Run by :func:`write_teachers` in the checkout root."""
    import importlib

    import torch
    import torchvision
    from torch import nn

    sys.path.insert(0, "models")  # where the script's own sys.path.append("./models/") looks
    classes = DATASETS[dataset][0]
    for seed, (name, builder) in enumerate(TEACHERS):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if builder == "resnet18":
                net = torchvision.models.resnet18(num_classes=classes)
                net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
                net.maxpool = nn.Identity()
            else:
                module, _, function = builder.format(dataset=dataset).partition(":")
                net = getattr(importlib.import_module(module), function)()
        path = Path(folder) / checkpoint_path(dataset, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)


#: The capture family and its options, as data (module doc).
CAPTURE = dict(capture="decoupled", compensator=True, saves=("utils", "save_images", "dire_plugin.patches.infer:saved_images"))

# The patch itself needs torch: built on first use, so that reading SCRIPTS/TARGETS stays fast.
patch, unpatch = method_patch(METHOD, lambda: SCRIPTS, TARGETS, **CAPTURE)
