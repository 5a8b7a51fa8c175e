"""Time per DM iteration (DC-BENCH's distribution matching), patched with DiRe vs unpatched.

Setting (issue 13): CIFAR-10 shape (10 classes, 3x32x32), a ConvNet as DC-BENCH builds it by
default (width 128, depth 3, instance norm, average pooling; embeddings of 2048), a fresh random
network every iteration, ``batch_real`` real images per class drawn from a made-up uint8
training set (300 per class), a Siamese augmentation with one seed per class, per-class embed
calls, ``SGD([image_syn])``. The loop is ours (a few lines in DM's shape, not DC-BENCH's code);
the patch is the dm patch's embed capture, wrapping this module's ``ConvNet.embed``,
``DiffAugment`` and ``get_dataset``. Vanilla and patched blocks are interleaved; nothing is
asserted about speed.

    python benchmarks/_overhead_dm.py [--ipc 10 50] [--iterations 3] [--rounds 3] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Tuple

import numpy as np
import torch
from torch import nn

from _machine import device_line  # benchmarks/, the folder of this script

NUM_CLASSES, PER_CLASS, SIZE = 10, 300, 32
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


class ConvNet(nn.Module):
    """conv 3x3 → GroupNorm(C, C) (instance norm) → ReLU → avg-pool 2, three times."""

    def __init__(self, width: int = 128, depth: int = 3, channel: int = 3, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        layers, size = [], SIZE
        for d in range(depth):
            layers += [nn.Conv2d(channel if d == 0 else width, width, 3, padding=1), nn.GroupNorm(width, width),
                       nn.ReLU(inplace=True), nn.AvgPool2d(2)]
            size //= 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * size * size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(x)
        return out.view(out.size(0), -1)


class _Train:
    """A made-up training set held as torchvision's CIFAR holds it."""

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.targets = np.repeat(np.arange(NUM_CLASSES), PER_CLASS).tolist()
        self.data = rng.integers(0, 256, (len(self.targets), SIZE, SIZE, 3), dtype=np.uint8)


def get_dataset():
    """``channel, im_size, num_classes, class_names, mean, std, dst_train``, as DC-BENCH returns them."""
    return 3, (SIZE, SIZE), NUM_CLASSES, [str(c) for c in range(NUM_CLASSES)], list(MEAN), list(STD), _Train()


