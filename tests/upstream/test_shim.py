"""The CPU shim: every shimmed call works on a CPU, uninstall puts back the very originals, and an
SRe²L-like script that calls CUDA everywhere runs end to end (and reproducibly) under it."""
import argparse
import hashlib
import logging
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torchvision
import wrapt
from torch import nn
from torchvision.models import _api as tv_api

from dire_plugin.upstream import shim

from dire_plugin.demo.synth import RECOVER
from lookalike import write_demo_teacher


@pytest.fixture
def shimmed():
    shim.install()
    try:
        yield shim
    finally:
        shim.uninstall()


@pytest.fixture
def no_downloads(monkeypatch):
    """Any attempt to fetch weights fails the test instead of reaching the network."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"download attempted: {args[:1]}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


# Every (owner, attribute) the shim replaces, read the way wrapt resolves it.
def _targets():
    targets = [(torch.Tensor, "cuda"), (torch.Tensor, "to"), (nn.Module, "cuda"), (nn.Module, "to"), (torch, "load")]
    targets += [(torch, name) for name in shim.FACTORIES]
    targets += [(torch.cuda, name) for name in (*shim.CUDA_NOOPS, "device_count", "is_available")]
    targets += [(torchvision.models, "resnet18"), (torchvision.models, "mobilenet_v2"), (torchvision.models.resnet, "resnet18")]
    return targets


def _raw(owner, name):
    """What the owner itself holds (a class attribute without binding it; absent: inherited)."""
    return vars(owner).get(name, "<inherited>") if isinstance(owner, type) else getattr(owner, name)


def _snapshot():
    values = {(id(owner), name): _raw(owner, name) for owner, name in _targets()}
    values["registry"] = dict(tv_api.BUILTIN_MODELS)
    values["namespace"] = dict(vars(torchvision.models))
    values["safe_globals"] = list(torch.serialization.get_safe_globals())
    return values


# --- torch --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda"), torch.device("cuda", 0), 0])
def test_tensor_and_module_to_cuda_stay_on_cpu(shimmed, device):
    x = torch.ones(2)
    assert x.to(device).device.type == "cpu"
    assert x.to(device, torch.float64).dtype == torch.float64
    assert x.to(device=device).device.type == "cpu"
    assert torch.Tensor.to(x, "cuda").device.type == "cpu"  # called through the class
    model = nn.Linear(2, 2)
    assert model.to(device) is model and model.weight.device.type == "cpu"
    assert model.to(device=device, dtype=torch.float64).weight.dtype == torch.float64


def test_cuda_methods_return_self(shimmed):
    x = torch.ones(2)
    model = nn.Linear(2, 2)
    assert x.cuda() is x and x.cuda(0) is x
    assert model.cuda() is model and nn.Module.cuda(model) is model
    assert nn.Parameter(torch.ones(1)).cuda().device.type == "cpu"


def test_other_to_calls_unchanged(shimmed):
    x = torch.ones(2)
    assert x.to(torch.float16).dtype == torch.float16
    assert x.to("cpu") is x
    assert x.to(torch.zeros(1, dtype=torch.int32)).dtype == torch.int32


_FACTORY_ARGS = {
    "randn_like": (torch.ones(2),), "rand_like": (torch.ones(2),), "zeros_like": (torch.ones(2),),
    "ones_like": (torch.ones(2),), "empty_like": (torch.ones(2),), "full_like": (torch.ones(2), 3.0),
    "randint_like": (torch.ones(2), 5), "randint": (5, (2,)), "randperm": (3,), "full": ((2,), 1.0),
    "arange": (3,), "tensor": ([1.0, 2.0],), "as_tensor": ([1.0, 2.0],), "eye": (2,), "linspace": (0, 1, 3),
    "logspace": (0, 1, 3),
}


@pytest.mark.parametrize("name", shim.FACTORIES)
def test_factories_with_cuda_device(shimmed, name):
    args = _FACTORY_ARGS.get(name, ((2, 3),))
    for device in ("cuda", torch.device("cuda:0")):
        assert getattr(torch, name)(*args, device=device).device.type == "cpu"


def test_randn_for_images_as_recover_scripts_make_them(shimmed):
    inputs = torch.randn((4, 3, 8, 8), requires_grad=True, device="cuda", dtype=torch.float)
    assert inputs.is_leaf and inputs.requires_grad and inputs.device.type == "cpu"


def test_cuda_runtime_calls(shimmed):
    assert torch.cuda.empty_cache() is None
    assert torch.cuda.synchronize() is None
    assert torch.cuda.set_device(0) is None
    # One device counted, none available: mp.spawn(nprocs=device_count()) starts a worker, and
    # DataParallel still runs its module directly (test below).
    assert torch.cuda.device_count() == 1
    assert torch.cuda.is_available() is False


def test_the_device_count_is_the_one_asked_for(monkeypatch):
    monkeypatch.setenv(shim.ENV_DEVICES, "2")
    shim.install()
    try:
        assert torch.cuda.device_count() == 2
    finally:
        shim.uninstall()


@pytest.mark.parametrize("value", ["0", "two", "-1", "65"])
def test_a_bad_device_count_is_one_line_before_anything_is_patched(monkeypatch, value):
    from dire_plugin.errors import DiReInputError

    monkeypatch.setenv(shim.ENV_DEVICES, value)
    before = torch.cuda.device_count
    with pytest.raises(DiReInputError, match=f"{shim.ENV_DEVICES}='{value}' is not a number of devices from 1 to 64"):
        shim.install()
    assert not shim.installed() and torch.cuda.device_count is before


SPAWNING = """import sys, torch
import torch.multiprocessing as mp

