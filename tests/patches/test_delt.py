"""The DELT patch (``patches/delt.py``, the decoupled capture): EarlyLate rounds forward a subset of
a batch's rows, and only those get the term, labelled by the targets the criterion receives; CD
also pushes away from the last embeddings of the batch's other rows (never an image's own earlier
one) and of finished batches (a class straddling two batches included); from real images with
exact duplicates the gradients stay finite; the bank built at step 1 leaves the BN losses read
after the criterion alone. Images get exactly DELT's gradient + DiRe's, against a hand reference.

In process on a DELT-shaped loop of our own, then end to end through ``dire-run`` on a look-alike
checkout (tests/fixtures/delt_like, ours).
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dire_plugin import DiReLoss, EmbeddingCapture, RealEmbeddingBank
from dire_plugin.hooks.registry import load_method
from dire_plugin.hooks.runtime import current_runtime
from dire_plugin.hooks.settings import RunConfig
from lookalike import build_checkout, run_lookalike, write_image_folder, write_lock
from nets import BNPrior, frozen_teacher

DELT = load_method("delt")
NUM_CLASSES, D, R_BN = 4, 8, 0.01
WEIGHTS = dict(r_c=0.5, r_e=0.05)


def _teacher(seed=0):
    return frozen_teacher(seed, NUM_CLASSES, (6, D))


# Real images, 3 per class; the synthetic ones start from them, class-major, with an exact
# duplicate (rows 0 and 1 of the first batch are the same real image).
REAL = torch.randn(NUM_CLASSES * 3, 3, 6, 6, generator=torch.Generator().manual_seed(0))
REAL_LABELS = torch.arange(NUM_CLASSES).repeat_interleave(3)
INIT = torch.cat([REAL[0:1], REAL[0:3], REAL[3:6], REAL[6:8]])  # classes 0,0,0,0 | 1,1,1 | 2,2
INIT_LABELS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2])
# Batches of 4 over 9 images (class 2 straddles the last two, as DELT's classes do where ipc does
# not divide the batch), and the rows each step forwards: growing rounds, a whole batch, then a
# round that leaves out rows forwarded before (DELT's classes with fewer rounds).
BATCHES = [(0, 4), (4, 8), (8, 9)]
ROUNDS = [
    [[0, 3], [0, 1, 3], [0, 1, 2, 3], [1, 2]],
    [[0, 3], [0, 1, 2, 3], [2, 3, 1]],
    [[0]],
]


def delt_loop(model, bn, lr=0.1, on_step=None):
    """DELT's loop in a few lines of ours: per batch a new leaf tensor, Adam and criterion; each
    step forwards ``inputs[rows]`` with the matching targets, CE + BN prior read after it."""
    for batch, ((start, end), rounds) in enumerate(zip(BATCHES, ROUNDS)):
        inputs = INIT[start:end].clone().requires_grad_(True)
        targets = INIT_LABELS[start:end]
        optimizer = torch.optim.Adam([inputs], lr=lr, betas=(0.5, 0.9))
        criterion = nn.CrossEntropyLoss()
        now = {}
        if on_step is not None:  # after the runtime's own pre-hook: the gradient the step applies
            optimizer.register_step_pre_hook(
                lambda opt, a, k, batch=batch, inputs=inputs, now=now: on_step(batch, inputs, now["rows"]))
        for rows in rounds:
            now["rows"] = rows
            optimizer.zero_grad()
            outputs = model(inputs[rows])
            loss = criterion(outputs, targets[rows]) + R_BN * bn.loss()
            loss.backward()
            optimizer.step()


def _real_loader():
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(REAL, REAL_LABELS), batch_size=5)


def _bank_factory(seen):
    def factory(teacher, layer, device):
        seen.append(teacher)
        return RealEmbeddingBank.build(teacher, _real_loader(), layer=layer or None, progress=False)

    return factory


def _reference(model, bn, bank, steps, own_earlier=False):
    """For each recorded step ``(batch, pre-step images, rows)``: DELT's gradient and DiRe's, by
    hand: DiRe on the forwarded rows' embeddings against the bank, CD also against the last
    embedding of every row of finished batches and of this batch's rows not forwarded now (with
    ``own_earlier``: the forwarded rows' own earlier ones too, which the capture must not do)."""
    last, finished, out = {}, [], []
    current = None
    for batch, images, rows in steps:
        if batch != current:
            finished += [v for k, v in last.items() if k[0] == current]
            current = batch
        targets = INIT_LABELS[BATCHES[batch][0]:BATCHES[batch][1]][rows]
        x = images.clone().requires_grad_()
        with EmbeddingCapture(model) as cap:
            loss = nn.CrossEntropyLoss()(model(x[rows]), targets) + R_BN * bn.loss()
            (g_method,) = torch.autograd.grad(loss, x, retain_graph=True)
            pushed = finished + [v for k, v in last.items() if k[0] == batch and (own_earlier or k[1] not in rows)]
            memory = {}
            for emb, label in pushed:
                memory.setdefault(label, []).append(emb)
            memory = {c: torch.stack(v) for c, v in memory.items()}
            dire = DiReLoss(**WEIGHTS)(cap.embeddings, targets, bank, memory=memory or None)
            (g_dire,) = torch.autograd.grad(dire, x)
            for i, row in enumerate(rows):
                last[(batch, row)] = (cap.embeddings[i].detach(), int(targets[i]))
        out.append((g_method, g_dire))
    return out


