"""Diversity metrics for embeddings: coverage, Vendi score, intra-class cosine.

All functions accept a numpy array or a torch tensor of shape ``[N, D]`` (any real dtype;
float16 is upcast) and return plain Python floats. They run on the tensor's device.

* :func:`coverage` — Naeem et al. 2020, the value ``prdc.compute_prdc`` gives (with exact
  distances), in blocks of real rows: memory grows with ``chunk_size × N`` instead of the three
  dense ``N × N``-sized matrices prdc builds (≈ 6 GB at N = 20 000).
* :func:`vendi_score`, :func:`vendi_score_per_class` — Friedman & Dieng 2023 with the cosine
  kernel, any Rényi order, through the ``d × d`` dual matrix when ``n > d``.
* :func:`intra_class_cosine` — mean pairwise cosine within each class, in linear time.

Bad input (wrong shape, empty, NaN, ``k ≥ N``, ...) raises
:class:`~dire_plugin.errors.DiReInputError` with a one-line message.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Dict, Iterator, Optional, Tuple, Union

import torch
from torch import Tensor

from ..errors import DiReInputError
from ..regularizer.kernels import (
    class_row_sums,
    cosine_sum_within,
    normalize_rows,
    squared_norms,
)

__all__ = ["coverage", "vendi_score", "vendi_score_per_class", "intra_class_cosine"]

#: numpy array, torch tensor, or anything ``numpy.asarray`` takes.
ArrayLike = Any

#: Neighbour candidates taken per row beyond the rank needed; doubled for the rows where even
#: these cannot settle the answer (many points within the matmul's round-off of each other).
_CANDIDATE_MARGIN = 4


# --------------------------------------------------------------------------- input checks
def _as_tensor(x: ArrayLike, name: str) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach()
    import numpy as np  # only for non-tensor input: keeps numpy an optional dependency

    try:
        arr = np.asarray(x)
    except Exception as exc:  # ragged lists and the like
        raise DiReInputError(f"{name}: cannot be read as an array ({exc})") from None
    if arr.dtype.kind not in "biuf":
        raise DiReInputError(f"{name}: expected a numeric array, got dtype {arr.dtype}")
    return torch.from_numpy(np.ascontiguousarray(arr))


def _as_matrix(x: ArrayLike, name: str) -> Tensor:
    """``x`` as a floating ``[N, D]`` tensor with ``N, D ≥ 1`` and only finite entries."""
    t = _as_tensor(x, name)
    if t.dim() != 2:
        raise DiReInputError(f"{name}: expected a 2-D [N, D] array, got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise DiReInputError(f"{name}: empty input of shape {tuple(t.shape)}")
    if t.is_complex():
        raise DiReInputError(f"{name}: complex values are not supported")
    if not t.is_floating_point():
        t = t.to(torch.float64)
    if not bool(torch.isfinite(torch.stack(torch.aminmax(t))).all()):  # one pass; NaN propagates
        raise DiReInputError(f"{name}: contains NaN or infinite values")
    return t


def _as_labels(labels: ArrayLike, n: int) -> Tensor:
    t = _as_tensor(labels, "labels")
    if t.dim() != 1:
        raise DiReInputError(f"labels: expected a 1-D array of {n} labels, got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise DiReInputError(f"labels: expected integer labels, got dtype {t.dtype}")
    if t.numel() != n:
        raise DiReInputError(f"labels: {t.numel()} labels for {n} embeddings")
    return t.to(torch.long)


def _upcast(x: Tensor) -> Tensor:
    """Half precision is upcast: no CPU matmul or eigensolver should run in float16."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# --------------------------------------------------------------------------- coverage
