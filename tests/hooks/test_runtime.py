"""The hook runtime on an in-process SRe²L-shaped loop: the images get exactly the vanilla
gradient plus the DiRe gradient, memory spans batches, and a step without the term stops."""
import pytest
import torch
from torch import nn

from dire_plugin import DiReLoss
from dire_plugin.embeddings.bank import RealEmbeddingBank
from dire_plugin.embeddings.memory import SyntheticMemory
from dire_plugin.errors import DiReHookError, DiReInputError
from dire_plugin.embeddings.capture import EmbeddingCapture
from dire_plugin.hooks.runtime import current_runtime
from dire_plugin.hooks.settings import RunConfig
from dire_plugin.patches import dm, sre2l
from nets import BNPrior, frozen_teacher, random_bank

NUM_CLASSES, D = 4, 8


def _teacher(seed=0):
    return frozen_teacher(seed, NUM_CLASSES, (6, D))


def _bank(seed=1):
    return random_bank(NUM_CLASSES, 5, D, seed)


@pytest.fixture
def patched():
    bank = _bank()
    config = RunConfig(method="sre2l", script="fixture.py", r_c=0.5, r_e=0.05, log_every=0)
    sre2l.patch(config, bank_factory=lambda teacher, layer, device: bank)
    yield bank, config
    sre2l.unpatch()


def _step(model, inputs, targets, criterion, print_twice=True):
    """One SRe²L-shaped iteration; returns the images' gradient as the optimizer applies it."""
    optimizer = torch.optim.Adam([inputs], lr=0.1, betas=(0.5, 0.9))
    seen = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(inputs.grad.clone()))  # after DiRe's
    optimizer.zero_grad()
    outputs = model(torch.roll(inputs, shifts=(1, 1), dims=(2, 3)))
    loss_ce = criterion(outputs, targets)
    if print_twice:
        criterion(outputs, targets).item()  # the upstream's print-time call
    loss = loss_ce + 0.01 * inputs.pow(2).mean()
    loss.backward()
    optimizer.step()
    return seen[0], optimizer


def _expected_grad(model, inputs, targets, bank, memory=None, r_c=0.5, r_e=0.05):
    """Vanilla and DiRe gradients computed directly, with the runtime switched off."""
    runtime = current_runtime()
    runtime.enabled = False
    try:
        return _direct_grads(model, inputs, targets, bank, memory, r_c, r_e)
    finally:
        runtime.enabled = True


def _direct_grads(model, inputs, targets, bank, memory, r_c, r_e):
    x = inputs.detach().clone().requires_grad_()
    with EmbeddingCapture(model) as cap:
        outputs = model(torch.roll(x, shifts=(1, 1), dims=(2, 3)))
        loss = nn.CrossEntropyLoss()(outputs, targets) + 0.01 * x.pow(2).mean()
        (g_vanilla,) = torch.autograd.grad(loss, x, retain_graph=True)
        dire = DiReLoss(r_c=r_c, r_e=r_e)(cap.embeddings, targets, bank, memory=memory)
        (g_dire,) = torch.autograd.grad(dire, x)
    return g_vanilla, g_dire


def test_images_get_vanilla_plus_dire_gradient(patched):
    bank, _ = patched
    model = _teacher()
    targets = torch.arange(NUM_CLASSES)
    inputs = torch.randn(NUM_CLASSES, 3, 6, 6, generator=torch.Generator().manual_seed(2)).requires_grad_()
    g_vanilla, g_dire = _expected_grad(model, inputs, targets, bank)
    assert g_dire.abs().sum() > 0
    grad, _ = _step(model, inputs, targets, nn.CrossEntropyLoss())
    torch.testing.assert_close(grad, g_vanilla + g_dire, rtol=1e-5, atol=1e-7)
    stats = current_runtime().stats
    assert (stats.steps, stats.terms_added, stats.computed) == (1, 1, 1)  # print-time call added nothing
    # The share, from DiRe's part alone (an input-only backward of ours): measuring changed nothing above.
    share = current_runtime().manifest()["gradient_share"]
    assert share["steps_measured"] == 1 and share["target"] is None
    assert share["median"] == pytest.approx(float(g_dire.norm() / g_vanilla.norm()), rel=1e-4)


