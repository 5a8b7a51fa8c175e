"""DiReLoss against literal double loops of the paper's Equations 1–5, in float64."""
import math

import pytest
import torch

from dire_plugin import DiReInputError, DiReLoss
from dire_plugin.regularizer.defaults import COMPONENTS
from dire_plugin.regularizer.functional import dire_components
from dire_plugin.regularizer.grouped import pack_mapping

D = 6


def _cos(a, b):
    return float(a @ b) / (max(a.norm(), 1e-8) * max(b.norm(), 1e-8))


def _reference(syn, labels, real, memory, reduction):
    """Literal loops, written straight from the formulas in dire_plugin.regularizer.functional."""
    out = {"cd": 0.0, "cdm": 0.0, "edm": 0.0}
    syn = syn.detach()
    for c in sorted(set(labels.tolist())):
        a = syn[labels == c]
        b = real[c]
        p = memory.get(c, torch.zeros(0, syn.shape[1], dtype=syn.dtype)) if memory else torch.zeros(0, syn.shape[1])
        n, m, k = len(a), len(b), len(p)
        cd, pairs = 0.0, 0
        for i in range(n):
            for j in range(n):
                if reduction == "sum" or i != j:
                    cd += _cos(a[i], a[j])
                    pairs += 1
            for l in range(k):
                cd += 2 * _cos(a[i], p[l])
                pairs += 2
        cdm = sum(1 - _cos(a[i], b[j]) for i in range(n) for j in range(m))
        edm = sum(float((a[i] - b[j]).norm()) for i in range(n) for j in range(m))
        if reduction == "mean":
            cd = cd / pairs if pairs else 0.0
            cdm, edm = cdm / (n * m), edm / (n * m)
        out["cd"] += float(cd)
        out["cdm"] += float(cdm)
        out["edm"] += float(edm)
    return out


def _data(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    # Unsorted labels, unequal class sizes, a class with a single synthetic embedding (5), and a
    # real class that no synthetic embedding uses (9).
    labels = torch.tensor([2, 0, 2, 1, 0, 2, 5, 1])
    syn = torch.randn(len(labels), D, generator=g, dtype=dtype)
    real = {c: torch.randn(m, D, generator=g, dtype=dtype) for c, m in [(0, 4), (1, 2), (2, 5), (5, 3), (9, 2)]}
    memory = {2: torch.randn(3, D, generator=g, dtype=dtype), 0: torch.randn(1, D, generator=g, dtype=dtype)}
    return syn.requires_grad_(), labels, real, memory


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("with_memory", [False, True])
def test_components_match_literal_loops(reduction, with_memory):
    syn, labels, real, memory = _data()
    memory = memory if with_memory else None
    got = DiReLoss(reduction=reduction).components(syn, labels, real, memory=memory)
    ref = _reference(syn, labels, real, memory, reduction)
    assert set(got) == {"cd", "cdm", "edm"}
    for key in got:
        assert float(got[key]) == pytest.approx(ref[key], rel=1e-10, abs=1e-12), key


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_weighted_total_and_gradient_match_reference(reduction):
    syn, labels, real, memory = _data(1)
    loss_fn = DiReLoss(r_c=0.7, r_e=0.03, reduction=reduction)
    loss = loss_fn(syn, labels, real, memory=memory)
    # Same formula through autograd on dense matrices: an independent gradient.
    ref = 0.0
    for c in labels.unique().tolist():
        a, b = syn[labels == c], real[c]
        an = a / a.norm(dim=1, keepdim=True)
        bn = b / b.norm(dim=1, keepdim=True)
        pn = memory[c] / memory[c].norm(dim=1, keepdim=True) if c in memory else torch.zeros(0, D, dtype=a.dtype)
        n, k = len(a), len(pn)
        within = an @ an.T
        if reduction == "sum":
            cd = within.sum() + 2 * (an @ pn.T).sum()
            cdm = (1 - an @ bn.T).sum()
            edm = torch.cdist(a, b).sum()
        else:
            pairs = n * (n - 1) + 2 * n * k
            cd = (within.sum() - within.diagonal().sum() + 2 * (an @ pn.T).sum()) / pairs if pairs else 0.0
            cdm = (1 - an @ bn.T).mean()
            edm = torch.cdist(a, b).mean()
        ref = ref + 0.7 * (cd + cdm) + 0.03 * edm
    assert float(loss) == pytest.approx(float(ref), rel=1e-10)
    g, = torch.autograd.grad(loss, syn)
    g_ref, = torch.autograd.grad(ref, syn)
    torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_gradcheck(reduction):
    syn, labels, real, memory = _data(2)
    loss_fn = DiReLoss(r_c=0.5, r_e=0.1, reduction=reduction, chunk_elements=7)  # forces many blocks
    assert torch.autograd.gradcheck(lambda x: loss_fn(x, labels, real, memory=memory), (syn,))


def test_chunking_does_not_change_values_or_gradients():
    syn, labels, real, _ = _data(3)
    results = []
    for chunk in (1, 5, 1 << 24):
        loss = DiReLoss(r_c=0.2, r_e=0.4, chunk_elements=chunk)(syn, labels, real)
        results.append((loss.detach(), torch.autograd.grad(loss, syn)[0]))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0])
        torch.testing.assert_close(grad, results[0][1])


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_finite_when_synthetic_equals_real_and_for_zero_rows(reduction):
    syn, labels, real, memory = _data(4)
    with torch.no_grad():
        syn[0] = real[2][1]  # real-image initialisation: distance exactly 0
        syn[3] = 0.0  # an all-zero embedding (dead ReLUs)
    loss = DiReLoss(r_c=1.0, r_e=1.0, reduction=reduction)(syn, labels, real, memory=memory)
    g, = torch.autograd.grad(loss, syn)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    # torchmetrics' unclamped sqrt gives NaN here: the case this guards against is real.
    d = (syn[0:1] - real[2][1:2]).pow(2).sum().sqrt()
    assert torch.isnan(torch.autograd.grad(d, syn)[0]).any()


