"""Run each family's script as users would: ``python SCRIPT ...`` (vanilla) and
``python -m dire_plugin.cli.run METHOD SCRIPT ...`` (+ DiRe), several at once.

Each run is a separate process with one torch thread, in its own folder: the batches are a few
8×8 images, far too small for intra-op parallelism, so two single-threaded runs on two cores
finish sooner than two two-threaded ones in turn (and much sooner on a loaded machine). On a GPU
the runs share it: a batch of ten CIFAR images leaves it mostly idle, so several processes fill it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from tqdm import tqdm

from ..errors import DiReInputError
from ..io.files import load_torch_file
from .errors import DemoRunError
from .families import FAMILIES, Family
from .outputs import SYNTHETIC_FILE, synthetic_extras
from .spec import DATASETS
from .variants import Variant

__all__ = ["SynthJob", "SynthResult", "SynthContext", "RECOVER", "child_env", "job_folder", "synth_command",
           "run_synthesis"]

#: The demo's SRe²L-shaped recover script, run by path as an upstream script would be.
RECOVER = FAMILIES["sre2l"].path


@dataclass(frozen=True)
class SynthJob:
    """One synthetic set: a family's variant at one IPC with one synthesis seed."""

    family: str
    variant: Variant
    ipc: int
    seed: int
    iterations: int

    @property
    def name(self) -> str:
        return f"{self.family}/ipc{self.ipc}/{self.variant.key}/seed{self.seed}"

    @property
    def spec(self) -> Family:
        return FAMILIES[self.family]


@dataclass
class SynthResult:
    """A finished run: its set, its wall time, its command, what its script measured and saved
    (the CPU seconds and steps of its synthesis loop; MTT's learnt ``syn_lr``), and its DiRe manifest."""

    job: SynthJob
    folder: Path
    images: torch.Tensor
    labels: torch.Tensor
    seconds: float
    manifest: Optional[Dict] = None
    command: List[str] = field(default_factory=list)
    loop_cpu_seconds: Optional[float] = None
    steps: Optional[int] = None
    syn_lr: Optional[float] = None

    @property
    def cpu_seconds_per_step(self) -> Optional[float]:
        return self.loop_cpu_seconds / self.steps if self.loop_cpu_seconds is not None and self.steps else None


@dataclass(frozen=True)
class SynthContext:
    """What every run shares: the teacher, the real data for the bank, the MTT experts, where
    things go."""

    teacher: Path
    real_data: Path
    bank_cache: Path
    out: Path
    r_bn: float = 0.01
    dataset: str = "digits"
    device: str = "cpu"
    experts: Optional[Path] = None


def job_folder(job: SynthJob, ctx: SynthContext) -> Path:
    """The run's own folder (its working directory), under which it writes its images,
    ``synthetic.pt`` and (DiRe) ``dire_manifest.json``."""
    return ctx.out / job.family / f"ipc{job.ipc}" / job.variant.key / f"seed{job.seed}"


def synth_command(job: SynthJob, ctx: SynthContext) -> List[str]:
    """The command line of ``job``; only the DiRe ones go through the launcher, with the
    variant's weight flags (none: the method's default weights)."""
    family = job.spec
    script_args = family.script_args(job, ctx, job_folder(job, ctx))
    if not job.variant.dire:
        return [sys.executable, str(family.path), *script_args]
    launcher = [
        sys.executable, "-m", "dire_plugin.cli.run", family.method, str(family.path), "--real-data", str(ctx.real_data),
        "--cache-dir", str(ctx.bank_cache), *job.variant.launcher_flags(),
    ]
    return [*launcher, "--", *script_args]


def child_env() -> Dict[str, str]:
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
    """The proof that DiRe reached the images: the family's patch ran, one term per synthesis
    step, every step (``folder``: where the run's outputs are)."""
    path = folder / "dire_manifest.json"
    if not path.is_file():
        raise DemoRunError(f"{job.name}: DiRe run wrote no {path.name} (log: {log})")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # unreadable, or cut short: the run that wrote it did not finish it
        raise DemoRunError(f"{job.name}: {path} is not valid JSON ({type(e).__name__}; log: {log})") from None
    if not isinstance(manifest, dict):
        raise DemoRunError(f"{job.name}: {path} holds a {type(manifest).__name__}, not a manifest (log: {log})")
    if manifest.get("method") != job.spec.method:
        raise DemoRunError(f"{job.name}: {path} was written by the {manifest.get('method')!r} patch, expected "
                           f"{job.spec.method!r} (log: {log})")
    expected = job.spec.expected_steps(job)
    added, steps = manifest.get("terms_added"), manifest.get("synthesis_steps")
    if not (added == steps == expected):
        raise DemoRunError(
            f"{job.name}: DiRe was added to {added} of {steps} synthesis steps, expected {expected} "
            f"({path}; log: {log})"
        )
    return manifest


