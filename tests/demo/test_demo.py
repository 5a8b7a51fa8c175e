"""``dire demo``: the quick run end to end through the CLI (what CI runs), the recover script's
determinism, the manifest check, and the refused options."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from dire_plugin.cli.main import main
from dire_plugin.demo.errors import DemoRunError
from dire_plugin.errors import DiReInputError
from dire_plugin.demo.model import DigitsConvNet
from dire_plugin.demo.synth import RECOVER, SynthJob, _check_manifest
from dire_plugin.demo.variants import MAIN_VARIANTS, REAL_LABEL, VANILLA

ROWS = [REAL_LABEL, "vanilla", "+ DiRe (r_c 1, r_e 0)", "+ DiRe (r_c 1, r_e 0.01)"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """``dire demo --quick`` with a fresh cache, as on a new machine."""
    base = tmp_path_factory.mktemp("demo")
    out = base / "out"
    code = main(["demo", "--quick", "--out", str(out), "--cache-dir", str(base / "cache"), "--no-progress"])
    assert code == 0
    return out


def test_quick_report_md_has_every_row(quick):
    text = (quick / "report.md").read_text()
    for label in ROWS:
        assert label in text
    assert "What this run says" in text and "In this run DiRe improved" in text


def test_quick_report_json(quick):
    doc = json.loads((quick / "report.json").read_text())
    assert {"settings", "rows", "comparisons", "verdict", "teacher", "timings_s"} <= set(doc)
    assert [r["set"] for r in doc["rows"]] == ROWS
    assert doc["teacher"]["test_accuracy_pct"] > 95
    for row in doc["rows"]:
        assert row["ipc"] == 10 and row["images"] == 100
        acc = row["accuracy_pct"]
        assert len(acc["runs"]) == 2 and 0 <= acc["mean"] <= 100 and acc["std"] >= 0
        assert 0 <= row["coverage"] <= 1
        assert 1 <= row["vendi_per_class"] <= 10
        assert -1 <= row["intra_class_cosine"] <= 1
        assert set(row["per_class"]["intra_class_cosine"]) == {str(c) for c in range(10)}
    assert doc["rows"][1]["accuracy_pct"]["mean"] > 30  # vanilla students learn something
    # Both DiRe settings are compared with vanilla, each with a sentence.
    assert [c["set"] for c in doc["comparisons"]] == ROWS[2:]
    assert all(c["versus"] == "vanilla" for c in doc["comparisons"])
    assert len(doc["verdict"]) >= 3


def test_quick_dire_runs_got_the_term_through_the_hooks(quick):
    doc = json.loads((quick / "report.json").read_text())
    for row in doc["rows"][2:]:
        (path,) = row["dire_manifests"]
        manifest = json.loads(Path(path).read_text())
        assert manifest["method"] == "demo"
        assert manifest["terms_added"] > 0
        assert manifest["terms_added"] == manifest["synthesis_steps"] == 10 * 60
        assert manifest["config"]["r_c"] == 1.0 and manifest["config"]["r_e"] == row["r_e"]
    vanilla = quick / "synthetic" / "ipc10" / "vanilla" / "seed0"
    assert (vanilla / "new009" / "class009_id009.png").is_file()
    assert not (vanilla / "dire_manifest.json").exists()


def test_quick_figures_open(quick):
    pytest.importorskip("matplotlib")
    for name in ("embeddings", "intra_class_cosine", "images"):
        with Image.open(quick / f"{name}_ipc10.png") as img:
            img.verify()
            assert img.size[0] > 200 and img.size[1] > 100


def _recover_all(tmp_path: Path, ckpt: Path, runs) -> list:
    """Run the vanilla script once per ``(name, seed)``, all at once (each is mostly torch's import)."""
    out = tmp_path / "syn"
    procs = [
        subprocess.Popen(
            [sys.executable, str(RECOVER), "--arch-path", str(ckpt), "--syn-data-path", str(out), "--exp-name", name,
             "--ipc-end", "2", "--iteration", "4", "--seed", str(seed), "--threads", "1", "--print-every", "0",
             "--store-best-images"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path,
        )
        for name, seed in runs
    ]
    for proc in procs:
        _, err = proc.communicate()
        assert proc.returncode == 0, err.decode()
    return [out / name for name, _ in runs]


def test_vanilla_recover_is_deterministic_for_a_seed(tmp_path):
    torch.manual_seed(0)
    ckpt = tmp_path / "teacher.pt"
    torch.save({"state_dict": DigitsConvNet().state_dict()}, ckpt)
    a, b = _recover_all(tmp_path, ckpt, [("a", 3), ("b", 3)])
    xa, xb = (torch.load(p / "synthetic.pt", weights_only=True) for p in (a, b))
    assert torch.equal(xa["images"], xb["images"]) and torch.equal(xa["labels"], xb["labels"])
    assert xa["images"].shape == (20, 3, 8, 8)
    assert xa["images"].std() > 0.1  # optimised noise, not a constant
    pngs = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(pngs) == 20
    assert all((a / p).read_bytes() == (b / p).read_bytes() for p in pngs)


def test_manifest_check_refuses_a_run_that_missed_steps(tmp_path):
    job = SynthJob(MAIN_VARIANTS[1], ipc=2, seed=0, iterations=5)
    (tmp_path / "dire_manifest.json").write_text(json.dumps({"terms_added": 9, "synthesis_steps": 10}))
    with pytest.raises(DemoRunError, match="added to 9 of 10 synthesis steps, expected 10"):
        _check_manifest(job, tmp_path, tmp_path / "log")
    (tmp_path / "dire_manifest.json").write_text(json.dumps({"terms_added": 10, "synthesis_steps": 10}))
    assert _check_manifest(job, tmp_path, tmp_path / "log")["terms_added"] == 10
    assert not VANILLA.dire and MAIN_VARIANTS[1].dire


@pytest.mark.parametrize("argv, message", [
    (["demo", "--dataset", "cifar10"], "needs --data-path"),
    (["demo", "--data-path", "/tmp"], "goes with --dataset cifar10/cifar100"),
    (["demo", "--dataset", "cifar100", "--data-path", "/nonexistent/cifar"], "does not exist"),
    (["demo", "--dataset", "nope"], "invalid choice"),
    (["demo", "--ipc", "1"], "images per class"),
    (["demo", "--seeds", "0"], "not a positive integer"),
    ([], "choose a command"),
])
def test_bad_input_is_one_line_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the default ./dire-demo would go
    assert main(argv) == 2
    assert list(tmp_path.iterdir()) == []  # nothing written
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and err.startswith("dire")


def test_verdict_says_what_the_numbers_say():
    from dire_plugin.demo.tables import ReportRow, verdict

    def row(key, accs, coverage, vendi, cosine, r_c=None):
        return ReportRow(10, key, key, 100, accs, coverage, vendi, cosine, 3.0, r_c=r_c)

    base = row("vanilla", [90.0, 91.0, 92.0], 0.10, 1.5, 0.90)
    worse = row("dire", [85.0, 86.0, 87.0], 0.05, 1.4, 0.95, r_c=1.0)
    better = row("dire2", [95.0, 96.0, 97.0], 0.20, 1.6, 0.85, r_c=1.0)
    sentences, comparisons = verdict([base, worse, better])
    assert "accuracy 86.00 vs 91.00 % (-5.00 points, more than one std; better in 0 of 3" in sentences[0]
    assert sentences[0].count("not improved") == 4
    assert "not improved" not in sentences[1] and sentences[1].count("improved") == 4
    assert "best DiRe setting per metric: accuracy: dire2; coverage: dire2" in sentences[2]
    assert sentences[-1].startswith("In this run DiRe improved over vanilla: accuracy in 1 of 2 comparisons")
    assert [c["accuracy_improved"] for c in comparisons] == [False, True]


def test_a_failed_recover_run_is_one_line_naming_its_log(tmp_path):
    from dire_plugin.demo.synth import SynthContext, run_synthesis

    ctx = SynthContext(teacher=tmp_path / "missing.pt", real_data=tmp_path, bank_cache=tmp_path, out=tmp_path / "syn")
    job = SynthJob(VANILLA, ipc=2, seed=0, iterations=1)
    with pytest.raises(DemoRunError) as err:
        run_synthesis([job], ctx, parallel=1, log_dir=tmp_path / "logs", progress=False)
    message = str(err.value)
    assert "ipc2/vanilla/seed0: recover exited with 1: FileNotFoundError" in message and "\n" not in message
    assert str(tmp_path / "logs" / "ipc2_vanilla_seed0.log") in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_device_cuda_without_a_gpu_is_refused(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--device", "cuda"]) == 2
    assert "--device cuda: torch sees no CUDA device here" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cifar_folder_without_cifar_is_refused_before_anything_runs(tmp_path, capsys):
    (tmp_path / "data" / "something").mkdir(parents=True)
    out = tmp_path / "out"
    argv = ["demo", "--dataset", "cifar10", "--data-path", str(tmp_path / "data"), "--out", str(out),
            "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "no cifar10 in" in err and "cifar-10-batches-py/" in err and "\n" not in err
    assert not (tmp_path / "cache").exists() and not out.exists()


# --- the same pipeline on CIFAR ------------------------------------------------------------------


def _fake_cifar_folders(root: Path, classes: int, train: int, test: int, size: int = 32) -> Path:
    """CIFAR-shaped ImageFolders ``root/train/{class}/`` and ``root/test/{class}/``: each class a
    different brightness, so that a teacher can tell them apart."""
    import numpy as np

    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("test", test)):
        for c in range(classes):
            folder = root / split / f"class{c:02d}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 60, (size, size, 3)) + c * 19
                Image.fromarray(pixels.astype("uint8")).save(folder / f"{i}.png")
    return root


def test_cifar_pipeline_end_to_end_on_cifar_shaped_folders(tmp_path):
    """``--dataset cifar10`` through every stage (ResNet-18 teacher, recover with the DiRe bank read
    from the CIFAR folder, students, metrics, report), at sizes a CPU does in seconds."""
    data = _fake_cifar_folders(tmp_path / "cifar", classes=10, train=8, test=3)
    out = tmp_path / "out"
    argv = ["demo", "--dataset", "cifar10", "--data-path", str(data), "--ipc", "2", "--iterations", "2",
            "--student-steps", "2", "--seeds", "1", "--teacher-epochs", "1", "--no-plots", "--no-progress",
            "--device", "cpu", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    doc = json.loads((out / "report.json").read_text())
    assert doc["title"] == "DiRe demo: SRe²L ± DiRe on CIFAR10"
    assert doc["teacher"]["settings"]["arch"] == "resnet18" and doc["teacher"]["settings"]["dataset"] == "cifar10"
    assert "cifar10 ImageFolders" in doc["settings"]["data"] and doc["settings"]["device"] == "cpu"
    assert [r["set"] for r in doc["rows"]] == ROWS
    for row in doc["rows"]:
        assert row["images"] == 20 and len(row["accuracy_pct"]["runs"]) == 1
    for row in doc["rows"][2:]:
        manifest = json.loads(Path(row["dire_manifests"][0]).read_text())
        assert manifest["terms_added"] == manifest["synthesis_steps"] == 2 * 2
        assert manifest["bank"]["classes"] == 10
    synthetic = torch.load(out / "synthetic" / "ipc2" / "vanilla" / "seed0" / "synthetic.pt", weights_only=True)
    assert synthetic["images"].shape == (20, 3, 32, 32)
    assert "20 of 80 real" not in (out / "report.md").read_text()  # every real image is the coverage reference
    assert "80 of 80 real training images" in (out / "report.md").read_text()


@pytest.mark.parametrize("empty, ipc, message", [
    (None, "3", "class 0 has 2 training images in cifar10 ImageFolders"),
    ("test/class04", "2", "class 4 has 0 test images"),
    ("train/class07", "2", "class 7 has 0 training images"),
])
def test_too_few_images_in_a_class_is_refused_before_output(tmp_path, capsys, empty, ipc, message):
    data = _fake_cifar_folders(tmp_path / "cifar", classes=10, train=2, test=1, size=32)
    if empty:
        for image in (data / empty).iterdir():
            image.unlink()
    out = tmp_path / "out"
    argv = ["demo", "--dataset", "cifar10", "--data-path", str(data), "--ipc", ipc, "--out", str(out),
            "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not out.exists()


def test_cifar_in_torchvision_layout_loads_with_its_labels(tmp_path, monkeypatch):
    """torchvision's own files (pickled batches, MD5-checked before loading): the stand-in files
    here cannot match the published sums, so the check is waived for this test only."""
    import pickle

    import numpy as np
    from torchvision.datasets import cifar

    from dire_plugin.demo.data import denormalise, load_data

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)

    def batch(name, n):
        labels = [i % 10 for i in range(n)]
        rows = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        rows[:, 0] = labels  # the red channel of the first pixel carries the label
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rows, "labels": labels}, f)

    for name, n in [(f"data_batch_{i}", 10) for i in range(1, 6)] + [("test_batch", 20)]:
        batch(name, n)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    data = load_data("cifar10", folder)  # the torchvision folder itself, or its parent
    assert data.real_dir == tmp_path and "torchvision cifar10" in data.source
    assert data.train_x.shape == (50, 3, 32, 32) and data.test_x.shape == (20, 3, 32, 32)
    first_red = (denormalise(data.train_x, data.spec)[:, 0, 0, 0] * 255).round().long()
    assert torch.equal(first_red, data.train_y)
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: False)
    with pytest.raises(DiReInputError, match=r"cifar-10-batches-py: .*corrupt"):
        load_data("cifar10", tmp_path)


def test_script_spec_follows_the_dataset_option():
    from dire_plugin.demo.spec import RECOVER_SCRIPT
    from dire_plugin.hooks.registry import load_method

    spec = load_method("demo").SCRIPTS[RECOVER_SCRIPT]
    assert spec.for_argv([]).num_classes == 10 and spec.for_argv([]).real_data.kind == "imagefolder"
    cifar100 = spec.for_argv(["--ipc-end", "5", "--dataset", "cifar100"])
    assert cifar100.num_classes == 100 and cifar100.real_data.kind == "cifar100" and cifar100.real_data.crop == 32
    assert spec.for_argv(["--dataset=cifar10"]).real_data.mean == (0.4914, 0.4822, 0.4465)
    assert spec.for_argv(["--dataset", "cifar10", "--dataset", "digits"]) is spec  # argparse: the last one wins


# --- augmentation and relabelling ----------------------------------------------------------------


@pytest.mark.parametrize("max_shift, flip", [(1, False), (2, True)])
def test_augmentation_views(max_shift, flip):
    from dire_plugin.demo.model import Augmentation

    aug = Augmentation(max_shift, flip)
    x = torch.randn(1, 3, 6, 6)
    views = torch.stack([aug.apply(x, torch.tensor([v]))[0] for v in range(aug.views)])
    assert aug.views == (2 * max_shift + 1) ** 2 * (2 if flip else 1)
    centre = (2 * max_shift + 1) ** 2 // 2
    assert torch.equal(views[centre], x[0])  # the middle offset is no shift
    # Every view is a different image (no two outcomes coincide on a random image).
    assert len({tuple(v.flatten().tolist()) for v in views}) == aug.views
    if flip:
        assert torch.equal(views[centre + aug.views // 2], x[0].flip(2))
    # Shift right by one: the first column is the border repeated, the rest moves along.
    right = aug.apply(x, torch.tensor([centre - 1]))[0]
    assert torch.equal(right[:, :, 1:], x[0, :, :, :-1]) and torch.equal(right[:, :, 0], x[0, :, :, 0])


def test_precomputed_soft_labels_equal_labelling_each_batch():
    """The table of every view's soft label holds what the teacher says of the augmented batch."""
    from dire_plugin.demo.model import Augmentation, build_model
    from dire_plugin.demo.relabel import _soft_labels, soft_labels_per_view

    torch.manual_seed(0)
    teacher = build_model("convnet", 10).eval()
    aug = Augmentation(1, True)
    images = torch.randn(7, 3, 8, 8)
    table = soft_labels_per_view(teacher, images, 4.0, aug, batch_size=3)
    assert table.shape == (aug.views, 7, 10)
    view = aug.sample(7, torch.Generator().manual_seed(1))
    direct = _soft_labels(teacher, aug.apply(images, view), 4.0)
    torch.testing.assert_close(table[view, torch.arange(7)], direct, rtol=1e-5, atol=1e-6)


# --- caches under --cache-dir and files the pipeline reads back ----------------------------------


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The digits split, loaded once (its image folder written to a cache of this module's own)."""
    from dire_plugin.demo.data import load_data

    return load_data("digits", None, tmp_path_factory.mktemp("digits-cache"))


def _warnings(err: str) -> list:
    return [line for line in err.splitlines() if "warning" in line]


def _damage_teacher(path: Path, damage: str) -> None:
    import argparse
    import shutil

    good = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "not a zip":
        path.write_bytes(b"this is not a torch file\n" * 40)
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "pickled code":
        torch.save({"state_dict": {}, "settings": {}, "fn": argparse.ArgumentParser}, path)
    elif damage in ("weights changed", "other settings"):
        ckpt = torch.load(path, weights_only=True)
        if damage == "weights changed":  # a file torch still loads, whose weights are not the ones saved
            name = next(iter(ckpt["state_dict"]))
            ckpt["state_dict"][name] = ckpt["state_dict"][name] + 1
        else:
            ckpt["settings"]["epochs"] += 7
        torch.save(ckpt, path)
    elif damage == "a folder":
        path.unlink()
        (path / "x").mkdir(parents=True)
    else:
        raise AssertionError(damage)


@pytest.mark.parametrize("damage", ["truncated", "not a zip", "empty", "pickled code", "weights changed",
                                    "other settings", "a folder"])
def test_a_broken_cached_teacher_is_retrained_with_one_warning(damage, digits, tmp_path, capsys):
    from dataclasses import replace

    from dire_plugin.demo.spec import DIGITS
    from dire_plugin.demo.teacher import load_or_train_teacher, load_teacher, teacher_settings

    settings = replace(teacher_settings(DIGITS), epochs=1)
    path, _, _, hit = load_or_train_teacher(digits, tmp_path, settings, progress=False)
    assert not hit
    _damage_teacher(path, damage)
    capsys.readouterr()
    again, model, acc, hit = load_or_train_teacher(digits, tmp_path, settings, progress=False)
    err = capsys.readouterr().err
    assert again == path and not hit and 0 <= acc <= 1
    (warning,) = _warnings(err)
    assert str(path) in warning and "retraining" in warning and "Errno" not in warning
    assert "weights_only" not in warning.lower() and "weights only" not in warning.lower()
    # What was written in its place is sound: the next run loads it without a word.
    _, _, _, hit = load_or_train_teacher(digits, tmp_path, settings, progress=False)
    assert hit and _warnings(capsys.readouterr().err) == []
    assert isinstance(load_teacher(path), torch.nn.Module)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


def test_teacher_cache_is_keyed_on_the_data(digits, tmp_path):
    from dataclasses import replace

    from dire_plugin.demo.data import DemoData
    from dire_plugin.demo.spec import DIGITS
    from dire_plugin.demo.teacher import load_or_train_teacher, teacher_settings

    settings = replace(teacher_settings(DIGITS), epochs=1)
    path, _, _, _ = load_or_train_teacher(digits, tmp_path, settings, progress=False)
    other = DemoData(digits.spec, digits.train_x.flip(3), digits.train_y, digits.test_x, digits.test_y,
                     digits.real_dir, digits.source)
    other_path, _, _, hit = load_or_train_teacher(other, tmp_path, settings, progress=False)
    assert other_path != path and not hit


def _tiny_images(n: int = 12, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), np.arange(n) % 3


@pytest.mark.parametrize("damage", ["truncated image", "missing image", "extra image", "marker is a folder",
                                    "marker unreadable", "other images", "a file"])
def test_a_broken_image_folder_cache_is_rebuilt_with_one_warning(damage, tmp_path, capsys):
    from dire_plugin.demo.data import write_image_folder

    images, labels = _tiny_images()
    root = write_image_folder(tmp_path / "digits-train", images, labels)
    files = sorted(p.relative_to(root) for p in root.rglob("*.png"))
    good = {p: (root / p).read_bytes() for p in files}
    assert len(files) == 12
    if damage == "truncated image":
        (root / files[3]).write_bytes(good[files[3]][:20])
    elif damage == "missing image":
        (root / files[5]).unlink()
    elif damage == "extra image":
        (root / files[0]).with_name("stray.png").write_bytes(good[files[0]])
    elif damage == "marker is a folder":
        (root / ".complete").unlink()
        (root / ".complete").mkdir()
    elif damage == "marker unreadable":
        (root / ".complete").write_bytes(b"\xff\xfe garbage")
    elif damage == "other images":  # same count, other pixels: a count alone would reuse it
        images, labels = _tiny_images(seed=1)
        good = None
    else:
        import shutil

        shutil.rmtree(root)
        root.write_text("not a folder")
    capsys.readouterr()
    assert write_image_folder(root, images, labels) == root
    (warning,) = _warnings(capsys.readouterr().err)
    assert str(root) in warning and "rebuilding" in warning
    now = sorted(p.relative_to(root) for p in root.rglob("*.png"))
    assert now == files
    if good is not None:
        assert all((root / p).read_bytes() == good[p] for p in files)
    write_image_folder(root, images, labels)
    assert _warnings(capsys.readouterr().err) == []
    assert [p.name for p in tmp_path.iterdir()] == ["digits-train"]  # no temporary folder left behind


@pytest.mark.parametrize("damage", ["truncated", "pickled code", "no labels"])
def test_a_broken_synthetic_file_is_one_line_naming_it_and_the_log(damage, tmp_path):
    import argparse

    from dire_plugin.demo.synth import SynthContext, _finish, job_folder

    ctx = SynthContext(teacher=tmp_path / "t.pt", real_data=tmp_path, bank_cache=tmp_path, out=tmp_path / "syn")
    job = SynthJob(VANILLA, ipc=2, seed=0, iterations=1)
    folder = job_folder(job, ctx)
    folder.mkdir(parents=True)
    path = folder / "synthetic.pt"
    if damage == "truncated":
        torch.save({"images": torch.randn(20, 3, 8, 8), "labels": torch.arange(10).repeat(2)}, path)
        path.write_bytes(path.read_bytes()[:-200])
    elif damage == "pickled code":
        torch.save({"images": torch.randn(20, 3, 8, 8), "labels": argparse.ArgumentParser}, path)
    else:
        torch.save({"images": torch.randn(20, 3, 8, 8)}, path)
    with pytest.raises(DemoRunError) as err:
        _finish(job, ctx, tmp_path / "run.log", 0, 1.0)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and str(tmp_path / "run.log") in message
    assert "Errno" not in message and "weights_only" not in message.lower()


def test_a_malformed_manifest_is_one_line(tmp_path):
    job = SynthJob(MAIN_VARIANTS[1], ipc=2, seed=0, iterations=5)
    (tmp_path / "dire_manifest.json").write_text('{"terms_added": 10, "synth')
    with pytest.raises(DemoRunError, match="dire_manifest.json is not valid JSON") as err:
        _check_manifest(job, tmp_path, tmp_path / "log")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("flag, where", [("--out", "at"), ("--out", "under"), ("--cache-dir", "at"),
                                         ("--cache-dir", "under")])
def test_out_or_cache_dir_at_or_under_a_file_is_one_line_exit_2_before_any_work(flag, where, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    target = blocker if where == "at" else blocker / "sub" / "dir"
    other_flag, other = ("--cache-dir", tmp_path / "cache") if flag == "--out" else ("--out", tmp_path / "out")
    argv = ["demo", "--quick", "--no-progress", "--no-plots", flag, str(target), other_flag, str(other)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("dire: error: ")
    assert f"{flag} {target}" in err and f"{blocker} is a file, not a folder" in err
    assert list(tmp_path.iterdir()) == [blocker]  # nothing written, no cache filled
