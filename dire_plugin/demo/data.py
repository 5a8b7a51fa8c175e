"""The demo's data: scikit-learn's bundled digits (no download, works offline), or CIFAR-10/100
from a folder the user has.

Pixels are 8-bit throughout: digits are quantised once, at load time, so that the tensors the
teacher trains on and the PNGs the DiRe bank reads (through ImageFolder) hold exactly the same
values; CIFAR is 8-bit already.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ..errors import DiReInputError
from ..embeddings.realdata import CIFAR_FOLDERS, open_torchvision_cifar, torchvision_cifar_root
from .log import warn
from .spec import DATASETS, DIGITS, SPLIT_SEED, TEST_SIZE, DatasetSpec

__all__ = ["DemoData", "check_data", "check_images_per_class", "load_data", "load_digits_split", "load_cifar", "normalise", "denormalise", "real_subset",
           "write_image_folder"]

@dataclass(frozen=True)
class DemoData:
    """A train/test split as normalised ``[N, 3, H, W]`` float tensors and int64 labels, and the
    folder the DiRe bank reads the same training images from (``dire-run --real-data``)."""

    spec: DatasetSpec
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    real_dir: Path
    source: str


def _stats(spec: DatasetSpec, device: torch.device) -> Tuple[Tensor, Tensor]:
    return (torch.tensor(spec.mean, device=device).view(1, 3, 1, 1),
            torch.tensor(spec.std, device=device).view(1, 3, 1, 1))


def normalise(pixels: np.ndarray, spec: DatasetSpec) -> Tensor:
    """``[N, H, W, 3]`` uint8 → ``[N, 3, H, W]`` float, normalised with the dataset's statistics."""
    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float().div_(255.0)
    mean, std = _stats(spec, x.device)
    return ((x - mean) / std).contiguous()


def denormalise(x: Tensor, spec: DatasetSpec) -> Tensor:
    """Normalised images → pixel values in [0, 1]."""
    mean, std = _stats(spec, x.device)
    return (x * std + mean).clamp(0, 1)


