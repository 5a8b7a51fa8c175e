"""Diversity metrics against the reference packages (prdc, vendi-score) and literal loops."""
import contextlib
import io
import math

import numpy as np
import pytest
import torch

from dire_plugin.errors import DiReInputError
from dire_plugin.metrics import coverage, intra_class_cosine, vendi_score, vendi_score_per_class

prdc = pytest.importorskip("prdc")
vendi = pytest.importorskip("vendi_score.vendi")


def _rng(seed):
    return np.random.default_rng(seed)


def _prdc_coverage(real, fake, k):
    with contextlib.redirect_stdout(io.StringIO()):  # compute_prdc prints the sizes
        return float(prdc.compute_prdc(real, fake, nearest_k=k)["coverage"])


def _loop_coverage(real, fake, k, strict=True):
    """Naeem et al.'s definition, one pair at a time, float64 direct differences."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    covered = 0
    for x in real:
        to_real = sorted(math.sqrt(float(((x - r) ** 2).sum())) for r in real)  # self at 0
        radius = to_real[k]  # k-th nearest other point: the self-distance is entry 0
        nearest = min(math.sqrt(float(((x - f) ** 2).sum())) for f in fake)
        covered += nearest < radius if strict else nearest <= radius
    return covered / len(real)


# --------------------------------------------------------------------------- coverage
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k,chunk", [(1, 7), (3, 1024), (5, 13)])
def test_coverage_matches_prdc_and_loop_on_random_data(seed, dtype, k, chunk):
    rng = _rng(seed)
    real = rng.standard_normal((61, 16)).astype(dtype)  # 61: no chunk size above divides it
    fake = (0.8 * rng.standard_normal((23, 16)) + 0.2).astype(dtype)
    got = coverage(real, fake, k=k, chunk_size=chunk)
    assert got == _prdc_coverage(real, fake, k)
    assert got == _loop_coverage(real, fake, k)
    assert 0.0 < got < 1.0  # the data is not trivially all- or none-covered


@pytest.mark.parametrize("seed", [0, 1])
def test_coverage_far_from_origin_float32(seed):
    """Large offset, small spread: the matmul expansion cancels badly in float32 unless centred."""
    rng = _rng(seed)
    real = (300.0 + rng.standard_normal((80, 32))).astype(np.float32)
    fake = (300.0 + 0.9 * rng.standard_normal((30, 32))).astype(np.float32)
    expected = _prdc_coverage(real, fake, 4)
    assert coverage(real, fake, k=4, chunk_size=9) == expected
    assert coverage(real, fake, k=4, chunk_size=9, dtype=torch.float64) == expected


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("chunk", [1, 10, 1024])
def test_coverage_duplicates_on_integer_data_match_prdc(k, chunk):
    """Integer coordinates make every distance exact in float64 for prdc too, so duplicates and
    ties are decided the same way by both: duplicated real points, duplicated fakes, fakes equal
    to real points."""
    rng = _rng(k)
    base = rng.integers(-3, 4, size=(20, 6))
    zeros = np.zeros((2, 6))  # zero vectors are ordinary points here, duplicated
    real = np.concatenate([base, base[:8], base[:3], zeros]).astype(np.float64)  # some points 3 times
    fake = np.concatenate([base[:5], base[:5], rng.integers(-3, 4, size=(12, 6)), zeros[:1]]).astype(np.float64)
    strict = coverage(real, fake, k=k, chunk_size=chunk)
    assert strict == _prdc_coverage(real, fake, k) == _loop_coverage(real, fake, k)
    loose = coverage(real, fake, k=k, strict=False, chunk_size=chunk)
    assert loose == _loop_coverage(real, fake, k, strict=False)
    assert loose >= strict
    # float32 input: prdc compares float32 distances; the exact values survive the rounding here
    assert coverage(real.astype(np.float32), fake.astype(np.float32), k=k, chunk_size=chunk) == strict


def test_coverage_fake_equal_to_duplicated_real_point_strict_vs_not():
    # Point A = (0, 0) appears twice among the real points, so with k = 1 its radius is 0.
    real = np.array([[0.0, 0.0], [0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    fake = np.array([[0.0, 0.0]])  # equal to A: distance exactly 0
    # strict: A is not covered (0 < 0 is false); (10, 0), (0, 10) have radius 10 and their
    # nearest fake is at distance 10: not covered either.
    assert coverage(real, fake, k=1) == 0.0 == _loop_coverage(real, fake, 1)
    # non-strict: both copies of A (0 <= 0) and the two far points (10 <= 10) are covered.
    assert coverage(real, fake, k=1, strict=False) == 1.0 == _loop_coverage(real, fake, 1, strict=False)
    # prdc (it needs more than k + 1 fakes: add three far away ones) agrees with strict
    far = np.full((3, 2), 100.0)
    assert _prdc_coverage(real, np.concatenate([fake, far]), 1) == 0.0
    # k = 2: A's radius is its distance to a far point (10), so a fake on it covers it either way.
    assert coverage(real, fake, k=2) == 0.5


def test_coverage_float_duplicates_are_exactly_zero():
    """Non-integer data: prdc's ``‖a‖² + ‖b‖² − 2ab`` leaves round-off where a duplicate should be
    at 0; re-measured candidates are exact, so the result is the loop's."""
    rng = _rng(5)
    base = rng.standard_normal((15, 10)) * 7.3
    real = np.concatenate([base, base[:6]])
    fake = np.concatenate([base[:4], rng.standard_normal((10, 10))])
    for strict in (True, False):
        assert coverage(real, fake, k=1, strict=strict, chunk_size=4) == _loop_coverage(real, fake, 1, strict)
    assert coverage(real, fake, k=1) < coverage(real, fake, k=1, strict=False)


