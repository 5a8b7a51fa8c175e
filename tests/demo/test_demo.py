"""``dire demo``: the quick run of every family end to end through the CLI (what CI runs), the
family scripts going through their real patch's capture, the recover script's determinism, the
manifest check, the paired test, and the refused options."""
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
from dire_plugin.demo.families import FAMILIES
from dire_plugin.demo.model import DigitsConvNet
from dire_plugin.demo.synth import RECOVER, SynthJob, _check_manifest
from dire_plugin.demo.variants import DEFAULT, REAL_LABEL, SHARED, VANILLA

ROWS = [REAL_LABEL, "vanilla", "+ DiRe (method default)", "+ DiRe (share 0.4)"]
FAMILY_ORDER = ["sre2l", "dwa", "dm", "mtt"]
#: The smoke form of the quick run: every family, two synthesis seeds, a few steps each.
ITERATIONS = 3


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """``dire demo --quick`` (every family by default) with a fresh cache, as on a new machine, at a
    few iterations and student steps so that the suite stays short."""
    base = tmp_path_factory.mktemp("demo")
    out = base / "out"
    code = main(["demo", "--quick", "--iterations", str(ITERATIONS), "--student-steps", "5", "--out", str(out),
                 "--cache-dir", str(base / "cache"), "--no-progress"])
    assert code == 0
    return out


def test_quick_report_md_has_every_family_and_row(quick):
    text = (quick / "report.md").read_text()
    for title in ("## SRe²L (sre2l)", "## DWA (dwa)", "## DM (dm)", "## MTT (mtt)", "## All families"):
        assert title in text
    for label in ROWS:
        assert text.count(label) >= 4  # in every family's table
    assert "What this run says" in text and "beyond seed noise (paired t over synthesis seeds" in text


def test_quick_report_json(quick):
    doc = json.loads((quick / "report.json").read_text())
    assert {"settings", "rows", "families", "comparisons", "verdict", "teacher", "timings_s", "mtt_experts"} <= set(doc)
    assert [(r["family"], r["set"]) for r in doc["rows"]] == [(f, label) for f in FAMILY_ORDER for label in ROWS]
    assert list(doc["families"]) == FAMILY_ORDER
    assert doc["teacher"]["test_accuracy_pct"] > 95
    for row in doc["rows"]:
        assert row["ipc"] == 10 and row["images"] == 100 and row["synthesis_seeds"] == 2
        acc = row["accuracy_pct"]
        assert len(acc["runs"]) == 2 and 0 <= acc["mean"] <= 100 and acc["std"] >= 0  # 2 seeds x 1 student
        assert len(row["by_synthesis_seed"]["coverage"]) == 2
        assert 0 <= row["coverage"] <= 1
        assert 1 <= row["vendi_per_class"] <= 10
        assert -1 <= row["intra_class_cosine"] <= 1
        assert set(row["per_class"]["intra_class_cosine"]) == {str(c) for c in range(10)}
        if not row["reference"]:
            assert len(row["commands"]) == 2 and len(row["cpu_seconds_per_iteration"]) == 2
    # Each family's DiRe rows are compared with its own vanilla, by the paired test over seeds.
    assert [(c["family"], c["set"]) for c in doc["comparisons"]] == [(f, label) for f in FAMILY_ORDER for label in ROWS[2:]]
    for c in doc["comparisons"]:
        assert c["versus"] == "vanilla" and c["synthesis_seeds"] == 2
        assert set(c["accuracy_test"]) == {"mean_difference", "std", "n", "t", "p", "beyond_seed_noise"}
    assert doc["verdict"][-1].startswith("Over the 8 DiRe-vs-vanilla comparisons of this run")
    # The learnt syn_lr of every MTT set is what its students trained at.
    mtt = [r for r in doc["rows"] if r["family"] == "mtt" and not r["reference"]]
    assert all(len(r["syn_lr"]) == 2 and all(v > 0 for v in r["syn_lr"]) for r in mtt)


