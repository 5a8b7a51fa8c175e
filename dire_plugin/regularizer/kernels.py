"""Pure functional kernels for the DiRe terms, batched over classes.

Everything here is stateless and works on plain tensors, in the style of
``torchmetrics.functional``; the stateful pieces (``DiReLoss``, the banks) sit on top.

Conventions
-----------
* Class-grouped data is *padded*: ``x`` of shape ``[C, N, D]`` with ``counts[c]`` valid rows
  per class (rows past the count are ignored, whatever they hold).
* Cosine terms never build a pairwise matrix. With unit rows ``â_i = a_i / max(‖a_i‖, eps)``::

      Σ_i Σ_j cos(a_i, b_j) = (Σ_i â_i) · (Σ_j b̂_j)

  so a class costs ``O((N + M) D)`` instead of ``O(N M D)``.
* Euclidean distances use ``d² = ‖a‖² + ‖b‖² − 2 a·b`` through a batched matmul, a *safe*
  square root (distances below ``eps`` count as ``eps`` with zero gradient, so an embedding equal
  to a real one — real-image initialisation — gives finite gradients), and a custom autograd
  function that recomputes in chunks during backward, so peak memory is bounded by the chunk
  size and not by ``N × M``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .defaults import LOGDET_KERNELS

__all__ = [
    "DEFAULT_EPS",
    "DEFAULT_CHUNK_ELEMENTS",
    "normalize_rows",
    "squared_norms",
    "squared_euclidean",
    "safe_sqrt",
    "pairwise_cosine",
    "pairwise_euclidean",
    "group_by_class",
    "class_row_sums",
    "unit_row_sums",
    "ranks_in_class",
    "cosine_sum_within",
    "cosine_sum_between",
    "euclidean_distance_sums",
    "LOGDET_KERNELS",
    "logdet_diversity",
]

#: Norms and distances below this are treated as this value. Small enough to be invisible for
#: penultimate-layer features (norms of order 1–100), large enough to keep 1/eps finite in float32.
DEFAULT_EPS = 1e-8

#: Added to the diagonal of a class's kernel matrix in the log-det term: −log det(K + ridge·I).
#: With ridge 1 this is the log-normaliser of the L-ensemble DPP with kernel K, and the gradient
#: (K + I)⁻¹ has norm at most 1, so duplicates and single images stay finite and tame.
LOGDET_RIDGE = 1.0
#: The RBF's exp(−γ‖x̂_i − x̂_j‖²) on unit rows, where ‖x̂_i − x̂_j‖² lies in [0, 4].
RBF_GAMMA = 1.0

#: Elements of one distance block ``[classes, N, M]`` computed at a time (≈ 64 MiB in float32).
DEFAULT_CHUNK_ELEMENTS = 1 << 24


def normalize_rows(x: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """Rows scaled to unit length: ``x_i / max(‖x_i‖, eps)``.

    A zero row stays zero (its cosine with anything is 0), and the gradient stays finite.
    """
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def squared_norms(x: Tensor) -> Tensor:
    """``‖x_i‖²`` over the last dimension, without a temporary the size of ``x``.

    ``(x * x).sum(-1)`` materialises ``x * x``: for a real-embedding bank that is a copy of the
    whole bank (2.6 GB for ImageNet-1K) and, measured here, most of the loss's time.
    """
    return torch.linalg.vector_norm(x, dim=-1).square()


def squared_euclidean(x: Tensor, y: Tensor, y_sq: Optional[Tensor] = None) -> Tensor:
    """``‖x_i − y_j‖²`` for every pair, shape ``[..., N, M]``, clamped at 0.

    Batched: ``x`` is ``[..., N, D]``, ``y`` is ``[..., M, D]``; ``y_sq`` are ``y``'s squared norms
    if already known. Uses the matmul expansion: one ``N × M × D`` matmul, no ``N × M × D``
    temporary.
    """
    xx = squared_norms(x).unsqueeze(-1)
    yy = (squared_norms(y) if y_sq is None else y_sq).unsqueeze(-2)
    if x.dim() == 3:  # fused: one pass over the [C, N, M] result instead of three
        return torch.baddbmm(xx + yy, x, y.transpose(-1, -2), alpha=-2.0).clamp_min_(0.0)
    return (xx + yy - 2.0 * (x @ y.transpose(-1, -2))).clamp_min_(0.0)


def safe_sqrt(d2: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """``sqrt(max(d², eps²))``: distances below ``eps`` are ``eps`` and have zero gradient.

    ``torch.sqrt`` has an infinite derivative at 0 (NaN after the chain rule when a synthetic
    embedding equals a real one); clamping first makes the gradient 0 there instead.
    """
    return d2.clamp_min(eps * eps).sqrt()


def pairwise_cosine(x: Tensor, y: Optional[Tensor] = None, eps: float = DEFAULT_EPS) -> Tensor:
    """Dense cosine-similarity matrix ``cos(x_i, y_j)`` (``y = x`` when omitted).

    For reports and tests; the loss never builds this matrix.
    """
    xn = normalize_rows(x, eps)
    yn = xn if y is None else normalize_rows(y, eps)
    return xn @ yn.transpose(-1, -2)


def pairwise_euclidean(x: Tensor, y: Optional[Tensor] = None, eps: float = 0.0) -> Tensor:
    """Dense Euclidean-distance matrix ``‖x_i − y_j‖`` (``y = x`` when omitted).

    ``eps = 0`` gives exact zeros for identical rows (metrics); pass ``eps > 0`` for a
    differentiable version (see :func:`safe_sqrt`).
    """
    d2 = squared_euclidean(x, x if y is None else y)
    return safe_sqrt(d2, eps) if eps > 0 else d2.sqrt()


def group_by_class(
    x: Tensor, labels: Tensor, classes: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor, Tensor]:
    """Scatter rows of ``x`` into a padded ``[C, N_max, D]`` tensor, one slot per class.

    Args:
        x: ``[N, D]`` rows in any order.
        labels: ``[N]`` integer labels, unsorted, any counts.
        classes: the classes to lay out, in this order; defaults to the sorted unique labels.
            Every label must be among them.

    Returns:
        ``(padded, counts, classes)``: padding rows are zero. Differentiable with respect to ``x``.
    """
    labels = labels.reshape(-1).to(torch.long)
    if classes is None:
        classes, slot = torch.unique(labels, sorted=True, return_inverse=True)
    else:
        classes = classes.to(device=labels.device, dtype=torch.long)
        slot = torch.searchsorted(classes.sort().values, labels)
        # Map sorted positions back to the caller's order of ``classes``.
        order = classes.argsort()
        slot = order[slot.clamp_max(len(classes) - 1)]
        if not bool((classes[slot] == labels).all()):
            missing = labels[classes[slot] != labels].unique().tolist()
            raise ValueError(f"labels {missing} are not among the classes to group by")
    num_classes = len(classes)
    counts = torch.bincount(slot, minlength=num_classes)
    n_max = int(counts.max()) if len(labels) else 0
    padded = x.new_zeros(num_classes, n_max, x.shape[-1])
    padded = padded.index_put((slot, ranks_in_class(slot, counts)), x)
    return padded, counts, classes


def ranks_in_class(slot: Tensor, counts: Tensor) -> Tensor:
    """Position of each row among the rows of its class, in input order (stable)."""
    sorted_slot, perm = torch.sort(slot, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(slot)
    rank[perm] = torch.arange(len(slot), device=slot.device) - starts[sorted_slot]
    return rank


def class_row_sums(x: Tensor, slot: Tensor, num_classes: int) -> Tensor:
    """``out[c] = Σ_{i: slot_i = c} x_i``, shape ``[C, D]`` (unpadded rows, one pass)."""
    return x.new_zeros(num_classes, x.shape[-1]).index_add(0, slot, x)


class _UnitRowSums(torch.autograd.Function):
    """``s_c = Σ_{i: slot_i = c} x_i / max(‖x_i‖, eps)`` with a hand-written backward.

    ``∂s/∂x_i`` applied to ``g`` is ``(g − x̂_i (x̂_i·g)) / ‖x_i‖`` (the projection off ``x̂_i``),
    or ``g / eps`` below ``eps``. Autograd's version of the same chain (norm, clamp, divide,
    scatter) took longer than the forward of all cosine terms together.
    """

    @staticmethod
    def forward(ctx, x, slot, num_classes, eps):  # type: ignore[override]
        norms = x.norm(dim=-1, keepdim=True)
        scale = norms.clamp_min(eps)
        unit = x / scale
        ctx.save_for_backward(unit, scale, slot, norms >= eps)
        return x.new_zeros(num_classes, x.shape[-1]).index_add_(0, slot, unit)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        unit, scale, slot, above = ctx.saved_tensors
        g = grad.index_select(0, slot)
        radial = (unit * g).sum(-1, keepdim=True) * above
        return (g - unit * radial) / scale, None, None, None


def unit_row_sums(x: Tensor, slot: Tensor, num_classes: int, eps: float = DEFAULT_EPS) -> Tensor:
    """``out[c] = Σ_{i: slot_i = c} x_i / max(‖x_i‖, eps)``, shape ``[C, D]``, differentiable in ``x``.

    The same as ``class_row_sums(normalize_rows(x, eps), slot, C)``, faster in backward.
    """
    return _UnitRowSums.apply(x, slot, int(num_classes), float(eps))


def cosine_sum_within(unit_sums: Tensor, unit_sq_norms: Tensor, include_diagonal: bool) -> Tensor:
    """``Σ_i Σ_j cos(a_i, a_j)`` per class from unit-row sums ``s_c = Σ_i â_i``.

    ``Σ_ij cos = ‖s_c‖²``; without the diagonal subtract ``Σ_i ‖â_i‖²`` (``unit_sq_norms``: 1 per
    non-zero row, 0 per zero row).
    """
    total = (unit_sums * unit_sums).sum(-1)
    return total if include_diagonal else total - unit_sq_norms


def cosine_sum_between(unit_sums_a: Tensor, unit_sums_b: Tensor) -> Tensor:
    """``Σ_i Σ_j cos(a_i, b_j) = (Σ_i â_i) · (Σ_j b̂_j)`` per class."""
    return (unit_sums_a * unit_sums_b).sum(-1)


def _valid_mask(counts: Tensor, size: int) -> Tensor:
    return torch.arange(size, device=counts.device) < counts.unsqueeze(1)


class _Blocks:
    """Blocks of about ``chunk_elements`` distance entries: class chunks and, when one class alone
    is too large, chunks of its real rows.

    Only a block's classes of ``b`` are gathered and upcast: gathering the whole bank per step
    would copy it every iteration (≈ 2.6 GB for ImageNet-1K at 1300 × 512 per class). Masks are
    built only where a class is padded.
    """

    def __init__(self, a, counts_a, b, b_sq, counts_b, class_index, chunk_elements: int) -> None:
        self.a, self.counts_a, self.b, self.b_sq, self.counts_b = a, counts_a, b, b_sq, counts_b
        self.class_index = class_index
        n, m = a.shape[1], b.shape[1]
        self.m_step = max(1, min(m, chunk_elements // max(n, 1)))
        self.c_step = lambda rows: max(1, chunk_elements // max(n * rows, 1))
        self.identity = len(class_index) == b.shape[0] and bool(
            (class_index == torch.arange(len(class_index), device=class_index.device)).all()
        )
        self.padded_a = bool((counts_a < n).any())
        self.padded_b = bool((counts_b.index_select(0, class_index) < m).any())
        self.single = self.m_step >= m and self.c_step(m) >= a.shape[0]

    def __iter__(self):
        a, b, n, m = self.a, self.b, self.a.shape[1], self.b.shape[1]
        for m_start in range(0, m, self.m_step):
            rows = slice(m_start, min(m_start + self.m_step, m))
            for c_start in range(0, a.shape[0], self.c_step(rows.stop - rows.start)):
                cs = slice(c_start, min(c_start + self.c_step(rows.stop - rows.start), a.shape[0]))
                idx = self.class_index[cs]
                if self.identity:
                    bb, bsq = b[cs, rows], self.b_sq[cs, rows]
                else:
                    bb, bsq = b[:, rows].index_select(0, idx), self.b_sq[:, rows].index_select(0, idx)
                valid = None
                if self.padded_a or self.padded_b:
                    nb = (self.counts_b[idx] - m_start).clamp(0, rows.stop - rows.start)
                    valid = _valid_mask(self.counts_a[cs], n).unsqueeze(2) & _valid_mask(nb, bb.shape[1]).unsqueeze(1)
                yield cs, a[cs], bb.to(a.dtype), bsq.to(a.dtype), valid


def _inverse_distances(d2: Tensor, valid: Optional[Tensor], eps2: float) -> Tensor:
    """``1/d`` where the safe square root has slope (valid entries above ``eps``), else 0."""
    keep = d2 > eps2 if valid is None else valid & (d2 > eps2)
    return torch.where(keep, d2.clamp_min(eps2).rsqrt(), 0.0)


class _EuclideanDistanceSums(torch.autograd.Function):
    """Per-class ``Σ_i Σ_j ‖a_i − b_j‖`` whose memory is bounded by one block.

    ``∂/∂a_i = Σ_j (a_i − b_j) / d_ij = a_i Σ_j w_ij − Σ_j w_ij b_j`` with ``w_ij = 1/d_ij`` for
    valid entries above ``eps`` and 0 otherwise (the clamped region of :func:`safe_sqrt` has
    zero slope). When everything fits in one block, ``w`` is kept from the forward; otherwise
    backward recomputes block by block. ``b`` (real embeddings) never receives a gradient.
    """

    @staticmethod
    def forward(ctx, a, counts_a, b, b_sq, counts_b, class_index, eps, chunk_elements):  # type: ignore[override]
        blocks = _Blocks(a, counts_a, b, b_sq, counts_b, class_index, chunk_elements)
        out = a.new_zeros(a.shape[0])
        eps2 = eps * eps
        kept = None
        for cs, ab, bb, bsq, valid in blocks:
            d2 = squared_euclidean(ab, bb, bsq)
            w = _inverse_distances(d2, valid, eps2)
            # d = d2 / d where the slope is kept; entries at the eps floor (an embedding equal to a
            # real one) and padding contribute eps and 0.
            d = d2 * w
            if valid is None:
                floor = d2 <= eps2
            else:
                floor = valid & (d2 <= eps2)
            out[cs] += d.sum((1, 2)) + eps * floor.sum((1, 2)).to(d.dtype)
            if blocks.single:
                kept = w
        ctx.save_for_backward(a, counts_a, b, b_sq, counts_b, class_index, kept)
        ctx.eps, ctx.chunk = eps, chunk_elements
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        a, counts_a, b, b_sq, counts_b, class_index, kept = ctx.saved_tensors
        grad_a = torch.zeros_like(a)
        for cs, ab, bb, bsq, valid in _Blocks(a, counts_a, b, b_sq, counts_b, class_index, ctx.chunk):
            w = kept if kept is not None else _inverse_distances(squared_euclidean(ab, bb, bsq), valid, ctx.eps ** 2)
            g = torch.baddbmm(ab * w.sum(2, keepdim=True), w, bb, alpha=-1.0)
            grad_a[cs] += g * grad_out[cs].view(-1, 1, 1)
        return grad_a, None, None, None, None, None, None, None


def euclidean_distance_sums(
    a: Tensor,
    counts_a: Tensor,
    b: Tensor,
    counts_b: Tensor,
    class_index: Optional[Tensor] = None,
    eps: float = DEFAULT_EPS,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    b_sq: Optional[Tensor] = None,
) -> Tensor:
    """Per-class sum of safe Euclidean distances ``Σ_{i<n_c} Σ_{j<m_c} max(‖a_ci − b_kj‖, eps)``.

    Args:
        a: ``[C, N, D]`` padded synthetic embeddings (gradients flow to it).
        counts_a: ``[C]`` valid rows of ``a``.
        b: ``[K, M, D]`` padded real embeddings, any dtype (upcast per block); never differentiated.
        counts_b: ``[K]`` valid rows of ``b``.
        class_index: ``[C]`` row of ``b`` for each class of ``a`` (default ``arange(C)``).
        eps: distance floor of :func:`safe_sqrt`.
        chunk_elements: entries of one ``[classes, N, M]`` block; bounds forward and backward memory.
        b_sq: ``[K, M]`` squared norms of ``b`` (a bank computes them once); computed if omitted.

    Returns:
        ``[C]`` tensor of distance sums.
    """
    if class_index is None:
        class_index = torch.arange(a.shape[0], device=a.device)
    b = b.detach()
    if b_sq is None:
        b_sq = squared_norms(b.float() if b.dtype not in (torch.float32, torch.float64) else b)
    return _EuclideanDistanceSums.apply(a, counts_a, b, b_sq.detach(), counts_b, class_index, eps, int(chunk_elements))


def logdet_diversity(
    x: Tensor,
    counts: Tensor,
    memory: Optional[Tensor] = None,
    memory_counts: Optional[Tensor] = None,
    kernel: str = "cosine",
    ridge: float = LOGDET_RIDGE,
    gamma: float = RBF_GAMMA,
    eps: float = DEFAULT_EPS,
) -> Tensor:
    r"""``[C]``: per class c, ``−log det(K_c + ridge·I)`` over the class's rows.

    ``x [C, N, D]`` holds ``counts[c]`` current rows per class, ``memory [C, K, D]`` (constants:
    finished images) ``memory_counts[c]``; both are normalised to unit rows ``x̂``. ``K_c`` is the
    kernel matrix of those ``m_c = n_c + k_c`` rows: ``x̂_i·x̂_j`` (``"cosine"``) or
    ``exp(−γ‖x̂_i − x̂_j‖²)`` (``"rbf"``). Minimising it spreads a class over many directions at
    once (for unit rows ``tr K = m_c`` is fixed, and ``det(K + I)`` is largest when the
    eigenvalues are equal). Padding rows get a diagonal of 1 and contribute ``log 1 = 0``: one
    batched Cholesky over the padded blocks, no loop over classes.
    """
    if kernel not in LOGDET_KERNELS:
        raise ValueError(f"kernel must be one of {LOGDET_KERNELS}, got {kernel!r}")
    z = normalize_rows(x, eps)
    valid = _valid_mask(counts.to(x.device), x.shape[1])
    if memory is not None and memory.shape[1]:
        z = torch.cat([z, normalize_rows(memory.to(device=z.device, dtype=z.dtype), eps).detach()], 1)
        valid = torch.cat([valid, _valid_mask(memory_counts.to(x.device), memory.shape[1])], 1)
    z = z * valid.unsqueeze(-1)
    gram = torch.bmm(z, z.transpose(1, 2))
    if kernel == "rbf":
        both = valid.unsqueeze(-1) & valid.unsqueeze(-2)
        gram = torch.exp(-gamma * (2.0 - 2.0 * gram).clamp_min(0.0)) * both
    diagonal = torch.where(valid, gram.new_tensor(ridge), gram.new_tensor(1.0))
    return _NegLogDetSPD.apply(gram + torch.diag_embed(diagonal))


class _NegLogDetSPD(torch.autograd.Function):
    """``−log det A`` of symmetric positive definite blocks ``A [C, M, M]``, from one batched
    Cholesky; backward ``−A⁻¹`` from the same factor (``cholesky_inverse``): autograd's own
    Cholesky backward runs two batched triangular solves and took most of the term's time."""

    @staticmethod
    def forward(ctx, a: Tensor) -> Tensor:
        chol = torch.linalg.cholesky(a)
        ctx.save_for_backward(chol)
        return -2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (chol,) = ctx.saved_tensors
        return -grad[:, None, None] * torch.cholesky_inverse(chol)
