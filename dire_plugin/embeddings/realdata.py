"""Real training images for the bank: checked before any work starts, preprocessed the way the
upstream script's teacher saw them, and fingerprinted by what the loader will read.

* :func:`check_real_data`: one :class:`~dire_plugin.errors.DiReInputError` line for a folder that
  cannot be the teacher's real data (missing, no class folders, a class without images, a first
  image that does not decode, an image name that is no regular file, the wrong class count,
  torchvision's CIFAR files missing). Opens one image per class, so it is cheap enough at
  ImageNet scale to run at every start.
* :func:`real_data_loader`: the DataLoader for the bank; an image that fails to decode while the
  bank is built is one line naming it, and one that is no regular file (a FIFO would block the
  loader) is refused before any is opened.
* :func:`data_fingerprint`: the ``dataset_id`` of the bank's cache key: every file the loader
  reads, its class, size and mtime, so data changed in place is a cache miss, never a stale hit.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import sys
from array import array
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

from ..errors import DiReInputError

__all__ = [
    "RealDataSpec", "CIFAR_FOLDERS", "real_data_loader", "check_real_data", "data_fingerprint", "torchvision_cifar_root",
    "open_torchvision_cifar",
]

@dataclass(frozen=True)
class RealDataSpec:
    """How the upstream script preprocesses real images, so the bank sees what the teacher saw.

    ``kind``: ``"cifar10"``, ``"cifar100"`` (torchvision layout, or an ImageFolder) or
    ``"imagefolder"``. ``resize``/``crop`` follow torchvision's Resize/CenterCrop.
    """

    kind: str
    crop: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    resize: Optional[int] = None


#: The folder torchvision keeps each CIFAR in, inside the root it is given.
CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_CIFAR_CLASSES = {"cifar10": 10, "cifar100": 100}
_CIFAR_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}

#: A teacher's class count, several (the scripts one of which will run), or None (not checked).
NumClasses = Union[int, Collection, None]

logger = logging.getLogger("dire")

# (path, size, mtime_ns) → (width, height) of images that decoded here: dire-apply checks the data
# once per covered script and the loader checks it again, and the same unchanged file need not be
# decoded twice.
_DECODED: Dict[Tuple[str, int, int], Tuple[int, int]] = {}
# (real data folder, crop) already warned about as smaller than the crop: once per process.
_WARNED_SMALL: Set[Tuple[str, int]] = set()


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


def _cifar_class(kind: str) -> Any:
    from torchvision import datasets

    return datasets.CIFAR100 if kind == "cifar100" else datasets.CIFAR10


def _cifar_files(cls: Any) -> List[Tuple[str, Optional[str]]]:
    """``(name, md5)`` of every file torchvision's CIFAR opens: it checks train and test even
    for one split, and reads the meta file."""
    return [tuple(f) for f in cls.train_list + cls.test_list] + [(cls.meta["filename"], cls.meta.get("md5"))]


def _cifar_expected(kind: str) -> str:
    cls = _cifar_class(kind)
    names = ", ".join(name for name, _ in _cifar_files(cls))
    return (f"expected torchvision's {_CIFAR_NAMES[kind]} files {names}, as extracted from {cls.filename}; "
            "dire-plugin never downloads data")


def _missing_cifar_files(folder: Path, kind: str) -> List[str]:
    return [name for name, _ in _cifar_files(_cifar_class(kind)) if not (folder / name).is_file()]


def _cifar_problem(root: Path, kind: str) -> str:
    """Why torchvision refused the CIFAR at ``root``, naming the file (only called on failure)."""
    from torchvision.datasets.utils import check_integrity

    folder = Path(root) / CIFAR_FOLDERS[kind]
    missing = _missing_cifar_files(folder, kind)
    if missing:
        return f"{folder}: {', '.join(missing)} missing ({_cifar_expected(kind)})"
    for name, md5 in _cifar_files(_cifar_class(kind)):
        if not check_integrity(str(folder / name), md5):
            return (f"{folder}: {name} is corrupt, its MD5 sum is not the published one "
                    f"({_cifar_expected(kind)})")
    return f"{folder}: torchvision cannot read these {_CIFAR_NAMES[kind]} files ({_cifar_expected(kind)})"


def open_torchvision_cifar(root: Path, kind: str, train: bool, transform: Any = None) -> Any:
    """torchvision's CIFAR dataset at ``root``; its files are checked against their published
    MD5 sums before they are unpickled, and a missing or corrupt one is a one-line input error
    naming the folder and the file (never torchvision's advice to download)."""
    try:
        return _cifar_class(kind)(str(root), train=train, download=False, transform=transform)
    except RuntimeError:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        raise DiReInputError(_cifar_problem(Path(root), kind)) from None


def _read_image(path: str) -> Any:
    """The dataset's image loader: torchvision's, with a failure as one line naming the file.

    Module level, so DataLoader workers can pickle it.
    """
    from torchvision.datasets.folder import default_loader

    try:
        return default_loader(path)
    except Exception as e:  # PIL raises OSError, SyntaxError, struct.error, ... for damaged files
        text = str(e).strip().splitlines()
        reason = f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
        raise DiReInputError(f"real image {path} cannot be read ({reason}): replace or remove it") from None


def _not_regular(path: os.PathLike, mode: int) -> DiReInputError:
    """The refusal of an image name that is no regular file: opening a FIFO for reading blocks
    until a writer comes, so the loader is never allowed to try."""
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
             (stat.S_ISBLK, "a device"))
    kind = next((name for test, name in kinds if test(mode)), "not a regular file")
    return DiReInputError(f"real image {path} is {kind}, not an image file: remove it from the real data")


