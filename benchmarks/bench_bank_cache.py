#!/usr/bin/env python
"""What the real-data checks and the bank cache checks cost at every start, at ImageNet scale.

Benchmark 1 ("fingerprint"): :func:`dire_plugin.embeddings.realdata.data_fingerprint` (one ``stat`` per
file, sha256 over path, class, size, mtime) on a generated ImageFolder of ``--classes`` folders
with ``--per-class`` files each, against the baseline every start pays anyway: building
torchvision's ``ImageFolder`` on the same tree (its ``os.walk`` listing); and the floor, a bare
``os.stat`` of each file. The files are empty
stubs (neither step opens them) except one real JPEG per class. Warm page cache; median of
``--repeats`` interleaved runs.

Benchmark 2 ("check"): :func:`dire_plugin.embeddings.realdata.check_real_data` on the same tree (one
directory listing and one ~500x375 JPEG decoded per class), against the same ImageFolder
baseline; and a second call in the same process, where unchanged images are not decoded again.

Benchmark 3 ("checksum"): a cached bank of ``--rows`` x 512 embeddings (1,281,167: ImageNet-1K's
train set) in float32 and float16: the sha256 verified on a cache hit against the
``torch.load(weights_only=True)`` of the same file (``dire_plugin.io.files.load_torch_file``), and the whole
cache hit (load, checksum, layout and value checks). zlib's crc32 of the same bytes is printed
for comparison, and so are the two passes the value checks made before (an elementwise
``isfinite`` and an ``abs().sum()`` over the whole bank). The file was just written, so it is
read from the page cache.

Usage::

    python benchmarks/bench_bank_cache.py [--only fingerprint|check|checksum] [--per-class 1281 128]
        [--classes 1000] [--rows 1281167] [--repeats 3] [--tmp DIR]

Benchmarks print, they never assert speed.
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import torch

try:  # run from anywhere: the package sits one level up
    import dire_plugin  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dire_plugin.embeddings import bank as bank_module  # noqa: E402
from dire_plugin.embeddings import realdata  # noqa: E402
from dire_plugin.embeddings.realdata import RealDataSpec  # noqa: E402
from dire_plugin.io.digest import tensor_bytes  # noqa: E402
from dire_plugin.io.files import atomic_torch_save, load_torch_file  # noqa: E402
from _machine import machine_line  # noqa: E402  (benchmarks/)

SPEC = RealDataSpec("imagefolder", crop=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), resize=256)


def _jpeg(path: Path, rng: np.random.Generator) -> None:
    from PIL import Image

    # Smooth content, so the file size is near ImageNet's (~110 KB) rather than noise's.
    small = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(small).resize((500, 375), Image.BICUBIC).save(path, quality=90)


def make_tree(root: Path, classes: int, per_class: int) -> float:
    """``classes`` folders of ``per_class`` files: one JPEG first, then empty ``.JPEG`` stubs."""
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    for c in range(classes):
        folder = root / f"n{c:08d}"
        folder.mkdir(parents=True)
        _jpeg(folder / "a_first.JPEG", rng)
        for i in range(per_class - 1):
            with open(folder / f"n{c:08d}_{i}.JPEG", "wb"):
                pass
    return time.perf_counter() - t


def _stat_all(paths: List[str]) -> None:
    stat = os.stat
    for path in paths:
        stat(path)


def _median_times(calls: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, float]:
    times: Dict[str, List[float]] = {k: [] for k in calls}
    for _ in range(repeats):
        for name, call in calls.items():  # interleaved, so machine noise hits all
            gc.collect()
            t = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_tree(tmp: Path, classes: int, per_class_list: List[int], repeats: int, only: str) -> None:
    from torchvision import datasets

    for per_class in per_class_list:
        root = tmp / f"tree-{classes}x{per_class}"
        made = make_tree(root, classes, per_class)
        files = classes * per_class
        print(f"\n## tree: {classes} classes x {per_class} files = {files:,} files (generated in {made:.1f} s)")
        try:
            if only in ("all", "fingerprint"):
                ds = datasets.ImageFolder(str(root))
                assert len(ds) == files
                paths = [p for p, _ in ds.samples]
                t = _median_times({
                    "ImageFolder(root) (baseline)": lambda: datasets.ImageFolder(str(root)),
                    "data_fingerprint": lambda: realdata.data_fingerprint(ds, root, "imagefolder"),
                    "  os.stat of each file alone": lambda: _stat_all(paths),
                }, repeats)
                base = t["ImageFolder(root) (baseline)"]
                for name, s in t.items():
                    print(f"  {name:34s} {s:8.3f} s  {files / s:12,.0f} files/s  {s / base:6.2f}x baseline")
            if only in ("all", "check"):
                def fresh_check():
                    realdata._DECODED.clear()
                    return realdata.check_real_data(root, SPEC, classes)

                t = _median_times({
                    "ImageFolder(root) (baseline)": lambda: datasets.ImageFolder(str(root)),
                    "check_real_data (decodes)": fresh_check,
                }, repeats)
                realdata._DECODED.clear()
                realdata.check_real_data(root, SPEC, classes)
                again = _median_times({"check_real_data again": lambda: realdata.check_real_data(root, SPEC, classes)},
                                      repeats)
                t.update(again)
                base = t["ImageFolder(root) (baseline)"]
                for name, s in t.items():
                    print(f"  {name:34s} {s:8.3f} s  {s / base:6.2f}x baseline")
        finally:
            shutil.rmtree(root)


def _crc32(t: torch.Tensor) -> int:
    return zlib.crc32(tensor_bytes(t.contiguous()))


def bench_checksum(tmp: Path, rows: int, dim: int, repeats: int) -> None:
    for dtype in (torch.float32, torch.float16):
        classes = torch.arange(1000, dtype=torch.long)
        counts = torch.full((1000,), rows // 1000, dtype=torch.long)
        counts[: rows - int(counts.sum())] += 1
        g = torch.Generator().manual_seed(0)
        emb = torch.randn(rows, dim, generator=g).to(dtype)
        key = "0" * 64
        path = tmp / f"bank-{str(dtype).split('.')[-1]}.pt"
        atomic_torch_save(path, {
            "format": bank_module.CACHE_FORMAT, "key": key, "classes": classes, "counts": counts,
            "embeddings": emb, "checksum": bank_module._checksum(classes, counts, emb),
        })
        size = path.stat().st_size
        del emb
        gc.collect()
        state = load_torch_file(path, "bank cache")
        loaded = state["embeddings"]
        t = _median_times({
            "torch.load (baseline)": lambda: load_torch_file(path, "bank cache"),
            "sha256 checksum": lambda: bank_module._checksum(classes, counts, loaded),
            "crc32 (for comparison)": lambda: _crc32(loaded),
            "value checks (_check_classes)": lambda: bank_module._check_classes(loaded, classes, counts),
            "  before: isfinite(rows).all(1)": lambda: torch.isfinite(loaded).all(1),
            "  before: rows.abs().sum(1)": lambda: loaded.abs().sum(1).double(),
        }, repeats)
        del state, loaded  # the whole hit below holds its own copy: keep one in memory at a time
        gc.collect()
        hit = bank_module._load_cached(path, key, dtype, "fc")
        assert hit is not None and hit.cache_hit, "the benchmark's cache file must be a hit"
        del hit
        t.update(_median_times({"whole cache hit": lambda: bank_module._load_cached(path, key, dtype, "fc")}, repeats))
        gc.collect()
        path.unlink()
        base = t["torch.load (baseline)"]
        print(f"\n## bank {rows:,} x {dim} {dtype}, file {size / 1e9:.2f} GB")
        for name, s in t.items():
            print(f"  {name:34s} {s:8.3f} s  {size / s / 1e9:6.2f} GB/s  {s / base:6.2f}x baseline")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("all", "fingerprint", "check", "checksum"), default="all")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--per-class", type=int, nargs="+", default=[128, 1281])
    parser.add_argument("--rows", type=int, default=1_281_167)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tmp", default=None, help="where the trees and bank files go (default: the system's)")
    args = parser.parse_args()

    print(machine_line())
    print(f"load average before: {os.getloadavg()}")
    tmp = Path(tempfile.mkdtemp(prefix="dire-bench-bank-", dir=args.tmp))
    try:
        if args.only in ("all", "fingerprint", "check"):
            bench_tree(tmp, args.classes, args.per_class, args.repeats, args.only)
        if args.only in ("all", "checksum"):
            bench_checksum(tmp, args.rows, args.dim, args.repeats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
