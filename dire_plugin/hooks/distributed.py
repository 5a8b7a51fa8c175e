"""DiRe when the images of one class are synthesised on several ranks at once (SRe²L's multi-GPU
recover under torchrun: ``DistributedSampler`` hands rank r every W-th (class, ipc) item).

Each synthesis step the ranks exchange their current embeddings and labels (detached, ``[B, D]``,
cheap next to a ResNet forward). Every rank then computes DiRe on the union, the other ranks'
rows as constants, and keeps the gradient of its own rows: exactly the gradient one process
holding the union would give them, pairs counted as the single-process formula counts them. The
union of a finished batch joins every rank's memory, so memories agree. The ranks' counters (and
each key's, :mod:`.runtime`) are gathered each step too, in one small exchange of integers, so
rank 0 writes one manifest with everyone's counts. The same exchange carries the key of the step:
where teachers rotate (G-VBSM), every rank must classify the step with the same teacher, or the
union would mix the embeddings of different networks; ranks that differ stop the run.

Before the first exchange the ranks check that they run DiRe with the same settings
(:func:`check_same_settings`). A failed exchange ends the run with that failure, and the process
group is then not torn down (:func:`w_destroy_process_group`): that would wait for the exchange
that never completes.
"""
from __future__ import annotations

import sys
from dataclasses import asdict
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..embeddings.collectives import all_gather_json, all_gather_rows, differences, first_failure, world
from ..errors import DiReHookError, DiReInputError
from .settings import SHARED_BY_RANKS

__all__ = ["check_same_settings", "exchange_counts", "rank_summary", "union_term_gradient", "w_destroy_process_group"]

_COUNTERS = ("steps", "terms_added", "computed")


def check_same_settings(core: Any) -> None:
    """Once per run, before the first exchange: every rank runs DiRe with the same settings
    (:data:`~dire_plugin.hooks.settings.SHARED_BY_RANKS`), else a :class:`DiReInputError` on every
    rank naming what differs where. The manifest records rank 0's settings for all."""
    _, size = world()
    if size == 1 or core.ranks_checked:
        return
    config = asdict(core.config)
    mine = {k: list(config[k]) if isinstance(config[k], tuple) else config[k] for k in SHARED_BY_RANKS}
    every = all_gather_json(mine, "the DiRe settings")
    core.ranks_checked = True
    differ = differences(every)
    if differ:
        raise DiReInputError(f"the ranks run DiRe with different settings: {differ}; give every rank the same ones")


#: The key sent by a rank whose synthesis is over (its last exchange of counters).
FINISHED = -1


def _key_id(key: Optional[str]) -> int:
    """A key as one int64 (its first 15 hex digits), 0 for none."""
    return int(key[:15], 16) if key else 0


def exchange_counts(core: Any, what: str = "the DiRe counters", key: Optional[str] = None,
                    finished: bool = False) -> List[int]:
    """Every rank's counters, as of now, into ``core.rank_counts`` (rank → counters) and each
    key's into ``core.rank_key_counts``; returns each rank's ``key`` of the step (as
    :func:`_key_id`; :data:`FINISHED` from a rank whose synthesis is over). ``what`` names the
    exchange in a timeout error."""
    _, size = world()
    if size == 1:
        return []
    rows = [[*(getattr(core.stats, c) for c in _COUNTERS), FINISHED if finished else _key_id(key)]]
    rows += [[_key_id(k), state.stats.terms_added, state.stats.computed, 0] for k, state in core.keys.items()]
    (counts,) = all_gather_rows([torch.tensor(rows, dtype=torch.long)], what)
    core.rank_counts = {r: dict(zip(_COUNTERS, (int(v) for v in c[0][:3]))) for r, c in enumerate(counts)}
    ids = {_key_id(k): k for k in core.keys}
    core.rank_key_counts = {
        r: {ids.get(int(row[0]), f"{int(row[0]):015x}"): (int(row[1]), int(row[2])) for row in c[1:]}
        for r, c in enumerate(counts)
    }
    return [int(c[0][3]) for c in counts]


