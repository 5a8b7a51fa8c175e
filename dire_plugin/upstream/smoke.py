"""``dire-apply --verify --smoke``: run each covered upstream script for a few steps on the CPU.

For every entry script of a method, in a temporary folder: a random-init teacher checkpoint in the
format that script loads (:class:`~dire_plugin.hooks.declare.ScriptSpec`), fake real data (an
ImageFolder of two tiny random images per class, or a torchvision-format CIFAR for scripts whose
spec has ``smoke_data``; either way the bank builds offline and as fast as the teacher allows), then the script itself through ``python -m dire_plugin.cli.run`` with
``DIRE_CPU_SHIM=1``, ``WANDB_MODE=disabled`` (and a stand-in ``wandb`` module where wandb is not
installed) and the spec's tiny ``smoke_args`` (once per ``smoke_variants`` entry, if it has any).
A script passes when it exits 0, wrote images (or its ``smoke_outputs`` result files), and its
``dire_manifest.json`` beside them says the DiRe term was added to at least one synthesis step.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..errors import DiReError
from ..hooks.declare import ScriptSpec
from ..hooks.registry import load_method
from ..hooks.runtime import MANIFEST_NAME
from .shim import ENV_DEVICES, ENV_FAKE_DATA, ENV_REDIRECT

__all__ = [
    "SmokeResult", "run_smoke", "smoke_script", "upstream_failure", "write_fake_cifar", "write_fake_imagefolder",
    "write_init_images", "write_teacher_checkpoint",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
#: Real images written per class: enough for a bank, few enough to embed in seconds; one for 1000
#: classes or more, where every teacher (G-VBSM's four) embeds them at 224 px, minutes on a CPU.
IMAGES_PER_CLASS = 2
MANY_CLASSES = 1000
#: Launcher flags for the run settings a config may hold.
_CONFIG_FLAGS = {"r_c": "--r-c", "r_e": "--r-e", "r_d": "--r-d", "share": "--share", "reduction": "--reduction",
                 "log_every": "--log-every", "bank_dtype": "--bank-dtype", "logdet_kernel": "--logdet-kernel"}
_FRAME = re.compile(r'^\s*File "(.+)", line (\d+)')
#: Environment variables of an enclosing DiRe run that must not leak into the smoke run.
_INHERITED = ("DIRE_ACTIVATE", "DIRE_DISABLE")

# What CDA's and MTT's scripts call on wandb, for machines without it: the smoke checks DiRe, not
# logging. MTT reads its options back from ``wandb.config._items`` and names its output folder
# after ``wandb.run.name``, as wandb's disabled mode lets it.
_WANDB_STUB = '''"""Stand-in for wandb written by dire-plugin's smoke run (wandb is not installed)."""
class _Api:
    api_key = None
class _Config:
    _items = {}
class _Run:
    name = "dire-smoke"
api = _Api()
config = _Config()
run = None
def login(*args, **kwargs): return True
def init(*args, config=None, **kwargs):
    global run
    _Config._items = dict(vars(config)) if hasattr(config, "__dict__") else dict(config or {})
    run = _Run()
    return run