def test_no_gradient_reaches_real_embeddings():
    syn, labels, real, memory = _data(5)
    real = {c: t.clone().requires_grad_() for c, t in real.items()}
    memory = {c: t.clone().requires_grad_() for c, t in memory.items()}
    loss = DiReLoss(r_c=1.0, r_e=1.0)(syn, labels, real, memory=memory)
    loss.backward()
    assert all(t.grad is None for t in real.values())
    assert all(t.grad is None for t in memory.values())
    assert syn.grad is not None and syn.grad.abs().sum() > 0


def test_diagonal_handling():
    # Identical synthetic embeddings: the mean CD over i != j is exactly 1, the sum CD with the
    # diagonal is n². The released code's zero_diagonal + division by IPC² would give (n-1)/n.
    x = torch.ones(4, D, dtype=torch.float64)
    labels = torch.zeros(4, dtype=torch.long)
    real = {0: torch.randn(3, D, dtype=torch.float64)}
    assert float(DiReLoss(reduction="mean").components(x, labels, real)["cd"]) == pytest.approx(1.0)
    assert float(DiReLoss(reduction="sum").components(x, labels, real)["cd"]) == pytest.approx(16.0)
    # A synthetic embedding equal to the first real one keeps that pair: 1 - cos = 0 is included
    # in the mean over all n·m pairs (zero_diagonal on syn-vs-real would drop an arbitrary pair).
    real = {0: torch.stack([x[0], -x[0]])}
    assert float(DiReLoss(reduction="mean").components(x[:1], labels[:1], real)["cdm"]) == pytest.approx(1.0)


def test_single_synthetic_without_memory_has_zero_cd():
    x = torch.randn(1, D, dtype=torch.float64, requires_grad=True)
    comps = DiReLoss().components(x, torch.tensor([3]), {3: torch.randn(2, D, dtype=torch.float64)})
    assert float(comps["cd"]) == 0.0


def test_memory_gives_cd_for_one_image_per_class_batches():
    # SRe²L batches hold one image per class: only the memory makes CD non-zero.
    x = torch.randn(2, D, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1])
    real = {0: torch.randn(2, D, dtype=torch.float64), 1: torch.randn(2, D, dtype=torch.float64)}
    assert float(DiReLoss().components(x, labels, real)["cd"]) == 0.0
    assert float(DiReLoss().components(x, labels, real, memory={0: x[0:1].detach()})["cd"]) == pytest.approx(1.0)
    memory = {0: torch.randn(2, D, dtype=torch.float64)}
    g, = torch.autograd.grad(DiReLoss(r_c=1, r_e=0, components=("cd",))(x, labels, real, memory=memory), x)
    assert g[0].abs().sum() > 0  # class 0 is pushed away from its memory
    assert g[1].abs().sum() == 0  # class 1 has nothing to be diverse against


