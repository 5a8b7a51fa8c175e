"""Distilled image sets as ``dire-metrics`` reads them: found on disk, mapped to the real set's classes.

Three layouts are recognised from the path alone:

* ``sre2l``: the SRe²L/CDA output ``new{cls:03d}/class{cls:03d}_id{ipc:03d}.jpg``; the class is
  the number in the folder name, an index into the real set's sorted classes.
* ``imagefolder``: one folder per class; matched to the real set by folder name, or by sorted
  order when the names differ but the counts agree.
* ``tensor``: a ``torch.save`` file as MTT, DM/DC-BENCH and similar codebases write it:
  ``{"images": [N,C,H,W], "labels": [N]}``, a tuple ``(images, labels)``, DC-BENCH's
  ``{"data": [[images, labels], ...]}`` (the last entry, as DC-BENCH's own loader takes; the
  numpy accuracies beside it are read as data), or
  MTT's bare ``images_*.pt`` with its ``labels_*.pt`` beside it. Such tensors are already in the
  network's input space (normalised, as the method optimised them).

Sizes (:meth:`DistilledSet.check_size`): a tensor set was optimised at one resolution and its own
evaluation feeds it to the network as it is, so tensors of another size than the real data's
input mean another dataset or a wrong ``--image-size``: they are refused unless resizing is asked
for (``resize_tensors``). Image files are decoded and resized/centre-cropped by the transform, as
the evaluation of SRe²L/CDA/RDED does with its own JPEGs: a size difference there is noted.
"""
from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..errors import DiReInputError
from ..io.files import load_torch_file

__all__ = ["InputSpec", "DistilledSet", "load_distilled", "read_image", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
TENSOR_SUFFIXES = (".pt", ".pth", ".tar")
_SRE2L_FOLDER = re.compile(r"^new(\d+)$")
# MTT writes images_{it}.pt / images_best.pt / images_zca_{it}.pt beside labels_{it}.pt.
_MTT_IMAGES = re.compile(r"^images_(?:zca_)?(.+)$")
_PAIR_KEYS = (("images", "labels"), ("image_syn", "label_syn"), ("x", "y"))

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class InputSpec:
    """The network's input: ``size`` x ``size`` pixels, normalised with ``mean`` / ``std``."""

    size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]

    def pil_transform(self) -> Callable:
        """PIL image → normalised ``[3, size, size]`` tensor.

        Distilled images were optimised at the network's input size, so they are resized
        straight to it (identity for SRe²L output) rather than through the real data's
        resize-then-crop zoom, which would cut away part of what was synthesised.
        """
        from torchvision import transforms

        return transforms.Compose([
            transforms.Resize(self.size),
            transforms.CenterCrop(self.size),
            transforms.ToTensor(),
            transforms.Normalize(self.mean, self.std),
        ])

    def adapt_tensor(self, x: Tensor, normalized: bool, resize: bool = False) -> Tensor:
        """A batch ``[B, 3, H, W]`` at the input size; ``normalized=False``: [0, 1] pixels, normalised here.

        A batch of another size is resized (bilinear, antialiased) only with ``resize``; otherwise
        it is a :class:`DiReInputError` (see the module doc).
        """
        x = x.float()
        if tuple(x.shape[-2:]) != (self.size, self.size):
            if not resize:
                raise DiReInputError(f"images are {_size(x.shape[-1], x.shape[-2])}, the input is "
                                     f"{_size(self.size, self.size)}: pass resize=True to resize them")
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear",
                                                align_corners=False, antialias=True)
        if not normalized:
            mean = torch.tensor(self.mean, dtype=x.dtype).view(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=x.dtype).view(1, -1, 1, 1)
            x = (x - mean) / std
        return x