def _manifests(quick, family):
    doc = json.loads((quick / "report.json").read_text())
    rows = [r for r in doc["rows"] if r["family"] == family and r["dire"]]
    return [(row, json.loads(Path(path).read_text())) for row in rows for path in row["dire_manifests"]]


@pytest.mark.parametrize("family", FAMILY_ORDER)
def test_each_family_goes_through_its_real_patch_capture(quick, family):
    """Every DiRe run of a family was patched by the family's demo patch, whose capture is the real
    patch's (family and options), and its counters say the term reached every synthesis step."""
    from dire_plugin.hooks.registry import load_method

    demo_patch, real_patch = load_method(FAMILIES[family].method), load_method(family)
    found = _manifests(quick, family)
    assert len(found) == 4  # two DiRe variants x two synthesis seeds
    steps = ITERATIONS * (10 if family in ("sre2l", "dwa") else 1)  # per ipc index (IPC 10), or in all
    for row, manifest in found:
        assert manifest["method"] == FAMILIES[family].method == demo_patch.METHOD
        assert manifest["status"] == "finished"
        assert manifest["capture"]["family"] == real_patch.CAPTURE["capture"]
        assert manifest["terms_added"] == manifest["synthesis_steps"] == steps
        assert manifest["gradient_share"]["steps_measured"] >= 1
        capture = manifest["capture"]
        if family == "dwa":  # DWA's "auto" route: perturbation passes untouched, later steps shared
            assert capture["teacher_grads"] == "auto" and capture["routes"]["shared"] > 0
            assert capture["terms_discarded"] > 0  # the iteration-0 perturbation passes
        elif family == "sre2l":
            assert capture["routes"] == {"shared": steps, "untouched": 0}
        elif family == "dm":  # one real and one synthetic embed call per class and iteration, no bank
            assert capture["synthetic_calls"] == capture["real_calls"] == 10 * steps
            assert capture["synthetic_rows"] == 100 * steps and manifest["bank"] is None
        else:  # MTT: one extra forward per image step, labels read beside image_syn, a trained expert
            assert capture["extra_forward"]["steps"] == capture["labels_checked"] == steps
            assert capture["extractor"]["epochs_recorded"] == 11
        if row["key"] == SHARED.key:
            assert manifest["config"]["share"] == SHARED.share and manifest["gradient_share"]["calibration"]["done"]
        else:  # no weight flag: the real patch's default weights
            assert {k: manifest["config"][k] for k in ("share",)} == {"share": real_patch.DEFAULT_WEIGHTS.share}
            if real_patch.DEFAULT_WEIGHTS.share is None:
                assert (manifest["config"]["r_c"], manifest["config"]["r_e"]) == (
                    real_patch.DEFAULT_WEIGHTS.r_c, real_patch.DEFAULT_WEIGHTS.r_e)


def test_demo_patches_declare_their_real_patch_capture_and_weights():
    from dire_plugin.hooks.registry import INTERNAL_METHODS, load_method

    assert set(INTERNAL_METHODS) == {f.method for f in FAMILIES.values()}
    for name, family in FAMILIES.items():
        demo_patch, real_patch = load_method(family.method), load_method(name)
        expected = dict(real_patch.CAPTURE, **({"datasets": ("digits",)} if name == "mtt" else {}))
        assert demo_patch.CAPTURE == expected
        assert demo_patch.DEFAULT_WEIGHTS is real_patch.DEFAULT_WEIGHTS
        assert not demo_patch.PINNED and list(demo_patch.SCRIPTS) == [family.script]
        # Targets are declared as the real patch's are: the scripts' siblings the capture wraps or checks.
        modules = {t.module for t in demo_patch.TARGETS if t.module}
        assert modules == {t.module for t in real_patch.TARGETS if t.module} & modules


