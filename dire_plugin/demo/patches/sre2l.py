"""The embedded demo (``dire demo``): our own SRe²L-shaped recover script on scikit-learn's digits
or CIFAR (its ``--dataset`` option picks the bank's preprocessing and class count).

It goes through the same hook runtime as the upstream patches, so the demo exercises the path
users get. There is no upstream commit to pin (``PINNED = False``): start-up skips the
fingerprint checks, and ``dire-apply`` does not list it.
"""
from __future__ import annotations

from dire_plugin.demo.spec import DATASETS, DIGITS, RECOVER_SCRIPT, DatasetSpec
from dire_plugin.embeddings.realdata import RealDataSpec
from dire_plugin.hooks.declare import ScriptSpec, Weights
from dire_plugin.hooks.patcher import method_patch

METHOD = "demo"
PINNED = False


def _spec(data: DatasetSpec, **extra) -> ScriptSpec:
    # The bank reads digits from the ImageFolder the demo writes, CIFAR from the torchvision
    # layout (or an ImageFolder): realdata tells them apart by the folder.
    kind = "imagefolder" if data is DIGITS else data.name
    real = RealDataSpec(kind, crop=data.image_size, mean=data.mean, std=data.std)
    return ScriptSpec(real, num_classes=data.num_classes, arch=data.arch, **extra)


# The launcher matches an installed script by its tail: .../dire_plugin/demo/recover/recover.py.
SCRIPTS = {
    RECOVER_SCRIPT: _spec(
        DIGITS, by_option=("--dataset", tuple((name, _spec(d)) for name, d in DATASETS.items() if d is not DIGITS)),
    ),
}

TARGETS = ()

#: The demo passes its weights explicitly; these apply to a bare dire-run of its script.
DEFAULT_WEIGHTS = Weights(why="the released SRe²L weights")

patch, unpatch = method_patch(METHOD, lambda: SCRIPTS, TARGETS, capture="decoupled")
