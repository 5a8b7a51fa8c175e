"""The interface between the runtime core and a capture module (one per method family).

A capture finds the synthetic embeddings of a synthesis step in the method's own computation and
gets DiRe's gradient to the images; the core (:class:`~dire_plugin.hooks.runtime.DiReRuntime`)
does everything else. See the :mod:`dire_plugin.hooks` docstring for the sequence of calls.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Sequence, Tuple

__all__ = ["Capture", "Wrapper", "one_image_tensor", "plain_tensor_params"]

#: ``(module name, attribute path, wrapt wrapper)``: installed when the module is imported and
#: removed at ``unpatch``; the wrapper passes straight through while the runtime is off.
Wrapper = Tuple[str, str, Callable]


def plain_tensor_params(optimizer: Any) -> list:
    """The optimizer's parameters if every one is a plain tensor (images), else ``[]``: training a
    model updates ``nn.Parameter``s and is none of DiRe's business."""
    from torch import nn

    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not params or any(isinstance(p, nn.Parameter) for p in params):
        return []
    return params


def one_image_tensor(optimizer: Any) -> bool:
    """The optimizer updates exactly one plain 4-D tensor: a whole synthetic set stepped at once
    (DM's and MTT's ``image_syn``), not a model and not a set of per-class tensors."""
    params = plain_tensor_params(optimizer)
    return len(params) == 1 and params[0].dim() == 4


class Capture:
    """One method family's way into the computation. Subclasses override what they need.

    Lifecycle: :meth:`wrappers` are installed by the patch, :meth:`install` is called once the
    core exists, :meth:`uninstall` at ``unpatch``. Per optimizer step the core asks
    :meth:`is_synthesis_step`; for a synthesis step it calls :meth:`before_step`, then checks that
    the capture called ``core.term_reached_images()`` since the previous step (else the run stops
    with :meth:`missing_reason`), then :meth:`after_step`.
    """

    #: Written into the manifest.
    family = "base"

    def wrappers(self) -> Sequence[Wrapper]:
        """Functions of torch, PIL or the upstream to wrap (see :data:`Wrapper`)."""
        return ()

    def bank_factory(self, config: Any) -> Any:
        """A ``(teacher, layer, device) -> RealEmbeddingBank`` of the family's own (MTT builds its
        bank from the method's own training set), or ``None`` for the default: the real data of
        ``--real-data``, preprocessed as the script's :class:`~dire_plugin.hooks.declare.ScriptSpec` says."""
        return None

    def install(self, core: Any) -> None:
        """Register global hooks; ``core`` is the :class:`~dire_plugin.hooks.runtime.DiReRuntime`
        this capture serves."""
        self.core = core

    def uninstall(self) -> None:
        """Remove what :meth:`install` registered."""

    def is_synthesis_step(self, optimizer: Any) -> bool:
        """Whether this optimizer step updates synthetic images and so must carry the term."""
        return bool(plain_tensor_params(optimizer))

    def before_step(self, optimizer: Any) -> None:
        """A synthesis step is about to run: last chance to put DiRe's gradient on the images."""

    def after_step(self, optimizer: Any) -> None:
        """The step was checked and runs now (e.g. a finished batch joins the memory)."""

    def missing_reason(self) -> str:
        """Why no term reached the step that is about to run (for the error message)."""
        return "the capture never reached the synthetic embeddings"

    def manifest(self) -> Dict[str, Any]:
        """Family-specific counts and choices for ``dire_manifest.json``."""
        return {}
