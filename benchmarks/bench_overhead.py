"""Time per synthesis iteration of a decoupled method's loop, patched with DiRe vs unpatched.

Shapes (``--shape``):

* ``cifar`` (default): ResNet-18 CIFAR variant (3×3 conv1, no maxpool), 32², a batch of 100
  images (one per class of 100), a memory of 49 finished embeddings per class (IPC 50), 500 real
  embeddings per class, D = 512;
* ``imagenet``: SRe²L's ImageNet-1K iteration: ResNet-18, 224², a batch of 100 images of 100
  classes, 1000 classes with a memory of 49 each and 1300 real embeddings each (the paper's
  Table 15 reports +17.7 % synthesis time for DiRe on top of SRe²L);
* ``tiny``: 10 classes at 16² (a check that the script runs, not a figure).

``sre2l``: a frozen teacher, DiRe's gradient added in the method's own backward. ``delt`` (its
own shape, whatever ``--shape`` says): DELT's EarlyLate iteration on CIFAR-10 at IPC 50, the
ResNet-18 CIFAR variant, a batch of 100 = 2 classes × 50; the first iteration forwards every
image, the others a round of the first 30 of each class (``inputs[rows]``), so DiRe also pushes
away from the 40 images held back; 10 classes with a memory of 49 and 500 real each. ``dwa``: the
teacher's weights keep ``requires_grad`` (DWA's perturbation reads their gradients); with a batch
of every class the decoupled capture's ``"auto"`` route takes DWA's own backward after the batch's
first step (one input-only backward at that first step only, outside the median). The gradient
share (:mod:`dire_plugin.hooks.share`) is measured on a schedule: the ``+ DiRe`` rows time
unmeasured steps, a third block times steps that all measure it, and the cost of measuring is
printed for a 1000-iteration batch (steps 1-5, then every 100th). ``dm`` and ``mtt`` (their own
settings, whatever ``--shape`` says; ``_overhead_dm.py`` and ``_overhead_mtt.py`` describe them):
a DM iteration at IPC 10 and 50 (batch_real 256), an MTT iteration at IPC 10 with 20 unrolled
steps. ``gvbsm`` (its own shape too): a G-VBSM worker's CIFAR-100 iteration, three teachers of
different widths in rotation (ResNet-18 CIFAR variant 512, MobileNetV2 1280, ShuffleNetV2 ×0.5
1024), a worker's half of recover.sh's batch (50 images: 5 classes × IPC 10), CE + BN prior + a
per-class Gram-eigenvalue KL like G-VBSM's ``--nuc-norm`` term (our own lines), each teacher with
its own bank (500 real per class) and memory (9 per class), one bank and memory per key as the
patch keeps them. ``infer`` (its own shape too): INFER's CIFAR-100 iteration, one compensator
(1×3×32×32) added to a batch of 100 real images (one per class), the ResNet-18 CIFAR variant,
CE + BN prior (r_bn 1, first BN ×10 as ``sh/ufc_cifar.sh``), Adam; memory 49 per class, 500 real
per class; it also prints the time inside the capture's criterion call (DiRe's own work, which
the machine's load blurs less than the ratio) and, timed apart, the one-off cost of forwarding the
real images the script saves with no iteration (``--infer-real-sets``, 9 at IPC 10) through the
teacher into its memory. Vanilla and patched runs are interleaved in one run so machine noise hits both;
the script prints medians and their ratio, and asserts nothing about speed.

    python benchmarks/bench_overhead.py [--methods sre2l dwa delt dm mtt gvbsm infer] [--shape cifar|imagenet|tiny]
        [--iterations 6] [--rounds 3] [--device cpu|cuda] [--infer-real-sets 9]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from dire_plugin.embeddings.bank import RealEmbeddingBank
from dire_plugin.hooks.runtime import current_runtime
from dire_plugin.hooks.settings import RunConfig
from dire_plugin.patches import delt, dwa, gvbsm, infer, sre2l
from _machine import device_line  # benchmarks/, the folder of this script

PATCHES = {"sre2l": sre2l, "dwa": dwa, "delt": delt}
#: Methods with a loop of their own shape (benchmarks/_overhead_<method>.py, or below: gvbsm).
OWN_LOOPS = ("dm", "mtt", "gvbsm", "infer")
D, IPC = 512, 50


@dataclass(frozen=True)
class Shape:
    classes: int  # of the teacher, the bank and the memory
    batch: int  # images optimised together
    size: int
    real_per_class: int
    cifar_stem: bool
    per_class: int = 1  # images of a class in the batch (class-major)
    forwarded: int = 0  # after a first iteration on all, each iteration forwards this many of each class (0: all)


SHAPES = {
    "cifar": Shape(classes=100, batch=100, size=32, real_per_class=500, cifar_stem=True),
    "imagenet": Shape(classes=1000, batch=100, size=224, real_per_class=1300, cifar_stem=False),
    "tiny": Shape(classes=10, batch=10, size=16, real_per_class=20, cifar_stem=True),
}
#: Methods measured on a shape of their own.
OWN_SHAPES = {
    "delt": Shape(classes=10, batch=100, size=32, real_per_class=500, cifar_stem=True, per_class=50, forwarded=30),
}


def teacher(shape: Shape, device: torch.device, frozen: bool = True) -> nn.Module:
    model = torchvision.models.get_model("resnet18", num_classes=shape.classes)
    if shape.cifar_stem:
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

    def pop_each(self) -> list:
        """Each layer's term of the last forward, first layer first."""
        each, self.values = self.values, []
        return each


