"""The INFER patch (``patches/infer.py``: the decoupled capture with a compensator and saved images
no step forwarded): the shared 1×3×H×W compensator gets exactly INFER's gradient + DiRe's through
the embeddings of every image it is added to, against a hand reference; the real images saved
with no iteration are in each teacher's memory (forwarded once per teacher, invisibly to the
method); each group of indices has its teacher's bank and memory; ``DIRE_DISABLE`` is bit-identical
to vanilla; a run whose term does not reach the compensator stops.

In process on an INFER-shaped loop of our own, then end to end through ``dire-run`` on a look-alike
checkout (tests/fixtures/infer_like, ours).
"""
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dire_plugin import DiReLoss, EmbeddingCapture, RealEmbeddingBank
from dire_plugin.errors import DiReHookError, DiReInputError
from dire_plugin.hooks.registry import load_method
from dire_plugin.hooks.runtime import current_runtime
from dire_plugin.hooks.settings import RunConfig
from lookalike import build_checkout, run_lookalike, write_image_folder, write_lock
from nets import BNPrior, frozen_teacher

INFER = load_method("infer")
SRE2L = load_method("sre2l")
NUM_CLASSES, SIZE, R_BN = 4, 6, 0.05
#: ipc_init real sets, then GROUPS teachers with IPC_INIT compensators each, ITERATIONS steps each.
IPC_INIT, GROUPS, ITERATIONS = 2, 2, 3
WIDTHS = ((6, 8), (5, 12))  # the two teachers: embeddings of 8 and 12 dimensions
WEIGHTS = dict(r_c=0.5, r_e=0.05)
TARGETS = torch.arange(NUM_CLASSES)

_g = torch.Generator().manual_seed(0)
# The init tensors: one normalised real image per class each (within the pixel range).
REAL_SETS = [torch.randn(NUM_CLASSES, 3, SIZE, SIZE, generator=_g).clamp(-1.5, 1.5) for _ in range(IPC_INIT)]
BANK_IMAGES = torch.randn(NUM_CLASSES * 3, 3, SIZE, SIZE, generator=_g)
BANK_LABELS = torch.arange(NUM_CLASSES).repeat_interleave(3)

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "infer_like"


def _teacher(group):
    with torch.random.fork_rng(devices=[]):  # built at every ipc_id: the loop's random stream is its own
        return frozen_teacher(group, NUM_CLASSES, WIDTHS[group])


@pytest.fixture
def utils():
    """The look-alike's ``utils`` (save_images, denormalize_image, clip_image), imported before the
    patch as the script imports it, and gone afterwards (a generic name)."""
    sys.modules.pop("utils", None)
    sys.path.insert(0, str(FIXTURE / "ufc_generation"))
    try:
        import utils as module

        yield module
    finally:
        sys.path.remove(str(FIXTURE / "ufc_generation"))
        sys.modules.pop("utils", None)


def infer_loop(utils, out, on_step=None, variant=""):
    """INFER's loop in a few lines of ours: per ipc_id every teacher rebuilt; the first IPC_INIT
    ids save their real images with no iteration; later ones optimise one compensator ``u``
    (1×3×H×W) added to the real images of every class, through teacher ``ipc_id // IPC_INIT - 1``:
    a torch-random roll, CE + BN prior read after the criterion, Adam, then the batch is saved
    (denormalised, as the script does). ``variant``: ``"ce-detached"`` (the backward never reaches
    the embeddings), ``"other-tensor"`` (the optimizer steps another tensor), ``"images"`` (the
    images themselves are optimised, no compensator). Returns the final compensators and the shifts."""
    args = SimpleNamespace(dataset="cifar10", syn_data_path=str(out))
    finals, shifts_seen = [], []
    torch.manual_seed(0)  # the method's seed: its rolls are drawn from torch's global stream
    for ipc_id in range(IPC_INIT * (GROUPS + 1)):
        teachers = [_teacher(g) for g in range(GROUPS)]
        priors = [BNPrior(t) for t in teachers]
        group = ipc_id // IPC_INIT - 1
        real = REAL_SETS[ipc_id % IPC_INIT]
        u = torch.zeros(1, 3, SIZE, SIZE, requires_grad=True)
        optimised = real.clone().requires_grad_() if variant == "images" else u
        stepped = torch.zeros(1, 3, SIZE, SIZE, requires_grad=True) if variant == "other-tensor" else optimised
        iterations = ITERATIONS if ipc_id >= IPC_INIT else 0
        inputs = real
        optimizer = torch.optim.Adam([stepped], lr=0.1, betas=(0.5, 0.9))
        criterion = nn.CrossEntropyLoss()
        now = {}
        if on_step is not None:  # after the runtime's own pre-hook: the gradient the step applies
            optimizer.register_step_pre_hook(
                lambda opt, a, k, ipc_id=ipc_id, group=group, u=u, now=now: on_step(ipc_id, group, u, now["shifts"]))
        for _ in range(iterations):
            inputs = optimised if variant == "images" else real + u
            now["shifts"] = tuple(torch.randint(0, 3, (2,)).tolist())
            shifts_seen.append(now["shifts"])
            jit = torch.roll(inputs, shifts=now["shifts"], dims=(2, 3))
            optimizer.zero_grad()
            loss_ce = criterion(teachers[group](jit), TARGETS)
            loss = (loss_ce.detach() if variant == "ce-detached" else loss_ce) + R_BN * priors[group].loss()
            loss.backward()
            optimizer.step()
            inputs.data = utils.clip_image(inputs.data, "cifar10")
        if iterations:
            finals.append(u.detach().clone())
        utils.save_images(args, utils.denormalize_image(inputs.data.clone(), "cifar10"), TARGETS, ipc_id)
    return finals, shifts_seen


