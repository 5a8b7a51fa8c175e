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
             "--ipc-end", "2", "--iteration", "4", "--seed", str(seed), "--threads", "1", "--print-every", "0"],
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
    (["demo", "--dataset", "cifar10"], "not supported yet"),
    (["demo", "--ipc", "1"], "images per class"),
    (["demo", "--seeds", "0"], "not a positive integer"),
    ([], "choose a command"),
])
def test_bad_input_is_one_line_exit_2(argv, message, capsys):
    assert main(argv) == 2
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
