import threading

import pytest
import torch
from torch import nn

import dire_plugin.embeddings.capture as features
from dire_plugin.errors import DiReInputError
from dire_plugin.embeddings.capture import EmbeddingCapture, capture_embeddings, find_last_linear, resolve_layer


class SmallCNN(nn.Module):
    def __init__(self, classes: int = 5, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.AdaptiveAvgPool2d(2)
        )
        self.proj = nn.Linear(width * 4, 16)
        self.fc = nn.Linear(16, classes)

    def penultimate(self, x):
        return torch.relu(self.proj(self.features(x).flatten(1)))

    def forward(self, x):
        return self.fc(self.penultimate(x))


@pytest.fixture
def model():
    torch.manual_seed(0)
    return SmallCNN().eval()


def test_find_last_linear_and_wrappers(model):
    assert find_last_linear(model) == "fc"
    assert find_last_linear(nn.DataParallel(model)) == "fc"
    assert resolve_layer(nn.DataParallel(model), "module.proj") == "proj"
    assert resolve_layer(model, "module.fc") == "fc"
    with pytest.raises(DiReInputError, match="no submodule"):
        resolve_layer(model, "head")


def test_error_when_no_linear():
    with pytest.raises(DiReInputError, match="no nn.Linear"):
        find_last_linear(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    with pytest.raises(DiReInputError):
        EmbeddingCapture(nn.Sequential(nn.Conv2d(3, 4, 3)))


def test_capture_equals_manual_penultimate(model):
    x = torch.randn(6, 3, 8, 8)
    with capture_embeddings(model) as cap:
        logits = model(x)
    assert cap.count == 1
    assert cap.embeddings.shape == (6, 16)
    torch.testing.assert_close(cap.embeddings, model.penultimate(x))
    torch.testing.assert_close(logits, model.fc(cap.embeddings))


def test_named_layer_captures_its_flattened_input(model):
    x = torch.randn(4, 3, 8, 8)
    with capture_embeddings(model, layer="proj") as cap:
        model(x)
    torch.testing.assert_close(cap.embeddings, model.features(x).flatten(1))
    assert cap.embeddings.shape == (4, 32)


def test_gradient_flows_to_input(model):
    x = torch.randn(3, 3, 8, 8, requires_grad=True)
    with capture_embeddings(model) as cap:
        model(x)
    assert cap.embeddings.requires_grad
    cap.embeddings.pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0

    x2 = x.detach().clone().requires_grad_(True)
    expected = torch.autograd.grad(model.penultimate(x2).pow(2).sum(), x2)[0]
    torch.testing.assert_close(x.grad, expected)


def test_detach_option(model):
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    with capture_embeddings(model, detach=True) as cap:
        out = model(x)
    assert out.requires_grad and not cap.embeddings.requires_grad


def test_only_with_grad_skips_no_grad_forwards(model):
    x = torch.randn(2, 3, 8, 8)
    cap = EmbeddingCapture(model, only_with_grad=True)
    with torch.no_grad():
        model(x)
    assert cap.embeddings is None and cap.count == 0
    model(x)
    assert cap.count == 1
    first = cap.embeddings
    with torch.no_grad():
        model(torch.randn(5, 3, 8, 8))
    assert cap.embeddings is first and cap.count == 1
    cap.remove()


def test_enabled_flag_clear_and_remove(model):
    x = torch.randn(2, 3, 8, 8)
    cap = EmbeddingCapture(model)
    cap.enabled = False
    model(x)
    assert cap.embeddings is None
    cap.enabled = True
    model(x)
    model(x)
    assert cap.count == 2
    cap.clear()
    assert cap.embeddings is None and cap.count == 0
    cap.remove()
    cap.remove()  # idempotent
    model(x)
    assert cap.embeddings is None and cap.count == 0
    assert not model.fc._forward_pre_hooks


def test_context_manager_removes_hooks(model):
    with EmbeddingCapture(model) as cap:
        assert len(model.fc._forward_pre_hooks) == 1
    assert not model.fc._forward_pre_hooks
    model(torch.randn(1, 3, 8, 8))
    assert cap.count == 0


def test_data_parallel_cpu_path(model):
    dp = nn.DataParallel(model)
    x = torch.randn(5, 3, 8, 8, requires_grad=True)
    with capture_embeddings(dp, layer="module.fc") as cap:
        dp(x)
        assert cap.count == 1
        torch.testing.assert_close(cap.embeddings, model.penultimate(x))
        cap.embeddings.sum().backward()
        assert x.grad.abs().sum() > 0
        # Calling the inner module directly (no top-level forward) still captures.
        model(x[:2])
        assert cap.count == 2 and cap.embeddings.shape[0] == 2
    assert not dp._forward_pre_hooks and not dp._forward_hooks and not model.fc._forward_pre_hooks


class _ThreadedParallel(nn.DataParallel):
    """Simulates DataParallel replicas on CPU: one thread per fake device, finishing out of order."""

    def __init__(self, module):
        super().__init__(module)
        self.device_ids = [0, 1, 2]

    def forward(self, x):
        chunks = x.chunk(3)
        outputs = [None] * 3
        barrier = threading.Barrier(3)

        def run(i):
            features._FAKE_DEVICE.index = i
            barrier.wait()
            # Reverse finishing order: device 2 first.
            if i < 2:
                threading.Event().wait(0.02 * (2 - i))
            outputs[i] = self.module(chunks[i])

        grad = torch.is_grad_enabled()
        threads = [threading.Thread(target=lambda i=i: (torch.set_grad_enabled(grad), run(i))) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return torch.cat(outputs)


def test_data_parallel_chunks_concatenated_in_device_order(model, monkeypatch):
    monkeypatch.setattr(features, "_FAKE_DEVICE", threading.local(), raising=False)
    monkeypatch.setattr(features, "_device_key", lambda t: features._FAKE_DEVICE.index)
    dp = _ThreadedParallel(model)
    x = torch.randn(9, 3, 8, 8, requires_grad=True)
    with capture_embeddings(dp) as cap:
        logits = dp(x)
    assert cap.count == 1
    torch.testing.assert_close(cap.embeddings, model.penultimate(x))
    torch.testing.assert_close(model.fc(cap.embeddings), logits)
    cap.embeddings.sum().backward()
    assert x.grad.abs().sum() > 0


def test_data_parallel_only_with_grad(model):
    dp = nn.DataParallel(model)
    with capture_embeddings(dp, only_with_grad=True) as cap:
        with torch.no_grad():
            dp(torch.randn(2, 3, 8, 8))
        assert cap.count == 0 and cap.embeddings is None


def test_forward_error_leaves_no_pending_chunks(model):
    class Failing(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            self.inner(x)
            raise RuntimeError("boom")

    dp = nn.DataParallel(Failing(model))
    with capture_embeddings(dp, layer="inner.fc") as cap:
        with pytest.raises(RuntimeError):
            dp(torch.randn(2, 3, 8, 8))
        model(torch.randn(3, 3, 8, 8))  # outside any top-level forward: captured at once
        assert cap.embeddings.shape[0] == 3
