"""Forwards of ours through the method's own network, invisible to the method.

DiRe runs forwards the method never asked for: the real-embedding bank is built through the
method's teacher, lazily, from inside the method's criterion call. Every pinned SRe²L-style script
reads the values its forward hooks stored (``BNFeatureHook.r_feature``) *after* that call, so a
forward of ours that fires those hooks replaces the method's BN loss of the step with the last
real batch's, computed without a gradient. Inside :func:`private_forward` no forward hook or
pre-hook registered on the network's modules fires, the network runs in eval mode (BatchNorm
running statistics untouched) and every module's mode is restored afterwards; :func:`own_rng`
keeps the method's random streams as a vanilla run would leave them (a DataLoader draws its base
seed from the global generator).

Global module hooks (``torch.nn.modules.module.register_module_forward_hook``) are left alone:
the upstream methods register theirs per module, and the global ones are DiRe's own captures,
which stand still while the runtime is suspended.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Tuple

import torch
from torch import nn

__all__ = ["HOOK_DICTS", "hidden_hooks", "own_rng", "private_forward"]

#: The per-module dictionaries ``nn.Module`` runs forward hooks from (torch >= 2.0 names).
HOOK_DICTS = (
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs",
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
)


@contextlib.contextmanager
def hidden_hooks(model: nn.Module) -> Iterator[None]:
    """Inside the block, the forward hooks of ``model`` and its submodules are empty; hooks
    registered inside (an :class:`~dire_plugin.embeddings.capture.EmbeddingCapture`) live in the
    block's own dictionaries and are gone with it. The method's hooks are put back untouched."""
    saved: List[Tuple[nn.Module, str, object]] = []
    try:
        for module in model.modules():
            for name in HOOK_DICTS:
                hooks = module.__dict__.get(name)
                if hooks is not None:
                    saved.append((module, name, hooks))
                    module.__dict__[name] = type(hooks)()
        yield
    finally:
        for module, name, hooks in saved:
            module.__dict__[name] = hooks


@contextlib.contextmanager
def own_rng() -> Iterator[None]:
    """The global torch generators (CPU and every CUDA device) as they were before the block."""
    devices: List[int] = []
    if torch.cuda.is_available():
        torch.cuda.init()  # a seed queued before CUDA starts would apply later, outside the fork
        devices = list(range(torch.cuda.device_count()))
    with torch.random.fork_rng(devices=devices):
        yield


@contextlib.contextmanager
def private_forward(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode with its forward hooks hidden (:func:`hidden_hooks`); each
    submodule's train/eval mode is restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        with hidden_hooks(model):
            model.eval()
            yield
    finally:
        for module, training in modes:
            module.training = training
