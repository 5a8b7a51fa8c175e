"""Functional kernels against literal computations, float64."""
import pytest
import torch

from dire_plugin.regularizer import kernels as P


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_normalize_rows_keeps_zero_rows_zero_with_finite_gradient():
    x = _rand(3, 4)
    x[1] = 0
    x.requires_grad_()
    y = P.normalize_rows(x)
    assert torch.allclose(y[[0, 2]].norm(dim=1), torch.ones(2, dtype=torch.float64))
    assert y[1].abs().sum() == 0
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_pairwise_dense_matrices_match_loops():
    x, y = _rand(5, 3, seed=1), _rand(4, 3, seed=2)
    cos = P.pairwise_cosine(x, y)
    dist = P.pairwise_euclidean(x, y)
    for i in range(5):
        for j in range(4):
            assert float(cos[i, j]) == pytest.approx(float(torch.nn.functional.cosine_similarity(x[i], y[j], dim=0)))
            assert float(dist[i, j]) == pytest.approx(float((x[i] - y[j]).norm()))
    assert torch.allclose(P.pairwise_euclidean(x).diagonal(), torch.zeros(5, dtype=torch.float64))


def test_safe_sqrt_gradient_is_zero_below_eps_and_exact_above():
    d2 = torch.tensor([0.0, 1e-20, 4.0], dtype=torch.float64, requires_grad=True)
    d = P.safe_sqrt(d2)
    d.sum().backward()
    assert d2.grad.tolist() == [0.0, 0.0, pytest.approx(0.25)]
    assert d[2] == 2.0


def test_group_by_class_pads_in_label_order_and_keeps_gradients():
    x = _rand(6, 2, seed=3).requires_grad_()
    labels = torch.tensor([4, 1, 4, 4, 7, 1])
    padded, counts, classes = P.group_by_class(x, labels)
    assert classes.tolist() == [1, 4, 7] and counts.tolist() == [2, 3, 1]
    assert torch.equal(padded[0, :2], x[[1, 5]]) and torch.equal(padded[1, :3], x[[0, 2, 3]])
    assert torch.equal(padded[2, 0], x[4]) and padded[2, 1:].abs().sum() == 0
    padded.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    # An explicit class order is honoured, and unknown labels are refused.
    padded2, counts2, _ = P.group_by_class(x, labels, torch.tensor([7, 1, 4]))
    assert counts2.tolist() == [1, 2, 3] and torch.equal(padded2[0, 0], x[4])
    with pytest.raises(ValueError, match="7"):
        P.group_by_class(x, labels, torch.tensor([1, 4]))


def test_cosine_sum_identities_match_double_loops():
    a, b = _rand(4, 3, seed=4), _rand(6, 3, seed=5)
    an, bn = P.normalize_rows(a), P.normalize_rows(b)
    s_a, s_b = an.sum(0, keepdim=True), bn.sum(0, keepdim=True)
    sq = (an * an).sum().reshape(1)
    loop_between = sum(float(torch.nn.functional.cosine_similarity(a[i], b[j], dim=0)) for i in range(4) for j in range(6))
    loop_within = sum(float(torch.nn.functional.cosine_similarity(a[i], a[j], dim=0)) for i in range(4) for j in range(4) if i != j)
    assert float(P.cosine_sum_between(s_a, s_b)) == pytest.approx(loop_between)
    assert float(P.cosine_sum_within(s_a, sq, include_diagonal=False)) == pytest.approx(loop_within)
    assert float(P.cosine_sum_within(s_a, sq, include_diagonal=True)) == pytest.approx(loop_within + 4)


@pytest.mark.parametrize("chunk", [1, 3, 17, 1 << 20])
def test_euclidean_distance_sums_match_loops_for_any_chunk(chunk):
    a = _rand(3, 4, 5, seed=6).requires_grad_()
    b = _rand(5, 6, 5, seed=7)
    counts_a = torch.tensor([4, 1, 2])
    counts_b = torch.tensor([6, 3, 1, 2, 5])
    class_index = torch.tensor([4, 0, 2])
    out = P.euclidean_distance_sums(a, counts_a, b, counts_b, class_index, chunk_elements=chunk)
    for c in range(3):
        k = int(class_index[c])
        ref = sum(float((a[c, i] - b[k, j]).norm()) for i in range(int(counts_a[c])) for j in range(int(counts_b[k])))
        assert float(out[c]) == pytest.approx(ref, rel=1e-12)
    w = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x: (P.euclidean_distance_sums(x, counts_a, b, counts_b, class_index, chunk_elements=chunk) * w).sum(), (a,)
    )


def test_euclidean_distance_sums_accepts_half_storage():
    a = _rand(2, 3, 4, seed=8).float()
    b = _rand(2, 5, 4, seed=9).float()
    counts_a, counts_b = torch.tensor([3, 2]), torch.tensor([5, 4])
    full = P.euclidean_distance_sums(a, counts_a, b, counts_b)
    half = P.euclidean_distance_sums(a, counts_a, b.half(), counts_b)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=2e-3, atol=1e-3)