def _run_patched(lr=0.1):
    """The loop patched; per step: (batch, images before it, rows, gradient the step applied)."""
    model, seen = _teacher(), []
    bn = BNPrior(model)
    recorded = []

    def on_step(batch, inputs, rows):
        recorded.append((batch, inputs.detach().clone(), rows, inputs.grad.clone()))

    DELT.patch(RunConfig(method="delt", script="fixture.py", log_every=0, **WEIGHTS), bank_factory=_bank_factory(seen))
    try:
        delt_loop(model, bn, lr=lr, on_step=on_step)
        manifest = current_runtime().manifest()
        current_runtime().enabled = False  # the reference runs the same teacher, unpatched
        bank = RealEmbeddingBank.build(model, _real_loader(), progress=False)
        reference = _reference(model, bn, bank, [r[:3] for r in recorded])
        wrong = _reference(model, bn, bank, [r[:3] for r in recorded], own_earlier=True)
    finally:
        DELT.unpatch()
    assert seen == [model]
    return recorded, reference, wrong, manifest


def test_images_get_delt_plus_dire_gradient_on_the_rows_each_round_forwards():
    recorded, reference, wrong, manifest = _run_patched()
    assert len(recorded) == sum(map(len, ROUNDS)) == 8
    for (batch, _, rows, grad), (g_method, g_dire) in zip(recorded, reference):
        assert torch.isfinite(grad).all() and g_dire.abs().sum() > 0
        torch.testing.assert_close(grad, g_method + g_dire, rtol=1e-5, atol=1e-7)
        idle = [r for r in range(grad.shape[0]) if r not in rows]
        assert torch.equal(grad[idle], torch.zeros_like(grad[idle]))  # no term on rows not forwarded
    # The check can fail: pairing a forwarded image with its own earlier embedding gives another
    # gradient (steps 2, 3 and 5 forward rows forwarded before).
    assert not torch.allclose(reference[1][1], wrong[1][1])
    assert manifest["synthesis_steps"] == manifest["terms_added"] == 8
    # Per term: rows forwarded / not; of the latter, those with an earlier embedding (batch one's
    # step 4: rows 0 and 3; batch two's step 3: row 0), which CD pushed away from.
    assert manifest["capture"]["rows"] == {"forwarded": 21, "not_forwarded": 8, "held_for_cd": 3,
                                           "terms_on_a_subset": 5, "terms_rows_unknown": 0}
    # Batches one and two joined the memory, every row with its last embedding.
    assert manifest["batches_in_memory"] == 2 and manifest["memory_embeddings"] == 8


