"""One MTT iteration, patched with DiRe (the ``step`` capture) vs vanilla, for ``bench_overhead.py``.

MTT-shaped (our own code, not MTT's): CIFAR-10 (32², 10 classes, 5,000 real embeddings per class
in the bank), ConvNet depth 3 / width 128 / instance norm / average pooling (MTT's default, 2048-d
embedding), IPC 10 (100 synthetic images, all of them in every unrolled step, as MTT's default
``batch_syn``), ``syn_steps`` steps of a flat-parameter student unrolled with ``create_graph=True``
from an expert epoch and a learnable learning rate, the parameter-matching loss, its backward,
``optimizer_img.step()`` and ``optimizer_lr.step()``. A random flip stands in for MTT's DSA
augmentation (cheaper, so the measured overhead is if anything too high). The patched iteration
adds what the patch adds: one forward of the 100 images through a frozen expert, DiRe against the
bank and ``autograd.grad`` to the images, at ``optimizer_img.step()``.

Vanilla and patched iterations alternate (the runtime switched off for vanilla ones: the step
hook then returns at once), so machine noise hits both; which goes first alternates by round.

    measure_mtt(iterations, rounds, device, ipc=10, syn_steps=20) -> (vanilla median s, patched median s)
    measure_mtt_details(...) -> the same plus the extra forward's own time
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from torch import nn

from dire_plugin.embeddings.bank import RealEmbeddingBank
from dire_plugin.hooks.runtime import current_runtime
from dire_plugin.hooks.settings import RunConfig
from dire_plugin.patches import mtt

CLASSES, SIZE, WIDTH, DEPTH = 10, 32, 128, 3


class ConvNet(nn.Module):
    """MTT's default ConvNet architecture, written here: (conv 3x3, instance norm, ReLU, avg pool) x 3, linear."""

    def __init__(self) -> None:
        super().__init__()
        layers, inp, size = [], 3, SIZE
        for _ in range(DEPTH):
            layers += [nn.Conv2d(inp, WIDTH, 3, padding=1), nn.GroupNorm(WIDTH, WIDTH, affine=True),
                       nn.ReLU(inplace=True), nn.AvgPool2d(2)]
            inp, size = WIDTH, size // 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(WIDTH * size * size, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def get_network(model, channel, num_classes, im_size=(SIZE, SIZE), dist=True) -> nn.Module:
    return ConvNet()


def _flat(params) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in params])


