"""The DM patch (``patches/dm.py``, the embed capture): the images get exactly DM's gradient plus
DiRe's, computed directly, in both branches and with the classes visited in any order; real
classes come from the pixels, so a loop that no longer pairs a class with its own real images is
refused; evaluation gets nothing; DIRE_DISABLE is bit-identical to vanilla; the manifest lands
beside res_DM_*.pt.

In process on a DM-shaped loop of our own (tests/fixtures/dm_like, imported as the upstream's
``networks``/``utils``), then end to end through ``dire-run`` on a look-alike checkout.
"""
import importlib.util
import itertools
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dire_plugin import DiReLoss
from dire_plugin.errors import DiReHookError
from dire_plugin.hooks.embedded import PixelIndex
from dire_plugin.hooks.registry import load_method
from dire_plugin.hooks.runtime import current_runtime
from dire_plugin.hooks.settings import RunConfig
from dire_plugin.regularizer.functional import dire_components
from dire_plugin.regularizer.grouped import PackedEmbeddings
from dire_plugin.upstream.smoke import run_smoke, write_fake_cifar
from lookalike import build_checkout, run_lookalike, write_lock

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "dm_like" / "methods" / "dc"
URL = "https://github.com/justincui03/dc_benchmark"
SCRIPT = "methods/dc/main_DM.py"
DM = load_method("dm")
R_C, R_E = 0.5, 0.05
UPSTREAM_NAMES = ("networks", "utils")


@pytest.fixture(scope="module")
def dc():
    """The fixture's networks/utils imported under the upstream's top-level names (what the patch
    wraps), other modules of those names put back afterwards."""
    saved = {name: sys.modules.pop(name) for name in UPSTREAM_NAMES if name in sys.modules}
    sys.path.insert(0, str(FIXTURE))
    try:
        import networks  # noqa: F401
        import utils

        yield utils
    finally:
        sys.path.remove(str(FIXTURE))
        for name in UPSTREAM_NAMES:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


