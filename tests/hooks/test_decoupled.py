"""The decoupled capture's reading of the graph: which rows of the optimised tensor a forward
covers, which classifier calls a DataParallel gather took, and forwards no criterion takes."""
import gc
import weakref

import pytest
import torch
from torch import nn

from dire_plugin import DiReLoss, EmbeddingCapture
from dire_plugin.hooks.decoupled import _images_behind, _rows_taken
from dire_plugin.hooks.runtime import current_runtime
from dire_plugin.hooks.settings import RunConfig
from dire_plugin.patches import sre2l
from nets import frozen_teacher, random_bank

N, D, CLASSES = 6, 8, 3


def _rows(make, count=None):
    """The rows ``_rows_taken`` reads from the node that ``make(images)`` applies to the images."""
    images = torch.randn(N, 3, 4, 4, requires_grad=True)
    out = make(images)
    ((leaf, readers),) = _images_behind(out.flatten(1).sum(1, keepdim=True))
    assert leaf is images
    rows = _rows_taken(readers, images, out.shape[0] if count is None else count)
    return None if rows is None else rows.tolist()


@pytest.mark.parametrize("make,expected", [
    (lambda x: torch.roll(x, (1, 1), dims=(2, 3)), [0, 1, 2, 3, 4, 5]),  # an augmentation of the whole batch
    (lambda x: x[[4, 0, 2]], [4, 0, 2]),  # DELT: inputs[slicing_list[round]], in the list's order
    (lambda x: torch.flip(x[[1]], dims=(3,)), [1]),
    (lambda x: x[torch.tensor([True, False, False, True, False, True])], [0, 3, 5]),
    (lambda x: x[torch.tensor([-1, 0])], [5, 0]),
    (lambda x: x[1:5:2], [1, 3]),
    (lambda x: x.index_select(0, torch.tensor([5, 2])), [5, 2]),
    (lambda x: x[:, :, 1:3], [0, 1, 2, 3, 4, 5]),  # a crop: every row
    (lambda x: x[:, [0, 2]], [0, 1, 2, 3, 4, 5]),  # channels picked: every row
    (lambda x: x[2].unsqueeze(0), None),  # one image without its batch dimension
    (lambda x: torch.cat([x[0:2], x[4:6]]), None),  # two nodes read the images
], ids=["whole", "list", "one", "mask", "negative", "slice", "index_select", "crop", "channels", "select", "cat"])
def test_rows_a_forward_covers(make, expected):
    assert _rows(make) == expected


def test_rows_that_do_not_add_up_are_not_told():
    assert _rows(lambda x: x[[0, 1]], count=3) is None
    assert _rows(lambda x: torch.roll(x, 1, dims=2), count=4) is None


def _teacher(seed):
    return frozen_teacher(seed, CLASSES, (D,))


def _bank():
    return random_bank(CLASSES, 4, D)


class _Gather(torch.autograd.Function):
    """A stand-in for DataParallel's gather on the CPU (the real one needs GPUs): the replicas'
    logits concatenated into a new tensor, under the name the capture looks for."""

    @staticmethod
    def forward(ctx, *chunks):
        ctx.sizes = [c.shape[0] for c in chunks]
        return torch.cat(chunks)

    @staticmethod
    def backward(ctx, grad):
        return tuple(grad.split(ctx.sizes))


def test_a_gather_takes_its_own_replicas_not_the_latest_forward():
    # PRISM forwards its further teachers after teacher 1: DiRe must use the calls the gather took.
    bank = _bank()
    replicas = [_teacher(0), _teacher(0)]
    other = _teacher(5)
    targets = torch.arange(CLASSES).repeat(2)
    images = torch.randn(2 * CLASSES, 3, 4, 4, generator=torch.Generator().manual_seed(3)).requires_grad_()
    start = images.detach().clone()
    sre2l.patch(RunConfig(method="sre2l", script="fixture.py", r_c=0.5, r_e=0.05, log_every=0), bank_factory=lambda *a: bank)
    try:
        optimizer = torch.optim.Adam([images], lr=0.1)
        logits = _Gather.apply(replicas[0](images[:CLASSES]), replicas[1](images[CLASSES:]))
        other(images)  # a further teacher, forwarded last, whose logits no criterion takes
        nn.CrossEntropyLoss()(logits, targets).backward()
        grad = images.grad.clone()
        optimizer.step()
        assert current_runtime().stats.terms_added == 1
        current_runtime().enabled = False
        x = start.requires_grad_()
        with EmbeddingCapture(replicas[0]) as cap:
            loss = nn.CrossEntropyLoss()(replicas[0](x), targets)
            (g_vanilla,) = torch.autograd.grad(loss, x, retain_graph=True)
            (g_dire,) = torch.autograd.grad(DiReLoss(r_c=0.5, r_e=0.05)(cap.embeddings, targets, bank), x)
    finally:
        sre2l.unpatch()
    assert g_dire.abs().sum() > 0
    torch.testing.assert_close(grad, g_vanilla + g_dire, rtol=1e-5, atol=1e-7)


def test_forwards_no_criterion_takes_are_let_go_at_the_step():
    # PRISM's teachers 2-5 run for their BN statistics and their logits are dropped: a record of
    # ours must not keep those forwards' graphs alive after the synthesis step.
    bank = _bank()
    teacher, other = _teacher(0), _teacher(5)
    seen = []
    other[-1].register_forward_pre_hook(lambda module, args: seen.append(weakref.ref(args[0])))
    images = torch.randn(CLASSES, 3, 4, 4).requires_grad_()
    sre2l.patch(RunConfig(method="sre2l", script="fixture.py", log_every=0), bank_factory=lambda *a: bank)
    try:
        optimizer = torch.optim.Adam([images], lr=0.1)
        logits = teacher(images)
        other(images)
        nn.CrossEntropyLoss()(logits, torch.arange(CLASSES)).backward()
        del logits
        optimizer.step()
        gc.collect()
        assert seen and seen[0]() is None
    finally:
        sre2l.unpatch()


def test_images_the_graph_cannot_tell_apart_join_the_memory_one_step_late():
    # Two leaves behind the embeddings (no single tensor of images): the finished batch is committed
    # at the first optimizer step of the next one, from its last step's embeddings.
    bank, teacher = _bank(), _teacher(0)
    sre2l.patch(RunConfig(method="sre2l", script="fixture.py", log_every=0), bank_factory=lambda *a: bank)
    try:
        runtime = current_runtime()
        for batch in range(2):
            images, shift = torch.randn(CLASSES, 3, 4, 4).requires_grad_(), torch.zeros(CLASSES, 3, 4, 4).requires_grad_()
            optimizer = torch.optim.Adam([images, shift], lr=0.1)
            for _ in range(2):
                optimizer.zero_grad()
                nn.CrossEntropyLoss()(teacher(images + shift), torch.arange(CLASSES)).backward()
                optimizer.step()
            assert len(runtime.memory) == batch * CLASSES
        assert runtime.capture.rows["terms_rows_unknown"] == 0 and runtime.stats.terms_added == 4
    finally:
        sre2l.unpatch()