def test_quick_vanilla_runs_wrote_no_manifest_and_every_family_its_files(quick):
    synthetic = quick / "synthetic"
    assert (synthetic / "sre2l" / "ipc10" / "vanilla" / "seed0" / "new009" / "class009_id009.png").is_file()
    assert (synthetic / "dwa" / "ipc10" / "vanilla" / "seed0" / "new009" / "class009_id009.png").is_file()
    assert (synthetic / "dm" / "ipc10" / "vanilla" / "seed0" / "res_DM_digits_ConvNet_10ipc.pt").is_file()
    mtt = synthetic / "mtt" / "ipc10" / "vanilla" / "seed0" / "logged_files" / "digits" / "demo"
    assert (mtt / f"images_{ITERATIONS}.pt").is_file() and (mtt / f"learning_rate_{ITERATIONS}.pt").is_file()
    assert not list(synthetic.glob("*/ipc10/vanilla/**/dire_manifest.json"))
    assert len(list(synthetic.glob("*/ipc10/dire_*/**/dire_manifest.json"))) == 16


def test_dwa_starts_from_the_reference_images(quick):
    from dire_plugin.demo.data import load_data, real_subset

    data = load_data("digits", None, quick.parent / "cache")
    images, _ = real_subset(data, 10, seed=1)
    for i in (0, 9):
        init = torch.load(quick / "synthetic" / "dwa-init" / "ipc10" / "seed1" / f"tensor_{i}.pt", weights_only=True)
        assert torch.equal(init, images.view(10, 10, 3, 8, 8)[:, i])


def test_quick_figures_open(quick):
    pytest.importorskip("matplotlib")
    names = [f"{fig}_{family}_ipc10" for family in FAMILY_ORDER for fig in ("embeddings", "intra_class_cosine", "images")]
    for name in names + ["gradient_share"]:
        with Image.open(quick / f"{name}.png") as img:
            img.verify()
            assert img.size[0] > 200 and img.size[1] > 100
    doc = json.loads((quick / "report.json").read_text())
    assert sorted(doc["figures"]) == sorted(names + ["gradient_share"])


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
    job = SynthJob("sre2l", DEFAULT, ipc=2, seed=0, iterations=5)
    (tmp_path / "dire_manifest.json").write_text(json.dumps({"method": "demo", "terms_added": 9, "synthesis_steps": 10}))
    with pytest.raises(DemoRunError, match="added to 9 of 10 synthesis steps, expected 10"):
        _check_manifest(job, tmp_path, tmp_path / "log")
    (tmp_path / "dire_manifest.json").write_text(json.dumps({"method": "demo-dm", "terms_added": 10, "synthesis_steps": 10}))
    with pytest.raises(DemoRunError, match="written by the 'demo-dm' patch, expected 'demo'"):
        _check_manifest(job, tmp_path, tmp_path / "log")
    (tmp_path / "dire_manifest.json").write_text(json.dumps({"method": "demo", "terms_added": 10, "synthesis_steps": 10}))
    assert _check_manifest(job, tmp_path, tmp_path / "log")["terms_added"] == 10
    assert not VANILLA.dire and DEFAULT.dire and SHARED.dire
    assert DEFAULT.launcher_flags() == [] and SHARED.launcher_flags() == ["--share", "0.4"]


