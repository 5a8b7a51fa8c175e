"""Time per synthesis iteration of an SRe²L-shaped loop, patched with DiRe vs unpatched.

Setting (issue: drop-in patching): ResNet-18 CIFAR variant (3×3 conv1, no maxpool), batch of
100 images (one per class), a memory of 49 finished embeddings per class (IPC 50), 500 real
embeddings per class, D = 512. Vanilla and patched blocks are interleaved in one run so machine
noise hits both; the script prints medians and their ratio, and asserts nothing about speed.

    python benchmarks/bench_overhead.py [--iterations 6] [--rounds 3] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision
from torch import nn

from dire_plugin.embeddings.bank import RealEmbeddingBank
from dire_plugin.patches import sre2l
from dire_plugin.hooks.runtime import current_runtime
from dire_plugin.hooks.settings import RunConfig

NUM_CLASSES, REAL_PER_CLASS, IPC, D = 100, 500, 50, 512


def teacher(device: torch.device) -> nn.Module:
    model = torchvision.models.get_model("resnet18", num_classes=NUM_CLASSES)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad = False
    return model


class BNStats:
    """The BN prior of SRe²L (our own few lines): distance of batch statistics to running ones."""

    def __init__(self, model: nn.Module) -> None:
        self.values = []
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.register_forward_hook(self.hook)

    def hook(self, module, inputs, output):
        x = inputs[0]
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
        self.values.append(torch.norm(module.running_mean - mean) + torch.norm(module.running_var - var))

    def pop(self) -> torch.Tensor:
        total, self.values = sum(self.values), []
        return total


def run_block(model, bn, inputs, targets, iterations: int, device) -> float:
    """Median seconds per iteration over ``iterations`` SRe²L-shaped iterations."""
    optimizer = torch.optim.Adam([inputs], lr=0.25, betas=(0.5, 0.9))
    criterion = nn.CrossEntropyLoss()
    times = []
    for it in range(iterations):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        optimizer.zero_grad()
        jit = torch.roll(inputs, shifts=(it % 3, it % 2), dims=(2, 3))
        outputs = model(jit)
        loss = criterion(outputs, targets) + 0.01 * bn.pop()
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    opts = ap.parse_args()
    device = torch.device(opts.device)
    torch.manual_seed(0)
    model = teacher(device)
    bn = BNStats(model)
    targets = torch.arange(NUM_CLASSES, device=device)
    # Post-ReLU average-pooled features are non-negative; so are these stand-ins.
    real = torch.rand(NUM_CLASSES * REAL_PER_CLASS, D)
    bank = RealEmbeddingBank.from_tensors(real, torch.arange(NUM_CLASSES).repeat_interleave(REAL_PER_CLASS))
    config = RunConfig(method="sre2l", script="bench", log_every=0)

    vanilla, patched = [], []
    for _ in range(opts.rounds):
        inputs = torch.randn(NUM_CLASSES, 3, 32, 32, device=device, requires_grad=True)
        vanilla.append(run_block(model, bn, inputs, targets, opts.iterations, device))
        sre2l.patch(config, bank_factory=lambda *a: bank)
        runtime = current_runtime()
        runtime.memory.add(torch.rand(NUM_CLASSES * (IPC - 1), D), torch.arange(NUM_CLASSES).repeat(IPC - 1))
        inputs = torch.randn(NUM_CLASSES, 3, 32, 32, device=device, requires_grad=True)
        patched.append(run_block(model, bn, inputs, targets, opts.iterations, device))
        added = runtime.stats.terms_added
        sre2l.unpatch()
        assert added == opts.iterations, f"DiRe added to {added} of {opts.iterations} iterations"

    v, p = statistics.median(vanilla), statistics.median(patched)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"setting: ResNet-18 (CIFAR stem), batch {NUM_CLASSES}, memory {IPC - 1}/class, {REAL_PER_CLASS} real/class, D={D}")
    print(f"vanilla   {v * 1e3:8.1f} ms/iteration  (rounds: {', '.join(f'{x * 1e3:.1f}' for x in vanilla)})")
    print(f"+ DiRe    {p * 1e3:8.1f} ms/iteration  (rounds: {', '.join(f'{x * 1e3:.1f}' for x in patched)})")
    print(f"overhead  {100 * (p / v - 1):+.1f} %")


if __name__ == "__main__":
    main()
