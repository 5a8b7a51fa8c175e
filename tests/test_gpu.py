"""What only a GPU can show (``pytest -m gpu``; skipped where torch sees no CUDA device, and run
by ``benchmarks/gpu_check.sh`` on a GPU machine): the loss on CUDA equals the CPU's in float64,
the runtime through ``nn.DataParallel`` on one GPU, the bank built on the GPU, and a teacher run
under bf16 autocast."""
import pytest
import torch
from torch import nn

from dire_plugin import DiReLoss, EmbeddingCapture, RealEmbeddingBank
from dire_plugin.hooks.runtime import current_runtime
from dire_plugin.hooks.settings import RunConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

NUM_CLASSES, D = 6, 16


def _teacher():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, D, 3, padding=1), nn.BatchNorm2d(D), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(D, NUM_CLASSES),
    ).eval()
    for p in net.parameters():
        p.requires_grad = False
    return net


def _bank(device="cpu"):
    g = torch.Generator().manual_seed(1)
    return RealEmbeddingBank.from_tensors(torch.rand(NUM_CLASSES * 5, D, generator=g) + 0.1,
                                          torch.arange(NUM_CLASSES).repeat(5))


def test_loss_on_cuda_equals_cpu_in_float64():
    g = torch.Generator().manual_seed(2)
    syn = torch.randn(20, 32, generator=g, dtype=torch.float64)
    labels = torch.arange(5).repeat(4)
    real = {c: torch.randn(7, 32, generator=g, dtype=torch.float64) for c in range(5)}
    memory = {c: torch.randn(3, 32, generator=g, dtype=torch.float64) for c in range(5)}
    loss = DiReLoss(r_c=0.5, r_e=0.05)
    cpu_x = syn.clone().requires_grad_()
    cpu = loss(cpu_x, labels, real, memory=memory)
    (g_cpu,) = torch.autograd.grad(cpu, cpu_x)
    gpu_x = syn.cuda().requires_grad_()
    gpu = loss(gpu_x, labels.cuda(), {c: t.cuda() for c, t in real.items()}, memory={c: t.cuda() for c, t in memory.items()})
    (g_gpu,) = torch.autograd.grad(gpu, gpu_x)
    assert float(gpu) == pytest.approx(float(cpu), rel=1e-10)
    torch.testing.assert_close(g_gpu.cpu(), g_cpu, rtol=1e-9, atol=1e-12)


def _sre2l_step(model, inputs, targets):
    optimizer = torch.optim.Adam([inputs], lr=0.1, betas=(0.5, 0.9))
    optimizer.zero_grad()
    loss = nn.CrossEntropyLoss()(model(torch.roll(inputs, shifts=(1, 1), dims=(2, 3))), targets)
    (loss + 0.01 * inputs.pow(2).mean()).backward()
    grad = inputs.grad.clone()
    optimizer.step()
    return grad


def test_runtime_through_data_parallel_on_one_gpu():
    from dire_plugin.patches import sre2l

    bank = _bank()
    model = nn.DataParallel(_teacher()).cuda()
    targets = torch.arange(NUM_CLASSES, device="cuda")
    inputs = torch.randn(NUM_CLASSES, 3, 6, 6, device="cuda", requires_grad=True)
    sre2l.patch(RunConfig(method="sre2l", script="t.py", r_c=0.5, r_e=0.05, log_every=0), bank_factory=lambda *a: bank)
    try:
        runtime = current_runtime()
        runtime.enabled = False
        x = inputs.detach().clone().requires_grad_()
        with EmbeddingCapture(model) as cap:
            out = model(torch.roll(x, shifts=(1, 1), dims=(2, 3)))
            loss = nn.CrossEntropyLoss()(out, targets) + 0.01 * x.pow(2).mean()
            (g_vanilla,) = torch.autograd.grad(loss, x, retain_graph=True)
            (g_dire,) = torch.autograd.grad(DiReLoss(r_c=0.5, r_e=0.05)(cap.embeddings, targets, bank), x)
        runtime.enabled = True
        grad = _sre2l_step(model, inputs, targets)
        assert runtime.stats.terms_added == 1
    finally:
        sre2l.unpatch()
    torch.testing.assert_close(grad, g_vanilla + g_dire, rtol=1e-4, atol=1e-6)


def test_bank_built_on_the_gpu_equals_the_cpu_bank():
    model = _teacher()
    g = torch.Generator().manual_seed(3)
    data = torch.utils.data.TensorDataset(torch.rand(30, 3, 6, 6, generator=g), torch.arange(NUM_CLASSES).repeat(5))
    cpu = RealEmbeddingBank.build(model, torch.utils.data.DataLoader(data, batch_size=8), progress=False)
    gpu = RealEmbeddingBank.build(model.cuda(), torch.utils.data.DataLoader(data, batch_size=8), device="cuda",
                                  progress=False)
    torch.testing.assert_close(gpu._flat, cpu._flat, rtol=1e-4, atol=1e-5)
    packed = gpu.packed("cuda")
    assert packed.padded.is_cuda and packed.padded.dtype == torch.float32


def test_bf16_autocast_teacher_gets_a_finite_term():
    from dire_plugin.patches import sre2l

    bank = _bank()
    model = _teacher().cuda()
    targets = torch.arange(NUM_CLASSES, device="cuda")
    inputs = torch.randn(NUM_CLASSES, 3, 6, 6, device="cuda", requires_grad=True)
    sre2l.patch(RunConfig(method="sre2l", script="t.py", log_every=0), bank_factory=lambda *a: bank)
    try:
        optimizer = torch.optim.Adam([inputs], lr=0.1)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outputs = model(inputs)
            loss = nn.CrossEntropyLoss()(outputs, targets)
        loss.backward()
        optimizer.step()
        runtime = current_runtime()
        assert runtime.stats.terms_added == 1
        assert all(v is not None and v == v for v in runtime.stats.means().values())
    finally:
        sre2l.unpatch()
    assert torch.isfinite(inputs).all()
