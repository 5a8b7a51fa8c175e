"""Rows of every rank, in rank order, when the run is a ``torch.distributed`` job (torchrun; gloo
on the CPU, NCCL on GPUs). Every collective waits at most ``DIRE_DIST_TIMEOUT`` seconds (default
600) and then raises one :class:`~dire_plugin.errors.DiReHookError` line instead of hanging: a
rank that died or left the synthesis loop must not stall the others for the process group's
30-minute default. After one collective failed, no other is attempted in that process group: the
ranks no longer agree on which exchange comes next, and gloo queues a new one behind the one
still pending (a stopped peer never completes it). Every later call raises the first failure
again (:func:`first_failure`), so the error the user sees names the exchange that failed first.

Nothing here binds a socket or picks an address: the process group is the script's own.
"""
from __future__ import annotations

import datetime
import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..errors import DiReHookError
from ..io.environ import bad_value

__all__ = [
    "ENV_TIMEOUT", "all_gather_json", "all_gather_rows", "differences", "exchange_timeout", "first_failure", "world",
]

ENV_TIMEOUT = "DIRE_DIST_TIMEOUT"
#: Rows per collective when a large tensor (the real-embedding bank) is gathered.
CHUNK_ROWS = 65536

#: ``(process group, error)`` of the first collective of ours that failed in this process.
_FAILED: Optional[Tuple[Any, DiReHookError]] = None


def world() -> Tuple[int, int]:
    """``(rank, world size)`` of the running job; ``(0, 1)`` outside ``torch.distributed``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def exchange_timeout() -> datetime.timedelta:
    """How long a collective waits (``DIRE_DIST_TIMEOUT``, default 600 s); a value that is no
    number of seconds is a :class:`~dire_plugin.errors.DiReInputError` (checked at start-up too)."""
    try:
        seconds = float(os.environ.get(ENV_TIMEOUT, "600"))
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < 10 ** 7:  # NaN and inf too: timedelta would raise its own error on them
        raise bad_value(ENV_TIMEOUT, os.environ[ENV_TIMEOUT], "a number of seconds (greater than 0, at most 10^7)")
    return datetime.timedelta(seconds=seconds)


def _device() -> torch.device:
    """Where collective buffers live: NCCL moves CUDA tensors only, gloo CPU ones."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def first_failure() -> Optional[DiReHookError]:
    """The error of the first collective of ours that failed in the running process group, or
    ``None``. Once there is one, no collective of ours is attempted again, and the group must not
    be torn down by a call that waits for the failed one (see :mod:`dire_plugin.hooks.distributed`)."""
    import torch.distributed as dist

    if _FAILED is None or not (dist.is_available() and dist.is_initialized()):
        return None
    group, error = _FAILED
    return error if group is dist.group.WORLD else None  # a failure in an earlier group is not this one's


def _gather(t: Tensor, what: str) -> List[Tensor]:
    global _FAILED
    import torch.distributed as dist

    failure = first_failure()
    if failure is not None:
        raise failure
    timeout = exchange_timeout()  # a bad value is refused before a collective is left pending
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    try:
        dist.all_gather(out, t, async_op=True).wait(timeout=timeout)
    except RuntimeError as e:  # gloo and NCCL report a timeout (or a peer that went away) this way
        rank, size = dist.get_rank(), dist.get_world_size()
        # With two ranks the one that did not come is known; with more, gloo does not say which.
        peers = f"rank {1 - rank}" if size == 2 else f"one of the other {size - 1} ranks"
        error = DiReHookError(
            f"rank {rank}: {peers} did not join the exchange of {what} within {timeout.total_seconds():g} s "
            f"(it failed, was stopped or left the synthesis loop; {ENV_TIMEOUT} sets the wait): {str(e).splitlines()[0]}"
        )
        _FAILED = (dist.group.WORLD, error)
        raise error from None
    return out


def all_gather_rows(rows: Sequence[Tensor], what: str) -> List[List[Tensor]]:
    """For tensors ``rows`` that share their first dimension ``n`` (which may differ between
    ranks), the same tensors of every rank, in rank order: ``out[k][r]`` is ``rows[k]`` of rank
    ``r``, on the device ``rows[k]`` is on. ``what`` names the data in a timeout error."""
    n = int(rows[0].shape[0])
    device = _device()
    sizes = [int(s) for s in _gather(torch.tensor([n], dtype=torch.long, device=device), what)]
    top = max(sizes)
    out: List[List[Tensor]] = []
    for t in rows:
        pieces: List[List[Tensor]] = [[] for _ in sizes]
        # In chunks, so a bank of millions of rows never needs a second full copy on a GPU.
        for start in range(0, max(top, 1), CHUNK_ROWS):
            stop = min(start + CHUNK_ROWS, top)
            local = t[start:min(stop, n)].to(device)
            pad = local.new_zeros((stop - start - local.shape[0], *t.shape[1:]))
            gathered = _gather(torch.cat([local, pad]) if pad.shape[0] else local.contiguous(), what)
            for r, piece in enumerate(gathered):
                pieces[r].append(piece[: max(0, min(stop, sizes[r]) - start)])
        out.append([torch.cat(p).to(t.device) if p else t.new_zeros((0, *t.shape[1:])) for p in pieces])
    return out


def all_gather_json(value: Any, what: str) -> List[Any]:
    """``value`` (anything ``json`` writes) of every rank, in rank order; ``what`` as in
    :func:`all_gather_rows`. For the checks that ranks agree: the values themselves travel, so an
    error can say what differs, not only that something does."""
    data = torch.tensor(list(json.dumps(value, sort_keys=True).encode()), dtype=torch.uint8)
    (per_rank,) = all_gather_rows([data], what)
    return [json.loads(bytes(t.cpu().tolist()).decode()) for t in per_rank]


def differences(per_rank: Sequence[Mapping[str, Any]], names: Optional[Mapping[str, str]] = None) -> str:
    """``""`` if every rank's mapping is the same, else one line naming each key that differs and
    which ranks hold which value, e.g. ``r_c (rank 0: 0.1; ranks 1, 2: 0.5)``. ``names`` gives keys
    the words a user knows them by."""
    parts = []
    for key in sorted({k for m in per_rank for k in m}):
        holders: Dict[str, List[int]] = {}
        for r, m in enumerate(per_rank):
            holders.setdefault(json.dumps(m.get(key), sort_keys=True), []).append(r)
        if len(holders) > 1:
            held = "; ".join(f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}: {_shown(v)}"
                             for v, rs in holders.items())
            parts.append(f"{(names or {}).get(key, key)} ({held})")
    return ", ".join(parts)


def _shown(encoded: str) -> str:
    value = json.loads(encoded)
    # Fingerprints hold 64 hex digits: the first few tell two values apart in a one-line error.
    if isinstance(value, str) and len(value) > 40:
        return json.dumps(value[:36] + "...")
    return encoded
