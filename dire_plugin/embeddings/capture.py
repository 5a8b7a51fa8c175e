"""Capture penultimate-layer embeddings from the forward pass a method already runs.

DiRe needs the embeddings of the synthetic images *with their autograd graph*, from the same
forward that computes the method's own loss (a second forward would double the cost and, with
BatchNorm in train mode, see different statistics). A forward pre-hook on the classifier gets
exactly that: the classifier's input.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..errors import DiReInputError

__all__ = ["EmbeddingCapture", "capture_embeddings", "find_last_linear", "resolve_layer", "unwrap_model"]

_WRAPPER_PREFIX = "module."


def unwrap_model(model: nn.Module) -> nn.Module:
    """The wrapped module of ``DataParallel`` / ``DistributedDataParallel``, else ``model``."""
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


def find_last_linear(model: nn.Module) -> str:
    """Qualified name of the last ``nn.Linear`` in ``named_modules()`` order (wrappers looked through).

    Registration order is the usual proxy for "the classifier": torchvision, timm and the
    condensation codebases all register the head last.
    """
    name = None
    for qualified, module in unwrap_model(model).named_modules():
        if isinstance(module, nn.Linear):
            name = qualified
    if name is None:
        raise DiReInputError(
            f"{type(unwrap_model(model)).__name__} has no nn.Linear layer: name the layer whose input is the embedding"
        )
    return name


def resolve_layer(model: nn.Module, layer: Optional[str] = None) -> str:
    """Normalised name of ``layer`` inside the unwrapped model (default: the last ``nn.Linear``).

    A name with the ``module.`` prefix that ``DataParallel`` state dicts carry is accepted too.
    """
    if layer is None:
        return find_last_linear(model)
    inner = unwrap_model(model)
    candidates = [layer]
    while candidates[-1].startswith(_WRAPPER_PREFIX):
        candidates.append(candidates[-1][len(_WRAPPER_PREFIX):])
    for name in candidates:
        try:
            inner.get_submodule(name)
        except AttributeError:
            continue
        return name
    raise DiReInputError(f"{type(inner).__name__} has no submodule named {layer!r}")


def _device_key(x: Tensor) -> int:
    """Key of a replica's chunk: its device index (CPU, which has none, is -1)."""
    return -1 if x.device.index is None else int(x.device.index)


class EmbeddingCapture:
    """Records the input of one layer (default: the last ``nn.Linear``), flattened to ``[B, D]``.

    The hook keeps the autograd graph, so a loss on :attr:`embeddings` backpropagates into the
    images and the model of the same forward. Under ``nn.DataParallel`` each replica's chunk is
    collected and the chunks are concatenated in ``device_ids`` order on the output device when
    the top-level forward returns, so :attr:`embeddings` lines up with the gathered logits.

    Args:
        model: the model, optionally wrapped in ``DataParallel`` / ``DistributedDataParallel``.
        layer: qualified name of the layer whose input to capture (with or without ``module.``).
        detach: store detached embeddings (for banks; saves the graph's memory).
        only_with_grad: ignore forwards run with gradients disabled (evaluation, printing).

    Attributes:
        embeddings: the last captured ``[B, D]`` tensor, or ``None``.
        count: forwards captured since construction or :meth:`clear`.
        enabled: when ``False`` the hook does nothing.

    Example::

        with EmbeddingCapture(model) as cap:
            logits = model(images)
            loss = ce(logits, y) + dire(cap.embeddings, y, bank)
    """

    def __init__(
        self, model: nn.Module, layer: Optional[str] = None, detach: bool = False, only_with_grad: bool = False
    ) -> None:
        self.model = model
        self.layer_name = resolve_layer(model, layer)
        self.layer = unwrap_model(model).get_submodule(self.layer_name)
        self.detach = detach
        self.only_with_grad = only_with_grad
        self.enabled = True
        self.embeddings: Optional[Tensor] = None
        self.count = 0
        # DataParallel runs replicas in threads: chunks arrive concurrently.
        self._lock = threading.Lock()
        self._pending: Optional[Dict[int, Tensor]] = None
        self._handles = [self.layer.register_forward_pre_hook(self._on_layer)]
        if isinstance(model, nn.DataParallel):
            self._handles.append(model.register_forward_pre_hook(self._on_start))
            # always_call: a forward that raises must not leave chunks pending for the next one.
            self._handles.append(model.register_forward_hook(self._on_end, always_call=True))

    def _active(self) -> bool:
        return self.enabled and (torch.is_grad_enabled() or not self.only_with_grad)

    def _on_layer(self, module: nn.Module, args: Tuple[Any, ...]) -> None:
        # Grad mode is thread-local and DataParallel's worker threads copy the caller's, so this
        # check is right inside replicas as well.
        if not self._active():
            return
        if not args or not isinstance(args[0], Tensor):
            raise DiReInputError(f"layer {self.layer_name!r} was called without a tensor input")
        x = args[0].flatten(1)
        if self.detach:
            x = x.detach()
        with self._lock:
            if self._pending is not None:
                self._pending[_device_key(x)] = x
                return
        self.embeddings = x
        self.count += 1

    def _on_start(self, module: nn.Module, args: Tuple[Any, ...]) -> None:
        with self._lock:
            self._pending = {}

    def _on_end(self, module: nn.Module, args: Tuple[Any, ...], output: Any) -> None:
        with self._lock:
            chunks, self._pending = self._pending, None
        if chunks:
            self.embeddings = self._gather(chunks)
            self.count += 1

    def _gather(self, chunks: Dict[int, Tensor]) -> Tensor:
        device_ids: List[int] = list(getattr(self.model, "device_ids", []) or [])
        rank = {d: i for i, d in enumerate(device_ids)}
        order = sorted(chunks, key=lambda k: (rank.get(k, len(rank)), k))
        parts = [chunks[k] for k in order]
        out_index = getattr(self.model, "output_device", None)
        if out_index is not None and device_ids:
            src = getattr(self.model, "src_device_obj", None)
            device = torch.device(src.type if src is not None else "cuda", out_index)
            parts = [p.to(device) for p in parts]  # differentiable copy, like DataParallel's gather
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def clear(self) -> None:
        """Forget the captured embeddings and reset :attr:`count`."""
        self.embeddings = None
        self.count = 0

    def remove(self) -> None:
        """Remove the hooks (idempotent); the object keeps its last capture."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        with self._lock:
            self._pending = None

    def __enter__(self) -> "EmbeddingCapture":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        shape = None if self.embeddings is None else tuple(self.embeddings.shape)
        return f"EmbeddingCapture(layer={self.layer_name!r}, count={self.count}, embeddings={shape}, enabled={self.enabled})"


@contextmanager
def capture_embeddings(
    model: nn.Module, layer: Optional[str] = None, detach: bool = False, only_with_grad: bool = False
) -> Iterator[EmbeddingCapture]:
    """Context manager form of :class:`EmbeddingCapture`; the hooks are removed on exit."""
    capture = EmbeddingCapture(model, layer, detach=detach, only_with_grad=only_with_grad)
    try:
        yield capture
    finally:
        capture.remove()
