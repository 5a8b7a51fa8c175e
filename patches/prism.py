"""PRISM (Brian-Moser/prism): an SRe²L fork that starts from real training images and adds the BN
statistics of up to four further teachers; only teacher 1's logits reach the criterion.

``recover/data_synthesis.py`` forwards teacher 1, then teachers 2-5 for their BN statistics (their
logits dropped), then calls its criterion on teacher 1's logits: the decoupled capture takes the
embeddings of the forward whose logits the criterion receives, so DiRe uses teacher 1's
embeddings and a bank built from teacher 1; the other forwards are never taken as synthetic
embeddings and their records are dropped at the synthesis step. ``recover/multi_gpu/`` is
SRe²L's multi-GPU script as it is (one teacher, torchrun).
"""
from __future__ import annotations

from dire_plugin.hooks.declare import ScriptSpec, Target, Weights
from dire_plugin.hooks.patcher import method_patch

from .sre2l import IMAGENET, SCRIPTS as SRE2L_SCRIPTS

METHOD = "prism"
SCRIPT = "recover/data_synthesis.py"
MULTI_GPU = "recover/multi_gpu/data_synthesis.py"

SCRIPTS = {
    # ImageNet-1K (recover_r18.sh): teachers 1 and 2 are pretrained ResNet-18s whatever
    # --arch-name says, 3-5 drawn at random (unseeded) from five torchvision models; the CPU shim
    # builds all of them random. Images start from the ipc-th training image of each class of
    # --train-data-path, for the classes that folder holds: a smoke run gives it 2 classes, in
    # batches of 1, so the second batch starts with the first one in the memory. Later ipc
    # indices run 500 x (ipc % 8) iterations fewer, none at --iteration 1: one ipc index. The
    # bank (1000 classes at 224 px through a ResNet-18) takes minutes on a laptop's CPU.
    SCRIPT: ScriptSpec(
        IMAGENET, num_classes=1000, smoke_init="folders", smoke_init_classes=2, smoke_timeout=1800,
        smoke_args=("--train-data-path", "{init}", "--syn-data-path", "{out}", "--exp-name", "smoke", "--batch-size", "1",
                    "--lr", "0.05", "--iteration", "1", "--l2-scale", "0", "--tv-l2", "0", "--r-bn", "0.01", "--verifier",
                    "--store-best-images", "--ipc-start", "0", "--ipc-end", "1"),
    ),
    # SRe²L's multi-GPU recover, unchanged in this fork: SRe²L's smoke run (two CPU ranks on gloo).
    MULTI_GPU: SRE2L_SCRIPTS["SRe2L/recover/multi_gpu/data_synthesis.py"],
}

#: SRe²L's loss and Adam (lr 0.05 single-GPU, 0.25 multi-GPU; Adam's step follows the gradient's
#: direction, not its scale): the released SRe²L weights.
DEFAULT_WEIGHTS = Weights(why="SRe²L's loss and Adam optimiser: the released SRe²L weights")

TARGETS = (
    Target(SCRIPT, "get_images"),
    Target(SCRIPT, "main_syn"),
    Target(SCRIPT, "save_images"),
    Target("recover/utils.py", "BNFeatureHook", module="utils"),
    Target(MULTI_GPU, "get_images"),
    Target(MULTI_GPU, "main_syn"),
    Target("recover/multi_gpu/utils.py", "BNFeatureHook", module="utils"),
    Target("recover/multi_gpu/data_utils.py", "MultiCardDataset", module="data_utils"),
)

# The patch itself needs torch: built on first use, so that reading SCRIPTS/TARGETS stays fast.
patch, unpatch = method_patch(METHOD, lambda: SCRIPTS, TARGETS, capture="decoupled")