def _bank(teacher):
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(BANK_IMAGES, BANK_LABELS), batch_size=5)
    return RealEmbeddingBank.build(teacher, loader, progress=False)


def _embed(teacher, images):
    with torch.no_grad(), EmbeddingCapture(teacher) as cap:
        teacher(images)
    return cap.embeddings


def _reference(steps, with_real=True):
    """For each recorded step ``(ipc_id, group, compensator before it, shifts)``: INFER's gradient
    and DiRe's at the compensator, by hand: DiRe on the embeddings of ``roll(real + u)`` through the
    group's teacher, against its bank, CD against its memory: the real images every group saw saved
    (with ``with_real``), and the last embeddings of every finished batch of that teacher."""
    teachers = [_teacher(g) for g in range(GROUPS)]
    banks = [_bank(t) for t in teachers]
    memory = {g: [] for g in range(GROUPS)}
    if with_real:
        for g, t in enumerate(teachers):
            memory[g] += [_embed(t, real) for real in REAL_SETS]
    out, current, last = [], None, None
    for ipc_id, group, u, shifts in steps:
        if ipc_id != current:
            if last is not None:
                memory[last[0]].append(last[1])
            current = ipc_id
        teacher = _teacher(group)
        prior = BNPrior(teacher)
        x = u.clone().requires_grad_()
        jit = torch.roll(REAL_SETS[ipc_id % IPC_INIT] + x, shifts=shifts, dims=(2, 3))
        with EmbeddingCapture(teacher) as cap:
            loss = nn.CrossEntropyLoss()(teacher(jit), TARGETS) + R_BN * prior.loss()
            (g_method,) = torch.autograd.grad(loss, x, retain_graph=True)
            # One embedding per class in every stored batch: class c's memory is row c of each.
            pushed = {c: torch.stack([emb[c] for emb in memory[group]]) for c in range(NUM_CLASSES)} if memory[group] else None
            dire = DiReLoss(**WEIGHTS)(cap.embeddings, TARGETS, banks[group], memory=pushed)
            (g_dire,) = torch.autograd.grad(dire, x)
            last = (group, cap.embeddings.detach())
        out.append((g_method, g_dire))
    return out


def _run_patched(utils, out):
    recorded, built = [], []

    def on_step(ipc_id, group, u, shifts):
        recorded.append((ipc_id, group, u.detach().clone(), shifts, u.grad.clone()))

    INFER.patch(RunConfig(method="infer", script="fixture.py", log_every=0, **WEIGHTS),
                bank_factory=lambda teacher, layer, device: built.append(teacher) or _bank(teacher))
    try:
        finals, shifts = infer_loop(utils, out, on_step=on_step)
        runtime = current_runtime()
        manifest = runtime.manifest()
        memories = {state.bank.dim: state.memory for state in runtime.keys.values()}
    finally:
        INFER.unpatch()
    # The teachers are rebuilt at every ipc_id, with the same weights: one bank each all the same.
    assert len(built) == GROUPS
    return recorded, finals, shifts, manifest, memories


