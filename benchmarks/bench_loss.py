#!/usr/bin/env python
"""Speed and memory of ``DiReLoss`` against the paper's released per-class loop.

Benchmark 1 ("released"): the released code's setting, 50 classes x IPC 10 synthetic
embeddings, 500 real embeddings per class, D = 512, float32. Forward + backward of

  (a) the released per-class loop over ``torchmetrics.functional.pairwise`` (written here from
      its description: cosine among a class's synthetic rows, Euclidean distance and
      ``1 - cosine`` between them and the class's real rows, ``zero_diagonal=True`` everywhere,
      ``multiplier * (r_cos * (mean|a| + mean|c|) + r_euc * mean(b))`` summed over classes);
  (b) ``DiReLoss(r_c=0.1, r_e=0.001)`` on the same inputs, real bank packed once.

Repeats alternate A,B / B,A so machine noise hits both; medians are printed.

Benchmark 2 ("imagenet"): an SRe²L ImageNet-1K batch, 1000 classes x 1 synthetic embedding,
memory of 49 finished embeddings per class, 1300 real per class, D = 512. It always runs in a
fresh subprocess so its peak RSS is its own; the loss's extra peak is the high-water mark during
forward + backward minus the RSS right after the inputs were built (the kernel's peak counter is
reset through ``/proc/self/clear_refs``; where that is not allowed, ``ru_maxrss`` is used and the
figure then also contains the packing peak). The 2.5 GB real bank is packed once by
``pack_mapping``, whose time and peak are reported too.
The default chunk size is compared with a small one (``chunk_elements = 2**16``).

Usage::

    PYTHONPATH=. python benchmarks/bench_loss.py [--repeats N] [--only released|imagenet]
        [--imagenet-repeats N] [--device cpu|cuda] [--scale full|tiny]   (--only terms: benchmark 3)

``--device cuda`` runs both on the GPU (times synchronised; benchmark 2 then reports the GPU's
peak allocated memory above its inputs). ``--scale tiny`` shrinks both settings tenfold or more:
a check that the script runs (``benchmarks/gpu_check.sh --device cpu`` in CI), not a figure.

Benchmark 3 ("terms"): one step's CD against the ``logdet`` term (cosine and RBF kernels) with a
memory of finished embeddings: SRe²L's CIFAR-100 batch at IPC 50 (100 classes x 1, 49 finished per
class).

Benchmarks print, they never assert speed; the script only checks that the losses are finite
and of the same order.
"""
from __future__ import annotations

import argparse
import gc
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

try:  # run from anywhere: the package sits one level up
    import dire_plugin  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dire_plugin import DiReLoss
from dire_plugin.regularizer.grouped import ClassSums, pack_mapping
from dire_plugin.regularizer.kernels import DEFAULT_CHUNK_ELEMENTS
from _machine import machine_line, peak_kb, reset_peak_rss, status_kb  # noqa: E402  (benchmarks/)

SEED = 0
MB = 1024.0 * 1024.0


# --------------------------------------------------------------------------- helpers
def seed_everything(seed: int = SEED) -> None:
    import random

    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass








def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)




def fwd_bwd(loss_fn: Callable[[], torch.Tensor], leaf: torch.Tensor, faults: Optional[List[int]] = None) -> float:
    """Seconds for one forward + backward; ``leaf.grad`` is cleared first.

    ``faults``, when given, receives the minor page faults of the call: fresh large temporaries
    are page-faulted in on every call, which shows up as system time on CPU.
    """
    leaf.grad = None
    cuda = leaf.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    loss = loss_fn()
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    if faults is not None:
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return dt