def work(i, out):
    # A fresh interpreter: the shim must be in it for a CUDA call to run on the CPU.
    x = torch.ones(2, device=f"cuda:{i}").cuda(i)
    torch.save({"device": x.device.type, "count": torch.cuda.device_count()}, f"{out}/worker{i}.pt")

if __name__ == "__main__":
    torch.multiprocessing.set_start_method("spawn")
    mp.spawn(work, nprocs=torch.cuda.device_count(), args=(sys.argv[1],))
"""


def test_workers_that_mp_spawn_starts_run_under_the_shim(tmp_path):
    script = tmp_path / "spawning.py"
    script.write_text(SPAWNING)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIRE_")}
    run = subprocess.run([sys.executable, "-m", "dire_plugin.upstream.shim", str(script), str(tmp_path)],
                         env={**env, shim.ENV_DEVICES: "2"}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    seen = [torch.load(tmp_path / f"worker{i}.pt") for i in range(2)]
    assert seen == [{"device": "cpu", "count": 2}] * 2


def test_data_parallel_runs_on_cpu(shimmed):
    model = nn.DataParallel(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(5))).cuda()
    assert model.device_ids == []
    out = model(torch.randn(2, 3, 6, 6, device="cuda"))
    assert out.shape == (2, 5) and out.device.type == "cpu"


def _checkpoint_with_namespace(path):
    torch.save({"model": nn.Linear(2, 2).state_dict(), "args": argparse.Namespace(lr=0.1, arch="resnet18")}, path)


def test_load_namespace_checkpoint_with_weights_only(shimmed, tmp_path):
    path = tmp_path / "ckpt.pth"
    _checkpoint_with_namespace(path)
    for kwargs in ({}, {"map_location": "cuda"}, {"map_location": torch.device("cuda:0")}, {"map_location": {"cuda:0": "cuda:1"}}):
        ckpt = torch.load(path, **kwargs)  # weights_only=True is torch's default
        assert ckpt["args"].arch == "resnet18" and ckpt["model"]["weight"].device.type == "cpu"
    assert torch.load(path, "cuda")["args"].lr == 0.1  # map_location given by position


def test_namespace_allowance_ends_with_uninstall(tmp_path):
    path = tmp_path / "ckpt.pth"
    _checkpoint_with_namespace(path)
    with pytest.raises(Exception, match="Namespace"):
        torch.load(path)
    shim.install()
    try:
        torch.load(path)
    finally:
        shim.uninstall()
    with pytest.raises(Exception, match="Namespace"):
        torch.load(path)


# --- torchvision --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda: torchvision.models.__dict__["resnet18"](pretrained=True),  # the SRe²L ImageNet script
        lambda: torchvision.models.resnet18(weights=torchvision.models.ResNet18_Weights.DEFAULT),
        lambda: torchvision.models.resnet.resnet18(True),
        lambda: torchvision.models.get_model("resnet18", weights="DEFAULT", num_classes=10),
        lambda: torchvision.models.get_model("resnet18", weights=False, num_classes=200),  # CDA tiny
        lambda: torchvision.models.mobilenet_v2(pretrained=True),  # SRe²L's verifier
        lambda: torchvision.models.segmentation.lraspp_mobilenet_v3_large(),  # a default backbone download
    ],
    ids=["dict-pretrained", "weights-enum", "positional", "get_model", "get_model-false", "verifier", "backbone"],
)
def test_builders_never_download(shimmed, no_downloads, build):
    model = build()
    assert isinstance(model, nn.Module)


def test_pretrained_stand_ins_are_the_same_in_every_process(shimmed, no_downloads):
    """Downloaded weights are the same in every process: so are the stand-ins (the ranks of a
    torchrun smoke would otherwise embed the real data with different teachers), and the
    script's own random numbers are not consumed by them."""
    torch.manual_seed(1)
    first = torchvision.models.__dict__["resnet18"](pretrained=True).state_dict()
    after_first = torch.rand(3)
    torch.manual_seed(2)
    second = torchvision.models.resnet18(weights=torchvision.models.ResNet18_Weights.DEFAULT).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(3), after_first)
    # Random weights asked for stay random.
    a, b = (torchvision.models.resnet18(weights=None).state_dict() for _ in range(2))
    assert not torch.equal(a["fc.weight"], b["fc.weight"])