def _finish(job: SynthJob, ctx: SynthContext, log: Path, code: int, seconds: float) -> SynthResult:
    folder = job_folder(job, ctx)
    outputs = job.spec.output_dir(folder)
    if code != 0:
        raise DemoRunError(f"{job.name}: {job.spec.path.name} exited with {code}: {_tail(log, 1)} (log: {log})")
    images, labels, extras = _read_synthetic(job, ctx, outputs / SYNTHETIC_FILE, log)
    manifest = _check_manifest(job, outputs, log) if job.variant.dire else None
    if not job.variant.dire and (outputs / "dire_manifest.json").exists():
        raise DemoRunError(f"{job.name}: the vanilla run wrote a DiRe manifest: DiRe leaked into it (log: {log})")
    steps = int(extras["steps"]) if extras["steps"] is not None else None
    return SynthResult(job, outputs, images, labels, seconds, manifest, synth_command(job, ctx),
                       extras["cpu_seconds"], steps, extras["syn_lr"])


def _read_synthetic(job: SynthJob, ctx: SynthContext, path: Path, log: Path) -> Tuple[Tensor, Tensor, Dict]:
    """``(images, labels, extras)`` of a finished run, loaded as data and checked: one line naming
    the file and the log when they are not ``ipc`` images per class of the dataset.

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
    return images, labels.long(), synthetic_extras(data)


def run_synthesis(jobs: Sequence[SynthJob], ctx: SynthContext, parallel: int, log_dir: Path,
                  progress: bool = True, on_done: Optional[Callable[[SynthResult], None]] = None) -> Dict[str, SynthResult]:
    """Run every job (``parallel`` at a time, longest first); results by job name.

    ``on_done`` is called with each result as soon as its run has been checked.

    A failed run stops the others and raises :class:`DemoRunError` with its log's last line.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    ctx.out.mkdir(parents=True, exist_ok=True)
    pending = sorted(jobs, key=_cost, reverse=True)
    running: Dict[str, tuple] = {}
    results: Dict[str, SynthResult] = {}
    bar = tqdm(total=len(jobs), desc="synthesis", unit="set", position=0, disable=not progress)
    try:
        while pending or running:
            while pending and len(running) < max(1, parallel):
                job = pending.pop(0)
                folder = job_folder(job, ctx)
                if folder.exists():
                    shutil.rmtree(folder)  # stale images or manifest of an earlier demo would mislead
                folder.mkdir(parents=True)
                log = log_dir / (job.name.replace("/", "_") + ".log")
                handle = open(log, "w")
                proc = subprocess.Popen(synth_command(job, ctx), stdout=handle, stderr=subprocess.STDOUT,
                                        env=child_env(), cwd=str(folder))
                running[job.name] = (job, proc, handle, log, time.perf_counter())
            time.sleep(0.2)
            for name, (job, proc, handle, log, start) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                handle.close()
                del running[name]
                results[name] = _finish(job, ctx, log, code, time.perf_counter() - start)
                bar.update(1)
                if on_done is not None:
                    on_done(results[name])
            bar.set_postfix_str(", ".join(sorted(running)) or "done", refresh=False)
    finally:
        for job, proc, handle, _, _ in running.values():
            proc.kill()
            proc.wait()
            handle.close()
        bar.close()
    return results


#: CPU seconds per synthesis step of each family at IPC 10 (measured: the report's CPU ms / iter on
#: 2 cores, DiRe runs) and of a process's start: the longest runs start first, so the last one
#: does not leave a core idle at the end.
_COST_PER_STEP = {"sre2l": 0.006, "dwa": 0.009, "dm": 0.055, "mtt": 0.19}
_COST_TO_START = 4.0


def _cost(job: SynthJob) -> float:
    return _COST_TO_START + _COST_PER_STEP.get(job.family, 0.1) * job.spec.expected_steps(job) * max(1, job.ipc / 10)
