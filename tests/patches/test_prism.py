"""The PRISM patch (``patches/prism.py``, the decoupled capture): several teachers are forwarded
for their BN statistics, only teacher 1's logits reach the criterion; DiRe uses teacher 1's
embeddings and a bank built from teacher 1, and never takes another teacher's forward as the
synthetic embeddings. Images get exactly PRISM's gradient + DiRe's, against a hand reference.

In process on a PRISM-shaped loop of our own, then end to end through ``dire-run`` on a look-alike
checkout (tests/fixtures/prism_like, ours).
"""
import json
import subprocess
from pathlib import Path

import torch
from torch import nn

from dire_plugin import DiReLoss, EmbeddingCapture, RealEmbeddingBank
from dire_plugin.hooks.registry import load_method
from dire_plugin.hooks.runtime import current_runtime
from dire_plugin.hooks.settings import RunConfig
from lookalike import build_checkout, run_lookalike, write_image_folder, write_lock
from nets import BNPrior, frozen_teacher

PRISM = load_method("prism")
NUM_CLASSES, D, R_BN, IPC = 4, 8, 0.01, 2
WEIGHTS = dict(r_c=0.5, r_e=0.05)


REAL = torch.randn(NUM_CLASSES * IPC, 3, 6, 6, generator=torch.Generator().manual_seed(0))
REAL_LABELS = torch.arange(NUM_CLASSES).repeat(IPC)  # image i is class i % NUM_CLASSES: ipc index i // NUM_CLASSES


def teachers():
    """Teacher 1 (the criterion's); teacher 2 of the same shape, other weights; teacher 3 another
    width. Only 2 and 3 carry BN hooks, as in PRISM."""
    first, second, third = (frozen_teacher(seed, NUM_CLASSES, (width,)) for seed, width in ((0, D), (1, D), (2, 12)))
    return first, [(second, BNPrior(second)), (third, BNPrior(third))]


def prism_loop(first, others, on_step, iterations=2, batch=2):
    """PRISM's loop in a few lines of ours: per ipc index and chunk of classes, images start from
    that ipc's real image of each class; teacher 1 forwarded, then the others (logits dropped);
    CE on teacher 1's logits; the others' BN priors averaged."""
    for ipc in range(IPC):
        for start in range(0, NUM_CLASSES, batch):
            targets = torch.arange(start, start + batch)
            inputs = REAL[ipc * NUM_CLASSES + targets].clone().requires_grad_(True)
            optimizer = torch.optim.Adam([inputs], lr=0.1, betas=(0.5, 0.9))
            optimizer.register_step_pre_hook(lambda opt, a, k, inputs=inputs, targets=targets: on_step(inputs, targets))
            criterion = nn.CrossEntropyLoss()
            for _ in range(iterations):
                jit = torch.roll(inputs, shifts=(1, 0), dims=(2, 3))
                optimizer.zero_grad()
                outputs = first(jit)
                for model, _ in others:
                    _ = model(jit)
                loss_ce = criterion(outputs, targets)
                bn = sum(prior.loss() for _, prior in others) / len(others)
                (loss_ce + R_BN * bn).backward()
                optimizer.step()