def _check_decodes(path: Path) -> Tuple[int, int]:
    """``(width, height)`` of the image at ``path``, or one line naming it when it cannot be one."""
    try:
        st = path.stat()
    except OSError as e:  # e.g. a dangling link, which the loader lists as an image too
        raise DiReInputError(f"real image {path} cannot be read ({e.strerror or e}): replace or remove it") from None
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(path, st.st_mode)
    if st.st_size == 0:
        raise DiReInputError(f"real image {path} is an empty file (0 bytes): replace or remove it")
    seen = (str(path), st.st_size, st.st_mtime_ns)
    if seen not in _DECODED:
        _DECODED[seen] = _read_image(str(path)).size
    return _DECODED[seen]


def _image_suffixes() -> Tuple[str, ...]:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return tuple(IMG_EXTENSIONS)


def _first_image(folder: Path, suffixes: Tuple[str, ...]) -> Optional[Path]:
    """The first image ImageFolder lists in a class folder (it walks ``sorted(os.walk(...))``,
    following links), or ``None``: one directory listing unless the images sit in subfolders."""
    names: List[str] = []
    has_subfolders = False
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir():
                has_subfolders = True
            elif entry.name.lower().endswith(suffixes):
                # The listing's file types cost no extra call; a link is left to the stat of the
                # decode check and of the fingerprint, which follow it.
                if not entry.is_file() and not entry.is_symlink():
                    raise _not_regular(Path(entry.path), entry.stat(follow_symlinks=False).st_mode)
                names.append(entry.name)
    if names:
        return folder / min(names)
    if has_subfolders:
        for root, _, files in sorted(os.walk(folder, followlinks=True)):
            images = [f for f in files if f.lower().endswith(suffixes)]
            if images:
                return Path(root) / min(images)
    return None


def _or_list(values: Sequence[int]) -> str:
    text = [str(v) for v in values]
    return text[0] if len(text) == 1 else f"{', '.join(text[:-1])} or {text[-1]}"


def _check_class_count(where: str, found: int, num_classes: NumClasses) -> None:
    if num_classes is None:
        return
    if isinstance(num_classes, int) and not isinstance(num_classes, bool):
        if found != num_classes:
            raise DiReInputError(f"{where} holds {found} classes, the teacher of this script has {num_classes}")
        return
    counts = sorted({int(n) for n in num_classes})
    if not counts:
        raise ValueError("num_classes is an empty collection: pass None to skip the class count check")
    if found not in counts:
        raise DiReInputError(
            f"{where} holds {found} classes; the covered scripts' teachers have {_or_list(counts)} classes"
        )


def _class_folders(root: Path) -> List[str]:
    # torchvision's find_classes: every folder is a class, hidden ones too.
    with os.scandir(root) as entries:
        return sorted(entry.name for entry in entries if entry.is_dir())