def test_coverage_many_ties_and_near_duplicates_match_loop():
    """More tied candidates than the first ``topk`` takes (25 copies of a real point, 40 fakes
    within 1e-9 of each other): the candidate set grows until the answer is settled."""
    rng = _rng(6)
    p = rng.standard_normal(8)
    real = np.concatenate([rng.standard_normal((30, 8)), np.tile(p, (25, 1))])
    fake = np.concatenate([p + 1e-9 * rng.standard_normal((40, 8)), rng.standard_normal((10, 8))])
    for k in (3, 30):
        for strict in (True, False):
            expected = _loop_coverage(real, fake, k, strict)
            assert coverage(real, fake, k=k, strict=strict, chunk_size=16) == expected
            assert coverage(real.astype(np.float32), fake.astype(np.float32), k=k, strict=strict,
                            dtype=torch.float32) == _loop_coverage(real.astype(np.float32), fake.astype(np.float32), k, strict)
    same = np.ones((6, 3))
    assert coverage(same, same, k=2) == 0.0  # every radius is 0, and 0 < 0 is false
    assert coverage(same, same, k=2, strict=False) == 1.0


@pytest.mark.parametrize("scale", [2.0 ** -200, 1e-30, 1.0, 1e30, 2.0 ** 200])
def test_coverage_is_scale_free(scale):
    """The matmul operands are rescaled by a power of two: no overflow or underflow."""
    rng = _rng(8)
    real, fake = rng.standard_normal((40, 6)), rng.standard_normal((15, 6))
    expected = _loop_coverage(real, fake, 2)
    assert coverage(real * scale, fake * scale, k=2, chunk_size=16) == expected
    assert coverage(real * scale, fake * scale, k=2, dtype=torch.float32) == expected


