r"""The DiRe terms as plain functions (checks + compute); :class:`dire_plugin.DiReLoss` wraps them.

For one class ``c`` with synthetic embeddings ``a_1..a_n``, real embeddings ``b_1..b_m`` and
(optionally) memory embeddings ``p_1..p_k`` of synthetic images finished earlier:

``reduction="sum"`` — the paper's Equations 1–5 literally::

    CD_c  = Σ_i Σ_j cos(a_i, a_j)  (diagonal included)  + 2 Σ_i Σ_l cos(a_i, p_l)
    CDM_c = Σ_i Σ_j (1 − cos(a_i, b_j))
    EDM_c = Σ_i Σ_j ‖a_i − b_j‖

``reduction="mean"`` — the same terms as means over their pairs::

    CD_c  = [Σ_{i≠j} cos(a_i, a_j) + 2 Σ_i Σ_l cos(a_i, p_l)] / [n(n−1) + 2nk]   (0 if no pair)
    CDM_c = 1 − Σ_i Σ_j cos(a_i, b_j) / (n m)
    EDM_c = Σ_i Σ_j ‖a_i − b_j‖ / (n m)

Beyond the paper, ``logdet`` (in place of CD or beside it): ``LOGDET_c = −log det(K_c + I)`` over
the unit rows of the class's current and memory embeddings (``K_c`` their cosine Gram matrix, or an
RBF of it), divided by ``n + k`` with ``"mean"``.

Memory pairs count in both orders, as they would among the ordered pairs of the union of
current and memory embeddings (memory–memory pairs are constant and left out). Each component
is summed over the classes present in ``labels``; the loss is
``r_c · (CD + CDM) + r_e · EDM (+ r_d · LOGDET)``.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Optional, Tuple

import torch
from torch import Tensor

from .defaults import (
    ALL_COMPONENTS, COMPONENTS, DEFAULT_R_D, REDUCTIONS, check_active_weights, check_weight, check_weights,
    component_weights,
)
from ..errors import DiReInputError
from .grouped import ClassSums, PackedEmbeddings, check_embeddings
from .kernels import (
    DEFAULT_CHUNK_ELEMENTS,
    DEFAULT_EPS,
    class_row_sums,
    cosine_sum_between,
    cosine_sum_within,
    euclidean_distance_sums,
    logdet_diversity,
    normalize_rows,
    ranks_in_class,
    unit_row_sums,
)

__all__ = [
    "COMPONENTS", "REDUCTIONS", "active_components", "check_batch", "check_components", "check_weights", "dire_components",
    "dire_loss", "weighted_total",
]



def check_components(components: Iterable[str]) -> Tuple[str, ...]:
    """``components`` as a tuple, if it is a non-empty subset of ``cd``, ``cdm``, ``edm``."""
    comps = tuple(components)
    unknown = [c for c in comps if c not in ALL_COMPONENTS]
    if unknown or not comps:
        raise DiReInputError(f"components must be a non-empty subset of {ALL_COMPONENTS}, got {comps}")
    return comps


def check_batch(syn_emb: Tensor, syn_labels: Tensor, memory: Optional[ClassSums] = None) -> Tensor:
    """The labels of a batch as int64 on the embeddings' device, after refusing (one line each) what
    would otherwise fail deep in the kernels or compute the wrong loss: embeddings that are not
    ``[N, D]``, an empty batch, a label count that differs from ``N``, labels that are not whole
    numbers (a float label would be truncated to another class), and a memory of another width.

    Costs no device sync for integer labels (the training loop's case).
    """
    if syn_emb.dim() != 2:
        check_embeddings(syn_emb, "synthetic embeddings")
    if syn_emb.shape[0] == 0:
        raise DiReInputError("no synthetic embeddings: the batch is empty (DiRe needs at least one image)")
    labels = torch.as_tensor(syn_labels).reshape(-1)
    if labels.numel() != syn_emb.shape[0]:
        raise DiReInputError(f"{syn_emb.shape[0]} synthetic embeddings but {labels.numel()} labels")
    if labels.is_complex():
        raise DiReInputError(f"labels must be whole numbers, got {labels.dtype}")
    if labels.is_floating_point():
        bad = ~(torch.isfinite(labels) & (labels == labels.round()))
        if bool(bad.any()):
            raise DiReInputError(f"labels must be whole numbers, got {labels[bad][0].item()!r}")
    if memory is not None and len(memory.classes) and memory.dim != syn_emb.shape[1]:
        raise DiReInputError(f"memory embeddings have dimension {memory.dim}, the synthetic ones {syn_emb.shape[1]}")
    return labels.to(device=syn_emb.device, dtype=torch.long)


@dataclass(frozen=True)
class _Layout:
    """Label bookkeeping of one call: classes present, each row's class slot and rank in it, the
    counts, and the rows of ``real`` those classes use."""

    labels: Tensor
    #: Weak: the cached layout must not keep a bank of several GB alive after its owner dropped it.
    real: "weakref.ref[PackedEmbeddings]"
    classes: Tensor
    slot: Tensor
    rank: Tensor
    counts: Tensor
    n: Tensor
    m: Tensor
    real_pos: Tensor
    #: Labels sorted with equal counts: ``x.view(C, n, D)`` is already the padded layout.
    blocked: bool

    def pad(self, x: Tensor) -> Tensor:
        """``[C, N_max, D]`` rows grouped by class (a view when the labels are blocked)."""
        c, n_max = len(self.classes), int(self.counts.max())
        if self.blocked:
            return x.view(c, n_max, x.shape[-1])
        return x.new_zeros(c, n_max, x.shape[-1]).index_put((self.slot, self.rank), x)


_LAST_LAYOUT: Optional[_Layout] = None


def _layout(labels: Tensor, real: PackedEmbeddings) -> _Layout:
    """The layout of ``labels`` against ``real``; reused while both are the same as last call.

    A synthesis loop passes the same labels every step: recomputing unique/bincount/searchsorted
    and the class ranks each time was a fifth of the loss's time at the released setting.
    """
    global _LAST_LAYOUT
    last = _LAST_LAYOUT
    if (
        last is not None
        and last.real() is real
        and last.labels.shape == labels.shape
        and last.labels.device == labels.device
        and bool(torch.equal(last.labels, labels))
    ):
        return last
    classes, slot, counts = torch.unique(labels, sorted=True, return_inverse=True, return_counts=True)
    real_pos = real.positions(classes)
    rank = ranks_in_class(slot, counts)
    blocked = bool((counts == counts[0]).all()) and bool((slot[1:] >= slot[:-1]).all())
    _LAST_LAYOUT = _Layout(
        labels.clone(), weakref.ref(real), classes, slot, rank, counts, counts.to(torch.float64),
        real.counts[real_pos].to(torch.float64), real_pos, blocked,
    )
    return _LAST_LAYOUT


def dire_components(
    syn_emb: Tensor,
    syn_labels: Tensor,
    real: PackedEmbeddings,
    memory: Optional[ClassSums] = None,
    reduction: str = "mean",
    components: Iterable[str] = COMPONENTS,
    eps: float = DEFAULT_EPS,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    check_finite: bool = True,
    logdet_kernel: str = "cosine",
) -> Dict[str, Tensor]:
    """The requested DiRe components, each summed over classes, unweighted (see module doc).

    Args:
        syn_emb: ``[N, D]`` synthetic embeddings (differentiable); computed in float32 at least.
        syn_labels: ``[N]`` integer labels (floats only if whole numbers), any order, any counts per class.
        real: packed real embeddings; every class in ``syn_labels`` must be present.
        memory: per-class unit sums of finished synthetic embeddings (enter CD only), of width ``D``;
            ``logdet`` needs their rows too (a :class:`PackedEmbeddings`).
        reduction: ``"mean"`` or ``"sum"``.
        components: which of ``"cd", "cdm", "edm", "logdet"`` to compute.
        logdet_kernel: ``"cosine"`` or ``"rbf"`` (:func:`~dire_plugin.regularizer.kernels.logdet_diversity`).
        check_finite: refuse NaN/Inf synthetic embeddings, detected on the results (one small sync).
    """
    if reduction not in REDUCTIONS:
        raise DiReInputError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    comps = check_components(components)
    labels = check_batch(syn_emb, syn_labels, memory)
    if syn_emb.shape[-1] != real.dim:
        raise DiReInputError(f"synthetic embeddings have dimension {syn_emb.shape[-1]}, real ones {real.dim}")
    if real.classes.device != syn_emb.device:
        real = real.to(syn_emb.device)
    x = syn_emb if syn_emb.dtype in (torch.float32, torch.float64) else syn_emb.float()

    layout = _layout(labels, real)
    classes, slot, real_pos = layout.classes, layout.slot, layout.real_pos
    n, m = layout.n.to(x.dtype), layout.m.to(x.dtype)
    out: Dict[str, Tensor] = {}

    if "cd" in comps or "cdm" in comps:
        s = unit_row_sums(x, slot, len(classes), eps)
    if "cd" in comps:
        # Σ_i ‖x̂_i‖² per class: 1 per non-zero row. A constant for the gradient (exactly so for
        # every row longer than eps).
        with torch.no_grad():
            unit_sq = class_row_sums(normalize_rows(x, eps).pow(2).sum(-1, keepdim=True), slot, len(classes)).squeeze(-1)
        if memory is not None and len(memory.classes):
            mem_sums, k = memory.to(x.device).lookup(classes)
            cross = 2.0 * cosine_sum_between(s, mem_sums.to(x.dtype))
            k = k.to(x.dtype)
        else:
            cross, k = torch.zeros_like(n), torch.zeros_like(n)
        if reduction == "sum":
            cd = cosine_sum_within(s, unit_sq, include_diagonal=True) + cross
        else:
            pairs = n * (n - 1) + 2.0 * n * k
            total = cosine_sum_within(s, unit_sq, include_diagonal=False) + cross
            cd = torch.where(pairs > 0, total / pairs.clamp_min(1.0), torch.zeros_like(total))
        out["cd"] = cd.sum()
    if "cdm" in comps:
        cos_sum = cosine_sum_between(s, real.unit_sums[real_pos].to(x.dtype))
        out["cdm"] = (n * m - cos_sum).sum() if reduction == "sum" else (1.0 - cos_sum / (n * m)).sum()
    if "edm" in comps:
        sums = euclidean_distance_sums(
            layout.pad(x), layout.counts, real.padded, real.counts, real_pos, eps, chunk_elements, b_sq=real.sq_norms
        )
        out["edm"] = sums.sum() if reduction == "sum" else (sums / (n * m)).sum()
    if "logdet" in comps:
        mem_rows = mem_counts = None
        if memory is not None and len(memory.classes):
            if not isinstance(memory, PackedEmbeddings):
                raise DiReInputError("the logdet term needs the memory's embeddings, not only their sums: pass a "
                                     "SyntheticMemory or a mapping class -> tensor")
            mem_rows, mem_counts = memory.to(x.device).rows_for(classes)
        values = logdet_diversity(layout.pad(x), layout.counts, mem_rows, mem_counts, kernel=logdet_kernel, eps=eps)
        rows = n + (mem_counts.to(x.dtype) if mem_counts is not None else 0.0)
        out["logdet"] = values.sum() if reduction == "sum" else (values / rows).sum()
    if check_finite and not bool(torch.isfinite(torch.stack(list(out.values()))).all()):
        # NaN/Inf in any embedding reaches the sums: checking the few results costs one small
        # sync, checking every input element on each step cost more than the cosine terms.
        check_embeddings(syn_emb, "synthetic embeddings")
        raise DiReInputError(f"DiRe terms are not finite: {({k: float(v) for k, v in out.items()})}")
    return {c: out[c] for c in ALL_COMPONENTS if c in out}


def active_components(components: Iterable[str], r_c: float, r_e: float, r_d: float = DEFAULT_R_D) -> tuple:
    """The enabled components whose weight is not 0 (EDM, the only O(N·M·D) term, is often off)."""
    weights = component_weights(r_c, r_e, r_d)
    return tuple(c for c in check_components(components) if weights[c] != 0)


def weighted_total(values: Dict[str, Tensor], r_c: float, r_e: float, r_d: float = DEFAULT_R_D) -> Tensor:
    """``r_c · (CD + CDM) + r_e · EDM + r_d · LOGDET`` over the components present in ``values``."""
    weights = component_weights(r_c, r_e, r_d)
    return sum(weights[c] * v for c, v in values.items())


def dire_loss(
    syn_emb: Tensor,
    syn_labels: Tensor,
    real: PackedEmbeddings,
    r_c: float,
    r_e: float,
    memory: Optional[ClassSums] = None,
    reduction: str = "mean",
    components: Iterable[str] = COMPONENTS,
    r_d: float = DEFAULT_R_D,
    **kwargs: Any,
) -> Tensor:
    """``L_syn = r_c · (CD + CDM) + r_e · EDM (+ r_d · LOGDET)`` over the enabled components (module doc).

    The weights must be finite numbers >= 0 that float32 holds (:func:`check_weights`), not all 0
    for the chosen components (:func:`check_active_weights`).
    """
    r_c, r_e = check_weights(r_c, r_e)
    r_d = check_weight("r_d", r_d)
    check_active_weights(check_components(components), r_c, r_e, r_d=r_d)
    active = active_components(components, r_c, r_e, r_d)
    terms = dire_components(syn_emb, syn_labels, real, memory, reduction, active, **kwargs)
    total = weighted_total(terms, r_c, r_e, r_d)
    if kwargs.get("check_finite", True) and not bool(torch.isfinite(total)):
        # The terms were finite (dire_components checks them): the weights overflowed float32.
        raise DiReInputError(f"the weighted DiRe term overflows float32 (r_c={r_c:g}, r_e={r_e:g}, r_d={r_d:g}, "
                             f"terms {({k: float(v) for k, v in terms.items()})}): use smaller weights")
    return total
