"""DiRe under torch.distributed, on CPU with gloo: each rank's images get the gradient one process
holding every rank's images would give them; a bank built on two ranks is the bank one process
builds; a rank that fails stops the others with a clear error, not a hang; and a look-alike of
SRe²L's multi-GPU recover script runs under torchrun with DiRe and writes one manifest."""
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import dist_workers as W
from dire_plugin import DiReLoss
from dire_plugin.hooks.registry import load_method
from lookalike import build_checkout, write_image_folder, write_lock

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def test_each_rank_gets_the_single_process_gradient_of_the_union(tmp_path):
    assert W.start(2, W.union_gradient, str(tmp_path)) == [0, 0]
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    union = torch.cat([W.rows(seed=r, n=3 + r)[0] for r in range(2)])
    labels = torch.cat([W.rows(seed=r, n=3 + r)[1] for r in range(2)])
    assert torch.equal(got[0]["union"], union) and torch.equal(got[1]["labels"], labels)
    x = union.clone().requires_grad_()
    (expected,) = torch.autograd.grad(DiReLoss(r_c=0.5, r_e=0.05)(x, labels, W.bank()), x)
    torch.testing.assert_close(got[0]["grad"], expected[:3], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got[1]["grad"], expected[3:], rtol=1e-5, atol=1e-7)
    # The other rank's images matter: alone, a rank's own rows would get another gradient.
    own = union[:3].clone().requires_grad_()
    (alone,) = torch.autograd.grad(DiReLoss(r_c=0.5, r_e=0.05)(own, labels[:3], W.bank()), own)
    assert not torch.allclose(alone, expected[:3])


def test_a_bank_built_on_two_ranks_is_the_one_process_bank(tmp_path):
    from dire_plugin import RealEmbeddingBank

    data, model = W.bank_data()
    single = RealEmbeddingBank.build(model, torch.utils.data.DataLoader(data, batch_size=7), dataset_id="t",
                                     progress=False)
    assert W.start(2, W.sharded_bank, str(tmp_path)) == [0, 0]
    for r in range(2):
        got = torch.load(tmp_path / f"bank{r}.pt")
        assert torch.equal(got["embeddings"], single._flat)
        assert torch.equal(got["classes"], single._classes) and torch.equal(got["counts"], single._counts)
        assert got["fingerprint"] == single.fingerprint and not got["hit"]
    assert len(list((tmp_path / "cache").glob("bank-*.pt"))) == 1  # one rank wrote it
    # Built again on two ranks: both load the cache.
    assert W.start(2, W.sharded_bank, str(tmp_path)) == [0, 0]
    assert all(torch.load(tmp_path / f"bank{r}.pt")["hit"] for r in range(2))


def test_a_failing_rank_stops_the_others_with_a_clear_error(tmp_path):
    codes = W.start(2, W.one_rank_fails, str(tmp_path), env={"DIRE_DIST_TIMEOUT": "5"}, timeout=120)
    assert codes[1] != 0 and codes[0] is not None  # nobody hangs
    elapsed, message = (tmp_path / "rank0.txt").read_text().split("\n", 1)
    assert float(elapsed) < 60
    assert "rank 0: rank 1 did not join the exchange of the DiRe settings within 5 s" in message
    assert "DIRE_DIST_TIMEOUT" in message


def test_a_stopped_rank_ends_the_others_with_the_first_failure_and_no_teardown(tmp_path):
    codes = W.start(2, W.rank_stops_after_one_step, str(tmp_path), env={"DIRE_DIST_TIMEOUT": "2"}, timeout=120)
    assert codes == [0, 0], [(tmp_path / f"error{r}.txt").read_text() for r in range(2)
                             if (tmp_path / f"error{r}.txt").exists()]
    seen = json.loads((tmp_path / "rank0.json").read_text())
    assert seen["step"].startswith("rank 0: rank 1 did not join the exchange of the synthetic embeddings of "
                                   "synthesis step 2 within 2 s")
    # No exchange after the first failure (not even the counters at the end), and no teardown,
    # which would wait for the exchange rank 1 never joins: the first failure, at once.
    assert seen["again_same"] and seen["raised_same"] and seen["failure_kept"]
    assert seen["in_flight_returns"] is None and seen["teardowns"] == 0
    assert seen["later_s"] < 1.5


