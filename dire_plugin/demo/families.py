"""The method families ``dire demo`` distils with: for each, its script, its internal patch (the twin
of the real patch: :mod:`dire_plugin.demo.patches`), how a run is spelled on the command line,
where its outputs land, and how its sets are evaluated.

=======  =====================================  ===========  ============================================
family   script (``dire_plugin/``)              patch        evaluation
=======  =====================================  ===========  ============================================
sre2l    ``demo/recover/recover.py``            ``demo``     students from the teacher's soft labels
dwa      ``demo/dwa/distillation_digits.py``    ``demo-dwa`` students from the teacher's soft labels
dm       ``demo/dm/main_DM.py``                 ``demo-dm``  fresh ConvNets on hard labels, lr 0.01
mtt      ``demo/mtt/distill.py``                ``demo-mtt`` fresh ConvNets on hard labels, learnt syn_lr
=======  =====================================  ===========  ============================================

Each family's fixed options (its ``options``) are the upstream's usual ones scaled to 8x8 digits
and a CPU budget; the report records them with every row.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch
from torch import Tensor

from .spec import DM_SCRIPT, DWA_SCRIPT, FAMILY_NAMES, MTT_SCRIPT, RECOVER_SCRIPT

__all__ = ["FAMILIES", "FAMILY_NAMES", "Family", "RELABEL", "HARD_LABELS", "init_dir"]

#: The evaluation protocols (:mod:`.relabel`, :mod:`.hardlabel`).
RELABEL, HARD_LABELS = "relabel", "hard labels"

_PACKAGE = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Family:
    """One method family. ``iterations``: optimizer steps per batch of images (SRe²L, DWA: per ipc
    index) or in all (DM, MTT); ``quick_iterations`` those of ``--quick``."""

    name: str
    title: str
    method: str
    script: str
    protocol: str
    iterations: int
    quick_iterations: int
    options: Tuple[str, ...] = ()
    #: What one synthesis iteration is, for the report's seconds per iteration.
    iteration: str = "one optimizer step on the images"

    @property
    def path(self) -> Path:
        return _PACKAGE / self.script

    def script_args(self, job: Any, ctx: Any, folder: Path) -> List[str]:
        """The script's arguments for ``job`` writing into ``folder`` (its working directory)."""
        raise NotImplementedError

    def output_dir(self, folder: Path) -> Path:
        """Where the run leaves ``synthetic.pt`` and (DiRe) ``dire_manifest.json``."""
        return folder

    def expected_steps(self, job: Any) -> int:
        """Synthesis steps of a run: what the manifest's counters must say."""
        return job.iterations

    def prepare(self, job: Any, ctx: Any, real: Tuple[Tensor, Tensor]) -> None:
        """Write what the run reads besides the data (``real``: the reference row's images of
        this IPC and synthesis seed)."""


class _Recover(Family):
    def script_args(self, job: Any, ctx: Any, folder: Path) -> List[str]:
        return ["--arch-path", str(ctx.teacher), "--syn-data-path", str(folder.parent), "--exp-name", folder.name,
                "--ipc-start", "0", "--ipc-end", str(job.ipc), "--iteration", str(job.iterations),
                "--r-bn", str(ctx.r_bn), "--seed", str(job.seed), "--threads", "1", "--dataset", ctx.dataset,
                "--device", ctx.device, "--store-best-images", *self.options]

    def expected_steps(self, job: Any) -> int:
        return job.ipc * job.iterations  # one batch (every class) per ipc index


def init_dir(job: Any, ctx: Any) -> Path:
    """DWA's ``--init-path`` of ``job``: ``tensor_{i}.pt`` per ipc index, one real image per class."""
    return ctx.out / "dwa-init" / f"ipc{job.ipc}" / f"seed{job.seed}"


