"""Feature extractors for ``dire-metrics``: a torchvision classifier with an upstream teacher checkpoint.

The metrics are only comparable with the training run when the embeddings come from the same
teacher the synthesis used, so the checkpoint formats accepted here are the ones the upstream
scripts load (see :class:`~dire_plugin.hooks.declare.ScriptSpec`): ``{"state_dict": ...}`` saved from
``DataParallel`` (SRe²L CIFAR), ``{"model": ...}`` from torchvision's reference training
(Tiny-ImageNet; it pickles an ``argparse.Namespace``), or a bare state dict.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..errors import DiReInputError
from ..embeddings.capture import find_last_linear
from ..io.files import load_torch_file

__all__ = ["build_model", "load_checkpoint", "state_dict_from_checkpoint", "load_extractor", "check_fits"]

#: Keys under which checkpoints keep their state dict, in the order they are tried.
STATE_KEYS = ("state_dict", "model", "model_state_dict", "net")
#: Prefixes wrappers put on every key: DataParallel/DDP, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
#: How many mismatching keys an error names: enough to see the pattern, short enough for one line.
NAMED_KEYS = 3

PathLike = Union[str, "os.PathLike[str]"]


def _classification_models() -> List[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def build_model(arch: str, num_classes: int, cifar_stem: bool = False, seed: int = 0) -> nn.Module:
    """A torchvision classifier ``arch`` with ``num_classes`` outputs, never downloading weights.

    ``cifar_stem`` swaps a ResNet's 7x7/stride-2 ``conv1`` for a 3x3/stride-1 one and drops the
    max-pool, as the SRe²L CIFAR and Tiny-ImageNet scripts do to torchvision's ResNets. The
    initial weights are seeded so a ``--random-init`` extractor gives the same numbers every run.
    """
    import torchvision

    known = _classification_models()
    if arch not in known:
        close = [m for m in known if m.startswith(arch[:4])][:6] or known[:6]
        raise DiReInputError(f"unknown arch {arch!r}: use a torchvision classification model such as {', '.join(close)}")
    if num_classes < 1:
        raise DiReInputError(f"--num-classes must be at least 1, got {num_classes}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
        except (TypeError, ValueError) as e:
            raise DiReInputError(f"cannot build {arch} with num_classes={num_classes}: {e}") from None
        if cifar_stem:
            conv1 = getattr(model, "conv1", None)
            if not isinstance(conv1, nn.Conv2d) or not hasattr(model, "maxpool"):
                raise DiReInputError(f"--cifar-stem applies to ResNet-style models (conv1 + maxpool); {arch} has none")
            model.conv1 = nn.Conv2d(conv1.in_channels, conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
            model.maxpool = nn.Identity()
    return model


def load_checkpoint(path: PathLike) -> Any:
    """The checkpoint at ``path`` loaded as data (``weights_only``), allowing the
    ``argparse.Namespace`` that torchvision-reference checkpoints pickle and nothing else.

    Raises :class:`DiReInputError`, one line naming the file and what is wrong with it (missing,
    truncated, not a torch file, holding code), never torch's advice to turn ``weights_only`` off.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DiReInputError(f"checkpoint {p} does not exist" if not p.exists() else f"checkpoint {p} is not a file")
    return load_torch_file(p, "checkpoint", allow=[argparse.Namespace])


