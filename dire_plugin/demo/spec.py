"""Fixed facts of the embedded demo's data, importable without torch.

The patch module (:mod:`dire_plugin.patches.demo`) reads them to preprocess the bank's real
images, the recover script to clip and save its images, and the data module to normalise: one
place, so the teacher, the bank and the synthetic images always agree.
"""
from __future__ import annotations

from typing import Tuple

NUM_CLASSES = 10
IMAGE_SIZE = 8
#: Pixel mean and standard deviation of the 1,347 training digits after quantisation to 8 bits
#: (grey, replicated over 3 channels so ImageFolder's RGB loading matches).
MEAN: Tuple[float, float, float] = (0.3053, 0.3053, 0.3053)
STD: Tuple[float, float, float] = (0.3758, 0.3758, 0.3758)
#: Stratified train/test split of scikit-learn's digits.
TEST_SIZE = 450
SPLIT_SEED = 0
#: Where the recover script sits inside the package, as the launcher matches it (path tail).
RECOVER_SCRIPT = "demo/recover/recover.py"
