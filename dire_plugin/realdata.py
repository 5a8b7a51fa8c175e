"""Real training images for the bank, preprocessed the way the upstream script's teacher saw them."""
from __future__ import annotations

import os
from pathlib import Path


from .errors import DiReInputError
from .patching import RealDataSpec

__all__ = ["real_data_loader", "check_real_data"]

_CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def _has_class_folders(path: Path) -> bool:
    return any(p.is_dir() and not p.name.startswith(".") for p in path.iterdir())


def check_real_data(path: os.PathLike, spec: RealDataSpec) -> Path:
    """Refuse a path that cannot hold the real data, before anything is changed or built."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise DiReInputError(f"real data folder {p} does not exist")
    torchvision_layout = spec.kind in _CIFAR_FOLDERS and (
        (p / _CIFAR_FOLDERS[spec.kind]).is_dir() or p.name == _CIFAR_FOLDERS[spec.kind]
    )
    if not torchvision_layout and not _has_class_folders(p):
        expected = f"{_CIFAR_FOLDERS[spec.kind]}/ (torchvision layout) or " if spec.kind in _CIFAR_FOLDERS else ""
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
    folder = _CIFAR_FOLDERS.get(spec.kind)
    if folder and ((root / folder).is_dir() or root.name == folder):
        base = root.parent if root.name == folder else root
        cls = datasets.CIFAR100 if spec.kind == "cifar100" else datasets.CIFAR10
        try:
            dataset = cls(str(base), train=True, download=False, transform=transform)
        except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
            raise DiReInputError(f"{base / folder}: {e}") from None
        found = len(dataset.classes)
    else:
        dataset = datasets.ImageFolder(str(root), transform=transform)
        found = len(dataset.classes)
    if found != num_classes:
        raise DiReInputError(f"{root} holds {found} classes, the teacher of this script has {num_classes}")
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    dataset_id = f"{spec.kind}:{root}:{len(dataset)}"
    return loader, dataset_id, repr(transform)
