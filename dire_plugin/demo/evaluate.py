"""Train and test the students of every set, in worker processes, while the synthesis runs go on.

Each set comes with its family's protocol (an object with ``train(images, labels, teacher,
test_x, test_y, seed)``): :class:`~.relabel.StudentSettings` (SRe²L, DWA: the teacher's soft
labels) or :class:`~.hardlabel.HardLabelSettings` (DM, MTT: hard labels, no teacher).

Students run with one torch thread each, for the same reason as the recover runs (see
:mod:`.synth`); on a GPU several share it, each its own process. Sets are submitted as soon as
they exist (the real subsets at once, each synthetic set when its recover run ends), so the two
stages share the cores instead of the last recover run leaving a core idle. Each worker loads
the teacher and the test split once.
"""
from __future__ import annotations

import multiprocessing
import sys
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import Tensor
from tqdm import tqdm

from .teacher import load_teacher

__all__ = ["StudentPool"]

_WORKER: Dict[str, object] = {}


def _init_worker(teacher_path: str, test_x: Tensor, test_y: Tensor, device: str) -> None:
    torch.set_num_threads(1)
    _WORKER.update(teacher=load_teacher(teacher_path, torch.device(device)), test_x=test_x, test_y=test_y)


def _run(key: str, images: Tensor, labels: Tensor, seed: int, protocol: Any) -> Tuple[str, int, float]:
    acc = protocol.train(images, labels, _WORKER["teacher"], _WORKER["test_x"], _WORKER["test_y"], seed)
    return key, seed, acc


def _context(device: torch.device):
    """fork on Linux with a CPU teacher: a spawned worker spends ~3 s of CPU importing torch
    again, as much as a quick student. Safe there for the reason DataLoader workers are: workers
    stay single-threaded. CUDA cannot be used in a forked child, and macOS frameworks are not
    fork-safe: spawn there."""
    fork = sys.platform.startswith("linux") and device.type == "cpu"
    return multiprocessing.get_context("fork" if fork else "spawn")


class StudentPool:
    """``submit`` a set for ``seeds`` students under a protocol; :meth:`results` waits for all of them.

    Use as a context manager: leaving it (also on an error) shuts the workers down.
    """

    def __init__(self, teacher_path: Path, test_x: Tensor, test_y: Tensor, parallel: int, total: int,
                 progress: bool = True, device: torch.device = torch.device("cpu")) -> None:
        self._pool = ProcessPoolExecutor(
            max_workers=max(1, parallel), mp_context=_context(device),
            initializer=_init_worker, initargs=(str(teacher_path), test_x, test_y, str(device)),
        )
        self._futures: List[Future] = []
        self._bar = tqdm(total=total, desc="students", unit="student", position=1, disable=not progress)

    def submit(self, key: str, images: Tensor, labels: Tensor, seeds: Sequence[int], protocol: Any) -> None:
        """Queue one student per seed on ``(images, labels)`` under ``protocol``; results are
        grouped under ``key``."""
        for seed in seeds:
            future = self._pool.submit(_run, key, images, labels, seed, protocol)
            future.add_done_callback(lambda _: self._bar.update())
            self._futures.append(future)

    def results(self) -> Dict[str, List[float]]:
        """Test accuracies (fractions) per key, in seed order; re-raises a worker's error."""
        found: Dict[str, Dict[int, float]] = {}
        for future in self._futures:
            key, seed, acc = future.result()
            found.setdefault(key, {})[seed] = acc
        return {key: [accs[s] for s in sorted(accs)] for key, accs in found.items()}

    def __enter__(self) -> "StudentPool":
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=exc[0] is None, cancel_futures=exc[0] is not None)
        self._bar.close()