def test_printed_loss_is_untouched(patched):
    model = _teacher()
    targets = torch.arange(NUM_CLASSES)
    inputs = torch.randn(NUM_CLASSES, 3, 6, 6).requires_grad_()
    outputs = model(inputs)
    assert float(nn.CrossEntropyLoss()(outputs, targets)) == float(nn.functional.cross_entropy(outputs, targets))


def test_memory_reaches_the_first_step_of_the_next_batch(patched):
    # The first step of ipc index 1 already pushes away from ipc index 0: where one batch holds
    # every class (CIFAR recover, DWA), a late commit would leave that step without the memory.
    bank, _ = patched
    model = _teacher()
    targets = torch.arange(NUM_CLASSES)
    gen = torch.Generator().manual_seed(3)
    first = torch.randn(NUM_CLASSES, 3, 6, 6, generator=gen).requires_grad_()
    for _ in range(2):
        _step(model, first, targets, nn.CrossEntropyLoss())
    runtime = current_runtime()
    assert len(runtime.memory) == 0  # the batch is not finished yet
    finished = runtime.capture.last  # embeddings of the first batch's last step
    memory = SyntheticMemory()
    memory.add(*finished)
    # ipc index 1: a new tensor of images for the same classes
    second = torch.randn(NUM_CLASSES, 3, 6, 6, generator=gen).requires_grad_()
    g_vanilla, g_dire = _expected_grad(model, second, targets, bank, memory=memory)
    grad, _ = _step(model, second, targets, nn.CrossEntropyLoss())
    assert len(runtime.memory) == NUM_CLASSES and runtime.stats.batches_to_memory == 1
    torch.testing.assert_close(grad, g_vanilla + g_dire, rtol=1e-5, atol=1e-7)
    # without memory the CD part would be absent: the gradients differ
    _, g_no_memory = _expected_grad(model, second, targets, bank)
    assert not torch.allclose(g_dire, g_no_memory)


def test_a_bank_built_at_the_first_step_leaves_the_methods_hooks_alone():
    # The bank is built inside the first criterion call, through the method's own teacher: its
    # forwards must not replace the BN statistics the step reads right after that call.
    model = _teacher()
    prior = BNPrior(model)  # SRe²L's BN prior, read after the criterion call
    g = torch.Generator().manual_seed(7)
    real = torch.utils.data.TensorDataset(torch.randn(NUM_CLASSES * 3, 3, 6, 6, generator=g),
                                          torch.arange(NUM_CLASSES).repeat(3))

    def factory(teacher, layer, device):
        loader = torch.utils.data.DataLoader(real, batch_size=5)
        return RealEmbeddingBank.build(teacher, loader, layer=layer or None, progress=False)

    targets = torch.arange(NUM_CLASSES)
    inputs = torch.randn(NUM_CLASSES, 3, 6, 6, generator=g).requires_grad_()

    def loss_of(outputs, criterion):
        loss_ce = criterion(outputs, targets)
        return loss_ce + 0.1 * prior.loss()

    sre2l.patch(RunConfig(method="sre2l", script="fixture.py", r_c=0.5, r_e=0.05, log_every=0), bank_factory=factory)
    runtime = current_runtime()
    try:
        runtime.enabled = False  # the reference: the bank built beforehand, the step computed directly
        bank = factory(model, None, torch.device("cpu"))
        x = inputs.detach().clone().requires_grad_()
        with EmbeddingCapture(model) as cap:
            loss = loss_of(model(torch.roll(x, shifts=(1, 1), dims=(2, 3))), nn.CrossEntropyLoss())
            (g_vanilla,) = torch.autograd.grad(loss, x, retain_graph=True)
            (g_dire,) = torch.autograd.grad(DiReLoss(r_c=0.5, r_e=0.05)(cap.embeddings, targets, bank), x)
        runtime.enabled = True
        optimizer = torch.optim.Adam([inputs], lr=0.1, betas=(0.5, 0.9))
        loss_of(model(torch.roll(inputs, shifts=(1, 1), dims=(2, 3))), nn.CrossEntropyLoss()).backward()
        grad = inputs.grad.clone()
        optimizer.step()
        assert runtime.bank is not None and runtime.stats.terms_added == 1  # built inside this step
    finally:
        sre2l.unpatch()
    torch.testing.assert_close(grad, g_vanilla + g_dire, rtol=1e-5, atol=1e-7)


