#!/usr/bin/env python
"""DiRe under torch.distributed on the CPU (gloo), 1 and 2 ranks on this machine:

1. building the real-embedding bank: images per second with one process and with two ranks
   (each embedding a shard, shards gathered); the two banks are checked to be identical;
2. the per-step exchange of the synthetic embeddings (``[B, D]`` per rank plus labels and the
   counters): seconds per exchange, against one SRe²L-shaped CIFAR iteration (ResNet-18, batch
   B) measured in the same run.

Ranks are processes started here, a gloo group initialised through a file (no port). Threads per
process: the machine's cores divided by the ranks, so both settings use the same cores.

    python benchmarks/bench_distributed.py [--images 2000] [--batch 100] [--exchanges 50]
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

from _machine import machine_line  # noqa: E402  (benchmarks/)

D = 512


def teacher(num_classes: int = 100) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.get_model("resnet18", num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model.eval()


def dataset(images: int):
    g = torch.Generator().manual_seed(1)
    return torch.utils.data.TensorDataset(torch.rand(images, 3, 32, 32, generator=g), torch.arange(images) % 100)


def build(images: int):
    from dire_plugin import RealEmbeddingBank

    loader = torch.utils.data.DataLoader(dataset(images), batch_size=100)
    t0 = time.perf_counter()
    bank = RealEmbeddingBank.build(teacher(), loader, progress=False)
    return time.perf_counter() - t0, bank


def _rank(rank: int, world: int, init: str, out: str, images: int, batch: int, exchanges: int, threads: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        dist.barrier()
        seconds, bank = build(images)
        from dire_plugin.embeddings.collectives import all_gather_rows

        emb, labels = torch.rand(batch, D), torch.arange(batch)
        counts = torch.zeros(1, 3, dtype=torch.long)
        times = []
        for _ in range(exchanges):
            dist.barrier()
            t0 = time.perf_counter()
            all_gather_rows([counts], "counters")
            all_gather_rows([emb, labels], "embeddings")
            times.append(time.perf_counter() - t0)
        torch.save({"seconds": seconds, "embeddings": bank._flat, "exchange": statistics.median(times)},
                   Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def iteration_seconds(batch: int, threads: int, repeats: int = 3) -> float:
    """One SRe²L-shaped iteration (forward, CE, backward, Adam step) of ResNet-18 on ``batch``."""
    torch.set_num_threads(threads)
    model = teacher()
    for p in model.parameters():
        p.requires_grad = False
    x = torch.randn(batch, 3, 32, 32, requires_grad=True)
    opt = torch.optim.Adam([x], lr=0.1)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), torch.arange(batch) % 100).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--batch", type=int, default=100, help="synthetic images per rank and step")
    p.add_argument("--exchanges", type=int, default=50)
    args = p.parse_args()
    cores = os.cpu_count() or 1
    print(machine_line())
    torch.set_num_threads(cores)
    one, single = build(args.images)
    print(f"bank, 1 process ({cores} threads): {args.images} images in {one:.2f} s = {args.images / one:.0f} images/s")

    with tempfile.TemporaryDirectory() as tmp:
        ctx = multiprocessing.get_context("spawn")
        threads = max(1, cores // 2)
        procs = [ctx.Process(target=_rank, args=(r, 2, f"{tmp}/init", tmp, args.images, args.batch, args.exchanges, threads))
                 for r in range(2)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        if any(proc.exitcode for proc in procs):
            raise SystemExit(f"a rank failed: exit codes {[proc.exitcode for proc in procs]}")
        results = [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(2)]
    two = max(r["seconds"] for r in results)
    same = all(torch.equal(r["embeddings"], single._flat) for r in results)
    print(f"bank, 2 ranks ({threads} thread(s) each): {args.images} images in {two:.2f} s = {args.images / two:.0f} "
          f"images/s ({one / two:.2f}x the single process); banks identical to the single process's: {same}")
    exchange = statistics.median(r["exchange"] for r in results)
    step = iteration_seconds(args.batch, threads)
    print(f"exchange per synthesis step (2 ranks, [{args.batch}, {D}] float32 + labels + counters): "
          f"{exchange * 1e3:.2f} ms; one SRe²L CIFAR iteration (ResNet-18, batch {args.batch}, {threads} thread(s)): "
          f"{step * 1e3:.0f} ms; ratio {100 * exchange / step:.2f} %")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