def test_images_get_prism_plus_dire_gradient_from_teacher_one_alone():
    first, others = teachers()
    real = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(REAL, REAL_LABELS), batch_size=3)
    built_from, recorded = [], []

    def factory(teacher, layer, device):  # at step 1, inside the criterion call, as in a real run
        built_from.append(teacher)
        return RealEmbeddingBank.build(teacher, real, layer=layer or None, progress=False)

    PRISM.patch(RunConfig(method="prism", script="fixture.py", log_every=0, **WEIGHTS), bank_factory=factory)
    try:
        prism_loop(first, others, lambda inputs, targets: recorded.append(
            (inputs, targets, inputs.detach().clone(), inputs.grad.clone())))
        runtime = current_runtime()
        manifest = runtime.manifest()
        runtime.enabled = False
        bank = RealEmbeddingBank.build(first, real, progress=False)
        # By hand: the memory holds each finished batch's images with their last embeddings.
        memory, last, current = {}, None, None
        for inputs, targets, images, grad in recorded:
            if inputs is not current and last is not None:
                for emb, label in zip(*last):
                    memory.setdefault(int(label), []).append(emb)
            current = inputs
            x = images.clone().requires_grad_()
            jit = torch.roll(x, shifts=(1, 0), dims=(2, 3))
            with EmbeddingCapture(first) as cap:
                outputs = first(jit)
                for model, _ in others:
                    model(jit)
                bn = sum(prior.loss() for _, prior in others) / len(others)
                loss = nn.CrossEntropyLoss()(outputs, targets) + R_BN * bn
                (g_method,) = torch.autograd.grad(loss, x, retain_graph=True)
                mem = {c: torch.stack(v) for c, v in memory.items()} or None
                (g_dire,) = torch.autograd.grad(DiReLoss(**WEIGHTS)(cap.embeddings, targets, bank, memory=mem), x)
            last = (cap.embeddings.detach(), targets)
            assert g_dire.abs().sum() > 0
            torch.testing.assert_close(grad, g_method + g_dire, rtol=1e-5, atol=1e-7)
    finally:
        PRISM.unpatch()
    assert built_from == [first]  # the bank is teacher 1's
    # One term per step: the other teachers' forwards were never taken as synthetic embeddings.
    steps = IPC * (NUM_CLASSES // 2) * 2
    assert len(recorded) == steps
    assert (manifest["synthesis_steps"], manifest["terms_added"], manifest["terms_computed"]) == (steps, steps, steps)
    assert manifest["capture"]["criterion_calls_skipped"] == 0 and manifest["bank"]["dim"] == D
    assert manifest["memory_embeddings"] == NUM_CLASSES * IPC - 2  # the last batch is still open



# --- end to end, through dire-run on a look-alike checkout ---------------------------------------------------

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "prism_like" / "recover"
URL = "https://github.com/Brian-Moser/prism"
ARGS = ["--batch-size", "1", "--iteration", "2", "--ipc-start", "0", "--ipc-end", "2", "--store-best-images",
        "--exp-name", "t"]


def test_dire_run_on_a_lookalike_checkout(tmp_path):
    root = tmp_path / "prism"
    head = build_checkout(root, PRISM, URL, {f"recover/{p.name}": p.read_text() for p in FIXTURE.glob("*.py")})
    world = {"base": tmp_path, "lock": write_lock(tmp_path / "lock.toml", root, PRISM, URL, head),
             "data": write_image_folder(tmp_path / "real", 1000, per_class=1, size=8)}
    train = write_image_folder(tmp_path / "train", 2, per_class=2, size=32, seed=1)  # the classes synthesised

    def run(mode):
        out = tmp_path / mode
        out.mkdir()
        args = [*ARGS, "--train-data-path", str(train), "--syn-data-path", str(out), "--record", str(out / "rec.pt")]
        done = run_lookalike("prism", root / "recover/data_synthesis.py", args, "vanilla" if mode == "vanilla" else "dire",
                             world=world, cwd=root / "recover")
        assert done.returncode == 0, done.stderr
        images = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.jpg"))}
        return done, images, torch.load(out / "rec.pt", weights_only=True)

    dire, dire_images, record = run("dire")
    assert "[dire] prism patch active" in dire.stderr
    manifest = json.loads((tmp_path / "dire" / "t" / "dire_manifest.json").read_text())
    # 2 ipc x 2 batches x 2 iterations, one term each: teachers 2 and 3 are forwarded every
    # iteration and never taken; the printing call at iteration 0 finds its logits already used.
    assert (manifest["synthesis_steps"], manifest["terms_added"], manifest["terms_computed"]) == (8, 8, 8)
    assert manifest["capture"]["criterion_calls_skipped"] == 4
    assert manifest["bank"]["dim"] == 1024  # teacher 1's embedding (MobileNetV3-Small), not ResNet-18's 512
    assert manifest["batches_in_memory"] == 3 and manifest["memory_embeddings"] == 3
    assert len(dire_images) == 4 and all(torch.isfinite(x).all() for x in record)

    # DIRE_DISABLE's run is left to the DELT test: building a bank of 1000 classes at 224 px is
    # what takes this test's time, and that run would add the time of another vanilla run.
    assert dire_images != run("vanilla")[1]
    assert subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout == ""