@dataclass
class DistilledSet:
    """One distilled set: its images (files or a tensor) and their labels as real-set class indices."""

    name: str
    path: Path
    layout: str
    labels: Tensor
    files: Optional[List[Path]] = None
    images: Optional[Tensor] = None
    notes: List[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.labels.numel())

    @property
    def classes(self) -> List[int]:
        """Sorted real-set class indices present in the set."""
        return torch.unique(self.labels).tolist()

    @property
    def images_per_class(self) -> int:
        """Images per class, rounded (IPC), at least 1."""
        return max(1, round(len(self) / max(1, len(self.classes))))

    def check_size(self, spec: InputSpec, resize_tensors: bool = False) -> Optional[str]:
        """``None`` when the images have the input size of ``spec``, else a note saying how they
        are brought to it; a tensor set of another size without ``resize_tensors`` is a
        :class:`DiReInputError` naming the file and both sizes (see the module doc).

        Image files: only the first one is read (sets are written at one size).
        """
        want = _size(spec.size, spec.size)
        if self.images is not None:
            h, w = int(self.images.shape[-2]), int(self.images.shape[-1])
            if (h, w) == (spec.size, spec.size):
                return None
            if not resize_tensors:
                raise DiReInputError(
                    f"distilled set {self.path}: images are {_size(w, h)}, the real data's input is {want}: "
                    f"another dataset or --image-size? (--resize-tensors resizes them)"
                )
            return f"{self.name}: {_size(w, h)} tensors resized to {want} (--resize-tensors)"
        assert self.files is not None
        first = self.files[0]
        w, h = read_image(first).size
        if (w, h) == (spec.size, spec.size):
            return None
        return (f"{self.name}: images are {_size(w, h)} ({first.name}), the input is {want}: resized (shorter side) "
                f"and centre-cropped, as ImageFolder evaluation does")

    def batches(self, spec: InputSpec, batch_size: int, normalized: bool = True,
                workers: int = 4, resize_tensors: bool = False) -> Iterator[Tuple[Tensor, Tensor]]:
        """``(images [B, 3, S, S], labels [B])`` in file order; an unreadable file is a one-line error.

        Tensors of another size than the input are refused unless ``resize_tensors`` (:meth:`check_size`).
        """
        if self.images is not None:
            self.check_size(spec, resize_tensors)
            for start in range(0, len(self), batch_size):
                stop = start + batch_size
                yield spec.adapt_tensor(self.images[start:stop], normalized, resize=True), self.labels[start:stop]
            return
        transform = spec.pil_transform()
        assert self.files is not None
        # Threads, not DataLoader workers: PIL decodes outside the GIL, and an error raised here
        # keeps its type and message instead of coming back wrapped in a worker traceback.
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for start in range(0, len(self), batch_size):
                chunk = self.files[start:start + batch_size]
                images = list(pool.map(lambda p: transform(read_image(p)), chunk))
                yield torch.stack(images), self.labels[start:start + len(chunk)]


def _size(width: int, height: int) -> str:
    return f"{width}x{height}"


