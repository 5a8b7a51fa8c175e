"""Fixed facts of the demo's datasets, importable without torch.

The demo's patch modules (:mod:`dire_plugin.demo.patches`) read them to preprocess the bank's real
images, the family scripts to clip, save and load their images, and the data module to normalise:
one place, so the teacher, the bank and the synthetic images always agree.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

__all__ = ["DatasetSpec", "DATASETS", "DIGITS", "CIFAR10", "CIFAR100", "RECOVER_SCRIPT", "DWA_SCRIPT", "DM_SCRIPT",
           "MTT_SCRIPT", "MTT_BUFFER_SCRIPT", "SCRIPT_FOLDERS", "FAMILY_NAMES", "METHOD_CHOICES", "TEST_SIZE", "SPLIT_SEED"]


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset the demo distils: its size, normalisation, and the teacher architecture for it.

    ``max_shift``/``flip``: the augmentation of teacher and students (random shift by up to
    ``max_shift`` pixels with border fill; horizontal flip), SRe²L's crop-and-flip at this scale.
    """

    name: str
    num_classes: int
    image_size: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    arch: str
    max_shift: int
    flip: bool


#: scikit-learn's digits: pixel mean and standard deviation of the 1,347 training digits after
#: quantisation to 8 bits (grey, replicated over 3 channels so ImageFolder's RGB loading matches).
#: No flip: a mirrored 2 or 5 is another glyph.
DIGITS = DatasetSpec("digits", 10, 8, (0.3053,) * 3, (0.3758,) * 3, arch="convnet", max_shift=1, flip=False)
#: CIFAR: the usual per-channel statistics of the training split; ResNet-18 with the CIFAR stem
#: (3x3 conv1, no max-pool) as SRe²L's CIFAR teachers; pad-4 crop and flip.
CIFAR10 = DatasetSpec("cifar10", 10, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), arch="resnet18",
                      max_shift=4, flip=True)
CIFAR100 = DatasetSpec("cifar100", 100, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), arch="resnet18",
                       max_shift=4, flip=True)
DATASETS: Dict[str, DatasetSpec] = {d.name: d for d in (DIGITS, CIFAR10, CIFAR100)}

#: Stratified train/test split of scikit-learn's digits.
TEST_SIZE = 450
SPLIT_SEED = 0
#: The method families the demo distils with (:mod:`dire_plugin.demo.families` describes each), and
#: ``dire demo --method``'s choices.
FAMILY_NAMES = ("sre2l", "dwa", "dm", "mtt")
METHOD_CHOICES = (*FAMILY_NAMES, "all")
#: Where each family's script sits inside the package, as the launcher matches it (path tail).
RECOVER_SCRIPT = "demo/recover/recover.py"
DWA_SCRIPT = "demo/dwa/distillation_digits.py"
DM_SCRIPT = "demo/dm/main_DM.py"
MTT_SCRIPT = "demo/mtt/distill.py"
MTT_BUFFER_SCRIPT = "demo/mtt/buffer.py"
#: Folders of ``dire_plugin/demo`` whose files run as upstream scripts do (``python script.py``,
#: importing their sibling ``utils``), not as modules of the package.
SCRIPT_FOLDERS = ("recover", "dwa", "dm", "mtt")