def test_a_rank_that_finished_early_stops_the_others_with_one_line(tmp_path):
    # Its last exchange meets the others' next step: without the flag they would wait for
    # embeddings it never sends, or read its counters as a step's.
    assert W.start(2, W.one_rank_finishes_early, str(tmp_path), env={"DIRE_DIST_TIMEOUT": "30"}) == [0, 0]
    assert (tmp_path / "rank0.txt").read_text().startswith(
        "the ranks no longer synthesise together: rank 1 finished while the others are at synthesis step 2 ")


def test_ranks_with_different_settings_stop_with_one_line_naming_them(tmp_path):
    assert W.start(2, W.settings_differ, str(tmp_path)) == [0, 0]
    for r in range(2):
        message = (tmp_path / f"rank{r}.txt").read_text()
        # Node-local folders and logging may differ between ranks: only the weight is named.
        assert message == ("the ranks run DiRe with different settings: r_c (rank 0: 0.5; rank 1: 0.25); "
                           "give every rank the same ones")
        assert (tmp_path / f"again{r}.txt").exists()  # checked once, not every step


def _image_copies(tmp_path, mode):
    import shutil

    write_image_folder(tmp_path / "data0", 3, per_class=3, size=8)
    shutil.copytree(tmp_path / "data0", tmp_path / "data1")  # copy2: sizes and times kept, as cp -a does
    if mode in ("one-image-less", "size-only"):
        (tmp_path / "data1" / "class_001" / "img_2.png").unlink()


@pytest.mark.parametrize("mode, named", [
    ("one-image-less", ["the real data (fingerprint", "the number of real images (rank 0: 9; rank 1: 8)",
                        'rank 0: "t:9:', 'rank 1: "t:8:']),
    ("size-only", ["the number of real images (rank 0: 9; rank 1: 8)"]),
    ("weights", ["the teacher's weights (bank keys) (rank 0: "]),
])
def test_ranks_with_different_real_data_or_teachers_stop_before_building(tmp_path, mode, named):
    _image_copies(tmp_path, mode)
    assert W.start(2, W.bank_data_differs, str(tmp_path), mode) == [0, 0]
    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert messages[0] == messages[1] and "\n" not in messages[0]
    assert messages[0].startswith("the ranks would build different real-embedding banks: ")
    for words in named:
        assert words in messages[0]
    if mode != "one-image-less":
        assert "the real data (fingerprint" not in messages[0]
    # Nothing was built or cached: not the mixture under rank 0's key.
    assert [(tmp_path / f"cached{r}.txt").read_text() for r in range(2)] == ["0", "0"]
    assert not list(tmp_path.glob("bank*.pt"))


def test_identical_copies_of_the_data_at_different_paths_build_one_bank(tmp_path):
    _image_copies(tmp_path, "same")
    assert W.start(2, W.bank_data_differs, str(tmp_path), "same") == [0, 0]
    banks = [torch.load(tmp_path / f"bank{r}.pt") for r in range(2)]
    assert torch.equal(banks[0]["embeddings"], banks[1]["embeddings"]) and banks[0]["embeddings"].shape[0] == 9
    assert banks[0]["fingerprint"] == banks[1]["fingerprint"]
    assert [(tmp_path / f"cached{r}.txt").read_text() for r in range(2)] == ["1", "0"]  # rank 0 writes it


# --- torchrun, end to end -------------------------------------------------------------------------------

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "sre2l_multigpu_like"
SCRIPT = "SRe2L/recover/multi_gpu/data_synthesis.py"
SRE2L = load_method("sre2l")


@pytest.mark.parametrize("value", ["soon", "nan", "inf", "0", "-5"])
def test_a_bad_exchange_timeout_is_one_line(monkeypatch, value):
    from dire_plugin.embeddings.collectives import ENV_TIMEOUT, exchange_timeout
    from dire_plugin.errors import DiReInputError

    monkeypatch.setenv(ENV_TIMEOUT, value)
    with pytest.raises(DiReInputError, match=f"{ENV_TIMEOUT}='{value}' is not a number of seconds"):
        exchange_timeout()


