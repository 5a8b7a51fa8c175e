"""The determinantal term (``logdet``, beyond the paper) against a literal per-class loop in
float64, gradcheck, and the cases where a determinant usually breaks: duplicate embeddings
(real-image init), one image per class, a zero embedding."""
import math

import pytest
import torch

from dire_plugin import DiReInputError, DiReLoss
from dire_plugin.embeddings.memory import SyntheticMemory
from dire_plugin.regularizer.functional import dire_components
from dire_plugin.regularizer.grouped import pack_mapping

D = 6


def _reference(syn, labels, memory, reduction, kernel):
    """For each class, one by one: −log det(K + I) of its unit rows (current, then memory)."""
    total = 0.0
    syn = syn.detach()
    for c in sorted(set(labels.tolist())):
        rows = syn[labels == c]
        if memory and c in memory:
            rows = torch.cat([rows, memory[c]])
        unit = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-8)
        m = len(unit)
        k = torch.empty(m, m, dtype=torch.float64)
        for i in range(m):
            for j in range(m):
                cos = float(unit[i] @ unit[j])
                k[i, j] = cos if kernel == "cosine" else math.exp(-float((unit[i] - unit[j]).pow(2).sum()))
        value = -float(torch.logdet(k + torch.eye(m, dtype=torch.float64)))
        total += value / m if reduction == "mean" else value
    return total


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([2, 0, 2, 1, 0, 2, 5, 1])  # unsorted, unequal counts, a class of one (5)
    syn = torch.randn(len(labels), D, generator=g, dtype=torch.float64)
    real = {c: torch.randn(3, D, generator=g, dtype=torch.float64) for c in (0, 1, 2, 5)}
    memory = {2: torch.randn(3, D, generator=g, dtype=torch.float64), 0: torch.randn(1, D, generator=g, dtype=torch.float64)}
    return syn.requires_grad_(), labels, real, memory


@pytest.mark.parametrize("kernel", ["cosine", "rbf"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("with_memory", [False, True])
def test_logdet_matches_a_literal_loop_over_classes(kernel, reduction, with_memory):
    syn, labels, real, memory = _data()
    memory = memory if with_memory else None
    loss = DiReLoss(r_c=0.0, r_e=0.0, r_d=1.0, components=("logdet",), reduction=reduction, logdet_kernel=kernel)
    got = loss(syn, labels, real, memory=memory)
    assert float(got) == pytest.approx(_reference(syn, labels, memory, reduction, kernel), rel=1e-10)


@pytest.mark.parametrize("kernel", ["cosine", "rbf"])
def test_gradcheck(kernel):
    syn, labels, real, memory = _data(1)
    packed_real = pack_mapping(real, syn.device)
    packed_memory = pack_mapping(memory, syn.device, what="memory embeddings")

    def f(x):
        return dire_components(x, labels, packed_real, packed_memory, components=("logdet",), logdet_kernel=kernel)["logdet"]

    assert torch.autograd.gradcheck(f, (syn,), eps=1e-6, atol=1e-6)


def test_beside_cd_and_in_its_place():
    syn, labels, real, memory = _data(2)
    both = DiReLoss(r_c=0.3, r_e=0.0, r_d=0.5, components=("cd", "cdm", "logdet"))(syn, labels, real, memory=memory)
    alone = DiReLoss(r_c=0.3, r_e=0.0, r_d=0.5, components=("cdm", "logdet"))(syn, labels, real, memory=memory)
    parts = DiReLoss(r_c=0.3, r_e=0.0, r_d=0.5, components=("cd", "cdm", "logdet")).components(syn, labels, real, memory)
    assert set(parts) == {"cd", "cdm", "edm", "logdet"}
    assert float(both) == pytest.approx(float(0.3 * (parts["cd"] + parts["cdm"]) + 0.5 * parts["logdet"]), rel=1e-12)
    assert float(both - alone) == pytest.approx(float(0.3 * parts["cd"]), rel=1e-12)


@pytest.mark.parametrize("case", ["duplicates", "one image per class", "a zero embedding", "memory equal to the images"])
def test_gradients_stay_finite_where_a_determinant_degenerates(case):
    g = torch.Generator().manual_seed(3)
    real = {c: torch.rand(4, D, generator=g) for c in range(3)}
    memory = None
    if case == "duplicates":  # real-image init: several identical embeddings in one class
        syn = torch.rand(1, D, generator=g).repeat(6, 1)
        labels = torch.tensor([0, 0, 0, 1, 1, 1])
    elif case == "one image per class":
        syn = torch.rand(3, D, generator=g)
        labels = torch.arange(3)
    elif case == "a zero embedding":
        syn = torch.rand(4, D, generator=g)
        syn[1] = 0.0
        labels = torch.tensor([0, 0, 1, 2])
    else:
        syn = torch.rand(3, D, generator=g)
        labels = torch.arange(3)
        memory = SyntheticMemory()
        memory.add(syn.clone(), labels)  # each image's own earlier embedding, unchanged
    syn = syn.requires_grad_()
    loss = DiReLoss(r_c=0.0, r_e=0.0, r_d=1.0, components=("logdet",))(syn, labels, real, memory=memory)
    (grad,) = torch.autograd.grad(loss, syn)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    if case == "one image per class":
        # A single unit row: K = [1], det(K + I) = 2 whatever the image, so nothing to push.
        assert float(loss) == pytest.approx(-3 * math.log(2.0), rel=1e-6) and float(grad.abs().max()) < 1e-6


def test_spreading_a_class_lowers_the_term():
    # The term rewards directions: orthogonal embeddings below identical ones.
    labels = torch.zeros(4, dtype=torch.long)
    real = {0: torch.rand(3, D)}
    loss = DiReLoss(r_c=0.0, r_e=0.0, r_d=1.0, components=("logdet",))
    same = loss(torch.ones(4, D), labels, real)
    apart = loss(torch.eye(D)[:4], labels, real)
    assert float(apart) < float(same)
    assert float(apart) == pytest.approx(-math.log(2.0), rel=1e-6)  # mean over rows of −log 2 each


def test_a_memory_of_sums_alone_is_refused_for_logdet():
    from dire_plugin.regularizer.grouped import ClassSums

    syn, labels, real, memory = _data(4)
    sums = pack_mapping(memory, syn.device, what="memory embeddings")
    bare = ClassSums(sums.classes, sums.unit_sums, sums.counts)
    with pytest.raises(DiReInputError, match="logdet term needs the memory's embeddings"):
        dire_components(syn, labels, pack_mapping(real, syn.device), bare, components=("logdet",))


def test_bad_logdet_settings_are_refused():
    with pytest.raises(DiReInputError, match="logdet_kernel must be one of"):
        DiReLoss(components=("logdet",), logdet_kernel="laplace")
    with pytest.raises(DiReInputError, match="r_d must be a finite number >= 0"):
        DiReLoss(components=("logdet",), r_d=-1.0)
    with pytest.raises(DiReInputError, match="are all 0"):
        DiReLoss(components=("logdet",), r_d=0.0)
    with pytest.raises(DiReInputError, match="components must be a non-empty subset"):
        DiReLoss(components=("cd", "det"))