def DiffAugment(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Siamese flip / shift / brightness: one draw per seed for every row (ours, DSA-like)."""
    g = torch.Generator().manual_seed(seed)
    op = int(torch.randint(0, 3, (1,), generator=g))
    if op == 0:
        x = x.flip(3)
    elif op == 1:
        dy, dx = (int(v) for v in torch.randint(-4, 5, (2,), generator=g))
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    else:
        x = x + float(torch.rand(1, generator=g) - 0.5)
    return x.contiguous()


def _real(device: torch.device):
    _, _, _, _, mean, std, train = sys.modules[__name__].get_dataset()
    pixels = torch.from_numpy(train.data).permute(0, 3, 1, 2).float() / 255
    images = ((pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)).to(device)
    labels = np.asarray(train.targets)
    return images, [np.nonzero(labels == c)[0] for c in range(NUM_CLASSES)]


def _iteration(image_syn, optimizer, images_all, indices, ipc: int, batch_real: int, it: int, device) -> None:
    module = sys.modules[__name__]
    torch.manual_seed(it)
    net = module.ConvNet().to(device)
    net.train()
    for p in net.parameters():
        p.requires_grad = False
    embed = net.embed
    loss = torch.tensor(0.0, device=device)
    for c in range(NUM_CLASSES):
        img_real = images_all[np.random.permutation(indices[c])[:batch_real]]
        img_syn = image_syn[c * ipc:(c + 1) * ipc].reshape((ipc, 3, SIZE, SIZE))
        seed = 1000 * it + c
        img_real = module.DiffAugment(img_real, seed)
        img_syn = module.DiffAugment(img_syn, seed)
        output_real = embed(img_real).detach()
        output_syn = embed(img_syn)
        loss += torch.sum((torch.mean(output_real, dim=0) - torch.mean(output_syn, dim=0)) ** 2)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _timed(image_syn, optimizer, images_all, indices, ipc: int, batch_real: int, it: int, device) -> float:
    """Seconds of one DM iteration; the real batches are drawn as in every other arm (seeded by ``it``)."""
    np.random.seed(it)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    _iteration(image_syn, optimizer, images_all, indices, ipc, batch_real, it, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _patch():
    """The dm patch's capture, pointed at this module's network, augmentation and data."""
    from dire_plugin.hooks.patcher import method_patch
    from dire_plugin.patches import dm

    name = __name__
    return method_patch(dm.METHOD, lambda: dm.SCRIPTS, (), capture="embed", embed=((name, "ConvNet.embed"),),
                        augment=(name, "DiffAugment"), dataset=(name, "get_dataset"), results=r"^res_DM_.*\.pt$")


#: Of the last :func:`measure_dm`: seconds of DiRe's own work (labelling + term) per patched
#: iteration, and the median over the pairs of (patched / vanilla) seconds of the same iteration.
LAST_DIRE_SECONDS: float = float("nan")
LAST_PAIRED_RATIO: float = float("nan")


def measure_dm(iterations: int, rounds: int, device, ipc: int, batch_real: int = 256) -> Tuple[float, float]:
    """``(vanilla_median_s, patched_median_s)`` over ``rounds * iterations`` iterations of each.

    Interleaved iteration by iteration (vanilla, patched, then patched, vanilla, ...), each pair on
    the same network seed and real batches: on a shared machine whose speed drifts by 2x within
    minutes, blocks of several iterations measured the drift, not DiRe. The images of each arm
    follow their own trajectory (DiRe changes them). :data:`LAST_DIRE_SECONDS` gets the time spent
    in the capture's own labelling and term, per patched iteration.
    """
    global LAST_DIRE_SECONDS, LAST_PAIRED_RATIO
    from dire_plugin.hooks.runtime import current_runtime
    from dire_plugin.hooks.settings import RunConfig

    device = torch.device(device)
    images_all, indices = _real(device)
    patch, unpatch = _patch()
    config = RunConfig(method="dm", script="bench", log_every=0)

    def images():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(NUM_CLASSES * ipc, 3, SIZE, SIZE, generator=g).to(device).requires_grad_(True)
        return x, torch.optim.SGD([x], lr=1.0, momentum=0.5)

    arms = {"vanilla": images(), "patched": images()}
    times = {"vanilla": [], "patched": []}
    dire = []
    _timed(*images(), images_all, indices, ipc, batch_real, 10 ** 6, device)  # warm-up, not counted
    for i in range(rounds * iterations):
        for arm in (("vanilla", "patched") if i % 2 == 0 else ("patched", "vanilla")):
            if arm == "vanilla":
                times[arm].append(_timed(*arms[arm], images_all, indices, ipc, batch_real, i, device))
                continue
            patch(config)
            try:
                sys.modules[__name__].get_dataset()  # as DM does before its loop: the index is built here, untimed
                runtime = current_runtime()
                # Each patched iteration is a run's step 1, which measures the gradient share (one
                # backward of ours): time the steps in between, as bench_overhead does for sre2l/dwa.
                runtime.share.first, runtime.share.every = 0, 0
                times[arm].append(_timed(*arms[arm], images_all, indices, ipc, batch_real, i, device))
                capture = runtime.capture
                dire.append(capture.label_seconds + capture.term_seconds)
                added = runtime.stats.terms_added
            finally:
                unpatch()
            assert added == 1, f"DiRe added to {added} of 1 iteration"
    LAST_DIRE_SECONDS = statistics.median(dire)
    LAST_PAIRED_RATIO = statistics.median(p / v for v, p in zip(times["vanilla"], times["patched"]))
    return statistics.median(times["vanilla"]), statistics.median(times["patched"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ipc", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--batch-real", type=int, default=256)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    opts = ap.parse_args()
    device = torch.device(opts.device)
    print(device_line(device))
    for ipc in opts.ipc:
        report(ipc, opts.batch_real, *measure_dm(opts.iterations, opts.rounds, device, ipc, opts.batch_real))


def report(ipc: int, batch_real: int, vanilla: float, patched: float) -> None:
    """The lines of one :func:`measure_dm` (also what ``bench_overhead.py --methods dm`` prints)."""
    print(f"dm: ConvNet-128x3 (instance norm), CIFAR-10 shape, IPC {ipc}, batch_real {batch_real}")
    print(f"  vanilla   {vanilla * 1e3:8.1f} ms/iteration")
    print(f"  + DiRe    {patched * 1e3:8.1f} ms/iteration  (DiRe's own work {LAST_DIRE_SECONDS * 1e3:.1f} ms, "
          f"{100 * LAST_DIRE_SECONDS / vanilla:.1f} % of vanilla)")
    print(f"  overhead  {100 * (patched / vanilla - 1):+.1f} %  (paired ratio {LAST_PAIRED_RATIO:.3f})")


if __name__ == "__main__":
    main()
