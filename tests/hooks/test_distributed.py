"""DiRe under torch.distributed, on CPU with gloo: each rank's images get the gradient one process
holding every rank's images would give them; a bank built on two ranks is the bank one process
builds; a rank that fails stops the others with a clear error, not a hang; and a look-alike of
SRe²L's multi-GPU recover script runs under torchrun with DiRe and writes one manifest."""
import json
import os
import subprocess
import sys
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
    assert "did not join the exchange of the DiRe counters within 5 s" in message and "DIRE_DIST_TIMEOUT" in message


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


def test_the_multi_gpu_script_under_torchrun_writes_one_manifest(tmp_path):
    root = tmp_path / "SRe2L"
    files = {str(p.relative_to(FIXTURE)): p.read_text() for p in FIXTURE.rglob("*.py")}
    head = build_checkout(root, SRE2L, "https://github.com/VILA-Lab/SRe2L", files)
    lock = write_lock(tmp_path / "lock.toml", root, SRE2L, "https://github.com/VILA-Lab/SRe2L", head)
    data = write_image_folder(tmp_path / "real", 4, per_class=2, size=16)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "dire_plugin.cli.run", "--real-data", str(data), "--cache-dir", str(tmp_path / "cache"),
           "sre2l", str(root / SCRIPT), "--", "--num-classes", "4", "--ipc", "4", "--batch-size", "4",
           "--iteration", "2", "--syn-data-path", str(out), "--exp-name", "t", "--dist-backend", "gloo"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIRE_")}
    env.update(DIRE_CPU_SHIM="1", DIRE_UPSTREAM_LOCK=str(lock), OMP_NUM_THREADS="1")
    run = subprocess.run(cmd, cwd=root / "SRe2L/recover/multi_gpu", env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    manifests = sorted(out.rglob("*manifest*.json"))
    assert [m.name for m in manifests] == ["dire_manifest.json"]
    manifest = json.loads(manifests[0].read_text())
    # 16 items over 2 ranks in batches of 4: 2 batches x 2 iterations per rank.
    assert manifest["ranks"] == [{"rank": r, "steps": 4, "terms_added": 4, "computed": 4} for r in range(2)]
    assert (manifest["synthesis_steps"], manifest["terms_added"]) == (8, 8)
    assert manifest["memory_embeddings"] == 8  # both ranks' first batch, on every rank
    assert len(list(out.rglob("*.jpg"))) == 16
