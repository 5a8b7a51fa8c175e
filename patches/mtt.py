"""MTT (GeorgeCazenavette/mtt-distillation): trajectory matching through an unrolled student.

``distill.py`` unrolls a ``ReparamModule`` student ``--syn_steps`` times with ``create_graph=True``
and steps two optimizers per iteration: ``optimizer_img`` over ``image_syn`` (the synthesis step)
and ``optimizer_lr`` over the learnable student learning rate ``syn_lr``. DiRe stays out of the
unroll: the ``step`` capture (:mod:`dire_plugin.hooks.stepwise`) adds DiRe's gradient to
``image_syn.grad`` right before ``optimizer_img.step()``, from one extra forward of the synthetic
images through a trained expert of MTT's own buffer (frozen, eval mode), against a bank of MTT's
own training set as ``utils.get_dataset`` returns it (ZCA-whitened with ``--zca``).
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from dire_plugin.embeddings.realdata import RealDataSpec
from dire_plugin.hooks.declare import REFERENCE_SHARE, ScriptSpec, Target, Weights
from dire_plugin.hooks.patcher import method_patch

METHOD = "mtt"

# utils.get_dataset normalises CIFAR-10 and CIFAR-100 with the same values (without --zca; with
# it, ToTensor then ZCA). The bank is built from get_dataset's own training set, so these only
# describe --real-data for the checks every entry point runs.
CIFAR10 = RealDataSpec("cifar10", crop=32, mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010))
CIFAR100 = RealDataSpec("cifar100", crop=32, mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010))

# One image per class, three unrolled steps from epoch 0 to 1 of a made-up expert, three image
# steps (iterations 0..2), one evaluation of one epoch at iteration 0, which saves images_0.pt.
_SMOKE = ("--dataset=CIFAR10", "--ipc=1", "--syn_steps=3", "--expert_epochs=1", "--max_start_epoch=1",
          "--Iteration=2", "--num_eval=1", "--epoch_eval_train=1", "--eval_it=100",
          "--data_path", "{data}", "--buffer_path", "{work}/buffers")

_DISTILL = dict(
    num_classes=10, smoke_data="cifar10", run_from="out", smoke_args=_SMOKE,
    # --zca fits kornia's ZCA whitening on the made-up training set: about two minutes on a CPU.
    smoke_variants=(("without --zca", ()), ("--zca", ("--zca",))),
    smoke_outputs="images_*.pt", smoke_prepare="dire_plugin.patches.mtt:prepare_smoke", smoke_timeout=900,
)

SCRIPTS = {
    # Run from anywhere: distill.py writes ./logged_files/<dataset>/<run>/ relative to the folder
    # it runs from (the manifest lands there too). --dataset=CIFAR100 reads CIFAR-100.
    "distill.py": ScriptSpec(
        CIFAR10, **_DISTILL,
        by_option=("--dataset", (("CIFAR100", ScriptSpec(CIFAR100, **{**_DISTILL, "num_classes": 100})),)),
    ),
}

#: MTT steps its images with SGD at lr 100-1000 on a small meta-gradient, where the released weights
#: give DiRe hundreds of times MTT's own gradient: its default is SRe²L's share, calibrated.
DEFAULT_WEIGHTS = Weights(share=REFERENCE_SHARE, why="SGD optimiser: calibrated to the share the released weights give SRe²L")

TARGETS = (
    # image_syn/label_syn/syn_lr, the two SGDs and their step order, the expert folder, the save folder.
    Target("distill.py", "main"),
    Target("utils.py", "get_dataset", module="utils"),
    Target("utils.py", "get_network", module="utils"),
    Target("utils.py", "get_default_convnet_setting", module="utils"),
    Target("utils.py", "TensorDataset", module="utils"),
    Target("utils.py", "evaluate_synset", module="utils"),  # its optimizers are over nn.Parameters
    Target("networks.py", "ConvNet"),  # the embedding is the input of its classifier
    Target("reparam_module.py", "ReparamModule"),
    Target("buffer.py", "main"),  # the expert buffer's folder and format
)

#: The capture family and its options, as data: the demo's MTT-shaped script goes through the same
#: (with its own dataset name).
CAPTURE = dict(capture="step", dataset_module="utils", dataset_function="get_dataset", datasets=("CIFAR10", "CIFAR100"))

patch, unpatch = method_patch(METHOD, lambda: SCRIPTS, TARGETS, **CAPTURE)


# --- smoke runs (dire-apply --verify --smoke) -----------------------------------------------------

_KORNIA_STUB = '''"""Stand-in for kornia written by dire-plugin's smoke run (kornia is not installed): MTT's
utils.py imports it at module level; only --zca uses it."""


class _Missing:
    def __init__(self, *args, **kwargs):
        raise ImportError("kornia is not installed: MTT's --zca needs it (pip install kornia kornia-rs)")


class enhance:
    ZCAWhitening = _Missing
'''


def convnet_shapes(channel: int = 3, num_classes: int = 10, width: int = 128, depth: int = 3,
                   im_size: int = 32) -> List[Tuple[int, ...]]:
    """Parameter shapes of MTT's default ``ConvNet`` (3x3 convolutions with bias, instance norm
    with affine weights, 2x2 pooling per block, then the classifier), in ``parameters()`` order."""
    shapes: List[Tuple[int, ...]] = []
    size, inp = im_size, channel
    for _ in range(depth):
        shapes += [(width, inp, 3, 3), (width,), (width,), (width,)]
        inp, size = width, size // 2
    return shapes + [(num_classes, width * size * size), (num_classes,)]


def write_expert_buffer(path: Path, shapes: Sequence[Tuple[int, ...]], trajectories: int = 2, epochs: int = 3,
                        seed: int = 0) -> Path:
    """A made-up expert buffer in the layout ``buffer.py`` writes: a list of trajectories, each a
    list of ``epochs`` epochs, each a list of parameter tensors (random walks from a random init)."""
    import torch

    g = torch.Generator().manual_seed(seed)

    def init(index: int, shape: Tuple[int, ...]):
        if len(shape) > 1:  # weights of convolutions and the classifier
            return torch.randn(shape, generator=g) / math.prod(shape[1:]) ** 0.5
        return torch.ones(shape) if index % 4 == 2 else torch.zeros(shape)  # norm weights; biases

    buffer = []
    for _ in range(trajectories):
        params = [init(i, shape) for i, shape in enumerate(shapes)]
        trajectory = [[p.clone() for p in params]]
        for _ in range(epochs - 1):
            params = [p + 0.01 * torch.randn(p.shape, generator=g) for p in params]
            trajectory.append([p.clone() for p in params])
        buffer.append(trajectory)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(buffer, path)
    return path


def _smoke_options(args: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(add_help=False)
    for name, default in (("--dataset", "CIFAR10"), ("--model", "ConvNet"), ("--buffer_path", "./buffers"),
                          ("--subset", "imagenette"), ("--res", "128")):
        p.add_argument(name, default=default)
    p.add_argument("--expert_epochs", type=int, default=3)
    p.add_argument("--max_start_epoch", type=int, default=25)
    p.add_argument("--zca", action="store_true")
    return p.parse_known_args(list(args))[0]


def prepare_smoke(work: Path, args: Sequence[str], env: Dict[str, str], script: Path) -> None:
    """Inputs of a smoke run of ``distill.py`` besides the training data: an expert buffer where
    ``distill.py`` looks for one, and a stand-in for kornia where it is not installed (``utils.py``
    imports it; a ``--zca`` run needs the real one and is refused in one line without it)."""
    from dire_plugin.errors import DiReInputError
    from dire_plugin.hooks.stepwise import EXPERT_FILE, expert_dir

    opts = _smoke_options(args)
    if importlib.util.find_spec("kornia") is None:
        if opts.zca:
            raise DiReInputError("distill.py --zca needs kornia (MTT whitens with kornia.enhance.ZCAWhitening), "
                                 "which is not installed: pip install kornia kornia-rs")
        stubs = Path(work) / "stubs"
        (stubs / "kornia").mkdir(parents=True, exist_ok=True)
        (stubs / "kornia" / "__init__.py").write_text(_KORNIA_STUB)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(stubs), env.get("PYTHONPATH", "")) if p)
    if opts.model != "ConvNet" or opts.dataset not in ("CIFAR10", "CIFAR100"):
        raise DiReInputError(f"the mtt smoke run makes up experts for --model ConvNet on CIFAR, not {opts.model} on {opts.dataset}")
    classes = 100 if opts.dataset == "CIFAR100" else 10
    write_expert_buffer(Path(expert_dir(opts)) / EXPERT_FILE, convnet_shapes(num_classes=classes),
                        epochs=opts.max_start_epoch + opts.expert_epochs + 1)
