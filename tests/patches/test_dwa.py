"""The DWA patch (``patches/dwa.py``): DiRe reaches the images only, so the teacher's gradients
that DWA's weight perturbation reads are exactly vanilla DWA's; the iteration-0 perturbation
passes get no term; images get vanilla + DiRe gradient; real-image initialisation stays finite.

In process on a DWA-shaped loop of our own (the look-alike perturbation in tests/fixtures), then
end to end through ``dire-run`` on a look-alike checkout of the repository.
"""
import copy
import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dire_plugin import DiReLoss, EmbeddingCapture, RealEmbeddingBank
from dire_plugin.errors import DiReHookError
from dire_plugin.hooks.registry import load_method
from dire_plugin.hooks.runtime import current_runtime
from dire_plugin.hooks.settings import RunConfig
from lookalike import build_checkout, run_lookalike, write_image_folder, write_lock

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "dwa_like" / "distillation"
URL = "https://github.com/AngusDujw/Diversity-Driven-Synthesis"
DWA = load_method("dwa")
NUM_CLASSES, D = 6, 16


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"dwa_like_{name}", FIXTURE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Registered under a name of its own, so that the patch's guard on first_step can wrap it.
PERTERB_MODULE = "dwa_like_perterb"
sys.modules[PERTERB_MODULE] = _load("perterb")
Perterb = sys.modules[PERTERB_MODULE].Perterb


def _teacher(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, D, 3, padding=1, bias=False), nn.BatchNorm2d(D), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(D, NUM_CLASSES),
    )
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
    return net.eval()  # DWA keeps requires_grad on: its perturbation needs the gradients


def _bank(seed=1):
    g = torch.Generator().manual_seed(seed)
    return RealEmbeddingBank.from_tensors(torch.rand(NUM_CLASSES * 4, D, generator=g) + 0.1,
                                          torch.arange(NUM_CLASSES).repeat(4))


def _patch(bank, teacher_grads=None, **settings):
    """DWA's own patch (``teacher_grads=None``), or the decoupled capture with another route, its
    guard on ``first_step`` installed on the look-alike's ``Perterb`` either way."""
    config = RunConfig(**{"method": "dwa", "script": "fixture.py", "r_c": 0.5, "r_e": 0.05, "log_every": 0, **settings})
    from dire_plugin.hooks.patcher import method_patch

    route = teacher_grads or "auto"
    patch, unpatch = method_patch("dwa", lambda: DWA.SCRIPTS, DWA.TARGETS, capture="decoupled", teacher_grads=route,
                                  grad_readers=((PERTERB_MODULE, "Perterb.first_step"),))
    patch(config, bank_factory=lambda *a: bank)
    return unpatch


def dwa_batches(model, init, batch_size=3, iterations=3, steps=2, rho=0.05, seed=0, on_step=None, lr=0.1):
    """DWA's loop in a few lines of ours: per batch a new Adam, perturbation and criterion; at
    iteration 0 ``steps`` perturbation passes; the teacher (and its .grad) kept across batches.
    Returns the teacher gradients each ``first_step`` saw and the final images."""
    random.seed(seed)
    seen, finals = [], []
    for start in range(0, len(init), batch_size):
        targets = torch.arange(start, min(start + batch_size, len(init)))
        inputs = init[targets].clone().requires_grad_(True)
        optimizer = torch.optim.Adam([inputs], lr=lr, betas=(0.5, 0.9))
        if on_step is not None:
            optimizer.register_step_pre_hook(lambda opt, args, kwargs: on_step(inputs))
        perturb = Perterb(model.parameters(), optimizer, rho=rho / steps)
        criterion = nn.CrossEntropyLoss()
        for iteration in range(iterations):
            jit = torch.roll(inputs, shifts=(random.randint(0, 1), random.randint(0, 1)), dims=(2, 3))
            optimizer.zero_grad()
            if iteration == 0:
                for _ in range(steps):
                    criterion(model(jit), targets).backward()
                    seen.append([p.grad.clone() for p in model.parameters()])
                    perturb.first_step(True)
            loss = criterion(model(jit), targets) + 0.01 * inputs.pow(2).mean()
            loss.backward()
            optimizer.step()
        finals.append(inputs.detach().clone())
    return seen, torch.cat(finals)


def _init(seed=2):
    return torch.randn(NUM_CLASSES, 3, 6, 6, generator=torch.Generator().manual_seed(seed))


