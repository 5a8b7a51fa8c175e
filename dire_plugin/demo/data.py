"""The demo's data: scikit-learn's bundled digits (no download, works offline), or CIFAR-10/100
from a folder the user has.

Pixels are 8-bit throughout: digits are quantised once, at load time, so that the tensors the
teacher trains on and the PNGs the DiRe bank reads (through ImageFolder) hold exactly the same
values; CIFAR is 8-bit already.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ..errors import DiReInputError
from ..embeddings.realdata import CIFAR_FOLDERS, open_torchvision_cifar, torchvision_cifar_root
from .cache import cached_folder
from .spec import DATASETS, DIGITS, SPLIT_SEED, TEST_SIZE, DatasetSpec

__all__ = ["DemoData", "TensorSet", "check_data", "class_sampler", "check_images_per_class", "digits_sets", "load_data", "load_digits_split",
           "load_cifar", "normalise", "denormalise", "real_subset", "write_image_folder"]

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


class TensorSet(torch.utils.data.Dataset):
    """Normalised images ``[N, 3, H, W]`` and int64 labels, one tensor each (``.images``,
    ``.labels``): how the demo's DM and MTT scripts hold the digits, as MTT's ``utils`` holds a
    whitened training set. The DM and MTT captures read a training set of this shape."""

    def __init__(self, images: Tensor, labels: Tensor, classes: int) -> None:
        self.images = images.detach().float()
        self.labels = labels.detach().long()
        self.classes = [str(c) for c in range(classes)]

    def __getitem__(self, index: int) -> Tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]

    def __len__(self) -> int:
        return self.images.shape[0]


def class_sampler(dataset: Any, num_classes: int, device: Any = "cpu") -> Callable[[int, int], Tensor]:
    """``get_images(c, n)``: ``n`` random training images of class ``c`` (a draw of numpy's global
    generator, as DC-BENCH's and MTT's scripts make it), from the whole ``dataset`` stacked once on
    ``device``: how the demo's DM and MTT scripts take real batches and real initial images."""
    images_all = torch.stack([dataset[i][0] for i in range(len(dataset))]).to(device)
    labels_all = [int(dataset[i][1]) for i in range(len(dataset))]
    indices_class = [[i for i, label in enumerate(labels_all) if label == c] for c in range(num_classes)]

    def get_images(c: int, n: int) -> Tensor:
        return images_all[np.random.permutation(indices_class[c])[:n]]

    return get_images


def digits_sets() -> Tuple[TensorSet, TensorSet]:
    """The demo's digits split as ``(train, test)`` :class:`TensorSet` s: the same images and
    normalisation as :func:`load_data` gives the teacher and the pipeline."""
    xtr, xte, ytr, yte = load_digits_split()
    return tuple(TensorSet(normalise(x, DIGITS), torch.from_numpy(y).long(), DIGITS.num_classes)
                 for x, y in ((xtr, ytr), (xte, yte)))


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


def _source_key(images: np.ndarray, labels: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in (np.ascontiguousarray(images), np.ascontiguousarray(labels, dtype=np.int64)):
        h.update(f"{a.shape}:{a.dtype};".encode())
        h.update(a)
    return h.hexdigest()


def write_image_folder(root: os.PathLike, images: np.ndarray, labels: np.ndarray) -> Path:
    """``[N, H, W, 3]`` uint8 images as ``root/{class}/{i:04d}.png``, written once and checked on
    every use (:func:`~.cache.cached_folder`, keyed on the images and labels): an interrupted run
    never leaves a half folder that a later run (or the bank's cache key, which counts images)
    would trust; a damaged one is rebuilt with one warning line."""
    from PIL import Image

    def write(folder: Path) -> None:
        for i, (img, c) in enumerate(zip(images, labels.tolist())):
            (folder / str(c)).mkdir(exist_ok=True)
            Image.fromarray(img, mode="RGB").save(folder / str(c) / f"{i:04d}.png")

    return cached_folder(root, _source_key(images, labels), write, "image cache")[0]