def test_the_compensator_gets_infer_plus_dire_gradient_through_the_embeddings(utils, tmp_path):
    recorded, _, _, manifest, _ = _run_patched(utils, tmp_path)
    assert len(recorded) == GROUPS * IPC_INIT * ITERATIONS == 12
    steps = [r[:4] for r in recorded]
    reference = _reference(steps)
    for (_, _, _, _, grad), (g_method, g_dire) in zip(recorded, reference):
        assert grad.shape == (1, 3, SIZE, SIZE) and g_dire.abs().sum() > 0
        torch.testing.assert_close(grad, g_method + g_dire, rtol=1e-5, atol=1e-7)
    # The check can fail: without the real images in the memory every step's DiRe part differs.
    without_real = _reference(steps, with_real=False)
    assert all(not torch.allclose(a[1], b[1]) for a, b in zip(reference, without_real))
    assert manifest["synthesis_steps"] == manifest["terms_added"] == 12
    # Every image of a forward carries the compensator: all its rows are forwarded at every step.
    assert manifest["capture"]["rows"] == {"forwarded": 48, "not_forwarded": 0, "held_for_cd": 0,
                                           "terms_on_a_subset": 0, "terms_rows_unknown": 0}
    assert manifest["capture"]["compensator"] is True


def test_each_teacher_memory_holds_the_real_images_no_step_forwarded(utils, tmp_path):
    _, _, _, manifest, memories = _run_patched(utils, tmp_path)
    never = manifest["capture"]["never_forwarded"]
    assert never["images_saved"] == IPC_INIT * NUM_CLASSES
    assert [t["images"] for t in never["per_teacher"]] == [IPC_INIT * NUM_CLASSES] * GROUPS
    # One bank and one memory per teacher (D = 8 and 12): the real images, then the finished batches
    # (teacher 0: both of its batches, the second committed at teacher 1's first step; teacher 1:
    # its first, the last batch of the run is never committed).
    assert sorted(memories) == [8, 12]
    assert len(memories[8]) == (IPC_INIT + 2) * NUM_CLASSES and len(memories[12]) == (IPC_INIT + 1) * NUM_CLASSES
    assert [t["memory_embeddings"] for t in manifest["teachers"]] == [len(memories[8]), len(memories[12])]
    for group, dim in enumerate((8, 12)):
        # Denormalised for the save, normalised back: the images the teacher saw, to float precision.
        real = torch.stack([_embed(_teacher(group), images) for images in REAL_SETS], 1)  # [class, set, D]
        for c in range(NUM_CLASSES):
            torch.testing.assert_close(memories[dim].get(c)[:IPC_INIT], real[c], rtol=1e-5, atol=1e-6)


def test_our_forwards_are_invisible_and_dire_disable_is_bit_identical(utils, tmp_path):
    vanilla, vanilla_shifts = infer_loop(utils, tmp_path / "vanilla")
    _, finals, shifts, _, _ = _run_patched(utils, tmp_path / "dire")
    # The banks and the real images' forwards drew nothing from the loop's random stream.
    assert shifts == vanilla_shifts
    assert not all(torch.equal(a, b) for a, b in zip(finals, vanilla))
    INFER.patch(RunConfig(method="infer", script="fixture.py", log_every=0, **WEIGHTS),
                bank_factory=lambda teacher, layer, device: _bank(teacher))
    try:
        current_runtime().enabled = False  # what DIRE_DISABLE=1 leaves: every wrapper passes through
        disabled, disabled_shifts = infer_loop(utils, tmp_path / "disabled")
    finally:
        INFER.unpatch()
    assert disabled_shifts == vanilla_shifts
    assert all(torch.equal(a, b) for a, b in zip(disabled, vanilla)) and len(disabled) == len(vanilla) == 4


@pytest.mark.parametrize("variant,message", [
    ("ce-detached", "DiRe was not added to synthesis step 1 .*its backward did not reach the captured embeddings"),
    ("other-tensor", "synthesis step 1 of the infer patch updates other tensors than the compensator its term reached"),
    ("images", r"expects one 1×C×H×W compensator .* is a tensor of shape 4×3×6×6"),
])
def test_a_run_whose_term_does_not_reach_the_compensator_stops(utils, tmp_path, variant, message):
    INFER.patch(RunConfig(method="infer", script="fixture.py", log_every=0, **WEIGHTS),
                bank_factory=lambda teacher, layer, device: _bank(teacher))
    try:
        with pytest.raises(DiReHookError, match=message):
            infer_loop(utils, tmp_path, variant=variant)
    finally:
        INFER.unpatch()


def test_a_patch_that_declares_no_compensator_refuses_one(utils, tmp_path):
    SRE2L.patch(RunConfig(method="sre2l", script="fixture.py", log_every=0, **WEIGHTS),
                bank_factory=lambda teacher, layer, device: _bank(teacher))
    try:
        with pytest.raises(DiReHookError, match=r"has one row \(1×3×6×6\): it is shared by every image .*the sre2l "
                                                r"patch does not declare"):
            infer_loop(utils, tmp_path)
    finally:
        SRE2L.unpatch()


