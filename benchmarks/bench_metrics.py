#!/usr/bin/env python
"""Speed, memory and agreement of ``dire_plugin.metrics`` against the reference packages.

Benchmark 1 ("prdc"): coverage with N = 5000 real, M = 500 fake embeddings, D = 512, k = 5,
float32 and float64 inputs. ``prdc.compute_prdc(real, fake, 5)`` (which builds the real-real,
fake-fake and real-fake distance matrices and returns coverage together with precision, recall
and density) against ``coverage`` with its default matmul dtype (that of the input) and with the
other one (the value does not depend on it); for float32 inputs also both with one thread (on a
shared 2-core machine oversubscribed threads can make two slower than one). Calls alternate so machine noise hits all; medians and ratios are
printed. The coverage values must be identical, or the script exits with an error.

Benchmark 2 ("large"): ``coverage`` alone at N = 20 000 real, M = 500 fake, D = 512, float32,
in a fresh subprocess so that its memory high-water mark is its own. Extra peak = the kernel's
``VmHWM`` during the call (reset through ``/proc/self/clear_refs``) minus the RSS right before it.
prdc is not run at this size: its three matrices take ≈ 6 GB and minutes here.

Benchmark 3 ("vendi"): Vendi score (q = 1) of n = 4000, d = 512 float64 embeddings against
``vendi_score.vendi.score_dual`` (interleaved, median) and ``score_X`` (once: it decomposes the
n × n kernel). Values must agree to 1e-9 relative.

Usage::

    python benchmarks/bench_metrics.py [--repeats N] [--only prdc|large|vendi]

Benchmarks print, they never assert speed.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import io
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

try:  # run from anywhere: the package sits one level up
    import dire_plugin  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dire_plugin.metrics import coverage, vendi_score
from _machine import machine_line, peak_kb, reset_peak_rss, status_kb  # noqa: E402  (benchmarks/)

SEED = 0
MB = 1024.0 * 1024.0


# --------------------------------------------------------------------------- helpers








def timed(fn: Callable[[], float]) -> Tuple[float, float]:
    """``(seconds, value)`` of one call."""
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


def interleaved(fns: Dict[str, Callable[[], float]], repeats: int) -> Dict[str, Tuple[List[float], List[float]]]:
    """Times and values of ``repeats`` rounds; the order rotates every round so that neither
    warm caches nor a burst of load on the shared machine favour one function."""
    names = list(fns)
    out: Dict[str, Tuple[List[float], List[float]]] = {name: ([], []) for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            dt, value = timed(fns[name])
            out[name][0].append(dt)
            out[name][1].append(value)
    return out


def _prdc_coverage(real: np.ndarray, fake: np.ndarray, k: int) -> float:
    from prdc import compute_prdc

    with contextlib.redirect_stdout(io.StringIO()):  # it prints the sizes
        return float(compute_prdc(real, fake, nearest_k=k)["coverage"])


def _one_thread(fn: Callable[[], float]) -> float:
    """``fn()`` with one BLAS thread (numpy/scipy, through threadpoolctl) and one torch thread."""
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            return fn()
    finally:
        torch.set_num_threads(before)


def _fmt(times: List[float]) -> str:
    return f"{statistics.median(times):7.3f} s (min {min(times):.3f}, max {max(times):.3f})"


# --------------------------------------------------------------------------- benchmark 1
def bench_prdc(repeats: int, n: int = 5000, m: int = 500, dim: int = 512, k: int = 5) -> None:
    print(f"== Benchmark 1: coverage vs prdc.compute_prdc, N={n} real, M={m} fake, D={dim}, k={k}, CPU")
    print(machine_line())
    rng = np.random.default_rng(SEED)
    real64 = rng.standard_normal((n, dim))
    fake64 = rng.standard_normal((m, dim))  # same distribution: partly covered (about a third)
    for name, real, fake in (("float32", real64.astype(np.float32), fake64.astype(np.float32)),
                             ("float64", real64, fake64)):
        other = "float64" if name == "float32" else "float32"
        fns = {
            "prdc": lambda: _prdc_coverage(real, fake, k),
            f"coverage (default: {name} matmul)": lambda: coverage(real, fake, k=k),
            f"coverage (dtype={other})": lambda: coverage(real, fake, k=k, dtype=getattr(torch, other)),
        }
        if name == "float32":  # on a shared machine two threads can be slower than one: show both
            fns["prdc, 1 BLAS thread"] = lambda: _one_thread(lambda: _prdc_coverage(real, fake, k))
            fns["coverage (default), 1 torch thread"] = lambda: _one_thread(lambda: coverage(real, fake, k=k))
        coverage(real[:200], fake[:50], k=k)  # warm-up: first-call allocations, thread pool
        res = interleaved(fns, repeats)
        values = {name_: set(v) for name_, (_, v) in res.items()}
        print(f"{name} inputs, median of {repeats} interleaved calls; coverage values: "
              + ", ".join(f"{key}={sorted(v)}" for key, v in values.items()))
        if len(set().union(*values.values())) != 1:
            raise SystemExit(f"coverage values differ from prdc's ({name} inputs): {values}")
        base = statistics.median(res["prdc"][0])
        for key, (times, _) in res.items():
            ratio = "" if key == "prdc" else f"   {base / statistics.median(times):5.2f}x faster than prdc"
            print(f"  {key:38s}: {_fmt(times)}{ratio}")


# --------------------------------------------------------------------------- benchmark 2
def bench_large_child(n: int = 20000, m: int = 500, dim: int = 512, k: int = 5) -> None:
    """Runs in its own process (see ``main``): RSS figures are this benchmark's alone."""
    print(f"== Benchmark 2: coverage alone, N={n} real, M={m} fake, D={dim}, k={k}, float32 inputs, CPU")
    print(machine_line())
    rng = np.random.default_rng(SEED)
    real = rng.standard_normal((n, dim), dtype=np.float32)
    fake = rng.standard_normal((m, dim), dtype=np.float32)
    coverage(real[:200], fake[:50], k=k)  # warm-up outside the measured peak
    inputs_mb = (real.nbytes + fake.nbytes) / MB
    dense = 16 * n * n / MB  # prdc: float64 N×N distances (8 B) + argpartition's int64 indices (8 B)
    print(f"inputs {inputs_mb:.0f} MB; for scale, prdc's real-real matrix and its argpartition "
          f"alone take {dense:.0f} MB at this N")
    values = []
    for label, kwargs in (("default (float32 matmul, chunk_size=1024)", {}),
                          ("dtype=float64, chunk_size=1024", {"dtype": torch.float64}),
                          ("default, chunk_size=256", {"chunk_size": 256})):
        gc.collect()
        hwm_reset = reset_peak_rss()
        base = status_kb("VmRSS") or 0
        if not hwm_reset:
            base = max(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        dt, value = timed(lambda: coverage(real, fake, k=k, **kwargs))
        peak = peak_kb(hwm_reset)
        values.append(value)
        print(f"  {label:42s}: {dt:7.2f} s, coverage={value}, extra peak RSS {(peak - base) / 1024:.0f} MB "
              f"({'VmHWM after clear_refs' if hwm_reset else 'ru_maxrss delta, may hide earlier peaks'})")
    if len(set(values)) != 1:
        raise SystemExit(f"coverage differs between dtypes / chunk sizes: {values}")


def bench_large() -> int:
    """Benchmark 2 in a fresh interpreter so that its memory high-water mark is its own."""
    cmd = [sys.executable, os.path.abspath(__file__), "--only", "large", "--in-process"]
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    sys.stdout.flush()
    return subprocess.call(cmd, env=env)


# --------------------------------------------------------------------------- benchmark 3
def bench_vendi(repeats: int, n: int = 4000, dim: int = 512) -> None:
    from vendi_score import vendi

    print(f"== Benchmark 3: Vendi score (q=1, cosine kernel), n={n}, d={dim}, float64, CPU")
    print(machine_line())
    rng = np.random.default_rng(SEED)
    x = rng.standard_normal((n, dim)) + 0.1 * rng.standard_normal(dim)
    vendi_score(x[:100])  # warm-up
    res = interleaved({"vendi_score.score_dual": lambda: float(vendi.score_dual(x)),
                       "dire vendi_score": lambda: vendi_score(x)}, repeats)
    t_x, v_x = timed(lambda: float(vendi.score_X(x)))
    ours = res["dire vendi_score"][1][0]
    print(f"values: score_dual={res['vendi_score.score_dual'][1][0]!r}, score_X={v_x!r}, ours={ours!r}")
    for ref in (res["vendi_score.score_dual"][1][0], v_x):
        if abs(ref - ours) > 1e-9 * abs(ref):
            raise SystemExit(f"Vendi score differs from the reference: {ours} vs {ref}")
    base = statistics.median(res["vendi_score.score_dual"][0])
    ours_t = statistics.median(res["dire vendi_score"][0])
    print(f"median of {repeats} interleaved calls:")
    print(f"  vendi_score.score_dual : {_fmt(res['vendi_score.score_dual'][0])}")
    print(f"  dire vendi_score       : {_fmt(res['dire vendi_score'][0])}   {base / ours_t:5.2f}x faster than score_dual")
    print(f"  vendi_score.score_X    : {t_x:7.3f} s (one call, n x n kernel)   {t_x / ours_t:5.2f}x slower than ours")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds of benchmarks 1 and 3 (default 5)")
    p.add_argument("--only", choices=("prdc", "large", "vendi"), help="run one benchmark")
    p.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)  # the subprocess itself
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("repeats must be at least 1")
    t0 = time.perf_counter()
    rc = 0
    if args.only in (None, "prdc"):
        bench_prdc(args.repeats)
    if args.only in (None, "large"):
        if args.in_process:
            bench_large_child()
        else:
            rc = bench_large()
    if args.only in (None, "vendi"):
        bench_vendi(args.repeats)
    if not args.in_process:
        print(f"total wall time {time.perf_counter() - t0:.1f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
