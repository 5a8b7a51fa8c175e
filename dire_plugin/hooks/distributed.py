"""DiRe when the images of one class are synthesised on several ranks at once (SRe²L's multi-GPU
recover under torchrun: ``DistributedSampler`` hands rank r every W-th (class, ipc) item).

Each synthesis step the ranks exchange their current embeddings and labels (detached, ``[B, D]``,
cheap next to a ResNet forward). Every rank then computes DiRe on the union, the other ranks'
rows as constants, and keeps the gradient of its own rows: exactly the gradient one process
holding the union would give them, pairs counted as the single-process formula counts them. The
union of a finished batch joins every rank's memory, so memories agree. The ranks' counters are
gathered each step too (one small exchange of three integers), so rank 0 writes one manifest with
everyone's counts.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

import torch
from torch import Tensor

from ..embeddings.collectives import all_gather_rows, world

__all__ = ["exchange_counts", "rank_summary", "union_term_gradient", "w_destroy_process_group"]

_COUNTERS = ("steps", "terms_added", "computed")


def exchange_counts(core: Any) -> None:
    """Every rank's counters, as of now, into ``core.rank_counts`` (rank → counters)."""
    _, size = world()
    if size == 1:
        return
    mine = torch.tensor([[getattr(core.stats, c) for c in _COUNTERS]], dtype=torch.long)
    (counts,) = all_gather_rows([mine], "the DiRe counters")
    core.rank_counts = {r: dict(zip(_COUNTERS, (int(v) for v in c[0]))) for r, c in enumerate(counts)}


def union_term_gradient(core: Any, emb: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``(gradient of this rank's rows, embeddings of all ranks, their labels)`` for the current
    step; one process: ``core.term_gradient`` of ``emb`` and ``emb``, ``labels`` themselves."""
    rank, size = world()
    if size == 1:
        return core.term_gradient(emb, labels), emb, labels
    exchange_counts(core)
    embs, labs = all_gather_rows([emb.detach().float(), labels.to(torch.long)], "the synthetic embeddings of a step")
    start = sum(int(e.shape[0]) for e in embs[:rank])
    union, union_labels = torch.cat(embs), torch.cat(labs)
    grad = core.term_gradient(union, union_labels)
    return grad[start:start + emb.shape[0]], union, union_labels


def w_destroy_process_group(core_of: Callable[[], Any]) -> Callable:
    """A wrapper of ``torch.distributed.destroy_process_group``: the last exchange of counters
    happens while the group still exists (scripts destroy it before the process exits)."""

    def wrapper(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
        core = core_of()
        if core is not None and core.active:
            try:
                exchange_counts(core)
            except Exception as e:  # noqa: BLE001 - the script is ending: a failed exchange only costs the counts
                import logging

                logging.getLogger("dire").warning("[dire] the ranks' final counters could not be exchanged: %s", e)
        return wrapped(*args, **kwargs)

    return wrapper


def rank_summary(rank_counts: Dict[int, Dict[str, int]]) -> Dict[str, Any]:
    """The manifest's view of the ranks: per rank, and summed."""
    totals = {c: sum(r[c] for r in rank_counts.values()) for c in _COUNTERS}
    return {"ranks": [{"rank": r, **rank_counts[r]} for r in sorted(rank_counts)], "all_ranks": totals}