def _main_module():
    """main_DM, loaded after the patch so that its ``from utils import ...`` binds the wrapped names."""
    spec = importlib.util.spec_from_file_location("dm_like_main", FIXTURE / "main_DM.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def patched(dc):
    DM.patch(RunConfig(method="dm", script=SCRIPT, r_c=R_C, r_e=R_E, log_every=0))
    try:
        yield SimpleNamespace(utils=dc, main=_main_module(), runtime=current_runtime())
    finally:
        DM.unpatch()


def _args(model, ipc=3, batch_real=5, dsa=True):
    utils = sys.modules["utils"]
    return SimpleNamespace(model=model, ipc=ipc, batch_real=batch_real, dsa=dsa, dsa_strategy="flip_shift_brightness",
                           dsa_param=utils.ParamDiffAug())


def _setup(env, model, **kw):
    args = _args(model, **kw)
    channel, im_size, num_classes, _, _, _, dst_train, _, testloader = env.utils.get_dataset("TOY", "unused")
    _, get_images = env.main.real_images(dst_train, num_classes, "cpu")
    g = torch.Generator().manual_seed(3)
    init = torch.randn(num_classes * args.ipc, channel, *im_size, generator=g)
    return args, num_classes, get_images, init, testloader


def _step(env, args, num_classes, get_images, init, order=None, net_seed=7, it=1):
    """One DM iteration as main_DM runs it; returns the images' gradient at the step."""
    image_syn = init.clone().requires_grad_(True)
    optimizer = torch.optim.SGD([image_syn], lr=0.1, momentum=0.5)
    np.random.seed(0)
    env.utils._NETS = itertools.count(net_seed)
    net = env.utils.get_network(args.model, 3, num_classes, tuple(init.shape[-2:]))
    for p in net.parameters():
        p.requires_grad = False
    loss = env.main.dm_loss(net.embed, image_syn, get_images, num_classes, args, it, order)
    optimizer.zero_grad()
    loss.backward()
    grad = image_syn.grad.clone()
    optimizer.step()
    return grad


def _expected(env, args, num_classes, get_images, init, order=None, net_seed=7, it=1, label_by_call_order=False):
    """DM's gradient and DiRe's, computed directly: the same iteration with the runtime off, the
    embeddings and true classes recorded on the way, DiReLoss on them, autograd to the images."""
    env.runtime.enabled = False
    try:
        image_syn = init.clone().requires_grad_(True)
        np.random.seed(0)
        env.utils._NETS = itertools.count(net_seed)
        net = env.utils.get_network(args.model, 3, num_classes, tuple(init.shape[-2:]))
        for p in net.parameters():
            p.requires_grad = False
        asked, real, syn = [], [], []

        def get_images_recorded(c, n):
            asked.append(c)
            return get_images(c, n)

        def embed_recorded(x):
            out = net.embed(x)
            (syn if x.requires_grad else real).append(out)
            return out

        loss = env.main.dm_loss(embed_recorded, image_syn, get_images_recorded, num_classes, args, it, order)
        visited = torch.tensor(asked)
        syn_labels = visited.repeat_interleave(args.ipc)
        if label_by_call_order:  # what counting real calls would do: the k-th real batch is class k
            visited = torch.arange(len(asked))
        real_labels = visited.repeat_interleave(args.batch_real)
        e_syn, e_real = torch.cat(syn), torch.cat(real)
        dire = DiReLoss(r_c=R_C, r_e=R_E)(e_syn, syn_labels, PackedEmbeddings.from_rows(e_real, real_labels))
        (g_dm,) = torch.autograd.grad(loss, image_syn, retain_graph=True)
        (g_dire,) = torch.autograd.grad(dire, image_syn)
    finally:
        env.runtime.enabled = True
    return g_dm, g_dire


@pytest.mark.parametrize("model", ["ConvNet", "ConvNetBN"])
def test_images_get_dm_plus_dire_gradient(patched, model):
    args, k, get_images, init, _ = _setup(patched, model)
    got = _step(patched, args, k, get_images, init)
    stats = patched.runtime.stats
    assert (stats.steps, stats.terms_added, stats.computed) == (1, 1, 1)  # one DiRe term per step, both branches
    g_dm, g_dire = _expected(patched, args, k, get_images, init)
    assert g_dire.abs().sum() > 0
    torch.testing.assert_close(got, g_dm + g_dire, rtol=1e-5, atol=1e-7)
    # The share, from DiRe's part alone (a backward of ours inside DM's): measuring changed nothing above.
    share = patched.runtime.manifest()["gradient_share"]
    assert share["steps_measured"] == 1
    assert share["median"] == pytest.approx(float(g_dire.norm() / g_dm.norm()), rel=1e-4)
    counts = patched.runtime.capture.counts
    calls = k if model == "ConvNet" else 1
    assert (counts["real_calls"], counts["synthetic_calls"]) == (calls, calls)
    assert counts["concatenated_real_calls"] == (model == "ConvNetBN")


@pytest.mark.parametrize("model", ["ConvNet", "ConvNetBN"])
def test_a_shuffled_class_order_is_handled_from_the_data(patched, model):
    # DM visits the classes in another order: each class still meets its own real images, and so
    # must DiRe. Labels by call order would pair the wrong classes (checked: they differ here).
    args, k, get_images, init, _ = _setup(patched, model)
    order = [4, 1, 5, 0, 3, 2]
    got = _step(patched, args, k, get_images, init, order=order)
    g_dm, g_dire = _expected(patched, args, k, get_images, init, order=order)
    torch.testing.assert_close(got, g_dm + g_dire, rtol=1e-5, atol=1e-7)
    _, counted = _expected(patched, args, k, get_images, init, order=order, label_by_call_order=True)
    assert not torch.allclose(g_dm + counted, got, rtol=1e-3, atol=1e-6)


def test_unaugmented_real_batches_are_labelled_from_their_pixels(patched):
    args, k, get_images, init, _ = _setup(patched, "ConvNetBN", dsa=False)
    got = _step(patched, args, k, get_images, init, order=[2, 0, 1, 5, 4, 3])
    g_dm, g_dire = _expected(patched, args, k, get_images, init, order=[2, 0, 1, 5, 4, 3])
    torch.testing.assert_close(got, g_dm + g_dire, rtol=1e-5, atol=1e-7)
    assert patched.runtime.capture.counts["unaugmented_real_calls"] == 1


def test_a_loop_that_pairs_a_class_with_other_real_images_is_refused(patched):
    # A reordered upstream that draws every real batch from class 0: DiRe would pull classes 1..5
    # towards nothing of theirs. The run stops with the classes named.
    args, k, get_images, init, _ = _setup(patched, "ConvNet")
    with pytest.raises(DiReHookError, match=r"synthetic classes 1, 2, 3, 4, 5 got no real embeddings of their class"):
        _step(patched, args, k, lambda c, n: get_images(0, n), init)


def test_real_images_that_are_no_training_image_are_refused(patched):
    args, k, get_images, init, _ = _setup(patched, "ConvNet")
    with pytest.raises(DiReHookError, match="are no image of the training set"):
        _step(patched, args, k, lambda c, n: get_images(c, n) + 0.3, init)


def test_a_step_without_the_term_stops_the_run(patched):
    args, k, get_images, init, _ = _setup(patched, "ConvNet")
    image_syn = init.clone().requires_grad_(True)
    optimizer = torch.optim.SGD([image_syn], lr=0.1)
    image_syn.pow(2).sum().backward()
    with pytest.raises(DiReHookError, match="no synthetic embed call since the previous step"):
        optimizer.step()
    # Embedded, but its backward never reached the embeddings: also refused.
    net = patched.utils.get_network("ConvNet", 3, k, (16, 16))
    for p in net.parameters():
        p.requires_grad = False
    net.embed(get_images(0, 4))
    net.embed(image_syn[:3])
    optimizer.zero_grad()
    image_syn.pow(2).sum().backward()
    with pytest.raises(DiReHookError, match="1 of 1 synthetic embed calls since the previous step got no gradient"):
        optimizer.step()


def test_evaluation_gets_nothing(patched):
    args, k, get_images, init, testloader = _setup(patched, "ConvNet")
    labels = torch.arange(k).repeat_interleave(args.ipc)

    def evaluate():
        patched.utils._NETS = itertools.count(5)  # the same network, then the same augmentation draws
        net = patched.utils.get_network("ConvNet", 3, k, (16, 16))
        acc = patched.utils.evaluate_synset(net, init.clone(), labels, testloader, args)
        return acc, [p.detach().clone() for p in net.parameters()]

    acc, params = evaluate()
    stats = patched.runtime.stats
    assert (stats.steps, stats.computed, patched.runtime.capture.counts["real_calls"]) == (0, 0, 0)
    patched.runtime.enabled = False
    try:
        vanilla_acc, vanilla_params = evaluate()
    finally:
        patched.runtime.enabled = True
    assert acc == vanilla_acc and all(torch.equal(a, b) for a, b in zip(params, vanilla_params))


def test_per_class_terms_add_up_to_the_whole_set():
    # The ConvNet branch embeds one class per call: DiRe per call, summed, is DiRe on the whole set.
    g = torch.Generator().manual_seed(0)
    syn, real = torch.randn(12, 8, generator=g), torch.randn(20, 8, generator=g)
    syn_labels, real_labels = torch.arange(4).repeat_interleave(3), torch.arange(4).repeat_interleave(5)
    packed = PackedEmbeddings.from_rows(real, real_labels)
    whole = dire_components(syn, syn_labels, packed)
    for name in whole:
        parts = sum(dire_components(syn[syn_labels == c], syn_labels[syn_labels == c], packed)[name] for c in range(4))
        torch.testing.assert_close(parts, whole[name])


def test_pixel_index_labels_duplicates_and_strangers():
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    data[7] = data[3]  # the same image in two classes
    targets = [i % 4 for i in range(40)]
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    index = PixelIndex.from_dataset(SimpleNamespace(data=data, targets=targets), 3, (8, 8), mean, std)
    x = (torch.from_numpy(data).permute(0, 3, 1, 2).float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    order = torch.tensor([11, 15, 19, 3])  # class 3, with the duplicate (classes 3 and 3... and 7 % 4 = 3)
    assert index.labels_of(*index.keys_of(x[order]), "t").tolist() == [3, 3, 3, 3]
    data[7] = data[2]  # now a duplicate across classes 2 and 3
    index = PixelIndex.from_dataset(SimpleNamespace(data=data, targets=targets), 3, (8, 8), mean, std)
    x = (torch.from_numpy(data).permute(0, 3, 1, 2).float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert index.labels_of(*index.keys_of(x[[2, 6, 10]]), "t").tolist() == [2, 2, 2]  # its batch says class 2
    with pytest.raises(DiReHookError, match="duplicate of training images of classes"):
        index.labels_of(*index.keys_of(x[[2]]), "t")
    with pytest.raises(DiReHookError, match="1 of 2 real images given to t are no image"):
        index.labels_of(*index.keys_of(torch.stack([x[0], x[1] + 0.001])), "t")


# --- end to end, through dire-run on a look-alike checkout ---------------------------------------------


ARGS = ["--dataset", "CIFAR10", "--ipc", "10", "--batch_real", "12", "--Iteration", "2"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("dm")
    root = base / "dc_benchmark"
    files = {f"methods/dc/{p.name}": p.read_text() for p in FIXTURE.glob("*.py")}
    head = build_checkout(root, DM, URL, files)
    lock = write_lock(base / "lock.toml", root, DM, URL, head)
    data = write_fake_cifar(base / "data", "cifar10")
    return {"base": base, "root": root, "lock": lock, "data": data}


def _run(world, name, mode, extra_env=None, extra_args=(), check=True):
    script = world["root"] / SCRIPT
    out = world["base"] / name
    args = [*ARGS, "--data_path", str(world["data"]), "--save_path", str(out), *extra_args]
    # From the script's folder, as DC-BENCH runs it (cd methods/dc && python main_DM.py ...).
    run = run_lookalike("dm", script, args, mode, world=world, cwd=script.parent, fake_data=world["data"],
                        dire_flags=("--r-c", str(R_C), "--r-e", str(R_E)), extra_env=extra_env)
    if check:
        assert run.returncode == 0, run.stderr
    return run, out


def test_dire_run_on_a_lookalike_checkout(world):
    dire, out = _run(world, "dire", "dire")
    assert "[dire] dm patch active" in dire.stderr and "no bank, no memory" in dire.stderr
    result = out / "res_DM_CIFAR10_ConvNet_10ipc.pt"
    manifest = json.loads((out / "dire_manifest.json").read_text())  # beside the results
    assert (manifest["synthesis_steps"], manifest["terms_added"], manifest["terms_computed"]) == (3, 3, 3)
    assert manifest["capture"]["family"] == "embed" and manifest["capture"]["memory"].startswith("not used")
    assert (manifest["capture"]["real_calls"], manifest["capture"]["synthetic_calls"]) == (30, 30)
    assert manifest["bank"] is None and manifest["batches_in_memory"] == 0 and manifest["memory_embeddings"] == 0

    disabled, disabled_out = _run(world, "disabled", "dire", {"DIRE_DISABLE": "1"})
    assert "runs vanilla" in disabled.stderr and not (disabled_out / "dire_manifest.json").exists()
    _, vanilla_out = _run(world, "vanilla", "vanilla")
    vanilla = (vanilla_out / result.name).read_bytes()
    assert (disabled_out / result.name).read_bytes() == vanilla  # DIRE_DISABLE is exactly vanilla
    assert result.read_bytes() != vanilla
    assert dire.stdout.splitlines()[0] == disabled.stdout.splitlines()[0]  # iteration 0's printed loss is DM's

    bn, bn_out = _run(world, "dire-bn", "dire", extra_args=["--model", "ConvNetBN", "--class_order", "shuffled"])
    manifest = json.loads((bn_out / "dire_manifest.json").read_text())
    assert (manifest["synthesis_steps"], manifest["terms_added"]) == (3, 3)
    assert manifest["capture"]["concatenated_real_calls"] == 3
    status = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=world["root"], capture_output=True, text=True)
    assert status.stdout == ""


def test_a_broken_pairing_is_one_line_and_exit_2(world, tmp_path):
    # The same run on a checkout whose loop draws every real batch from class 0.
    root = tmp_path / "dc_benchmark"
    files = {f"methods/dc/{p.name}": p.read_text() for p in FIXTURE.glob("*.py")}
    main = files[SCRIPT]
    assert "img_real = get_images(c, args.batch_real)" in main
    files[SCRIPT] = main.replace("img_real = get_images(c, args.batch_real)", "img_real = get_images(0, args.batch_real)")
    head = build_checkout(root, DM, URL, files)
    lock = write_lock(tmp_path / "lock.toml", root, DM, URL, head)
    run, _ = _run({**world, "root": root, "lock": lock, "base": tmp_path}, "out", "dire", check=False)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert lines[-1].startswith("dire-run: error: synthetic classes 1, 2, 3, 4, 5, 6, 7, 8, 9 got no real embeddings")
    assert "Traceback" not in run.stderr


def test_the_default_save_path_inside_the_checkout_gets_no_manifest_there(world, tmp_path):
    # DM's default --save_path is result/ beside main_DM.py, inside the checkout, where README
    # promises that nothing of ours is written outside .dire/: the manifest goes to <cache>/runs/.
    root = tmp_path / "dc_benchmark"  # its own checkout: the upstream's result/ stays behind in it
    head = build_checkout(root, DM, URL, {f"methods/dc/{p.name}": p.read_text() for p in FIXTURE.glob("*.py")})
    lock = write_lock(tmp_path / "lock.toml", root, DM, URL, head)
    script = root / SCRIPT
    run = run_lookalike("dm", script, [*ARGS, "--data_path", str(world["data"])], "dire",
                        world={**world, "root": root, "lock": lock, "base": tmp_path}, cwd=script.parent,
                        fake_data=world["data"], dire_flags=("--r-c", str(R_C), "--r-e", str(R_E)))
    assert run.returncode == 0, run.stderr
    result = script.parent / "result"
    assert (result / "res_DM_CIFAR10_ConvNet_10ipc.pt").is_file()  # the upstream's own output, where it puts it
    assert not [p for p in root.rglob("*") if "manifest" in p.name], "a manifest was written into the checkout"
    (line,) = [line for line in run.stderr.splitlines() if line.startswith("[dire] manifest: ")]
    path = Path(line[len("[dire] manifest: "):].split(" (")[0])
    assert path.parent == tmp_path / "cache" / "runs" and path.name.endswith("dire_manifest.json")
    assert f"not beside the outputs in {result}: they lie inside the upstream checkout" in line
    manifest = json.loads(path.read_text())
    assert manifest["outputs"] == [str(result)] and (manifest["status"], manifest["terms_added"]) == ("finished", 3)


def test_smoke_runs_both_branches_and_finds_the_results(world, monkeypatch, capsys):
    # dire-apply --verify --smoke on the look-alike: one line per variant, res_DM_*.pt + manifest checked.
    monkeypatch.setenv("DIRE_UPSTREAM_LOCK", str(world["lock"]))
    assert run_smoke("dm", world["root"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" (")[0] for line in lines] == [f"PASS dm {SCRIPT} [ConvNet]", f"PASS dm {SCRIPT} [ConvNetBN]"]
    # DM's default weight is a share, calibrated on the first steps: the smoke's 3 steps all give it.
    share = DM.DEFAULT_WEIGHTS.share
    assert all(line.endswith(f"1 res_DM_*.pt file, DiRe added to 3/3 steps, gradient share median {share:.4g} over 3 "
                             "measured steps") for line in lines), lines

