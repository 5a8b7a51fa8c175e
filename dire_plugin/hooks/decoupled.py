"""Capture for the decoupled methods (SRe²L, CDA, DWA): a frozen teacher classifies the synthetic
images, ``loss = CE + BN prior``, ``loss.backward()``, ``optimizer.step()``.

How a step gets the term, without a second forward:

1. Global module hooks record the input and output of every ``nn.Linear`` called with gradients
   enabled (the classifier's input is the penultimate embedding).
2. When the method's ``CrossEntropyLoss`` is called with the teacher's logits, the record whose
   output *is* those logits gives the embeddings of the same forward; the core computes DiRe's
   gradient with respect to them.
3. The gradient reaches the images by one of two routes (``teacher_grads``):

   * ``"shared"`` (SRe²L, CDA): a tensor hook on the recorded embeddings adds it when the method's
     own ``loss.backward()`` passes there, so the images get ∂(loss + DiRe)/∂images with no extra
     pass. The teacher's ``.grad`` receives DiRe's share too, which these methods never read.
   * ``"untouched"`` (DWA, whose weight perturbation reads the teacher's accumulated ``.grad``):
     right away, ``autograd.grad`` of the embeddings with respect to the images alone (one
     input-only backward, no parameter gradient computed or accumulated), kept pending and added
     to the images' ``.grad`` at the synthesis step. A criterion call that no synthesis step
     follows (DWA's perturbation passes) has its pending gradient replaced by the next one: it
     never reaches the images, and the manifest counts it as discarded.

4. One tensor of images is optimised until the next one starts (SRe²L: one image per class; its
   multi-GPU script: a rank's shard): when a new one starts, the last embeddings of the finished
   one join the per-class memory, so CD acts across ipc indices.
5. Under ``torch.distributed`` (SRe²L's multi-GPU recover) the term is computed on the union of
   every rank's current embeddings (:mod:`.distributed`), each rank keeping its own rows' gradient.

Forwards that are not synthesis steps get nothing: under ``no_grad`` nothing is recorded, and a
second criterion call on the same logits (printing) finds its records already used.
"""
from __future__ import annotations

import re
import threading
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..embeddings.capture import unwrap_model
from ..errors import DiReInputError
from .capture import Capture, Wrapper, plain_tensor_params
from .distributed import union_term_gradient, w_destroy_process_group
from .runtime import active_capture, current_runtime, output_saved

__all__ = ["DecoupledCapture"]

_IMAGE_NAME = re.compile(r"class\d+_id\d+\.\w+$")
TEACHER_GRADS = ("shared", "untouched")


@dataclass(eq=False)  # identity: records hold tensors, which do not compare as booleans
class _Record:
    """One ``nn.Linear`` call: the input tensor it consumed (with graph), its output, and the
    top-level model and forward it belongs to."""

    inp: Tensor
    out: Optional[Tensor]
    root: Optional[nn.Module]
    layer: nn.Module
    device_key: int
    forward: int

    @property
    def emb(self) -> Tensor:
        return self.inp.flatten(1)


def _capture() -> Optional["DecoupledCapture"]:
    return active_capture(DecoupledCapture)


def _w_CrossEntropyLoss_forward(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    capture = _capture()
    if capture is not None:
        outputs = args[0] if args else kwargs.get("input")
        targets = args[1] if len(args) > 1 else kwargs.get("target")
        capture.on_criterion(outputs, targets)
    return wrapped(*args, **kwargs)


def _image_leaves(t: Tensor) -> List[Tensor]:
    """The leaf tensors behind ``t`` that are not parameters: the synthetic images."""
    leaves, seen, todo = [], set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)
        if variable is not None:  # AccumulateGrad
            if not isinstance(variable, nn.Parameter) and variable.requires_grad:
                leaves.append(variable)
            continue
        todo.extend(next_fn for next_fn, _ in fn.next_functions)
    return leaves


