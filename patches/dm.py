"""DM, distribution matching, in DC-BENCH (justincui03/dc_benchmark, ``methods/dc/main_DM.py``).

Every iteration a fresh random network embeds, per class, a real batch and that class's synthetic
images (``ConvNet`` branch: one real and one synthetic call per class; ``'BN' in --model``: one
call on all real and one on all synthetic images); ``loss = Σ_c ‖mean real − mean syn‖²``. The
embed capture (:mod:`dire_plugin.hooks.embedded`) adds DiRe's gradient at the synthetic
embeddings during DM's own backward, against the real embeddings DM computed in the same
iteration with the same network: no bank, no extra forward, and no memory (all IPC images of a
class are in one call). Real classes are read from the pixels of the training set
``get_dataset`` returns, synthetic ones from the rows of ``image_syn`` in the autograd graph.

The upstream's own limits, with or without DiRe: ``--ipc`` must be 1, 10, 20, 30, 40 or 50
(``get_loops`` exits otherwise); ``--ipc 1`` crashes in the Siamese augmentation on torch 2;
``--dsa_strategy none`` crashes at the first evaluation (``args.dc_aug_param`` unset); the BN
branch needs ``--batch_real`` at most the images of the smallest class.
"""
from __future__ import annotations

from dataclasses import replace

from dire_plugin.embeddings.realdata import RealDataSpec
from dire_plugin.hooks.declare import REFERENCE_SHARE, ScriptSpec, Target, Weights
from dire_plugin.hooks.patcher import method_patch

METHOD = "dm"

# How DC-BENCH's get_dataset normalises (methods/dc/utils.py).
CIFAR10 = RealDataSpec("cifar10", crop=32, mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010))
CIFAR100 = RealDataSpec("cifar100", crop=32, mean=(0.5071, 0.4866, 0.4409), std=(0.2673, 0.2564, 0.2762))

_DC = "methods/dc"
#: Networks of networks.py that have ``embed`` (MLP and LeNet have none: DM cannot run them).
EMBEDS = ("ConvNet", "AlexNet", "AlexNetBN", "VGG", "ResNet_AP", "ResNet")

# Three synthesis steps at IPC 10 on the smoke's 12 training images per class (the BN branch
# needs --batch_real <= images per class), one evaluation (--eval_mode X: only at the last
# iteration) of one epoch; absolute --data_path/--save_path so nothing lands in the checkout.
_SMOKE = ("--dataset", "CIFAR10", "--ipc", "10", "--batch_real", "12", "--num_exp", "1", "--num_eval", "1",
          "--epoch_eval_train", "0", "--Iteration", "2", "--eval_mode", "X", "--data_path", "{data}",
          "--save_path", "{out}")


def _spec(real: RealDataSpec, classes: int) -> ScriptSpec:
    return ScriptSpec(
        real, num_classes=classes, run_from="script", smoke_data="cifar10", smoke_args=_SMOKE,
        smoke_variants=(("ConvNet", ("--model", "ConvNet")), ("ConvNetBN", ("--model", "ConvNetBN"))),
        smoke_outputs="res_DM_*.pt",
    )


SCRIPTS = {
    # --dataset CIFAR10 (the default) or CIFAR100. The capture itself also reads DC-BENCH's other
    # training sets (MNIST, SVHN, TinyImageNet tensors); their --real-data is not covered here.
    f"{_DC}/main_DM.py": replace(_spec(CIFAR10, 10), by_option=("--dataset", (("CIFAR100", _spec(CIFAR100, 100)),))),
}

#: DM steps its images with SGD on a mean-matching loss, where the released weights give DiRe a
#: tiny share: its default is the share they give SRe²L, calibrated (README "Default weights").
DEFAULT_WEIGHTS = Weights(share=REFERENCE_SHARE, why="SGD optimiser: calibrated to the share the released weights give SRe²L")

TARGETS = (
    # The loop: fresh network per iteration, the embed calls, SGD([image_syn]), torch.save of res_DM_*.pt.
    Target(f"{_DC}/main_DM.py", "main"),
    Target(f"{_DC}/utils.py", "get_dataset", module="utils"),
    Target(f"{_DC}/utils.py", "get_network", module="utils"),
    Target(f"{_DC}/utils.py", "DiffAugment", module="utils"),
    *(Target(f"{_DC}/networks.py", f"{name}.embed", module="networks") for name in EMBEDS),
)

#: The capture family and its options, as data: the demo's DM-shaped script goes through the same.
CAPTURE = dict(
    capture="embed", embed=tuple(("networks", f"{name}.embed") for name in EMBEDS),
    augment=("utils", "DiffAugment"), dataset=("utils", "get_dataset"), results=r"^res_DM_.*\.pt$",
)

# The patch itself needs torch: built on first use, so that reading SCRIPTS/TARGETS stays fast.
patch, unpatch = method_patch(METHOD, lambda: SCRIPTS, TARGETS, **CAPTURE)
