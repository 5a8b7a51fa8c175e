"""Capture for the embedding-matching methods (DM in DC-BENCH): a fresh random network every
iteration embeds a real batch and the synthetic images of each class (``net.embed``), the loss
matches their means, ``loss.backward()``, ``optimizer_img.step()`` on ``SGD([image_syn])``.

DiRe needs no bank and no extra forward here: the real embeddings of class *c* are the ones DM
itself computed in the same iteration with the same network, and all IPC images of a class are
embedded in one call (CD needs no memory).

How a step gets the term:

1. ``Class.embed`` of the upstream's networks is wrapped. A call whose input requires grad is
   synthetic: its rows of ``image_syn`` are read from the autograd graph (``SliceBackward0`` →
   ``AccumulateGrad`` of the images; a ``CatBackward0`` of several classes, chunk by chunk), its
   labels are ``row // ipc`` (``image_syn`` is class-major, ``ipc = rows / num_classes``). A call
   whose input does not require grad is real: its embeddings are kept for this network.
2. Real labels come from the data, never from the order of calls: ``get_dataset``'s training set
   is indexed once by an exact integer hash of a fixed set of pixels (:class:`PixelIndex`). The
   augmentation wrapper records, for each real batch it augments, the un-augmented pixels at those
   positions (from which the labels are looked up) and the augmented ones (a signature); the real
   embed call is that very tensor (per-class calls) or a concatenation of them, matched chunk by
   chunk on the signature (one call for all classes). Un-augmented real batches are looked up
   directly. A row that is no training image, a class without real embeddings from the same
   network, a synthetic input whose rows cannot be read: one-line error, the run stops.
3. A tensor hook on each synthetic embed output adds ∂DiRe/∂emb when DM's own backward passes
   there: the images get exactly ∂(DM loss + DiRe)/∂images, and DM's printed loss stays DM's. At the
   first hook of a network, DiRe is computed once for all of its synthetic calls so far, against
   its real embeddings (``core.term_gradient(..., memory=False, real=...)``).
4. At the synthesis step (an optimizer over exactly one plain 4-D tensor), every synthetic embed
   call since the previous step must have received its gradient, and their images must be the
   ones the optimizer updates; otherwise the run stops.

Evaluation (``evaluate_synset``) calls ``net(x)``, never ``embed``, and steps optimizers over
``nn.Parameter``: it gets nothing.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, FrozenSet, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import DiReHookError
from ..regularizer.grouped import PackedEmbeddings
from .capture import Capture, Wrapper, one_image_tensor, plain_tensor_params
from .runtime import active_capture, output_saved

__all__ = ["EmbedCapture", "PixelIndex"]

logger = logging.getLogger("dire")

#: Pixels per image the index hashes: exact on whole pixel values, a few ms per DM iteration.
HASH_PIXELS = 256
#: Hash weights are below 2**45: 256 pixels x 255 x 2**45 < 2**61, no int64 overflow anywhere.
_WEIGHT_BITS = 45
_SEED = 0x5EED
#: Values per row that identify an augmented batch inside a concatenation.
_SIGNATURE = 32
_UNKNOWN, _AMBIGUOUS = -2, -1


# --------------------------------------------------------------------------------------------------
# The training set, indexed by pixels
# --------------------------------------------------------------------------------------------------


class PixelIndex:
    """Labels of training images from their pixels: an exact integer hash of ``HASH_PIXELS`` fixed
    positions of the whole-valued pixels (0..255), looked up in the sorted hashes of the training
    set. Normalised float images (as the method feeds them) are brought back to whole pixel
    values with the method's own mean and std; a row whose values are not whole pixels, or whose
    hash is no training image's, is unknown. Two training images of different classes with the
    same hash (duplicates) are ambiguous: resolved by the other rows of their batch, if that leaves
    one class."""

    def __init__(self, pixels: np.ndarray, labels: np.ndarray, positions: Tensor, scale: Tensor, shift: Tensor) -> None:
        g = torch.Generator().manual_seed(_SEED + 1)
        self.weights = torch.randint(1, 2 ** _WEIGHT_BITS, (positions.numel(),), generator=g, dtype=torch.int64)
        keys = pixels.astype(np.int64) @ self.weights.numpy()
        order = np.argsort(keys, kind="stable")
        keys, labels = keys[order], labels[order].astype(np.int64)
        self.num_images = int(len(keys))
        self.classes = sorted(int(c) for c in np.unique(labels))
        uniq, first, counts = np.unique(keys, return_index=True, return_counts=True)
        out = labels[first].copy()
        self.candidates: Dict[int, FrozenSet[int]] = {}
        for i in np.nonzero(counts > 1)[0]:
            these = frozenset(int(c) for c in labels[first[i]:first[i] + counts[i]])
            if len(these) > 1:
                out[i] = _AMBIGUOUS
                self.candidates[int(uniq[i])] = these
        self.keys = torch.from_numpy(uniq)
        self.labels = torch.from_numpy(out)
        self.positions, self.scale, self.shift = positions, scale, shift
        self._on: Dict[Any, Tuple[Tensor, ...]] = {}

    @classmethod
    def from_dataset(cls, dataset: Any, channel: int, im_size: Sequence[int], mean: Sequence[float],
                     std: Sequence[float]) -> "PixelIndex":
        """Index a training set as the upstream's ``get_dataset`` returns it: torchvision's
        (``.data`` uint8 ``[N, H, W(, C)]`` or ``[N, C, H, W]``, ``.targets``/``.labels``) or a
        tensor set of normalised images (``.images``, ``.labels``)."""
        h, w = int(im_size[0]), int(im_size[1])
        numel = channel * h * w
        g = torch.Generator().manual_seed(_SEED)
        k = min(HASH_PIXELS, numel)
        positions = torch.randperm(numel, generator=g)[:k].sort().values
        ch = positions // (h * w)
        mean_t = torch.tensor([float(m) for m in mean], dtype=torch.float32)
        std_t = torch.tensor([float(s) for s in std], dtype=torch.float32)
        if len(mean_t) != channel or len(std_t) != channel:
            raise DiReHookError(f"get_dataset returned {len(mean_t)} means and {len(std_t)} stds for {channel} channels")
        scale, shift = std_t[ch] * 255.0, mean_t[ch] * 255.0
        c_idx, rest = (positions // (h * w)).numpy(), (positions % (h * w))
        y_idx, x_idx = (rest // w).numpy(), (rest % w).numpy()
        kind = type(dataset).__name__
        data = getattr(dataset, "data", None)
        targets = getattr(dataset, "targets", None)
        if targets is None:
            targets = getattr(dataset, "labels", None)
        if data is not None and targets is not None:
            arr = data.numpy() if isinstance(data, Tensor) else np.asarray(data)
            if arr.dtype != np.uint8:
                raise DiReHookError(f"the training set ({kind}) holds {arr.dtype} pixels, expected uint8")
            if arr.ndim == 3 and channel == 1:
                pixels = arr[:, y_idx, x_idx]
            elif arr.ndim == 4 and arr.shape[1:] == (channel, h, w):
                pixels = arr[:, c_idx, y_idx, x_idx]
            elif arr.ndim == 4 and arr.shape[1:] == (h, w, channel):
                pixels = arr[:, y_idx, x_idx, c_idx]
            else:
                raise DiReHookError(f"the training set ({kind}) holds images of shape {arr.shape[1:]}, "
                                    f"expected {channel} channels of {h}x{w}")
        elif isinstance(getattr(dataset, "images", None), Tensor) and getattr(dataset, "labels", None) is not None:
            images = dataset.images.detach().cpu().float().flatten(1)[:, positions]
            u = images * scale + shift
            if not bool(((u - u.round()).abs() < 0.05).all()):
                raise DiReHookError(f"the training set ({kind}) does not hold normalised whole pixel values")
            pixels = u.round().clamp(0, 255).to(torch.uint8).numpy()
            targets = dataset.labels
        else:
            raise DiReHookError(f"cannot index the training set get_dataset returned ({kind}): "
                                "expected torchvision's .data/.targets or .images/.labels")
        labels = targets.numpy() if isinstance(targets, Tensor) else np.asarray(targets)
        labels = labels.reshape(-1).astype(np.int64)
        if len(labels) != len(pixels):
            raise DiReHookError(f"the training set ({kind}) has {len(pixels)} images but {len(labels)} labels")
        if len(labels) == 0:
            raise DiReHookError(f"the training set ({kind}) is empty")
        return cls(np.ascontiguousarray(pixels), labels, positions, scale, shift)

    def _device(self, device: torch.device) -> Tuple[Tensor, ...]:
        key = str(device)
        if key not in self._on:
            self._on[key] = tuple(t.to(device) for t in (self.positions, self.scale, self.shift, self.weights,
                                                         self.keys, self.labels))
        return self._on[key]

    def keys_of(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """``(keys, whole)`` of the rows of ``x [B, C, H, W]``: the hash of each row's pixels at the
        index's positions, and whether those are whole pixel values (un-augmented images)."""
        positions, scale, shift, weights = self._device(x.device)[:4]
        u = x.detach().reshape(x.shape[0], -1)[:, positions].float() * scale + shift
        r = u.round()
        whole = ((u - r).abs() < 0.05).all(1) & (r >= 0).all(1) & (r <= 255).all(1)
        return (r.clamp(0, 255).to(torch.int64) * weights).sum(1), whole

    def signature(self, x: Tensor) -> Tensor:
        """A few values of each row of ``x`` (to find a batch again inside a concatenation)."""
        positions = self._device(x.device)[0]
        return x.detach().reshape(x.shape[0], -1)[:, positions[:: max(1, len(positions) // _SIGNATURE)]].clone()

    def lookup(self, keys: Tensor, whole: Tensor) -> Tensor:
        """The class of each row (:meth:`keys_of`), ``-1`` (ambiguous) or ``-2`` (no training image)."""
        index, labels = self._device(keys.device)[4:]
        pos = torch.searchsorted(index, keys).clamp_max(len(index) - 1)
        hit = whole & (index[pos] == keys)
        return torch.where(hit, labels[pos], torch.full_like(keys, _UNKNOWN))

    def labels_of(self, keys: Tensor, whole: Tensor, what: str) -> Tensor:
        """Labels of a batch of real rows (:meth:`keys_of`); unknown rows and ambiguity that the
        batch's other rows do not settle are a :class:`DiReHookError` naming ``what``."""
        out = self.lookup(keys, whole)
        unknown = out == _UNKNOWN
        if bool(unknown.any()):
            raise DiReHookError(
                f"{int(unknown.sum())} of {len(out)} real images given to {what} are no image of the training set "
                "get_dataset returned (changed before they were embedded, or taken from elsewhere): the dm patch "
                "cannot tell their class"
            )
        ambiguous = out == _AMBIGUOUS
        if bool(ambiguous.any()):
            known = set(out[~ambiguous].tolist())
            fixed = out.clone()
            for i in torch.nonzero(ambiguous).flatten().tolist():
                choices = self.candidates.get(int(keys[i]), frozenset()) & known
                if len(choices) != 1:
                    raise DiReHookError(
                        f"a real image given to {what} is a duplicate of training images of classes "
                        f"{sorted(self.candidates.get(int(keys[i]), ()))} and its batch does not tell which"
                    )
                fixed[i] = next(iter(choices))
            return fixed
        return out


# --------------------------------------------------------------------------------------------------
# Synthetic rows from the autograd graph
# --------------------------------------------------------------------------------------------------


def _leaf_slices(fn: Any) -> List[Tuple[Tensor, int, int]]:
    """``(images, start, end)`` of every plain leaf tensor the graph below ``fn`` reaches, through
    a slice along dim 0 (``images[a:b]``) or whole."""
    found: List[Tuple[Tensor, int, int]] = []
    seen, todo = set(), [fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        name = type(node).__name__
        if name == "SliceBackward0":
            nxt = node.next_functions[0][0] if node.next_functions else None
            leaf = getattr(nxt, "variable", None)
            if leaf is not None and not isinstance(leaf, nn.Parameter):
                n = int(leaf.shape[0])
                dim, step = getattr(node, "_saved_dim", 0), getattr(node, "_saved_step", 1)
                start, end = getattr(node, "_saved_start", 0), getattr(node, "_saved_end", n)
                if dim not in (0, -leaf.dim()) or step not in (1, None):
                    raise DiReHookError(f"synthetic images are sliced along dim {dim} with step {step}: the dm patch "
                                        "cannot tell their rows")
                start = 0 if start is None else (start + n if start < 0 else start)
                end = n if end is None else (end + n if end < 0 else end)
                found.append((leaf, max(0, min(start, n)), max(0, min(end, n))))
                continue
        leaf = getattr(node, "variable", None)
        if leaf is not None:  # AccumulateGrad reached without a slice: the whole tensor
            if not isinstance(leaf, nn.Parameter):
                found.append((leaf, 0, int(leaf.shape[0])))
            continue
        todo.extend(n for n, _ in node.next_functions)
    return found


def synthetic_rows(x: Tensor) -> List[Tuple[Tensor, int, int]]:
    """``(images, start, end)`` per chunk of ``x``'s rows, in order: one for a batch cut from the
    synthetic images (augmented or not), one per part of a ``torch.cat`` along dim 0."""
    fn = x.grad_fn
    if fn is None:
        raise DiReHookError("the synthetic embed input has no autograd graph: the dm patch cannot tell its rows")
    parts = [fn]
    if type(fn).__name__ == "CatBackward0" and getattr(fn, "_saved_dim", 0) in (0, -x.dim()):
        parts = [n for n, _ in fn.next_functions]
    chunks = []
    for part in parts:
        slices = _leaf_slices(part) if part is not None else []
        if len(slices) != 1:
            what = "none" if not slices else f"{len(slices)} (" + ", ".join(f"{a}:{b}" for _, a, b in slices) + ")"
            raise DiReHookError(f"a part of a synthetic embed input comes from {what} slices of the synthetic images: "
                                "the dm patch needs one slice per part to tell its class")
        chunks.append(slices[0])
    rows = sum(b - a for _, a, b in chunks)
    if rows != x.shape[0]:
        raise DiReHookError(f"the synthetic embed input has {x.shape[0]} rows, its slices of the synthetic images "
                            f"{rows}: the dm patch cannot tell their classes")
    return chunks


# --------------------------------------------------------------------------------------------------
# Wrappers
# --------------------------------------------------------------------------------------------------


def _capture() -> Optional["EmbedCapture"]:
    return active_capture(EmbedCapture)


_local = threading.local()


def _w_embed(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    capture = _capture()
    if capture is None or getattr(_local, "inside", False):  # an embed calling another: the outer one counts
        return wrapped(*args, **kwargs)
    _local.inside = True
    try:
        out = wrapped(*args, **kwargs)
    finally:
        _local.inside = False
    x = args[0] if args else next(iter(kwargs.values()), None)
    if isinstance(x, Tensor) and isinstance(out, Tensor):
        capture.on_embed(instance, x, out)
    return out


def _w_augment(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    out = wrapped(*args, **kwargs)
    capture = _capture()
    x = args[0] if args else kwargs.get("x")
    if capture is not None and isinstance(x, Tensor) and isinstance(out, Tensor) and out is not x and not x.requires_grad:
        capture.on_augmented(x, out)
    return out


def _w_get_dataset(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    result = wrapped(*args, **kwargs)
    capture = _capture()
    if capture is not None:
        data_path = args[1] if len(args) > 1 else kwargs.get("data_path")
        capture.on_dataset(result, data_path)
    return result


# --------------------------------------------------------------------------------------------------
# The capture
# --------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Augmented:
    """One real batch the augmentation saw: the hash of its un-augmented pixels (for the labels)
    and a few augmented values per row (to find it inside a concatenation)."""

    keys: Tensor
    whole: Tensor
    signature: Tensor
    labels: Optional[Tensor] = None


@dataclass(eq=False)
class _SynCall:
    emb: Tensor  # detached [N, D]
    labels: Tensor
    images: "weakref.ref[Tensor]"
    net: "_Net"
    grad: Optional[Tensor] = None
    applied: bool = False
    #: The embed output with its graph, kept on a step whose gradient share is measured.
    out: Optional[Tensor] = None


@dataclass(eq=False)
class _Net:
    """What one network instance embedded since the last synthesis step."""

    ref: "weakref.ref[nn.Module]"
    real: List[Tuple[Tensor, Tensor]] = field(default_factory=list)
    syn: List[_SynCall] = field(default_factory=list)


class EmbedCapture(Capture):
    """See the module doc.

    Args:
        embed: ``(module, "Class.embed")`` of every network whose embeddings the method matches.
        augment: ``(module, function)`` of the method's augmentation of real and synthetic batches.
        dataset: ``(module, function)`` returning the training set (DC-BENCH's ``get_dataset``
            tuple: ``channel, im_size, num_classes, class_names, mean, std, dst_train, ...``).
        results: regular expression of the result files whose ``torch.save`` puts the manifest
            beside them.
    """

    family = "embed"

    def __init__(self, embed: Sequence[Tuple[str, str]] = (("networks", "ConvNet.embed"),),
                 augment: Optional[Tuple[str, str]] = ("utils", "DiffAugment"),
                 dataset: Tuple[str, str] = ("utils", "get_dataset"),
                 results: str = r"^res_.*\.pt$") -> None:
        self.embed_targets = tuple(tuple(t) for t in embed)
        self.augment_target = tuple(augment) if augment else None
        self.dataset_target = tuple(dataset)
        self.results = re.compile(results)
        self.index: Optional[PixelIndex] = None
        self.num_classes: Optional[int] = None
        self._augmented: Deque[_Augmented] = deque(maxlen=64)
        self._net: Optional[_Net] = None
        self._step_calls: List[_SynCall] = []
        self._reason = "no synthetic embed call since the previous step"
        self.counts = {"real_calls": 0, "synthetic_calls": 0, "real_rows": 0, "synthetic_rows": 0,
                       "concatenated_real_calls": 0, "unaugmented_real_calls": 0}
        self.label_seconds = 0.0
        self.term_seconds = 0.0
        self.index_seconds = 0.0
        self._measuring = False
        self._measured: Optional[Tuple[weakref.ref, Tensor]] = None

    def wrappers(self) -> Sequence[Wrapper]:
        out: List[Wrapper] = [(m, p, _w_embed) for m, p in self.embed_targets]
        if self.augment_target:
            out.append((*self.augment_target, _w_augment))
        out.append((*self.dataset_target, _w_get_dataset))
        out.append(("torch", "save", output_saved(1, "f", lambda path: bool(self.results.search(os.path.basename(path))))))
        return out

    def uninstall(self) -> None:
        self._augmented.clear()
        self._net = None
        self._step_calls = []

    # ------------------------------------------------------------------ the training set
    def on_dataset(self, result: Any, data_path: Any) -> None:
        try:
            channel, im_size, num_classes, _names, mean, std, dst_train = tuple(result)[:7]
        except (TypeError, ValueError):
            raise DiReHookError(f"{'.'.join(self.dataset_target)} returned {type(result).__name__}, expected "
                                "(channel, im_size, num_classes, class_names, mean, std, dst_train, ...)") from None
        start = time.perf_counter()
        self.index = PixelIndex.from_dataset(dst_train, int(channel), im_size, mean, std)
        self.index_seconds = time.perf_counter() - start
        self.num_classes = int(num_classes)
        # One augmented real batch per class and iteration is embedded; older ones (evaluation's) never are.
        self._augmented = deque(maxlen=2 * self.num_classes + 16)
        if self.index.classes and (self.index.classes[0] < 0 or self.index.classes[-1] >= self.num_classes):
            raise DiReHookError(f"the training set has labels {self.index.classes[0]}..{self.index.classes[-1]} "
                                f"for {self.num_classes} classes")
        logger.info(
            "[dire] dm: real embeddings are the method's own (same network, same iteration), their classes read "
            "from the pixels: %d training images indexed in %.2f s; no bank, no memory",
            self.index.num_images, self.index_seconds,
        )
        real = getattr(getattr(self, "core", None), "config", None)
        real = getattr(real, "real_data", "") if real is not None else ""
        if real and isinstance(data_path, (str, os.PathLike)):
            here, there = os.path.abspath(os.fspath(data_path)), os.path.abspath(os.path.expanduser(real))
            if not (here == there or here.startswith(there + os.sep) or there.startswith(here + os.sep)):
                logger.info("[dire] note: the script reads its data from %s, --real-data is %s (DiRe uses the "
                            "script's own real batches)", here, there)

    # ------------------------------------------------------------------ real batches
    def on_augmented(self, x: Tensor, out: Tensor) -> None:
        if self.index is None or x.dim() != 4 or out.shape != x.shape:
            return
        start = time.perf_counter()
        entry = _Augmented(*self.index.keys_of(x), self.index.signature(out))
        self._augmented.append(entry)
        self.label_seconds += time.perf_counter() - start
        out._dire_augmented = entry  # the per-class embed call receives this very tensor

    def _entry_labels(self, entry: _Augmented, what: str) -> Tensor:
        if entry.labels is None:
            entry.labels = self.index.labels_of(entry.keys, entry.whole, what)
        return entry.labels

    def _real_labels(self, x: Tensor, what: str) -> Tensor:
        entry = getattr(x, "_dire_augmented", None)
        if isinstance(entry, _Augmented) and len(entry.keys) == x.shape[0]:
            self._drop_through(entry)
            return self._entry_labels(entry, what)
        if x.dim() != 4:
            raise DiReHookError(f"a real input of {what} has shape {tuple(x.shape)}, expected images [N, C, H, W]")
        parts = self._match_concatenated(x, what)
        if parts is not None:
            self.counts["concatenated_real_calls"] += 1
            return parts
        self.counts["unaugmented_real_calls"] += 1
        return self.index.labels_of(*self.index.keys_of(x), what)

    def _drop_through(self, entry: _Augmented) -> None:
        """``entry`` is used: it and every older entry (never embedded: evaluation batches) go."""
        while self._augmented:
            if self._augmented.popleft() is entry:
                break

    def _match_concatenated(self, x: Tensor, what: str) -> Optional[Tensor]:
        """Labels of ``x`` if it is a concatenation of augmented real batches (matched on their
        signatures, in the order they were augmented or any other), else ``None``."""
        entries = list(self._augmented)
        if not entries:
            return None
        sig = self.index.signature(x)
        row, start, used, labels = 0, 0, [], []
        while row < len(sig):
            hit = None
            for j in list(range(start, len(entries))) + list(range(0, start)):
                e = entries[j]
                n = len(e.signature)
                if e not in used and row + n <= len(sig) and torch.equal(sig[row:row + n], e.signature):
                    hit = j
                    break
            if hit is None:
                break
            used.append(entries[hit])
            labels.append(self._entry_labels(entries[hit], what))
            row += len(entries[hit].signature)
            start = hit + 1
        if not used:
            return None
        if row < len(sig):  # the rest was not augmented: its own pixels tell
            labels.append(self.index.labels_of(*self.index.keys_of(x[row:]), what))
        newest = max(entries.index(e) for e in used)
        self._drop_through(entries[newest])
        return torch.cat([lab.to(x.device) for lab in labels])

    # ------------------------------------------------------------------ embed calls
    def _state(self, net: Any) -> _Net:
        state = self._net
        if state is None or state.ref() is not net:
            state = self._net = _Net(weakref.ref(net))
        return state

    def on_embed(self, net: Any, x: Tensor, out: Tensor) -> None:
        what = f"{type(net).__name__}.embed"
        if self.index is None or self.num_classes is None:
            raise DiReHookError(f"{what} was called before {'.'.join(self.dataset_target)}: the dm patch reads the "
                                "classes of real images from the training set that function returns")
        state = self._state(net)
        if x.requires_grad:
            self._on_synthetic(state, x, out, what)
            return
        start = time.perf_counter()
        labels = self._real_labels(x, what)
        self.label_seconds += time.perf_counter() - start
        emb = out.detach().reshape(out.shape[0], -1)
        if len(labels) != len(emb):
            raise DiReHookError(f"{what} returned {len(emb)} embeddings for {len(labels)} real images")
        state.real.append((emb, labels.to(emb.device)))
        self.counts["real_calls"] += 1
        self.counts["real_rows"] += len(emb)

    def _on_synthetic(self, state: _Net, x: Tensor, out: Tensor, what: str) -> None:
        if not out.requires_grad:
            return  # under no_grad: nothing of it reaches the images
        chunks = synthetic_rows(x)
        images = chunks[0][0]
        if any(c[0] is not images for c in chunks):
            raise DiReHookError(f"a synthetic input of {what} mixes rows of several image tensors")
        n = int(images.shape[0])
        if images.dim() != 4 or n % self.num_classes:
            raise DiReHookError(f"the synthetic images have shape {tuple(images.shape)}, expected "
                                f"[num_classes x ipc, C, H, W] with {self.num_classes} classes")
        ipc = n // self.num_classes
        rows = torch.cat([torch.arange(a, b) for _, a, b in chunks])
        labels = (rows // ipc).to(out.device)
        call = _SynCall(out.detach().reshape(out.shape[0], -1), labels, weakref.ref(images), state,
                        out=out if self.core.share_due() else None)
        state.syn.append(call)
        self._step_calls.append(call)
        self.counts["synthetic_calls"] += 1
        self.counts["synthetic_rows"] += len(labels)

        def add(g: Tensor, call: _SynCall = call) -> Tensor:
            if self._measuring:  # our own backward of DiRe's part alone (the share) passes here too
                return g
            if call.grad is None:
                self._compute(call.net)
            call.applied = True
            return g + call.grad.to(device=g.device, dtype=g.dtype).view_as(g)

        out.register_hook(add)

    def _compute(self, state: _Net) -> None:
        """DiRe's gradient for every synthetic call of ``state`` without one, against its real
        embeddings: one term per network and backward (the per-class terms add up)."""
        calls = [c for c in state.syn if c.grad is None]
        emb = torch.cat([c.emb for c in calls])
        labels = torch.cat([c.labels for c in calls])
        wanted = sorted(set(labels.tolist()))
        if not state.real:
            raise DiReHookError(f"no real embeddings from the network that embedded synthetic classes {wanted}: "
                                "the dm patch needs the method's own real batches of the same iteration")
        real = torch.cat([e for e, _ in state.real]).to(emb.device)
        real_labels = torch.cat([lab for _, lab in state.real]).to(emb.device)
        missing = sorted(set(wanted) - set(real_labels.tolist()))
        if missing:
            raise DiReHookError(
                f"synthetic class{'es' if len(missing) > 1 else ''} {', '.join(map(str, missing))} got no real "
                f"embeddings of {'their' if len(missing) > 1 else 'its'} class from the same network (the real batches "
                f"of this iteration are of classes {sorted(set(real_labels.tolist()))}): the loop no longer pairs "
                "each class with its own real images"
            )
        start = time.perf_counter()
        grad = self.core.term_gradient(emb, labels, memory=False, real=PackedEmbeddings.from_rows(real, real_labels))
        self.term_seconds += time.perf_counter() - start
        start = 0
        for c in calls:
            c.grad = grad[start:start + len(c.emb)]
            start += len(c.emb)
        if all(c.out is not None for c in calls):
            self._measure(calls)

    def _measure(self, calls: List[_SynCall]) -> None:
        """DiRe's part of the images' gradient alone, for the share: a backward of our own from the
        embed outputs to the images, inside DM's backward (reentrant; the graph is kept for DM's)."""
        images = calls[0].images()
        if images is None:
            return
        outputs = [c.out for c in calls]
        grads = [c.grad.to(device=c.out.device, dtype=c.out.dtype).view_as(c.out) for c in calls]
        with self.core.measuring():
            self._measuring = True
            try:
                (g_images,) = torch.autograd.grad(outputs, [images], grad_outputs=grads, retain_graph=True)
            finally:
                self._measuring = False
        for c in calls:
            c.out = None
        previous = self._measured
        if previous is not None and previous[0]() is images:
            g_images = g_images + previous[1]
        self._measured = (weakref.ref(images), g_images)

    # ------------------------------------------------------------------ optimizer steps
    def is_synthesis_step(self, optimizer: Any) -> bool:
        return one_image_tensor(optimizer)

    def before_step(self, optimizer: Any) -> None:
        calls = self._step_calls
        if not calls:
            self._reason = "no synthetic embed call since the previous step"
            return
        missing = [c for c in calls if not c.applied]
        if missing:
            self._reason = (f"{len(missing)} of {len(calls)} synthetic embed calls since the previous step got no "
                            "gradient (the backward before this step did not pass through them)")
            return
        images = plain_tensor_params(optimizer)[0]
        if any(c.images() is not images for c in calls):
            self._reason = "the embedded synthetic images are not the ones this optimizer updates"
            return
        self.core.term_reached_images()
        measured, self._measured = self._measured, None
        if measured is not None and measured[0]() is images:
            self.core.apply_gradient(images, measured[1], included=True)

    def after_step(self, optimizer: Any) -> None:
        self._step_calls = []
        self._measured = None
        self._net = None  # the next embed call starts afresh, even with the same network

    def missing_reason(self) -> str:
        return self._reason

    def manifest(self) -> Dict[str, Any]:
        core = getattr(self, "core", None)
        steps = max(1, core.stats.steps) if core is not None else 1
        return {
            "real_embeddings": "the method's own real batches, same network and iteration (no bank)",
            "memory": "not used: all IPC images of a class are embedded in one call",
            "labels": "synthetic: rows of the synthetic images // ipc; real: training-set pixel hash",
            "indexed_images": self.index.num_images if self.index is not None else 0,
            "index_seconds": round(self.index_seconds, 4),
            "labelling_seconds_per_step": round(self.label_seconds / steps, 6),
            "term_seconds_per_step": round(self.term_seconds / steps, 6),
            **self.counts,
        }