# --------------------------------------------------------------------------- baseline
def released_loop(
    syn: torch.Tensor,
    real_per_class: List[torch.Tensor],
    ipc: int,
    r_cos: float = 1.0,
    r_euc: float = 0.01,
    multiplier: float = 0.1,
) -> torch.Tensor:
    """The paper's released per-class loop (from its description): chunks of ``ipc`` rows of a
    class-sorted batch, three ``torchmetrics`` pairwise matrices per class."""
    from torchmetrics.functional.pairwise import pairwise_cosine_similarity, pairwise_euclidean_distance

    total = syn.new_zeros(())
    for c, real_c in enumerate(real_per_class):
        syn_c = syn[c * ipc:(c + 1) * ipc]
        a = pairwise_cosine_similarity(syn_c, zero_diagonal=True)
        b = pairwise_euclidean_distance(syn_c, real_c, zero_diagonal=True)
        cdm = 1 - pairwise_cosine_similarity(syn_c, real_c, zero_diagonal=True)
        total = total + r_cos * a.abs().mean() + r_cos * cdm.abs().mean() + r_euc * b.mean()
    return total * multiplier


# --------------------------------------------------------------------------- benchmark 1
#: Sizes of the two benchmarks: the real settings, and a tiny one that only proves the script runs.
SCALES = {
    "full": {"released": dict(classes=50, ipc=10, real_per_class=500),
             "terms": dict(classes=100, ipc=1, mem_per_class=49, real_per_class=500),
             "imagenet": dict(classes=1000, mem_per_class=49, real_per_class=1300)},
    "tiny": {"released": dict(classes=5, ipc=4, real_per_class=20),
             "terms": dict(classes=5, ipc=1, mem_per_class=4, real_per_class=20),
             "imagenet": dict(classes=20, mem_per_class=4, real_per_class=30)},
}


def bench_released(repeats: int, warmup: int = 3, classes: int = 50, ipc: int = 10,
                   real_per_class: int = 500, dim: int = 512, device: str = "cpu") -> Dict[str, float]:
    seed_everything()
    device = torch.device(device)
    print(f"== Benchmark 1 (released setting): {classes} classes x IPC {ipc} synthetic, "
          f"{real_per_class} real per class, D={dim}, float32, {device}")
    print(machine_line())
    centers = torch.randn(classes, dim)
    real = {c: (centers[c] + torch.randn(real_per_class, dim)).to(device) for c in range(classes)}
    real_list = [real[c] for c in range(classes)]
    labels = torch.arange(classes).repeat_interleave(ipc).to(device)  # class-sorted, as the released code
    syn = (centers[labels.cpu()] + torch.randn(classes * ipc, dim)).to(device).requires_grad_(True)

    packed = pack_mapping(real, syn.device)  # once per run in real use, outside the timed loop
    dire = DiReLoss(r_c=0.1, r_e=0.001)

    def run_base() -> torch.Tensor:
        return released_loop(syn, real_list, ipc)

    def run_dire() -> torch.Tensor:
        return dire(syn, labels, packed)

    # Values and gradients once, untimed: finite and of the same order.
    with torch.no_grad():
        v_base, v_dire = float(run_base()), float(run_dire())
        comps = dire.components(syn, labels, packed)
    grads = {}
    for name, fn in (("released", run_base), ("DiReLoss", run_dire)):
        syn.grad = None
        fn().backward()
        grads[name] = syn.grad.clone()
    syn.grad = None
    print(f"loss values: released={v_base:.5f}  DiReLoss={v_dire:.5f}  (ratio {v_dire / v_base:.4f}); "
          f"DiRe components summed over classes: "
          + ", ".join(f"{k}={float(v):.4f}" for k, v in comps.items()))
    print(f"grad norms : released={float(grads['released'].norm()):.5f}  DiReLoss={float(grads['DiReLoss'].norm()):.5f}")
    for name, v in (("released", v_base), ("DiReLoss", v_dire)):
        if not torch.isfinite(torch.tensor(v)) or not bool(torch.isfinite(grads[name]).all()):
            raise SystemExit(f"{name} loss or gradient is not finite")
    if not (0.2 <= v_dire / v_base <= 5.0):
        raise SystemExit(f"losses are not of the same order: released={v_base}, DiReLoss={v_dire}")

    for _ in range(warmup):
        fwd_bwd(run_base, syn)
        fwd_bwd(run_dire, syn)
    t_base, t_dire, f_base, f_dire = [], [], [], []
    for i in range(repeats):  # A,B then B,A: noise and ordering effects hit both
        order = ((run_base, t_base, f_base), (run_dire, t_dire, f_dire))
        for fn, out, faults in (order if i % 2 == 0 else order[::-1]):
            out.append(fwd_bwd(fn, syn, faults))
    mb, md = statistics.median(t_base) * 1e3, statistics.median(t_dire) * 1e3
    print(f"forward+backward, median of {repeats} (after {warmup} warm-up):")
    print(f"  released loop : {mb:8.2f} ms  (min {min(t_base) * 1e3:.2f}, max {max(t_base) * 1e3:.2f}; "
          f"{statistics.median(f_base):.0f} minor page faults per call)")
    print(f"  DiReLoss      : {md:8.2f} ms  (min {min(t_dire) * 1e3:.2f}, max {max(t_dire) * 1e3:.2f}; "
          f"{statistics.median(f_dire):.0f} minor page faults per call)")
    print(f"  speed-up      : {mb / md:8.2f}x")
    return {"released_ms": mb, "dire_ms": md, "speedup": mb / md}