class _DWA(_Recover):
    def script_args(self, job: Any, ctx: Any, folder: Path) -> List[str]:
        return ["--arch-path", str(ctx.teacher), "--init-path", str(init_dir(job, ctx)),
                "--syn-data-path", str(folder.parent), "--exp-name", folder.name, "--ipc-start", "0",
                "--ipc-end", str(job.ipc), "--iteration", str(job.iterations), "--r-bn", str(ctx.r_bn),
                "--seed", str(job.seed), "--threads", "1", "--device", ctx.device, "--store-best-images",
                *self.options]

    def prepare(self, job: Any, ctx: Any, real: Tuple[Tensor, Tensor]) -> None:
        # DWA starts from real images: exactly the reference row's, image i of every class at ipc index i.
        images, labels = real
        folder = init_dir(job, ctx)
        folder.mkdir(parents=True, exist_ok=True)
        order = torch.argsort(labels, stable=True)
        per_class = images[order].reshape(-1, job.ipc, *images.shape[1:])  # [classes, ipc, C, H, W]
        for i in range(job.ipc):
            torch.save(per_class[:, i].contiguous(), folder / f"tensor_{i}.pt")


class _DM(Family):
    def script_args(self, job: Any, ctx: Any, folder: Path) -> List[str]:
        return ["--dataset", "digits", "--model", "ConvNet", "--ipc", str(job.ipc), "--Iteration", str(job.iterations),
                "--save_path", str(folder), "--seed", str(job.seed), "--threads", "1", "--device", ctx.device,
                *self.options]


#: Where the MTT-shaped script saves, relative to the folder it runs from (MTT's layout).
MTT_RUN = Path("logged_files") / "digits" / "demo"


class _MTT(Family):
    def script_args(self, job: Any, ctx: Any, folder: Path) -> List[str]:
        if ctx.experts is None:
            raise ValueError("the mtt family needs the expert buffer (ctx.experts)")
        return ["--dataset", "digits", "--model", "ConvNet", "--ipc", str(job.ipc), "--Iteration", str(job.iterations),
                "--buffer_path", str(ctx.experts), "--run_name", MTT_RUN.name, "--seed", str(job.seed),
                "--threads", "1", "--device", ctx.device, *self.options]

    def output_dir(self, folder: Path) -> Path:
        return folder / MTT_RUN


FAMILIES: Dict[str, Family] = {f.name: f for f in (
    _Recover("sre2l", "SRe²L", "demo", RECOVER_SCRIPT, RELABEL, iterations=60, quick_iterations=20,
             options=("--lr", "0.25")),
    # DWA's CIFAR recipe (scripts/run_cifar.sh): lr 0.25, 12 perturbation steps of rho 15e-3 in all.
    _DWA("dwa", "DWA", "demo-dwa", DWA_SCRIPT, RELABEL, iterations=60, quick_iterations=20,
         options=("--lr", "0.25", "--steps", "12", "--rho", "15e-3")),
    # DC-BENCH's DM defaults (lr_img 1, real init, DSA); 64 real images per class and iteration
    # of the ~135 each digit class has.
    _DM("dm", "DM", "demo-dm", DM_SCRIPT, HARD_LABELS, iterations=150, quick_iterations=40,
        options=("--lr_img", "1", "--batch_real", "64", "--init", "real", "--dsa_strategy", "scale_rotate_crop"),
        iteration="one SGD step on all synthetic images, with a fresh random network"),
    # MTT's CIFAR-10 recipe scaled down: 10 unrolled steps matching 2 expert epochs from a start
    # below epoch 5, images at lr 100, syn_lr learnt from 0.01 (the experts' lr) at 1e-5.
    _MTT("mtt", "MTT", "demo-mtt", MTT_SCRIPT, HARD_LABELS, iterations=30, quick_iterations=6,
         options=("--syn_steps", "10", "--expert_epochs", "2", "--max_start_epoch", "5", "--lr_img", "100",
                  "--lr_lr", "1e-05", "--lr_teacher", "0.01", "--pix_init", "real", "--dsa_strategy",
                  "scale_rotate_crop"),
         iteration="one SGD step on all synthetic images, through a 10-step unrolled student"),
)}

assert tuple(FAMILIES) == FAMILY_NAMES, "spec.FAMILY_NAMES (the CLI's choices) must list the families in order"