class DecoupledCapture(Capture):
    """See the module doc. ``teacher_grads``: ``"shared"`` or ``"untouched"``."""

    family = "decoupled"

    def __init__(self, teacher_grads: str = "shared") -> None:
        if teacher_grads not in TEACHER_GRADS:
            raise DiReInputError(f"teacher_grads must be one of {TEACHER_GRADS}, got {teacher_grads!r}")
        self.teacher_grads = teacher_grads
        self._handles: List[Any] = []
        self._lock = threading.Lock()
        self._main_thread = threading.get_ident()
        self._depth = 0
        self._forward = 0
        self._root: Optional[nn.Module] = None
        # Recent classifier calls. Not reset per forward: the criterion is itself a module call,
        # and augmentations may be modules too. After backward the graphs hold no buffers.
        self._records: Deque[_Record] = deque(maxlen=64)
        # The step in flight: a term was attached, and (untouched route) its pending gradient.
        self._attached = False
        self._pending: Optional[Tuple[weakref.ref, Tensor]] = None
        self._stale = False  # the pending gradient's images were not this step's
        self.last: Optional[Tuple[Tensor, Tensor]] = None  # embeddings and labels of the last term
        self._pending_batch: Optional[Tuple[Tensor, Tensor]] = None
        self._images: Optional[weakref.ref] = None
        self.criterion_calls_skipped = 0
        self.terms_discarded = 0

    def wrappers(self) -> Sequence[Wrapper]:
        return (
            ("torch.nn.modules.loss", "CrossEntropyLoss.forward", _w_CrossEntropyLoss_forward),
            # .../{exp}/new{cls}/class{cls}_id{ipc}.jpg: the manifest goes beside the class folders.
            ("PIL.Image", "Image.save", output_saved(0, "fp", lambda path: bool(_IMAGE_NAME.search(path)), up=2)),
            ("torch.distributed", "destroy_process_group", w_destroy_process_group(current_runtime)),
        )

    # ------------------------------------------------------------------ install
    def install(self, core) -> None:
        super().install(core)
        if self._handles:
            return
        from torch.nn.modules import module as module_hooks

        self._handles = [
            module_hooks.register_module_forward_pre_hook(self._on_module_start),
            module_hooks.register_module_forward_hook(self._on_module_end, always_call=True),
        ]

    def uninstall(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._records.clear()

    # ------------------------------------------------------------------ module hooks
    def _on_module_start(self, module: nn.Module, args: Tuple[Any, ...]) -> None:
        if threading.get_ident() == self._main_thread and not isinstance(module, nn.modules.loss._Loss):
            if self._depth == 0:
                self._root = module
                self._forward += 1
            self._depth += 1
        if (
            not self.core.active
            or not isinstance(module, nn.Linear)
            or not torch.is_grad_enabled()
            or not args
            or not isinstance(args[0], Tensor)
            or not args[0].requires_grad
        ):
            return
        x = args[0]
        key = -1 if x.device.index is None else int(x.device.index)
        with self._lock:
            self._records.append(_Record(x, None, self._root, module, key, self._forward))

    def _on_module_end(self, module: nn.Module, args: Tuple[Any, ...], output: Any) -> None:
        if isinstance(module, nn.Linear) and isinstance(output, Tensor):
            with self._lock:
                for rec in reversed(self._records):
                    if rec.layer is module and rec.out is None:
                        rec.out = output
                        break
        if threading.get_ident() == self._main_thread and self._depth > 0 and not isinstance(module, nn.modules.loss._Loss):
            self._depth -= 1

    def _match(self, outputs: Tensor) -> Optional[List[_Record]]:
        """Records of the forward whose classifier produced ``outputs``, in batch order."""
        with self._lock:
            records = [r for r in self._records if r.out is not None]
        for rec in reversed(records):
            if rec.out is outputs:
                return [rec]
        # DataParallel over several GPUs gathers the replicas' logits into a new tensor: take the
        # last classifier call of each replica, in device order, if they add up to the batch.
        grad_fn = type(outputs.grad_fn).__name__ if outputs.grad_fn is not None else ""
        if "Gather" in grad_fn:
            last: Dict[int, _Record] = {}
            latest = max(r.forward for r in records) if records else None
            for rec in records:
                if rec.forward == latest and rec.out.dim() == 2 and rec.out.shape[1] == outputs.shape[1]:
                    last[rec.device_key] = rec
            chunks = [last[k] for k in sorted(last)]
            if chunks and sum(r.out.shape[0] for r in chunks) == outputs.shape[0]:
                return chunks
        return None

    # ------------------------------------------------------------------ the term
    def on_criterion(self, outputs: Any, targets: Any) -> None:
        """Called with the arguments of the method's classification criterion."""
        if not (isinstance(outputs, Tensor) and outputs.requires_grad and torch.is_grad_enabled()):
            return
        chunks = self._match(outputs)
        if chunks is None:
            self.criterion_calls_skipped += 1
            return
        with self._lock:
            # Used: a second criterion call on the same logits (printing) must not add it again.
            for rec in chunks:
                self._records.remove(rec)
        images: List[Tensor] = []
        if self.teacher_grads == "untouched":
            images = _image_leaves(chunks[0].inp)
            if len(images) != 1:  # not a forward of one tensor of images: nothing to compute or add
                self.criterion_calls_skipped += 1
                return
        labels = targets.argmax(1) if isinstance(targets, Tensor) and targets.dim() == 2 else targets
        labels = torch.as_tensor(labels).reshape(-1)
        device = outputs.device
        emb = torch.cat([r.emb.detach().to(device) for r in chunks])
        self._bank(chunks[0], device)
        # Under torch.distributed the term is the one of every rank's current images together.
        grad, union, union_labels = union_term_gradient(self.core, emb, labels.to(device))
        if self.teacher_grads == "shared":
            self._attach(chunks, grad)
        else:
            self._images_only(chunks, grad, images[0])
        self.last = (union.detach().float(), union_labels.detach().to(device))

    def _bank(self, record: _Record, device: torch.device) -> None:
        teacher = record.root if record.root is not None else record.layer
        layer = next((n for n, m in unwrap_model(teacher).named_modules() if m is record.layer), None)
        self.core.bank_for(teacher, layer or "", device)

    def _parts(self, chunks: List[_Record], grad: Tensor):
        start = 0
        for rec in chunks:
            yield rec, grad[start:start + rec.emb.shape[0]]
            start += rec.emb.shape[0]

    def _attach(self, chunks: List[_Record], grad: Tensor) -> None:
        """The shared route: the method's backward adds ``grad`` at the captured embeddings."""
        self._attached = True
        core = self.core
        for rec, part in self._parts(chunks, grad):

            def add(g: Tensor, part: Tensor = part) -> Tensor:
                core.term_reached_images()
                return g + part.to(device=g.device, dtype=g.dtype).view_as(g)

            # On the very tensor the classifier consumed: that is where the method's backward
            # passes (a flattened view of it would be a separate node that backward never visits).
            rec.inp.register_hook(add)

    def _images_only(self, chunks: List[_Record], grad: Tensor, images: Tensor) -> None:
        """The untouched route: DiRe's gradient at the images now, kept for the synthesis step."""
        outputs = [rec.inp for rec, _ in self._parts(chunks, grad)]
        parts = [part.to(device=rec.inp.device, dtype=rec.inp.dtype).view_as(rec.inp) for rec, part in self._parts(chunks, grad)]
        # Parameters are not inputs here: nothing is computed or accumulated for the teacher.
        (g_images,) = torch.autograd.grad(outputs, [images], grad_outputs=parts, retain_graph=True)
        if self._pending is not None:
            self.terms_discarded += 1  # a criterion call no synthesis step followed
        self._pending = (weakref.ref(images), g_images)
        self._stale = False
        self._attached = True

    # ------------------------------------------------------------------ optimizer steps
    def before_step(self, optimizer: Any) -> None:
        if self._pending is None:
            return
        ref, g_images = self._pending
        images = ref()
        self._pending = None
        if images is None or not any(p is images for p in plain_tensor_params(optimizer)):
            self._stale = True  # the step check then names this, not a backward that never ran
            return
        if images.grad is None:
            images.grad = g_images.clone()
        else:
            images.grad.add_(g_images)
        self.core.term_reached_images()

    def after_step(self, optimizer: Any) -> None:
        self._attached = self._stale = False
        images = plain_tensor_params(optimizer)[0]
        if self._images is not None and self._images() is not images:
            # The previous batch of images is finished: its last embeddings join the memory.
            if self._pending_batch is not None:
                self.core.commit_to_memory(*self._pending_batch)
            self._pending_batch = None
        self._images = weakref.ref(images)
        self._pending_batch = self.last

    def missing_reason(self) -> str:
        if self._stale:
            return "the images its pending gradient was computed for are not among this optimizer's parameters"
        if self._attached:
            return "its backward did not reach the captured embeddings"
        return "no classifier forward matched the criterion call"

    def manifest(self) -> Dict[str, Any]:
        return {
            "teacher_grads": self.teacher_grads,
            "criterion_calls_skipped": self.criterion_calls_skipped,
            "terms_discarded": self.terms_discarded,
        }