# --------------------------------------------------------------------------- benchmark 2
def bench_imagenet_child(repeats: int, classes: int = 1000, ipc: int = 1,
                         mem_per_class: int = 49, real_per_class: int = 1300, dim: int = 512,
                         device: str = "cpu") -> None:
    """Runs in its own process (see ``main``): RSS figures are this benchmark's alone."""
    seed_everything()
    if device != "cpu":
        return bench_imagenet_gpu(repeats, classes, ipc, mem_per_class, real_per_class, dim, torch.device(device))
    print(f"== Benchmark 2 (ImageNet-scale SRe²L batch): {classes} classes x {ipc} synthetic, memory "
          f"{mem_per_class} per class, {real_per_class} real per class, D={dim}, float32, CPU")
    print(machine_line())
    rss0 = status_kb("VmRSS") or 0

    # The real-use path: per-class tensors packed once by pack_mapping (as a bank does).
    real = dict(zip(range(classes), torch.randn(classes * real_per_class, dim).split(real_per_class)))
    rss_dicts = status_kb("VmRSS") or 0
    hwm_reset = reset_peak_rss()
    t0 = time.perf_counter()
    packed = pack_mapping(real, torch.device("cpu"))
    t_pack = time.perf_counter() - t0
    pack_peak = peak_kb(hwm_reset)
    del real
    how = (f"pack_mapping of the real bank: {t_pack:.1f} s, peak RSS during packing "
           f"{(pack_peak - rss_dicts) / 1024:.0f} MB above the per-class tensors "
           f"({'VmHWM' if hwm_reset else 'ru_maxrss'})")
    memory = dict(zip(range(classes), torch.randn(classes * mem_per_class, dim).split(mem_per_class)))
    mem_packed = pack_mapping(memory, torch.device("cpu"), what="memory embeddings")
    mem_sums = ClassSums(mem_packed.classes, mem_packed.unit_sums, mem_packed.counts)  # what the loss uses
    del memory, mem_packed
    gc.collect()

    labels = torch.randperm(classes).repeat_interleave(ipc)  # one per class, any order
    syn = torch.randn(classes * ipc, dim).requires_grad_(True)
    inputs_bytes = _nbytes(packed.padded, packed.unit_sums, packed.counts, packed.classes,
                           mem_sums.unit_sums, mem_sums.counts, mem_sums.classes, syn, labels)
    rss_inputs = status_kb("VmRSS") or 0
    print(f"inputs: {inputs_bytes / MB:.1f} MB (packed real bank {_nbytes(packed.padded) / MB:.1f} MB, "
          f"memory class sums {_nbytes(mem_sums.unit_sums) / MB:.2f} MB, synthetic {_nbytes(syn) / MB:.2f} MB); "
          f"RSS after inputs {rss_inputs / 1024:.0f} MB (interpreter+torch {rss0 / 1024:.0f} MB)")
    print(how)

    configs = [("default", DEFAULT_CHUNK_ELEMENTS), ("small", 1 << 16)]
    for name, chunk in configs:
        dire = DiReLoss(r_c=0.1, r_e=0.001, chunk_elements=chunk)

        def run() -> torch.Tensor:
            return dire(syn, labels, packed, memory=mem_sums)

        gc.collect()
        hwm_reset = reset_peak_rss()
        base = status_kb("VmRSS") or 0
        if not hwm_reset:
            base = max(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        # The first call measures the peak and counts as one of the repeats: each call takes
        # seconds, so one-time costs are noise, and the script has to stay within ~2 minutes.
        syn.grad = None
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        loss = run()
        loss.backward()
        times = [time.perf_counter() - t0]
        faults = [resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0]
        peak = peak_kb(hwm_reset)
        if not (torch.isfinite(loss) and bool(torch.isfinite(syn.grad).all())):
            raise SystemExit("ImageNet-scale loss or gradient is not finite")
        value = float(loss.detach())
        del loss
        times += [fwd_bwd(run, syn, faults) for _ in range(repeats - 1)]
        print(f"chunk_elements={chunk} ({name}): loss={value:.5f}; forward+backward median of {len(times)}: "
              f"{statistics.median(times) * 1e3:.0f} ms (all: {', '.join(f'{t * 1e3:.0f}' for t in times)}; "
              f"{statistics.median(faults):.0f} minor page faults per call); extra peak RSS "
              f"{(peak - base) / 1024:.0f} MB ({'VmHWM after clear_refs' if hwm_reset else 'ru_maxrss delta, may hide earlier peaks'})")


def bench_imagenet_gpu(repeats: int, classes: int, ipc: int, mem_per_class: int, real_per_class: int, dim: int,
                       device: torch.device) -> None:
    """Benchmark 2 on a GPU: times synchronised, the peak is the allocator's high-water mark."""
    print(f"== Benchmark 2 (ImageNet-scale SRe²L batch): {classes} classes x {ipc} synthetic, memory "
          f"{mem_per_class} per class, {real_per_class} real per class, D={dim}, float32, {device} "
          f"({torch.cuda.get_device_name(device)})")
    print(machine_line())
    real = dict(zip(range(classes), torch.randn(classes * real_per_class, dim).split(real_per_class)))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    packed = pack_mapping(real, device)
    torch.cuda.synchronize()
    print(f"pack_mapping of the real bank onto the GPU: {time.perf_counter() - t0:.2f} s, "
          f"{_nbytes(packed.padded) / MB:.0f} MB")
    memory = dict(zip(range(classes), torch.randn(classes * mem_per_class, dim).split(mem_per_class)))
    mem_packed = pack_mapping(memory, device, what="memory embeddings")
    mem_sums = ClassSums(mem_packed.classes, mem_packed.unit_sums, mem_packed.counts)
    labels = torch.randperm(classes).repeat_interleave(ipc).to(device)
    syn = torch.randn(classes * ipc, dim, device=device).requires_grad_(True)
    for name, chunk in [("default", DEFAULT_CHUNK_ELEMENTS), ("small", 1 << 16)]:
        dire = DiReLoss(r_c=0.1, r_e=0.001, chunk_elements=chunk)

        def run() -> torch.Tensor:
            return dire(syn, labels, packed, memory=mem_sums)

        fwd_bwd(run, syn)  # warm-up (kernels, allocator)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        times = [fwd_bwd(run, syn) for _ in range(repeats)]
        peak = torch.cuda.max_memory_allocated(device) - base
        if not bool(torch.isfinite(syn.grad).all()):
            raise SystemExit("ImageNet-scale gradient is not finite")
        print(f"chunk_elements={chunk} ({name}): forward+backward median of {len(times)}: "
              f"{statistics.median(times) * 1e3:.2f} ms (all: {', '.join(f'{t * 1e3:.2f}' for t in times)}); "
              f"extra peak GPU memory {peak / MB:.0f} MB")


# --------------------------------------------------------------------------- logdet beside CD
def bench_terms(repeats: int, device: str = "cpu", classes: int = 100, ipc: int = 1, mem_per_class: int = 49,
                real_per_class: int = 500, dim: int = 512) -> None:
    """Benchmark 3: one synthesis step's CD against ``logdet`` (cosine and RBF kernels), each
    alone with its memory, forward + backward, interleaved; the default is SRe²L's CIFAR-100 batch
    at IPC 50's last index (one image per class, 49 finished per class)."""
    from dire_plugin.embeddings.memory import SyntheticMemory

    seed_everything()
    dev = torch.device(device)
    labels = torch.arange(classes, device=dev).repeat(ipc)
    syn = torch.randn(classes * ipc, dim, device=dev).abs().requires_grad_()
    real = pack_mapping({c: torch.rand(real_per_class, dim, device=dev) for c in range(classes)}, dev)
    memory = SyntheticMemory()
    memory.add(torch.rand(classes * mem_per_class, dim), torch.arange(classes).repeat_interleave(mem_per_class))
    runs = {
        "cd": DiReLoss(r_c=1.0, r_e=0.0, components=("cd",)),
        "logdet (cosine)": DiReLoss(r_c=0.0, r_e=0.0, r_d=1.0, components=("logdet",)),
        "logdet (rbf)": DiReLoss(r_c=0.0, r_e=0.0, r_d=1.0, components=("logdet",), logdet_kernel="rbf"),
    }
    times: Dict[str, List[float]] = {name: [] for name in runs}
    for i in range(repeats + 2):  # two warm-up rounds: the memory's packing is cached after the first
        for name in (list(runs) if i % 2 == 0 else list(reversed(runs))):
            dt = fwd_bwd(lambda: runs[name](syn, labels, real, memory=memory), syn)
            if i >= 2:
                times[name].append(dt)
    print(f"== Benchmark 3 (a step's CD against logdet): {classes} classes x {ipc} synthetic, memory "
          f"{mem_per_class} per class, D={dim}, {device}; median of {repeats}, interleaved")
    base = statistics.median(times["cd"])
    for name, ts in times.items():
        median = statistics.median(ts)
        print(f"  {name:<16} {median * 1e3:8.2f} ms  ({median / base:.2f}x CD)")


def bench_imagenet(repeats: int, device: str = "cpu", scale: str = "full") -> int:
    """Benchmark 2 in a fresh interpreter so that its memory high-water mark is its own."""
    cmd = [sys.executable, os.path.abspath(__file__), "--only", "imagenet", "--imagenet-repeats", str(repeats),
           "--in-process", "--device", device, "--scale", scale]
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    sys.stdout.flush()
    return subprocess.call(cmd, env=env)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=20, help="timed repeats of benchmark 1 (default 20)")
    p.add_argument("--imagenet-repeats", type=int, default=3, help="timed calls of benchmark 2 per chunk size (default 3, at least 1)")
    p.add_argument("--only", choices=("released", "imagenet", "terms"), help="run one benchmark")
    p.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)  # the subprocess itself
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--scale", choices=sorted(SCALES), default="full", help="full (default) or tiny (a run check)")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.imagenet_repeats < 1:
        p.error("repeats must be at least 1")
    t0 = time.perf_counter()
    rc = 0
    sizes = SCALES[args.scale]
    if args.only in (None, "released"):
        bench_released(args.repeats, device=args.device, **sizes["released"])
    if args.only in (None, "terms"):
        bench_terms(args.repeats, device=args.device, **sizes["terms"])
    if args.only in (None, "imagenet"):
        if args.in_process:
            bench_imagenet_child(args.imagenet_repeats, device=args.device, **sizes["imagenet"])
        else:
            rc = bench_imagenet(args.imagenet_repeats, args.device, args.scale)
    if not args.in_process:
        print(f"total wall time {time.perf_counter() - t0:.1f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
