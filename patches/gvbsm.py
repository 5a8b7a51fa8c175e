"""G-VBSM (shaoshitong/G_VBSM_Dataset_Condensation): SRe²L's decoupled recovery with several
teachers, one per iteration (round-robin), inside ``mp.spawn`` workers that split each batch.

DiRe needs nothing of its own here: the decoupled capture finds each iteration's teacher through
its classifier, the core keeps one bank and one memory per teacher (its keys), the workers are
switched on by the prelude every spawned child runs, and their batch shards are joined by the
union exchange of SRe²L's multi-GPU script. G-VBSM's own diversity term (``--nuc-norm``, a KL
between softmaxed Gram eigenvalues per class) stays as it is: ``--nuc-norm 0`` is G-VBSM + DiRe
without it (docs/methods/gvbsm.md).

Smoke runs (CPU) start two gloo workers (the shim reports two devices), write a random-initialised
checkpoint of every CIFAR/Tiny-ImageNet teacher in ``--pre-train-path``'s layout, built by the
checkout's own model code, and read the statistics the checkout commits (``./statistic``).
"""
from __future__ import annotations

import functools
import json
import math
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Tuple

from dire_plugin.embeddings.realdata import RealDataSpec
from dire_plugin.hooks.declare import ScriptSpec, Target, Weights, option_value
from dire_plugin.hooks.patcher import method_patch

from .sre2l import IMAGENET

METHOD = "gvbsm"

SCRIPT = "data_synthesis_with_svd_with_db_with_all_statistic.py"
BRANCHES = ("CIFAR_10", "CIFAR_100", "Tiny_ImageNet", "full_ImageNet_1k")