def _check_same_key(core: Any, ids: List[int], step: int) -> None:
    if len(set(ids)) < 2:
        return
    done = [r for r, i in enumerate(ids) if i == FINISHED]
    if done:  # its last exchange met this step's: it will not take part in any other
        raise DiReHookError(
            f"the ranks no longer synthesise together: rank{'s' if len(done) > 1 else ''} "
            f"{', '.join(map(str, done))} finished while the others are at synthesis step {step} (a batch that "
            "does not split evenly over the ranks?); DiRe joins the ranks' embeddings of every step: choose a batch "
            "size that splits every batch evenly, or set DIRE_DISABLE=1 to run vanilla"
        )
    names = {_key_id(k): f"{state.teacher} {state.short}".strip() for k, state in core.keys.items()}
    differ = differences([{"teacher": names.get(i, f"key {i:015x}")} for i in ids])
    raise DiReHookError(
        f"the ranks classify synthesis step {step} with different teachers: {differ}; DiRe joins the ranks' "
        f"embeddings of a step, which must come from one network (the {core.config.method} patch does not fit "
        "this code; set DIRE_DISABLE=1 to run vanilla)"
    )


def union_term_gradient(core: Any, emb: Tensor, labels: Tensor,
                        key: Optional[str] = None,
                        held: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """``(gradient of this rank's rows, embeddings of all ranks, their labels)`` for the current
    step, against ``key``'s bank and memory (see :mod:`.runtime`); one process:
    ``core.term_gradient`` of ``emb`` (with ``held``, see there) and ``emb``, ``labels``
    themselves. Across ranks no step may hold back images an earlier step forwarded (``held``
    rows): the ranks exchange only the step's embeddings."""
    rank, size = world()
    if size == 1:
        return core.term_gradient(emb, labels, key=key, held=held), emb, labels
    if held is not None and len(held[1]):
        raise DiReHookError(
            f"synthesis step {core.stats.steps + 1} leaves out images this rank optimises that an earlier step "
            "forwarded; under torch.distributed DiRe exchanges only each step's embeddings, so it cannot push away "
            "from theirs (set DIRE_DISABLE=1 to run vanilla)"
        )
    check_same_settings(core)
    # The counters travel first in the same step: a timeout in either is this step's exchange.
    step = core.stats.steps + 1
    what = f"the synthetic embeddings of synthesis step {step}"
    _check_same_key(core, exchange_counts(core, what, key), step)
    embs, labs = all_gather_rows([emb.detach().float(), labels.to(torch.long)], what)
    start = sum(int(e.shape[0]) for e in embs[:rank])
    union, union_labels = torch.cat(embs), torch.cat(labs)
    grad = core.term_gradient(union, union_labels, key=key)
    return grad[start:start + emb.shape[0]], union, union_labels


def w_destroy_process_group(core_of: Callable[[], Any]) -> Callable:
    """A wrapper of ``torch.distributed.destroy_process_group``: the last exchange of counters
    happens while the group still exists (scripts destroy it before the process exits).

    After an exchange of ours failed (a timeout included) neither the last exchange nor the
    teardown happens: gloo's teardown waits for the failed exchange, forever when a peer is
    stopped, and upstream scripts call it from a ``finally``. The group is left to the process's
    exit, and the run ends with the first failure: the error already in flight goes on; if the
    script caught ours, it is raised here, so the run never ends as if it had succeeded."""

    def wrapper(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
        import torch.distributed as dist

        group = args[0] if args else kwargs.get("group")
        if group is not None and group is not dist.group.WORLD:
            return wrapped(*args, **kwargs)  # a subgroup: our exchanges run in the default one
        core = core_of()
        if core is not None and core.active and first_failure() is None:
            try:
                exchange_counts(core, "the DiRe counters at the end of the run", finished=True)
            except DiReHookError:
                pass  # now the first failure: handled below like any other
        failure = first_failure()
        if failure is None:
            return wrapped(*args, **kwargs)
        if sys.exc_info()[1] is None:
            raise failure
        return None

    return wrapper


def rank_summary(rank_counts: Dict[int, Dict[str, int]]) -> Dict[str, Any]:
    """The manifest's view of the ranks: per rank, and summed."""
    totals = {c: sum(r[c] for r in rank_counts.values()) for c in _COUNTERS}
    return {"ranks": [{"rank": r, **rank_counts[r]} for r in sorted(rank_counts)], "all_ranks": totals}