def coverage(
    real: ArrayLike,
    fake: ArrayLike,
    k: int = 5,
    strict: bool = True,
    chunk_size: int = 1024,
    dtype: Optional[torch.dtype] = None,
) -> float:
    """Coverage of the real embeddings by the fake ones (Naeem et al. 2020)::

        r_i = NND_k(x_i)   (distance from x_i to its k-th nearest *other* real point)
        coverage = 1/N Σ_i [ min_j ‖x_i − y_j‖ < r_i ]

    The same value as ``prdc.compute_prdc(real, fake, k)["coverage"]``, with the same
    conventions: the radius is the ``(k+1)``-th smallest entry of x_i's row of the real-real
    distance matrix *including* its zero self-distance, so an exact duplicate of x_i counts as a
    neighbour at distance 0; for float32 input the distances are compared after rounding to
    float32, as scikit-learn returns them to prdc. Unlike prdc (numpy's ``argpartition`` needs
    ``k + 1 < N`` there), ``k = N − 1`` is allowed.

    ``strict=False`` uses ``<=``. The two differ only on exact ties, and the tie that matters is
    exact duplicates: when x_i has at least ``k`` exact copies among the real points its radius
    is 0, and with ``<`` it is never covered — not even by a fake equal to it (distance 0). prdc
    always uses ``<``; ``<=`` counts such points as covered by a fake on top of them (and any fake
    exactly on a radius, which takes exactly representable data such as integers).

    How it is computed: real rows in blocks of ``chunk_size``. Per block, one matmul of
    ``[a, 1]`` with ``[−2b, ‖b‖²]`` ranks all real (then all fake) points by
    ``‖b‖² − 2a·b = ‖a − b‖² − ‖a‖²`` — the row constant ``‖a‖²`` does not change a row's order —
    with no pass over the ``chunk × N`` block besides the matmul and ``topk``. Operands are centred
    at the real mean and scaled by a power of two (coverage is translation- and scale-free, and
    both keep the round-off small and the matmul in range). The expansion is off by at most
    ``ε = (2D + 32) · u · (‖a‖² + 2 max ‖b‖²)`` (``u``: unit round-off of the matmul dtype), so
    only points whose approximate distance lies within ``2ε`` of the approximate radius (or
    nearest-fake distance) can change the answer; those few are re-measured as ``Σ (a − b)²`` in
    float64, and points surely below are only counted. The result is therefore that of exact
    float64 distances whatever ``dtype``: duplicates are at distance exactly 0 (prdc's expansion
    leaves round-off there). The time grows with the number of points within round-off of a
    decision distance (near-duplicates); exact duplicate fakes are merged first. Peak memory is
    about ``chunk_size × max(N, M)`` matmul-dtype entries for the block, plus float64 copies of
    the inputs and three ``[N or M, D + 1]`` matmul operands.

    Args:
        real: ``[N, D]`` real embeddings.
        fake: ``[M, D]`` synthetic embeddings.
        k: neighbour rank of the radius, ``1 ≤ k < N``.
        strict: ``<`` (prdc) or ``<=`` (counts fakes on the boundary, see above).
        chunk_size: real rows per block.
        dtype: dtype of the candidate-picking matmul, ``torch.float32`` or ``torch.float64``.
            ``None``: float32 for float16/float32 input, float64 otherwise or when float32
            matmuls may use TF32/bfloat16 (``torch.set_float32_matmul_precision``). It changes
            the speed, not the result.

    Returns:
        The fraction of real points covered, in ``[0, 1]``.
    """
    x, y = _as_matrix(real, "real"), _as_matrix(fake, "fake")
    n = x.shape[0]
    if y.shape[1] != x.shape[1]:
        raise DiReInputError(f"fake: dimension {y.shape[1]} differs from real's {x.shape[1]}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < n:
        raise DiReInputError(f"k: need an integer with 1 <= k < N = {n} real points, got {k!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise DiReInputError(f"chunk_size: need a positive integer, got {chunk_size!r}")

    # prdc compares what scikit-learn returns: float32 distances iff both inputs are float32.
    real_cmp = torch.float32 if x.dtype == torch.float32 else torch.float64
    fake_cmp = torch.float32 if x.dtype == y.dtype == torch.float32 else torch.float64
    if dtype not in (None, torch.float32, torch.float64):
        raise DiReInputError(f"dtype: need torch.float32, torch.float64 or None, got {dtype!r}")
    if dtype is None:
        # A TF32/bfloat16 matmul would leave so much round-off that most candidates need
        # re-measuring: float64 is faster then.
        low = _upcast(x).dtype == _upcast(y).dtype == torch.float32 and not _reduced_precision_fp32_matmul()
        dtype = torch.float32 if low else torch.float64

    x64 = x.to(torch.float64)
    # The nearest-fake distance is the same over distinct fakes, and copies would all be tied
    # candidates to re-measure (a collapsed generator gives many).
    y64 = torch.unique(y.to(torch.float64), dim=0)
    lhs, real_rhs, fake_rhs = _ranking_operands(x64, y64, dtype)
    x_sq = real_rhs[:, -1]  # ‖a‖², scaled, matmul dtype
    x_sq64, y_sq64 = x_sq.to(torch.float64), fake_rhs[:, -1].to(torch.float64)
    slack = (2 * x.shape[1] + 32) * _unit_roundoff(dtype)
    eps_real = slack * (x_sq64 + 2 * x_sq64.max())
    eps_fake = slack * (x_sq64 + 2 * y_sq64.max())

    covered = 0
    for start in range(0, n, chunk_size):
        rows = slice(start, min(start + chunk_size, n))
        scores = lhs[rows] @ real_rhs.T
        diag = torch.arange(scores.shape[0], device=scores.device)
        scores[diag, diag + start] = -x_sq[rows]  # self-distance exactly 0 once ‖a‖² is added back
        radius2 = _exact_order_statistic(scores, x_sq64[rows], k, eps_real[rows], x64[rows], x64)
        scores = lhs[rows] @ fake_rhs.T
        nearest2 = _exact_order_statistic(scores, x_sq64[rows], 0, eps_fake[rows], x64[rows], y64)
        del scores
        radius, nearest = _as_compared(radius2, real_cmp), _as_compared(nearest2, fake_cmp)
        hit = nearest < radius if strict else nearest <= radius
        covered += int(hit.sum())
    return covered / n


def _ranking_operands(x64: Tensor, y64: Tensor, dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
    """``[a, 1]`` for the real rows and ``[−2b, ‖b‖²]`` for the real and the fake rows, centred at
    the real mean and scaled by a power of two into ``(−1, 1)``, in the matmul dtype."""
    mean = x64.mean(0)
    xc, yc = x64 - mean, y64 - mean
    # A power of two: exact, so ties stay ties; the matmul dtype neither overflows nor underflows.
    top = float(torch.cat([torch.stack(torch.aminmax(xc)), torch.stack(torch.aminmax(yc))]).abs().max())
    shift = -math.frexp(top)[1] if top > 0 else 0
    xc, yc = xc.mul_(2.0 ** shift).to(dtype), yc.mul_(2.0 ** shift).to(dtype)
    lhs = torch.cat([xc, xc.new_ones(len(xc), 1)], 1)
    real_rhs = torch.cat([-2 * xc, squared_norms(xc).unsqueeze(1)], 1)
    fake_rhs = torch.cat([-2 * yc, squared_norms(yc).unsqueeze(1)], 1)
    return lhs, real_rhs, fake_rhs


def _reduced_precision_fp32_matmul() -> bool:
    """Whether float32 matmuls may run in TF32 or bfloat16 (``set_float32_matmul_precision``)."""
    return torch.get_float32_matmul_precision() != "highest" or bool(torch.backends.cuda.matmul.allow_tf32)


def _unit_roundoff(dtype: torch.dtype) -> float:
    if dtype == torch.float32 and _reduced_precision_fp32_matmul():
        return 2.0 ** -8  # bfloat16 keeps 8 significant bits (TF32: 11); take the worse
    return torch.finfo(dtype).eps / 2


def _exact_order_statistic(
    scores: Tensor, offset: Tensor, rank: int, eps: Tensor, a64: Tensor, pool64: Tensor
) -> Tensor:
    """The ``(rank+1)``-th smallest exact squared distance from each row of ``a64`` to the rows of
    ``pool64``, given ``scores + offset`` (``[c, P]`` + ``[c]``) within ``eps`` (``[c]``) of the
    (scaled) squared distances.

    ``topk`` takes candidates; a row is settled once its last candidate is surely beyond the
    ``(rank+1)``-th (more than ``2 eps`` above it), else it retries with twice as many.
    """
    n_pool = scores.shape[1]
    take = min(n_pool, rank + 1 + _CANDIDATE_MARGIN)
    out = a64.new_empty(scores.shape[0])
    rows = torch.arange(scores.shape[0], device=scores.device)
    block = scores  # the pending rows' scores; no copy while every row is pending
    while True:
        values, idx = torch.topk(block, take, dim=1, largest=False, sorted=True)
        approx = values.to(torch.float64) + offset[rows].unsqueeze(1)
        settled = (approx[:, -1] > approx[:, rank] + 2 * eps[rows]) | (take == n_pool)
        if bool(settled.all()):
            out[rows] = _resolve(approx, idx, rank, eps[rows], a64[rows], pool64)
            return out
        done = settled.nonzero().squeeze(1)
        if done.numel():
            out[rows[done]] = _resolve(approx[done], idx[done], rank, eps[rows[done]], a64[rows[done]], pool64)
        rows = rows[~settled]
        block = scores.index_select(0, rows)
        take = min(n_pool, 2 * take)


def _resolve(approx: Tensor, idx: Tensor, rank: int, eps: Tensor, a64: Tensor, pool64: Tensor) -> Tensor:
    """Exact ``(rank+1)``-th smallest of sorted candidates ``approx`` (all farther points known to
    be beyond it). The order statistic moves by at most ``eps``, so candidates more than ``2 eps``
    below the approximate one are surely smaller (kept as ``-inf``: only their count matters) and
    those more than ``2 eps`` above surely larger (``inf``); only the window between is measured."""
    bound, eps = approx[:, rank:rank + 1], eps.unsqueeze(1)
    below = approx < bound - 2 * eps
    window = ~below & (approx <= bound + 2 * eps)
    exact = torch.where(below, -math.inf, math.inf).to(approx.dtype)
    r, j = window.nonzero(as_tuple=True)
    exact[r, j] = _pair_sq_distances(a64, r, pool64, idx[r, j])
    return torch.kthvalue(exact, rank + 1, dim=1).values


def _pair_sq_distances(a64: Tensor, ia: Tensor, b64: Tensor, ib: Tensor) -> Tensor:
    """``Σ_d (a[ia_p] − b[ib_p])²`` for each pair ``p``, float64, in slices of ≈ 32 MB.

    Direct differences, not the expansion: duplicates give exactly 0 and integer data is exact.
    (Not ``squared_norms``: its ``norm().square()`` is not exact at integers, ``sqrt(2)² ≠ 2``.)
    """
    out = a64.new_empty(ia.shape[0])
    step = max(1, (1 << 22) // max(a64.shape[1], 1))
    for s in range(0, ia.shape[0], step):
        diff = a64.index_select(0, ia[s:s + step]) - b64.index_select(0, ib[s:s + step])
        out[s:s + step] = torch.linalg.vecdot(diff, diff)
    return out


def _as_compared(d2: Tensor, dtype: torch.dtype) -> Tensor:
    """Distances as prdc compares them: scikit-learn rounds float32 inputs' squared distances to
    float32 before its square root, and rounding can turn a strict ``<`` into a tie."""
    return d2.to(dtype).sqrt()


# --------------------------------------------------------------------------- Vendi score
def vendi_score(x: ArrayLike, q: float = 1.0, normalize: bool = True) -> float:
    """Vendi score of order ``q`` with the cosine kernel (Friedman & Dieng 2023; Pasarkar &
    Dieng 2024 for ``q ≠ 1``)::

        K = X̂ X̂ᵀ,  x̂_i = x_i / ‖x_i‖,  λ = eigenvalues of K / n  (above round-off, renormalised: Σλ = 1)
        q = 1:  VS = exp(−Σ λ log λ)
        q = 0:  VS = #{λ > 0}  (the numerical rank: see the tolerance below)
        q = ∞:  VS = 1 / max(λ)
        else:   VS = (Σ λ^q)^(1 / (1 − q))

    ``X̂ᵀX̂ / n`` (``d × d``) has the same non-zero eigenvalues as ``K / n``, so that is what is
    decomposed when ``n > d``. Computed in float64 whatever the input dtype.

    Conventions:

    * Eigenvalues ``≤ max(λ) · max(n, d) · eps_float64`` are round-off of zero eigenvalues (of
      either sign: ``K`` is positive semi-definite) and are dropped, for every order. For
      ``q ≥ 1`` they are invisible; for ``q < 1`` they are not: ``q = 0`` would count them, and at
      ``q = 0.5`` a hundred eigenvalues of 1e-17 add 3e-7 to ``Σ λ^q``. So ``q = 0`` is the
      numerical rank of ``K``, and the score does not depend on which of ``K`` or ``X̂ᵀX̂`` is
      decomposed.
    * ``vendi_score.vendi.score_dual`` drops only eigenvalues ``≤ 0``: its ``q = 0`` counts every
      positive round-off eigenvalue (≈ half of the ``d − rank`` zero ones) and its ``q < 1`` values
      are off by that much when ``d > rank``. ``score_X`` ignores its ``q`` (always order 1).
      For ``q ≥ 1`` both equal this function up to round-off.
    * Zero rows: rows are normalised as ``x / max(‖x‖, 1e-8)``, so a zero embedding stays a zero
      vector with zero self-similarity and ``trace(K / n) < 1``; renormalising the eigenvalues
      by their sum makes the score that of the non-zero rows alone. If every row is zero the
      score is undefined and ``nan`` is returned. (A row with ``0 < ‖x‖ < 1e-8`` is scaled by 1e8,
      not to unit length, as in :func:`~dire_plugin.regularizer.kernels.normalize_rows`.)
    * ``normalize=False`` uses the linear kernel ``K = XXᵀ`` on the rows as given; with the
      renormalisation that is the Vendi score of ``K / trace(K)``, and equals the reference only
      for unit-norm rows.

    Args:
        x: ``[n, d]`` embeddings.
        q: order, ``q ≥ 0``; ``math.inf`` or ``"inf"`` for the max-eigenvalue limit.
        normalize: use the cosine kernel (default) rather than the linear one.
    """
    return _vendi(_as_matrix(x, "x"), _check_order(q), normalize)


def vendi_score_per_class(
    x: ArrayLike, labels: ArrayLike, q: float = 1.0, normalize: bool = True
) -> Tuple[float, Dict[int, float]]:
    """Vendi score of each class's embeddings and their mean over classes::

        mean = 1/|C| Σ_c VS_q({x_i : y_i = c})

    A one-sample class scores 1. A class whose rows are all zero has no defined score: it is
    reported as ``nan`` and left out of the mean (``nan`` if no class has a score).

    Returns:
        ``(mean, {class label: score})``.
    """
    emb = _as_matrix(x, "x")
    lab = _as_labels(labels, emb.shape[0])
    order = _check_order(q)
    per_class: Dict[int, float] = {}
    for c in torch.unique(lab, sorted=True).tolist():
        per_class[int(c)] = _vendi(emb[lab == c], order, normalize)
    return _mean_defined(per_class.values()), per_class


def _check_order(q: Union[float, str]) -> float:
    try:
        order = float(q)
    except (TypeError, ValueError):
        raise DiReInputError(f"q: expected a number >= 0 or 'inf', got {q!r}") from None
    if math.isnan(order) or order < 0:
        raise DiReInputError(f"q: the order must be >= 0, got {q!r}")
    return order


def _vendi(x: Tensor, q: float, normalize: bool) -> float:
    lam = _kernel_eigenvalues(x, normalize)
    return _hill_number(lam, q) if lam.numel() else math.nan


def _kernel_eigenvalues(x: Tensor, normalize: bool) -> Tensor:
    """Eigenvalues of ``K / n`` above round-off, float64, divided by their sum (empty if ``K = 0``)."""
    x64 = x.to(torch.float64)
    if normalize:
        x64 = normalize_rows(x64)
    n, d = x64.shape
    # Same non-zero spectrum; the smaller matrix is the cheaper decomposition.
    gram = x64.T @ x64 if n > d else x64 @ x64.T
    with _one_cpu_thread(gram.device):
        lam = torch.linalg.eigvalsh(gram / n)
    # The eigensolver's absolute error is about max(λ)·size·eps; below that a value is a zero
    # eigenvalue's round-off. K = 0 (all rows zero) gives tol = 0 and nothing kept.
    tol = max(float(lam.max()), 0.0) * max(n, d) * torch.finfo(lam.dtype).eps
    lam = lam[lam > tol]
    return lam / lam.sum() if lam.numel() else lam


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run the block with one intra-op thread on the CPU, then restore the setting.

    Threaded LAPACK eigensolvers stall when the cores are shared: measured on a loaded 2-core
    machine, ``eigvalsh`` of a 512 × 512 matrix took 6.9 s with 2 threads and 0.027 s with one
    (2048 × 2048: 3.5 s against 1.2 s). The setting is process-wide while the block runs.
    """
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _hill_number(lam: Tensor, q: float) -> float:
    """``exp`` of the Rényi entropy of order ``q`` of the distribution ``lam`` (sums to 1)."""
    if q == 0:
        return float(lam.numel())
    if q == 1:
        return math.exp(-float((lam * lam.log()).sum()))
    if math.isinf(q):
        return 1.0 / float(lam.max())
    return float(lam.pow(q).sum()) ** (1.0 / (1.0 - q))


def _mean_defined(values) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


# --------------------------------------------------------------------------- intra-class cosine
def intra_class_cosine(
    emb: ArrayLike, labels: ArrayLike, per_class: bool = False
) -> Union[float, Tuple[float, Dict[int, float]]]:
    """Mean over classes of the mean pairwise cosine similarity within the class::

        ICC_c = 1 / (n_c (n_c − 1)) Σ_{i ≠ j, y_i = y_j = c} cos(x_i, x_j)
              = (‖Σ_i x̂_i‖² − Σ_i ‖x̂_i‖²) / (n_c (n_c − 1))
        ICC   = mean over classes with n_c ≥ 2

    The identity makes it linear in the number of embeddings (no ``n_c × n_c`` matrix).
    Computed in float64. A zero embedding has cosine 0 with everything (it still counts in
    ``n_c``). Classes with a single sample have no pair and are skipped: they appear neither in
    the mean nor in the per-class dict; if every class has one sample the mean is ``nan``.

    Args:
        emb: ``[N, D]`` embeddings.
        labels: ``[N]`` integer class labels.
        per_class: also return ``{class label: ICC_c}`` (the paper's Figure 2).

    Returns:
        The mean, or ``(mean, {class: value})`` when ``per_class`` is true.
    """
    x = _as_matrix(emb, "emb")
    lab = _as_labels(labels, x.shape[0])
    classes, slot = torch.unique(lab, sorted=True, return_inverse=True)
    unit = normalize_rows(x.to(torch.float64))
    sums = class_row_sums(unit, slot, len(classes))
    unit_sq = class_row_sums(squared_norms(unit).unsqueeze(1), slot, len(classes)).squeeze(1)
    within = cosine_sum_within(sums, unit_sq, include_diagonal=False)
    counts = torch.bincount(slot, minlength=len(classes)).to(torch.float64)
    keep = counts >= 2
    values = within[keep] / (counts[keep] * (counts[keep] - 1))
    mean = float(values.mean()) if values.numel() else math.nan
    if not per_class:
        return mean
    return mean, dict(zip(classes[keep].tolist(), values.tolist()))
