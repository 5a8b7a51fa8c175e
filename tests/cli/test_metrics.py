"""``dire-metrics`` end to end on tiny image sets: the table, metrics.json, the plots, the upstream
checkpoint and distilled-set formats, and every bad input refused with exit 2, one line, no output."""
import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Tuple

import numpy as np
import pytest
import torch
from PIL import Image

from dire_plugin.cli.metrics import build_parser, main
from dire_plugin.metrics.distilled import load_distilled
from dire_plugin.errors import DiReInputError
from dire_plugin.metrics.extractor import load_extractor
from dire_plugin.embeddings.realdata import RealDataSpec
from dire_plugin.hooks.declare import ScriptSpec
from dire_plugin.upstream.smoke import write_teacher_checkpoint

CLASSES = ["ant", "bee", "cat"]
SIZE = 16
REAL_PER_CLASS = 4  # 12 real points: more than --k 5
IPC = 2
_SPEC = RealDataSpec("imagefolder", crop=SIZE, mean=(0.5,) * 3, std=(0.25,) * 3)
# The SRe2L CIFAR teacher format ({"state_dict": module.*}, 3x3 conv1) and the Tiny one ({"model": ...}).
CIFAR_TEACHER = ScriptSpec(_SPEC, num_classes=3, arch="resnet18", checkpoint_key="state_dict",
                           checkpoint_prefix="module.", cifar_stem=True)
TINY_TEACHER = ScriptSpec(_SPEC, num_classes=3, arch="resnet18", checkpoint_key="model", cifar_stem=True)


