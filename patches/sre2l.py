"""SRe²L (VILA-Lab/SRe2L): ImageNet-1K (one GPU, or several under torchrun), Tiny-ImageNet and
CIFAR-100 recover scripts."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Sequence

from dire_plugin.embeddings.realdata import RealDataSpec
from dire_plugin.hooks.declare import ScriptSpec, Target, Weights
from dire_plugin.hooks.patcher import method_patch

METHOD = "sre2l"

IMAGENET = RealDataSpec("imagefolder", crop=224, resize=256, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
TINY = RealDataSpec("imagefolder", crop=64, mean=(0.4802, 0.4481, 0.3975), std=(0.2302, 0.2265, 0.2262))
# The CIFAR recover script clips and denormalises with these values, so its teacher saw them.
CIFAR100 = RealDataSpec("cifar100", crop=32, mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010))

# Smoke runs (dire-apply --verify --smoke, on a CPU): every script synthesises all its classes
# per ipc index whatever the batch size, so one ipc index and one iteration is the least (CDA's
# scripts take the same SMOKE_ARGS). Where --arch-name picks the teacher, a small one
# (SMOKE_ARCH): ResNet-18 takes minutes on a laptop for ImageNet's 1000 classes at 224 px (and
# its bank), seconds for the hooks to prove they fit.
SMOKE_ARCH = "mobilenet_v3_small"
SMOKE_ARGS = ("--arch-name", "{arch}", "--syn-data-path", "{out}", "--exp-name", "smoke",
              "--ipc-start", "0", "--ipc-end", "1", "--iteration", "1")

SCRIPTS = {
    # ImageNet: pretrained=True torchvision weights (the CPU shim builds them random), no checkpoint.
    "SRe2L/recover/data_synthesis.py": ScriptSpec(
        IMAGENET, num_classes=1000, arch=SMOKE_ARCH,
        smoke_args=(*SMOKE_ARGS, "--verifier-arch", SMOKE_ARCH, "--batch-size", "50", "--store-best-images"),
    ),
    # Tiny-ImageNet: torchvision-reference checkpoint, {"model": ...} without "module.".
    "SRe2L/*small_dataset/recover_tiny.py": ScriptSpec(
        TINY, num_classes=200, arch=SMOKE_ARCH, checkpoint_key="model", cifar_stem=True,
        smoke_args=(*SMOKE_ARGS, "--batch-size", "100", "--arch-path", "{ckpt}", "--store-last-images"),
    ),
    # ImageNet on several GPUs (torchrun): each rank synthesises every W-th (class, ipc) item, so
    # the images of a class are spread over the ranks; DiRe sees them together. A smoke run: two
    # CPU ranks on gloo, four classes of two images, batches that divide the items evenly (the
    # script reshapes by --batch-size and cannot take a short last batch).
    "SRe2L/recover/multi_gpu/data_synthesis.py": ScriptSpec(
        IMAGENET, num_classes=1000, arch=SMOKE_ARCH, num_classes_option="--num-classes", smoke_ranks=2,
        smoke_args=("--arch-name", "{arch}", "--verifier-arch", "{arch}", "--num-classes", "4", "--ipc", "2",
                    "--batch-size", "2", "--iteration", "2", "--print_period", "1", "--syn-data-path", "{out}",
                    "--exp-name", "smoke", "--store-best-images", "--dist-backend", "gloo"),
        smoke_prepare="dire_plugin.patches.sre2l:prepare_multi_gpu_smoke",
    ),
    # CIFAR-100: ResNet-18 is built by name; {"state_dict": ...} saved from a DataParallel model.
    # Two batches, so a run also goes through the start of a new batch of images.
    "SRe2L/*small_dataset/recover_cifar.py": ScriptSpec(
        CIFAR100, num_classes=100, checkpoint_key="state_dict", checkpoint_prefix="module.", cifar_stem=True,
        smoke_args=(*SMOKE_ARGS, "--batch-size", "50", "--arch-path", "{ckpt}", "--store-best-images"),
    ),
}

#: The released code's weights, tuned for this method's Adam at lr 0.25 (README "Default weights").
DEFAULT_WEIGHTS = Weights(why="the paper's released SRe²L code (multiplier 0.1 x r_cos 1.0, r_euc 0.01), tuned here")

TARGETS = (
    Target("SRe2L/recover/data_synthesis.py", "get_images"),
    Target("SRe2L/recover/data_synthesis.py", "main_syn"),
    Target("SRe2L/recover/utils.py", "BNFeatureHook", module="utils"),
    Target("SRe2L/*small_dataset/recover_tiny.py", "get_images"),
    Target("SRe2L/*small_dataset/recover_tiny.py", "main_syn"),
    Target("SRe2L/*small_dataset/recover_cifar.py", "get_images"),
    Target("SRe2L/*small_dataset/recover_cifar.py", "main_syn"),
    Target("SRe2L/*small_dataset/utils.py", "BNFeatureHook", module="utils"),
    Target("SRe2L/recover/multi_gpu/data_synthesis.py", "get_images"),
    Target("SRe2L/recover/multi_gpu/data_synthesis.py", "main_syn"),
    Target("SRe2L/recover/multi_gpu/utils.py", "BNFeatureHook", module="utils"),
    Target("SRe2L/recover/multi_gpu/data_utils.py", "MultiCardDataset", module="data_utils"),
)

def prepare_multi_gpu_smoke(work: Path, args: Sequence[str], env: Dict[str, str], script: Path) -> None:
    """Create the output folders before the ranks start. The script checks that a folder exists,
    then creates it, on every rank at once: ``--syn-data-path/--exp-name`` in ``parse_args`` and
    each class's ``newCCC/`` when the ranks save their images of that class. The slower rank dies
    of FileExistsError (an upstream race that a real torchrun meets too; README says so)."""
    args = list(args)

    def value(option: str) -> str:
        return args[args.index(option) + 1]

    out = Path(value("--syn-data-path")) / value("--exp-name")
    for c in range(int(value("--num-classes"))):  # data_utils.MultiCardDataset's folder names
        (out / f"new{c:03d}").mkdir(parents=True, exist_ok=True)


#: The capture family and its options, as data: the demo's SRe²L-shaped script goes through the same.
CAPTURE = dict(capture="decoupled")

# The patch itself needs torch: built on first use, so that reading SCRIPTS/TARGETS (dire-apply
# --list/--verify/--remove) stays fast.
patch, unpatch = method_patch(METHOD, lambda: SCRIPTS, TARGETS, **CAPTURE)