def read_image(path: Path) -> Any:
    """The RGB PIL image at ``path``, fully decoded; a file PIL cannot read is a one-line error."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file fails here, naming this file
            return img.convert("RGB")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
        raise DiReInputError(f"cannot read image {path}: {' '.join(str(e).split()) or type(e).__name__}") from None


def _subfolders(path: Path) -> List[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_distilled(path: PathLike, real_classes: Sequence[str], name: Optional[str] = None) -> DistilledSet:
    """The distilled set at ``path`` (layout detected), labelled with indices into ``real_classes``."""
    p = Path(path).expanduser()
    name = name or (p.stem if p.is_file() else p.name) or str(p)
    if not p.exists():
        raise DiReInputError(f"distilled set {p} does not exist")
    if p.is_file():
        return _load_tensor_file(p, real_classes, name)
    folders = _subfolders(p)
    if not folders:
        loose = [q.name for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES]
        detail = f"{len(loose)} images but no class folders" if loose else "empty"
        raise DiReInputError(f"distilled set {p} is {detail}: expected new000/... (SRe2L) or one folder per class")
    matches = [_SRE2L_FOLDER.match(f.name) for f in folders]
    if all(matches):
        labels = [int(m.group(1)) for m in matches if m]
        return _folder_set(p, name, "sre2l", folders, labels, real_classes, [])
    runs = [f.name for f in folders if any(_SRE2L_FOLDER.match(g.name) for g in _subfolders(f))]
    if runs:  # the --syn-data-path level: one folder per --exp-name
        raise DiReInputError(f"distilled set {p} holds SRe2L runs ({', '.join(runs[:3])}{' ...' if len(runs) > 3 else ''}): "
                             f"pass one of them")
    labels, notes = _match_folder_names(p, [f.name for f in folders], real_classes)
    return _folder_set(p, name, "imagefolder", folders, labels, real_classes, notes)


def _match_folder_names(p: Path, names: List[str], real_classes: Sequence[str]) -> Tuple[List[int], List[str]]:
    index = {c: i for i, c in enumerate(real_classes)}
    if all(n in index for n in names):
        return [index[n] for n in names], []
    if len(names) == len(real_classes):
        # Same count, other names (e.g. class0..classN beside wnids): ImageFolder's sorted order
        # is the label order on both sides.
        return list(range(len(names))), [f"{p.name}: class folder names differ from the real set's; matched in sorted order"]
    unknown = [n for n in names if n not in index]
    raise DiReInputError(
        f"distilled set {p}: its {len(names)} class folders do not match the real set's {len(real_classes)} classes "
        f"(not in the real set: {', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''})"
    )


def _folder_set(p: Path, name: str, layout: str, folders: List[Path], labels: List[int],
                real_classes: Sequence[str], notes: List[str]) -> DistilledSet:
    files: List[Path] = []
    per_file: List[int] = []
    for folder, label in zip(folders, labels):
        if not 0 <= label < len(real_classes):
            raise DiReInputError(
                f"distilled set {p}: folder {folder.name} is class {label}, but the real set has "
                f"{len(real_classes)} classes (0..{len(real_classes) - 1})"
            )
        images = _images_in(folder)
        if not images:
            raise DiReInputError(f"distilled set {p}: class folder {folder.name} has no images")
        files += images
        per_file += [label] * len(images)
    if len(set(labels)) != len(labels):
        raise DiReInputError(f"distilled set {p}: two folders map to the same class")
    return DistilledSet(name, p, layout, torch.tensor(per_file, dtype=torch.long), files=files, notes=notes)


# --- tensor files ---------------------------------------------------------------------------------


def _numpy_scalars() -> List[Any]:
    """What a file that holds numpy numbers pickles (DC-BENCH's ``res_DM_*.pt`` keeps its
    accuracies as ``np.float64`` under ``accs_all_exps``): numpy's scalar constructor, under its
    numpy 2 and numpy 1 names, and dtypes. Safe to allow: ``scalar(dtype, bytes)`` rebuilds a number
    from its bytes, and an object dtype would need globals that stay refused."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - torch needs numpy for these files anyway
        return []
    multiarray = getattr(getattr(np, "_core", None), "multiarray", None) or np.core.multiarray
    scalar = multiarray.scalar
    names = {"numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar"} - {f"{scalar.__module__}.{scalar.__qualname__}"}
    dtypes = [type(np.dtype(t)) for t in ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "?")]
    return [scalar, *((scalar, name) for name in sorted(names)), np.dtype, *dtypes]


def _torch_load(p: Path, what: str = "distilled set") -> Any:
    # Data only: a distilled set never runs code pickled into it (numpy numbers aside, which are
    # data); failures are one line naming p.
    return load_torch_file(p, what, allow=_numpy_scalars())