# --- the script's data, its groups and what it saves ---------------------------------------------------------


@pytest.mark.parametrize("argv,kind,classes", [
    ([], "cifar100", 100),  # the parser's default
    (["--dataset", "cifar10"], "cifar10", 10),
    (["--dataset=cifar100"], "cifar100", 100),
])
def test_the_spec_follows_the_dataset_option(argv, kind, classes):
    spec = INFER.SCRIPTS[INFER.SCRIPT].for_argv(argv)
    assert (spec.real_data.kind, spec.num_classes, spec.real_data.crop) == (kind, classes, 32)
    # The constants the script clips with: CIFAR-100's own for CIFAR-100, not CIFAR-10's.
    assert spec.real_data.mean[0] == (0.5071 if kind == "cifar100" else 0.4914)


@pytest.mark.parametrize("ipc,m,classes,expected", [(10, 4, 100, 9), (50, 4, 100, 48), (10, 4, 10, 7), (2, 2, 100, 1)])
def test_ipc_init_is_the_scripts(ipc, m, classes, expected):
    assert INFER.ipc_init(ipc, m, classes) == expected


def test_saved_images_are_read_as_the_teacher_saw_them(utils):
    images = REAL_SETS[0].clone()
    saved = utils.denormalize_image(images.clone(), "cifar10")
    back, labels = INFER.saved_images((SimpleNamespace(dataset="cifar10"), saved, TARGETS, 0), {})
    torch.testing.assert_close(back, images, rtol=0, atol=1e-6)
    assert torch.equal(labels, TARGETS)
    with pytest.raises(DiReHookError, match="--dataset cifar10 or cifar100, not 'tinyIN'"):
        INFER.saved_images((SimpleNamespace(dataset="tinyIN"), saved, TARGETS, 0), {})


def test_the_smoke_teachers_are_written_where_generation_loads_them(tmp_path):
    # A checkout whose models/ holds stand-ins of ours under the names the script imports.
    root = tmp_path / "UFC"
    (root / "models").mkdir(parents=True)
    for module, builder in (("mobilenetv2", "MobileNetV2"), ("efficientnet", "EfficientNetB0"), ("shufflenet", "ShuffleNetG2")):
        (root / "models" / f"{module}.py").write_text(
            f"from torch import nn\n\n\ndef {builder}_cifar10():\n    return nn.Sequential(nn.Flatten(), nn.Linear(3072, 10))\n")
    args = ["--dataset", "cifar10", "--ipc", "3", "--M", "4"]  # ipc_init 2: the two tensors the spec writes
    redirects = INFER.prepare_smoke(tmp_path / "work", args, {}, root / INFER.SCRIPT)
    assert sorted(redirects) == sorted(f"pretrained/cifar10/{name}_E200/ckpt.pth" for name, _ in INFER.TEACHERS)
    resnet = torch.load(redirects["pretrained/cifar10/resnet18_E200/ckpt.pth"], weights_only=True)["state_dict"]
    assert all(k.startswith("module.") for k in resnet)  # saved from DataParallel, as generation loads it
    assert resnet["module.conv1.weight"].shape == (64, 3, 3, 3) and resnet["module.fc.weight"].shape == (10, 512)
    shuffle = torch.load(redirects["pretrained/cifar10/shufflenet_E200/ckpt.pth"], weights_only=True)["state_dict"]
    assert shuffle["module.1.weight"].shape == (10, 3072)
    assert not list(root.rglob("__pycache__"))  # nothing written in the checkout
    with pytest.raises(DiReInputError, match="need 3 init tensors, the spec writes 2"):
        INFER.prepare_smoke(tmp_path / "work", ["--dataset", "cifar10", "--ipc", "5", "--M", "4"], {}, root / INFER.SCRIPT)


# --- end to end, through dire-run on a look-alike checkout ---------------------------------------------------

