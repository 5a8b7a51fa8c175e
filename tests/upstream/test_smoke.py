"""``dire-apply --verify --smoke``: the teacher checkpoints and fake data it writes, the way it runs
and judges a script (offline, on the SRe²L-like fixture), and the real CIFAR script when a
mirror of the upstream is at hand."""
import os
import shutil
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torchvision import datasets

from dire_plugin.upstream import shim
from dire_plugin.hooks.declare import ScriptSpec
from dire_plugin.hooks.registry import METHODS, load_method
from dire_plugin.upstream.lockfile import method_lock
from dire_plugin.upstream.smoke import (
    run_smoke, smoke_script, write_fake_imagefolder, write_init_images, write_teacher_checkpoint,
)

from dire_plugin.demo.synth import RECOVER
from lookalike import write_demo_teacher

MIRROR = os.environ.get("DIRE_UPSTREAM_MIRROR")

_WITH_CHECKPOINT = [
    (method, rel) for method in ("sre2l", "cda") for rel, spec in load_method(method).SCRIPTS.items() if spec.checkpoint_key
]


@pytest.mark.parametrize("method,rel", _WITH_CHECKPOINT, ids=[r for _, r in _WITH_CHECKPOINT])
def test_teacher_checkpoint_loads_as_the_script_loads_it(tmp_path, method, rel):
    spec = load_method(method).SCRIPTS[rel]
    path = write_teacher_checkpoint(spec, tmp_path / "t.pth")
    model = torchvision.models.get_model(spec.arch, num_classes=spec.num_classes)
    if spec.cifar_stem:
        model.conv1 = nn.Conv2d(3, 64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False)
        model.maxpool = nn.Identity()
    if spec.checkpoint_prefix == "module.":
        model = nn.DataParallel(model)
    shim.install()  # the checkpoint pickles argparse.Namespace, as torchvision-reference ones do
    try:
        checkpoint = torch.load(path)
    finally:
        shim.uninstall()
    model.load_state_dict(checkpoint[spec.checkpoint_key])  # strict: every key, no prefix mismatch


@pytest.mark.parametrize("method", list(METHODS))
def test_every_spec_has_smoke_arguments(method):
    for rel, spec in load_method(method).SCRIPTS.items():
        args = " ".join(spec.smoke_args)
        # Outputs go to the smoke's own folder, never the checkout: named, or relative to it.
        assert "{out}" in args or spec.run_from == "out", rel
        # A checkpoint on the command line exactly when the script takes one there.
        assert ("{ckpt}" in args) == bool(spec.checkpoint_key and not spec.checkpoint_at), rel
    sre2l = load_method("sre2l").SCRIPTS
    assert all("--ipc-end 1" in " ".join(s.smoke_args) for r, s in sre2l.items() if "multi_gpu" not in r)


def test_fake_imagefolder_has_the_teacher_classes(tmp_path):
    root = write_fake_imagefolder(tmp_path / "real", num_classes=12)
    folder = datasets.ImageFolder(str(root))
    assert len(folder.classes) == 12 and len(folder) == 24
    # Label order is numeric order: class 2 is not sorted after class 10.
    assert folder.class_to_idx[folder.classes[2]] == 2 and folder.classes[2].endswith("02")


def test_init_folders_for_some_classes_and_a_teacher_torchvision_does_not_build(tmp_path):
    # DELT synthesises the classes its init folder holds (2 here, 3 images each, whatever --ipc
    # asks up to that) and reads a ConvNet of its own from a fixed path.
    spec = load_method("delt").SCRIPTS["recover/recover.py"].for_argv(["--arch-name", "conv4"])
    root = write_init_images(spec, tmp_path / "init")
    assert sorted(p.name for p in root.iterdir()) == ["n000", "n001"]
    assert all(len(list(p.iterdir())) == 3 for p in root.iterdir())
    path = write_teacher_checkpoint(spec, tmp_path / "t.pth")
    assert "layers.conv.0.weight" in torch.load(path, weights_only=True)["model"]  # the patch's writer, not torchvision