def test_teacher_gradients_at_every_perturbation_are_vanilla():
    # "Given the same images": with the images' learning rate at 0 both runs see the same images,
    # so any difference in the teacher's .grad would be DiRe's.
    bank, init, teacher = _bank(), _init(), _teacher()
    vanilla_seen, _ = dwa_batches(copy.deepcopy(teacher), init, lr=0.0)
    unpatch = _patch(bank)
    try:
        seen, _ = dwa_batches(copy.deepcopy(teacher), init, lr=0.0)
        runtime = current_runtime()
        # 2 batches x (3 iterations + 2 perturbation passes): the perturbation passes added nothing.
        assert (runtime.stats.steps, runtime.stats.terms_added, runtime.stats.computed) == (6, 6, 10)
        assert runtime.capture.terms_discarded == 4
        # Batches of 3 of the teacher's 6 classes: it serves both, so no term went through its backward.
        assert runtime.capture.routes == {"shared": 0, "untouched": 10}
    finally:
        unpatch()
    assert len(seen) == len(vanilla_seen) == 4
    for patched, vanilla in zip(seen, vanilla_seen):  # the second batch's first pass reads batch one's .grad
        assert all(torch.equal(a, b) for a, b in zip(patched, vanilla))


def test_a_batch_of_every_class_goes_through_dwas_own_backward_and_reads_stay_vanilla():
    # DWA's CIFAR and Tiny scripts at their batch sizes: one batch holds every class and the teacher
    # is rebuilt for the next ipc index, so the .grad DiRe adds to is never read again.
    bank, init, teacher = _bank(), _init(), _teacher()

    def two_ipcs():
        seen = []
        for _ in range(2):
            seen += dwa_batches(copy.deepcopy(teacher), init, batch_size=NUM_CLASSES, iterations=4, lr=0.0)[0]
        return seen

    vanilla_seen = two_ipcs()
    unpatch = _patch(bank)
    try:
        seen = two_ipcs()
        routes = current_runtime().capture.routes
    finally:
        unpatch()
    # Per batch: the 2 perturbation passes and iteration 0 input-only, iterations 1-3 shared.
    assert routes == {"untouched": 6, "shared": 6}
    assert len(seen) == len(vanilla_seen) == 4
    for patched, vanilla in zip(seen, vanilla_seen):
        assert all(torch.equal(a, b) for a, b in zip(patched, vanilla))


def test_a_teacher_read_again_after_a_shared_batch_stops_the_run():
    # The assumption behind the shared route fails (a teacher that classified every class in one
    # batch serves another): first_step would read DiRe's share, so the run stops instead.
    bank, init, teacher = _bank(), _init(), _teacher()
    unpatch = _patch(bank)
    try:
        dwa_batches(teacher, init, batch_size=NUM_CLASSES, iterations=2)
        with pytest.raises(DiReHookError, match="Perterb.first_step is about to read the teacher's accumulated gradient"):
            dwa_batches(teacher, init, batch_size=NUM_CLASSES, iterations=2)
    finally:
        unpatch()


def test_dire_changes_the_images():
    bank, init, teacher = _bank(), _init(), _teacher()
    _, vanilla = dwa_batches(copy.deepcopy(teacher), init)
    unpatch = _patch(bank)
    try:
        _, images = dwa_batches(copy.deepcopy(teacher), init)
    finally:
        unpatch()
    assert not torch.equal(images, vanilla)


def test_the_shared_route_would_change_the_perturbation():
    # The check above can fail: with DiRe's gradient flowing through the teacher (SRe²L's route),
    # the perturbation passes get the term and later ones read it in the accumulated .grad.
    bank, init, teacher = _bank(), _init(), _teacher()
    vanilla_seen, _ = dwa_batches(copy.deepcopy(teacher), init, lr=0.0)
    unpatch = _patch(bank, teacher_grads="shared")
    try:
        seen, _ = dwa_batches(copy.deepcopy(teacher), init, lr=0.0)
    finally:
        unpatch()
    for patched, vanilla in zip(seen, vanilla_seen):
        assert not all(torch.equal(a, b) for a, b in zip(patched, vanilla))


