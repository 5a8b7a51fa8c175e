"""Time per synthesis iteration of a decoupled method's loop, patched with DiRe vs unpatched.

Setting (issue: drop-in patching): ResNet-18 CIFAR variant (3×3 conv1, no maxpool), batch of
100 images (one per class), a memory of 49 finished embeddings per class (IPC 50), 500 real
embeddings per class, D = 512. ``sre2l``: a frozen teacher, DiRe's gradient added in the
method's own backward. ``dwa``: the teacher's weights keep ``requires_grad`` (DWA's perturbation
reads their gradients), and DiRe's gradient reaches the images through one input-only backward.
Vanilla and patched blocks are interleaved in one run so machine noise hits both; the script
prints medians and their ratio, and asserts nothing about speed.

    python benchmarks/bench_overhead.py [--methods sre2l dwa] [--iterations 6] [--rounds 3] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision
from torch import nn

from dire_plugin.embeddings.bank import RealEmbeddingBank
from dire_plugin.patches import dwa, sre2l
from dire_plugin.hooks.runtime import current_runtime
from dire_plugin.hooks.settings import RunConfig

NUM_CLASSES, REAL_PER_CLASS, IPC, D = 100, 500, 50, 512


PATCHES = {"sre2l": sre2l, "dwa": dwa}


def teacher(device: torch.device, frozen: bool = True) -> nn.Module:
    model = torchvision.models.get_model("resnet18", num_classes=NUM_CLASSES)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad = not frozen
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


def measure(method: str, opts: argparse.Namespace, device: torch.device) -> None:
    torch.manual_seed(0)
    model = teacher(device, frozen=method != "dwa")
    bn = BNStats(model)
    targets = torch.arange(NUM_CLASSES, device=device)
    # Post-ReLU average-pooled features are non-negative; so are these stand-ins.
    real = torch.rand(NUM_CLASSES * REAL_PER_CLASS, D)
    bank = RealEmbeddingBank.from_tensors(real, torch.arange(NUM_CLASSES).repeat_interleave(REAL_PER_CLASS))
    config = RunConfig(method=method, script="bench", log_every=0)
    patch = PATCHES[method]

    vanilla, patched = [], []
    for _ in range(opts.rounds):
        inputs = torch.randn(NUM_CLASSES, 3, 32, 32, device=device, requires_grad=True)
        vanilla.append(run_block(model, bn, inputs, targets, opts.iterations, device))
        patch.patch(config, bank_factory=lambda *a: bank)
        runtime = current_runtime()
        runtime.memory.add(torch.rand(NUM_CLASSES * (IPC - 1), D), torch.arange(NUM_CLASSES).repeat(IPC - 1))
        inputs = torch.randn(NUM_CLASSES, 3, 32, 32, device=device, requires_grad=True)
        patched.append(run_block(model, bn, inputs, targets, opts.iterations, device))
        added = runtime.stats.terms_added
        patch.unpatch()
        assert added == opts.iterations, f"DiRe added to {added} of {opts.iterations} iterations"
        model.zero_grad(set_to_none=True)

    v, p = statistics.median(vanilla), statistics.median(patched)
    print(f"{method}: ResNet-18 (CIFAR stem), batch {NUM_CLASSES}, memory {IPC - 1}/class, {REAL_PER_CLASS} real/class, "
          f"D={D}, teacher {'frozen' if method != 'dwa' else 'with requires_grad (DWA)'}")
    print(f"  vanilla   {v * 1e3:8.1f} ms/iteration  (rounds: {', '.join(f'{x * 1e3:.1f}' for x in vanilla)})")
    print(f"  + DiRe    {p * 1e3:8.1f} ms/iteration  (rounds: {', '.join(f'{x * 1e3:.1f}' for x in patched)})")
    print(f"  overhead  {100 * (p / v - 1):+.1f} %")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", nargs="+", choices=sorted(PATCHES), default=["sre2l", "dwa"])
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    opts = ap.parse_args()
    device = torch.device(opts.device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    for method in opts.methods:
        measure(method, opts, device)


if __name__ == "__main__":
    main()
