"""The MTT patch (``patches/mtt.py``, the ``step`` capture): nothing enters the unrolled student, so
the unroll and the meta-gradients of ``syn_lr`` and of the images are vanilla MTT's; ``image_syn``
gets exactly vanilla + DiRe's gradient from the fixed expert at ``optimizer_img.step()``;
``optimizer_lr`` and evaluation steps are no synthesis steps; a step without the term stops the run;
``--texture`` is refused in one line; the manifest lands beside ``logged_files/...`` and names the expert.

In process on an MTT-shaped loop of our own, then end to end through ``dire-run`` (and the smoke
runner) on a look-alike checkout (tests/fixtures/mtt_like, our code). No kornia, no wandb.
"""
import argparse
import importlib.util
import json
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from torch import nn

from dire_plugin import DiReLoss, EmbeddingCapture, RealEmbeddingBank
from dire_plugin.errors import DiReHookError, DiReInputError
from dire_plugin.hooks.registry import load_method
from dire_plugin.hooks.runtime import current_runtime
from dire_plugin.hooks.settings import RunConfig
from dire_plugin.patches.mtt import prepare_smoke, write_expert_buffer
from dire_plugin.upstream.smoke import run_smoke, write_fake_cifar
from lookalike import build_checkout, run_lookalike, write_lock

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "mtt_like"
URL = "https://github.com/GeorgeCazenavette/mtt-distillation"
MTT = load_method("mtt")
CLASSES, IPC, WIDTH, SIZE = 4, 3, 8, 8
R_C, R_E = 0.5, 0.05