def _expected(model, inputs, targets, bank, jit_shift):
    """Vanilla and DiRe gradients of one synthesis iteration, computed directly."""
    runtime = current_runtime()
    runtime.enabled = False
    try:
        x = inputs.detach().clone().requires_grad_()
        with EmbeddingCapture(model) as cap:
            loss = nn.CrossEntropyLoss()(model(torch.roll(x, shifts=jit_shift, dims=(2, 3))), targets) + 0.01 * x.pow(2).mean()
            (g_vanilla,) = torch.autograd.grad(loss, x, retain_graph=True)
            (g_dire,) = torch.autograd.grad(DiReLoss(r_c=0.5, r_e=0.05)(cap.embeddings, targets, bank), x)
    finally:
        runtime.enabled = True
    return g_vanilla, g_dire


def test_images_get_vanilla_plus_dire_gradient():
    bank, teacher = _bank(), _teacher()
    for p in teacher.parameters():
        p.requires_grad_(True)
    targets = torch.arange(NUM_CLASSES)
    inputs = _init().requires_grad_(True)
    unpatch = _patch(bank)
    try:
        optimizer = torch.optim.Adam([inputs], lr=0.1, betas=(0.5, 0.9))
        perturb = Perterb(teacher.parameters(), optimizer, rho=0.05)
        got = []
        optimizer.register_step_pre_hook(lambda opt, a, k: got.append(inputs.grad.clone()))
        criterion = nn.CrossEntropyLoss()
        for iteration in range(2):
            if iteration == 1:  # the weights are perturbed now: the expectation uses them as they are
                g_vanilla, g_dire = _expected(teacher, inputs, targets, bank, (1, 0))
            optimizer.zero_grad()
            jit = torch.roll(inputs, shifts=(1, 0), dims=(2, 3))
            if iteration == 0:
                criterion(teacher(jit), targets).backward()
                perturb.first_step(True)
            (criterion(teacher(jit), targets) + 0.01 * inputs.pow(2).mean()).backward()
            optimizer.step()
        routes = current_runtime().capture.routes
    finally:
        unpatch()
    # Iteration 1 (a batch of every class, after its first step) went through DWA's own backward.
    assert routes == {"untouched": 2, "shared": 1}
    assert g_dire.abs().sum() > 0
    torch.testing.assert_close(got[1], g_vanilla + g_dire, rtol=1e-5, atol=1e-7)


def test_real_image_initialisation_is_finite():
    # DWA starts from real images: at step 0 a synthetic embedding equals a real one (distance 0).
    teacher, init = _teacher(), _init()
    with torch.no_grad(), EmbeddingCapture(teacher) as cap:
        teacher(init)
        bank = RealEmbeddingBank.from_tensors(cap.embeddings.clone(), torch.arange(NUM_CLASSES))
    unpatch = _patch(bank, r_e=1.0)
    grads = []
    try:
        dwa_batches(copy.deepcopy(teacher), init, batch_size=NUM_CLASSES, iterations=2, steps=1, rho=0.0,
                    on_step=lambda inputs: grads.append(inputs.grad.clone()))
        means = current_runtime().stats.means()
    finally:
        unpatch()
    assert all(torch.isfinite(g).all() for g in grads) and len(grads) == 2
    assert all(v is not None and v == v and abs(v) < float("inf") for v in means.values())


# --- end to end, through dire-run on a look-alike checkout ---------------------------------------------


