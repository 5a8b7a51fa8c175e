"""Processes of the distributed tests: each runs one rank of a gloo process group initialised
through a file (no port, no address), does its part and saves what it saw for the test."""
import json
import multiprocessing
import os
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

NUM_CLASSES, D = 5, 8


def start(world: int, target, *args, timeout: float = 180.0, env=None):
    """Run ``target(rank, world, init_file, *args)`` in ``world`` spawned processes; returns their
    exit codes (a process still alive after ``timeout`` is killed and reported as None)."""
    ctx = multiprocessing.get_context("spawn")
    # A fresh rendezvous file per group: a second group in the same folder would otherwise read the
    # first one's stale addresses and fail to connect ("Connection refused"), now and then.
    init = Path(args[0]) / f"pg-init-{time.time_ns()}" if args else None
    procs = [ctx.Process(target=_entry, args=(target, r, world, str(init), env or {}, *args)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.time() + timeout
    codes = []
    for p in procs:
        p.join(max(0.0, deadline - time.time()))
        if p.is_alive():
            p.kill()
            p.join()
            codes.append(None)
        else:
            codes.append(p.exitcode)
    return codes


def _entry(target, rank, world, init, env, *args):
    os.environ.update(env)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        target(rank, world, *args)
    except BaseException:
        (Path(args[0]) / f"error{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def rows(seed: int, n: int):
    """Embeddings and labels of one rank's current images: classes 0-2 on every rank, as
    DistributedSampler spreads a class's images over the ranks."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, D, generator=g) + 0.05, (torch.arange(n) + seed) % 3


def bank():
    from dire_plugin import RealEmbeddingBank

    g = torch.Generator().manual_seed(99)
    return RealEmbeddingBank.from_tensors(torch.rand(NUM_CLASSES * 4, D, generator=g) + 0.1,
                                          torch.arange(NUM_CLASSES).repeat(4))


def core(**settings):
    from dire_plugin.hooks.capture import Capture
    from dire_plugin.hooks.runtime import DiReRuntime
    from dire_plugin.hooks.settings import RunConfig

    config = RunConfig(**{"method": "sre2l", "script": "t.py", "r_c": 0.5, "r_e": 0.05, "log_every": 0, **settings})
    runtime = DiReRuntime(config, lambda *a: bank(), Capture())
    runtime.add_bank(bank())
    return runtime


# --- workers ------------------------------------------------------------------------------------------


def union_gradient(rank, world, out):
    from dire_plugin.hooks.distributed import union_term_gradient

    runtime = core()
    emb, labels = rows(seed=rank, n=3 + rank)
    grad, union, union_labels = union_term_gradient(runtime, emb, labels)
    torch.save({"grad": grad, "union": union, "labels": union_labels}, Path(out) / f"rank{rank}.pt")


def sharded_bank(rank, world, out):
    from dire_plugin import RealEmbeddingBank

    data, model = bank_data()
    loader = torch.utils.data.DataLoader(data, batch_size=7, shuffle=False)
    built = RealEmbeddingBank.build(model, loader, cache_dir=Path(out) / "cache", dataset_id="t", progress=False)
    torch.save({"embeddings": built._flat, "classes": built._classes, "counts": built._counts,
                "fingerprint": built.fingerprint, "hit": built.cache_hit}, Path(out) / f"bank{rank}.pt")


def bank_data():
    g = torch.Generator().manual_seed(5)
    images = torch.rand(41, 3, 6, 6, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (41,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, D, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(D, NUM_CLASSES))
    return torch.utils.data.TensorDataset(images, labels), model


def one_rank_fails(rank, world, out):
    from dire_plugin.errors import DiReHookError
    from dire_plugin.hooks.distributed import union_term_gradient

    if rank == 1:
        raise RuntimeError("rank 1 left the synthesis loop")
    started = time.time()
    try:
        union_term_gradient(core(), *rows(seed=0, n=3))
    except DiReHookError as e:
        (Path(out) / "rank0.txt").write_text(f"{time.time() - started:.1f}\n{e}")


def rank_stops_after_one_step(rank, world, out):
    """Rank 1 joins step 1's exchange and then no other (a stopped process, as ``kill -STOP``
    leaves it) until rank 0 is done; rank 0 records what it meets. Both leave without the
    teardown, which would wait for the exchange that timed out."""
    from dire_plugin.embeddings.collectives import first_failure
    from dire_plugin.errors import DiReHookError
    from dire_plugin.hooks.distributed import exchange_counts, union_term_gradient, w_destroy_process_group

    done = Path(out) / "rank0.json"
    runtime = core()
    union_term_gradient(runtime, *rows(seed=rank, n=3))
    runtime.stats.steps += 1  # what the optimizer step pre-hook counts in a run
    if rank == 1:
        deadline = time.time() + 120
        while not done.exists() and time.time() < deadline:
            time.sleep(0.1)
        os._exit(0)
    seen = {}
    try:
        union_term_gradient(runtime, *rows(seed=0, n=3))
    except DiReHookError as e:
        seen["step"] = str(e)
        first = e
    started = time.time()
    try:  # a later exchange is not attempted: the first failure again, at once
        exchange_counts(runtime)
    except DiReHookError as e:
        seen["again_same"] = e is first
    teardowns = []
    wrapper = w_destroy_process_group(lambda: runtime)
    try:  # the script caught ours and ends normally: the teardown wrapper raises it
        wrapper(lambda: teardowns.append(1), None, (), {})
    except DiReHookError as e:
        seen["raised_same"] = e is first
    try:  # the script's finally, ours in flight: it goes on, the teardown is skipped
        try:
            raise first
        finally:
            seen["in_flight_returns"] = wrapper(lambda: teardowns.append(1), None, (), {})
    except DiReHookError:
        pass
    seen.update(teardowns=len(teardowns), later_s=time.time() - started, failure_kept=first_failure() is first)
    done.write_text(json.dumps(seen))
    os._exit(0)


def settings_differ(rank, world, out):
    from dire_plugin.errors import DiReInputError
    from dire_plugin.hooks.distributed import union_term_gradient

    # Node-local paths and logging may differ; the weight may not.
    runtime = core(r_c=0.5 if rank == 0 else 0.25, log_every=rank, cache_dir=f"/node{rank}/cache",
                   real_data=f"/node{rank}/data")
    try:
        union_term_gradient(runtime, *rows(seed=rank, n=3))
    except DiReInputError as e:
        (Path(out) / f"rank{rank}.txt").write_text(str(e))
    try:  # checked once: the ranks go on exchanging (in a run, the error has ended it)
        union_term_gradient(runtime, *rows(seed=rank, n=3))
        (Path(out) / f"again{rank}.txt").write_text("ok")
    except DiReInputError:
        pass


def bank_data_differs(rank, world, out, mode):
    """Each rank builds the bank from its own copy of the data: ``mode`` ``"same"`` (identical
    copies at different paths), ``"one-image-less"`` (rank 1's copy misses an image),
    ``"weights"`` (rank 1's teacher differs) or ``"size-only"`` (one dataset_id for both, rank 1
    has an image less)."""
    from dire_plugin import RealEmbeddingBank
    from dire_plugin.embeddings.realdata import data_fingerprint
    from dire_plugin.errors import DiReInputError
    from torchvision import datasets, transforms

    root = Path(out) / f"data{rank}"
    data = datasets.ImageFolder(str(root), transform=transforms.ToTensor())
    dataset_id = "t" if mode == "size-only" else data_fingerprint(data, root, "t")
    torch.manual_seed(1 if mode == "weights" and rank == 1 else 0)
    model = nn.Sequential(nn.Conv2d(3, D, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(D, 4))
    loader = torch.utils.data.DataLoader(data, batch_size=3, shuffle=False)
    cache = Path(out) / f"cache{rank}"
    try:
        bank = RealEmbeddingBank.build(model, loader, cache_dir=cache, dataset_id=dataset_id, progress=False)
        torch.save({"embeddings": bank._flat, "fingerprint": bank.fingerprint}, Path(out) / f"bank{rank}.pt")
    except DiReInputError as e:
        (Path(out) / f"rank{rank}.txt").write_text(str(e))
    (Path(out) / f"cached{rank}.txt").write_text(str(len(list(cache.glob("bank-*.pt"))) if cache.exists() else 0))


def one_rank_finishes_early(rank, world, out):
    """Rank 1 ends its synthesis after step 1 (its last exchange of counters), as a worker does
    that skips a batch that does not split evenly; rank 0 goes on to step 2."""
    from dire_plugin.errors import DiReHookError
    from dire_plugin.hooks.distributed import exchange_counts, union_term_gradient

    runtime = core()
    union_term_gradient(runtime, *rows(seed=rank, n=3))
    runtime.stats.steps += 1
    if rank == 1:
        exchange_counts(runtime, "the DiRe counters at the end of the worker", finished=True)
        return
    try:
        union_term_gradient(runtime, *rows(seed=0, n=3))
    except DiReHookError as e:
        (Path(out) / "rank0.txt").write_text(str(e))