def log(*args, **kwargs): return None
def finish(*args, **kwargs): return None
def Image(*args, **kwargs): return None
def Histogram(*args, **kwargs): return None
'''


@dataclass
class SmokeResult:
    """Outcome of one script's smoke run; ``defect``: it ended in a failure the pinned upstream
    has on its own (``ScriptSpec.known_defects``), which is no failure of the patch."""

    script: str
    ok: bool
    seconds: float
    detail: str
    workdir: Optional[Path] = None
    defect: bool = False

    @property
    def status(self) -> str:
        return "UPSTREAM DEFECT" if self.defect else "PASS" if self.ok else "FAIL"


def write_teacher_checkpoint(spec: ScriptSpec, path: Path, seed: int = 0) -> Path:
    """Save a random-init teacher in the format ``spec`` says its script loads (its
    ``checkpoint_writer`` writes it, where it has one).

    The checkpoint also pickles an ``argparse.Namespace`` under ``"args"``, as torchvision's
    reference training (which made the Tiny-ImageNet teachers) does: loading it needs the same
    ``weights_only`` allowance a real checkpoint needs.
    """
    import torch
    import torchvision
    from torch import nn

    path.parent.mkdir(parents=True, exist_ok=True)
    if spec.checkpoint_writer:
        module, _, function = spec.checkpoint_writer.partition(":")
        getattr(importlib.import_module(module), function)(spec, path)
        return path
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torchvision.models.get_model(spec.arch, weights=None, num_classes=spec.num_classes)
        if spec.cifar_stem:
            model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            model.maxpool = nn.Identity()
    state = {spec.checkpoint_prefix + k: v for k, v in model.state_dict().items()}
    args = argparse.Namespace(model=spec.arch, num_classes=spec.num_classes, epochs=0)
    torch.save({spec.checkpoint_key or "model": state, "epoch": 0, "args": args}, path)
    return path


def write_fake_imagefolder(root: Path, num_classes: int, per_class: int = IMAGES_PER_CLASS, size: int = 8, seed: int = 0) -> Path:
    """An ImageFolder of ``num_classes`` folders with ``per_class`` random ``size``x``size`` PNGs."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    width = len(str(num_classes - 1))
    for c in range(num_classes):
        folder = root / f"class{c:0{width}d}"  # zero-padded: ImageFolder's sorted order is the label order
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def write_init_images(spec: ScriptSpec, root: Path, ipcs: int = 1, seed: int = 0) -> Path:
    """The real images a real-image-initialised script starts from, made up: ``tensor_{ipc}.pt``
    for each of ``ipcs`` ipc indices (one image per class, normalised as the script expects) or
    one folder per class holding
    ``ipcs`` JPEGs (``os.listdir(folder)[ipc]`` is what DWA reads); for ``spec.smoke_init_classes``
    classes only, each with at least ``spec.smoke_init_images``, where the spec says so."""
    import numpy as np
    import torch

    root.mkdir(parents=True, exist_ok=True)
    size = spec.real_data.crop
    if spec.smoke_init == "tensors":
        g = torch.Generator().manual_seed(seed)
        for ipc in range(ipcs):
            torch.save(torch.randn(spec.num_classes, 3, size, size, generator=g).clamp(-1.5, 1.5), root / f"tensor_{ipc}.pt")
    elif spec.smoke_init == "folders":
        from PIL import Image

        rng = np.random.default_rng(seed)
        width = len(str(spec.num_classes - 1))
        for c in range(spec.smoke_init_classes or spec.num_classes):
            folder = root / f"n{c:0{width}d}"
            folder.mkdir(exist_ok=True)
            for i in range(max(ipcs, spec.smoke_init_images)):
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"img{i}.JPEG")
    return root


#: Training and test images per class of a made-up CIFAR: enough for DM's real initialisation at
#: IPC 10 and its real batches, few enough to load in a blink.
FAKE_CIFAR_TRAIN, FAKE_CIFAR_TEST = 12, 2


def write_fake_cifar(root: Path, kind: str, train: int = FAKE_CIFAR_TRAIN, test: int = FAKE_CIFAR_TEST,
                     seed: int = 0) -> Path:
    """Random images in torchvision's CIFAR layout under ``root`` (``cifar-10-batches-py/`` or
    ``cifar-100-python/``): what an upstream's ``datasets.CIFAR10(root, download=True)`` reads.
    Their MD5 sums cannot be the published ones: the CPU shim's ``DIRE_SHIM_FAKE_DATA`` lets
    them pass."""
    import pickle

    import numpy as np

    classes = {"cifar10": 10, "cifar100": 100}[kind]
    rng = np.random.default_rng(seed)

    def batch(per_class: int) -> Dict[str, Any]:
        labels = np.repeat(np.arange(classes), per_class)
        rng.shuffle(labels)
        data = rng.integers(0, 256, (len(labels), 3 * 32 * 32), dtype=np.uint8)
        key = "labels" if kind == "cifar10" else "fine_labels"
        return {"data": data, key: labels.tolist()}

    def dump(path: Path, obj: Any) -> None:
        with open(path, "wb") as f:
            pickle.dump(obj, f)

    if kind == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        # torchvision concatenates five training batches: the classes spread over them.
        whole = batch(train)
        for i in range(5):
            dump(folder / f"data_batch_{i + 1}", {"data": whole["data"][i::5], "labels": whole["labels"][i::5]})
        dump(folder / "test_batch", batch(test))
        dump(folder / "batches.meta", {"label_names": [f"class{c}" for c in range(classes)]})
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True, exist_ok=True)
        dump(folder / "train", batch(train))
        dump(folder / "test", batch(test))
        dump(folder / "meta", {"fine_label_names": [f"class{c}" for c in range(classes)]})
    return root


def upstream_failure(log: Path, root: Path) -> Optional[Tuple[str, int, str]]:
    """``(file relative to root, line, exception line)`` when the run's traceback ends inside the
    upstream checkout (its own code raised), else ``None`` (ours, or no traceback)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    frames = [m for m in (_FRAME.match(line) for line in lines) if m]
    if not frames or not any(line.startswith("Traceback") for line in lines):
        return None
    file, line = frames[-1].group(1), int(frames[-1].group(2))
    try:
        rel = Path(file).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return None
    exception = next((l for l in reversed(lines) if l.strip() and not l.startswith(" ")), "")
    return rel, line, exception.strip()


def _failed_manifest(work: Path) -> Dict[str, Any]:
    for path in sorted((work / "cache" / "runs").glob(f"*{MANIFEST_NAME}")):
        try:
            return json.loads(path.read_text())
        except ValueError:
            pass
    return {}


def _config_flags(config: Optional[Mapping[str, Any]]) -> List[str]:
    flags: List[str] = []
    # A share calibrates the weights itself (dire-run refuses both): its run starts from the defaults.
    skip = ("r_c", "r_e", "r_d") if config and config.get("share") is not None else ()
    for key, flag in _CONFIG_FLAGS.items():
        if config and config.get(key) is not None and key not in skip:
            flags += [flag, str(config[key])]
    if config and config.get("components"):
        flags += ["--components", ",".join(config["components"])]
    return flags


def _environment(work: Path) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _INHERITED}
    # No __pycache__ in the user's checkout: dire-apply refuses a work tree with untracked files.
    env.update(DIRE_CPU_SHIM="1", WANDB_MODE="disabled", PYTHONDONTWRITEBYTECODE="1")
    env["WANDB_DIR"] = str(work)
    if importlib.util.find_spec("wandb") is None:
        stubs = work / "stubs"
        (stubs / "wandb").mkdir(parents=True, exist_ok=True)
        (stubs / "wandb" / "__init__.py").write_text(_WANDB_STUB)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(stubs), env.get("PYTHONPATH", "")) if p)
    return env


def _run(cmd: Sequence[str], cwd: Path, env: Dict[str, str], log: Path, timeout: int) -> Optional[int]:
    """Exit status of ``cmd`` (its output to ``log``), ``None`` when it ran past ``timeout``."""
    with open(log, "wb") as out:
        # Its own process group, so a timeout also ends the DataLoader workers it started.
        proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None


def _untracked_and_changed(root: Path) -> List[str]:
    """``git status`` of the checkout, one path per line, without our ``.dire/`` folder."""
    out = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=all"],
                         capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if not line[3:].startswith(".dire/")]


def _images(out: Path) -> List[Path]:
    return [p for p in out.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.parent.name.startswith("new")]


def _tail(log: Path, lines: int = 15) -> str:
    try:
        text = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in text[-lines:])


def _outputs(out: Path, pattern: Optional[str]) -> Tuple[List[Path], List[Path]]:
    """The files a run wrote under ``out`` and the folders its manifest belongs in: images in
    ``new*/`` class folders (beside those folders), or files matching ``pattern`` (beside them)."""
    if pattern is None:
        images = _images(out)
        return images, sorted({p.parent.parent for p in images})
    files = sorted(p for p in out.rglob(pattern) if p.is_file())
    return files, sorted({p.parent for p in files})


def _check_outputs(out: Path, vanilla: bool, pattern: Optional[str] = None) -> str:
    """Empty when the run wrote images (or the ``pattern`` result files) and (with DiRe) a
    manifest beside them that counts added terms."""
    images, folders = _outputs(out, pattern)
    if not images:
        return f"no {pattern or 'images'} written under {out}"
    if vanilla:
        return ""
    manifests = [f / MANIFEST_NAME for f in folders if (f / MANIFEST_NAME).is_file()]
    if not manifests:
        return f"no {MANIFEST_NAME} beside the {pattern or 'images'} in {', '.join(map(str, folders))}"
    manifest = json.loads(manifests[0].read_text())
    if not manifest.get("terms_added", 0) > 0:
        return f"DiRe was added to no step ({manifest.get('synthesis_steps', 0)} synthesis steps, {manifests[0]})"
    share = manifest.get("gradient_share") or {}
    if not share.get("steps_measured"):
        return f"the manifest records no gradient share ({manifests[0]})"
    return ""


def _summary(out: Path, vanilla: bool, pattern: Optional[str] = None) -> str:
    files = len(_outputs(out, pattern)[0])
    what = f"{files} images" if pattern is None else f"{files} {pattern} file{'s' if files != 1 else ''}"
    if vanilla:
        return f"{what}, vanilla"
    manifests = list(out.rglob(MANIFEST_NAME))
    manifest = json.loads(manifests[0].read_text()) if manifests else {}
    share = manifest.get("gradient_share") or {}
    median = share.get("median")
    measured = (f", gradient share median {median:.4g} over {share.get('steps_measured')} measured steps"
                if median is not None else "")
    teachers = manifest.get("teachers") or []
    # Several teachers (G-VBSM's rotation): the steps that got each one's term, and its bank.
    each = ("; per teacher: " + ", ".join(
        f"{t['teacher']} D={t['bank']['dim']} {t['terms_added']} steps (bank {t['bank']['build_seconds']:.1f} s)"
        for t in teachers)) if len(teachers) > 1 else ""
    # Images saved that no step forwarded (INFER's real ones): forwarded once per teacher into its memory.
    never = (manifest.get("capture") or {}).get("never_forwarded")
    unforwarded = (f"; {never['images_saved']} saved images no step forwarded, in the memory of "
                   f"{len(never['per_teacher'])} teacher{'s' if len(never['per_teacher']) != 1 else ''} "
                   f"({never['seconds']:.1f} s)") if never else ""
    return (f"{what}, DiRe added to {manifest.get('terms_added')}/{manifest.get('synthesis_steps')} steps"
            f"{measured}{each}{unforwarded}")


def smoke_script(method: str, root: Path, rel: str, spec: ScriptSpec, config: Optional[Mapping[str, Any]] = None,
                 timeout: Optional[int] = None, vanilla: bool = False, keep: bool = False) -> SmokeResult:
    """Smoke-run one entry script ``rel`` of ``root``; the work folder is kept when it fails.

    ``timeout`` defaults to the spec's ``smoke_timeout``.
    """
    script = Path(root) / rel
    start = time.time()
    timeout = spec.smoke_timeout if timeout is None else timeout
    if not script.is_file():
        return SmokeResult(rel, False, 0.0, f"{script} does not exist")
    work = Path(tempfile.mkdtemp(prefix="dire-smoke-"))
    # The smoke's own options may pick the data and the teacher (--dataset, --arch-name, --num-classes).
    run = spec.for_argv(spec.smoke_args)
    # Written where the script will read it: on its command line ({ckpt}) or at its fixed path.
    wanted = run.checkpoint_at or any("{ckpt}" in a for a in spec.smoke_args)
    ckpt = write_teacher_checkpoint(run, work / "teacher.pth") if run.checkpoint_key and wanted else None
    data, init, out = work / "data", work / "init", work / "out"
    args = [a.format(ckpt=ckpt or "", out=out, arch=spec.arch, init=init, data=data, work=work) for a in spec.smoke_args]
    if spec.smoke_data:  # the script reads its own training set: the bank's real data is that set
        real = write_fake_cifar(data, spec.smoke_data)
    else:
        real = write_fake_imagefolder(work / "real", run.num_classes,
                                      per_class=1 if run.num_classes >= MANY_CLASSES else IMAGES_PER_CLASS)
    if spec.smoke_init:
        write_init_images(run, init, ipcs=run.smoke_init_images)
    # torchrun starts the ranks (gloo on the CPU: the shim maps NCCL to it) with each rank's
    # environment; each rank runs the same command.
    runner = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                  str(spec.smoke_ranks)] if spec.smoke_ranks > 1 else [])
    if vanilla:
        cmd = [*runner, "-m", "dire_plugin.upstream.shim", str(script), *args]
    else:
        # Launcher options before METHOD SCRIPT: everything after SCRIPT belongs to the script.
        cmd = [*runner, "-m", "dire_plugin.cli.run", "--real-data", str(real), "--cache-dir", str(work / "cache"),
               *_config_flags(config), method, str(script), "--", *args]
    env = _environment(work)
    if spec.smoke_data:
        env[ENV_FAKE_DATA] = str(data)
    if spec.smoke_devices is not None:  # a script that starts a worker per GPU itself (mp.spawn)
        env[ENV_DEVICES] = str(spec.smoke_devices)
    if run.checkpoint_at:  # loaded from a fixed path: the shim loads our random-init teacher instead
        env[ENV_REDIRECT] = json.dumps({run.checkpoint_at: str(ckpt)})
    if spec.smoke_prepare:  # further made-up inputs (MTT's expert buffer); a missing dependency stops here
        module, _, function = spec.smoke_prepare.partition(":")
        try:
            redirects = getattr(importlib.import_module(module), function)(work, args, env, script)
        except DiReError as e:
            shutil.rmtree(work, ignore_errors=True)
            return SmokeResult(rel, False, time.time() - start, f"{e} (not run)")
        if redirects:  # teachers it wrote for the fixed paths the script loads them from
            env[ENV_REDIRECT] = json.dumps({**json.loads(env.get(ENV_REDIRECT) or "{}"), **redirects})
    cwd = {"root": Path(root), "out": out}.get(spec.run_from, script.parent)
    cwd.mkdir(parents=True, exist_ok=True)
    # The checkout must come out of a run as it went in (our hidden .dire/ aside).
    before = _untracked_and_changed(Path(root))
    log = work / "log.txt"
    rc = _run(cmd, cwd, env, log, timeout)
    seconds = time.time() - start
    left = sorted(set(_untracked_and_changed(Path(root))) - set(before))
    if left:
        return SmokeResult(rel, False, seconds, f"the run left files in the checkout: {', '.join(left[:5])} "
                           f"(log kept in {work})\n{_tail(log)}", work)
    if rc is None:
        problem = f"timed out after {timeout} s"
    elif rc != 0:
        failure = upstream_failure(log, Path(root))
        if failure is not None:
            file, line, exception = failure
            known = any(file == f and exception.startswith(e) for f, e in spec.known_defects)
            manifest = _failed_manifest(work)
            dire = (f"; DiRe was added to {manifest.get('terms_added')}/{manifest.get('synthesis_steps')} "
                    "synthesis steps before it" if manifest else "")
            where = f"upstream {'defect' if known else 'error'} at {file}:{line}: {exception}{dire}"
            if known:
                shutil.rmtree(work, ignore_errors=True)
                return SmokeResult(rel, True, seconds, f"{where} (the pinned upstream fails there without DiRe too)",
                                   defect=True)
            problem = where
        else:
            problem = f"exit status {rc}"
    else:
        problem = _check_outputs(out, vanilla, spec.smoke_outputs)
    if problem:
        return SmokeResult(rel, False, seconds, f"{problem} (log and files kept in {work})\n{_tail(log)}", work)
    detail = _summary(out, vanilla, spec.smoke_outputs)
    if keep:
        return SmokeResult(rel, True, seconds, detail, work)
    shutil.rmtree(work, ignore_errors=True)
    return SmokeResult(rel, True, seconds, detail)


def run_smoke(method: str, root: Path, config: Optional[Mapping[str, Any]] = None, scripts: Optional[list] = None,
              timeout: Optional[int] = None, *, vanilla: bool = False) -> int:
    """Smoke-run the entry scripts of ``method`` in the checkout ``root`` (all covered ones, or
    ``scripts``), printing one PASS/FAIL/UPSTREAM DEFECT line per script. Returns 0 when none
    failed (a known upstream defect is not a failure of the patch), else 1.

    ``config`` is the checkout's dire-apply config: its weights and components are passed on, its
    real data and cache are not (the smoke uses fake data in a temporary folder). ``vanilla``
    runs the scripts under the CPU shim only, without DiRe (the baseline).
    """
    module = load_method(method)
    chosen = list(scripts) if scripts else list(module.SCRIPTS)
    failed = 0
    for rel in chosen:
        spec = module.SCRIPTS.get(rel)
        if spec is None:
            runs = [("", None)]
        else:  # one run per variant (``[name]`` after the script), or the one run
            runs = [(f" [{name}]", replace(spec, smoke_args=(*spec.smoke_args, *extra), smoke_variants=()))
                    for name, extra in spec.smoke_variants] or [("", spec)]
        for label, run in runs:
            if run is None:
                result = SmokeResult(rel, False, 0.0, f"not an entry script of {method}: {', '.join(module.SCRIPTS)}")
            else:
                result = smoke_script(method, Path(root), rel, run, config, timeout, vanilla)
            failed += not result.ok
            print(f"{result.status} {method} {rel}{label} ({result.seconds:.1f} s): {result.detail}", flush=True)
    return 1 if failed else 0