def test_share_calibrates_the_weights_on_the_first_steps():
    bank = _bank()
    config = RunConfig(method="sre2l", script="fixture.py", r_c=0.5, r_e=0.05, share=0.2, log_every=0)
    sre2l.patch(config, bank_factory=lambda *a: bank)
    try:
        runtime = current_runtime()
        model = _teacher()
        targets = torch.arange(NUM_CLASSES)
        inputs = torch.randn(NUM_CLASSES, 3, 6, 6, generator=torch.Generator().manual_seed(2)).requires_grad_()
        factors = []
        for step in range(3):  # calibration: each step's DiRe part is scaled to exactly the share asked
            g_vanilla, g_dire = _expected_grad(model, inputs, targets, bank)
            grad, _ = _step(model, inputs, targets, nn.CrossEntropyLoss())
            factors.append(0.2 * float(g_vanilla.norm() / g_dire.norm()))
            torch.testing.assert_close(grad, g_vanilla + factors[-1] * g_dire, rtol=1e-4, atol=1e-7)
        k = sorted(factors)[1]
        assert runtime.share.scale == pytest.approx(k, rel=1e-4)
        assert (runtime.config.r_c, runtime.config.r_e) == pytest.approx((0.5 * k, 0.05 * k), rel=1e-4)
        # then held: the terms are computed with the calibrated weights
        g_vanilla, g_dire = _expected_grad(model, inputs, targets, bank, r_c=0.5 * k, r_e=0.05 * k)
        grad, _ = _step(model, inputs, targets, nn.CrossEntropyLoss())
        torch.testing.assert_close(grad, g_vanilla + g_dire, rtol=1e-4, atol=1e-7)
        share = runtime.manifest()["gradient_share"]
        assert share["first_steps"][:3] == pytest.approx([0.2, 0.2, 0.2], rel=1e-4)
        assert [step for step, _ in share["measured"]] == [1, 2, 3, 4]
        assert [s for _, s in share["measured"]][:3] == pytest.approx([0.2, 0.2, 0.2], rel=1e-4)
        assert share["calibration"]["done"] and share["calibration"]["r_c"] == pytest.approx(0.5 * k, rel=1e-4)
    finally:
        sre2l.unpatch()