@pytest.mark.parametrize(
    "components",
    [("cd",), ("cdm",), ("edm",), ("cd", "cdm"), ("cd", "edm"), ("cdm", "edm"), ("cd", "cdm", "edm")],
)
def test_ablation_components(components):
    syn, labels, real, memory = _data(6)
    full = DiReLoss(reduction="mean").components(syn, labels, real, memory=memory)
    loss = DiReLoss(r_c=0.3, r_e=0.2, components=components)(syn, labels, real, memory=memory)
    expected = sum((0.2 if c == "edm" else 0.3) * full[c] for c in components)
    assert float(loss) == pytest.approx(float(expected), rel=1e-12)


def test_zero_weights_skip_the_euclidean_term(monkeypatch):
    import dire_plugin.regularizer.functional as F

    calls = []
    original = F.euclidean_distance_sums
    monkeypatch.setattr(F, "euclidean_distance_sums", lambda *a, **k: calls.append(1) or original(*a, **k))
    syn, labels, real, _ = _data(7)
    DiReLoss(r_c=1.0, r_e=0.0)(syn, labels, real)
    assert calls == []
    DiReLoss(r_c=1.0, r_e=0.5)(syn, labels, real)
    assert calls == [1]


def test_released_weights_mapping():
    loss = DiReLoss.from_released(multiplier=0.1, r_cos=1.0, r_euc=0.01)
    assert (loss.r_c, loss.r_e) == (pytest.approx(0.1), pytest.approx(0.001))
    assert (DiReLoss().r_c, DiReLoss().r_e) == (loss.r_c, loss.r_e)


def test_float32_and_half_inputs_give_float32_loss():
    syn, labels, real, memory = _data(8, torch.float32)
    loss32 = DiReLoss(r_c=1, r_e=0.1)(syn, labels, real, memory=memory)
    loss16 = DiReLoss(r_c=1, r_e=0.1)(syn.detach().half(), labels, {c: t.half() for c, t in real.items()})
    assert loss32.dtype == torch.float32 and loss16.dtype == torch.float32
    assert float(loss16) == pytest.approx(float(DiReLoss(r_c=1, r_e=0.1)(syn, labels, real)), rel=2e-3)


def test_packed_real_is_reused_and_refreshed_on_change():
    syn, labels, real, _ = _data(9)
    loss_fn = DiReLoss(r_c=1.0, r_e=1.0)
    first = loss_fn(syn, labels, real)
    packed = loss_fn._packed
    assert float(loss_fn(syn, labels, real)) == float(first) and loss_fn._packed is packed
    with torch.no_grad():
        real[2].mul_(2.0)  # in-place change bumps the tensor version: must repack
    assert float(loss_fn(syn, labels, real)) != float(first)


def test_errors_are_clear():
    syn, labels, real, _ = _data(10)
    del real[5]
    with pytest.raises(DiReInputError, match=r"no real embeddings for class 5"):
        DiReLoss()(syn, labels, real)
    _, _, real, _ = _data(10)
    with pytest.raises(DiReInputError, match="NaN or Inf"):
        DiReLoss()(syn.detach().clone().fill_(math.nan), labels, real)
    bad = dict(real)
    bad[0] = torch.full((4, D), math.nan, dtype=torch.float64)
    with pytest.raises(DiReInputError, match="real embeddings of class 0 contain NaN"):
        DiReLoss()(syn, labels, bad)
    bad[0] = torch.zeros(0, D, dtype=torch.float64)
    with pytest.raises(DiReInputError, match="class 0 are empty"):
        DiReLoss()(syn, labels, bad)
    bad[0] = torch.zeros(4, D, dtype=torch.float64)
    with pytest.raises(DiReInputError, match="class 0 are all zero"):
        DiReLoss()(syn, labels, bad)
    with pytest.raises(DiReInputError, match="dimension"):
        DiReLoss()(syn[:, :3], labels, real)
    with pytest.raises(DiReInputError, match="labels"):
        DiReLoss()(syn, labels[:3], real)
    with pytest.raises(DiReInputError, match="components"):
        DiReLoss(components=("cd", "kl"))
    with pytest.raises(DiReInputError, match="reduction"):
        DiReLoss(reduction="max")