class Net(nn.Module):
    """A small ConvNet of ours: ``features`` (conv, instance norm or BatchNorm, ReLU, pooling) x 2, ``classifier``."""

    def __init__(self, batchnorm=False):
        super().__init__()
        layers, inp = [], 3
        for _ in range(2):
            norm = nn.BatchNorm2d(WIDTH) if batchnorm else nn.GroupNorm(WIDTH, WIDTH, affine=True)
            layers += [nn.Conv2d(inp, WIDTH, 3, padding=1), norm, nn.ReLU(inplace=True), nn.AvgPool2d(2)]
            inp = WIDTH
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(WIDTH * (SIZE // 4) ** 2, CLASSES)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def get_network(model, channel, num_classes, im_size=(SIZE, SIZE), dist=True):
    torch.random.manual_seed(0)  # reseeds the global RNG, as MTT's get_network does from the clock
    return Net(batchnorm=model == "ConvNetBN")


def _args(tmp_path, **over):
    values = dict(dataset="CIFAR10", zca=False, texture=False, model="ConvNet", subset="imagenette", res=128,
                  buffer_path=str(tmp_path / "buffers"), data_path=str(tmp_path / "data"))
    return argparse.Namespace(**{**values, **over})


def _buffer(args, shapes=None, epochs=4):
    folder = Path(args.buffer_path) / (args.dataset + ("" if args.zca else "_NO_ZCA")) / args.model
    shapes = shapes or [tuple(p.shape) for p in Net().parameters()]
    return write_expert_buffer(folder / "replay_buffer_0.pt", shapes, trajectories=2, epochs=epochs, seed=3)


def _bank(seed=1):
    g = torch.Generator().manual_seed(seed)
    return RealEmbeddingBank.from_tensors(torch.rand(CLASSES * 5, WIDTH * 4, generator=g),
                                          torch.arange(CLASSES).repeat(5))


def _patch(args, bank):
    config = RunConfig(method="mtt", script="distill.py", r_c=R_C, r_e=R_E, log_every=0)
    MTT.patch(config, bank_factory=lambda *a: bank)
    result = (3, (SIZE, SIZE), CLASSES, None, None, None, None, None, None, None, None, None)
    current_runtime().capture.use_dataset(args, result, get_network)
    return MTT.unpatch


def _flat(params):
    return torch.cat([p.reshape(-1) for p in params])


def mtt_loop(init, label_syn, trajectory, iterations=3, lr_img=100.0, syn_steps=3, hide_labels=False, on_step=None):
    """MTT's iteration in a few lines of ours: an evaluation (SGD over nn.Parameters), a student
    from a random start epoch unrolled with create_graph=True and a learnable lr, the matching
    loss, backward, ``optimizer_img.step()``, ``optimizer_lr.step()``. ``image_syn`` and
    ``label_syn`` are locals, as in distill.py's main."""
    torch.manual_seed(0)
    image_syn = init.clone().requires_grad_(True)
    syn_lr = torch.tensor(0.01).requires_grad_(True)
    optimizer_img = torch.optim.SGD([image_syn], lr=lr_img, momentum=0.5)
    optimizer_lr = torch.optim.SGD([syn_lr], lr=1e-5, momentum=0.5)
    if on_step is not None:  # per-optimizer hooks run after the global ones: they see what the step uses
        optimizer_img.register_step_pre_hook(lambda opt, a, k: on_step(image_syn))
    if hide_labels:
        labels = label_syn
        del label_syn
    else:
        labels = label_syn
    criterion = nn.CrossEntropyLoss()
    record = defaultdict(list)
    for _ in range(iterations):
        net_eval = get_network("ConvNet", 3, CLASSES)
        optimizer = torch.optim.SGD(net_eval.parameters(), lr=0.01, momentum=0.9)
        loss = criterion(net_eval(image_syn.detach()), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

        student = get_network("ConvNet", 3, CLASSES, dist=False)
        names = [(n, p.shape) for n, p in student.named_parameters()]
        start = int(torch.randint(0, len(trajectory) - 1, ()))
        params = [_flat(trajectory[start]).requires_grad_(True)]
        target = _flat(trajectory[start + 1])
        for _ in range(syn_steps):
            idx = torch.randperm(len(image_syn))[:6]
            x = image_syn[idx]
            x = torch.where(torch.rand(len(idx), 1, 1, 1) < 0.5, x.flip(3), x)
            views, at = {}, 0
            for name, shape in names:
                views[name] = params[-1][at:at + shape.numel()].view(shape)
                at += shape.numel()
            out = torch.func.functional_call(student, views, (x,))
            grad = torch.autograd.grad(criterion(out, labels[idx]), params[-1], create_graph=True)[0]
            params.append(params[-1] - syn_lr * grad)
        start_params = _flat(trajectory[start])
        grand_loss = (nn.functional.mse_loss(params[-1], target, reduction="sum")
                      / nn.functional.mse_loss(start_params, target, reduction="sum"))
        optimizer_img.zero_grad()
        optimizer_lr.zero_grad()
        grand_loss.backward()
        for key, value in (("start", start), ("loss", grand_loss), ("student", params[-1]), ("syn_lr", syn_lr.grad),
                           ("images", image_syn.grad)):
            record[key].append(value.detach().clone() if torch.is_tensor(value) else value)
        optimizer_img.step()
        optimizer_lr.step()
    return record, image_syn.detach()


@pytest.fixture
def setup(tmp_path):
    args = _args(tmp_path)
    trajectory = torch.load(_buffer(args), weights_only=True)[0]
    g = torch.Generator().manual_seed(2)
    init = torch.randn(CLASSES * IPC, 3, SIZE, SIZE, generator=g)
    label_syn = torch.arange(CLASSES).repeat_interleave(IPC)  # class-major, as distill.py builds it
    return args, trajectory, init, label_syn


def _global_module_hooks():
    from torch.nn.modules import module

    return sum(len(getattr(module, name)) for name in dir(module) if name.startswith("_global_") and name.endswith("hooks"))


def test_unroll_and_syn_lr_meta_gradient_are_vanilla(setup):
    # Given the same images (lr_img 0 keeps them), every unroll, loss and meta-gradient is vanilla's.
    args, trajectory, init, label_syn = setup
    vanilla, _ = mtt_loop(init, label_syn, trajectory, lr_img=0.0)
    hooks = _global_module_hooks()
    unpatch = _patch(args, _bank())
    try:
        assert _global_module_hooks() == hooks  # nothing that could fire inside the unroll
        patched, _ = mtt_loop(init, label_syn, trajectory, lr_img=0.0)
        runtime = current_runtime()
        # optimizer_lr and the evaluation optimizers stepped 3 times each: not synthesis steps.
        assert (runtime.stats.steps, runtime.stats.terms_added, runtime.stats.computed) == (3, 3, 3)
    finally:
        unpatch()
    assert patched["start"] == vanilla["start"]
    for key in ("loss", "student", "syn_lr", "images"):
        assert all(torch.equal(a, b) for a, b in zip(patched[key], vanilla[key])), key


def _dire_gradient(trajectory, images, labels, bank):
    """DiRe's gradient at ``images`` from the expert (last epoch), computed directly."""
    net = Net()
    with torch.no_grad():
        for p, t in zip(net.parameters(), trajectory[-1]):
            p.copy_(t)
    net.eval().requires_grad_(False)
    x = images.detach().clone().requires_grad_(True)
    with EmbeddingCapture(net) as cap:
        net(x)
    (grad,) = torch.autograd.grad(DiReLoss(r_c=R_C, r_e=R_E)(cap.embeddings, labels, bank), x)
    return grad


def test_images_get_vanilla_plus_dire_gradient(setup):
    args, trajectory, init, _ = setup
    # Labels in another order than class-major: the capture reads label_syn, it assumes nothing.
    label_syn = torch.arange(CLASSES).repeat(IPC)
    bank, seen = _bank(), []
    unpatch = _patch(args, bank)
    try:
        record, _ = mtt_loop(init, label_syn, trajectory, iterations=2,
                             on_step=lambda images: seen.append((images.detach().clone(), images.grad.clone())))
        shares = [share for _, share in current_runtime().share.records]
    finally:
        unpatch()
    expected = []
    for (images, got), vanilla in zip(seen, record["images"]):
        dire = _dire_gradient(trajectory, images, label_syn, bank)
        assert dire.abs().sum() > 0
        torch.testing.assert_close(got, vanilla + dire, rtol=1e-5, atol=1e-8)
        expected.append(float(dire.norm() / vanilla.norm()))
    assert shares == pytest.approx(expected, rel=1e-4)  # DiRe's share of each step's image gradient
    assert len(seen) == 2 and not torch.equal(seen[0][0], seen[1][0])  # the second step saw updated images


def test_many_images_go_through_the_expert_in_chunks(setup):
    # CIFAR-100 at IPC 50 is 5,000 images: their extra forward runs in chunks, with the same gradient.
    args, trajectory, init, label_syn = setup
    bank, seen = _bank(), {}
    for chunk in (1000, 5):
        unpatch = _patch(args, bank)
        try:
            current_runtime().capture.chunk = chunk
            seen[chunk] = []
            mtt_loop(init, label_syn, trajectory, iterations=1, on_step=lambda images: seen[chunk].append(images.grad.clone()))
        finally:
            unpatch()
    torch.testing.assert_close(seen[5][0], seen[1000][0], rtol=1e-5, atol=1e-8)


def test_the_extractor_is_a_frozen_expert_named_in_the_manifest(setup):
    args, trajectory, _, _ = setup
    state = torch.get_rng_state()
    unpatch = _patch(args, _bank())  # get_network reseeds the global RNG: the patch must not let it
    try:
        assert torch.equal(torch.get_rng_state(), state)
        capture = current_runtime().capture
        extractor = capture.extractor
        assert not extractor.training and not any(p.requires_grad for p in extractor.parameters())
        assert all(torch.equal(p, t) for p, t in zip(extractor.parameters(), trajectory[-1]))
        named = capture.manifest()["extractor"]
    finally:
        unpatch()
    assert named["buffer"] == str(Path(args.buffer_path, "CIFAR10_NO_ZCA", "ConvNet", "replay_buffer_0.pt"))
    assert (named["trajectory"], named["epoch"], named["epochs_recorded"], named["layer"]) == (0, 3, 4, "classifier")


def test_a_step_without_the_term_stops_the_run(setup):
    args, trajectory, init, label_syn = setup
    unpatch = _patch(args, _bank())
    try:
        with pytest.raises(DiReHookError, match="synthesis step 1 .*'label_syn'"):
            mtt_loop(init, label_syn, trajectory, hide_labels=True)
    finally:
        unpatch()
    # And with no expert (get_dataset never went through the patch):
    MTT.patch(RunConfig(method="mtt", script="distill.py", log_every=0), bank_factory=lambda *a: _bank())
    try:
        with pytest.raises(DiReHookError, match="no feature extractor"):
            mtt_loop(init, label_syn, trajectory)
    finally:
        MTT.unpatch()


def test_what_the_patch_refuses(tmp_path):
    args = _args(tmp_path)
    _buffer(args)
    MTT.patch(RunConfig(method="mtt", script="distill.py", log_every=0), bank_factory=lambda *a: _bank())
    capture = current_runtime().capture
    result = (3, (SIZE, SIZE), CLASSES, *[None] * 9)
    try:
        with pytest.raises(DiReInputError, match="--texture is not supported"):
            capture.check_run(_args(tmp_path, texture=True))
        with pytest.raises(DiReInputError, match="--dataset=Tiny"):
            capture.check_run(_args(tmp_path, dataset="Tiny"))
        with pytest.raises(DiReInputError, match="no expert buffer .*CIFAR10/ConvNet"):
            capture.use_dataset(_args(tmp_path, zca=True), result, get_network)
        with pytest.raises(DiReInputError, match="BatchNorm"):
            _buffer(_args(tmp_path, model="ConvNetBN"))
            capture.use_dataset(_args(tmp_path, model="ConvNetBN"), result, get_network)
        _buffer(args, shapes=[(3, 3)])
        with pytest.raises(DiReInputError, match="does not fit --model ConvNet"):
            capture.use_dataset(args, result, get_network)
    finally:
        MTT.unpatch()


def test_the_bank_key_follows_the_whitened_data(tmp_path):
    from dire_plugin.hooks.stepwise import StepCapture

    def ids(images, zca=True):
        capture = StepCapture()
        capture.args = _args(tmp_path, zca=zca)
        capture.dst_train = type("TensorDataset", (), {"images": images, "labels": torch.zeros(len(images)),
                                                       "__len__": lambda self: len(images)})()
        return capture.real_loader()[1:]

    images = torch.rand(6, 3, 4, 4)
    assert ids(images) == ids(images.clone())
    assert ids(images)[0] != ids(images + 1e-3)[0]  # other whitened images: another bank
    assert "zca=True" in ids(images)[1] and "zca=False" in ids(images, zca=False)[1]


# --- end to end, through dire-run on a look-alike checkout ---------------------------------------------

SCRIPT = "distill.py"
ARGS = ["--dataset=CIFAR10", "--ipc=2", "--syn_steps=2", "--expert_epochs=1", "--max_start_epoch=2",
        "--Iteration=2", "--eval_it=2", "--lr_img=100"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("mtt")
    root = base / "mtt-distillation"
    files = {p.name: p.read_text() for p in FIXTURE.glob("*.py")}
    head = build_checkout(root, MTT, URL, files)
    lock = write_lock(base / "lock.toml", root, MTT, URL, head)
    data = write_fake_cifar(base / "data", "cifar10")
    args = [*ARGS, "--data_path", str(data), "--buffer_path", str(base / "buffers")]
    prepare_smoke(base, args, {}, base / "distill.py")  # the expert buffer the smoke run makes up, for the look-alike's ConvNet
    return {"base": base, "root": root, "lock": lock, "data": data, "args": args}


def _run(world, name, mode, extra_env=None, extra_args=(), check=True):
    cwd = world["base"] / name  # outside the checkout: distill.py writes ./logged_files
    cwd.mkdir()
    script = world["root"] / SCRIPT
    args = [*world["args"], "--record", str(cwd / "record.pt"), *extra_args]
    run = run_lookalike("mtt", script, args, mode, world=world, cwd=cwd, fake_data=world["data"], extra_env=extra_env)
    if check:
        assert run.returncode == 0, run.stderr
    return run, cwd


def _results(cwd):
    return {p.relative_to(cwd).as_posix(): p.read_bytes() for p in sorted((cwd / "logged_files").rglob("*.pt"))}


def _record(cwd):
    return torch.load(cwd / "record.pt", weights_only=True)


def test_dire_run_on_a_lookalike_checkout(world):
    dire, cwd = _run(world, "dire", "dire")
    assert "[dire] mtt patch active" in dire.stderr and "[dire] feature extractor: ConvNet" in dire.stderr
    manifest = json.loads((cwd / "logged_files/CIFAR10/lookalike-run/dire_manifest.json").read_text())
    # Iterations 0..2: three image steps; three optimizer_lr steps and the evaluations not counted.
    assert (manifest["synthesis_steps"], manifest["terms_added"], manifest["terms_computed"]) == (3, 3, 3)
    assert manifest["capture"]["family"] == "step" and manifest["capture"]["labels"] == "label_syn"
    expert = manifest["capture"]["extractor"]
    assert expert["buffer"] == str(world["base"] / "buffers/CIFAR10_NO_ZCA/ConvNet/replay_buffer_0.pt")
    assert (expert["trajectory"], expert["epoch"], expert["epochs_recorded"]) == (0, 3, 4)
    assert manifest["bank"]["classes"] == 10 and manifest["bank"]["dim"] == 2048  # ConvNet's classifier input
    assert manifest["mean_values"]["cd"] != 0  # two images per class: the push term acts

    disabled, disabled_cwd = _run(world, "disabled", "dire", {"DIRE_DISABLE": "1"})
    assert "runs vanilla" in disabled.stderr
    _, vanilla_cwd = _run(world, "vanilla", "vanilla")
    assert _results(disabled_cwd) == _results(vanilla_cwd)  # DIRE_DISABLE is exactly vanilla
    assert _results(cwd).keys() - {"logged_files/CIFAR10/lookalike-run/dire_manifest.json"} == _results(vanilla_cwd).keys()
    assert _results(cwd)["logged_files/CIFAR10/lookalike-run/images_2.pt"] != _results(vanilla_cwd)["logged_files/CIFAR10/lookalike-run/images_2.pt"]
    # Iteration 0 starts from the same images: its unroll and meta-gradients are vanilla's.
    patched, vanilla = _record(cwd), _record(vanilla_cwd)
    assert patched["start_epoch"] == vanilla["start_epoch"]
    for key in ("grand_loss", "student", "syn_lr_grad", "image_grad"):
        assert torch.equal(patched[key][0], vanilla[key][0]), key
    assert subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=world["root"],
                          capture_output=True, text=True).stdout == ""


def test_meta_gradients_stay_vanilla_given_the_same_images(world):
    # lr_img 0: the images never change, so every iteration must match vanilla bit for bit; noise
    # initialisation draws from the global RNG right after get_dataset, where the expert is built.
    still = ["--lr_img=0", "--pix_init=noise"]
    _, dire = _run(world, "still-dire", "dire", extra_args=still)
    _, vanilla = _run(world, "still-vanilla", "vanilla", extra_args=still)
    patched, expected = _record(dire), _record(vanilla)
    assert patched["start_epoch"] == expected["start_epoch"] and len(patched["grand_loss"]) == 3
    for key in ("grand_loss", "student", "syn_lr_grad", "image_grad"):
        assert all(torch.equal(a, b) for a, b in zip(patched[key], expected[key])), key


def test_texture_is_refused_in_one_line(world):
    run, _ = _run(world, "texture", "dire", extra_args=["--texture"], check=False)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert lines[-1].startswith("dire-run: error: distill.py --texture is not supported") and "Traceback" not in run.stderr


def test_smoke_on_the_lookalike(world, monkeypatch, capsys):
    monkeypatch.setenv("DIRE_UPSTREAM_LOCK", str(world["lock"]))
    kornia = importlib.util.find_spec("kornia") is not None
    if not kornia:  # the look-alike needs no kornia; the --zca variant is refused before it runs
        rc = run_smoke("mtt", world["root"], {}, scripts=[SCRIPT])
        out = capsys.readouterr().out.splitlines()
        assert rc == 1 and out[0].startswith("PASS mtt distill.py [without --zca]") and "DiRe added to 3/3" in out[0]
        assert out[1].startswith("FAIL mtt distill.py [--zca]") and "needs kornia" in out[1] and "pip install kornia" in out[1]
    else:
        assert run_smoke("mtt", world["root"], {}, scripts=[SCRIPT]) == 0
    assert subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=world["root"],
                          capture_output=True, text=True).stdout == ""