def _strip_prefixes(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    changed = True
    while changed and state:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def state_dict_from_checkpoint(obj: Any, where: str = "checkpoint") -> Dict[str, Tensor]:
    """The model's tensors out of a loaded checkpoint, wrapper prefixes (``module.``) removed."""
    if isinstance(obj, Mapping):
        for key in STATE_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise DiReInputError(f"{where} holds no state dict (looked for a bare one and under {', '.join(STATE_KEYS)})")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise DiReInputError(f"{where} holds no tensors: keys {', '.join(map(str, list(obj)[:5]))}")
    return _strip_prefixes(tensors)


def _optional(key: str) -> bool:
    # Older checkpoints predate BatchNorm's counter; it does not change the forward in eval mode.
    return key.endswith("num_batches_tracked")


def check_fits(model: nn.Module, state: Mapping[str, Tensor], what: str) -> None:
    """Raise a one-line error naming the first keys where ``state`` does not fit ``model``."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not _optional(k)]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if not (missing or unexpected or shapes):
        return
    parts = []
    if shapes:
        parts.append(f"shape (checkpoint vs model) {'; '.join(shapes[:NAMED_KEYS])}{' ...' if len(shapes) > NAMED_KEYS else ''}")
    if missing:
        parts.append(f"missing {', '.join(missing[:NAMED_KEYS])}{' ...' if len(missing) > NAMED_KEYS else ''}")
    if unexpected:
        parts.append(f"unexpected {', '.join(unexpected[:NAMED_KEYS])}{' ...' if len(unexpected) > NAMED_KEYS else ''}")
    hint = _hint(shapes, missing, unexpected)
    raise DiReInputError(f"{what} does not fit: {'; '.join(parts)}{hint}")


def _hint(shapes: List[str], missing: List[str], unexpected: List[str]) -> str:
    if any(s.startswith("conv1.weight") for s in shapes):
        return " (a 3x3 conv1 is the CIFAR stem: try --cifar-stem, or drop it)"
    modules = {s.split(" ")[0].rsplit(".", 1)[0] for s in shapes}
    if len(modules) == 1 and not missing and not unexpected:  # one layer's weight and bias: the head
        return " (the classifier's size: check --num-classes)"
    if missing or unexpected:
        return " (another architecture? check --arch)"
    return ""


def _head_classes(model: nn.Module, state: Mapping[str, Tensor]) -> Optional[int]:
    """Number of classes the checkpoint's last ``nn.Linear`` has, if it has the model's head."""
    try:
        weight = state.get(find_last_linear(model) + ".weight")
    except DiReInputError:
        return None
    return int(weight.shape[0]) if isinstance(weight, Tensor) and weight.dim() == 2 else None


def load_extractor(
    arch: str,
    checkpoint: Optional[PathLike],
    *,
    num_classes: Optional[int] = None,
    default_classes: int = 1000,
    cifar_stem: bool = False,
    random_init: bool = False,
) -> Tuple[nn.Module, str]:
    """``(model in eval mode on CPU, description)`` for ``arch`` with weights from ``checkpoint``.

    Without ``num_classes`` the checkpoint's classifier decides the number of outputs (the
    embedding does not depend on it, only loading does); without a checkpoint
    ``default_classes``. A checkpoint is required unless ``random_init`` is set: metrics of a
    random network say little about the teacher the images were distilled from.
    """
    if checkpoint is None and not random_init:
        raise DiReInputError("--checkpoint is required (the teacher the sets were distilled from); "
                             "--random-init uses a randomly initialised network instead")
    if checkpoint is not None and random_init:
        raise DiReInputError("--random-init and --checkpoint exclude each other")
    model = build_model(arch, num_classes or default_classes, cifar_stem)
    if checkpoint is None:
        return model.eval(), f"{arch} (random init{', CIFAR stem' if cifar_stem else ''})"
    state = state_dict_from_checkpoint(load_checkpoint(checkpoint), f"checkpoint {checkpoint}")
    if num_classes is None:
        head = _head_classes(model, state)
        if head is not None and head != (num_classes or default_classes):
            model = build_model(arch, head, cifar_stem)
    what = f"checkpoint {checkpoint} for {arch}{' with --cifar-stem' if cifar_stem else ''}"
    check_fits(model, state, what)
    model.load_state_dict(state, strict=False)  # check_fits allowed only optional keys to be missing
    return model.eval(), f"{arch}{' (CIFAR stem)' if cifar_stem else ''} from {checkpoint}"