URL = "https://github.com/zhangxin-xd/UFC"
TEACHER_NAMES = ("narrow", "wide")
# CIFAR-10 at IPC 3 with 2 teachers: ipc_init 2, so 2 real sets and 2 compensators per teacher.
ARGS = ["--dataset", "cifar10", "--M", "2", "--ipc", "3", "--iteration", "3", "--lr", "0.25", "--r-bn", "0.05",
        "--jitter", "2", "--store-best-images", "--exp-name", "t", "--wandb-name", "w"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("infer")
    root = base / "UFC"
    (root / "models").mkdir(parents=True)
    (root / "models" / "tinynets.py").write_text((FIXTURE / "models" / "tinynets.py").read_text())
    files = {f"ufc_generation/{p.name}": p.read_text() for p in (FIXTURE / "ufc_generation").glob("*.py")}
    head = build_checkout(root, INFER, URL, files)
    lock = write_lock(base / "lock.toml", root, INFER, URL, head)
    sys.path.insert(0, str(FIXTURE / "models"))
    try:
        import tinynets  # the look-alike's, to write teachers it loads

        redirect = {}
        for seed, name in enumerate(TEACHER_NAMES):
            torch.manual_seed(seed)
            state = {f"module.{k}": v for k, v in tinynets.build(name, 10).state_dict().items()}
            torch.save({"state_dict": state}, base / f"{name}.pth")
            redirect[f"pretrained/cifar10/{name}_E200/ckpt.pth"] = str(base / f"{name}.pth")
    finally:
        sys.path.remove(str(FIXTURE / "models"))
        sys.modules.pop("tinynets", None)
    init = base / "init"
    init.mkdir()
    g = torch.Generator().manual_seed(1)
    for k in range(2):
        torch.save(torch.randn(10, 3, 32, 32, generator=g).clamp(-1.5, 1.5), init / f"tensor_{k}.pt")
    data = write_image_folder(base / "real", 10, per_class=2, size=32)
    return {"base": base, "root": root, "lock": lock, "data": data, "init": init, "redirect": redirect}


def _run(world, mode, extra_env=None, extra_args=()):
    out = world["base"] / mode
    out.mkdir()
    args = [*ARGS, *extra_args, "--syn-data-path", str(out), "--init_path", str(world["init"]), "--record", str(out / "rec.pt")]
    env = {"DIRE_SHIM_REDIRECT": json.dumps(world["redirect"]), **(extra_env or {})}
    return run_lookalike("infer", world["root"] / "ufc_generation/ufc_cifar.py", args, "vanilla" if mode == "vanilla" else "dire",
                         world=world, cwd=world["root"], extra_env=env), out


def _images(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.jpg"))}


def test_dire_run_on_a_lookalike_checkout(world):
    dire, out = _run(world, "dire")
    assert dire.returncode == 0, dire.stderr
    assert "[dire] infer patch active" in dire.stderr
    manifest = json.loads((out / "w" / "t" / "dire_manifest.json").read_text())
    # 2 teachers x 2 compensators x 3 iterations, each forwarding the 10 real images + compensator.
    assert manifest["synthesis_steps"] == manifest["terms_added"] == 12
    assert manifest["capture"]["rows"]["forwarded"] == 120 and manifest["capture"]["rows"]["not_forwarded"] == 0
    never = manifest["capture"]["never_forwarded"]
    assert never["images_saved"] == 20 and [t["images"] for t in never["per_teacher"]] == [20, 20]
    # Per teacher (D = 8, 12): its real images, then its finished compensators' batches.
    assert [(t["bank"]["dim"], t["terms_added"], t["memory_embeddings"]) for t in manifest["teachers"]] == [(8, 6, 40), (12, 6, 30)]
    assert manifest["config"]["share"] == 0.04  # the default: a share, calibrated on the first steps
    assert manifest["gradient_share"]["calibration"]["done"]
    images = _images(out)
    assert len(images) == 60 and all(torch.isfinite(u).all() for u in torch.load(out / "rec.pt", weights_only=True))

    disabled, disabled_out = _run(world, "disabled", {"DIRE_DISABLE": "1"})
    assert disabled.returncode == 0 and "runs vanilla" in disabled.stderr
    vanilla, vanilla_out = _run(world, "vanilla")
    assert vanilla.returncode == 0, vanilla.stderr
    assert _images(disabled_out) == _images(vanilla_out)  # DIRE_DISABLE is exactly vanilla
    assert images != _images(vanilla_out)
    # The real images are saved as they are, with or without DiRe.
    assert all(images[k] == v for k, v in _images(vanilla_out).items() if k.endswith(("_id000.jpg", "_id001.jpg")))
    assert subprocess.run(["git", "status", "--porcelain"], cwd=world["root"], capture_output=True, text=True).stdout == ""


def test_a_lookalike_run_whose_backward_misses_the_embeddings_stops_in_one_line(world):
    run, out = _run(world, "detached", extra_args=("--ce-detached",))
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    line = run.stderr.strip().splitlines()[-1]
    assert line.startswith("dire-run: error: DiRe was not added to synthesis step 1 "), line
    assert "its backward did not reach the captured embeddings" in line
