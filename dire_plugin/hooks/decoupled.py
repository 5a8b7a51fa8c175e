"""Capture for the decoupled methods (SRe²L, CDA, DWA, DELT, PRISM, G-VBSM, EDC, INFER): a frozen
teacher classifies the synthetic images, ``loss = CE + BN prior``, ``loss.backward()``,
``optimizer.step()``.

How a step gets the term, without a second forward:

1. Global module hooks record the input and output of every ``nn.Linear`` called with gradients
   enabled (the classifier's input is the penultimate embedding). Records no criterion call took
   before the synthesis step (PRISM's further teachers, forwarded for their BN statistics only)
   are dropped there: they are never the step's embeddings.
2. When the method's ``CrossEntropyLoss`` is called with the teacher's logits, the record whose
   output *is* those logits gives the embeddings of the same forward (under DataParallel over
   several GPUs: the records whose outputs the gather took); the core computes DiRe's gradient
   with respect to them. The labels are the targets that call receives.
3. The gradient reaches the images by one of these routes (``teacher_grads``):

   * ``"shared"`` (SRe²L, CDA, DELT, PRISM): a tensor hook on the recorded embeddings adds it when
     the method's own ``loss.backward()`` passes there, so the images get ∂(loss + DiRe)/∂images
     with no extra pass. The teacher's ``.grad`` receives DiRe's share too, which these methods
     never read.
   * ``"untouched"``: right away, ``autograd.grad`` of the embeddings with respect to the images
     alone (one input-only backward, no parameter gradient computed or accumulated), kept pending
     and added to the images' ``.grad`` at the synthesis step. A criterion call that no synthesis
     step follows has its pending gradient replaced by the next one: it never reaches the images,
     and the manifest counts it as discarded.
   * ``"auto"`` (DWA, whose weight perturbation reads the teacher's accumulated ``.grad`` at the
     first iteration of each batch): ``"untouched"`` for a criterion call on images that have not
     had a synthesis step yet (DWA's perturbation passes, which no step follows, and the batch's
     first iteration) and for a batch that does not hold every class of the teacher's logits (the
     teacher then serves further batches, which read its accumulated ``.grad``); ``"shared"``
     otherwise, since a teacher that classifies every class in one batch serves that batch alone
     and its accumulated ``.grad`` is never read again. The functions that read it
     (``grad_readers``, DWA's ``Perterb.first_step``) are wrapped: one that would read a ``.grad``
     holding DiRe's share stops the run instead.

   On a step whose gradient share is measured (:mod:`.share`), the shared route also computes
   DiRe's gradient at the images alone (one input-only backward), so that the share can be taken.

4. One tensor of images is optimised until the next one starts (SRe²L: one image per class; DELT:
   several classes × many images, a class straddling two batches where ipc does not divide the
   batch; the multi-GPU script: a rank's shard). The images of a criterion call are the leaf
   behind its embeddings, and the *rows* of it the forward covers are read from the graph node
   that reads that leaf (:func:`_rows_taken`): every row for an augmentation of the whole batch,
   the selected ones for ``images[index]`` (DELT's EarlyLate rounds forward
   ``inputs[slicing_list[round]]``) or a slice. Rows not forwarded in a step get no term in that
   step (the method's backward and DiRe's reach only the rows the forward used).

   What CD pushes a step's embeddings away from, besides each other:

   * *the rows of the same tensor not forwarded in this step*: the last embedding of each one
     that an earlier step forwarded (never a forwarded image's own earlier embedding, and never
     images no step forwarded yet);
   * *the per-class memory*: the images of every finished tensor, each with its embedding from
     the last forward that covered it (taken before its last update). The first criterion call
     on a new tensor commits the finished one *before* its own term, so CD acts across ipc
     indices (and across batches for a straddling class) from the first step of each batch.
     Where the rows cannot be told (several graph nodes read the images, counts that do not add
     up), the finished tensor's embeddings of its last step are committed instead; where the
     images themselves cannot be told from the graph, the commit happens at the new tensor's
     first optimizer step (one step late).

   The manifest's ``capture.rows`` counts, over the terms, the rows forwarded and not, and the
   held embeddings that joined CD.

   *A compensator* (``compensator=True``, INFER): the optimised leaf is not the images but one
   1×C×H×W tensor added to every image of the forward (``real + uni_perb``). DiRe's gradient at
   the embeddings reaches it through the method's backward like any other; the "images" whose
   rows get the term and join the memory are then the forward's rows, every one at every step,
   and each new compensator is a new tensor. The step must update that compensator. Without the
   option, a leaf of one row behind a forward of several is refused: a patch that did not
   declare a compensator does not fit such code.

   The teacher of a criterion call is the model whose classifier produced its logits, and its key
   in the core (:meth:`~.runtime.DiReRuntime.key_for`) picks the bank and the memory of the term.
   Where teachers rotate (G-VBSM, EDC: one per iteration), each teacher's memory receives the
   finished images' embeddings from the last forward through that teacher, and the held rows of a
   step are their last embeddings through the step's teacher.
5. Under ``torch.distributed`` (SRe²L's and PRISM's multi-GPU recover) the term is computed on the
   union of every rank's current embeddings (:mod:`.distributed`), each rank keeping its own rows'
   gradient; there, a step that leaves out images an earlier step forwarded stops the run.
6. *Images saved but never forwarded* (``saves``, INFER's first ``ipc_init`` real images per
   class): the upstream function that saves a batch of the distilled set is wrapped; a batch it
   saves with no synthesis step since the previous save was never forwarded. Such batches are
   kept (CPU) and, the first time each teacher key has a term, forwarded once through that
   teacher (:func:`~dire_plugin.embeddings.bank.embed_images`: the method's hooks hidden, eval
   mode, the method's random streams untouched, the runtime suspended) into that key's memory,
   before the term reads it. The manifest's ``capture.never_forwarded`` counts them per teacher.

Forwards that are not synthesis steps get nothing: under ``no_grad`` nothing is recorded, and a
second criterion call on the same logits (printing) finds its records already used.
"""
from __future__ import annotations