#: Run by torchrun in place of ``-m dire_plugin.cli.run``: each rank prepends its own dire-run flags
#: (``RANK_FLAGS``, a JSON list per rank), as different nodes' command lines or data paths would.
#: Each rank's exit code goes to ``rank<R>.code`` beside this script.
RANKWISE = """import json, os, sys
from pathlib import Path
from dire_plugin.cli.run import main
args, rank = sys.argv[1:], os.environ["RANK"]
cut = args.index("--")
code = main(args[:cut] + json.loads(os.environ["RANK_FLAGS"])[int(rank)] + args[cut:])
(Path(__file__).parent / f"rank{rank}.code").write_text(str(code))
sys.exit(code)
"""


def torchrun(tmp_path, iterations=2, flags=(), rank_flags=None, env=(), **popen):
    """The look-alike multi-GPU script under torchrun on 2 gloo ranks with DiRe (``dire-run``):
    the finished ``subprocess.run``, or with ``popen`` options the running ``Popen``."""
    root = tmp_path / "SRe2L"
    files = {str(p.relative_to(FIXTURE)): p.read_text() for p in FIXTURE.rglob("*.py")}
    head = build_checkout(root, SRE2L, "https://github.com/VILA-Lab/SRe2L", files)
    lock = write_lock(tmp_path / "lock.toml", root, SRE2L, "https://github.com/VILA-Lab/SRe2L", head)
    data = tmp_path / "real"
    if not data.exists():  # a test may have written it (and copies of it) first
        write_image_folder(data, 4, per_class=2, size=16)
    run = ["-m", "dire_plugin.cli.run"]
    if rank_flags is not None:
        (tmp_path / "rankwise.py").write_text(RANKWISE)
        run = [str(tmp_path / "rankwise.py")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *run,
           "--real-data", str(data), "--cache-dir", str(tmp_path / "cache"), *flags,
           "sre2l", str(root / SCRIPT), "--", "--num-classes", "4", "--ipc", "4", "--batch-size", "4",
           "--iteration", str(iterations), "--syn-data-path", str(tmp_path / "out"), "--exp-name", "t",
           "--dist-backend", "gloo"]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DIRE_")}
    environ.update(DIRE_CPU_SHIM="1", DIRE_UPSTREAM_LOCK=str(lock), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                   RANK_FLAGS=json.dumps(rank_flags), **dict(env))
    options = dict(cwd=root / "SRe2L/recover/multi_gpu", env=environ, text=True)
    if popen:
        return subprocess.Popen(cmd, **options, **popen)
    return subprocess.run(cmd, **options, capture_output=True, timeout=300)


def test_the_multi_gpu_script_under_torchrun_writes_one_manifest(tmp_path):
    run = torchrun(tmp_path)
    out = tmp_path / "out"
    assert run.returncode == 0, run.stderr[-3000:]
    manifests = sorted(out.rglob("*manifest*.json"))
    assert [m.name for m in manifests] == ["dire_manifest.json"]
    manifest = json.loads(manifests[0].read_text())
    # 16 items over 2 ranks in batches of 4: 2 batches x 2 iterations per rank.
    assert manifest["ranks"] == [{"rank": r, "steps": 4, "terms_added": 4, "computed": 4} for r in range(2)]
    assert (manifest["synthesis_steps"], manifest["terms_added"]) == (8, 8)
    assert manifest["memory_embeddings"] == 8  # both ranks' first batch, on every rank
    assert len(list(out.rglob("*.jpg"))) == 16


def _workers(job):
    """rank → pid of the workers torchrun ``job`` started."""
    out = {}
    for pid in Path(f"/proc/{job.pid}/task/{job.pid}/children").read_text().split():
        with contextlib.suppress(OSError):
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            out.update({int(e[5:]): int(pid) for e in env if e.startswith(b"RANK=")})
    return out