SCRIPT = "distillation/distillation_cifar.py"
ARGS = ["--dataset", "cifar10", "--batch-size", "5", "--iteration", "3", "--steps", "2", "--ipc-start", "0",
        "--ipc-end", "2", "--store-best-images", "--exp-name", "t"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("dwa")
    root = base / "Diversity-Driven-Synthesis"
    files = {f"distillation/{p.name}": p.read_text() for p in FIXTURE.glob("*.py")}
    head = build_checkout(root, DWA, URL, files)
    lock = write_lock(base / "lock.toml", root, DWA, URL, head)
    # Where the runs start (DWA runs from its root; the teacher is read from ./pretrain/save/...):
    # outside the checkout, so the checkout stays as it is.
    run = base / "run"
    sys.path.insert(0, str(FIXTURE))
    try:
        teacher = nn.DataParallel(_load("distillation_cifar").build_teacher(10))
    finally:
        sys.path.remove(str(FIXTURE))
        for name in ("perterb", "utils"):  # the look-alike's generic names must not linger
            sys.modules.pop(name, None)
    (run / "pretrain/save/cifar10").mkdir(parents=True)
    torch.save({"state_dict": teacher.state_dict()}, run / "pretrain/save/cifar10/teacher.pth")
    init = base / "init"
    init.mkdir()
    g = torch.Generator().manual_seed(0)
    for ipc in range(2):
        torch.save(torch.randn(10, 3, 32, 32, generator=g).clamp(-1.5, 1.5), init / f"tensor_{ipc}.pt")
    data = write_image_folder(base / "real", 10, per_class=2, size=32)
    return {"base": base, "root": root, "lock": lock, "run": run, "init": init, "data": data}


def _run(world, out, mode, extra_env=None, extra_args=()):
    script = world["root"] / SCRIPT
    args = [*ARGS, "--syn-data-path", str(out), "--init-path", str(world["init"]), "--record", str(out / "record.pt"),
            *extra_args]
    out.mkdir(parents=True, exist_ok=True)
    run = run_lookalike("dwa", script, args, mode, world=world, cwd=world["run"], extra_env=extra_env)
    assert run.returncode == 0, run.stderr
    return run, torch.load(out / "record.pt", weights_only=True)


def _images(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.jpg"))}


def test_dire_run_on_a_lookalike_checkout(world):
    base = world["base"]
    dire, dire_record = _run(world, base / "dire", "dire")
    assert "[dire] dwa patch active" in dire.stderr
    manifest = json.loads((base / "dire" / "t" / "dire_manifest.json").read_text())
    # 2 ipc x 2 batches x 3 iterations synthesis steps; 2 perturbation passes per batch got nothing.
    assert (manifest["synthesis_steps"], manifest["terms_added"], manifest["terms_computed"]) == (12, 12, 20)
    # Batches of 5 of the teacher's 10 classes: the teacher serves two batches, so every term takes
    # the input-only route (the next batch's perturbation reads the accumulated .grad).
    assert manifest["capture"] == {"family": "decoupled", "teacher_grads": "auto", "routes": {"shared": 0, "untouched": 20},
                                   "criterion_calls_skipped": 0, "terms_discarded": 8,
                                   "rows": {"forwarded": 100, "not_forwarded": 0, "held_for_cd": 0,  # 20 terms x 5
                                            "terms_on_a_subset": 0, "terms_rows_unknown": 0}}
    assert manifest["batches_in_memory"] == 3 and manifest["memory_embeddings"] == 15  # the last batch is still open

    disabled, _ = _run(world, base / "disabled", "dire", {"DIRE_DISABLE": "1"})
    assert "runs vanilla" in disabled.stderr
    _run(world, base / "vanilla", "vanilla")
    assert _images(base / "disabled") == _images(base / "vanilla")  # DIRE_DISABLE is exactly vanilla
    assert _images(base / "dire") != _images(base / "vanilla")
    assert all(torch.isfinite(x).all() for x in dire_record["images"])  # from real images: finite
    # Given the same images (learning rate 0), every first_step reads vanilla DWA's teacher gradients.
    _, still = _run(world, base / "still-dire", "dire", extra_args=["--lr", "0"])
    _, still_vanilla = _run(world, base / "still-vanilla", "vanilla", extra_args=["--lr", "0"])
    assert len(still["first_step"]) == len(still_vanilla["first_step"]) == 8
    for patched, vanilla in zip(still["first_step"], still_vanilla["first_step"]):
        assert all(torch.equal(a, b) for a, b in zip(patched, vanilla))
    # One batch of every class per teacher (CIFAR-10 at batch 10): after each batch's first step,
    # DiRe goes through DWA's own backward, and the reads stay vanilla all the same.
    whole = ["--lr", "0", "--batch-size", "10"]
    _, shared = _run(world, base / "shared-dire", "dire", extra_args=whole)
    _, shared_vanilla = _run(world, base / "shared-vanilla", "vanilla", extra_args=whole)
    manifest = json.loads((base / "shared-dire" / "t" / "dire_manifest.json").read_text())
    assert manifest["capture"]["routes"] == {"shared": 4, "untouched": 6}  # 2 ipc x (2 passes + iteration 0 | 1, 2)
    assert len(shared["first_step"]) == len(shared_vanilla["first_step"]) == 4
    for patched, vanilla in zip(shared["first_step"], shared_vanilla["first_step"]):
        assert all(torch.equal(a, b) for a, b in zip(patched, vanilla))
    assert subprocess.run(["git", "status", "--porcelain"], cwd=world["root"], capture_output=True, text=True).stdout == ""