def check_real_data(path: os.PathLike, spec: RealDataSpec, num_classes: NumClasses = None) -> Path:
    """Refuse, in one :class:`DiReInputError` line, real data the bank could not be built from.

    Checked before anything is changed or built: ``path`` is a folder; it is torchvision's CIFAR
    layout for ``spec.kind`` with all its files present (torchvision checks their MD5 sums when
    it opens them), or holds class folders, each with an image, no image name directly in a class
    folder is a FIFO, socket or device, and the first image of each class (in the loader's order)
    decodes (the first that does not is named, before the class count is compared); and its
    class count fits ``num_classes``. For one script (``num_classes`` an int or ``None``), a
    first image smaller than ``spec.crop`` is one warning per process naming both sizes: the
    bank would upscale it.

    Args:
        path: the real training data (``--real-data``).
        spec: how the running script reads it (``spec.kind`` picks the CIFAR layout to look for).
        num_classes: the teacher's class count; a collection of counts when the script that will
            run is not known yet (any one fits; the message lists them); ``None``: not checked.

    Returns:
        ``path`` resolved.

    Cost: one directory listing per class and one image decoded per class (an image already
    decoded unchanged in this process is not decoded again).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DiReInputError(f"real data folder {p} does not exist")
    if not p.is_dir():
        raise DiReInputError(f"real data {p} is a file, not a folder")
    p = p.resolve()
    cifar = torchvision_cifar_root(p, spec.kind)
    if cifar is not None:
        root, kind = cifar
        folder = root / CIFAR_FOLDERS[kind]
        missing = _missing_cifar_files(folder, kind)
        if missing:
            raise DiReInputError(f"{folder}: {', '.join(missing)} missing ({_cifar_expected(kind)})")
        _check_class_count(f"{p} (torchvision's {_CIFAR_NAMES[kind]})", _CIFAR_CLASSES[kind], num_classes)
        return p

    try:
        classes = _class_folders(p)
    except OSError as e:
        raise DiReInputError(f"real data folder {p} cannot be listed ({e.strerror or e})") from None
    if not classes:
        expected = f"{CIFAR_FOLDERS[spec.kind]}/ (torchvision layout) or " if spec.kind in CIFAR_FOLDERS else ""
        raise DiReInputError(f"no real training data in {p}: expected {expected}one folder per class")
    suffixes = _image_suffixes()
    firsts: Dict[str, Path] = {}
    empty: List[str] = []
    for name in classes:
        try:
            first = _first_image(p / name, suffixes)
        except OSError as e:
            raise DiReInputError(f"class folder {p / name} cannot be listed ({e.strerror or e})") from None
        if first is None:
            empty.append(name)
        else:
            firsts[name] = first
    if len(empty) == len(classes):
        raise DiReInputError(
            f"real data {p} holds no images: none of its {len(classes)} class folders has a file ending in "
            f"{', '.join(suffixes)}"
        )
    if empty:
        hint = " (a hidden folder: the loader counts every folder as a class)" if empty[0].startswith(".") else ""
        more = f"; {len(empty) - 1} more class folders hold none either" if len(empty) > 1 else ""
        raise DiReInputError(f"class folder {p / empty[0]} holds no image{hint}{more}")
    # Decoded before the class count is compared: a folder of broken files is refused for them,
    # not for a count that would send the user after the wrong problem.
    sizes = {name: _check_decodes(firsts[name]) for name in classes}
    _check_class_count(str(p), len(classes), num_classes)
    if num_classes is None or isinstance(num_classes, int):  # the running script's spec, not one of many
        _warn_if_upscaled(p, spec, {firsts[name]: size for name, size in sizes.items()})
    return p


def _warn_if_upscaled(root: Path, spec: RealDataSpec, sizes: Dict[Path, Tuple[int, int]]) -> None:
    """One warning per folder and crop when a checked image is smaller than the crop the teacher
    sees: its Resize would upscale it. A warning, not a refusal: only the first image of each
    class is looked at, and a data set of mixed sizes (ImageNet has a few small images) is the
    upstream's own business."""
    path, (width, height) = min(sizes.items(), key=lambda item: min(item[1]))
    if min(width, height) >= spec.crop or (str(root), spec.crop) in _WARNED_SMALL:
        return
    _WARNED_SMALL.add((str(root), spec.crop))
    logger.warning("[dire] warning: real image %s is %dx%d px, smaller than the %d px the script's teacher sees: "
                   "the bank upscales such images to %d px (first image of each class checked); give the real "
                   "data at the teacher's resolution", path, width, height, spec.crop, spec.resize or spec.crop)


def _little_endian(values: "array") -> bytes:
    if sys.byteorder != "little":  # the same key on every machine sharing a cache folder
        values = array("q", values)
        values.byteswap()
    return values.tobytes()


