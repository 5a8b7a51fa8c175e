"""The G-VBSM patch (``patches/gvbsm.py``) end to end, offline, on a look-alike of its recover
script (tests/fixtures/gvbsm_like: ours, not G-VBSM's code): three teachers of different widths in
rotation, ``mp.spawn`` with two gloo workers (the CPU shim counts two devices and maps NCCL to
gloo), each class-major batch split across them.

Every step of every worker is recomputed by hand: the images get exactly the method's gradient
plus DiRe's gradient of that step's teacher (its own bank, its own memory of the finished batch,
on the union of both workers' images). DIRE_DISABLE is bit-identical to vanilla, and workers that
disagree on a step's teacher end the job with one line.
"""
import json
import os
import runpy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dire_plugin import DiReLoss, EmbeddingCapture, RealEmbeddingBank, SyntheticMemory
from dire_plugin.embeddings.realdata import real_data_loader
from dire_plugin.hooks.registry import load_method
from lookalike import build_checkout, run_lookalike, write_image_folder, write_lock

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "gvbsm_like"
URL = "https://github.com/shaoshitong/G_VBSM_Dataset_Condensation"
SCRIPT = "Branch_CIFAR_10/recover/data_synthesis_with_svd_with_db_with_all_statistic.py"
GVBSM = load_method("gvbsm")
R_C, R_E, R_BN = 0.5, 0.05, 0.01
WORKERS = {"DIRE_SHIM_DEVICES": "2", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("gvbsm")
    root = base / "G_VBSM_Dataset_Condensation"
    files = {str(p.relative_to(FIXTURE)): p.read_text() for p in FIXTURE.rglob("*.py")}
    head = build_checkout(root, GVBSM, URL, files)
    lock = write_lock(base / "lock.toml", root, GVBSM, URL, head)
    data = write_image_folder(base / "real", 10, per_class=2, size=32)
    return {"base": base, "root": root, "lock": lock, "data": data}


def _run(world, name, mode="dire", env=(), args=()):
    out = world["base"] / name
    script = world["root"] / SCRIPT
    run = run_lookalike("gvbsm", script, ["--syn-data-path", str(out), "--record-path", str(out), "--dist-url",
                                          f"file://{out}/process-group", *args], mode, world=world, cwd=script.parent,
                        dire_flags=["--r-c", str(R_C), "--r-e", str(R_E)], extra_env={**WORKERS, **dict(env)})
    return run, out


@pytest.fixture(scope="module")
def dire_run(world):
    run, out = _run(world, "dire")
    assert run.returncode == 0, run.stderr[-4000:]
    return out


def _lookalike():
    """The look-alike's own functions (its teachers, jitter and BN prior), for the hand reference."""
    before = sys.modules.pop("utils", None)
    sys.path.insert(0, str(FIXTURE / "Branch_CIFAR_10" / "recover"))
    try:
        return runpy.run_path(str(FIXTURE / SCRIPT), run_name="gvbsm_like")
    finally:
        sys.path.pop(0)
        sys.modules.pop("utils", None)
        if before is not None:
            sys.modules["utils"] = before


def _records(out):
    return [torch.load(out / f"record_rank{r}.pt") for r in range(2)]


def test_workers_run_the_term_of_each_steps_teacher_and_one_manifest(dire_run):
    manifest = json.loads((dire_run / "test" / "dire_manifest.json").read_text())
    # 20 images, batches of 10 split over 2 workers, 3 iterations per batch: 6 steps per worker.
    assert manifest["ranks"] == [{"rank": r, "steps": 6, "terms_added": 6, "computed": 6} for r in range(2)]
    assert (manifest["synthesis_steps"], manifest["terms_added"]) == (12, 12)
    teachers = manifest["teachers"]
    assert [t["bank"]["dim"] for t in teachers] == [16, 8, 24]  # each teacher's own width, in rotation order
    assert len({t["key"] for t in teachers}) == 3 and manifest["bank"] is None
    # Each teacher classified 2 steps on each worker; each holds the finished first batch (both workers' 10).
    assert [(t["terms_added"], t["terms_computed"], t["memory_embeddings"]) for t in teachers] == [(4, 4, 10)] * 3
    assert manifest["gradient_share"]["steps_measured"] == 5
    assert len(list(dire_run.rglob("*.png"))) == 20
    assert [m.name for m in dire_run.rglob("*manifest*.json")] == ["dire_manifest.json"]


def test_each_step_gets_the_method_gradient_plus_dire_of_its_teacher(world, dire_run):
    like = _lookalike()
    teachers = [like["build_teacher"](width, seed) for seed, width in enumerate(like["WIDTHS"])]
    for t in teachers:
        t.eval().requires_grad_(False)
    hooks = [[like["BNFeatureHook"](m) for m in t.modules() if isinstance(m, nn.BatchNorm2d)] for t in teachers]
    manifest = json.loads((dire_run / "test" / "dire_manifest.json").read_text())
    banks = []
    loader, _, _ = real_data_loader(world["data"], GVBSM.SCRIPTS[SCRIPT].real_data, 10)
    for t, summary in zip(teachers, manifest["teachers"]):
        state = torch.load(world["base"] / "cache" / f"bank-{summary['key']}.pt")
        bank = RealEmbeddingBank(state["embeddings"], state["classes"], state["counts"])
        # The bank of the key is this teacher's view of the real data.
        mine = RealEmbeddingBank.build(t, loader, progress=False)
        torch.testing.assert_close(bank._flat, mine._flat, rtol=1e-5, atol=1e-6)
        banks.append(bank)
    records = _records(dire_run)
    memories = [None] * 3
    checked = 0
    for step in range(6):
        pair = [records[r][step] for r in range(2)]
        counter, k = pair[0]["counter"], pair[0]["teacher"]
        assert [p["teacher"] for p in pair] == [k, k] and k == counter % 3
        xs = [p["inputs"].clone().requires_grad_() for p in pair]
        vanilla, embs = [], []
        for x, p in zip(xs, pair):
            with EmbeddingCapture(teachers[k]) as cap:
                outputs = teachers[k](torch.roll(x, shifts=like["shifts"](counter), dims=(2, 3)))
                loss = nn.CrossEntropyLoss()(outputs, p["targets"]) + R_BN * sum(h.r_feature for h in hooks[k])
            vanilla.append(torch.autograd.grad(loss, x, retain_graph=True)[0])
            embs.append(cap.embeddings)
        labels = torch.cat([p["targets"] for p in pair])
        dire = DiReLoss(r_c=R_C, r_e=R_E)(torch.cat(embs), labels, banks[k], memory=memories[k] if step >= 3 else None)
        g_dire = torch.autograd.grad(dire, xs)
        assert g_dire[0].abs().sum() > 0 and g_dire[1].abs().sum() > 0  # each worker's rows, the other's too
        for r in range(2):
            torch.testing.assert_close(pair[r]["grad"], vanilla[r] + g_dire[r], rtol=1e-4, atol=1e-6)
            checked += 1
        if step < 3:  # the first batch's last pass through this teacher: its memory for the second
            memories[k] = SyntheticMemory()
            memories[k].add(torch.cat(embs).detach(), labels)
    assert checked == 12


def test_dire_disable_is_bit_identical_to_vanilla(world, dire_run):
    vanilla, out_v = _run(world, "vanilla", mode="vanilla")
    off, out_off = _run(world, "off", env={"DIRE_DISABLE": "1"})
    assert vanilla.returncode == 0 and off.returncode == 0, (vanilla.stderr[-3000:], off.stderr[-3000:])
    assert "[dire] DIRE_DISABLE=1: gvbsm runs vanilla" in off.stderr
    for r, (a, b, d) in enumerate(zip(_records(out_v), _records(out_off), _records(dire_run))):
        assert all(torch.equal(x["grad"], y["grad"]) and torch.equal(x["inputs"], y["inputs"]) for x, y in zip(a, b))
        assert not torch.equal(a[-1]["grad"], d[-1]["grad"])  # DiRe does change the images
    images = sorted(p.relative_to(out_v) for p in out_v.rglob("*.png"))
    assert len(images) == 20 and images == sorted(p.relative_to(out_off) for p in out_off.rglob("*.png"))
    assert all((out_v / p).read_bytes() == (out_off / p).read_bytes() for p in images)
    assert not list(out_off.rglob("*manifest*"))


def test_workers_that_disagree_on_a_steps_teacher_end_the_job_with_one_line(world, dire_run):
    # From step 4 on worker 1 classifies with the next teacher: the union would mix two networks.
    run, out = _run(world, "skewed", args=["--skew-after", "3"], env={"DIRE_DIST_TIMEOUT": "60"})
    assert run.returncode == 2, run.stderr[-3000:]
    ours = [line for line in run.stderr.splitlines() if line.startswith("dire-run")]
    assert len(ours) == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert ours[0].startswith("dire-run: error: worker ")
    assert ' of 2: the ranks classify synthesis step 4 with different teachers: teacher (rank 0: "Sequential ' in ours[0]
    # The manifest the failing worker wrote, with the error and its counts (3 steps each).
    manifest = json.loads(Path(ours[0].rsplit("manifest of this run: ", 1)[1].rstrip(")")).read_text())
    assert manifest["status"] == "failed" and "different teachers" in manifest["error"]
    assert manifest["synthesis_steps"] == 6
    assert len(list(out.rglob("*.png"))) == 10  # the first batch, finished before the skew


def test_the_upstream_command_after_dire_apply_reaches_the_workers(world, tmp_path, monkeypatch):
    # What a user does: dire-apply, then the upstream's own command from its folder. The parent is
    # activated by the .pth line; the spawned workers, fresh interpreters, by the spawn prelude.
    import subprocess

    from dire_plugin.activation.applied import ENV_SITE_DIR
    from dire_plugin.cli.apply import main as dire_apply
    from dire_plugin.upstream.lockfile import ENV_LOCK
    from envs import build_wheel, child_venv, site_packages

    py = child_venv(tmp_path / "venv", build_wheel(tmp_path))
    monkeypatch.setenv(ENV_LOCK, str(world["lock"]))
    monkeypatch.setenv(ENV_SITE_DIR, str(site_packages(py)))
    root, out = world["root"], tmp_path / "out"
    assert dire_apply(["gvbsm", str(root), "--real-data", str(world["data"]), "--r-c", str(R_C), "--r-e", str(R_E),
                       "--cache-dir", str(tmp_path / "cache")]) == 0
    try:
        script = root / SCRIPT
        env = {k: v for k, v in os.environ.items() if not k.startswith("DIRE_")}
        env.update(WORKERS, DIRE_CPU_SHIM="1", DIRE_UPSTREAM_LOCK=str(world["lock"]), PYTHONDONTWRITEBYTECODE="1")
        run = subprocess.run([str(py), script.name, "--syn-data-path", str(out), "--record-path", str(out),
                              "--dist-url", f"file://{out}/process-group"], cwd=script.parent, env=env,
                             capture_output=True, text=True, timeout=300)
    finally:
        assert dire_apply(["--remove", "gvbsm", str(root)]) == 0
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("[dire] gvbsm patch active") >= 3  # the parent and both workers
    manifest = json.loads((out / "test" / "dire_manifest.json").read_text())
    assert (manifest["synthesis_steps"], manifest["terms_added"], len(manifest["teachers"])) == (12, 12, 3)
    assert manifest["upstream_commit"]  # pinned: the applied checkout's settings