def _iteration(image_syn, label_syn, syn_lr, optimizer_img, optimizer_lr, student, names, trajectory, syn_steps,
               device) -> float:
    """One MTT iteration; ``image_syn`` and ``label_syn`` are locals of this frame, as in distill.py."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    criterion = nn.CrossEntropyLoss()
    start, target = trajectory[0], trajectory[1]
    params = [start.clone().requires_grad_(True)]
    for _ in range(syn_steps):
        x = image_syn[torch.randperm(len(image_syn), device=device)]
        y = label_syn  # all images in every step: MTT's default batch_syn = num_classes * ipc
        x = torch.where(torch.rand(len(x), 1, 1, 1, device=device) < 0.5, x.flip(3), x)
        views, at = {}, 0
        for name, shape in names:
            views[name] = params[-1][at:at + shape.numel()].view(shape)
            at += shape.numel()
        out = torch.func.functional_call(student, views, (x,))
        grad = torch.autograd.grad(criterion(out, y), params[-1], create_graph=True)[0]
        params.append(params[-1] - syn_lr * grad)
    grand_loss = (nn.functional.mse_loss(params[-1], target, reduction="sum")
                  / nn.functional.mse_loss(start, target, reduction="sum"))
    optimizer_img.zero_grad()
    optimizer_lr.zero_grad()
    grand_loss.backward()
    optimizer_img.step()
    optimizer_lr.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def measure_mtt_details(iterations: int, rounds: int, device, ipc: int = 10, syn_steps: int = 20,
                        real_per_class: int = 5000) -> Dict[str, float]:
    """Medians (s) of vanilla and patched iterations and of the patch's extra work per step."""
    device = torch.device(device)
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="dire-bench-mtt-"))
    args = argparse.Namespace(dataset="CIFAR10", zca=False, texture=False, model="ConvNet", subset="", res=0,
                              buffer_path=str(work), data_path="")
    mtt.write_expert_buffer(Path(work, "CIFAR10_NO_ZCA", "ConvNet", "replay_buffer_0.pt"), mtt.convnet_shapes(),
                            trajectories=1, epochs=3)
    # Post-ReLU pooled features are non-negative; so are these stand-ins for the real embeddings.
    bank = RealEmbeddingBank.from_tensors(torch.rand(CLASSES * real_per_class, WIDTH * 16),
                                          torch.arange(CLASSES).repeat_interleave(real_per_class))
    student = ConvNet().to(device)
    names = [(n, p.shape) for n, p in student.named_parameters()]
    expert = torch.load(Path(work, "CIFAR10_NO_ZCA", "ConvNet", "replay_buffer_0.pt"), weights_only=True)[0]
    trajectory = [_flat(expert[0]).to(device), _flat(expert[1]).to(device)]

    label_syn = torch.arange(CLASSES, device=device).repeat_interleave(ipc)
    image_syn = torch.randn(CLASSES * ipc, 3, SIZE, SIZE, device=device, requires_grad=True)
    syn_lr = torch.tensor(0.01, device=device, requires_grad=True)
    optimizer_img = torch.optim.SGD([image_syn], lr=1000, momentum=0.5)
    optimizer_lr = torch.optim.SGD([syn_lr], lr=1e-5, momentum=0.5)

    mtt.patch(RunConfig(method="mtt", script="distill.py", log_every=0), bank_factory=lambda *a: bank)
    vanilla: List[float] = []
    patched: List[float] = []
    extra: List[float] = []
    try:
        runtime = current_runtime()
        capture = runtime.capture
        capture.use_dataset(args, (3, (SIZE, SIZE), CLASSES, *[None] * 9), get_network)
        runtime.bank_for(capture._extractor_on(device), capture.layer, device)  # built once, before timing
        bank.packed(device)
        for enabled in (False, True):  # warm-up (allocator, kernels), one unrolled step each, not timed
            runtime.enabled = enabled
            _iteration(image_syn, label_syn, syn_lr, optimizer_img, optimizer_lr, student, names, trajectory, 1, device)
        warm = runtime.stats.terms_added
        for r in range(rounds):
            for _ in range(iterations):
                # Which one goes first alternates: the first full unroll after the warm-up pays for growing memory.
                for enabled in ((False, True) if r % 2 == 0 else (True, False)):
                    runtime.enabled = enabled
                    before = capture.extra_seconds
                    seconds = _iteration(image_syn, label_syn, syn_lr, optimizer_img, optimizer_lr, student, names,
                                         trajectory, syn_steps, device)
                    (patched if enabled else vanilla).append(seconds)
                    if enabled:
                        extra.append(capture.extra_seconds - before)
        added = runtime.stats.terms_added - warm
    finally:
        mtt.unpatch()
    assert added == rounds * iterations, f"DiRe added to {added} of {rounds * iterations} iterations"
    return {"vanilla": statistics.median(vanilla), "patched": statistics.median(patched),
            "extra": statistics.median(extra), "vanilla_all": vanilla, "patched_all": patched}


def measure_mtt(iterations: int, rounds: int, device, ipc: int = 10, syn_steps: int = 20) -> Tuple[float, float]:
    """``(vanilla median s, patched median s)`` per MTT iteration (see the module doc)."""
    d = measure_mtt_details(iterations, rounds, device, ipc=ipc, syn_steps=syn_steps)
    return d["vanilla"], d["patched"]


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--syn-steps", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    opts = ap.parse_args()
    d = measure_mtt_details(opts.iterations, opts.rounds, opts.device, ipc=opts.ipc, syn_steps=opts.syn_steps)
    v, p, e = d["vanilla"], d["patched"], d["extra"]
    print(f"mtt: ConvNet-3 (width 128), CIFAR-10 shape, IPC {opts.ipc}, syn_steps {opts.syn_steps}, device {opts.device}, "
          f"threads {torch.get_num_threads()}")
    print(f"  vanilla   {v:8.3f} s/iteration  (all: {', '.join(f'{x:.3f}' for x in d['vanilla_all'])})")
    print(f"  + DiRe    {p:8.3f} s/iteration  (all: {', '.join(f'{x:.3f}' for x in d['patched_all'])})")
    print(f"  ratio     {p / v:.3f}   extra forward + DiRe + autograd.grad: {e:.3f} s ({100 * e / p:.1f} % of a patched iteration)")