def _hash_folder_samples(h: "hashlib._Hash", samples: Sequence[Tuple[str, int]], root: Path) -> None:
    # Per file only a stat and two appends: the formatting and hashing run in C over whole
    # columns, which keeps the fingerprint near the cost of ImageFolder's own listing.
    paths = [path for path, _ in samples]
    sizes, mtimes = array("q"), array("q")
    stat_file, is_regular = os.stat, stat.S_ISREG
    for path in paths:
        try:
            st = stat_file(path)
        except OSError as e:
            raise DiReInputError(f"real image {path} cannot be read ({e.strerror or e})") from None
        if not is_regular(st.st_mode):  # before any worker opens it: a FIFO would block the build
            raise _not_regular(path, st.st_mode)
        sizes.append(st.st_size)
        mtimes.append(st.st_mtime_ns)
    # Paths relative to root (NUL cannot occur in a path), so the same tree elsewhere gives the
    # same key; in chunks, so ImageNet's 1.28 M paths are never one 100 MB string.
    prefix = "\0" + os.path.join(str(root), "")
    for i in range(0, len(paths), 65536):
        joined = ("\0" + "\0".join(paths[i:i + 65536])).replace(prefix, "\0")
        h.update(joined.encode("utf-8", "surrogateescape"))
    h.update(b"\0targets")
    h.update(_little_endian(array("q", [target for _, target in samples])))
    h.update(b"\0sizes")
    h.update(_little_endian(sizes))
    h.update(b"\0mtimes")
    h.update(_little_endian(mtimes))


def data_fingerprint(dataset: Any, root: os.PathLike, kind: str) -> str:
    """The ``dataset_id`` for the bank's cache key: ``"KIND:N:SHA256"`` over what the loader reads.

    For an ImageFolder (any dataset with torchvision's ``samples`` list): the class names and, per
    sample, its path relative to ``root``, class index, size and ``st_mtime_ns`` (one ``stat``
    per file, no file opened). For torchvision's CIFAR: the split, class names and the name,
    size and mtime of each of its files. Images moved between classes, added, removed, renamed or
    rewritten (size or mtime) change it.

    Args:
        dataset: what the loader iterates (``loader.dataset``).
        root: the folder the dataset was opened at; sample paths are hashed relative to it (to
            the dataset's own ``.root`` where it has one, as torchvision's datasets do).
        kind: ``RealDataSpec.kind``.
    """
    h = hashlib.sha256(b"dire-real-data-1")
    header: Dict[str, Any] = {"kind": kind, "classes": [str(c) for c in getattr(dataset, "classes", [])]}
    samples = getattr(dataset, "samples", None)
    if samples is not None:
        header["layout"] = "folder"
        h.update(json.dumps(header, sort_keys=True).encode())
        # ImageFolder joins its sample paths onto its own .root, however the caller spells root.
        _hash_folder_samples(h, samples, Path(getattr(dataset, "root", None) or root))
    elif all(hasattr(dataset, a) for a in ("base_folder", "train_list", "test_list", "meta", "root")):
        header.update(layout="torchvision-cifar", train=bool(getattr(dataset, "train", True)))
        folder = Path(dataset.root) / dataset.base_folder
        files = []
        for name, _ in _cifar_files(dataset):
            try:
                st = (folder / name).stat()
            except OSError as e:
                raise DiReInputError(f"{folder / name}: {e.strerror or e} ({_cifar_expected(kind)})") from None
            files.append([name, st.st_size, st.st_mtime_ns])
        header["files"] = files
        h.update(json.dumps(header, sort_keys=True).encode())
    else:
        raise DiReInputError(
            f"cannot fingerprint a {type(dataset).__name__}: the bank cache knows ImageFolder-style "
            "datasets (a samples list) and torchvision's CIFAR"
        )
    return f"{kind}:{len(dataset)}:{h.hexdigest()}"


def real_data_loader(
    path: os.PathLike, spec: RealDataSpec, num_classes: int, batch_size: int = 256, workers: int = 2
) -> Tuple[Any, str, str]:
    """``(loader, dataset_id, transform_id)`` over the training images, labels as the teacher's.

    The data is checked first (:func:`check_real_data`). ImageFolder sorts class folders by name,
    which is the label order torchvision's ImageNet and the SRe²L Tiny-ImageNet teachers were
    trained with; CIFAR uses torchvision's own dataset, whose files are checked against their
    published MD5 sums before they are unpickled. ``dataset_id`` is :func:`data_fingerprint`.
    """
    import torch
    from torchvision import datasets, transforms

    root = check_real_data(path, spec, num_classes)
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
        dataset_id = data_fingerprint(dataset, cifar[0], spec.kind)
    else:
        dataset = datasets.ImageFolder(str(root), transform=transform, loader=_read_image)
        dataset_id = data_fingerprint(dataset, root, spec.kind)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         multiprocessing_context=_worker_start(workers))
    return loader, dataset_id, repr(transform)


def _worker_start(workers: int) -> Optional[str]:
    """How the loader's workers start: by fork where there is one, whatever the script made the
    default. G-VBSM sets ``spawn`` for its own workers; spawned loader workers are fresh
    interpreters that import torch and switch DiRe on again (:mod:`dire_plugin.upstream.children`),
    tens of seconds per bank on a busy CPU, to decode a few images."""
    import multiprocessing

    return "fork" if workers and "fork" in multiprocessing.get_all_start_methods() else None
