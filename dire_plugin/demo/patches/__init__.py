"""The demo's patch modules, one per family, each the twin of the real patch of that family
(``dire_plugin.patches.<family>``): the same capture family with the same options (its
``CAPTURE``), the same default weights (its ``DEFAULT_WEIGHTS``), targets declared the same way,
over the demo's own scripts. Not pinned to any upstream (``PINNED = False``): start-up skips the
fingerprint checks, and ``dire-apply`` does not list them. The launcher loads them by their
internal method names (:data:`dire_plugin.hooks.registry.INTERNAL_METHODS`).
"""
from __future__ import annotations

from dire_plugin.demo.spec import DIGITS, DatasetSpec
from dire_plugin.embeddings.realdata import RealDataSpec
from dire_plugin.hooks.declare import ScriptSpec

__all__ = ["script_spec"]


def script_spec(data: DatasetSpec = DIGITS, **extra) -> ScriptSpec:
    """How the launcher checks a demo script's ``--real-data`` and builds its bank: digits from the
    ImageFolder the demo writes, CIFAR from the torchvision layout (or an ImageFolder; realdata
    tells them apart by the folder)."""
    kind = "imagefolder" if data is DIGITS else data.name
    real = RealDataSpec(kind, crop=data.image_size, mean=data.mean, std=data.std)
    return ScriptSpec(real, num_classes=data.num_classes, arch=data.arch, **extra)