def test_from_real_images_with_exact_duplicates_every_gradient_is_finite():
    # Step 1: rows 0 and 3 equal real images of the bank (distance 0 to a real embedding), rows 0
    # and 1 are the same image (cosine 1 between them from step 2 on), with the Euclidean term on.
    model = _teacher()
    bn = BNPrior(model)
    grads = []
    DELT.patch(RunConfig(method="delt", script="fixture.py", log_every=0, r_c=0.5, r_e=1.0),
               bank_factory=_bank_factory([]))
    try:
        delt_loop(model, bn, on_step=lambda batch, inputs, rows: grads.append(inputs.grad.clone()))
        means = current_runtime().stats.means()
        current_runtime().enabled = False
        with EmbeddingCapture(model) as cap:
            model(INIT[[0, 3]])
        bank = current_runtime().bank
    finally:
        DELT.unpatch()
    assert torch.equal(bank.packed("cpu").padded[0, 0], cap.embeddings[0])  # the distance 0 is real
    assert len(grads) == 8 and all(torch.isfinite(g).all() for g in grads)
    assert all(v is not None and abs(v) < float("inf") for v in means.values())


# --- the script's data and teacher, from its options ---------------------------------------------------


@pytest.mark.parametrize("argv,kind,classes,crop,resize,conv", [
    ([], "imagefolder", 1000, 224, 256, False),  # --dataset imagenet-1k, --arch-name resnet18: the defaults
    (["--arch-name", "conv4"], "imagefolder", 1000, 64, 72, True),  # size // 7 * 8, as the script's init  # scripts/conv4_imagenet1k_synthesis.sh
    (["--dataset", "imagenet-1k", "--arch-name", "resnet18"], "imagefolder", 1000, 224, 256, False),
    (["--dataset=cifar10", "--arch-name", "conv3"], "cifar10", 10, 32, 32, True),
    (["--dataset", "tinyimagenet", "--arch-path", "t.pth"], "imagefolder", 200, 64, 72, False),
    (["--dataset", "imagenet-woof", "--arch-name", "conv5"], "imagefolder", 10, 128, 144, True),
])
def test_the_spec_follows_dataset_and_arch_name(argv, kind, classes, crop, resize, conv):
    spec = DELT.SCRIPTS["recover/recover.py"].for_argv(argv)
    assert (spec.real_data.kind, spec.num_classes, spec.real_data.crop, spec.real_data.resize) == (kind, classes, crop, resize)
    assert (spec.checkpoint_at is not None) == conv
    # Where the real data fits: every dataset, with and without a ConvNet (dire-apply's check).
    assert len(DELT.SCRIPTS["recover/recover.py"].choices()) == 1 + 2 * 7


def test_the_smoke_convnet_checkpoint_has_the_layout_load_model_reads(tmp_path):
    # DELT's ConvNet itself is upstream code (not here): the names and shapes it reads, by hand.
    spec = DELT.SCRIPTS["recover/recover.py"].for_argv(["--arch-name", "conv4"])
    state = torch.load(DELT.write_convnet(spec, tmp_path / "c.pth"), weights_only=True)["model"]
    assert state["layers.conv.0.weight"].shape == (128, 3, 3, 3) and state["layers.conv.3.weight"].shape == (128, 128, 3, 3)
    assert state["layers.norm.3.running_var"].shape == (128,) and "layers.norm.3.num_batches_tracked" in state
    assert state["classifier.weight"].shape == (1000, 128 * 4 * 4)  # 64 px after four 2x2 poolings
    assert not any(k.startswith(("layers.act", "layers.pool")) for k in state)


