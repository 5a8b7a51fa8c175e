"""Look-alike upstream checkouts for the tests: our own small files at the paths a patch covers,
committed in a git repository whose remote is the pinned one, and a lock pinning that commit."""
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import git

from dire_plugin.upstream.lockfile import MethodLock, fingerprint_symbol, format_lock, load_lock

IDENTITY = {
    "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org",
    "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org",
}


def lookalike_source(symbols: List[str]) -> str:
    """Small stand-in code defining ``symbols`` (``name``, ``Class`` or ``Class.method``)."""
    classes: Dict[str, List[str]] = defaultdict(list)
    functions = []
    for symbol in symbols:
        head, _, method = symbol.partition(".")
        if method or head[:1].isupper():
            classes[head] += [method] if method else []
        else:
            functions.append(head)
    out = ['"""Look-alike of an upstream file, written for the dire-plugin tests."""\n']
    for name in functions:
        out.append(f"\n\ndef {name}(*args, **kwargs):\n    return {name!r}, len(args)\n")
    for name, methods in classes.items():
        out.append(f"\n\nclass {name}:\n    def __init__(self, *args):\n        self.args = args\n")
        for method in methods:
            out.append(f"\n    def {method}(self, *args):\n        return {method!r}\n")
    return "".join(out)


def commit_all(repo: git.Repo, message: str) -> str:
    repo.git.add("-A")
    repo.git.commit("-q", "-m", message, env=IDENTITY)
    return repo.head.commit.hexsha


def _modules(patch_modules) -> list:
    return list(patch_modules) if isinstance(patch_modules, (list, tuple)) else [patch_modules]


def build_checkout(root: Path, patch_modules, url: str, files: Optional[Mapping[str, str]] = None) -> str:
    """Write every script and target file of the patch module(s) under ``root`` (``files`` gives
    real contents for some paths, stand-ins otherwise), commit, add ``origin``; return the commit."""
    wanted: Dict[str, List[str]] = {}
    for module in _modules(patch_modules):
        for script in module.SCRIPTS:
            wanted.setdefault(script, [])
        for target in module.TARGETS:
            if target.symbol not in wanted.setdefault(target.file, []):
                wanted[target.file].append(target.symbol)
    for rel, symbols in wanted.items():
        path = root / rel  # a literal "*small_dataset" folder, as upstream has
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text((files or {}).get(rel) or lookalike_source(symbols))
    (root / "README.md").write_text("look-alike\n")
    repo = git.Repo.init(root)
    head = commit_all(repo, "look-alike")
    repo.create_remote("origin", url + ".git")
    repo.close()
    return head


def write_lock(path: Path, root: Path, patch_modules, url: str, head: str) -> Path:
    """The shipped lock with each patch module's method pinned to the look-alike at ``head``."""
    locks = dict(load_lock())
    for module in _modules(patch_modules):
        prints = {(t.file, t.symbol): fingerprint_symbol(root / t.file, t.symbol) for t in module.TARGETS}
        locks[module.METHOD] = MethodLock(module.METHOD, url, head, tuple(module.SCRIPTS), prints)
    path.write_text(format_lock(locks.values()))
    return path


def write_image_folder(root: Path, num_classes: int, per_class: int = 2, size: int = 16, seed: int = 0) -> Path:
    """An ImageFolder of random PNGs (``class_XXX/img_Y.png``): real data stand-in for the bank."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        folder = root / f"class_{c:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"img_{i}.png")
    return root


def write_demo_teacher(path: Path, num_classes: int, seed: int = 0, size: int = 8) -> Path:
    """A seeded random teacher for the demo's recover script, which the tests also run as the
    look-alike of an upstream recover script: ``{"state_dict": ...}`` with DataParallel's
    ``module.`` keys, as SRe²L's CIFAR checkpoints are saved.

    The BatchNorm running statistics come from a few random batches, so the recover script's BN
    loss is not trivially zero.
    """
    import torch

    from dire_plugin.demo.model import build_model

    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model("convnet", num_classes)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(16, 3, size, size, generator=generator) * 2 - 1)
    state = {"module." + k: v.detach().clone() for k, v in model.eval().state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state}, path)
    return path


def run_lookalike(method: str, script: Path, args: Sequence[str], mode: str, *, world: Mapping, cwd: Path,
                  dire_flags: Sequence[str] = (), fake_data: Optional[Path] = None,
                  extra_env: Optional[Mapping[str, str]] = None) -> subprocess.CompletedProcess:
    """Run a look-alike's ``script`` as a user would: ``"vanilla"`` under the CPU shim alone, else
    through ``dire-run`` with ``world``'s real data and cache; no inherited ``DIRE_*`` settings."""
    if mode == "vanilla":
        cmd = [sys.executable, "-m", "dire_plugin.upstream.shim", str(script), *args]
    else:
        cmd = [sys.executable, "-m", "dire_plugin.cli.run", "--real-data", str(world["data"]), "--cache-dir",
               str(world["base"] / "cache"), *dire_flags, method, str(script), "--", *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIRE_")}
    env.update(DIRE_CPU_SHIM="1", DIRE_UPSTREAM_LOCK=str(world["lock"]), PYTHONDONTWRITEBYTECODE="1",
               PYTHONUNBUFFERED="1")
    if fake_data is not None:  # the script reads its own training set: the shim's fake one
        env["DIRE_SHIM_FAKE_DATA"] = str(fake_data)
    env.update(extra_env or {})
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