def test_coverage_reduced_precision_matmul_setting_keeps_the_value():
    """``set_float32_matmul_precision("medium")`` may route float32 matmuls through bfloat16: the
    default switches to float64, and an explicit float32 matmul widens its error window."""
    rng = _rng(9)
    real = rng.standard_normal((50, 12)).astype(np.float32)
    fake = rng.standard_normal((20, 12)).astype(np.float32)
    expected = _prdc_coverage(real, fake, 3)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        assert coverage(real, fake, k=3) == expected
        assert coverage(real, fake, k=3, dtype=torch.float32) == expected
    finally:
        torch.set_float32_matmul_precision(before)


def test_coverage_k_up_to_n_minus_one():
    """prdc needs ``k + 1 < N`` (numpy's argpartition); the definition allows ``k = N − 1``."""
    rng = _rng(7)
    real, fake = rng.standard_normal((12, 5)), rng.standard_normal((4, 5))
    assert coverage(real, fake, k=11, chunk_size=5) == _loop_coverage(real, fake, 11)


def test_coverage_float16_torch_and_dtypes_agree():
    rng = _rng(3)
    real16 = rng.standard_normal((50, 8)).astype(np.float16)
    fake16 = rng.standard_normal((20, 8)).astype(np.float16)
    expected = _prdc_coverage(real16.astype(np.float64), fake16.astype(np.float64), 3)
    assert coverage(real16, fake16, k=3, chunk_size=8) == expected
    assert coverage(torch.from_numpy(real16), torch.from_numpy(fake16), k=3) == expected
    real, fake = real16.astype(np.float32), fake16.astype(np.float32)
    assert coverage(torch.from_numpy(real), torch.from_numpy(fake), k=3, dtype=torch.float64) == expected
    assert coverage(real.astype(np.int64), fake.astype(np.int64), k=3) == _loop_coverage(
        real.astype(np.int64), fake.astype(np.int64), 3)


def test_coverage_identical_sets_and_far_fakes():
    rng = _rng(4)
    real = rng.standard_normal((30, 4))
    assert coverage(real, real, k=2) == 1.0  # every point is its own nearest fake, radius > 0
    assert coverage(real, real + 100.0, k=2) == 0.0


@pytest.mark.parametrize(
    "real,fake,kwargs,match",
    [
        (np.zeros(5), np.zeros((2, 5)), {}, r"real: expected a 2-D"),
        (np.zeros((4, 3)), np.zeros((2, 5)), {"k": 2}, r"fake: dimension 5 differs"),
        (np.zeros((4, 3)), np.zeros((2, 3)), {"k": 4}, r"k: need an integer with 1 <= k < N = 4"),
        (np.zeros((4, 3)), np.zeros((2, 3)), {"k": 0}, r"k: need an integer"),
        (np.zeros((4, 3)), np.zeros((2, 3)), {"k": 1.5}, r"k: need an integer"),
        (np.zeros((0, 3)), np.zeros((2, 3)), {}, r"real: empty input"),
        (np.zeros((4, 3)), np.zeros((0, 3)), {"k": 1}, r"fake: empty input"),
        (np.array([[0.0, np.nan], [1.0, 1.0]]), np.zeros((2, 2)), {"k": 1}, r"real: contains NaN"),
        (np.zeros((3, 2)), np.array([[np.inf, 0.0]]), {"k": 1}, r"fake: contains NaN or infinite"),
        (np.zeros((4, 3)), np.zeros((2, 3)), {"k": 1, "chunk_size": 0}, r"chunk_size: need a positive"),
        (np.array([["a", "b"]]), np.zeros((2, 2)), {"k": 1}, r"real: expected a numeric array"),
        (np.zeros((4, 3)), np.zeros((2, 3)), {"k": 1, "dtype": torch.float16}, r"dtype: need torch.float32"),
    ],
)
def test_coverage_input_errors(real, fake, kwargs, match):
    with pytest.raises(DiReInputError, match=match):
        coverage(real, fake, **kwargs)


