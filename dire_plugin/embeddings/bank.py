"""The real-image embedding bank DiRe pulls towards, grouped by class.

:class:`RealEmbeddingBank` is built once per run (optionally cached on disk, keyed by everything
that determines its content, with a checksum of its tensors verified on every load) and keeps a
packed copy per device, so the loss never re-packs it. The memory of finished synthetic
embeddings lives in :mod:`.memory`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..errors import DiReInputError
from ..regularizer.grouped import PackedEmbeddings
from ..regularizer.kernels import DEFAULT_EPS
from .capture import EmbeddingCapture, resolve_layer, unwrap_model
from .collectives import all_gather_json, all_gather_rows, differences, world
from .isolation import private_forward
from ..io.digest import hash_tensor, tensors_sha256
from ..io.files import atomic_torch_save, load_torch_file

__all__ = ["RealEmbeddingBank", "CACHE_FORMAT", "embed_images"]

logger = logging.getLogger("dire")

#: Version of the on-disk bank layout; part of the cache key, so a new layout never reads an old file.
#: 2: a sha256 of the tensors is stored and verified on load.
CACHE_FORMAT = 2

_STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

PathLike = Union[str, "os.PathLike[str]"]


def _class_seed(seed: int, c: int) -> int:
    # One generator per class, so a class's subset does not depend on which other classes exist.
    return int.from_bytes(hashlib.sha256(f"{seed}:{c}".encode()).digest()[:8], "little") >> 1


def _nonfinite_rows(rows: Tensor) -> Tensor:
    """Sorted indices of the rows of ``rows [N, D]`` that hold a NaN or an Inf.

    Exact, but elementwise only where needed: a NaN or Inf always makes its row's sum NaN or Inf,
    so only rows whose sum is not finite (those, or finite values whose sum overflows) get the
    elementwise test. On the CPU an elementwise ``isfinite`` over a whole bank costs many times
    the row sums (benchmarks/bench_bank_cache.py), and every cache hit checks the bank.
    """
    if rows.dim() != 2 or rows.shape[1] == 0:
        return torch.zeros(0, dtype=torch.long)
    suspect = (~torch.isfinite(rows.sum(1))).nonzero().reshape(-1)
    if len(suspect) == 0:
        return suspect
    return suspect[~torch.isfinite(rows[suspect]).all(1)]


def _check_classes(rows: Tensor, classes: Tensor, counts: Tensor, what: str = "real embeddings") -> None:
    """Every class non-empty, finite and not all zero, in one pass over the bank.

    A per-class check costs a sync per class (1000 for ImageNet-1K) on a bank built once.
    """
    empty = (counts < 1).nonzero()
    if len(empty):
        raise DiReInputError(f"{what} of class {int(classes[empty[0]])} are empty")
    _check_finite_by_class(rows, classes, counts)
    slot = torch.repeat_interleave(torch.arange(len(classes)), counts)
    if rows.shape[1]:
        # Exact (no sum to underflow) and no temporary copy of the bank, unlike abs().sum().
        nonzero = (rows.amax(1) != 0) | (rows.amin(1) != 0)
    else:
        nonzero = torch.zeros(rows.shape[0], dtype=torch.bool)
    mass = torch.zeros(len(classes), dtype=torch.long).index_add_(0, slot, nonzero.long())
    zero = (mass == 0).nonzero()
    if len(zero):
        raise DiReInputError(f"{what} of class {int(classes[zero[0]])} are all zero: check the captured layer")


def _sort_by_label(x: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``(rows sorted by label (stable), classes, counts)``."""
    labels = labels.reshape(-1).to(torch.long)
    order = torch.sort(labels, stable=True).indices
    classes, counts = torch.unique(labels, sorted=True, return_counts=True)
    return x[order], classes, counts


def _model_device(model: nn.Module) -> torch.device:
    for t in unwrap_model(model).parameters():
        return t.device
    for t in unwrap_model(model).buffers():
        return t.device
    return torch.device("cpu")