def load_digits_split() -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """1,797 digits → 1,347 train / 450 test, stratified with seed 0: ``[N, 8, 8, 3]`` uint8 + labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # Digits hold 0..16: map to 8-bit like a PNG would store them; grey replicated to RGB.
    u8 = np.repeat(np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None], 3, axis=3)
    return tuple(train_test_split(u8, digits.target, test_size=TEST_SIZE, stratify=digits.target,
                                  random_state=SPLIT_SEED))


def _read_image_folder(root: Path, size: int) -> Tuple[np.ndarray, np.ndarray, int]:
    """``root/{class}/*`` → ``[N, size, size, 3]`` uint8, labels in sorted-folder order (ImageFolder's)."""
    from PIL import Image
    from torchvision.datasets.folder import IMG_EXTENSIONS

    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            if path.suffix.lower() in IMG_EXTENSIONS:
                with Image.open(path) as img:
                    img = img.convert("RGB")
                    if img.size != (size, size):
                        raise DiReInputError(f"{path}: {img.size[0]}x{img.size[1]} pixels, CIFAR images are {size}x{size}")
                    images.append(np.asarray(img))
                labels.append(label)
    if not images:
        raise DiReInputError(f"no images in {root}")
    return np.stack(images), np.asarray(labels), len(classes)


def _read_torchvision(root: Path, spec: DatasetSpec, train: bool) -> Tuple[np.ndarray, np.ndarray, int]:
    ds = open_torchvision_cifar(root, spec.name, train)
    return np.asarray(ds.data), np.asarray(ds.targets), len(ds.classes)


def locate_cifar(spec: DatasetSpec, path: os.PathLike) -> Tuple[Path, bool]:
    """``(root, torchvision layout?)`` of the CIFAR in ``path``, or a clear error: checked before
    the demo writes anything."""
    p = Path(path).expanduser().resolve()
    if not p.is_dir():
        raise DiReInputError(f"--data-path {p} does not exist")
    cifar = torchvision_cifar_root(p, spec.name)
    if cifar is not None:
        return cifar[0], True
    if (p / "train").is_dir() and (p / "test").is_dir():
        return p, False
    raise DiReInputError(f"no {spec.name} in {p}: expected {CIFAR_FOLDERS[spec.name]}/ (torchvision layout) or "
                         "train/ and test/ with one folder per class")


def load_cifar(spec: DatasetSpec, path: os.PathLike) -> DemoData:
    """CIFAR from ``path``: torchvision's layout (``path/cifar-10-batches-py``, or that folder
    itself) or ImageFolders ``path/train/{class}/`` and ``path/test/{class}/``."""
    p, torchvision_layout = locate_cifar(spec, path)
    if torchvision_layout:
        parts = [_read_torchvision(p, spec, train) for train in (True, False)]
        real_dir, source = p, f"torchvision {spec.name} in {p / CIFAR_FOLDERS[spec.name]}"
    else:
        parts = [_read_image_folder(p / split, spec.image_size) for split in ("train", "test")]
        real_dir, source = p / "train", f"{spec.name} ImageFolders in {p}/train and {p}/test"
    for (_, _, found), split in zip(parts, ("train", "test")):
        if found != spec.num_classes:
            raise DiReInputError(f"{spec.name} {split} split in {p} has {found} classes, expected {spec.num_classes}")
    (xtr, ytr, _), (xte, yte, _) = parts
    return DemoData(spec, normalise(xtr, spec), torch.from_numpy(ytr).long(), normalise(xte, spec),
                    torch.from_numpy(yte).long(), real_dir, source)


def check_data(dataset: str, data_path: Optional[os.PathLike] = None) -> None:
    """Refuse a dataset the demo cannot find, before anything is written."""
    spec = DATASETS[dataset]
    if spec is not DIGITS:
        if data_path is None:
            raise DiReInputError(f"--dataset {dataset} needs --data-path DIR (torchvision layout or train/ and test/ ImageFolders)")
        locate_cifar(spec, data_path)


def load_data(dataset: str, data_path: Optional[os.PathLike] = None, cache_dir: Optional[os.PathLike] = None) -> DemoData:
    """The demo's data: digits (written once as an ImageFolder under ``cache_dir`` for the bank)
    or CIFAR from ``data_path``."""
    spec = DATASETS[dataset]
    check_data(dataset, data_path)
    if spec is not DIGITS:
        return load_cifar(spec, data_path)
    xtr, xte, ytr, yte = load_digits_split()
    real_dir = write_image_folder(Path(cache_dir) / "digits-train", xtr, ytr)
    return DemoData(spec, normalise(xtr, spec), torch.from_numpy(ytr).long(), normalise(xte, spec),
                    torch.from_numpy(yte).long(), real_dir, f"scikit-learn digits (real images for the bank in {real_dir})")


def check_images_per_class(data: DemoData, ipc: int) -> None:
    """Every class needs ``ipc`` real training images (the reference row) and at least one test
    image; an empty class would also leave the DiRe bank without a target."""
    for split, labels in (("training", data.train_y), ("test", data.test_y)):
        counts = torch.bincount(labels, minlength=data.spec.num_classes)
        need = ipc if split == "training" else 1
        if int(counts.min()) < need:
            c = int(counts.argmin())
            raise DiReInputError(f"class {c} has {int(counts[c])} {split} images in {data.source}; "
                                 f"{'--ipc ' + str(ipc) if need > 1 else 'the test split'} needs {need}")


def real_subset(data: DemoData, ipc: int, seed: int) -> Tuple[Tensor, Tensor]:
    """``ipc`` random training images per class (the reference row of the report)."""
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in range(data.spec.num_classes):
        idx = torch.nonzero(data.train_y == c).flatten()
        picks.append(idx[torch.randperm(len(idx), generator=g)[:ipc]])
    idx = torch.cat(picks)
    return data.train_x[idx], data.train_y[idx]


#: The marker a finished image folder holds: what it was written from and a checksum of each file.
_MARKER = ".complete"
_MARKER_FORMAT = 2


def _source_key(images: np.ndarray, labels: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in (np.ascontiguousarray(images), np.ascontiguousarray(labels, dtype=np.int64)):
        h.update(f"{a.shape}:{a.dtype};".encode())
        h.update(a)
    return h.hexdigest()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _folder_problem(root: Path, source: str) -> Optional[str]:
    """Why the image folder at ``root`` cannot be used for ``source`` (``"missing"`` when there
    is none), or ``None`` when every file is there, unchanged, and nothing else is."""
    if not root.exists() and not root.is_symlink():
        return "missing"
    if not root.is_dir():
        return "is not a folder"
    try:
        marker = json.loads((root / _MARKER).read_text())
    except FileNotFoundError:
        return f"has no {_MARKER} marker (an interrupted write?)"
    except (OSError, ValueError) as e:  # a folder in its place, bytes that are not JSON, ...
        return f"has an unreadable {_MARKER} marker ({type(e).__name__})"
    if not isinstance(marker, dict) or marker.get("format") != _MARKER_FORMAT or not isinstance(marker.get("files"), dict):
        return "was written by an older version of the demo"
    if marker.get("source") != source:
        return "was written from other images"
    expected = marker["files"]
    try:
        present = {p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir()} - {_MARKER}
        folders = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_dir()}
        # An empty class folder would be one more class to ImageFolder; a stray file, one more image.
        extra = sorted(present - set(expected)) + sorted(folders - {name.split("/")[0] for name in expected})
        if extra:
            return f"holds {extra[0]}, which the demo did not write"
        for name, digest in expected.items():
            path = root / name
            if not path.is_file():
                return f"lacks {name}"
            if _sha256(path) != digest:
                return f"holds a damaged {name}"
    except OSError as e:
        return f"cannot be read ({e.strerror or type(e).__name__})"
    return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_image_folder(root: os.PathLike, images: np.ndarray, labels: np.ndarray) -> Path:
    """``[N, H, W, 3]`` uint8 images as ``root/{class}/{i:04d}.png``, written once and checked on
    every use: the marker keys the folder on the images and labels it was written from and holds a
    checksum of each file. A folder that is not exactly what was written (a damaged, missing or
    stray file, an unreadable marker, other images) is rebuilt with one warning line.

    Written to a temporary sibling and renamed, so an interrupted run never leaves a half
    folder that a later run (or the bank's cache key, which counts images) would trust.
    """
    from PIL import Image

    root = Path(root)
    source = _source_key(images, labels)
    problem = _folder_problem(root, source)
    if problem is None:
        return root
    if problem != "missing":
        warn(f"image cache {root} {problem}; rebuilding it")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
    try:
        files: Dict[str, str] = {}
        for i, (img, c) in enumerate(zip(images, labels.tolist())):
            folder = tmp / str(c)
            folder.mkdir(exist_ok=True)
            Image.fromarray(img, mode="RGB").save(folder / f"{i:04d}.png")
            files[f"{c}/{i:04d}.png"] = _sha256(folder / f"{i:04d}.png")
        (tmp / _MARKER).write_text(json.dumps({"format": _MARKER_FORMAT, "source": source, "files": files}))
        _remove(root)
        try:
            os.replace(tmp, root)
        except OSError:
            # Another demo sharing the cache renamed its copy in first: use it if it is sound.
            if _folder_problem(root, source) is not None:
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return root