def test_the_logdet_term_reaches_the_images_with_the_memory():
    # Beyond the paper: logdet beside CD, with its r_d, through the same hooks, the memory's rows included.
    bank = _bank()
    terms = ("cd", "cdm", "logdet")
    config = RunConfig(method="sre2l", script="fixture.py", r_c=0.5, r_e=0.0, r_d=0.7, components=terms, log_every=0)
    sre2l.patch(config, bank_factory=lambda *a: bank)
    try:
        runtime = current_runtime()
        model = _teacher()
        targets = torch.arange(NUM_CLASSES)
        gen = torch.Generator().manual_seed(8)
        first = torch.randn(NUM_CLASSES, 3, 6, 6, generator=gen).requires_grad_()
        _step(model, first, targets, nn.CrossEntropyLoss())
        memory = SyntheticMemory()
        memory.add(*runtime.capture.last)
        second = torch.randn(NUM_CLASSES, 3, 6, 6, generator=gen).requires_grad_()
        runtime.enabled = False
        x = second.detach().clone().requires_grad_()
        with EmbeddingCapture(model) as cap:
            loss = nn.CrossEntropyLoss()(model(torch.roll(x, shifts=(1, 1), dims=(2, 3))), targets) + 0.01 * x.pow(2).mean()
            (g_vanilla,) = torch.autograd.grad(loss, x, retain_graph=True)
            dire = DiReLoss(r_c=0.5, r_e=0.0, r_d=0.7, components=terms)(cap.embeddings, targets, bank, memory=memory)
            (g_dire,) = torch.autograd.grad(dire, x)
        runtime.enabled = True
        grad, _ = _step(model, second, targets, nn.CrossEntropyLoss())
        assert runtime.manifest()["mean_values"]["logdet"] is not None
    finally:
        sre2l.unpatch()
    torch.testing.assert_close(grad, g_vanilla + g_dire, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("share", [0.0, -1.0, float("nan"), float("inf"), "0.1x", True])
def test_a_share_that_is_not_a_positive_number_is_refused(share):
    with pytest.raises(DiReInputError, match="share must be a finite number > 0"):
        sre2l.patch(RunConfig(method="sre2l", script="fixture.py", share=share, log_every=0), bank_factory=lambda *a: None)
    assert current_runtime() is None


def test_no_grad_and_unrelated_criterion_calls_add_nothing(patched):
    model = _teacher()
    targets = torch.arange(NUM_CLASSES)
    with torch.no_grad():
        nn.CrossEntropyLoss()(model(torch.randn(NUM_CLASSES, 3, 6, 6)), targets)  # verifier/validate
    logits = torch.randn(NUM_CLASSES, NUM_CLASSES, requires_grad=True)
    nn.CrossEntropyLoss()(logits, targets)  # not the output of a classifier forward
    runtime = current_runtime()
    assert runtime.stats.computed == 0 and runtime.capture.criterion_calls_skipped == 1


def test_a_synthesis_step_without_the_term_stops_the_run(patched):
    model = _teacher()
    inputs = torch.randn(NUM_CLASSES, 3, 6, 6).requires_grad_()
    optimizer = torch.optim.Adam([inputs])
    model(inputs).pow(2).mean().backward()  # no criterion call: the hook cannot fire
    with pytest.raises(DiReHookError, match="DiRe was not added to synthesis step 1"):
        optimizer.step()


def test_training_a_model_is_left_alone(patched):
    net = nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    nn.CrossEntropyLoss()(net(torch.randn(4, 3)), torch.tensor([0, 1, 0, 1])).backward()
    opt.step()  # parameters, not images: no DiRe expected, no error
    assert current_runtime().stats.steps == 0


def test_a_second_method_in_the_same_process_is_refused(patched):
    # Its capture would never be installed: the second method's scripts would run without DiRe.
    with pytest.raises(DiReHookError, match="already running for sre2l"):
        dm.patch(RunConfig(method="dm", script="main_DM.py", log_every=0))
    dm.unpatch()  # nothing was patched: this must leave sre2l's runtime in place
    assert current_runtime() is not None and current_runtime().config.method == "sre2l"


def test_unpatch_restores_vanilla_behaviour():
    bank = _bank()
    original = nn.CrossEntropyLoss.forward
    sre2l.patch(RunConfig(method="sre2l", script="fixture.py", log_every=0), bank_factory=lambda *a: bank)
    sre2l.patch(RunConfig(method="sre2l", script="fixture.py", log_every=0), bank_factory=lambda *a: bank)
    wrapped = vars(nn.CrossEntropyLoss)["forward"]
    assert wrapped is not original and wrapped.__wrapped__ is original  # wrapped once, not twice
    sre2l.unpatch()
    sre2l.unpatch()
    assert vars(nn.CrossEntropyLoss)["forward"] is original and current_runtime() is None
    sre2l.patch(RunConfig(method="sre2l", script="fixture.py", log_every=0), bank_factory=lambda *a: bank)
    assert vars(nn.CrossEntropyLoss)["forward"].__wrapped__ is original
    sre2l.unpatch()
    model = _teacher()
    inputs = torch.randn(NUM_CLASSES, 3, 6, 6).requires_grad_()
    optimizer = torch.optim.Adam([inputs])
    nn.CrossEntropyLoss()(model(inputs), torch.arange(NUM_CLASSES)).backward()
    optimizer.step()  # no runtime: nothing checks, nothing added


def test_teacher_with_several_linear_layers_uses_the_classifier_input(patched):
    # MobileNet-style heads have Linear -> act -> Linear: the embedding is the last one's input.
    bank, _ = patched
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, D), nn.ReLU(), nn.Linear(D, NUM_CLASSES),
    ).eval()
    for p in model.parameters():
        p.requires_grad = False
    targets = torch.arange(NUM_CLASSES)
    inputs = torch.randn(NUM_CLASSES, 3, 6, 6, generator=torch.Generator().manual_seed(5)).requires_grad_()
    g_vanilla, g_dire = _expected_grad(model, inputs, targets, bank)
    grad, _ = _step(model, inputs, targets, nn.CrossEntropyLoss())
    torch.testing.assert_close(grad, g_vanilla + g_dire, rtol=1e-5, atol=1e-7)