def test_unknown_script_fails(capsys):
    assert run_smoke("sre2l", Path("/nonexistent"), {}, scripts=["nope.py", "SRe2L/*small_dataset/recover_cifar.py"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(line.startswith("FAIL sre2l ") for line in lines)
    assert "does not exist" in lines[1]


def _fixture_spec(ckpt: Path, *extra: str) -> ScriptSpec:
    cifar = load_method("sre2l").SCRIPTS["SRe2L/*small_dataset/recover_cifar.py"].real_data
    args = ("--arch-path", str(ckpt), "--syn-data-path", "{out}", "--exp-name", "smoke", "--iteration", "2",
            "--batch-size", "3", "--num-classes", "6", "--ipc-end", "1", "--device", "cuda", *extra)
    return ScriptSpec(cifar, num_classes=6, smoke_args=args)


def test_smoke_runs_a_script_under_the_shim(tmp_path):
    ckpt = write_demo_teacher(tmp_path / "teacher.pth", num_classes=6)
    # The demo's recover script, which calls CUDA with --device cuda, as an upstream one.
    result = smoke_script("sre2l", RECOVER.parent.parent, "recover/recover.py", _fixture_spec(ckpt, "--store-best-images"),
                          vanilla=True, keep=True)
    try:
        assert result.ok, result.detail
        assert result.detail == "6 images, vanilla"
        assert len(list((result.workdir / "real").iterdir())) == 6  # the fake real data, one folder per class
    finally:
        shutil.rmtree(result.workdir, ignore_errors=True)


@pytest.mark.parametrize("code,problem", [("raise SystemExit(3)", "exit status 3"), ("pass", "no images written")])
def test_smoke_failures_keep_their_folder(tmp_path, code, problem):
    (tmp_path / "script.py").write_text(code + "\n")
    spec = _fixture_spec(tmp_path / "unused.pth")
    result = smoke_script("sre2l", tmp_path, "script.py", spec, vanilla=True)
    try:
        assert not result.ok and problem in result.detail
        assert result.workdir.is_dir() and str(result.workdir) in result.detail
    finally:
        shutil.rmtree(result.workdir, ignore_errors=True)


#: The quickest covered script of each method, smoke-run against a real clone of its upstream
#: when DIRE_UPSTREAM_MIRROR names a folder holding one (named as the repository, at the pin).
REAL_SMOKES = [
    ("sre2l", "SRe2L/*small_dataset/recover_cifar.py"),
    ("dwa", "distillation/distillation_cifar.py"),
    ("delt", "recover/recover.py"),  # its three runs: EarlyLate, the ConvNet from its fixed path, --arch-path
    ("prism", "recover/multi_gpu/data_synthesis.py"),
    ("dm", "methods/dc/main_DM.py"),
    ("mtt", "distill.py"),  # both variants: the mtt job installs kornia for --zca
    ("infer", "ufc_generation/ufc_cifar.py"),  # CIFAR-100 and CIFAR-10: two and four teachers
]


def _mirror_clone(method):
    if not MIRROR:
        pytest.skip("DIRE_UPSTREAM_MIRROR is not set (a folder holding clones of the pinned upstreams)")
    repository = method_lock(method).repository
    root = Path(MIRROR) / repository.rstrip("/").rsplit("/", 1)[-1]
    if not root.is_dir():
        pytest.skip(f"no clone of {repository} in {MIRROR}")
    return root


@pytest.mark.parametrize("method,script", REAL_SMOKES)
def test_smoke_of_the_real_script(capsys, method, script):
    root = _mirror_clone(method)
    rc = run_smoke(method, root, {}, scripts=[script])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.startswith(f"PASS {method} {script}") and "DiRe added to" in out


def test_the_line_of_a_run_of_several_teachers_names_each(tmp_path):
    # The smoke figures: the steps that got each teacher's term, and its bank's build time.
    import json

    from dire_plugin.upstream.smoke import _summary

    folder = tmp_path / "out" / "smoke" / "new000"
    folder.mkdir(parents=True)
    (folder / "class000_id000.png").write_bytes(b"")
    teachers = [{"teacher": name, "bank": {"dim": dim, "build_seconds": seconds}, "terms_added": added}
                for name, dim, seconds, added in (("ResNet", 512, 3.14, 4), ("WideResNet", 128, 1.0, 2))]
    (folder.parent / "dire_manifest.json").write_text(json.dumps({
        "terms_added": 6, "synthesis_steps": 6, "gradient_share": {"median": 0.05, "steps_measured": 5},
        "teachers": teachers}))
    assert _summary(tmp_path / "out", vanilla=False) == (
        "1 images, DiRe added to 6/6 steps, gradient share median 0.05 over 5 measured steps; per teacher: "
        "ResNet D=512 4 steps (bank 3.1 s), WideResNet D=128 2 steps (bank 1.0 s)")