def _png(path: Path, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Real ImageFolder, the same classes distilled three ways, teacher checkpoints, a bank cache."""
    base = tmp_path_factory.mktemp("metrics")
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        for i in range(REAL_PER_CLASS):
            _png(base / "real" / name / f"{i}.png", rng)
        for i in range(IPC):
            _png(base / "sre2l" / f"new{c:03d}" / f"class{c:03d}_id{i:03d}.jpg", rng)
            _png(base / "folder" / name / f"{i}.png", rng)
    torch.save({"images": torch.randn(IPC * 3, 3, SIZE, SIZE), "labels": torch.arange(3).repeat(IPC)}, base / "mtt.pt")
    write_teacher_checkpoint(CIFAR_TEACHER, base / "cifar_teacher.pth")
    write_teacher_checkpoint(TINY_TEACHER, base / "tiny_teacher.pth")

    class Data:
        pass

    d = Data()
    d.base, d.real, d.cache = base, base / "real", base / "cache"
    d.sets = [base / "sre2l", base / "folder", base / "mtt.pt"]
    d.ckpt = base / "cifar_teacher.pth"
    return d


def _args(d, out: Path, *sets, extra=(), workers=("--workers", "0")):
    # No DataLoader worker processes: a dozen images do not pay for starting them.
    return ["--real", str(d.real), "--arch", "resnet18", "--cifar-stem", "--checkpoint", str(d.ckpt),
            "--cache-dir", str(d.cache), "--out", str(out), *workers, *map(str, sets or d.sets), *extra]


# --- end to end ----------------------------------------------------------------------------------


def test_table_json_markdown_and_plots(data, tmp_path, capsys):
    out = tmp_path / "report"
    rc = main(_args(data, out, extra=["--names", "SRe2L", "folder", "MTT", "--plot"]))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.err == ""  # no progress bars when stderr is not a terminal

    rows = [line for line in captured.out.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows] == ["set", "SRe2L", "folder", "MTT", f"*real (random, {IPC}/class)*"]
    assert all(r.split("|")[2].strip() == str(IPC * 3) for r in rows[1:])  # images
    assert all(r.split("|")[3].strip() == "3" for r in rows[1:])  # classes

    doc = json.loads((out / "metrics.json").read_text())
    assert set(doc) == {"settings", "real", "sets", "reference"}
    assert doc["real"]["class_names"] == CLASSES and doc["real"]["embeddings"] == 3 * REAL_PER_CLASS
    assert doc["settings"]["k"] == 5 and doc["settings"]["layer"] == "fc" and doc["settings"]["image_size"] == SIZE
    assert [s["name"] for s in doc["sets"]] == ["SRe2L", "folder", "MTT"]
    assert [s["layout"] for s in doc["sets"]] == ["sre2l", "imagefolder", "tensor"]
    for entry in doc["sets"] + [doc["reference"]]:
        assert entry["images"] == IPC * 3 and entry["classes"] == 3
        assert 0.0 <= entry["coverage"] <= 1.0
        assert entry["vendi"] >= 1.0 - 1e-9 and entry["vendi_per_class"] >= 1.0 - 1e-9
        assert -1.0 <= entry["intra_class_cosine"] <= 1.0
        assert set(entry["per_class"]["vendi"]) == set(entry["per_class"]["intra_class_cosine"]) == {"0", "1", "2"}
    assert doc["reference"]["reference"] is True

    md = (out / "metrics.md").read_text()
    assert "| SRe2L" in md and "coverage" in md
    for name in ("embedding_scatter.png", "class_similarity.png"):
        with Image.open(out / name) as img:
            assert img.format == "PNG" and img.size[0] > 0 and img.size[1] > 0
    assert "real embeddings: 12 x 512" in captured.out and "(from the cache)" not in captured.out

    # Again for one set: the real bank now comes from the cache, and the numbers are the same.
    again = tmp_path / "again"
    assert main(_args(data, again, data.sets[1], extra=["--names", "folder"])) == 0
    assert "(from the cache)" in capsys.readouterr().out
    doc2 = json.loads((again / "metrics.json").read_text())
    assert doc2["sets"] == [doc["sets"][1]] and doc2["reference"] == doc["reference"]


def test_console_script(data, tmp_path):
    exe = shutil.which("dire-metrics")
    if exe is None:
        pytest.skip("dire-metrics is not installed (pip install -e .)")
    out = tmp_path / "cli"
    proc = subprocess.run([exe, *_args(data, out, data.sets[0], workers=())], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| sre2l" in proc.stdout
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["sets"][0]["layout"] == "sre2l" and 0 <= doc["sets"][0]["coverage"] <= 1


# --- formats -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,key,prefix", [("cifar_teacher.pth", "state_dict", "module."), ("tiny_teacher.pth", "model", "")],
                         ids=["state_dict-module", "model-namespace"])
def test_upstream_checkpoint_formats_load(name, key, prefix, data, tmp_path):
    path = data.base / name
    model, _ = load_extractor("resnet18", path, cifar_stem=True, default_classes=7)
    assert model.fc.out_features == 3  # the checkpoint's head wins over the default
    saved = torch.load(path, weights_only=False)[key]
    assert torch.equal(model.conv1.weight, saved[prefix + "conv1.weight"])
    if key == "model":  # a bare state dict too, as torch.save(model.state_dict()) writes it
        torch.save(model.state_dict(), tmp_path / "bare.pth")
        again, _ = load_extractor("resnet18", tmp_path / "bare.pth", cifar_stem=True)
        assert torch.equal(again.fc.weight, model.fc.weight)


def test_tensor_file_shapes(tmp_path):
    images, labels = torch.randn(4, 3, 8, 8), torch.tensor([2, 0, 1, 0])
    torch.save((images, labels), tmp_path / "pair.pt")
    # DC-BENCH: {"data": [[images, labels], ...]}, the last experiment is the one used; its
    # accuracies are numpy scalars (read as data, with weights_only on).
    torch.save({"data": [[images[:2], labels[:2]], [images, labels]],
                "accs_all_exps": {"ConvNet": [np.float64(0.5), np.mean([np.int64(1), 2])]}}, tmp_path / "res_DM.pt")
    # MTT: bare images_best.pt with labels_best.pt beside it.
    torch.save(images, tmp_path / "images_best.pt")
    torch.save(labels, tmp_path / "labels_best.pt")
    torch.save({"images": images, "labels": torch.nn.functional.one_hot(labels, 3).float()}, tmp_path / "soft.pt")
    for name in ("pair.pt", "res_DM.pt", "images_best.pt", "soft.pt"):
        s = load_distilled(tmp_path / name, CLASSES)
        assert s.layout == "tensor" and len(s) == 4 and s.labels.tolist() == [0, 0, 1, 2], name
        assert s.classes == [0, 1, 2] and s.images.shape == (4, 3, 8, 8)


def test_imagefolder_with_other_names_matches_in_sorted_order(data, tmp_path):
    rng = np.random.default_rng(1)
    for name in ("c0", "c1", "c2"):
        _png(tmp_path / "renamed" / name / "0.png", rng)
    s = load_distilled(tmp_path / "renamed", CLASSES)
    assert s.labels.tolist() == [0, 1, 2] and s.notes
    s = load_distilled(data.base / "folder", CLASSES)  # same names: by name, no note
    assert s.layout == "imagefolder" and s.notes == []


# --- bad input -----------------------------------------------------------------------------------


def _bad_sets(base: Path) -> dict:
    """Distilled sets that must be refused, built once per test in ``base``."""
    rng = np.random.default_rng(2)
    (base / "empty").mkdir(parents=True)
    _png(base / "extra_class" / "new000" / "class000_id000.jpg", rng)
    _png(base / "extra_class" / "new005" / "class005_id000.jpg", rng)
    for name in ("dog", "emu"):
        _png(base / "other_classes" / name / "0.png", rng)
    _png(base / "broken" / "new000" / "class000_id000.jpg", rng)
    (base / "broken" / "new001").mkdir()
    (base / "broken" / "new001" / "class001_id000.jpg").write_bytes(b"not a jpeg at all")
    torch.save({"images": torch.randn(2, 3, SIZE, SIZE), "labels": torch.tensor([0, 9])}, base / "bad_labels.pt")
    for c, name in enumerate(CLASSES):
        for i in range(2):
            _png(base / "real_broken" / name / f"{i}.png", rng)
    (base / "real_broken" / "cat" / "1.png").write_bytes(b"not a png")
    return {k: base / k for k in ("empty", "extra_class", "other_classes", "broken", "bad_labels.pt", "real_broken")}


BAD_INPUTS = {
    # id: (how to change the good command, what the one line must say)
    "empty set folder": (lambda a, d, b: a + [str(b["empty"])], "is empty"),
    "sre2l class not in real": (lambda a, d, b: a + [str(b["extra_class"])], "new005 is class 5"),
    "imagefolder classes mismatch": (lambda a, d, b: a + [str(b["other_classes"])], "not in the real set: dog, emu"),
    "unreadable image": (lambda a, d, b: a + [str(b["broken"])], "class001_id000.jpg"),
    "tensor label not in real": (lambda a, d, b: a + [str(b["bad_labels.pt"])], "label 9"),
    "missing set": (lambda a, d, b: a + [str(d.base / "nope")], "does not exist"),
    "missing checkpoint": (lambda a, d, b: _swap(a, "--checkpoint", str(d.base / "none.pth")) + [str(d.sets[0])], "none.pth does not exist"),
    "checkpoint needs cifar stem": (lambda a, d, b: [x for x in a if x != "--cifar-stem"] + [str(d.sets[0])], "conv1.weight"),
    "checkpoint head mismatch": (lambda a, d, b: a + ["--num-classes", "5", str(d.sets[0])], "fc.weight"),
    "unknown arch": (lambda a, d, b: _swap(a, "--arch", "resnet1800") + [str(d.sets[0])], "unknown arch 'resnet1800'"),
    "no checkpoint": (lambda a, d, b: _drop(a, "--checkpoint") + [str(d.sets[0])], "--checkpoint is required"),
    "unreadable real image": (lambda a, d, b: _swap(a, "--real", str(b["real_broken"])) + [str(d.sets[0])], "real_broken/cat/1.png"),
    "empty real folder": (lambda a, d, b: _swap(a, "--real", str(b["empty"])) + [str(d.sets[0])], "no real training data"),
    "names count": (lambda a, d, b: a + [str(d.sets[0]), "--names", "x", "y"], "2 names for 1 sets"),
}


def _swap(args, flag, value):
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


def _drop(args, flag):
    i = args.index(flag)
    return args[:i] + args[i + 2:]


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, data, tmp_path, capsys):
    bad = _bad_sets(tmp_path / "bad")
    out = tmp_path / "out"
    change, expected = BAD_INPUTS[case]
    base = _args(data, out, "placeholder")[:-1]  # everything but the sets
    rc = main(change(base, data, bad))
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith("dire-metrics: error: "), err
    assert expected in lines[0], lines[0]
    assert not out.exists()


def test_plot_without_matplotlib_is_refused_before_any_work(data, tmp_path, capsys, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "out"
    assert main(_args(data, out, data.sets[0], extra=["--plot"])) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and 'pip install "dire-plugin[plot]"' in captured.err
    assert captured.out == "" and not out.exists()


def test_random_init_is_explicit_and_excludes_a_checkpoint(data):
    with pytest.raises(DiReInputError, match="--checkpoint is required"):
        load_extractor("resnet18", None)
    with pytest.raises(DiReInputError, match="exclude"):
        load_extractor("resnet18", data.ckpt, random_init=True)
    a, _ = load_extractor("resnet18", None, random_init=True, default_classes=3)
    b, _ = load_extractor("resnet18", None, random_init=True, default_classes=3)
    assert torch.equal(a.fc.weight, b.fc.weight)  # seeded: the same numbers every run


def test_checkpoint_that_is_not_one(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"\x00junk")
    with pytest.raises(DiReInputError, match="cannot load checkpoint"):
        load_extractor("resnet18", tmp_path / "junk.pth")
    # weights_only: a checkpoint that pickles anything beyond tensors and Namespace is refused.
    torch.save({"model": {}, "fn": argparse.ArgumentParser}, tmp_path / "code.pth")
    with pytest.raises(DiReInputError, match="cannot load checkpoint"):
        load_extractor("resnet18", tmp_path / "code.pth")


# --- images of another size than the real data's -------------------------------------------------


def _small_sets(base: Path) -> Tuple[Path, Path]:
    """An 8 px tensor set and an 8 px ImageFolder of the real set's classes (the real data is 16 px)."""
    rng = np.random.default_rng(3)
    base.mkdir(parents=True, exist_ok=True)
    torch.save({"images": torch.randn(6, 3, 8, 8), "labels": torch.arange(3).repeat(2)}, base / "small.pt")
    for name in CLASSES:
        path = base / "small_folder" / name / "0.png"
        path.parent.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
    return base / "small.pt", base / "small_folder"


def test_tensor_set_of_another_size_is_refused_naming_the_file_and_both_sizes(data, tmp_path, capsys):
    small, _ = _small_sets(tmp_path)
    out = tmp_path / "out"
    assert main(_args(data, out, small)) == 2
    lines = capsys.readouterr().err.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith("dire-metrics: error: "), lines
    assert str(small) in lines[0] and "8x8" in lines[0] and "16x16" in lines[0] and "--resize-tensors" in lines[0]
    assert not out.exists()


def test_resize_is_explicit_for_tensors_and_noted_for_image_files(tmp_path):
    from dire_plugin.metrics.distilled import InputSpec

    small, folder = _small_sets(tmp_path)
    spec = InputSpec(SIZE, (0.5,) * 3, (0.25,) * 3)
    tensors = load_distilled(small, CLASSES)
    with pytest.raises(DiReInputError, match=r"images are 8x8, the real data's input is 16x16"):
        tensors.check_size(spec)
    with pytest.raises(DiReInputError, match="8x8"):  # batches refuse too: no silent resize through the API
        next(tensors.batches(spec, 4))
    assert "resized to 16x16 (--resize-tensors)" in tensors.check_size(spec, resize_tensors=True)
    images, _ = next(tensors.batches(spec, 4, resize_tensors=True))
    assert images.shape == (4, 3, SIZE, SIZE)
    # Image files are decoded and transformed like every ImageFolder pipeline does: a note, no refusal.
    files = load_distilled(folder, CLASSES)
    note = files.check_size(spec)
    assert "8x8" in note and "16x16" in note and "centre-cropped" in note
    images, _ = next(files.batches(spec, 4, workers=1))
    assert images.shape == (3, 3, SIZE, SIZE)
    same = load_distilled(small, CLASSES)
    assert same.check_size(InputSpec(8, (0.5,) * 3, (0.25,) * 3)) is None
    assert "--resize-tensors" in build_parser().format_help()


# --- broken checkpoints and tensor files ---------------------------------------------------------


def _damaged(good: bytes, damage: str) -> bytes:
    if damage == "truncated":
        return good[: len(good) // 2]
    if damage == "not a zip":
        return b"PK\x03\x04 this is not what torch.save writes" * 10
    raise AssertionError(damage)


@pytest.mark.parametrize("damage", ["truncated", "not a zip", "pickled code"])
@pytest.mark.parametrize("what", ["checkpoint", "tensor set"])
def test_broken_torch_files_are_one_line_naming_the_file_without_torch_advice(what, damage, data, tmp_path, capsys):
    path = tmp_path / ("teacher.pth" if what == "checkpoint" else "set.pt")
    if damage == "pickled code":
        torch.save({"images": torch.zeros(1), "fn": argparse.ArgumentParser}, path)
    else:
        # Small files: torch reports a small truncated zip as "[Errno 22] Invalid argument".
        good = tmp_path / "good.pt"
        torch.save({"state_dict": {"w": torch.randn(64, 64)}} if what == "checkpoint" else
                   {"images": torch.randn(6, 3, SIZE, SIZE), "labels": torch.arange(3).repeat(2)}, good)
        path.write_bytes(_damaged(good.read_bytes(), damage))
    args = _args(data, tmp_path / "out", data.sets[0] if what == "checkpoint" else path)
    if what == "checkpoint":
        args = _swap(args, "--checkpoint", str(path))
    assert main(args) == 2
    lines = capsys.readouterr().err.strip("\n").splitlines()
    assert len(lines) == 1, lines
    line = lines[0]
    assert f"cannot load {'checkpoint' if what == 'checkpoint' else 'distilled set'} {path}: " in line
    assert "Errno" not in line and "weights_only" not in line.lower() and "weights only" not in line.lower()
    if damage == "pickled code":
        assert "never runs code" in line
    assert not (tmp_path / "out").exists()