def test_where_the_manifest_goes(tmp_path):
    # Beside outputs outside the checkout; a failed run's, and one for outputs inside the checkout
    # (README: nothing of ours there outside .dire/), under <cache>/runs/.
    from dire_plugin.hooks.decoupled import DecoupledCapture
    from dire_plugin.hooks.runtime import DiReRuntime

    root, cache = tmp_path / "checkout", tmp_path / "cache"
    config = RunConfig(method="sre2l", script="a/recover.py", cache_dir=str(cache), root=str(root))
    outside, inside = tmp_path / "out", root / "a" / "result"

    def written(folder, error=None):
        runtime = DiReRuntime(config, lambda *a: None, DecoupledCapture())
        runtime.note_output_dir(str(folder))
        (path,) = runtime.write_manifest(error)
        return path

    assert written(outside) == outside / "dire_manifest.json"
    assert written(inside).parent == cache / "runs"
    assert written(outside, RuntimeError("boom")).parent == cache / "runs"
    assert not inside.exists()


def _teacher_of_width(width, seed):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(width, NUM_CLASSES)).eval()
    for p in net.parameters():
        p.requires_grad = False
    return net


def test_rotating_teachers_keep_their_own_bank_memory_and_counts():
    # G-VBSM's loop in one process: the teacher changes every iteration and the widths differ, so
    # each term must read its own teacher's bank and memory (one shared one could not even hold both).
    wide, narrow = _teacher_of_width(8, 0), _teacher_of_width(5, 1)
    banks = {id(wide): _bank(), id(narrow): RealEmbeddingBank.from_tensors(
        torch.rand(NUM_CLASSES * 3, 5, generator=torch.Generator().manual_seed(7)) + 0.1,
        torch.arange(NUM_CLASSES).repeat(3))}
    built = []

    def factory(teacher, layer, device):
        built.append(id(teacher))
        return banks[id(teacher)]

    sre2l.patch(RunConfig(method="gvbsm", script="fixture.py", r_c=0.5, r_e=0.05, log_every=0), bank_factory=factory)
    try:
        runtime = current_runtime()
        targets = torch.arange(NUM_CLASSES)
        gen = torch.Generator().manual_seed(3)
        first = torch.randn(NUM_CLASSES, 3, 6, 6, generator=gen).requires_grad_()
        last = {}
        for teacher in (wide, narrow, wide, narrow):
            _step(teacher, first, targets, nn.CrossEntropyLoss())
            last[id(teacher)] = runtime.capture.last  # each teacher's last embeddings of this batch
        assert built == [id(wide), id(narrow)]  # once per teacher, not once per step
        keys = list(runtime.keys)
        assert keys == [banks[id(wide)].fingerprint, banks[id(narrow)].fingerprint]
        # The next batch's first step, through the narrow teacher: its bank, and the memory of the
        # finished batch as the narrow teacher saw it last.
        second = torch.randn(NUM_CLASSES, 3, 6, 6, generator=gen).requires_grad_()
        memory = SyntheticMemory()
        memory.add(*last[id(narrow)])
        g_vanilla, g_dire = _expected_grad(narrow, second, targets, banks[id(narrow)], memory=memory)
        grad, _ = _step(narrow, second, targets, nn.CrossEntropyLoss())
        torch.testing.assert_close(grad, g_vanilla + g_dire, rtol=1e-5, atol=1e-7)
        wide_memory, narrow_memory = (runtime.memory_of(k) for k in keys)
        assert (len(wide_memory), wide_memory.get(0).shape[1]) == (NUM_CLASSES, 8)
        assert (len(narrow_memory), narrow_memory.get(0).shape[1]) == (NUM_CLASSES, 5)
        torch.testing.assert_close(narrow_memory.get(2), last[id(narrow)][0][2:3])
        manifest = runtime.manifest()
        assert manifest["bank"] is None and manifest["memory_embeddings"] == 2 * NUM_CLASSES
        assert [(t["bank"]["dim"], t["terms_added"], t["terms_computed"], t["memory_embeddings"])
                for t in manifest["teachers"]] == [(8, 2, 2, NUM_CLASSES), (5, 3, 3, NUM_CLASSES)]
        with pytest.raises(DiReHookError, match="no key given in a run of 2 teachers"):
            runtime.term_gradient(torch.rand(2, 8), torch.tensor([0, 1]))
    finally:
        sre2l.unpatch()


