"""DWA (AngusDujw/Diversity-Driven-Synthesis): SRe²L's loss from real-image initialisation, with a
directed weight perturbation of the teacher at iteration 0 of every batch.

The perturbation (``Perterb.first_step``) reads the teacher's ``.grad``, which DWA accumulates over
a whole batch and never clears (``Adam([inputs])`` never zeroes it). The decoupled capture's
``"auto"`` route keeps every value DWA reads vanilla DWA's: the criterion calls before a batch's
first synthesis step (the perturbation passes, whose terms never reach the images: the manifest's
``terms_discarded``) and every step of a batch that does not hold all of the teacher's classes
(ImageNet: ten batches share one teacher, whose accumulated ``.grad`` the next batch reads) get
DiRe's gradient through one input-only backward; the other steps (CIFAR and Tiny at their
scripts' batch sizes: one batch per teacher, rebuilt for every ipc index, so its ``.grad`` is never
read again) through DWA's own backward, as in SRe²L, at no extra cost. ``Perterb.first_step`` is
wrapped to stop the run should it ever read a ``.grad`` holding DiRe's share.
"""
from __future__ import annotations

from dataclasses import replace

from dire_plugin.embeddings.realdata import RealDataSpec
from dire_plugin.hooks.declare import ScriptSpec, Target, Weights
from dire_plugin.hooks.patcher import method_patch

from .sre2l import IMAGENET, TINY

METHOD = "dwa"

# The normalisation the teachers were trained with (pretrain/squeeze_cifar{10,100}.py).
CIFAR100 = RealDataSpec("cifar100", crop=32, mean=(0.5071, 0.4867, 0.4408), std=(0.2675, 0.2565, 0.2761))
CIFAR10 = RealDataSpec("cifar10", crop=32, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))

# One ipc index, one batch of every class, two iterations and two perturbation steps: enough to go
# through iteration 0's perturbation passes and a later synthesis step.
_SMOKE = ("--syn-data-path", "{out}", "--exp-name", "smoke", "--init-path", "{init}", "--ipc-start", "0",
          "--ipc-end", "1", "--steps", "2", "--rho", "15e-3", "--r-bn", "0.01", "--store-best-images")
_CIFAR = dict(
    checkpoint_key="state_dict", checkpoint_prefix="module.", cifar_stem=True, run_from="root", smoke_init="tensors",
)


def _cifar(real: RealDataSpec, classes: int, dataset: str) -> ScriptSpec:
    return ScriptSpec(
        real, num_classes=classes, checkpoint_at=f"./pretrain/save/{dataset}/resnet18_E200/ckpt.pth",
        smoke_args=(*_SMOKE, "--dataset", dataset, "--batch-size", "100", "--iteration", "2"), **_CIFAR,
    )


SCRIPTS = {
    # --dataset picks CIFAR-10 or CIFAR-100 (the default) inside the script.
    "distillation/distillation_cifar.py": replace(
        _cifar(CIFAR100, 100, "cifar100"), by_option=("--dataset", (("cifar10", _cifar(CIFAR10, 10, "cifar10")),)),
    ),
    # The pinned script clips with --dataset tiny, which its utils.clip_image has no constants for:
    # it stops at the first clip (UnboundLocalError), also without DiRe.
    "distillation/distillation_tiny.py": ScriptSpec(
        TINY, num_classes=200, checkpoint_key="model", cifar_stem=True, run_from="root", smoke_init="folders",
        checkpoint_at="./pretrain/save/tiny/resnet18_E100/ckpt.pth",
        smoke_args=(*_SMOKE, "--dataset", "tiny", "--batch-size", "200", "--iteration", "2"),
        known_defects=(("distillation/utils.py", "UnboundLocalError"),),
    ),
    # ImageNet: only --arch-name resnet18 builds a teacher (pretrained torchvision weights; the CPU
    # shim makes them random); 1000 classes at 224 px are fixed, hence the long timeout.
    "distillation/distillation_imgnet.py": ScriptSpec(
        IMAGENET, num_classes=1000, run_from="root", smoke_init="folders", smoke_timeout=3600,
        smoke_args=(*_SMOKE, "--arch-name", "resnet18", "--batch-size", "100", "--iteration", "1"),
    ),
}

#: SRe²L's loss and Adam optimizer (lr 0.25 in its scripts): the released weights, as for SRe²L.
DEFAULT_WEIGHTS = Weights(why="SRe²L's loss and Adam optimiser: the released SRe²L weights")

TARGETS = tuple(
    Target(f"distillation/distillation_{name}.py", symbol)
    for name in ("cifar", "tiny", "imgnet")
    for symbol in ("get_images", "main_syn")
) + (
    Target("distillation/perterb.py", "Perterb.first_step", module="perterb"),
    Target("distillation/utils.py", "BNFeatureHook", module="utils"),
)

#: The capture family and its options, as data: the demo's DWA-shaped script goes through the same.
CAPTURE = dict(capture="decoupled", teacher_grads="auto", grad_readers=(("perterb", "Perterb.first_step"),))

# The patch itself needs torch: built on first use, so that reading SCRIPTS/TARGETS stays fast.
patch, unpatch = method_patch(METHOD, lambda: SCRIPTS, TARGETS, **CAPTURE)