def _ended(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except OSError:
        return True


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds torchrun's workers through /proc")
def test_a_stopped_rank_ends_the_torchrun_job_with_one_line_not_a_hang(tmp_path):
    job = torchrun(tmp_path, iterations=500, flags=["--log-every", "1"], env={"DIRE_DIST_TIMEOUT": "3"},
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lines, stopped = [], threading.Event()
    workers = {}

    def read():
        for line in job.stderr:
            lines.append(line)
            if "[dire] step 1:" in line and not stopped.is_set():
                workers.update(_workers(job))
                os.kill(workers[1], signal.SIGSTOP)  # as kill -STOP does to a rank after its first step
                stopped.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert stopped.wait(120), "".join(lines)[-3000:]
        started = time.time()
        while not _ended(workers[0]) and time.time() - started < 60:
            time.sleep(0.2)
        elapsed = time.time() - started
        assert _ended(workers[0]), "rank 0 still runs a minute after rank 1 stopped:\n" + "".join(lines)[-3000:]
        # Rank 0 ended on its own; torchrun then ends the job, killing the stopped rank (after its
        # own 30 s grace period, which this test does not wait for).
        os.kill(workers[1], signal.SIGKILL)
        assert job.wait(60) != 0
    finally:
        for pid in (*workers.values(), job.pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        job.wait()
    assert elapsed < 30
    ours = [line for line in lines if line.startswith("dire-run") or "counters" in line]
    assert len(ours) == 1, ours
    # The first exchange after the stop: a step's embeddings, or its gradient share (steps 1-5 measure it).
    assert re.match(r"dire-run: error: rank 0: rank 1 did not join the exchange of (the synthetic embeddings|the "
                    r"gradient share) of synthesis step \d+ ", ours[0]), ours[0]
    assert "within 3 s" in ours[0] and "DIRE_DIST_TIMEOUT" in ours[0]


@pytest.mark.parametrize("differ", ["settings", "data"])
def test_ranks_that_differ_end_the_torchrun_job_with_one_line_and_exit_2(tmp_path, differ):
    import shutil

    data = write_image_folder(tmp_path / "real", 4, per_class=2, size=16)
    if differ == "settings":
        rank_flags = [["--r-c", "0.1"], ["--r-c", "0.2"]]
    else:  # rank 1's node-local copy of the data lost an image
        shutil.copytree(data, tmp_path / "real1")
        (tmp_path / "real1" / "class_002" / "img_1.png").unlink()
        rank_flags = [[], ["--real-data", str(tmp_path / "real1")]]
    run = torchrun(tmp_path, rank_flags=rank_flags)
    assert run.returncode != 0
    assert [(tmp_path / f"rank{r}.code").read_text() for r in range(2)] == ["2", "2"], run.stderr[-3000:]
    ours = [line for line in run.stderr.splitlines() if line.startswith("dire-run")]
    assert len(ours) == 2 and len({line.split(" (manifest of this run")[0] for line in ours}) == 1, ours
    if differ == "settings":
        assert ours[0].startswith("dire-run: error: the ranks run DiRe with different settings: "
                                  "r_c (rank 0: 0.1; rank 1: 0.2); give every rank the same ones")
    else:
        assert ours[0].startswith("dire-run: error: the ranks would build different real-embedding banks: the real "
                                  "data (fingerprint of its files: paths, sizes, modification times) (rank 0: ")
        assert "the number of real images (rank 0: 8; rank 1: 7)" in ours[0]
    # Stopped before anything was built, cached or synthesised.
    assert not list(tmp_path.glob("cache/bank-*.pt")) and not list(tmp_path.glob("out/**/*.jpg"))


def test_a_step_holding_back_images_an_earlier_step_forwarded_stops_across_ranks(monkeypatch):
    # The ranks exchange each step's embeddings only: the held-back rows' last embeddings (DELT's
    # rounds on one GPU) would be missing from every other rank's CD, so the run stops instead.
    from dire_plugin.errors import DiReHookError
    from dire_plugin.hooks import distributed

    class Core:
        class stats:
            steps = 6

        def term_gradient(self, *args, **kwargs):
            raise AssertionError("no term may be computed")

    monkeypatch.setattr(distributed, "world", lambda: (0, 2))
    emb, labels = W.rows(seed=0, n=3)
    with pytest.raises(DiReHookError, match="synthesis step 7 leaves out images this rank optimises"):
        distributed.union_term_gradient(Core(), emb, labels, held=(emb[:1], labels[:1]))