@pytest.mark.parametrize("terms", [("cd", "cdm"), ("cd", "cdm", "logdet")])
def test_held_rows_are_pushed_from_as_memory_rows_are(terms):
    # DELT's rounds leave images out of a step; their last embeddings join CD (and logdet's kernel,
    # which needs the rows, not only their sums) exactly as if the memory held them.
    bank = _bank()
    config = RunConfig(method="sre2l", script="fixture.py", r_c=0.5, r_e=0.05, r_d=0.7, components=terms, log_every=0)
    sre2l.patch(config, bank_factory=lambda *a: bank)
    try:
        runtime = current_runtime()
        gen = torch.Generator().manual_seed(3)
        emb, held = torch.randn(4, 8, generator=gen), torch.randn(3, 8, generator=gen)
        labels, held_labels = torch.tensor([0, 1, 1, 2]), torch.tensor([1, 2, 0])
        finished = torch.randn(2, 8, generator=gen)
        key = runtime.add_bank(bank)
        runtime.memory_of(key).add(finished, torch.tensor([1, 0]))
        grad = runtime.term_gradient(emb, labels, key=key, held=(held, held_labels))
        runtime.memory_of(key).add(held, held_labels)
        expected = runtime.term_gradient(emb, labels, key=key)
    finally:
        sre2l.unpatch()
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)
    assert float((grad - expected).abs().max()) < 1e-6


def test_a_step_on_a_subset_holds_back_the_other_rows_as_its_own_teacher_saw_them():
    # DELT's rounds with G-VBSM's rotation: the rows a step leaves out join CD with their last
    # embeddings through *this step's* teacher (another teacher's are of another width and space).
    wide, narrow = _teacher_of_width(8, 0), _teacher_of_width(5, 1)
    banks = {id(wide): _bank(), id(narrow): RealEmbeddingBank.from_tensors(
        torch.rand(NUM_CLASSES * 3, 5, generator=torch.Generator().manual_seed(7)) + 0.1,
        torch.arange(NUM_CLASSES).repeat(3))}
    sre2l.patch(RunConfig(method="gvbsm", script="fixture.py", r_c=0.5, r_e=0.05, log_every=0),
                bank_factory=lambda teacher, layer, device: banks[id(teacher)])
    try:
        runtime = current_runtime()
        targets = torch.arange(NUM_CLASSES)
        images = torch.randn(NUM_CLASSES, 3, 6, 6, generator=torch.Generator().manual_seed(3)).requires_grad_()
        optimizer = torch.optim.Adam([images], lr=0.1, betas=(0.5, 0.9))
        seen = []
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(images.grad.clone()))

        def step(teacher, rows):
            optimizer.zero_grad()
            loss = nn.CrossEntropyLoss()(teacher(images[rows]), targets[rows]) + 0.01 * images.pow(2).mean()
            loss.backward()
            optimizer.step()

        everything, some = torch.arange(NUM_CLASSES), torch.tensor([0, 2])
        step(wide, everything)
        wide_first = runtime.capture.last[0].clone()
        step(narrow, everything)
        # Expected third step: the wide teacher on rows 0 and 2, CD also pushing from rows 1 and 3
        # as the wide teacher saw them at step 1.
        runtime.enabled = False
        x = images.detach().clone().requires_grad_()
        with EmbeddingCapture(wide) as cap:
            loss = nn.CrossEntropyLoss()(wide(x[some]), targets[some]) + 0.01 * x.pow(2).mean()
            (g_vanilla,) = torch.autograd.grad(loss, x, retain_graph=True)
            held = SyntheticMemory()
            held.add(wide_first[[1, 3]], targets[[1, 3]])
            (g_dire,) = torch.autograd.grad(DiReLoss(r_c=0.5, r_e=0.05)(cap.embeddings, targets[some], banks[id(wide)],
                                                                        memory=held), x)
        runtime.enabled = True
        step(wide, some)
        assert runtime.capture.rows["held_for_cd"] == 2
    finally:
        sre2l.unpatch()
    torch.testing.assert_close(seen[-1], g_vanilla + g_dire, rtol=1e-5, atol=1e-7)
