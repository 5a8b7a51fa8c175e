import logging
from collections.abc import Mapping

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dire_plugin import DiReLoss
from dire_plugin.embeddings.bank import CACHE_FORMAT, RealEmbeddingBank
from dire_plugin.embeddings.memory import SyntheticMemory
from dire_plugin.errors import DiReInputError
from dire_plugin.regularizer.grouped import ClassSums, PackedEmbeddings

NUM_CLASSES = 4
DIM = 8


class LabelEncoder(nn.Module):
    """Embedding = the flattened image, so the test data decides which class a row "looks like"."""

    def __init__(self):
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(DIM, NUM_CLASSES)
        self.forwards = 0

    def forward(self, x):
        self.forwards += 1
        return self.fc(self.flatten(x))


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(6, NUM_CLASSES)
        self.forwards = 0

    def forward(self, x):
        self.forwards += 1
        return self.fc(self.body(x).flatten(1))


def label_data(n_per_class=(9, 6, 11, 7), seed=0):
    """Shuffled rows whose argmax is their label (one-hot in the first NUM_CLASSES dims + noise)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(n_per_class)])
    labels = labels[torch.randperm(len(labels), generator=g)]
    x = 0.1 * torch.rand(len(labels), DIM, generator=g)
    x[torch.arange(len(labels)), labels] += 1.0 + torch.rand(len(labels), generator=g)
    return x.view(-1, 2, 2, 2), labels


def loader_of(x, y, batch_size=5):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def build(model, loader, **kwargs):
    kwargs.setdefault("progress", False)
    return RealEmbeddingBank.build(model, loader, **kwargs)


def test_groups_by_true_label_on_shuffled_data():
    x, y = label_data()
    bank = build(LabelEncoder(), loader_of(x, y))
    assert isinstance(bank, Mapping)
    assert bank.classes == list(range(NUM_CLASSES)) and len(bank) == NUM_CLASSES
    assert bank.num_embeddings == len(y) and bank.dim == DIM
    for c in bank.classes:
        rows = bank[c]
        assert rows.shape[0] == int((y == c).sum())
        assert bool((rows.argmax(1) == c).all()), f"class {c} holds rows of another class"
        # Exactly the rows of class c, in loader order.
        torch.testing.assert_close(rows, x.flatten(1)[y == c])
    assert bank.fingerprint and "RealEmbeddingBank(classes=4" in repr(bank)


def test_build_runs_in_eval_mode_and_restores_modes():
    torch.manual_seed(0)
    model = BNNet()
    # Make running stats differ from batch stats, so a train-mode forward would be visible.
    model.body[1].running_mean.fill_(0.3)
    model.body[1].running_var.fill_(2.0)
    model.train()
    model.body[2].eval()  # mixed modes must come back exactly
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(12, 3, 5, 5)
    y = torch.arange(12) % NUM_CLASSES
    bank = build(model, loader_of(x, y, batch_size=4))

    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed while building the bank"
    assert model.training and model.body.training and model.body[1].training and model.fc.training
    assert not model.body[2].training

    model.eval()
    with torch.no_grad():
        expected = model.body(x).flatten(1)
    for c in range(NUM_CLASSES):
        torch.testing.assert_close(bank[c], expected[y == c])


def test_max_per_class_deterministic_per_seed():
    x, y = label_data(n_per_class=(20, 3, 15, 12))
    model = LabelEncoder()
    full = build(model, loader_of(x, y))
    a = build(model, loader_of(x, y), max_per_class=5, seed=0)
    b = build(model, loader_of(x, y), max_per_class=5, seed=0)
    c = build(model, loader_of(x, y), max_per_class=5, seed=1)
    assert [a[k].shape[0] for k in a.classes] == [5, 3, 5, 5]
    for k in a.classes:
        assert torch.equal(a[k], b[k])
        # Every kept row is a row of that class.
        assert all(bool((full[k] == row).all(1).any()) for row in a[k])
    assert any(not torch.equal(a[k], c[k]) for k in (0, 2, 3))
    torch.testing.assert_close(a[1], full[1])
    assert a.fingerprint != c.fingerprint


def test_fp16_storage():
    x, y = label_data()
    model = LabelEncoder()
    full = build(model, loader_of(x, y))
    half = build(model, loader_of(x, y), dtype=torch.float16)
    assert half.dtype == torch.float16 and half[0].dtype == torch.float16
    for c in full.classes:
        torch.testing.assert_close(half[c].float(), full[c], atol=2e-3, rtol=2e-3)
    packed = half.packed(torch.device("cpu"))
    assert packed.unit_sums.dtype == torch.float32 and packed.padded.dtype == torch.float16


def test_packed_is_cached_and_correct():
    x, y = label_data()
    bank = build(LabelEncoder(), loader_of(x, y))
    p = bank.packed(torch.device("cpu"))
    assert isinstance(p, PackedEmbeddings) and bank.packed("cpu") is p
    assert p.classes.tolist() == bank.classes
    for i, c in enumerate(bank.classes):
        unit = bank[c] / bank[c].norm(dim=1, keepdim=True)
        torch.testing.assert_close(p.unit_sums[i], unit.sum(0))
        torch.testing.assert_close(p.padded[i, : p.counts[i]], bank[c])


def test_cache_hit_miss_and_invalidation(tmp_path):
    x, y = label_data()
    model = LabelEncoder()
    first = build(model, loader_of(x, y), cache_dir=tmp_path, dataset_id="toy")
    assert not first.cache_hit and model.forwards > 0
    files = list(tmp_path.glob("bank-*.pt"))
    assert [f.name for f in files] == [f"bank-{first.fingerprint[:16]}.pt"]

    n = model.forwards
    second = build(model, loader_of(x, y), cache_dir=tmp_path, dataset_id="toy")
    assert second.cache_hit and model.forwards == n, "a cache hit must not run the model"
    assert second.fingerprint == first.fingerprint
    for c in first.classes:
        assert torch.equal(second[c], first[c])

    other = build(model, loader_of(x, y), cache_dir=tmp_path, dataset_id="toy-v2")
    assert not other.cache_hit and model.forwards > n and other.fingerprint != first.fingerprint

    for changed in ({"transform_id": "flip"}, {"max_per_class": 3}, {"dtype": torch.float16}, {"layer": "flatten"}):
        assert RealEmbeddingBank.cache_key(model, **{"dataset_id": "toy", **changed}) != first.fingerprint

    with torch.no_grad():
        model.fc.weight[0, 0] += 1e-6
    n = model.forwards
    changed = build(model, loader_of(x, y), cache_dir=tmp_path, dataset_id="toy")
    assert not changed.cache_hit and model.forwards > n
    assert changed.fingerprint != first.fingerprint
    assert len(list(tmp_path.glob("bank-*.pt"))) == 3
    assert not list(tmp_path.glob(".*")), "temporary files left behind"


def test_cache_file_is_plain_tensors(tmp_path):
    x, y = label_data()
    bank = build(LabelEncoder(), loader_of(x, y), cache_dir=tmp_path, dataset_id="toy", dtype=torch.float16)
    (path,) = tmp_path.glob("bank-*.pt")
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert set(state) == {"format", "key", "checksum", "classes", "counts", "embeddings"}
    assert state["format"] == CACHE_FORMAT >= 2 and state["key"] == bank.fingerprint
    assert state["classes"].dtype == torch.long and state["counts"].tolist() == [int((y == c).sum()) for c in range(4)]
    assert state["embeddings"].dtype == torch.float16 and state["embeddings"].shape == (len(y), DIM)


def _corrupt_truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt_other_key(path):
    state = torch.load(path, weights_only=True)
    state["key"] = "0" * 64
    torch.save(state, path)


class _NotATensor:
    pass


def _corrupt_pickle(path):
    torch.save({"format": 1, "payload": _NotATensor()}, path)


def _corrupt_structure(path):
    state = torch.load(path, weights_only=True)
    state["counts"] = state["counts"][:-1]
    torch.save(state, path)


@pytest.mark.parametrize("corrupt", [_corrupt_truncate, _corrupt_other_key, _corrupt_pickle, _corrupt_structure])
def test_cache_recovers_from_bad_file(tmp_path, caplog, corrupt):
    x, y = label_data()
    model = LabelEncoder()
    good = build(model, loader_of(x, y), cache_dir=tmp_path, dataset_id="toy")
    (path,) = tmp_path.glob("bank-*.pt")
    corrupt(path)

    n = model.forwards
    with caplog.at_level(logging.WARNING, logger="dire"):
        rebuilt = build(model, loader_of(x, y), cache_dir=tmp_path, dataset_id="toy")
    assert not rebuilt.cache_hit and model.forwards > n
    warnings = [r.getMessage() for r in caplog.records if r.name == "dire" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "rebuilding" in warnings[0] and "\n" not in warnings[0], warnings
    for c in good.classes:
        assert torch.equal(rebuilt[c], good[c])
    # The bad file was overwritten with a good one.
    again = build(model, loader_of(x, y), cache_dir=tmp_path, dataset_id="toy")
    assert again.cache_hit
    assert torch.load(path, weights_only=True)["key"] == good.fingerprint


def _flip_two_bits_in_embeddings(path, embeddings):
    """Flip the lowest bit of two stored floats in the file's bytes (the values stay finite)."""
    raw = bytearray(path.read_bytes())
    where = raw.find(embeddings.contiguous().numpy().tobytes())
    assert where > 0, "the embeddings are stored uncompressed in the torch zip file"
    step = embeddings.element_size()
    raw[where] ^= 1
    raw[where + 5 * step] ^= 1
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_flipped_bits_in_the_cache_are_a_warning_and_a_rebuild(tmp_path, caplog, dtype):
    x, y = label_data()
    model = LabelEncoder()
    good = build(model, loader_of(x, y), cache_dir=tmp_path, dataset_id="toy", dtype=dtype)
    (path,) = tmp_path.glob("bank-*.pt")
    stored = torch.load(path, weights_only=True)["embeddings"]
    _flip_two_bits_in_embeddings(path, stored)
    damaged = torch.load(path, weights_only=True)["embeddings"]
    assert int((damaged != stored).sum()) == 2 and bool(torch.isfinite(damaged).all())

    n = model.forwards
    with caplog.at_level(logging.WARNING, logger="dire"):
        rebuilt = build(model, loader_of(x, y), cache_dir=tmp_path, dataset_id="toy", dtype=dtype)
    assert not rebuilt.cache_hit and model.forwards > n, "damaged cache contents were reused"
    warnings = [r.getMessage() for r in caplog.records if r.name == "dire" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "checksum" in warnings[0] and "rebuilding" in warnings[0]
    assert "\n" not in warnings[0] and str(path) in warnings[0]
    assert _same_bank(rebuilt, good)
    assert build(model, loader_of(x, y), cache_dir=tmp_path, dataset_id="toy", dtype=dtype).cache_hit


def _same_bank(a, b):
    return a.classes == b.classes and all(torch.equal(a[c], b[c]) for c in a.classes)


def test_build_errors():
    model = LabelEncoder()
    empty = DataLoader(TensorDataset(torch.zeros(0, 2, 2, 2), torch.zeros(0, dtype=torch.long)), batch_size=4)
    with pytest.raises(DiReInputError, match="no data"):
        build(model, empty)

    x, y = label_data()
    x = x.clone()
    x.view(len(y), -1)[(y == 2).nonzero()[0, 0], 3] = float("nan")
    with pytest.raises(DiReInputError, match="class 2 contain NaN"):
        build(model, loader_of(x, y))

    x, y = label_data()
    x = x.clone()
    x[y == 1] = 0.0
    with pytest.raises(DiReInputError, match="class 1 are all zero"):
        build(model, loader_of(x, y))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_value_checks_are_exact_at_the_extremes(dtype):
    """Finite rows whose sum overflows are accepted; one NaN or Inf anywhere is found; a class
    of tiny or negative-zero values is told apart from an all-zero one."""
    big = torch.finfo(dtype).max
    x = torch.ones(8, DIM, dtype=dtype)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    x[2:4] = big  # class 1: every row sums past the dtype's range, yet each value is finite
    x[4:6] = torch.finfo(dtype).tiny  # class 2: squares and sums underflow, yet it is not zero
    bank = RealEmbeddingBank.from_tensors(x, y, dtype=dtype)
    assert torch.equal(bank[1], x[2:4]) and bool((bank[2] > 0).all())

    for value, where in ((float("nan"), 7), (float("inf"), 5), (-float("inf"), 0)):
        bad = x.clone()
        bad[where, DIM - 1] = value
        with pytest.raises(DiReInputError, match=f"class {int(y[where])} contain NaN or Inf"):
            RealEmbeddingBank.from_tensors(bad, y, dtype=dtype)
    both = x.clone()
    both[6, 0], both[6, 1] = float("inf"), -float("inf")  # the row sum is NaN, not Inf
    with pytest.raises(DiReInputError, match="class 3 contain NaN or Inf"):
        RealEmbeddingBank.from_tensors(both, y, dtype=dtype)

    zero = x.clone()
    zero[2:4] = -0.0
    with pytest.raises(DiReInputError, match="class 1 are all zero"):
        RealEmbeddingBank.from_tensors(zero, y, dtype=dtype)


def test_build_restores_modes_after_error():
    model = LabelEncoder().train()
    x, y = label_data()
    x = x.clone()
    x[0, 0, 0, 0] = float("inf")
    with pytest.raises(DiReInputError):
        build(model, loader_of(x, y))
    assert model.training and model.fc.training and not model.fc._forward_pre_hooks


def test_from_tensors_and_mapping():
    x, y = label_data()
    flat = x.flatten(1)
    a = RealEmbeddingBank.from_tensors(flat, y)
    b = RealEmbeddingBank.from_mapping({int(c): flat[y == c] for c in y.unique()})
    assert a.classes == b.classes == [0, 1, 2, 3]
    for c in a.classes:
        assert torch.equal(a[c], flat[y == c]) and torch.equal(b[c], a[c])
    assert a.fingerprint == b.fingerprint
    assert 7 not in a and "x" not in a
    with pytest.raises(DiReInputError, match="class 3 contain NaN"):
        RealEmbeddingBank.from_tensors(torch.where(y.unsqueeze(1) == 3, float("nan"), flat), y)


def _unit_sum(rows):
    return sum(r / max(float(r.norm()), 1e-8) for r in rows)


def test_synthetic_memory_add_get_and_sums():
    torch.manual_seed(0)
    mem = SyntheticMemory()
    e1, l1 = torch.randn(5, DIM, requires_grad=True), torch.tensor([0, 2, 0, 2, 2])
    mem.add(e1 * 3.0, l1)
    assert len(mem) == 5 and mem.count(0) == 2 and mem.count(2) == 3 and mem.count(1) == 0
    assert mem.get(1).shape == (0, DIM)
    assert not mem.get(0).requires_grad
    torch.testing.assert_close(mem.get(2), (e1 * 3.0).detach()[l1 == 2])

    s = mem.class_sums(torch.device("cpu"))
    assert isinstance(s, ClassSums) and s.classes.tolist() == [0, 2] and s.counts.tolist() == [2, 3]
    assert s.unit_sums.dtype == torch.float32
    torch.testing.assert_close(s.unit_sums[1], _unit_sum(mem.get(2)))
    assert mem.class_sums("cpu") is s, "class_sums must be cached"

    e2 = torch.randn(3, DIM)
    mem.add(e2, torch.tensor([1, 2, 1]))
    s2 = mem.class_sums("cpu")
    assert s2 is not s and s2.classes.tolist() == [0, 1, 2] and s2.counts.tolist() == [2, 2, 4]
    for i, c in enumerate([0, 1, 2]):
        torch.testing.assert_close(s2.unit_sums[i], _unit_sum(mem.get(c)))
    torch.testing.assert_close(mem.get(2)[-1], e2[1])

    mem.clear()
    assert len(mem) == 0 and len(mem.class_sums("cpu").classes) == 0


def test_class_sums_of_rows_plus_more_rows_are_the_sums_of_all_rows():
    # What CD pushes a DELT step away from: the memory's sums plus those of the batch's rows not
    # forwarded in the step, some classes in both, some in one.
    torch.manual_seed(1)
    a, la = torch.randn(5, DIM), torch.tensor([3, 0, 3, 3, 0])
    b, lb = torch.randn(4, DIM, dtype=torch.float64), torch.tensor([1, 3, 1, 1])
    both = ClassSums.of_rows(a, la).plus(ClassSums.of_rows(b, lb))
    assert both.classes.tolist() == [0, 1, 3] and both.counts.tolist() == [2, 3, 4]
    assert both.unit_sums.dtype == torch.float64  # the wider of the two
    rows, labels = torch.cat([a.double(), b]), torch.cat([la, lb])
    for i, c in enumerate([0, 1, 3]):
        torch.testing.assert_close(both.unit_sums[i], _unit_sum(rows[labels == c]))
    empty = ClassSums.of_rows(torch.zeros(0, DIM), torch.zeros(0, dtype=torch.long))
    assert empty.plus(both) is not None and empty.plus(both).counts.tolist() == [2, 3, 4]
    assert both.plus(empty) is both
    with pytest.raises(DiReInputError, match="dimension 3 cannot join ones of dimension"):
        both.plus(ClassSums.of_rows(torch.randn(2, 3), torch.tensor([0, 1])))


def test_synthetic_memory_cap_float64_and_state_dict(tmp_path):
    mem = SyntheticMemory(max_per_class=2)
    e = torch.randn(4, DIM, dtype=torch.float64)
    mem.add(e, torch.tensor([1, 1, 1, 3]))
    assert mem.count(1) == 2 and torch.equal(mem.get(1), e[1:3]), "the most recent rows are kept"
    assert mem.class_sums("cpu").unit_sums.dtype == torch.float64

    torch.save(mem.state_dict(), tmp_path / "mem.pt")
    other = SyntheticMemory(max_per_class=2)
    other.load_state_dict(torch.load(tmp_path / "mem.pt", weights_only=True))
    assert other.classes == [1, 3]
    for c in (1, 3):
        assert torch.equal(other.get(c), mem.get(c))
    torch.testing.assert_close(other.class_sums("cpu").unit_sums, mem.class_sums("cpu").unit_sums)


def test_dire_loss_with_bank_and_memory_matches_dicts():
    torch.manual_seed(0)
    x, y = label_data()
    bank = build(LabelEncoder(), loader_of(x, y))
    mem = SyntheticMemory()
    mem.add(torch.randn(6, DIM), torch.tensor([0, 1, 1, 3, 3, 3]))
    syn = torch.randn(8, DIM, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    loss_fn = DiReLoss(r_c=0.5, r_e=0.1)

    loss = loss_fn(syn, labels, bank, memory=mem)
    (g,) = torch.autograd.grad(loss, syn)
    syn2 = syn.detach().clone().requires_grad_(True)
    ref = loss_fn(syn2, labels, {c: bank[c].clone() for c in bank}, memory={c: mem.get(c) for c in mem.classes})
    (g_ref,) = torch.autograd.grad(ref, syn2)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(g, g_ref)

    # The memory matters, so the comparison above is not vacuous.
    assert not torch.allclose(loss_fn(syn, labels, bank), loss)


@pytest.mark.parametrize("kwargs", [{"shuffle": True}, {"collate_fn": lambda batch: batch}], ids=["shuffled", "collate"])
def test_a_sharded_build_refuses_a_loader_it_cannot_reproduce(kwargs):
    # Each rank reads loader.dataset in a loader of its own: another sampler or collate_fn would
    # silently give another bank than one process builds (checked before any exchange).
    from dire_plugin.embeddings.bank import _embed_sharded

    data = torch.utils.data.TensorDataset(torch.rand(6, 3), torch.arange(3).repeat(2))
    loader = torch.utils.data.DataLoader(data, batch_size=2, **kwargs)
    with pytest.raises(DiReInputError, match="shards loader.dataset itself"):
        _embed_sharded(nn.Linear(3, 2), loader, "", None, False, 0, 2)