# Both CIFAR branches clip and denormalise with CIFAR-100's constants: their teachers saw those.
CIFAR100 = RealDataSpec("cifar100", crop=32, mean=(0.5071, 0.4867, 0.4408), std=(0.2675, 0.2565, 0.2761))
CIFAR10 = RealDataSpec("cifar10", crop=32, mean=CIFAR100.mean, std=CIFAR100.std)
# The Tiny-ImageNet branch normalises with ImageNet's constants (tiny_in_dataset.normalize).
TINY_GVBSM = RealDataSpec("imagefolder", crop=64, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


@dataclass(frozen=True)
class Teachers:
    """The teachers a script builds from checkpoints (facts of the pinned code), for the smoke run's
    made-up ``--pre-train-path/<folder>/<name>/squeeze_<name>.pth``: built by the checkout's own
    ``models.model_dict[name]``, or ``baseline.get_network`` for the ``ConvNet*`` names."""

    folder: str
    names: Tuple[str, ...]
    num_classes: int
    size: int


CIFAR_TEACHERS = ("ResNet18", "ConvNetW128", "MobileNetV2", "WRN_16_2", "ShuffleNetV2_0_5")

#: Script (repo-relative) → its teachers; ImageNet's are torchvision's ``pretrained=True`` ones,
#: which the CPU shim builds random.
TEACHERS: Dict[str, Teachers] = {
    f"Branch_CIFAR_10/recover/{SCRIPT}": Teachers("CIFAR-10", CIFAR_TEACHERS, 10, 32),
    f"Branch_CIFAR_100/recover/{SCRIPT}": Teachers("CIFAR-100", CIFAR_TEACHERS, 100, 32),
    f"Branch_Tiny_ImageNet/recover/{SCRIPT}": Teachers("Tiny-ImageNet", CIFAR_TEACHERS, 200, 64),
}

# recover.sh's settings, on two CPU workers, few images and iterations. Every smoke makes at least
# as many steps as the script has teachers (each teacher's bank is built and used), over two
# batches or more (a finished batch joins every teacher's memory), and at most 50 images per worker
# (a worker's activations with the statistics hooks' copies of them took 9 GB for 200 Tiny-ImageNet
# images). Tiny-ImageNet's script needs --ipc-number to be a multiple of 10: 2000 images.
_SMOKE = ("--exp-name", "smoke", "--syn-data-path", "{out}", "--lr", "0.05", "--l2-scale", "0", "--tv-l2", "0",
          "--r-loss", "0.01", "--nuc-norm", "1.", "--verifier", "--store-best-images", "--gpu-id", "0,1")
PRETRAINED = ("--pre-train-path", "{work}/pretrain")


def spawned_spec(real: RealDataSpec, classes: int, args: Sequence[str], timeout: int = 900, **options: Any) -> ScriptSpec:
    """A branch script run from its folder (``./statistic``), whose smoke run has two gloo workers;
    ``args`` are its smoke arguments, ``options`` further :class:`ScriptSpec` fields."""
    options = {"smoke_prepare": "dire_plugin.patches.gvbsm:prepare_smoke", **options}
    return ScriptSpec(real, num_classes=classes, smoke_args=tuple(args), smoke_timeout=timeout, smoke_devices=2,
                      run_from="script", **options)


def branch_targets(script: str, helpers: Sequence[str]) -> Tuple[Target, ...]:
    """Each branch's ``script`` (its loop: ``main_worker``; its teachers: ``main_syn``) and the
    ``helpers`` of its ``utils.py``, checked when the script imports ``utils``."""
    return tuple(
        Target(f"Branch_{branch}/recover/{script}", symbol) for branch in BRANCHES for symbol in ("main_worker", "main_syn")
    ) + tuple(Target(f"Branch_{branch}/recover/utils.py", symbol, module="utils") for branch in BRANCHES for symbol in helpers)


SCRIPTS = {
    f"Branch_CIFAR_10/recover/{SCRIPT}": spawned_spec(
        CIFAR10, 10, (*_SMOKE, *PRETRAINED, "--batch-size", "10", "--ipc-number", "2", "--iteration", "3")),
    f"Branch_CIFAR_100/recover/{SCRIPT}": spawned_spec(
        CIFAR100, 100, (*_SMOKE, *PRETRAINED, "--batch-size", "20", "--ipc-number", "1", "--iteration", "2")),
    f"Branch_Tiny_ImageNet/recover/{SCRIPT}": spawned_spec(
        TINY_GVBSM, 200, (*_SMOKE, *PRETRAINED, "--batch-size", "100", "--ipc-number", "10", "--iteration", "1"), 1800),
    # 1000 classes at 224 px through four torchvision teachers: the slowest of the four. Batches of
    # 20 (10 per worker): a worker's activations and the statistics hooks' copies of them took
    # 10 GB at 100 images per worker, 7.5 GB at 25.
    f"Branch_full_ImageNet_1k/recover/{SCRIPT}": spawned_spec(
        IMAGENET, 1000, (*_SMOKE, "--batch-size", "20", "--ipc-number", "1", "--iteration", "1"), 3600),
}

#: SRe²L's Adam (lr 0.05-0.1 in recover.sh) on CE + feature matching: the released SRe²L weights.
DEFAULT_WEIGHTS = Weights(why="SRe²L's loss and Adam optimiser with several teachers: the released SRe²L weights")

TARGETS = branch_targets(SCRIPT, ("BNFeatureHook", "ConvFeatureHook"))


# --- smoke runs (dire-apply --verify --smoke) -----------------------------------------------------


#: What the branches import beyond dire-plugin's own requirements (import name → what to install),
#: checked before a smoke run so that a missing one is one line, not the upstream's traceback.
NEEDS = {"CIFAR": ("einops", "kornia", "scipy"), "Tiny": ("einops", "kornia", "scipy", "prefetch_generator"),
         "ImageNet": ("einops", "scipy")}


def require_upstream_imports(script: Path) -> None:
    """A :class:`~dire_plugin.errors.DiReInputError` naming what ``script``'s branch imports and
    this environment lacks (their installation is the checkout's, as its own README says)."""
    import importlib.util

    from dire_plugin.errors import DiReInputError

    branch = next((key for key in NEEDS if key in script.parent.parent.name), "CIFAR")
    missing = [name for name in NEEDS[branch] if importlib.util.find_spec(name) is None]
    if missing:
        raise DiReInputError(f"{script.parent.parent.name}/{script.parent.name}/{script.name} imports "
                             f"{', '.join(missing)}, which is not installed: pip install {' '.join(missing)}")


def write_teachers(script: Path, teachers: Teachers, root: Path, env: Dict[str, str], extra: str = "") -> None:
    """Random-initialised checkpoints of ``teachers`` under ``root/<folder>/<name>/squeeze_<name>.pth``,
    built by the checkout's own model code: a child interpreter in the script's folder imports its
    ``models`` and ``baseline`` (no bytecode is written there). ``extra``: JSON options for
    :func:`build_in_checkout` (EDC's statistics)."""
    code = (f"from dire_plugin.patches.gvbsm import build_in_checkout; "
            f"build_in_checkout({json.dumps(asdict(teachers))!r}, {str(root)!r}, {extra or '{}'!r})")
    run_in_checkout(code, script.parent, env, f"build the teachers of {script.name}")


def run_in_checkout(code: str, cwd: Path, env: Mapping[str, str], what: str) -> None:
    """Run ``code`` in a child interpreter in ``cwd``, a folder of the upstream checkout, so that
    its own modules import (a smoke's made-up teachers built by the checkout's model code): our
    ``DIRE_*`` variables left out, no bytecode written there. A failure is one line,
    ``could not <what> with the checkout's code: <its last line>``."""
    run = subprocess.run([sys.executable, "-B", "-c", code], cwd=cwd, capture_output=True, text=True,
                         env={**{k: v for k, v in env.items() if not k.startswith("DIRE_")}, "PYTHONDONTWRITEBYTECODE": "1"})
    if run.returncode != 0:
        from dire_plugin.errors import DiReInputError

        last = (run.stderr.strip().splitlines() or ["no output"])[-1]
        raise DiReInputError(f"could not {what} with the checkout's code: {last}")


def build_in_checkout(teachers: str, root: str, extra: str = "{}") -> None:
    """Run by :func:`write_teachers` in the script's folder of the checkout."""
    import torch

    spec, options = json.loads(teachers), json.loads(extra)
    import importlib

    # The checkout's own modules, from the current folder: looked up by name, as they are not ours
    # to declare (the packaging test lists every static import as a dependency).
    models = importlib.import_module("models")
    get_network = importlib.import_module("baseline").get_network

    built = []
    for i, name in enumerate(spec["names"]):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(i)
            if name.startswith("ConvNet"):
                net = get_network(name, channel=3, num_classes=spec["num_classes"], im_size=(spec["size"],) * 2, dist=False)
            else:
                net = models.model_dict[name](num_classes=spec["num_classes"])
        folder = Path(root) / spec["folder"] / name
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(net.state_dict(), folder / f"squeeze_{name}.pth")
        built.append((name, net))
    if options.get("statistics"):
        write_statistics(built, spec["size"], spec["num_classes"], options)


def write_statistics(teachers: List[Tuple[str, Any]], size: int, classes: int, options: Dict[str, Any]) -> int:
    """Made-up statistics for every BatchNorm and convolution of ``teachers`` (``(aux name, model)``)
    in the files ``utils.BNFeatureHook``/``ConvFeatureHook`` load with ``--category-aware global``:
    ``<root>/ConvFeatureHook/<layer>/running.npz`` and, per class ``c``,
    ``<root>/{BN,Conv}FeatureHook/class_<c>/<layer>/running.npz``; ``options``: ``root``, ``name``
    and ``patch`` (EDC's ``STATISTICS``). The shapes come from one forward of each teacher at
    ``size`` px. Returns the number of files."""
    import numpy as np
    import torch
    from torch import nn

    root, form, patch = Path(options["root"]), options["name"], int(options["patch"])
    rng = np.random.default_rng(0)
    written = 0
    for aux, net in teachers:
        inputs: Dict[str, Tuple[int, ...]] = {}

        def record(module: Any, args: Any, output: Any, name: str = "") -> None:  # None: the output stays
            inputs.setdefault(name, tuple(args[0].shape))

        hooks = [m.register_forward_hook(functools.partial(record, name=n))
                 for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
        with torch.no_grad():
            net.eval()(torch.zeros(1, 3, size, size))
        for h in hooks:
            h.remove()
        for name, module in net.named_modules():
            if name not in inputs:
                continue
            layer = form.format(cls=type(net).__name__, aux=aux, module=name)
            _, channels, height, width = inputs[name]
            stats = {"running_dd_var": 1 + 0.1 * rng.random(channels, dtype=np.float32),
                     "running_dd_mean": 0.1 * rng.standard_normal(channels, dtype=np.float32)}
            if isinstance(module, nn.Conv2d):
                patches = math.ceil(height / patch) * math.ceil(width / patch)
                stats.update(running_patch_var=1 + 0.1 * rng.random(patches, dtype=np.float32),
                             running_patch_mean=0.1 * rng.standard_normal(patches, dtype=np.float32))
                folders = [root / "ConvFeatureHook" / layer] + [root / "ConvFeatureHook" / f"class_{c}" / layer
                                                                for c in range(classes)]
            else:
                folders = [root / "BNFeatureHook" / f"class_{c}" / layer for c in range(classes)]
            for folder in folders:
                folder.mkdir(parents=True, exist_ok=True)
                np.savez(folder / "running.npz", **stats)
            written += len(folders)
    return written


def prepare_smoke(work: Path, args: Sequence[str], env: Dict[str, str], script: Path) -> None:
    """Made-up teacher checkpoints where the script loads them (``--pre-train-path``)."""
    require_upstream_imports(script)
    rel = next((r for r in TEACHERS if script.as_posix().endswith(r)), None)
    pretrain = option_value(args, "--pre-train-path")
    if rel is not None and pretrain:
        write_teachers(script, TEACHERS[rel], Path(pretrain), env)


# The patch itself needs torch: built on first use, so that reading SCRIPTS/TARGETS stays fast.
patch, unpatch = method_patch(METHOD, lambda: SCRIPTS, TARGETS, capture="decoupled")