def test_functional_accepts_packed_real_directly():
    syn, labels, real, _ = _data(11)
    packed = pack_mapping(real, syn.device)
    a = dire_components(syn, labels, packed)
    b = DiReLoss().components(syn, labels, real)
    for k in a:
        assert float(a[k]) == float(b[k])


# --- bad input: one line each, before anything is computed -----------------------------------------


def _memory_of_width(width):
    from dire_plugin.embeddings.memory import SyntheticMemory

    memory = SyntheticMemory()
    memory.add(torch.randn(3, width, dtype=torch.float64), torch.tensor([0, 2, 2]))
    return memory


@pytest.mark.parametrize("case, match", [
    ("empty batch", "no synthetic embeddings"),
    ("mapping memory of another width", r"memory embeddings have dimension 4, the synthetic ones 6"),
    ("SyntheticMemory of another width", r"memory embeddings have dimension 5, the synthetic ones 6"),
    ("fractional labels", r"labels must be whole numbers, got 0.5"),
    ("NaN labels", r"labels must be whole numbers, got nan"),
])
@pytest.mark.parametrize("call", ["forward", "components", "functional"])
def test_bad_batches_are_one_line_errors(case, match, call):
    syn, labels, real, _ = _data(12)
    memory = None
    if case == "empty batch":
        syn, labels = syn[:0], labels[:0]
    elif case == "mapping memory of another width":
        memory = {2: torch.randn(3, 4, dtype=torch.float64)}
    elif case == "SyntheticMemory of another width":
        memory = _memory_of_width(5)
    elif case == "fractional labels":
        labels = labels.double()
        labels[3] = 0.5
    else:
        labels = labels.float()
        labels[0] = math.nan
    loss = DiReLoss(r_c=1.0, r_e=0.1)
    with pytest.raises(DiReInputError, match=match) as err:
        if call == "forward":
            loss(syn, labels, real, memory=memory)
        elif call == "components":
            loss.components(syn, labels, real, memory=memory)
        else:
            mem = loss._memory(memory, syn.device)
            dire_components(syn, labels, pack_mapping(real, syn.device), mem)
    assert "\n" not in str(err.value)


def test_nan_embeddings_are_refused():
    syn, labels, real, _ = _data(14)
    syn = syn.detach().clone()
    syn[2, 1] = math.nan
    with pytest.raises(DiReInputError, match="NaN or Inf"):
        DiReLoss(r_c=1.0, r_e=0.1)(syn, labels, real)


@pytest.mark.parametrize("weights, components", [((0.0, 0.0), COMPONENTS), ((0.0, 0.5), ("cd", "cdm")),
                                                 ((0.5, 0.0), ("edm",))])
def test_weights_that_switch_every_component_off_are_refused(weights, components):
    # Before, DiReLoss(r_c=0, r_e=0) returned -0: a loss that looks like DiRe and adds nothing.
    with pytest.raises(DiReInputError, match="are all 0, so DiRe would add nothing"):
        DiReLoss(r_c=weights[0], r_e=weights[1], components=components)
    syn, labels, real, _ = _data(14)
    from dire_plugin.regularizer.functional import dire_loss

    with pytest.raises(DiReInputError, match="are all 0"):
        dire_loss(syn, labels, pack_mapping(real, syn.device), *weights, components=components)


def test_weights_beyond_float32_are_refused_and_an_overflowing_total_is_named():
    # Before: --r-c 1e39 gave NaN at step 1, one NaN update of the images, then blamed the embeddings.
    for big in (1e39, 1e300):
        with pytest.raises(DiReInputError, match="r_c must be at most 3.403e\\+38"):
            DiReLoss(r_c=big)
    syn, labels, real, _ = _data(14)
    with pytest.raises(DiReInputError, match="the weighted DiRe term overflows float32"):
        # float32 embeddings (as a run has them) with EDM > 1: the weighted sum passes float32's max.
        DiReLoss(r_c=3.4e38, r_e=3.4e38)(syn.float() * 10, labels, {c: t.float() for c, t in real.items()})


def test_a_mapping_value_that_is_not_a_tensor_is_named():
    syn, labels, real, _ = _data(15)
    real[next(iter(real))] = [[0.0] * syn.shape[1]]
    with pytest.raises(DiReInputError, match="are list, expected a tensor"):
        DiReLoss()(syn, labels, real)


