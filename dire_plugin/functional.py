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

Memory pairs count in both orders, as they would among the ordered pairs of the union of
current and memory embeddings (memory–memory pairs are constant and left out). Each component
is summed over the classes present in ``labels``; the loss is
``r_c · (CD + CDM) + r_e · EDM``.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch
from torch import Tensor

from .errors import DiReInputError
from .grouped import ClassSums, PackedEmbeddings, check_embeddings
from .pairwise import (
    DEFAULT_CHUNK_ELEMENTS,
    DEFAULT_EPS,
    class_row_sums,
    cosine_sum_between,
    cosine_sum_within,
    euclidean_distance_sums,
    group_by_class,
    normalize_rows,
)

__all__ = ["COMPONENTS", "REDUCTIONS", "dire_components", "dire_loss", "check_components"]

COMPONENTS = ("cd", "cdm", "edm")
REDUCTIONS = ("mean", "sum")


def check_components(components: Iterable[str]) -> tuple:
    comps = tuple(components)
    unknown = [c for c in comps if c not in COMPONENTS]
    if unknown or not comps:
        raise DiReInputError(f"components must be a non-empty subset of {COMPONENTS}, got {comps}")
    return comps


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
) -> Dict[str, Tensor]:
    """The requested DiRe components, each summed over classes, unweighted (see module doc).

    Args:
        syn_emb: ``[N, D]`` synthetic embeddings (differentiable); computed in float32 at least.
        syn_labels: ``[N]`` integer labels, any order, any counts per class.
        real: packed real embeddings; every class in ``syn_labels`` must be present.
        memory: per-class unit sums of finished synthetic embeddings (enter CD only).
        reduction: ``"mean"`` or ``"sum"``.
        components: which of ``"cd", "cdm", "edm"`` to compute.
        check_finite: refuse NaN/Inf synthetic embeddings (one device sync).
    """
    if reduction not in REDUCTIONS:
        raise DiReInputError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    comps = check_components(components)
    if check_finite:
        check_embeddings(syn_emb, "synthetic embeddings")
    labels = syn_labels.reshape(-1).to(device=syn_emb.device, dtype=torch.long)
    if labels.numel() != syn_emb.shape[0]:
        raise DiReInputError(f"{syn_emb.shape[0]} synthetic embeddings but {labels.numel()} labels")
    if syn_emb.shape[-1] != real.dim:
        raise DiReInputError(f"synthetic embeddings have dimension {syn_emb.shape[-1]}, real ones {real.dim}")
    if real.classes.device != syn_emb.device:
        real = real.to(syn_emb.device)
    x = syn_emb if syn_emb.dtype in (torch.float32, torch.float64) else syn_emb.float()

    classes, slot = torch.unique(labels, sorted=True, return_inverse=True)
    real_pos = real.positions(classes)
    n = torch.bincount(slot, minlength=len(classes)).to(x.dtype)
    m = real.counts[real_pos].to(x.dtype)
    out: Dict[str, Tensor] = {}

    if "cd" in comps or "cdm" in comps:
        unit = normalize_rows(x, eps)
        s = class_row_sums(unit, slot, len(classes))
    if "cd" in comps:
        unit_sq = class_row_sums((unit * unit).sum(-1, keepdim=True), slot, len(classes)).squeeze(-1)
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
        padded, counts, _ = group_by_class(x, labels, classes)
        sums = euclidean_distance_sums(
            padded, counts, real.padded, real.counts, real_pos, eps, chunk_elements, b_sq=real.sq_norms
        )
        out["edm"] = sums.sum() if reduction == "sum" else (sums / (n * m)).sum()
    return {c: out[c] for c in COMPONENTS if c in out}


def dire_loss(
    syn_emb: Tensor,
    syn_labels: Tensor,
    real: PackedEmbeddings,
    r_c: float,
    r_e: float,
    memory: Optional[ClassSums] = None,
    reduction: str = "mean",
    components: Iterable[str] = COMPONENTS,
    **kwargs,
) -> Tensor:
    """``L_syn = r_c · (CD + CDM) + r_e · EDM`` over the enabled components (module doc)."""
    comps = check_components(components)
    # Skip terms whose weight is 0: EDM is the only O(N·M·D) term and is often switched off.
    active = tuple(c for c in comps if (r_e if c == "edm" else r_c) != 0)
    if not active:
        return syn_emb.new_zeros((), dtype=torch.float32) * syn_emb.sum()
    terms = dire_components(syn_emb, syn_labels, real, memory, reduction, active, **kwargs)
    weights = {"cd": r_c, "cdm": r_c, "edm": r_e}
    return sum(weights[c] * v for c, v in terms.items())
