"""Run the recover script as users would: ``python recover.py`` (vanilla) and
``python -m dire_plugin.cli.run demo recover.py ...`` (+ DiRe), several at once.

Each run is a separate process with one torch thread: the batches are ten 8×8 images, far too
small for intra-op parallelism, so two single-threaded runs on two cores finish sooner than two
two-threaded ones in turn (and much sooner on a loaded machine). On a GPU the runs share it: a
batch of ten CIFAR images leaves it mostly idle, so several processes fill it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from tqdm import tqdm

from ..errors import DiReInputError
from ..io.files import load_torch_file
from .errors import DemoRunError
from .spec import DATASETS
from .variants import Variant

__all__ = ["SynthJob", "SynthResult", "SynthContext", "RECOVER", "job_folder", "recover_command", "run_synthesis"]

#: The demo's recover script, run by path as an upstream script would be.
RECOVER = Path(__file__).resolve().parent / "recover" / "recover.py"

_IPC_LINE = re.compile(r"^ipc = ", re.M)


@dataclass(frozen=True)
class SynthJob:
    """One synthetic set: a variant at one IPC with one synthesis seed."""

    variant: Variant
    ipc: int
    seed: int
    iterations: int

    @property
    def name(self) -> str:
        return f"ipc{self.ipc}/{self.variant.key}/seed{self.seed}"


@dataclass
class SynthResult:
    job: SynthJob
    folder: Path
    images: torch.Tensor
    labels: torch.Tensor
    seconds: float
    manifest: Optional[Dict] = None


@dataclass(frozen=True)
class SynthContext:
    """What every run shares: the teacher, the real data for the bank, where things go."""

    teacher: Path
    real_data: Path
    bank_cache: Path
    out: Path
    r_bn: float = 0.01
    dataset: str = "digits"
    device: str = "cpu"


def job_folder(job: SynthJob, ctx: SynthContext) -> Path:
    """Where the run writes: ``new{cls}/`` PNGs, ``synthetic.pt`` and (DiRe) ``dire_manifest.json``."""
    return ctx.out / f"ipc{job.ipc}" / job.variant.key / f"seed{job.seed}"


def recover_command(job: SynthJob, ctx: SynthContext) -> List[str]:
    """The command line of ``job``; only the DiRe ones go through the launcher."""
    folder = job_folder(job, ctx)
    script_args = [
        "--arch-path", str(ctx.teacher), "--syn-data-path", str(folder.parent), "--exp-name", folder.name,
        "--ipc-start", "0", "--ipc-end", str(job.ipc), "--iteration", str(job.iterations),
        "--r-bn", str(ctx.r_bn), "--seed", str(job.seed), "--threads", "1", "--dataset", ctx.dataset,
        "--device", ctx.device, "--store-best-images",
    ]
    if not job.variant.dire:
        return [sys.executable, str(RECOVER), *script_args]
    launcher = [
        sys.executable, "-m", "dire_plugin.cli.run", "demo", str(RECOVER), "--real-data", str(ctx.real_data),
        "--r-c", repr(job.variant.r_c), "--r-e", repr(job.variant.r_e), "--cache-dir", str(ctx.bank_cache),
    ]
    if job.variant.components:
        launcher += ["--components", ",".join(job.variant.components)]
    return [*launcher, "--", *script_args]


def _child_env() -> Dict[str, str]:
    # No DIRE_* settings leak in from the caller (an inherited DIRE_ACTIVATE would turn a vanilla
    # run into a DiRe one); one OpenMP thread, matching --threads 1.
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIRE_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def _check_manifest(job: SynthJob, folder: Path, log: Path) -> Dict:
    """The proof that DiRe reached the images: one term per synthesis step, every step."""
    path = folder / "dire_manifest.json"
    if not path.is_file():
        raise DemoRunError(f"{job.name}: DiRe run wrote no {path.name} (log: {log})")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # unreadable, or cut short: the run that wrote it did not finish it
        raise DemoRunError(f"{job.name}: {path} is not valid JSON ({type(e).__name__}; log: {log})") from None
    if not isinstance(manifest, dict):
        raise DemoRunError(f"{job.name}: {path} holds a {type(manifest).__name__}, not a manifest (log: {log})")
    expected = job.ipc * job.iterations  # one batch (every class) per ipc index
    added, steps = manifest.get("terms_added"), manifest.get("synthesis_steps")
    if not (added == steps == expected):
        raise DemoRunError(
            f"{job.name}: DiRe was added to {added} of {steps} synthesis steps, expected {expected} "
            f"({path}; log: {log})"
        )
    return manifest


def _finish(job: SynthJob, ctx: SynthContext, log: Path, code: int, seconds: float) -> SynthResult:
    folder = job_folder(job, ctx)
    if code != 0:
        raise DemoRunError(f"{job.name}: recover exited with {code}: {_tail(log, 1)} (log: {log})")
    images, labels = _read_synthetic(job, ctx, folder / "synthetic.pt", log)
    manifest = _check_manifest(job, folder, log) if job.variant.dire else None
    if not job.variant.dire and (folder / "dire_manifest.json").exists():
        raise DemoRunError(f"{job.name}: the vanilla run wrote a DiRe manifest: DiRe leaked into it (log: {log})")
    return SynthResult(job, folder, images, labels, seconds, manifest)


def _read_synthetic(job: SynthJob, ctx: SynthContext, path: Path, log: Path) -> Tuple[Tensor, Tensor]:
    """``(images, labels)`` of a finished run, loaded as data and checked: one line naming the file
    and the log when they are not ``ipc`` images per class of the dataset.

    The folder is emptied before each run, so what is read here was written by this run; a run
    killed while writing exits non-zero and never gets here.
    """
    try:
        data = load_torch_file(path, "synthetic set")
    except DiReInputError as e:
        raise DemoRunError(f"{job.name}: {e} (log: {log})") from None
    images = data.get("images") if isinstance(data, dict) else None
    labels = data.get("labels") if isinstance(data, dict) else None
    if not (isinstance(images, Tensor) and isinstance(labels, Tensor)):
        raise DemoRunError(f"{job.name}: {path} holds no images and labels tensors (log: {log})")
    expected = job.ipc * DATASETS[ctx.dataset].num_classes
    if images.dim() != 4 or len(images) != expected or labels.shape != (expected,):
        raise DemoRunError(f"{job.name}: {path} holds images {tuple(images.shape)} and labels {tuple(labels.shape)}, "
                           f"expected {expected} of each (log: {log})")
    return images, labels.long()


def run_synthesis(jobs: Sequence[SynthJob], ctx: SynthContext, parallel: int, log_dir: Path,
                  progress: bool = True, on_done: Optional[Callable[[SynthResult], None]] = None) -> Dict[str, SynthResult]:
    """Run every job (``parallel`` at a time, longest first); results by job name.

    ``on_done`` is called with each result as soon as its run has been checked.

    A failed run stops the others and raises :class:`DemoRunError` with its log's last line.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    ctx.out.mkdir(parents=True, exist_ok=True)
    pending = sorted(jobs, key=lambda j: j.ipc * j.iterations, reverse=True)
    running: Dict[str, tuple] = {}
    results: Dict[str, SynthResult] = {}
    done_ipcs: Dict[str, int] = {}
    bar = tqdm(total=sum(j.ipc for j in jobs), desc="recover", unit="ipc", position=0, disable=not progress)
    try:
        while pending or running:
            while pending and len(running) < max(1, parallel):
                job = pending.pop(0)
                folder = job_folder(job, ctx)
                if folder.exists():
                    shutil.rmtree(folder)  # stale images or manifest of an earlier demo would mislead
                log = log_dir / (job.name.replace("/", "_") + ".log")
                handle = open(log, "w")
                proc = subprocess.Popen(recover_command(job, ctx), stdout=handle, stderr=subprocess.STDOUT,
                                        env=_child_env(), cwd=str(ctx.out))
                running[job.name] = (job, proc, handle, log, time.perf_counter())
            time.sleep(0.2)
            for name, (job, proc, handle, log, start) in list(running.items()):
                # The script announces an ipc index when it starts it: the last one is still running.
                seen = max(min(len(_IPC_LINE.findall(log.read_text(errors="replace"))), job.ipc) - 1, 0)
                code = proc.poll()
                if code is not None:
                    handle.close()
                    del running[name]
                    results[name] = _finish(job, ctx, log, code, time.perf_counter() - start)
                    if on_done is not None:
                        on_done(results[name])
                    seen = job.ipc
                bar.update(seen - done_ipcs.get(name, 0))
                done_ipcs[name] = seen
            bar.set_postfix_str(", ".join(sorted(running)) or "done", refresh=False)
    finally:
        for job, proc, handle, _, _ in running.values():
            proc.kill()
            proc.wait()
            handle.close()
        bar.close()
    return results