# --- end to end, through dire-run on a look-alike checkout ---------------------------------------------------

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "delt_like" / "recover"
URL = "https://github.com/VILA-Lab/DELT"
CONVNET = "/workspace/save/cifar10_conv3.pth"  # where the look-alike reads its teacher, as DELT does
ARGS = ["--dataset", "cifar10", "--arch-name", "conv3", "--ipc", "3", "--batch-size", "4", "--iteration", "3",
        "--use-early-late", "--round-iterations", "1", "--store-best-images", "--exp-name", "t"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("delt")
    root = base / "DELT"
    head = build_checkout(root, DELT, URL, {f"recover/{p.name}": p.read_text() for p in FIXTURE.glob("*.py")})
    lock = write_lock(base / "lock.toml", root, DELT, URL, head)
    sys.path.insert(0, str(FIXTURE))
    try:
        import models  # the look-alike's, to write a teacher it loads

        torch.manual_seed(0)
        teacher = models.ConvNet(10, depth=3)
    finally:
        sys.path.remove(str(FIXTURE))
        sys.modules.pop("models", None)  # a generic name: it must not linger
    ckpt = base / "conv3.pth"
    torch.save({"model": teacher.state_dict()}, ckpt)
    # Real data smaller than the teacher's input: the warning names the size the bank resizes to.
    data = write_image_folder(base / "real", 10, per_class=2, size=16)
    init = write_image_folder(base / "init", 3, per_class=3, size=32, seed=1)  # 3 classes synthesised
    return {"base": base, "root": root, "lock": lock, "data": data, "init": init, "ckpt": ckpt}


def _run(world, mode, extra_env=None):
    out = world["base"] / mode
    args = [*ARGS, "--syn-data-path", str(out), "--init-data-path", str(world["init"]), "--record", str(out / "rec.pt")]
    out.mkdir()
    env = {"DIRE_SHIM_REDIRECT": json.dumps({CONVNET: str(world["ckpt"])}), **(extra_env or {})}
    run = run_lookalike("delt", world["root"] / "recover/recover.py", args, "vanilla" if mode == "vanilla" else "dire",
                        world=world, cwd=world["root"] / "recover", extra_env=env)
    assert run.returncode == 0, run.stderr
    images = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.jpg"))}
    return run, images, torch.load(out / "rec.pt", weights_only=True)


def test_dire_run_on_a_lookalike_checkout(world):
    dire, dire_images, record = _run(world, "dire")
    assert "[dire] delt patch active" in dire.stderr
    # --dataset cifar10 --arch-name conv3: the bank sees the ConvNet's 32 px (not the default ImageNet 224 px).
    assert "smaller than the 32 px the script's teacher sees: the bank upscales such images to 32 px" in dire.stderr
    manifest = json.loads((world["base"] / "dire" / "t" / "dire_manifest.json").read_text())
    # 9 images of 3 classes in batches of 4, 5, 1 rounds of 3, 3 and 1 iterations (empty rounds dropped).
    assert manifest["synthesis_steps"] == manifest["terms_added"] == 7
    assert manifest["capture"]["rows"] == {"forwarded": 18, "not_forwarded": 7, "held_for_cd": 0,
                                           "terms_on_a_subset": 4, "terms_rows_unknown": 0}
    # Class 1 straddles batches one and two; class 2 batches two and three: the memory carries them.
    assert manifest["batches_in_memory"] == 2 and manifest["memory_embeddings"] == 8
    assert manifest["bank"]["classes"] == 10 and len(dire_images) == 9
    assert all(torch.isfinite(x).all() for x in record)

    disabled = _run(world, "disabled", {"DIRE_DISABLE": "1"})
    assert "runs vanilla" in disabled[0].stderr
    vanilla = _run(world, "vanilla")
    assert disabled[1] == vanilla[1]  # DIRE_DISABLE is exactly vanilla
    assert dire_images != vanilla[1]
    assert subprocess.run(["git", "status", "--porcelain"], cwd=world["root"], capture_output=True, text=True).stdout == ""


def test_real_data_of_another_class_count_than_the_dataset_option_is_one_line(world, tmp_path):
    # --dataset cifar10 means 10 classes: checked at the door, before the teacher or the init images load.
    five = write_image_folder(tmp_path / "five", 5, per_class=1, size=8)
    run = run_lookalike("delt", world["root"] / "recover/recover.py",
                        [*ARGS, "--syn-data-path", str(tmp_path / "out"), "--init-data-path", str(world["init"])],
                        "dire", world={**world, "data": five}, cwd=world["root"] / "recover")
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    line = run.stderr.strip().splitlines()[-1]
    assert line.startswith("dire-run: error: ") and "5" in line and "10" in line, line
    assert not (tmp_path / "out").exists()