# --------------------------------------------------------------------------- Vendi score
def _literal_vendi(x, q, normalize=True):
    """``exp`` of the Rényi entropy of the spectrum of the ``n × n`` matrix K / n, decomposed
    directly (no dual form); eigenvalues above round-off (max · max(n, d) · eps) renormalised."""
    x = np.asarray(x, np.float64)
    if normalize:
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = x / np.maximum(norms, 1e-8)
    lam = np.linalg.eigvalsh(x @ x.T / len(x))
    lam = lam[lam > lam.max() * max(x.shape) * np.finfo(np.float64).eps]
    lam = lam / lam.sum()
    if q == 0:
        return float(len(lam))
    if q == 1:
        return float(np.exp(-(lam * np.log(lam)).sum()))
    if q == math.inf:
        return float(1.0 / lam.max())
    return float((lam ** q).sum() ** (1.0 / (1.0 - q)))


@pytest.mark.parametrize("n,d", [(200, 16), (12, 40), (64, 64)])
def test_vendi_q1_matches_reference(n, d):
    x = _rng(n).standard_normal((n, d)) + 0.3
    got = vendi_score(x)
    assert got == pytest.approx(vendi.score_dual(x), rel=1e-10)
    assert got == pytest.approx(vendi.score_X(x), rel=1e-10)
    assert 1.0 <= got <= min(n, d)


@pytest.mark.parametrize("q", [0, 0.5, 1, 2, math.inf])
@pytest.mark.parametrize("n,d", [(150, 10), (9, 30)])
def test_vendi_orders_match_literal_eigendecomposition(q, n, d):
    x = _rng(int(n + d)).standard_normal((n, d)) + 0.5
    assert vendi_score(x, q=q) == pytest.approx(_literal_vendi(x, q), rel=1e-10)
    if q == 0:
        assert vendi_score(x, q=q) == min(n, d)  # random data has full rank


def test_vendi_orders_are_ordered_and_continuous_at_one():
    x = _rng(11).standard_normal((80, 12)) + 1.0
    scores = [vendi_score(x, q=q) for q in (0, 0.5, 1, 2, math.inf)]
    assert scores == sorted(scores, reverse=True)  # Hill numbers decrease with the order
    assert vendi_score(x, q=1 + 1e-7) == pytest.approx(scores[2], rel=1e-5)
    assert vendi_score(x, q="inf") == scores[-1]


def test_vendi_small_orders_where_the_reference_counts_round_off():
    """Rank-3 data in 200 dimensions: K/n has 3 non-zero eigenvalues, and the dual matrix 197
    round-off ones of either sign. ``score_dual`` keeps the positive ones: at q = 0 it counts
    them, at q = 0.5 their square roots shift the score."""
    rng = _rng(12)
    x = rng.standard_normal((100, 3)) @ rng.standard_normal((3, 200))
    assert vendi_score(x, q=0) == 3.0 == _literal_vendi(x, 0)
    assert vendi.score_dual(x, q=0) > 3.0  # ~100 here: every positive round-off eigenvalue
    ours, reference = vendi_score(x, q=0.5), vendi.score_dual(x, q=0.5)
    assert ours == pytest.approx(_literal_vendi(x, 0.5), rel=1e-9)
    assert abs(reference - ours) > 1e-7 * ours
    # the orders that weigh small eigenvalues lightly agree
    for q in (1, 2):
        assert vendi_score(x, q=q) == pytest.approx(vendi.score_dual(x, q=q), rel=1e-9)


def test_vendi_reference_score_x_ignores_q():
    x = _rng(13).standard_normal((40, 8))
    assert vendi.score_X(x, q=2) == vendi.score_X(x, q=1)
    assert vendi_score(x, q=2) == pytest.approx(vendi.score_dual(x, q=2), rel=1e-10)
    assert vendi_score(x, q=2) < vendi_score(x, q=1)