def test_builder_keeps_other_arguments(shimmed, no_downloads):
    model = torchvision.models.get_model("resnet18", weights="DEFAULT", num_classes=7)
    assert model.fc.out_features == 7


# --- install / uninstall ------------------------------------------------------------------------


def test_uninstall_restores_the_originals_exactly():
    before = _snapshot()
    shim.install()
    try:
        during = _snapshot()
        for owner, name in _targets():
            assert isinstance(_raw(owner, name), wrapt.FunctionWrapper), name
        assert during["registry"]["resnet18"] is not before["registry"]["resnet18"]
        assert argparse.Namespace in during["safe_globals"]
    finally:
        shim.uninstall()
    after = _snapshot()
    assert after.keys() == before.keys()
    for key, value in before.items():
        if isinstance(value, dict):
            assert after[key].keys() == value.keys(), key
            assert all(after[key][k] is v for k, v in value.items()), key
        elif isinstance(value, list):
            assert set(after[key]) == set(value), key  # torch keeps them in a set
        else:
            assert after[key] is value, key
    assert "cuda" not in vars(torch.Tensor)  # inherited from TensorBase, as before


def test_install_is_idempotent_and_never_double_wraps():
    shim.install()
    try:
        first = {(id(owner), name): _raw(owner, name) for owner, name in _targets()}
        shim.install()
        for owner, name in _targets():
            current = _raw(owner, name)
            assert current is first[id(owner), name], name
            assert isinstance(current, wrapt.FunctionWrapper), name
            assert not isinstance(current.__wrapped__, wrapt.FunctionWrapper), name
    finally:
        shim.uninstall()
        shim.uninstall()
    assert not shim.installed()
    shim.install()  # again after an uninstall: the import hooks are already registered
    try:
        assert isinstance(torch.randn, wrapt.FunctionWrapper)
        assert torch.ones(1).cuda().device.type == "cpu"
    finally:
        shim.uninstall()
    assert not isinstance(torch.randn, wrapt.FunctionWrapper)