class RealEmbeddingBank(Mapping[int, Tensor]):
    """Real-image embeddings grouped by class: a read-only ``Mapping[int, Tensor [M_c, D]]`` on CPU.

    Build it with :meth:`build` (from a model and a labelled loader, optionally cached on disk),
    :meth:`from_tensors` or :meth:`from_mapping`. Pass it to :class:`~dire_plugin.DiReLoss` as
    ``real``; the loss uses :meth:`packed`, which is computed once per device.

    Attributes:
        cache_hit: whether :meth:`build` loaded the bank from its cache file.
        fingerprint: hex sha256 identifying the bank (the cache key for :meth:`build`, a hash of
            the contents otherwise).
    """

    def __init__(
        self,
        embeddings: Tensor,
        classes: Tensor,
        counts: Tensor,
        *,
        fingerprint: Optional[str] = None,
        cache_hit: bool = False,
        layer: Optional[str] = None,
    ) -> None:
        """Low-level constructor: ``embeddings [sum counts, D]`` sorted by class, ``classes`` sorted."""
        classes = classes.reshape(-1).to(torch.long).cpu()
        counts = counts.reshape(-1).to(torch.long).cpu()
        if embeddings.dim() != 2 or len(classes) != len(counts) or int(counts.sum()) != embeddings.shape[0]:
            raise DiReInputError(
                f"bank layout mismatch: embeddings {tuple(embeddings.shape)}, {len(classes)} classes, "
                f"{int(counts.sum())} counted rows"
            )
        if len(classes) == 0:
            raise DiReInputError("real embeddings are empty: no class has any")
        if len(classes) > 1 and not bool((classes[1:] > classes[:-1]).all()):
            raise DiReInputError("bank classes must be sorted and unique")
        self._flat = embeddings.detach().cpu()
        self._classes = classes
        self._counts = counts
        # Per-class views into the flat tensor: no copy, and the flat layout is the cache layout.
        self._rows: Dict[int, Tensor] = {
            int(c): rows for c, rows in zip(classes.tolist(), torch.split(self._flat, counts.tolist()))
        }
        _check_classes(self._flat, classes, counts)
        self._fingerprint = fingerprint
        self.cache_hit = cache_hit
        self.layer = layer
        self._packed: Dict[torch.device, PackedEmbeddings] = {}

    # ----- Mapping -----
    def __getitem__(self, c: Any) -> Tensor:
        try:
            return self._rows[int(c)]
        except (TypeError, ValueError):
            raise KeyError(c) from None

    def __iter__(self) -> Iterator[int]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    # ----- properties -----
    @property
    def classes(self) -> List[int]:
        """Sorted class ids."""
        return self._classes.tolist()

    @property
    def counts(self) -> Tensor:
        """Embeddings per class, in :attr:`classes` order (LongTensor)."""
        return self._counts.clone()

    @property
    def dim(self) -> int:
        """Width D of each embedding."""
        return int(self._flat.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype of the embeddings."""
        return self._flat.dtype

    @property
    def num_embeddings(self) -> int:
        """Embeddings over all classes."""
        return int(self._flat.shape[0])

    @property
    def fingerprint(self) -> str:
        """The cache key it was built under, else a sha256 of its contents (computed once)."""
        if self._fingerprint is None:
            self._fingerprint = tensors_sha256((self._classes, self._counts, self._flat), b"dire-bank-content")
        return self._fingerprint

    def __repr__(self) -> str:
        return (
            f"RealEmbeddingBank(classes={len(self)}, embeddings={self.num_embeddings}, dim={self.dim}, "
            f"dtype={self.dtype}, cache_hit={self.cache_hit}, fingerprint={self.fingerprint[:16]})"
        )

    def packed(self, device: Union[str, torch.device] = "cpu") -> PackedEmbeddings:
        """The bank packed for the loss on ``device`` (computed on first use, then cached)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        packed = self._packed.get(device)
        if packed is None:
            # Class by class into the device's padded tensor: no second copy of the bank.
            classes = self.classes
            packed = PackedEmbeddings.from_classes(classes, [self._rows[c] for c in classes], device, DEFAULT_EPS)
            self._packed[device] = packed
        return packed

    # ----- constructors -----
    @classmethod
    def from_tensors(cls, embeddings: Tensor, labels: Tensor, dtype: torch.dtype = torch.float32) -> "RealEmbeddingBank":
        """Bank from unsorted rows ``embeddings [N, D]`` with integer ``labels [N]``."""
        _check_dtype(dtype)
        labels = torch.as_tensor(labels).reshape(-1)
        if embeddings.dim() != 2 or embeddings.shape[0] != labels.numel():
            raise DiReInputError(f"{tuple(embeddings.shape)} embeddings do not match {labels.numel()} labels")
        rows, classes, counts = _sort_by_label(embeddings.detach().cpu(), labels.cpu())
        _check_finite_by_class(rows, classes, counts)
        return cls(_to_storage(rows, dtype), classes, counts)

    @classmethod
    def from_mapping(cls, mapping: Mapping, dtype: Optional[torch.dtype] = None) -> "RealEmbeddingBank":
        """Bank from ``{class: [M_c, D]}``; ``dtype`` defaults to the tensors' common dtype."""
        if len(mapping) == 0:
            raise DiReInputError("real embeddings are empty: no class has any")
        keys = sorted(mapping, key=int)
        for c in keys:
            if not isinstance(mapping[c], Tensor) or mapping[c].dim() != 2:
                raise DiReInputError(f"real embeddings of class {c} must be a 2-D tensor [M, D]")
        dims = {int(c): tuple(mapping[c].shape) for c in keys}
        if len({s[1] for s in dims.values()}) > 1:
            raise DiReInputError(f"real embeddings have different dimensions per class: {dims}")
        flat = torch.cat([mapping[c].detach().cpu() for c in keys])
        dtype = flat.dtype if dtype is None else dtype
        _check_dtype(dtype)
        classes = torch.tensor([int(c) for c in keys], dtype=torch.long)
        counts = torch.tensor([mapping[c].shape[0] for c in keys], dtype=torch.long)
        _check_finite_by_class(flat, classes, counts)
        return cls(_to_storage(flat, dtype), classes, counts)

    @staticmethod
    def cache_key(
        model: nn.Module,
        layer: Optional[str] = None,
        *,
        dataset_id: str = "",
        transform_id: str = "",
        max_per_class: Optional[int] = None,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> str:
        """Hex sha256 over the model's state dict (names, shapes, dtypes, bytes) and the settings.

        ``dataset_id`` / ``transform_id`` stand for what the key cannot see (the loader): change
        them whenever the data or its preprocessing changes
        (:func:`dire_plugin.embeddings.realdata.data_fingerprint` does for the data).
        """
        h = hashlib.sha256()
        settings = _key_settings(resolve_layer(model, layer), dataset_id, transform_id, max_per_class, seed, dtype)
        h.update(json.dumps(settings, sort_keys=True).encode())
        # The unwrapped model's state dict: wrapping in DataParallel does not change the bank.
        for name, value in unwrap_model(model).state_dict().items():
            h.update(b"\0" + name.encode() + b"\0")
            if isinstance(value, Tensor):
                hash_tensor(h, value)
            else:
                h.update(repr(value).encode())
        return h.hexdigest()

    @classmethod
    def build(
        cls,
        model: nn.Module,
        loader: Iterable,
        *,
        layer: Optional[str] = None,
        max_per_class: Optional[int] = None,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: Optional[Union[str, torch.device]] = None,
        cache_dir: Optional[PathLike] = None,
        dataset_id: str = "",
        transform_id: str = "",
        progress: bool = True,
    ) -> "RealEmbeddingBank":
        """Embed every ``(images, labels)`` batch of ``loader`` and group the rows by true label.

        The model runs in eval mode under ``torch.no_grad()`` with its forward hooks hidden
        (:func:`~dire_plugin.embeddings.isolation.private_forward`): BatchNorm statistics and the
        values a method's hooks store are untouched, and every submodule's mode is restored.

        Args:
            model: the (pretrained) model; not moved — inputs are moved to ``device``.
            loader: yields ``(images, labels, ...)``; any order (the rows are grouped by label).
            layer: layer whose input is the embedding (default: the last ``nn.Linear``).
            max_per_class: keep a random subset of this many rows per class (seeded by ``seed``;
                reproducible for the same loader order).
            dtype: storage dtype (``torch.float16`` halves the memory; sums stay float32).
            device: where the images go (default: the model's parameters' device).
            cache_dir: cache the bank in ``cache_dir/bank-<key>.pt`` (see :meth:`cache_key`); a
                file that is unreadable, of another key or layout, or whose tensors do not match
                their stored checksum is rebuilt with one warning.
            dataset_id, transform_id: identify the data and preprocessing in the cache key; with
                a ``cache_dir`` and no ``dataset_id``, an ImageFolder-style or torchvision CIFAR
                ``loader.dataset`` is fingerprinted (:func:`~dire_plugin.embeddings.realdata.data_fingerprint`),
                any other gets a warning that the key cannot see its data.
            progress: show a tqdm bar.

        Under ``torch.distributed`` (several ranks) each rank embeds a disjoint shard of the
        loader's dataset (every ``world``-th image), the shards are gathered in dataset order, so
        every rank holds the bank one process would have built, and rank 0 writes the cache. First
        the ranks compare their keys (``dataset_id`` included, so pass one that sees the data) and
        dataset sizes: ranks that differ stop before anything is loaded, built or written.

        Raises:
            DiReInputError: bad settings, ranks that would build different banks, a loader that
                yields no data or non-finite embeddings,
                or a loader error raised as a ``DiReInputError`` (also from a DataLoader worker,
                whose traceback is reduced to the original one line).
        """
        _check_dtype(dtype)
        if max_per_class is not None and int(max_per_class) < 1:
            raise DiReInputError(f"max_per_class must be at least 1, got {max_per_class}")
        layer_name = resolve_layer(model, layer)
        if cache_dir is not None and not dataset_id:
            dataset_id = _loader_data_id(loader)
        key = cls.cache_key(
            model, layer_name, dataset_id=dataset_id, transform_id=transform_id,
            max_per_class=max_per_class, seed=seed, dtype=dtype,
        )
        path = Path(cache_dir).expanduser() / f"bank-{key[:16]}.pt" if cache_dir is not None else None
        rank, size = world()
        if size > 1:  # before any rank loads or builds: a bank of mixed shards would be nobody's
            _check_ranks_agree(
                key, _key_settings(layer_name, dataset_id, transform_id, max_per_class, seed, dtype), loader,
            )
        cached = _load_cached(path, key, dtype, layer_name) if path is not None and path.exists() else None
        if size > 1 and not _everyone(cached is not None):
            cached = None  # one rank without the file: all build, so that all hold the same bank
        if cached is not None:
            return cached

        if size > 1:
            rows, labels = _embed_sharded(model, loader, layer_name, device, progress, rank, size)
        else:
            rows, labels = _embed(model, loader, layer_name, device, progress)
        rows, classes, counts = _sort_by_label(rows, labels)
        if max_per_class is not None:
            rows, counts = _subsample(rows, classes, counts, int(max_per_class), seed)
        bank = cls(_to_storage(rows, dtype), classes, counts, fingerprint=key, layer=layer_name)
        if path is not None and rank == 0:  # every rank holds the bank; one writes the cache
            atomic_torch_save(path, {
                "format": CACHE_FORMAT, "key": key, "classes": bank._classes, "counts": bank._counts,
                "embeddings": bank._flat, "checksum": _checksum(bank._classes, bank._counts, bank._flat),
            })
        return bank


def _key_settings(layer: str, dataset_id: str, transform_id: str, max_per_class: Optional[int], seed: int,
                  dtype: torch.dtype) -> Dict[str, Any]:
    """What the cache key holds besides the model's weights."""
    return {"format": CACHE_FORMAT, "layer": layer, "dataset_id": dataset_id, "transform_id": transform_id,
            "max_per_class": max_per_class, "seed": seed, "dtype": str(dtype)}


#: The bank key's parts as the error that ranks disagree names them.
_KEY_PARTS = {
    "dataset_id": "the real data (fingerprint of its files: paths, sizes, modification times)",
    "images": "the number of real images", "transform_id": "the preprocessing", "layer": "the embedding layer",
    "max_per_class": "max_per_class", "seed": "seed", "dtype": "dtype", "format": "the bank format",
    "weights": "the teacher's weights (bank keys)",
}


def _check_ranks_agree(key: str, settings: Dict[str, Any], loader: Iterable) -> None:
    """Every rank would build (or load) the bank of the same key from as many images, else one
    :class:`DiReInputError` line on every rank, naming what differs on which ranks. The key's
    parts travel rather than the key alone, so the error can tell the data from the weights."""
    dataset = getattr(loader, "dataset", None)
    mine = {**settings, "images": len(dataset) if hasattr(dataset, "__len__") else None, "key": key}
    every = all_gather_json(mine, "the real-embedding bank's key")
    if all(r["key"] == key for r in every):
        # The same key over datasets of different sizes: data the dataset_id cannot see.
        differ = differences([{"images": r["images"]} for r in every], _KEY_PARTS)
    else:
        differ = differences([{k: v for k, v in r.items() if k != "key"} for r in every], _KEY_PARTS)
        # The key hashes these settings and the teacher's weights: if they agree, the weights do not.
        differ = differ or differences([{"weights": r["key"][:16]} for r in every], _KEY_PARTS)
    if differ:
        raise DiReInputError(
            f"the ranks would build different real-embedding banks: {differ}; every rank needs the same "
            "teacher and real data (node-local copies must keep the files' sizes and times: cp -a, rsync -a)"
        )


def _loader_data_id(loader: Iterable) -> str:
    """A ``dataset_id`` for a cache the caller did not key on its data: the fingerprint of the
    loader's dataset where we can read one (ImageFolder-style, torchvision's CIFAR), else ``""``
    and one warning, since the key then cannot see a change in the data."""
    from .realdata import data_fingerprint

    dataset = getattr(loader, "dataset", None)
    root = getattr(dataset, "root", None)
    if dataset is not None and root is not None:
        try:
            return data_fingerprint(dataset, root, type(dataset).__name__)
        except DiReInputError:
            pass
    logger.warning("[dire] bank cache: pass dataset_id= (e.g. a version of the data); the key cannot see "
                   "what this %s reads, so changed data would hit the old cache", type(dataset or loader).__name__)
    return ""


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in _STORAGE_DTYPES:
        raise DiReInputError(f"bank dtype must be one of {[str(d) for d in _STORAGE_DTYPES]}, got {dtype}")


def _check_finite_by_class(rows: Tensor, classes: Tensor, counts: Tensor) -> None:
    bad = _nonfinite_rows(rows)
    if len(bad):
        labels = torch.repeat_interleave(classes, counts)
        raise DiReInputError(f"real embeddings of class {int(labels[bad[0]])} contain NaN or Inf values")


def _to_storage(rows: Tensor, dtype: torch.dtype) -> Tensor:
    out = rows.to(dtype)
    if out.dtype != rows.dtype and len(_nonfinite_rows(out)):
        raise DiReInputError(f"real embeddings overflow {dtype} storage: use dtype=torch.float32")
    return out


def _checksum(classes: Tensor, counts: Tensor, embeddings: Tensor) -> str:
    """sha256 over the cached tensors (shapes, dtypes, bytes): a damaged file is never reused."""
    return tensors_sha256((classes, counts, embeddings), b"dire-bank-cache")


def _worker_message(error: DiReInputError) -> str:
    """The one line a DataLoader worker raised, out of the traceback text the main process gets.

    torch re-raises a worker's exception in the main process as ``type(error)(text)``, where the
    text is "Caught X in DataLoader worker ..." and the worker's whole traceback, whose last line
    is ``<module>.<Class>: <the original message>``.
    """
    lines = [line for line in str(error).splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(error).__name__
    name = f"{type(error).__module__}.{type(error).__qualname__}: "
    for line in reversed(lines):
        if line.startswith(name):
            return line[len(name):]
    return lines[-1]


def _batches(loader: Iterable) -> Iterator[Any]:
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except DiReInputError as e:  # e.g. an unreadable image, maybe raised in a worker
            raise DiReInputError(_worker_message(e)) from None
        yield batch


def _embed(
    model: nn.Module, loader: Iterable, layer: Optional[str], device: Optional[Union[str, torch.device]], progress: bool,
    total: Optional[int] = None,
) -> Tuple[Tensor, Tensor]:
    """All ``(embeddings, labels)`` of ``loader`` (CPU), through :func:`private_forward`."""
    device = _model_device(model) if device is None else torch.device(device)
    chunks: List[Tensor] = []
    label_chunks: List[Tensor] = []
    # The model is usually the method's own teacher: its forward hooks (SRe²L's BN statistics,
    # read after the criterion call this build runs inside) must not see our batches.
    with private_forward(model):
        with torch.no_grad(), EmbeddingCapture(model, layer, detach=True) as capture:
            if total is None and hasattr(loader, "__len__"):
                total = len(loader)
            for batch in tqdm(_batches(loader), total=total, desc="real embeddings", disable=not progress, leave=False):
                if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                    raise DiReInputError("the loader must yield (images, labels) batches")
                images, labels = batch[0], torch.as_tensor(batch[1]).reshape(-1)
                capture.clear()
                model(images.to(device))
                emb = capture.embeddings
                if emb is None:
                    raise DiReInputError(f"layer {layer!r} was not called in the model's forward")
                if emb.shape[0] != labels.numel():
                    raise DiReInputError(f"{emb.shape[0]} embeddings for a batch of {labels.numel()} labels")
                emb = emb.float().cpu() if emb.dtype != torch.float64 else emb.cpu()
                bad = _nonfinite_rows(emb)
                if len(bad):
                    raise DiReInputError(
                        f"real embeddings of class {int(labels[bad[0]])} contain NaN or Inf values"
                    )
                chunks.append(emb)
                label_chunks.append(labels.to(torch.long).cpu())
    if not chunks or sum(c.shape[0] for c in chunks) == 0:
        raise DiReInputError("the loader yielded no data: cannot build the real embedding bank")
    return torch.cat(chunks), torch.cat(label_chunks)


def embed_images(model: nn.Module, images: Tensor, labels: Tensor, layer: Optional[str] = None,
                 device: Optional[Union[str, torch.device]] = None, batch_size: int = 256) -> Tuple[Tensor, Tensor]:
    """``(embeddings [N, D], labels [N])`` on the CPU of ``images`` (already preprocessed as the
    model expects) at the input of ``layer`` (default: the last ``nn.Linear``), in batches of
    ``batch_size``, through :func:`private_forward` as the bank's own forwards are: no forward hook
    of the method fires, no BatchNorm statistic moves. For images of the distilled set that the
    method never forwards (INFER's real images), which CD must still push away from."""
    labels = torch.as_tensor(labels).reshape(-1)
    if images.shape[0] != labels.numel():
        raise DiReInputError(f"{images.shape[0]} images but {labels.numel()} labels")
    batches = [(images[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, images.shape[0], batch_size)]
    return _embed(model, batches, layer, device, progress=False, total=len(batches))


def _subsample(rows: Tensor, classes: Tensor, counts: Tensor, k: int, seed: int) -> Tuple[Tensor, Tensor]:
    keep = []
    start = 0
    for c, n in zip(classes.tolist(), counts.tolist()):
        if n > k:
            g = torch.Generator().manual_seed(_class_seed(seed, c))
            # Sorted, so kept rows stay in loader order.
            keep.append(start + torch.randperm(n, generator=g)[:k].sort().values)
        else:
            keep.append(torch.arange(start, start + n))
        start += n
    return rows[torch.cat(keep)], counts.clamp_max(k)


def _everyone(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank."""
    (flags,) = all_gather_rows([torch.tensor([int(flag)])], "the bank cache check")
    return all(bool(f) for f in flags)


class _Indexed(torch.utils.data.Dataset):
    """A dataset's items with their index, so shards gathered from ranks go back in order."""

    def __init__(self, dataset: Any, indices: List[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        item = self.dataset[self.indices[i]]
        return (*item[:2], self.indices[i])


def _embed_sharded(model: nn.Module, loader: Any, layer: str, device: Optional[Union[str, torch.device]],
                   progress: bool, rank: int, size: int) -> Tuple[Tensor, Tensor]:
    """:func:`_embed` of this rank's shard, gathered with the other ranks' into dataset order."""
    dataset = getattr(loader, "dataset", None)
    if dataset is None or not hasattr(dataset, "__len__"):
        raise DiReInputError("a bank built on several ranks needs a DataLoader over a dataset (to shard it)")
    if len(dataset) < size:
        raise DiReInputError(f"{len(dataset)} real images for {size} ranks: every rank needs one to embed")
    # The shards are read from loader.dataset in a loader of our own: a loader that samples or
    # collates in its own way would give another bank than one process builds from it.
    sampler, collate = getattr(loader, "sampler", None), getattr(loader, "collate_fn", None)
    if not isinstance(sampler, torch.utils.data.SequentialSampler) or collate is not torch.utils.data.default_collate:
        raise DiReInputError(
            "a bank built on several ranks shards loader.dataset itself: pass a DataLoader with shuffle=False "
            f"and the default collate_fn (got {type(sampler).__name__}, {getattr(collate, '__name__', collate)})"
        )
    shard = _Indexed(dataset, list(range(rank, len(dataset), size)))
    sharded = torch.utils.data.DataLoader(shard, batch_size=loader.batch_size or 1, shuffle=False,
                                          num_workers=loader.num_workers,
                                          multiprocessing_context=getattr(loader, "multiprocessing_context", None))
    indices: List[Tensor] = []

    def with_indices():
        for images, labels, index in sharded:
            indices.append(torch.as_tensor(index).reshape(-1))
            yield images, labels

    rows, labels = _embed(model, with_indices(), layer, device, progress and rank == 0, total=len(sharded))
    all_rows, all_labels, all_index = all_gather_rows([rows, labels, torch.cat(indices)], "the real-embedding bank's shards")
    order = torch.argsort(torch.cat(all_index))
    return torch.cat(all_rows)[order], torch.cat(all_labels)[order]


def _load_cached(path: Path, key: str, dtype: torch.dtype, layer: str) -> Optional[RealEmbeddingBank]:
    """The cached bank, or ``None`` (with one warning line) when the file is unreadable, not this
    key's or layout's, or its tensors do not match the checksum stored with them."""
    try:
        state = load_torch_file(path, "bank cache")  # weights_only: a cache file is data, never code
    except DiReInputError as e:  # truncated, corrupt, pickled objects, not a torch file at all
        logger.warning("%s; rebuilding", e)
        return None
    problem = _cache_problem(state, key, dtype)
    if problem is None and _checksum(state["classes"], state["counts"], state["embeddings"]) != state["checksum"]:
        problem = "its tensors do not match their checksum: the file was changed or damaged after it was written"
    if problem is None:
        try:
            return RealEmbeddingBank(
                state["embeddings"], state["classes"], state["counts"], fingerprint=key, cache_hit=True, layer=layer
            )
        except DiReInputError as e:
            problem = str(e)
    logger.warning("bank cache %s is invalid (%s); rebuilding", path, problem)
    return None


def _cache_problem(state: Any, key: str, dtype: torch.dtype) -> Optional[str]:
    if not isinstance(state, dict) or state.get("format") != CACHE_FORMAT:
        return f"not a format-{CACHE_FORMAT} bank"
    if state.get("key") != key:
        return "stored key differs"
    classes, counts, emb = state.get("classes"), state.get("counts"), state.get("embeddings")
    if not all(isinstance(t, Tensor) for t in (classes, counts, emb)):
        return "missing tensors"
    if not isinstance(state.get("checksum"), str):
        return "no checksum"
    if classes.dtype != torch.long or counts.dtype != torch.long or classes.dim() != 1 or counts.shape != classes.shape:
        return "bad classes/counts"
    if emb.dim() != 2 or emb.dtype != dtype or int(counts.sum()) != emb.shape[0] or bool((counts < 1).any()):
        return "embeddings do not match counts or dtype"
    return None