@pytest.mark.parametrize("argv, message", [
    (["demo", "--dataset", "cifar10"], "needs --data-path"),
    (["demo", "--data-path", "/tmp"], "goes with --dataset cifar10/cifar100"),
    (["demo", "--dataset", "cifar100", "--data-path", "/nonexistent/cifar"], "does not exist"),
    (["demo", "--dataset", "nope"], "invalid choice"),
    (["demo", "--method", "nope"], "argument --method: invalid choice: 'nope'"),
    (["demo", "--method", "dm", "--ablation"], "--ablation runs the sre2l family only"),
    (["demo", "--method", "all", "--dataset", "cifar10", "--data-path", "/tmp"], "--dataset cifar10 runs the sre2l family only"),
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


def _row(key, accs, coverage, vendi, cosine, dire=True, family="dm"):
    """A row of 3 synthesis seeds (metrics: one value each) with 2 students per seed."""
    from dire_plugin.demo.tables import ReportRow

    return ReportRow(10, key, key, 100, accs, coverage, vendi, cosine, [3.0] * 3, family=family, dire=dire)


def test_verdict_tests_each_metric_over_synthesis_seeds():
    from dire_plugin.demo.tables import verdict

    base = _row("vanilla", [90.0, 91.0, 92.0, 91.0, 90.0, 92.0], [0.10, 0.11, 0.10], [1.5, 1.5, 1.6], [0.90, 0.91, 0.90], dire=False)
    # Accuracy up by 3.25, 2.5 and 3 points in the three seeds; coverage down by varying amounts; Vendi both ways.
    dire = _row("dire", [93.0, 94.5, 95.0, 93.0, 93.5, 94.5], [0.05, 0.09, 0.02], [1.6, 1.4, 1.6], [0.90, 0.91, 0.90])
    sentences, (c,) = verdict([base, dire])
    assert c["accuracy_test"]["n"] == 3 and c["accuracy_test"]["mean_difference"] == pytest.approx((3.25 + 2.5 + 3.0) / 3, abs=1e-6)
    assert c["accuracy_test"]["beyond_seed_noise"] and c["accuracy_test"]["p"] < 0.05
    assert c["accuracy_paired_wins"] == 6 and c["accuracy_pairs"] == 6
    assert not c["vendi_per_class_test"]["beyond_seed_noise"]
    assert c["intra_class_cosine_test"] == {"mean_difference": 0.0, "std": 0.0, "n": 3, "t": 0.0, "p": 1.0,
                                            "beyond_seed_noise": False}
    assert "dm, IPC 10, dire vs vanilla: accuracy" in sentences[0] and "beyond seed noise; better in 6 of 6" in sentences[0]
    assert "coverage 0.053 vs 0.103 (p = " in sentences[0] and "within seed noise): not improved" in sentences[0]
    assert sentences[-1].startswith("Over the 1 DiRe-vs-vanilla comparisons of this run, beyond seed noise")
    assert "accuracy better in 1 and worse in 0" in sentences[-1]


def test_the_verdict_compares_within_a_family_only():
    from dire_plugin.demo.tables import verdict

    runs = ([90.0] * 6, [0.1] * 3, [1.5] * 3, [0.9] * 3)
    rows = [_row("vanilla", *runs, dire=False, family="dm"), _row("dire", *runs, family="dm"),
            _row("vanilla", *runs, dire=False, family="mtt"), _row("dire", *runs, family="mtt")]
    _, comparisons = verdict(rows)
    assert [(c["family"], c["set"], c["versus"]) for c in comparisons] == [("dm", "dire", "vanilla"), ("mtt", "dire", "vanilla")]


def test_paired_t_matches_scipy_and_refuses_a_tie():
    stats = pytest.importorskip("scipy.stats")
    from dire_plugin.demo.stats import paired_t, t_two_sided_p

    rng = torch.Generator().manual_seed(0)
    for n in (2, 3, 5, 12):
        diffs = (torch.randn(n, generator=rng) + 0.4).tolist()
        ours, theirs = paired_t(diffs), stats.ttest_1samp(diffs, 0.0)
        assert ours.t == pytest.approx(theirs.statistic, rel=1e-9) and ours.p == pytest.approx(theirs.pvalue, rel=1e-7)
    assert t_two_sided_p(4.302652729911275, 2) == pytest.approx(0.05, abs=1e-9)  # the t table's 2-df critical value
    assert paired_t([1.5]).p is None and paired_t([1.5]).beyond_noise is None  # one seed: no test
    assert paired_t([0.2, 0.2, 0.2]).p is None  # the same difference in every seed: t undefined, no claim
    assert paired_t([0.0, 0.0]).p == 1.0


def test_a_failed_recover_run_is_one_line_naming_its_log(tmp_path):
    from dire_plugin.demo.synth import SynthContext, run_synthesis

    ctx = SynthContext(teacher=tmp_path / "missing.pt", real_data=tmp_path, bank_cache=tmp_path, out=tmp_path / "syn")
    job = SynthJob("sre2l", VANILLA, ipc=2, seed=0, iterations=1)
    with pytest.raises(DemoRunError) as err:
        run_synthesis([job], ctx, parallel=1, log_dir=tmp_path / "logs", progress=False)
    message = str(err.value)
    assert "sre2l/ipc2/vanilla/seed0: recover.py exited with 1: FileNotFoundError" in message and "\n" not in message
    assert str(tmp_path / "logs" / "sre2l_ipc2_vanilla_seed0.log") in message


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
            "--student-steps", "2", "--seeds", "1", "--syn-seeds", "1", "--teacher-epochs", "1", "--no-plots",
            "--no-progress", "--device", "cpu", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    doc = json.loads((out / "report.json").read_text())
    assert doc["title"] == "DiRe demo: SRe²L ± DiRe on CIFAR10" and doc["settings"]["families"] == "sre2l"
    assert doc["teacher"]["settings"]["arch"] == "resnet18" and doc["teacher"]["settings"]["dataset"] == "cifar10"
    assert "cifar10 ImageFolders" in doc["settings"]["data"] and doc["settings"]["device"] == "cpu"
    assert [r["set"] for r in doc["rows"]] == ROWS
    for row in doc["rows"]:
        assert row["images"] == 20 and len(row["accuracy_pct"]["runs"]) == 1
    for row in doc["rows"][2:]:
        manifest = json.loads(Path(row["dire_manifests"][0]).read_text())
        assert manifest["terms_added"] == manifest["synthesis_steps"] == 2 * 2
        assert manifest["bank"]["classes"] == 10
    assert "one synthesis seed: no test" in doc["verdict"][0]
    synthetic = torch.load(out / "synthetic" / "sre2l" / "ipc2" / "vanilla" / "seed0" / "synthetic.pt", weights_only=True)
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
    job = SynthJob("sre2l", VANILLA, ipc=2, seed=0, iterations=1)
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
    job = SynthJob("sre2l", DEFAULT, ipc=2, seed=0, iterations=5)
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


def test_a_cached_folder_of_nested_files_is_reused_and_rebuilt_when_touched(tmp_path, capsys):
    """The expert buffer's folder (``digits/ConvNet/replay_buffer_0.pt``) through the same checked
    cache as the image folder: reused as written, rebuilt when anything in it changed."""
    from dire_plugin.demo.cache import cached_folder

    written = []

    def write(folder):
        written.append(folder)
        (folder / "digits" / "ConvNet").mkdir(parents=True)
        (folder / "digits" / "ConvNet" / "replay_buffer_0.pt").write_bytes(b"trajectories")

    root = tmp_path / "experts"
    assert cached_folder(root, "settings A", write, "expert cache") == (root, False)
    assert cached_folder(root, "settings A", write, "expert cache") == (root, True) and len(written) == 1
    capsys.readouterr()
    for damage, said in (("stray folder", "holds digits/stray"), ("other settings", "other data or settings"),
                         ("damaged file", "damaged digits/ConvNet/replay_buffer_0.pt")):
        source = "settings B" if damage == "other settings" else "settings A"
        if damage == "stray folder":
            (root / "digits" / "stray").mkdir()
        elif damage == "damaged file":
            (root / "digits" / "ConvNet" / "replay_buffer_0.pt").write_bytes(b"trajectorie5")
        assert cached_folder(root, source, write, "expert cache") == (root, False)
        (warning,) = _warnings(capsys.readouterr().err)
        assert f"expert cache {root}" in warning and said in warning and "rebuilding" in warning
        if damage == "other settings":
            cached_folder(root, "settings A", write, "expert cache")
            capsys.readouterr()
    assert [p.name for p in tmp_path.iterdir()] == ["experts"]  # no temporary folder left behind
