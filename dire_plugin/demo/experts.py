"""The MTT family's expert trajectories: the demo's ``buffer.py`` run once, as MTT's is, and cached
like the teacher (keyed on its settings and the training data, checked on every use:
:func:`~.cache.cached_folder`)."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Tuple

from .cache import cached_folder
from .data import DemoData
from .errors import DemoRunError
from .spec import MTT_BUFFER_SCRIPT
from .synth import child_env
from .teacher import data_key

__all__ = ["BUFFER", "ExpertSettings", "load_or_train_experts"]

#: The demo's buffer.py, run by path as MTT's is.
BUFFER = Path(__file__).resolve().parents[1] / MTT_BUFFER_SCRIPT


@dataclass(frozen=True)
class ExpertSettings:
    """What determines the experts (and so their cache key). Digits: four ConvNets of ten epochs
    each at MTT's expert learning rate 0.01 without momentum, batches of 32 (1,347 images: 43
    steps per epoch; they reach about 93 % test accuracy), DSA as in MTT's buffer.py."""

    num_experts: int = 4
    train_epochs: int = 10
    lr_teacher: float = 0.01
    batch_train: int = 32
    mom: float = 0.0
    l2: float = 0.0
    seed: int = 0
    model: str = "ConvNet"
    #: Bumped when the network, the data pipeline or buffer.py change, so old caches are not reused.
    version: int = 1

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]

    def args(self) -> List[str]:
        return ["--dataset", "digits", "--model", self.model, "--num_experts", str(self.num_experts),
                "--train_epochs", str(self.train_epochs), "--lr_teacher", repr(self.lr_teacher),
                "--batch_train", str(self.batch_train), "--mom", repr(self.mom), "--l2", repr(self.l2),
                "--seed", str(self.seed)]


def load_or_train_experts(data: DemoData, cache: Path, settings: ExpertSettings, log: Path,
                          device: str = "cpu") -> Tuple[Path, bool]:
    """``(buffer path, cache hit)``: the folder to give ``distill.py --buffer_path`` (its
    ``digits/ConvNet/replay_buffer_0.pt``), trained by ``buffer.py`` only when no sound cached
    one exists for these settings and this training data. A failed run is one line naming ``log``."""
    digest = data_key(data)
    root = cache / f"mtt-experts-{settings.key()}-{digest[:12]}"
    source = json.dumps({"settings": asdict(settings), "data": digest}, sort_keys=True)

    def train(folder: Path) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(BUFFER), *settings.args(), "--buffer_path", str(folder), "--threads", "1",
               "--device", device]
        with open(log, "w") as handle:
            code = subprocess.call(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=str(folder), env=child_env())
        if code != 0:
            lines = log.read_text(errors="replace").strip().splitlines()
            raise DemoRunError(f"mtt experts: buffer.py exited with {code}: {lines[-1] if lines else ''} (log: {log})")

    return cached_folder(root, source, train, "expert cache")