def run_block(models, bns, inputs, targets, iterations: int, device, lr: float = 0.25, extra=None,
              rows=None) -> float:
    """Median seconds per iteration over ``iterations`` SRe²L-shaped iterations; iteration ``i``
    classifies with ``models[i % len(models)]`` (G-VBSM's rotation; SRe²L's: one model),
    ``extra(images, targets)`` is added to the loss, and with ``rows`` iterations after the first
    forward only ``inputs[rows]`` (DELT's rounds)."""
    optimizer = torch.optim.Adam([inputs], lr=lr, betas=(0.5, 0.9))
    criterion = nn.CrossEntropyLoss()

    def iteration(it: int) -> None:
        model, bn = models[it % len(models)], bns[it % len(models)]
        optimizer.zero_grad()
        taken = inputs if rows is None or it == 0 else inputs[rows]
        jit = torch.roll(taken, shifts=(it % 3, it % 2), dims=(2, 3))
        outputs = model(jit)
        step_targets = targets if rows is None or it == 0 else targets[rows]
        loss = criterion(outputs, step_targets) + 0.01 * bn.pop()
        if extra is not None:
            loss = loss + extra(jit, step_targets)
        loss.backward()
        optimizer.step()

    return median_seconds(iteration, iterations, device)


def median_seconds(iteration, iterations: int, device: torch.device) -> float:
    """Median wall seconds of ``iteration(i)`` for ``i`` in ``range(iterations)``, the device
    synchronised around each."""
    times = []
    for it in range(iterations):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        iteration(it)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(method: str, shape: Shape, opts: argparse.Namespace, device: torch.device) -> None:
    torch.manual_seed(0)
    model = teacher(shape, device, frozen=method != "dwa")
    bn = BNStats(model)
    targets = torch.arange(shape.batch // shape.per_class, device=device).repeat_interleave(shape.per_class)
    rows = None
    if shape.forwarded:
        starts = torch.arange(0, shape.batch, shape.per_class, device=device)
        rows = (starts[:, None] + torch.arange(shape.forwarded, device=device)).flatten()
    # Post-ReLU average-pooled features are non-negative; so are these stand-ins.
    real = torch.rand(shape.classes * shape.real_per_class, D)
    bank = RealEmbeddingBank.from_tensors(real, torch.arange(shape.classes).repeat_interleave(shape.real_per_class))
    del real
    config = RunConfig(method=method, script="bench", log_every=0)
    patch = PATCHES[method]

    def images() -> torch.Tensor:
        return torch.randn(shape.batch, 3, shape.size, shape.size, device=device, requires_grad=True)

    def patched_block(measure_share: bool) -> float:
        patch.patch(config, bank_factory=lambda *a: bank)
        runtime = current_runtime()
        # Every step measured, or none (the schedule's few measured steps would sit in the median).
        runtime.share.first, runtime.share.every = (opts.iterations, 1) if measure_share else (0, 0)
        # The key the teacher's bank gets at the first step (keyed on the bank), with earlier ipc indices.
        runtime.memory_of(runtime.add_bank(bank)).add(torch.rand(shape.classes * (IPC - 1), D),
                                                      torch.arange(shape.classes).repeat(IPC - 1))
        seconds = run_block([model], [bn], images(), targets, opts.iterations, device, rows=rows)
        added, measured = runtime.stats.terms_added, len(runtime.share.records)
        patch.unpatch()
        model.zero_grad(set_to_none=True)
        assert added == opts.iterations, f"DiRe added to {added} of {opts.iterations} iterations"
        assert measured == (opts.iterations if measure_share else 0), f"share measured on {measured} steps"
        return seconds

    vanilla, patched, measuring = [], [], []
    for _ in range(opts.rounds):
        vanilla.append(run_block([model], [bn], images(), targets, opts.iterations, device, rows=rows))
        patched.append(patched_block(False))
        measuring.append(patched_block(True))

    v, p, m = statistics.median(vanilla), statistics.median(patched), statistics.median(measuring)
    layout = (f"batch {shape.batch} ({shape.batch // shape.per_class} classes x {shape.per_class}"
              + (f", rounds of {shape.forwarded}/class after a first iteration on all)" if shape.forwarded else ")")
              if shape.per_class > 1 else f"batch {shape.batch}")
    print(f"{method}: ResNet-18{' (CIFAR stem)' if shape.cifar_stem else ''}, {shape.size}px, {layout}, "
          f"{shape.classes} classes, memory {IPC - 1}/class, {shape.real_per_class} real/class, D={D}, teacher "
          f"{'frozen' if method != 'dwa' else 'with requires_grad (DWA)'}")
    print(f"  vanilla   {v * 1e3:8.1f} ms/iteration  (rounds: {', '.join(f'{x * 1e3:.1f}' for x in vanilla)})")
    print(f"  + DiRe    {p * 1e3:8.1f} ms/iteration  (rounds: {', '.join(f'{x * 1e3:.1f}' for x in patched)})")
    paired = statistics.median(b / a for a, b in zip(vanilla, patched))  # each round's blocks ran back to back
    print(f"  overhead  {100 * (p / v - 1):+.1f} %  (median of the rounds' ratios: {100 * (paired - 1):+.1f} %)")
    print(f"  measuring the gradient share: {m * 1e3:8.1f} ms on a measured step (+{(m - p) * 1e3:.1f} ms); "
          f"at steps 1-5 and every 100th of a 1000-iteration batch: {100 * share_cost(m - p, p):.2f} % of the batch")


def share_cost(extra: float, iteration: float, iterations: int = 1000) -> float:
    """The share schedule's extra time over a batch of ``iterations`` iterations, as a fraction of it."""
    from dire_plugin.hooks.share import ShareMeter

    meter = ShareMeter()
    measured = sum(meter.due(step) for step in range(1, iterations + 1))
    return measured * max(extra, 0.0) / (iterations * iteration)


def time_own_work(runtime, own: list) -> None:
    """Append the seconds of each of the capture's criterion calls to ``own``: DiRe's own work (the
    term and its bookkeeping), which the machine's load blurs less than a whole iteration."""
    on_criterion = runtime.capture.on_criterion

    def timed(*args):
        start = time.perf_counter()
        on_criterion(*args)
        own.append(time.perf_counter() - start)

    runtime.capture.on_criterion = timed


#: G-VBSM's rotation: torchvision builder, width of its classifier's input (CIFAR-100, 32 px).
ROTATION = (("resnet18", 512), ("mobilenet_v2", 1280), ("shufflenet_v2_x0_5", 1024))
GVBSM_CLASSES, GVBSM_PER_CLASS, GVBSM_REAL = 5, 10, 500


def gram_eigen_kl(x: torch.Tensor, labels: torch.Tensor, tau: float = 4.0) -> torch.Tensor:
    """A diversity term shaped like G-VBSM's ``--nuc-norm`` (what its cost is made of): per class,
    the KL between softmaxed eigenvalues of the Gram matrix of the pooled, flattened images."""
    flat = F.adaptive_avg_pool2d(x, 32).flatten(1)
    total = x.new_zeros(())
    for c in labels.unique().tolist():
        rows = flat[labels == c]
        eig = torch.linalg.eigvals(rows @ rows.t()).real.float()
        total = total + F.kl_div(eig.log_softmax(-1), (eig / tau).softmax(-1).detach(), reduction="sum")
    return total


def measure_rotating(opts: argparse.Namespace, device: torch.device) -> None:
    """G-VBSM's iteration (module doc), vanilla and through the gvbsm patch, interleaved."""
    models, banks, bns = [], {}, []
    for seed, (name, width) in enumerate(ROTATION):
        torch.manual_seed(seed)
        model = torchvision.models.get_model(name, num_classes=100)
        if name == "resnet18":
            model.conv1, model.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
        model = model.to(device).eval().requires_grad_(False)
        models.append(model)
        bns.append(BNStats(model))
        bank = RealEmbeddingBank.from_tensors(torch.rand(100 * GVBSM_REAL, width),
                                              torch.arange(100).repeat_interleave(GVBSM_REAL))
        bank.packed(device), bank.fingerprint  # once per run, as in a real one: not in the timed steps
        banks[id(model)] = bank
    targets = torch.arange(GVBSM_CLASSES, device=device).repeat_interleave(GVBSM_PER_CLASS)
    config = RunConfig(method="gvbsm", script="bench", log_every=0)

    def images() -> torch.Tensor:
        return torch.randn(len(targets), 3, 32, 32, device=device, requires_grad=True)

    own: list = []

    def patched_block() -> float:
        gvbsm.patch(config, bank_factory=lambda teacher, layer, dev: banks[id(teacher)])
        runtime = current_runtime()
        runtime.share.first, runtime.share.every = 0, 0  # unmeasured steps, as most of a run's
        time_own_work(runtime, own)
        for name_width, model in zip(ROTATION, models):  # each teacher's memory of IPC - 1 finished images
            runtime.memory_of(runtime.add_bank(banks[id(model)])).add(
                torch.rand(100 * (GVBSM_PER_CLASS - 1), name_width[1]), torch.arange(100).repeat(GVBSM_PER_CLASS - 1))
        seconds = run_block(models, bns, images(), targets, opts.iterations, device, lr=0.05, extra=gram_eigen_kl)
        added, keys = runtime.stats.terms_added, len(runtime.keys)
        gvbsm.unpatch()
        assert added == opts.iterations and keys == len(ROTATION), f"DiRe added to {added} steps, {keys} keys"
        return seconds

    vanilla, patched = [], []
    for _ in range(opts.rounds):
        vanilla.append(run_block(models, bns, images(), targets, opts.iterations, device, lr=0.05, extra=gram_eigen_kl))
        patched.append(patched_block())
    v, p = statistics.median(vanilla), statistics.median(patched)
    paired = statistics.median(b / a for a, b in zip(vanilla, patched))  # each round's blocks ran back to back
    print(f"gvbsm: {len(ROTATION)} teachers in rotation ({', '.join(f'{n} D={w}' for n, w in ROTATION)}), 32px, "
          f"batch {len(targets)} ({GVBSM_CLASSES} classes x IPC {GVBSM_PER_CLASS}), CE + BN prior + Gram-eigenvalue "
          f"KL, memory {GVBSM_PER_CLASS - 1}/class and {GVBSM_REAL} real/class per teacher")
    print(f"  vanilla   {v * 1e3:8.1f} ms/iteration  (rounds: {', '.join(f'{x * 1e3:.1f}' for x in vanilla)})")
    print(f"  + DiRe    {p * 1e3:8.1f} ms/iteration  (rounds: {', '.join(f'{x * 1e3:.1f}' for x in patched)})")
    print(f"  overhead  {100 * (p / v - 1):+.1f} %  (median of the rounds' ratios: {100 * (paired - 1):+.1f} %)")
    work = statistics.median(own)  # each teacher's first step also packs its bank
    print(f"  DiRe's own work in the criterion call: {work * 1e3:.1f} ms per iteration ({100 * work / v:.1f} % of vanilla's)")


def run_compensator_block(model: nn.Module, bn: BNStats, real: torch.Tensor, targets: torch.Tensor, iterations: int,
                          device: torch.device) -> float:
    """Median seconds per iteration of INFER's loop (module doc) on a fresh compensator."""
    uni_perb = torch.zeros(1, 3, real.shape[2], real.shape[3], device=device, requires_grad=True)
    optimizer = torch.optim.Adam([uni_perb], lr=0.25, betas=(0.5, 0.9), eps=1e-8)
    criterion = nn.CrossEntropyLoss()

    def iteration(it: int) -> None:
        jit = torch.roll(real + uni_perb, shifts=(it % 3, it % 2), dims=(2, 3))
        optimizer.zero_grad()
        outputs = model(jit)
        bn_terms = bn.pop_each()
        loss = criterion(outputs, targets) + 1.0 * (INFER_FIRST_BN * bn_terms[0] + sum(bn_terms[1:]))
        loss.backward()
        optimizer.step()

    return median_seconds(iteration, iterations, device)


INFER_FIRST_BN = 10.0


def measure_compensator(opts: argparse.Namespace, device: torch.device) -> None:
    """INFER's iteration (module doc), vanilla and through the infer patch, interleaved; then the
    one-off forward of the real images saved with no iteration."""
    shape = SHAPES["cifar"]
    torch.manual_seed(0)
    model = teacher(shape, device)
    bn = BNStats(model)
    targets = torch.arange(shape.classes, device=device)
    real = torch.randn(shape.classes, 3, shape.size, shape.size, device=device).clamp(-1.5, 1.5)
    bank = RealEmbeddingBank.from_tensors(torch.rand(shape.classes * shape.real_per_class, D),
                                          torch.arange(shape.classes).repeat_interleave(shape.real_per_class))
    bank.packed(device), bank.fingerprint  # once per run, as in a real one: not in the timed steps
    config = RunConfig(method="infer", script="bench", log_every=0)
    own: list = []  # seconds the capture's criterion call took: the term and its bookkeeping

    def patched_block(real_sets: int = 0) -> float:
        infer.patch(config, bank_factory=lambda *a: bank)
        runtime = current_runtime()
        runtime.share.first, runtime.share.every = 0, 0  # unmeasured steps, as most of a run's
        time_own_work(runtime, own)
        runtime.memory_of(runtime.add_bank(bank)).add(torch.rand(shape.classes * (IPC - 1), D),
                                                      torch.arange(shape.classes).repeat(IPC - 1))
        saved = argparse.Namespace(dataset="cifar100")
        for _ in range(real_sets):  # saved by the script with no step: forwarded at the first term
            runtime.capture.on_saved((saved, torch.rand(shape.classes, 3, shape.size, shape.size), targets.cpu(), 0), {})
        seconds = run_compensator_block(model, bn, real, targets, 1 if real_sets else opts.iterations, device)
        never = runtime.capture.manifest()["never_forwarded"]
        added = runtime.stats.terms_added
        infer.unpatch()
        assert added == (1 if real_sets else opts.iterations), f"DiRe added to {added} iterations"
        assert never["images_saved"] == real_sets * shape.classes
        return never["seconds"] if real_sets else seconds

    vanilla, patched = [], []
    for _ in range(opts.rounds):
        vanilla.append(run_compensator_block(model, bn, real, targets, opts.iterations, device))
        patched.append(patched_block())
    work = statistics.median(own)  # the first step of each block also hashes the teacher's weights
    one_off = patched_block(opts.infer_real_sets)
    v, p = statistics.median(vanilla), statistics.median(patched)
    paired = statistics.median(b / a for a, b in zip(vanilla, patched))  # each round's blocks ran back to back
    print(f"infer: ResNet-18 (CIFAR stem), 32px, one compensator 1x3x32x32 on {shape.classes} real images (one per "
          f"class), CE + BN prior (first BN x{INFER_FIRST_BN:g}), memory {IPC - 1}/class, {shape.real_per_class} real/class, D={D}")
    print(f"  vanilla   {v * 1e3:8.1f} ms/iteration  (rounds: {', '.join(f'{x * 1e3:.1f}' for x in vanilla)})")
    print(f"  + DiRe    {p * 1e3:8.1f} ms/iteration  (rounds: {', '.join(f'{x * 1e3:.1f}' for x in patched)})")
    print(f"  overhead  {100 * (p / v - 1):+.1f} %  (median of the rounds' ratios: {100 * (paired - 1):+.1f} %)")
    print(f"  DiRe's own work in the criterion call: {work * 1e3:.1f} ms per iteration ({100 * work / v:.1f} % of vanilla's)")
    print(f"  one-off: {opts.infer_real_sets} x {shape.classes} real images saved with no iteration, forwarded into "
          f"the teacher's memory: {one_off:.2f} s per teacher")


def measure_own_loop(method: str, opts: argparse.Namespace, device: torch.device) -> None:
    """DM's, MTT's, G-VBSM's and INFER's iterations, from their own benchmark modules or above."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    if method == "gvbsm":
        measure_rotating(opts, device)
    elif method == "infer":
        measure_compensator(opts, device)
    elif method == "dm":
        import _overhead_dm

        for ipc in (10, 50):
            _overhead_dm.report(ipc, 256, *_overhead_dm.measure_dm(opts.iterations, opts.rounds, device, ipc, 256))
    else:
        import _overhead_mtt

        d = _overhead_mtt.measure_mtt_details(opts.iterations, opts.rounds, device, ipc=10, syn_steps=20)
        print("mtt: ConvNet-3 (width 128), CIFAR-10 shape, IPC 10, syn_steps 20")
        print(f"  vanilla   {d['vanilla'] * 1e3:8.1f} ms/iteration")
        print(f"  + DiRe    {d['patched'] * 1e3:8.1f} ms/iteration  (extra forward + DiRe + gradient {d['extra'] * 1e3:.1f} ms)")
        print(f"  overhead  {100 * (d['patched'] / d['vanilla'] - 1):+.1f} %")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", nargs="+", choices=sorted(PATCHES) + list(OWN_LOOPS), default=["sre2l", "dwa"])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="cifar")
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--infer-real-sets", type=int, default=9, help="INFER: real images per class saved with no "
                    "iteration (ipc_init: 9 at IPC 10, 48 at IPC 50)")
    opts = ap.parse_args()
    device = torch.device(opts.device)
    print(device_line(device))
    for method in opts.methods:
        if method in OWN_LOOPS:
            measure_own_loop(method, opts, device)
        else:
            measure(method, OWN_SHAPES.get(method, SHAPES[opts.shape]), opts, device)


if __name__ == "__main__":
    main()