def test_vendi_zero_rows_are_ignored_and_all_zero_is_nan():
    rng = _rng(14)
    x = rng.standard_normal((30, 6))
    with_zeros = np.concatenate([x, np.zeros((10, 6))])
    for q in (0, 0.5, 1, 2, math.inf):
        assert vendi_score(with_zeros, q=q) == pytest.approx(vendi_score(x, q=q), rel=1e-10)
        assert vendi_score(with_zeros, q=q) == pytest.approx(_literal_vendi(with_zeros, q), rel=1e-10)
    assert math.isnan(vendi_score(np.zeros((5, 3))))


def test_vendi_unnormalised_kernel():
    rng = _rng(15)
    x = rng.standard_normal((50, 7))
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    # unit rows: the linear kernel is the cosine kernel, and the reference agrees
    assert vendi_score(unit, normalize=False) == pytest.approx(vendi.score_dual(unit, normalize=False), rel=1e-10)
    # other rows: the spectrum of K / trace(K)
    assert vendi_score(3 * x, normalize=False) == pytest.approx(_literal_vendi(x, 1, normalize=False), rel=1e-10)


def test_vendi_float16_float32_torch_inputs():
    x16 = _rng(16).standard_normal((60, 10)).astype(np.float16)
    expected = vendi.score_dual(x16.astype(np.float64))
    assert vendi_score(x16) == pytest.approx(expected, rel=1e-10)
    assert vendi_score(torch.from_numpy(x16)) == pytest.approx(expected, rel=1e-10)
    assert vendi_score(torch.from_numpy(x16.astype(np.float32))) == pytest.approx(expected, rel=1e-10)


def test_vendi_restores_the_thread_setting():
    """The eigensolver runs on one CPU thread (threaded LAPACK stalls on shared cores)."""
    before = torch.get_num_threads()
    vendi_score(_rng(19).standard_normal((30, 5)))
    assert torch.get_num_threads() == before


def test_vendi_per_class_matches_per_class_reference():
    rng = _rng(17)
    x = rng.standard_normal((90, 12))
    labels = rng.integers(0, 4, size=90)
    labels[5] = 9  # a one-sample class
    mean, per_class = vendi_score_per_class(x, labels, q=1.0)
    assert sorted(per_class) == sorted(set(labels.tolist()))
    for c, value in per_class.items():
        assert value == pytest.approx(vendi.score_dual(x[labels == c]), rel=1e-10)
    assert per_class[9] == pytest.approx(1.0)
    assert mean == pytest.approx(np.mean(list(per_class.values())), rel=1e-12)
    mean2, per_class2 = vendi_score_per_class(torch.from_numpy(x), torch.from_numpy(labels), q=2)
    assert per_class2[0] == pytest.approx(_literal_vendi(x[labels == 0], 2), rel=1e-10)


def test_vendi_per_class_all_zero_class_is_nan_and_left_out():
    x = np.concatenate([_rng(18).standard_normal((6, 3)), np.zeros((4, 3))])
    labels = np.array([0] * 6 + [1] * 4)
    mean, per_class = vendi_score_per_class(x, labels)
    assert math.isnan(per_class[1])
    assert mean == per_class[0]


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: vendi_score(np.zeros((3, 2, 2))), r"x: expected a 2-D"),
        (lambda: vendi_score(np.zeros((0, 4))), r"x: empty input"),
        (lambda: vendi_score(np.array([[1.0, np.nan]])), r"x: contains NaN"),
        (lambda: vendi_score(np.ones((3, 2)), q=-1), r"q: the order must be >= 0"),
        (lambda: vendi_score(np.ones((3, 2)), q="many"), r"q: expected a number"),
        (lambda: vendi_score_per_class(np.ones((3, 2)), [0, 1]), r"labels: 2 labels for 3 embeddings"),
        (lambda: vendi_score_per_class(np.ones((3, 2)), [0.0, 1.0, 1.0]), r"labels: expected integer"),
    ],
)
def test_vendi_input_errors(call, match):
    with pytest.raises(DiReInputError, match=match):
        call()