def test_integral_float_labels_give_the_same_loss_as_integer_ones():
    syn, labels, real, memory = _data(13)
    loss = DiReLoss(r_c=1.0, r_e=0.1)
    assert float(loss(syn, labels.double(), real, memory=memory)) == float(loss(syn, labels, real, memory=memory))


@pytest.mark.parametrize("kwargs, match", [
    ({"r_c": -5}, r"r_c must be a finite number >= 0, got -5"),
    ({"r_e": math.nan}, r"r_e must be a finite number >= 0, got nan"),
    ({"r_c": math.inf}, r"r_c must be a finite number >= 0, got inf"),
    ({"r_c": "0.1"}, None),  # a number in a string is fine (config files), bools and words are not
    ({"r_e": True}, r"r_e must be a finite number >= 0, got True"),
    ({"r_c": "lots"}, r"r_c must be a finite number >= 0, got 'lots'"),
])
def test_weights_are_checked(kwargs, match):
    if match is None:
        assert DiReLoss(**kwargs).r_c == pytest.approx(0.1)
        return
    with pytest.raises(DiReInputError, match=match):
        DiReLoss(**kwargs)
    syn, labels, real, _ = _data(14)
    from dire_plugin.regularizer.functional import dire_loss

    weights = {"r_c": 0.1, "r_e": 0.001, **kwargs}
    with pytest.raises(DiReInputError, match=match):
        dire_loss(syn, labels, pack_mapping(real, syn.device), weights["r_c"], weights["r_e"])


@pytest.mark.parametrize("kwargs, match", [
    ({"multiplier": -0.1}, r"multiplier must be a finite number >= 0, got -0.1"),
    ({"multiplier": -1.0, "r_cos": -1.0}, r"multiplier must be a finite number >= 0, got -1.0"),  # signs cancel
    ({"r_cos": math.nan}, r"r_cos must be a finite number >= 0, got nan"),
    ({"r_euc": math.inf}, r"r_euc must be a finite number >= 0, got inf"),
    ({"multiplier": 1e200, "r_cos": 1e200}, r"r_c must be a finite number >= 0, got inf"),  # the product overflows
])
def test_released_weights_are_checked(kwargs, match):
    with pytest.raises(DiReInputError, match=match):
        DiReLoss.from_released(**kwargs)


@pytest.mark.parametrize("dtype,unit", [(torch.float16, 2.0 ** -11), (torch.bfloat16, 2.0 ** -8)])
def test_a_half_precision_bank_stays_within_the_documented_bound(dtype, unit):
    # README "Scaling": storing the bank in float16/bfloat16 rounds each real embedding by at most
    # u·|b| per element (u = 2^-11, 2^-8), so per class |ΔCDM| <= 2u and |ΔEDM| <= u·max‖b‖ (mean
    # reduction); CD does not read the bank.
    from dire_plugin import RealEmbeddingBank

    g = torch.Generator().manual_seed(7)
    real = torch.rand(6 * 50, 64, generator=g) * 3
    labels = torch.arange(6).repeat(50)
    syn = torch.rand(12, 64, generator=g) * 3
    syn_labels = torch.arange(6).repeat(2)
    full = DiReLoss().components(syn, syn_labels, RealEmbeddingBank.from_tensors(real, labels))
    half = DiReLoss().components(syn, syn_labels, RealEmbeddingBank.from_tensors(real, labels, dtype=dtype))
    classes, max_norm = 6, float(real.norm(dim=1).max())
    assert abs(float(half["cdm"] - full["cdm"])) <= 2 * unit * classes + 1e-5
    assert abs(float(half["edm"] - full["edm"])) <= unit * max_norm * classes + 1e-4
    assert float(half["cd"]) == float(full["cd"])
    assert float(half["cdm"] - full["cdm"]) != 0 or float(half["edm"] - full["edm"]) != 0  # it did round


def test_the_loss_keeps_no_bank_alive_after_its_owner_drops_it():
    # The label layout is cached between calls; holding the bank itself would pin GBs on a GPU.
    import gc
    import weakref

    syn, labels, real, _ = _data(16)
    packed = pack_mapping(real, syn.device)
    DiReLoss()(syn, labels, packed).backward()
    ref = weakref.ref(packed)
    del packed
    gc.collect()
    assert ref() is None