import importlib
import logging
import re
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..embeddings.bank import embed_images
from ..embeddings.capture import unwrap_model
from ..embeddings.collectives import world
from ..embeddings.isolation import own_rng
from ..errors import DiReHookError, DiReInputError
from .capture import Capture, Wrapper, plain_tensor_params
from .distributed import union_term_gradient, w_destroy_process_group
from .runtime import active_capture, current_runtime, output_saved

__all__ = ["DecoupledCapture"]

logger = logging.getLogger("dire")

_IMAGE_NAME = re.compile(r"class\d+_id\d+\.\w+$")
TEACHER_GRADS = ("shared", "untouched", "auto")


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

    @property
    def teacher(self) -> nn.Module:
        """The model whose forward this call belongs to (the layer itself, called on its own)."""
        return self.root if self.root is not None else self.layer


def _capture() -> Optional["DecoupledCapture"]:
    return active_capture(DecoupledCapture)


def _w_CrossEntropyLoss_forward(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    capture = _capture()
    if capture is not None:
        outputs = args[0] if args else kwargs.get("input")
        targets = args[1] if len(args) > 1 else kwargs.get("target")
        capture.on_criterion(outputs, targets)
    return wrapped(*args, **kwargs)


def _w_grad_reader(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    capture = _capture()
    if capture is not None:
        capture.check_grad_read(instance, getattr(wrapped, "__qualname__", "the upstream"))
    result = wrapped(*args, **kwargs)
    if capture is not None:
        capture.forget_cleared()
    return result


def _w_saved(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    capture = _capture()
    if capture is not None:
        capture.on_saved(args, kwargs)  # before the save: it may change the tensors it is given
    return wrapped(*args, **kwargs)


def _shape(t: Tensor) -> str:
    return "×".join(str(n) for n in t.shape)


def _describe(images: Optional[Tensor], found: int) -> str:
    """What stands behind a forward's embeddings, for a message (``found``: the leaves there)."""
    if images is None:
        return "no single tensor" if found == 0 else f"{found} tensors"
    return f"a tensor of shape {_shape(images)}"


def _images_behind(t: Tensor) -> List[Tuple[Tensor, List[Any]]]:
    """The leaf tensors behind ``t`` that are not parameters (the synthetic images), each with the
    graph nodes that read it directly."""
    found: Dict[int, Tuple[Tensor, List[Any]]] = {}
    seen, todo = set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        for next_fn, _ in fn.next_functions:
            variable = getattr(next_fn, "variable", None)
            if variable is None:  # not an AccumulateGrad
                todo.append(next_fn)
            elif not isinstance(variable, nn.Parameter) and variable.requires_grad:
                found.setdefault(id(variable), (variable, []))[1].append(fn)
    return list(found.values())


def _rows_taken(readers: List[Any], images: Tensor, count: int) -> Optional[Tensor]:
    """The rows of ``images`` that a forward of ``count`` embeddings covers, in the embeddings'
    order: those the one graph node reading ``images`` selects along dim 0 (``images[list]``,
    ``images[mask]``, ``images[a:b]``, ``index_select(0, ...)``: DELT's EarlyLate rounds), or
    every row when that node takes the whole batch (an augmentation, SRe²L's steps). ``None`` when
    they cannot be told: several nodes read ``images``, one row is taken without its batch
    dimension, or the count does not add up."""
    if len(readers) != 1:
        return None
    fn, n = readers[0], int(images.shape[0])
    name = type(fn).__name__
    dim0 = getattr(fn, "_saved_dim", None) in (0, -images.dim())
    rows: Optional[Tensor] = torch.arange(n, device=images.device)
    if name == "IndexBackward0":
        index = list(fn._saved_indices)
        if index and index[0] is not None:
            first = index[0]
            if any(i is not None for i in index[1:]) or first.dim() != 1:
                return None  # indexed along several dimensions at once
            rows = first.nonzero().flatten() if first.dtype == torch.bool else torch.where(first < 0, first + n, first)
    elif name == "SliceBackward0" and dim0:
        rows = rows[fn._saved_start:fn._saved_end:fn._saved_step]
    elif name == "IndexSelectBackward0" and dim0:
        rows = fn._saved_index.reshape(-1)
    elif name == "SelectBackward0" and dim0:
        return None
    return rows if rows.numel() == count else None


class _Rows:
    """The last embedding and label of each row of the tensor of images being optimised, from the
    criterion calls that forwarded that row (on the embeddings' device)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.emb: Optional[Tensor] = None
        self.labels: Optional[Tensor] = None
        self.seen: Optional[Tensor] = None

    def held(self, rows: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
        """The last embeddings and labels of the rows seen before and not among ``rows``."""
        if self.seen is None:
            return None
        mask = self.seen.clone()
        mask[rows.to(mask.device)] = False
        return (self.emb[mask], self.labels[mask]) if bool(mask.any()) else None

    def update(self, rows: Tensor, emb: Tensor, labels: Tensor) -> None:
        if self.emb is None:
            self.emb = emb.new_zeros(self.n, emb.shape[1], dtype=torch.float32)
            self.labels = torch.zeros(self.n, dtype=torch.long, device=emb.device)
            self.seen = torch.zeros(self.n, dtype=torch.bool, device=emb.device)
        rows = rows.to(emb.device)
        self.emb[rows] = emb.detach().float()
        self.labels[rows] = labels.to(device=emb.device, dtype=torch.long)
        self.seen[rows] = True

    def finished(self) -> Optional[Tuple[Tensor, Tensor]]:
        """Every row seen, with its last embedding and label."""
        if self.seen is None or not bool(self.seen.any()):
            return None
        return self.emb[self.seen], self.labels[self.seen]


class DecoupledCapture(Capture):
    """See the module doc. ``teacher_grads``: ``"shared"``, ``"untouched"`` or ``"auto"``;
    ``grad_readers``: ``(module, attribute path)`` of the upstream functions that read the
    teacher's accumulated ``.grad`` (checked before each call under ``"auto"``); ``compensator``:
    the optimised tensor is one 1×C×H×W compensator added to every image of a forward (item 4);
    ``saves``: ``(module, attribute path, "module:function")``, the upstream function that saves a
    batch of the distilled set and a reader of its ``(args, kwargs)`` that returns ``(images as the
    teacher sees them, labels)`` (item 6)."""

    family = "decoupled"

    def __init__(self, teacher_grads: str = "shared", grad_readers: Sequence[Tuple[str, str]] = (),
                 compensator: bool = False, saves: Optional[Sequence[str]] = None) -> None:
        if teacher_grads not in TEACHER_GRADS:
            raise DiReInputError(f"teacher_grads must be one of {TEACHER_GRADS}, got {teacher_grads!r}")
        if saves is not None and (len(saves) != 3 or ":" not in saves[2]):
            raise DiReInputError(f"saves must be (module, attribute path, 'module:function'), got {saves!r}")
        self.teacher_grads = teacher_grads
        self.grad_readers = tuple(tuple(r) for r in grad_readers)
        self.compensator = bool(compensator)
        self.saves = tuple(saves) if saves is not None else None
        self._reader: Optional[Callable] = None
        # Saved batches no step forwarded (CPU images as the teacher sees them, labels), and per
        # teacher key how many of them its memory holds; the synthesis steps at the last save.
        self._unforwarded: List[Tuple[Tensor, Tensor]] = []
        self._fed: Dict[str, int] = {}
        self._in_memory: Dict[str, int] = {}
        self._steps_at_save = 0
        self._saved_unforwarded = 0
        self._unforwarded_seconds = 0.0
        self._handles: List[Any] = []
        self._lock = threading.Lock()
        self._main_thread = threading.get_ident()
        self._depth = 0
        self._forward = 0
        self._root: Optional[nn.Module] = None
        # Recent classifier calls. Not reset per forward: the criterion is itself a module call,
        # and augmentations may be modules too. After backward the graphs hold no buffers.
        self._records: Deque[_Record] = deque(maxlen=64)
        # The step in flight: a term was attached, and DiRe's gradient at the images when it is
        # separate: (images, gradient, already inside the method's backward).
        self._attached = False
        self._pending: Optional[Tuple[weakref.ref, Tensor, bool]] = None
        self._stale = False  # the pending gradient's images were not this step's
        self.last: Optional[Tuple[Tensor, Tensor]] = None  # embeddings and labels of the last term
        # The tensor of images being optimised, and the last embeddings of its images.
        self._images: Optional[weakref.ref] = None
        self._finished: Dict[str, Tuple[Tensor, Tensor]] = {}  # key of the teacher → its last embeddings
        self._last_key: Optional[str] = None
        # Each row's last embedding per teacher key, while every criterion call on these images
        # told its rows (None once one could not).
        self._rows: Optional[Dict[str, _Rows]] = None
        self._n_rows = 0
        self._subset_logged = False
        self._identified = False  # the last criterion call told its images from the graph
        self._stepped: Optional[weakref.ref] = None  # images that had a synthesis step
        self._covers: Optional[Tuple[weakref.ref, bool]] = None  # images, their batch holds every class
        self._dirty: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # teachers whose .grad holds DiRe's
        self.criterion_calls_skipped = 0
        self.terms_discarded = 0
        self.routes = {"shared": 0, "untouched": 0}
        #: Per computed term, summed: rows of the optimised tensor that its forward covered (they
        #: get the term) and did not (no term in that step), those of the latter whose last
        #: embedding joined CD, terms on a strict subset, terms whose rows could not be told.
        self.rows = {"forwarded": 0, "not_forwarded": 0, "held_for_cd": 0, "terms_on_a_subset": 0,
                     "terms_rows_unknown": 0}

    def wrappers(self) -> Sequence[Wrapper]:
        return (
            ("torch.nn.modules.loss", "CrossEntropyLoss.forward", _w_CrossEntropyLoss_forward),
            # .../{exp}/new{cls}/class{cls}_id{ipc}.jpg: the manifest goes beside the class folders.
            ("PIL.Image", "Image.save", output_saved(0, "fp", lambda path: bool(_IMAGE_NAME.search(path)), up=2)),
            ("torch.distributed", "destroy_process_group", w_destroy_process_group(current_runtime)),
            *((module, path, _w_grad_reader) for module, path in self.grad_readers),
            *(((self.saves[0], self.saves[1], _w_saved),) if self.saves else ()),
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
        # DataParallel over several GPUs gathers the replicas' logits into a new tensor: the
        # classifier calls whose outputs are the gather's inputs, in its order. Told from the graph,
        # not from the latest forward: PRISM forwards further teachers before its criterion call.
        grad_fn = outputs.grad_fn
        if grad_fn is not None and "Gather" in type(grad_fn).__name__:
            by_node = {id(r.out.grad_fn): r for r in records if r.out.grad_fn is not None}
            chunks = [by_node.get(id(fn)) for fn, _ in grad_fn.next_functions]
            if chunks and all(chunks) and sum(r.out.shape[0] for r in chunks) == outputs.shape[0]:
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
        found = _images_behind(chunks[0].inp)
        images = found[0][0] if len(found) == 1 else None
        count = sum(int(r.emb.shape[0]) for r in chunks)
        self._check_optimised(images, len(found), count)
        if images is None and self.teacher_grads != "shared":
            self.criterion_calls_skipped += 1  # not a forward of one tensor of images: nothing to compute or add
            return
        self._identified = images is not None
        if images is not None:
            # A finished batch joins the memory before this term reads it; a compensator's rows
            # are the images of the forward.
            self._switch_to(images, count if self.compensator else int(images.shape[0]))
        labels = targets.argmax(1) if isinstance(targets, Tensor) and targets.dim() == 2 else targets
        labels = torch.as_tensor(labels).reshape(-1)
        device = outputs.device
        emb = torch.cat([r.emb.detach().to(device) for r in chunks])
        key = self._key(chunks[0], device)
        self._feed(key, chunks[0], device)  # saved images no step forwarded, before the term reads the memory
        rows, held = self._rows_of(found, images, emb.shape[0], key)
        # Under torch.distributed the term is the one of every rank's current images together.
        grad, union, union_labels = union_term_gradient(self.core, emb, labels.to(device), key=key, held=held)
        route = self._route(images, outputs, labels, chunks[0])
        self.routes[route] += 1
        if route == "shared":
            self._attach(chunks, grad, images)
        else:
            self._images_only(chunks, grad, images)
        self.last, self._last_key = (union.detach().float(), union_labels.detach().to(device)), key
        if images is not None:
            self._finished[key] = self.last
            if rows is not None and self._rows is not None:
                self._rows.setdefault(key, _Rows(self._n_rows)).update(rows, emb, labels)

    def _rows_of(self, found: List[Tuple[Tensor, List[Any]]], images: Optional[Tensor],
                 count: int, key: str) -> Tuple[Optional[Tensor], Optional[Tuple[Tensor, Tensor]]]:
        """The rows of ``images`` this forward covers and the last embeddings through ``key``'s
        teacher of those it does not (counted for the manifest); ``(None, None)`` when the rows
        cannot be told, which also stops the per-row memory of these images (their last step's
        embeddings are committed)."""
        if images is None:
            return None, None
        # Every image of the forward carries the compensator: all of them are its rows.
        rows = torch.arange(count, device=images.device) if self.compensator else _rows_taken(found[0][1], images, count)
        if rows is None:
            self.rows["terms_rows_unknown"] += 1
            self._rows = None
            return None, None
        forwarded = int(torch.unique(rows).numel())
        known = self._rows.get(key) if self._rows is not None else None
        held = known.held(rows) if known is not None else None
        missing = self._n_rows - forwarded  # the images of the tensor (a compensator: of its forwards)
        self.rows["forwarded"] += forwarded
        self.rows["not_forwarded"] += missing
        self.rows["held_for_cd"] += 0 if held is None else int(held[1].numel())
        if missing:
            self.rows["terms_on_a_subset"] += 1
            if not self._subset_logged:
                self._subset_logged = True
                logger.info("[dire] synthesis step %d forwards %d of the %d images being optimised: the others get "
                            "no term in it, and CD pushes away from the last embedding of each one forwarded before",
                            self.core.stats.steps + 1, forwarded, self._n_rows)
        return rows, held

    def _check_optimised(self, images: Optional[Tensor], found: int, count: int) -> None:
        """Stop where the tensor behind a forward of ``count`` embeddings is not what the patch
        declared: a compensator (one row shared by every image) where none was declared, or
        anything else where one was (``found``: the leaves behind the embeddings)."""
        method = self.core.config.method
        one_row = images is not None and images.dim() == 4 and int(images.shape[0]) == 1
        if self.compensator and not one_row:
            raise DiReHookError(
                f"the {method} patch expects one 1×C×H×W compensator added to every image of a forward; behind "
                f"this forward's {count} embeddings the optimised tensor is {_describe(images, found)}: the patch "
                "does not fit this code (set DIRE_DISABLE=1 to run vanilla)"
            )
        if not self.compensator and images is not None and int(images.shape[0]) == 1 and count > 1:
            raise DiReHookError(
                f"the optimised tensor behind this forward's {count} embeddings has one row "
                f"({_shape(images)}): it is shared by every image of the forward "
                f"(a compensator, as INFER's), which the {method} patch does not declare (set DIRE_DISABLE=1 to run vanilla)"
            )

    def on_saved(self, args: tuple, kwargs: dict) -> None:
        """The upstream's save function (``saves``) is called with ``args``/``kwargs``: a batch it
        saves with no synthesis step since the previous save was never forwarded, and is kept
        for every teacher's memory (module doc, item 6)."""
        steps, self._steps_at_save = self._steps_at_save, self.core.stats.steps
        if steps != self.core.stats.steps:
            return  # forwarded: its last embeddings join the memory when the next tensor starts
        if self._reader is None:
            module, _, function = self.saves[2].partition(":")
            self._reader = getattr(importlib.import_module(module), function)
        images, labels = self._reader(args, kwargs)
        labels = torch.as_tensor(labels).reshape(-1).long().cpu()
        self._saved_unforwarded += int(labels.numel())
        if self.core.config.memory:  # without the memory, nothing would read them
            self._unforwarded.append((images.detach().float().cpu().clone(), labels))

    def _feed(self, key: str, record: _Record, device: torch.device) -> None:
        """Forward the saved batches ``key``'s memory lacks through its teacher, once each."""
        done = self._fed.get(key, 0)
        if done == len(self._unforwarded):
            return
        teacher, layer = record.teacher, self._layer_name(record)
        start = time.perf_counter()
        # Our forwards: no record of ours, none of the method's hooks, none of its random numbers.
        with self.core.suspended(), own_rng():
            for images, labels in self._unforwarded[done:]:
                emb, labels = embed_images(teacher, images, labels, layer or None, device)
                self.core.commit_to_memory(emb, labels, key=key)
                self._in_memory[key] = self._in_memory.get(key, 0) + int(labels.numel())
        self._fed[key] = len(self._unforwarded)
        self._unforwarded_seconds += time.perf_counter() - start

    def _switch_to(self, images: Tensor, n_rows: int) -> None:
        """``images`` are optimised now: if they are new, the last embeddings of the previous
        tensor's images join the memory. ``n_rows``: the images they stand for (a compensator's:
        the forward's)."""
        current = self._images() if self._images is not None else None
        if current is images:
            return
        if self._images is not None:
            per_row = self._rows if self._rows is not None and world()[1] == 1 else {}
            for key, finished in self._finished.items():  # across ranks, the last step's union holds every row
                known = per_row.get(key)
                self.core.commit_to_memory(*((known.finished() if known is not None else None) or finished), key=key)
        self._images, self._finished = weakref.ref(images), {}
        self._rows, self._n_rows = {}, n_rows

    def _route(self, images: Optional[Tensor], outputs: Tensor, labels: Tensor, record: _Record) -> str:
        if self.teacher_grads != "auto":
            return self.teacher_grads
        if self._stepped is None or self._stepped() is not images:
            return "untouched"  # no synthesis step on these images yet: a pass no step may follow
        if self._covers is None or self._covers[0]() is not images:
            covers = int(torch.unique(labels).numel()) >= int(outputs.shape[-1])
            self._covers = (weakref.ref(images), covers)
        if not self._covers[1]:
            return "untouched"  # the teacher serves further batches, which read its accumulated .grad
        teacher = record.teacher
        if any(p.requires_grad for p in teacher.parameters()):
            self._dirty.add(teacher)
        return "shared"

    @staticmethod
    def _layer_name(record: _Record) -> Optional[str]:
        return next((n for n, m in unwrap_model(record.teacher).named_modules() if m is record.layer), None)

    def _key(self, record: _Record, device: torch.device) -> str:
        """The core's key of the teacher that produced ``record`` (its bank built the first time)."""
        return self.core.key_for(record.teacher, self._layer_name(record) or "", device)

    def _parts(self, chunks: List[_Record], grad: Tensor):
        start = 0
        for rec in chunks:
            yield rec, grad[start:start + rec.emb.shape[0]]
            start += rec.emb.shape[0]

    def _at_images(self, chunks: List[_Record], grad: Tensor, images: Tensor) -> Tensor:
        """DiRe's gradient at ``images`` alone: one input-only backward from the embeddings
        (parameters are not inputs here: nothing is computed or accumulated for the teacher)."""
        outputs = [rec.inp for rec, _ in self._parts(chunks, grad)]
        parts = [part.to(device=rec.inp.device, dtype=rec.inp.dtype).view_as(rec.inp) for rec, part in self._parts(chunks, grad)]
        (g_images,) = torch.autograd.grad(outputs, [images], grad_outputs=parts, retain_graph=True)
        return g_images

    def _keep_pending(self, images: Tensor, g_images: Tensor, included: bool) -> None:
        if self._pending is not None and not self._pending[2]:
            self.terms_discarded += 1  # a criterion call no synthesis step followed
        self._pending = (weakref.ref(images), g_images, included)
        self._stale = False

    def _attach(self, chunks: List[_Record], grad: Tensor, images: Optional[Tensor]) -> None:
        """The shared route: the method's backward adds ``grad`` at the captured embeddings."""
        self._attached = True
        core = self.core
        if images is not None and core.share_due():
            # DiRe's part of the images' gradient, for the share only; before the hooks below,
            # which would fire in this backward too.
            with core.measuring():
                self._keep_pending(images, self._at_images(chunks, grad, images), included=True)
        for rec, part in self._parts(chunks, grad):

            def add(g: Tensor, part: Tensor = part) -> Tensor:
                core.term_reached_images()
                return g + part.to(device=g.device, dtype=g.dtype).view_as(g)

            # On the very tensor the classifier consumed: that is where the method's backward
            # passes (a flattened view of it would be a separate node that backward never visits).
            rec.inp.register_hook(add)

    def _images_only(self, chunks: List[_Record], grad: Tensor, images: Tensor) -> None:
        """The untouched route: DiRe's gradient at the images now, kept for the synthesis step."""
        self._keep_pending(images, self._at_images(chunks, grad, images), included=False)
        self._attached = True

    # ------------------------------------------------------------------ reads of the teacher's .grad
    def check_grad_read(self, optimizer: Any, name: str) -> None:
        """``name`` is about to read the accumulated ``.grad`` of ``optimizer``'s parameters: stop
        if it holds DiRe's share (an ``"auto"`` route whose assumption failed)."""
        params = {id(p) for group in getattr(optimizer, "param_groups", ()) for p in group["params"]}
        for teacher in list(self._dirty):
            if any(id(p) in params and p.grad is not None for p in teacher.parameters()):
                raise DiReHookError(
                    f"{name} is about to read the teacher's accumulated gradient, which holds DiRe's share: the "
                    f"{self.core.config.method} patch took the shared route because a batch held every class of "
                    "this teacher, so it expected the teacher to serve that batch alone; report the script and its "
                    "arguments (DIRE_DISABLE=1 runs vanilla)"
                )

    def forget_cleared(self) -> None:
        """Teachers whose gradients were cleared (set to None) hold DiRe's share no more."""
        for teacher in list(self._dirty):
            if all(p.grad is None for p in teacher.parameters()):
                self._dirty.discard(teacher)

    # ------------------------------------------------------------------ optimizer steps
    def before_step(self, optimizer: Any) -> None:
        if self.compensator and self._attached:
            compensator = self._images() if self._images is not None else None
            if compensator is None or not any(p is compensator for p in plain_tensor_params(optimizer)):
                raise DiReHookError(
                    f"synthesis step {self.core.stats.steps} of the {self.core.config.method} patch updates other "
                    "tensors than the compensator its term reached: the patch does not fit this code (set "
                    "DIRE_DISABLE=1 to run vanilla)"
                )
        if self._pending is None:
            return
        ref, g_images, included = self._pending
        images = ref()
        self._pending = None
        if images is None or not any(p is images for p in plain_tensor_params(optimizer)):
            self._stale = not included  # the step check then names this, not a backward that never ran
            return
        self.core.apply_gradient(images, g_images, included)

    def after_step(self, optimizer: Any) -> None:
        self._attached = self._stale = False
        # Classifier calls no criterion took before this step never will (PRISM's further teachers):
        # their records would keep those forwards' graphs alive.
        with self._lock:
            self._records.clear()
        images = plain_tensor_params(optimizer)[0]
        self._stepped = weakref.ref(images)
        if not self._identified and self.last is not None:  # images not told apart: switch here, one step late
            self._switch_to(images, int(images.shape[0]))
            self._finished[self._last_key] = self.last

    def missing_reason(self) -> str:
        if self._stale:
            return "the images its pending gradient was computed for are not among this optimizer's parameters"
        if self._attached:
            return "its backward did not reach the captured embeddings"
        return "no classifier forward matched the criterion call"

    def manifest(self) -> Dict[str, Any]:
        return {
            "teacher_grads": self.teacher_grads,
            "routes": dict(self.routes),
            "criterion_calls_skipped": self.criterion_calls_skipped,
            "terms_discarded": self.terms_discarded,
            "rows": dict(self.rows),
            **({"compensator": True} if self.compensator else {}),
            **({"never_forwarded": self._never_forwarded()} if self.saves else {}),
        }

    def _never_forwarded(self) -> Dict[str, Any]:
        """Saved images no step forwarded, and how many of them each teacher's memory holds."""
        keys = self.core.keys
        return {
            "images_saved": self._saved_unforwarded,
            "seconds": round(self._unforwarded_seconds, 3),
            "per_teacher": [{"key": key[:16], "teacher": getattr(keys.get(key), "teacher", ""), "images": n}
                            for key, n in self._in_memory.items()],
        }
