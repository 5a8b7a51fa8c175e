"""Real training images for the bank, preprocessed the way the upstream script's teacher saw them."""
from __future__ import annotations

import os
from pathlib import Path


from typing import Optional, Tuple

from .errors import DiReInputError
from .patching import RealDataSpec

__all__ = ["CIFAR_FOLDERS", "real_data_loader", "check_real_data", "torchvision_cifar_root", "open_torchvision_cifar"]

#: The folder torchvision keeps each CIFAR in, inside the root it is given.
CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def torchvision_cifar_root(path: Path, kind: Optional[str] = None) -> Optional[Tuple[Path, str]]:
    """``(root for torchvision, kind)`` when ``path`` is torchvision's CIFAR layout (the folder
    holding ``cifar-10-batches-py``, or that folder itself), looking for ``kind`` only when given
    (a kind that is no CIFAR finds none); ``None`` otherwise."""
    for k, folder in CIFAR_FOLDERS.items():
        if kind not in (None, k):
            continue
        if path.name == folder:
            return path.parent, k
        if (path / folder).is_dir():
            return path, k
    return None


def open_torchvision_cifar(root: Path, kind: str, train: bool, transform=None):
    """torchvision's CIFAR dataset at ``root``; its files are checked against their published
    MD5 sums before they are unpickled, and a missing or corrupt one is a one-line input error."""
    from torchvision import datasets

    cls = datasets.CIFAR100 if kind == "cifar100" else datasets.CIFAR10
    try:
        return cls(str(root), train=train, download=False, transform=transform)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise DiReInputError(f"{root / CIFAR_FOLDERS[kind]}: {e}") from None


def _has_class_folders(path: Path) -> bool:
    return any(p.is_dir() and not p.name.startswith(".") for p in path.iterdir())


def check_real_data(path: os.PathLike, spec: RealDataSpec) -> Path:
    """Refuse a path that cannot hold the real data, before anything is changed or built."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise DiReInputError(f"real data folder {p} does not exist")
    if torchvision_cifar_root(p, spec.kind) is None and not _has_class_folders(p):
        expected = f"{CIFAR_FOLDERS[spec.kind]}/ (torchvision layout) or " if spec.kind in CIFAR_FOLDERS else ""
        raise DiReInputError(f"no real training data in {p}: expected {expected}one folder per class")
    return p.resolve()


def real_data_loader(path: os.PathLike, spec: RealDataSpec, num_classes: int, batch_size: int = 256, workers: int = 2):
    """``(loader, dataset_id, transform_id)`` over the training images, labels as the teacher's.

    ImageFolder sorts class folders by name, which is the label order torchvision's ImageNet and
    the SRe²L Tiny-ImageNet teachers were trained with; CIFAR uses torchvision's own dataset,
    whose files are checked against their published MD5 sums before they are unpickled.
    """
    import torch
    from torchvision import datasets, transforms

    root = check_real_data(path, spec)
    steps = [
        transforms.Resize(spec.resize or spec.crop),
        transforms.CenterCrop(spec.crop),
        transforms.ToTensor(),
        transforms.Normalize(spec.mean, spec.std),
    ]
    transform = transforms.Compose(steps)
    cifar = torchvision_cifar_root(root, spec.kind)
    if cifar is not None:
        dataset = open_torchvision_cifar(cifar[0], spec.kind, train=True, transform=transform)
    else:
        dataset = datasets.ImageFolder(str(root), transform=transform)
    found = len(dataset.classes)
    if found != num_classes:
        raise DiReInputError(f"{root} holds {found} classes, the teacher of this script has {num_classes}")
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    dataset_id = f"{spec.kind}:{root}:{len(dataset)}"
    return loader, dataset_id, repr(transform)