def test_install_logs_one_line():
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("dire")  # its own handler: the launcher may have stopped propagation
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        shim.install()
        shim.install()
        shim.uninstall()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert [r.getMessage() for r in records if "CPU shim" in r.getMessage()] == [
        "[dire] CPU shim installed: CUDA calls run on the CPU, torchvision weights are not downloaded"
    ]


def test_install_before_torch_is_imported():
    code = (
        "import sys, wrapt; import dire_plugin.upstream.shim as s; s.install(); assert 'torch' not in sys.modules; "
        "import torch, torchvision.models as models; "
        "assert isinstance(torch.randn, wrapt.FunctionWrapper); "
        "import torch.hub; torch.hub.load_state_dict_from_url = None; "  # a download would now fail
        "m = models.__dict__['resnet18'](pretrained=True).cuda().eval(); "
        "print(m(torch.randn(1, 3, 32, 32, device='cuda')).shape)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([1, 1000])" in out.stdout


# --- an SRe²L-shaped script that calls CUDA (the demo's, with --device cuda), end to end ----------


def _run_fixture(ckpt: Path, out: Path, *extra: str, shimmed: bool = True) -> subprocess.CompletedProcess:
    runner = ["-m", "dire_plugin.upstream.shim"] if shimmed else []
    cmd = [sys.executable, *runner, str(RECOVER), "--arch-path", str(ckpt), "--syn-data-path", str(out),
           "--exp-name", "exp", "--iteration", "3", "--batch-size", "4", "--store-best-images", "--device", "cuda",
           "--print-every", "10", *extra]
    # One thread each: runs in parallel do not fight over cores, and results stay bit-stable.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("DIRE_ACTIVATE", None)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=RECOVER.parent, env=env)


def _digests(folder: Path):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*.png"))}


def test_fixture_runs_under_the_shim_and_is_reproducible(tmp_path):
    ckpt = write_demo_teacher(tmp_path / "teacher.pth", num_classes=6, seed=1)
    runs = [(tmp_path / "a", True), (tmp_path / "b", True)]
    if not torch.cuda.is_available():
        runs.append((tmp_path / "plain", False))
    with ThreadPoolExecutor(len(runs)) as pool:
        results = list(pool.map(lambda r: _run_fixture(ckpt, r[0], "--num-classes", "6", "--ipc-end", "2", "--seed", "3",
                                                       shimmed=r[1]), runs))
    for result in results[:2]:
        assert result.returncode == 0, result.stderr[-2000:]
        assert "main criterion" in result.stdout
    a, b = _digests(tmp_path / "a" / "exp"), _digests(tmp_path / "b" / "exp")
    expected = {f"new{c:03d}/class{c:03d}_id{i:03d}.png" for c in range(6) for i in range(2)}
    assert set(a) == expected
    assert a == b  # same seed: byte-identical images
    if len(results) == 3:
        # Without the shim the script fails on a CPU-only machine, as the real one does.
        assert results[2].returncode != 0 and re.search("CUDA|NVIDIA", results[2].stderr)


def test_make_teacher_checkpoint_format(tmp_path):
    path = write_demo_teacher(tmp_path / "t.pth", num_classes=4, seed=0)
    ckpt = torch.load(path)
    assert set(ckpt) == {"state_dict"}
    keys = list(ckpt["state_dict"])
    assert all(k.startswith("module.") for k in keys)
    assert ckpt["state_dict"]["module.classifier.weight"].shape == (4, 128)
    again = torch.load(write_demo_teacher(tmp_path / "u.pth", num_classes=4, seed=0))
    assert all(torch.equal(ckpt["state_dict"][k], again["state_dict"][k]) for k in keys)