def _unpack(obj: Any, p: Path) -> Tuple[Any, Any, List[str]]:
    """``(images, labels, notes)`` from the loaded object, whichever of the known shapes it has."""
    if isinstance(obj, dict):
        for ki, kl in _PAIR_KEYS:
            if ki in obj and kl in obj:
                return obj[ki], obj[kl], []
        data = obj.get("data")
        if isinstance(data, (list, tuple)) and data and isinstance(data[-1], (list, tuple)) and len(data[-1]) == 2:
            note = [f"{p.name}: {len(data)} experiments stored; using the last"] if len(data) > 1 else []
            return data[-1][0], data[-1][1], note
        raise DiReInputError(f"distilled set {p} has keys {', '.join(map(str, list(obj)[:6]))}: expected images and labels")
    if isinstance(obj, (list, tuple)) and len(obj) == 2:
        return obj[0], obj[1], []
    if isinstance(obj, Tensor):
        labels_file = _mtt_labels_file(p)
        if labels_file is None:
            raise DiReInputError(f"distilled set {p} holds images but no labels: save {{'images', 'labels'}} "
                                 f"or keep MTT's labels_*.pt beside images_*.pt")
        return obj, _torch_load(labels_file, "labels of distilled set"), [f"{p.name}: labels from {labels_file.name}"]
    raise DiReInputError(f"distilled set {p} holds a {type(obj).__name__}: expected images and labels")


def _mtt_labels_file(p: Path) -> Optional[Path]:
    m = _MTT_IMAGES.match(p.stem)
    if m is None:
        return None
    candidate = p.with_name(f"labels_{m.group(1)}{p.suffix}")
    return candidate if candidate.is_file() else None


def _load_tensor_file(p: Path, real_classes: Sequence[str], name: str) -> DistilledSet:
    if p.suffix.lower() in IMAGE_SUFFIXES:
        raise DiReInputError(f"distilled set {p} is a single image: pass the folder that holds the set")
    images, labels, notes = _unpack(_torch_load(p), p)
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise DiReInputError(f"distilled set {p}: images must be a float tensor [N, C, H, W], got {shape}")
    if images.shape[0] == 0:
        raise DiReInputError(f"distilled set {p} is empty")
    if images.shape[1] != 3:
        raise DiReInputError(f"distilled set {p}: images have {images.shape[1]} channels, the extractor takes 3")
    if not bool(torch.isfinite(images).all()):
        raise DiReInputError(f"distilled set {p}: images contain NaN or Inf values")
    labels = _hard_labels(labels, p, notes)
    if labels.numel() != images.shape[0]:
        raise DiReInputError(f"distilled set {p}: {images.shape[0]} images but {labels.numel()} labels")
    bad = labels[(labels < 0) | (labels >= len(real_classes))]
    if bad.numel():
        raise DiReInputError(f"distilled set {p}: label {int(bad[0])} is not a class of the real set "
                             f"({len(real_classes)} classes, 0..{len(real_classes) - 1})")
    # Class-major order like the folder layouts, so batches and plots group classes together.
    order = torch.sort(labels, stable=True).indices
    return DistilledSet(name, p, "tensor", labels[order], images=images.detach()[order].contiguous(), notes=notes)


def _hard_labels(labels: Any, p: Path, notes: List[str]) -> Tensor:
    if not isinstance(labels, Tensor):
        try:
            labels = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError):
            raise DiReInputError(f"distilled set {p}: labels are a {type(labels).__name__}, not a tensor") from None
    if labels.dim() == 2:
        # Soft labels [N, K] (RDED-style relabelling): the class is the most likely one.
        notes.append(f"{p.name}: soft labels, class = argmax")
        return labels.argmax(1).long()
    if labels.dim() != 1:
        raise DiReInputError(f"distilled set {p}: labels must be [N] (or soft [N, K]), got {tuple(labels.shape)}")
    if labels.is_floating_point() and not bool((labels == labels.round()).all()):
        raise DiReInputError(f"distilled set {p}: labels are not whole numbers")
    return labels.long()