# --------------------------------------------------------------------------- intra-class cosine
def _loop_intra_class_cosine(x, labels):
    x = np.asarray(x, np.float64)
    per_class = {}
    for c in sorted(set(labels.tolist())):
        rows = x[labels == c]
        if len(rows) < 2:
            continue
        total = 0.0
        for i in range(len(rows)):
            for j in range(len(rows)):
                if i != j:
                    ni, nj = np.linalg.norm(rows[i]), np.linalg.norm(rows[j])
                    total += 0.0 if ni == 0 or nj == 0 else rows[i] @ rows[j] / (ni * nj)
        per_class[c] = total / (len(rows) * (len(rows) - 1))
    mean = float(np.mean(list(per_class.values()))) if per_class else math.nan
    return mean, per_class


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_intra_class_cosine_matches_loop(seed):
    rng = _rng(seed)
    x = rng.standard_normal((70, 9)) + rng.standard_normal(9)  # shared offset: positive cosines
    labels = rng.integers(0, 5, size=70)
    labels[[3, 40]] = [7, 8]  # two one-sample classes, skipped
    x[[0, 10]] = 0.0  # zero vectors: cosine 0 with everything, still counted as samples
    mean, per_class = intra_class_cosine(x, labels, per_class=True)
    ref_mean, ref_per_class = _loop_intra_class_cosine(x, labels)
    assert set(per_class) == set(ref_per_class) and 7 not in per_class and 8 not in per_class
    for c in ref_per_class:
        assert per_class[c] == pytest.approx(ref_per_class[c], rel=1e-10, abs=1e-12)
    assert mean == pytest.approx(ref_mean, rel=1e-10)
    assert intra_class_cosine(torch.from_numpy(x), torch.from_numpy(labels)) == pytest.approx(ref_mean, rel=1e-10)


def test_intra_class_cosine_extremes_and_dtypes():
    v = np.array([[1.0, 2.0, 3.0]])
    labels = np.array([0, 0, 0, 1, 1])
    x = np.concatenate([v, 2 * v, 5 * v, v, -v])  # class 0 parallel, class 1 opposite
    mean, per_class = intra_class_cosine(x, labels, per_class=True)
    assert per_class == {0: pytest.approx(1.0), 1: pytest.approx(-1.0)}
    assert mean == pytest.approx(0.0, abs=1e-12)
    x16 = _rng(3).standard_normal((30, 5)).astype(np.float16)
    lab = np.arange(30) % 3
    expected, _ = _loop_intra_class_cosine(x16.astype(np.float64), lab)
    assert intra_class_cosine(x16, lab) == pytest.approx(expected, rel=1e-10)
    assert intra_class_cosine(torch.from_numpy(x16), torch.from_numpy(lab)) == pytest.approx(expected, rel=1e-10)


def test_intra_class_cosine_all_singletons_is_nan():
    assert math.isnan(intra_class_cosine(np.eye(3), [0, 1, 2]))
    mean, per_class = intra_class_cosine(np.eye(3), [0, 1, 2], per_class=True)
    assert math.isnan(mean) and per_class == {}


@pytest.mark.parametrize(
    "emb,labels,match",
    [
        (np.ones(4), [0, 0, 1, 1], r"emb: expected a 2-D"),
        (np.ones((4, 2)), [0, 0, 1], r"labels: 3 labels for 4 embeddings"),
        (np.ones((2, 2)), [[0], [1]], r"labels: expected a 1-D"),
        (np.ones((2, 2)), [0.5, 1.0], r"labels: expected integer"),
        (np.full((2, 2), np.nan), [0, 0], r"emb: contains NaN"),
        (np.ones((2, 0)), [0, 0], r"emb: empty input"),
    ],
)
def test_intra_class_cosine_input_errors(emb, labels, match):
    with pytest.raises(DiReInputError, match=match):
        intra_class_cosine(emb, labels)
