"""Class-grouped embeddings in the packed form the kernels take.

:class:`ClassSums` holds what the cosine terms need (per-class sums of unit rows and counts);
:class:`PackedEmbeddings` adds the padded rows the Euclidean term needs. Both are built once per
bank / memory update and reused across iterations.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence, Tuple

import torch
from torch import Tensor

from ..errors import DiReInputError
from .kernels import DEFAULT_EPS, class_row_sums, normalize_rows

__all__ = ["ClassSums", "PackedEmbeddings", "check_embeddings", "pack_mapping"]


def check_embeddings(x: Tensor, what: str) -> None:
    """Refuse non-finite embeddings: they mean a broken capture, and would poison every class."""
    if x.dim() != 2:
        raise DiReInputError(f"{what} must be a 2-D tensor [N, D], got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise DiReInputError(f"{what} contain NaN or Inf values")


@dataclass(frozen=True)
class ClassSums:
    """Per-class sums of unit rows ``s_c = Σ_i x̂_i`` (float32) and row counts, classes sorted."""

    classes: Tensor  # [K] long, sorted
    unit_sums: Tensor  # [K, D]
    counts: Tensor  # [K] long

    @property
    def dim(self) -> int:
        return int(self.unit_sums.shape[-1])

    def positions(self, classes: Tensor, what: str = "real embeddings") -> Tensor:
        """Row of each of ``classes``; a class that is not here raises an error naming it."""
        classes = classes.to(self.classes.device)
        pos = torch.searchsorted(self.classes, classes).clamp_max(max(len(self.classes) - 1, 0))
        found = self.classes[pos] == classes if len(self.classes) else torch.zeros_like(classes, dtype=torch.bool)
        if not bool(found.all()):
            missing = classes[~found].tolist()
            raise DiReInputError(f"no {what} for class{'es' if len(missing) > 1 else ''} {', '.join(map(str, missing))}")
        return pos

    def _rows_of(self, classes: Tensor) -> Tuple[Tensor, Tensor]:
        """``(position, found)`` of each of ``classes`` (``len(self.classes) > 0``)."""
        classes = classes.to(self.classes.device)
        pos = torch.searchsorted(self.classes, classes).clamp_max(len(self.classes) - 1)
        return pos, self.classes[pos] == classes

    def lookup(self, classes: Tensor) -> Tuple[Tensor, Tensor]:
        """``(unit_sums, counts)`` for ``classes``; zeros for classes not present (no error)."""
        out_sums = self.unit_sums.new_zeros(len(classes), self.dim)
        out_counts = self.counts.new_zeros(len(classes))
        if len(self.classes) == 0:
            return out_sums, out_counts
        pos, hit = self._rows_of(classes)
        out_sums[hit] = self.unit_sums[pos[hit]]
        out_counts[hit] = self.counts[pos[hit]]
        return out_sums, out_counts

    def to(self, device: torch.device) -> "ClassSums":
        return ClassSums(self.classes.to(device), self.unit_sums.to(device), self.counts.to(device))

    @classmethod
    def of_rows(cls, x: Tensor, labels: Tensor, eps: float = DEFAULT_EPS) -> "ClassSums":
        """The sums of rows ``x [N, D]`` (detached; float32, float64 kept) with integer ``labels [N]``."""
        x = x.detach()
        x = x if x.dtype in (torch.float32, torch.float64) else x.float()
        classes, slot, counts = torch.unique(labels.reshape(-1).to(device=x.device, dtype=torch.long), sorted=True,
                                             return_inverse=True, return_counts=True)
        return cls(classes, class_row_sums(normalize_rows(x, eps), slot, len(classes)), counts)

    def plus(self, other: "ClassSums") -> "ClassSums":
        """Both sets of rows as one: the union of the classes, sums and counts added (on this
        one's device, in the wider of the two dtypes)."""
        if not len(other.classes):
            return self
        if not len(self.classes):
            return other.to(self.classes.device)
        if other.dim != self.dim:
            raise DiReInputError(f"class sums of dimension {other.dim} cannot join ones of dimension {self.dim}")
        device = self.classes.device
        dtype = torch.promote_types(self.unit_sums.dtype, other.unit_sums.dtype)
        classes, slot = torch.unique(torch.cat([self.classes, other.classes.to(device)]), sorted=True,
                                     return_inverse=True)
        sums = torch.cat([self.unit_sums.to(dtype), other.unit_sums.to(device=device, dtype=dtype)])
        counts = torch.cat([self.counts, other.counts.to(device)])
        return ClassSums(classes, class_row_sums(sums, slot, len(classes)),
                         counts.new_zeros(len(classes)).index_add(0, slot, counts))


@dataclass(frozen=True)
class PackedEmbeddings(ClassSums):
    """:class:`ClassSums` plus the rows, padded to ``[K, M_max, D]`` (storage dtype), and their
    squared norms ``[K, M_max]`` (float32 at least), which the Euclidean term needs every step."""

    padded: Tensor  # [K, M_max, D]
    sq_norms: Tensor  # [K, M_max]

    @classmethod
    def from_classes(
        cls, classes: Sequence[int], rows: Sequence[Tensor], device: torch.device, eps: float = DEFAULT_EPS,
        what: str = "real embeddings",
    ) -> "PackedEmbeddings":
        """Pack per-class ``rows[k] [M_k, D]`` of sorted ``classes`` straight into the padded tensor.

        One pass per class and no temporary larger than a class: at ImageNet scale (1000 × 1300 ×
        512) concatenating first and grouping afterwards copied the bank four times over.
        Validates every class: non-empty, same D, finite, not all zero.
        """
        if not len(rows):
            raise DiReInputError(f"{what} are empty: no class has any")
        for c, emb in zip(classes, rows):
            if not isinstance(emb, Tensor):
                raise DiReInputError(f"{what} of class {c} are {type(emb).__name__}, expected a tensor")
        dim = rows[0].shape[-1]
        for c, emb in zip(classes, rows):
            if emb.dim() != 2:
                raise DiReInputError(f"{what} of class {c} must be a 2-D tensor [M, D], got shape {tuple(emb.shape)}")
            if emb.shape[0] == 0:
                raise DiReInputError(f"{what} of class {c} are empty")
            if emb.shape[1] != dim:
                raise DiReInputError(f"{what} of class {c} have dimension {emb.shape[1]}, others {dim}")
        storage = rows[0].dtype
        # float32 at least (fp16 storage must not round the sums); float64 stays float64 for gradcheck.
        work = torch.float64 if storage == torch.float64 else torch.float32
        counts = torch.tensor([r.shape[0] for r in rows], dtype=torch.long)
        padded = torch.zeros(len(rows), int(counts.max()), dim, dtype=storage, device=device)
        sq_norms = torch.zeros(len(rows), int(counts.max()), dtype=work, device=device)
        unit_sums = torch.zeros(len(rows), dim, dtype=work, device=device)
        for k, emb in enumerate(rows):
            part = padded[k, : emb.shape[0]]
            part.copy_(emb.detach())
            norms = torch.linalg.vector_norm(part, dim=-1, dtype=work)
            sq_norms[k, : emb.shape[0]] = norms.square()
            unit_sums[k] = torch.mv(part.to(work).T, 1.0 / norms.clamp_min(eps))
        # One check for the whole bank: a per-class isfinite() costs a device sync per class.
        if not bool(torch.isfinite(sq_norms).all()):
            bad = int(torch.nonzero(~torch.isfinite(sq_norms).all(1))[0])
            raise DiReInputError(f"{what} of class {classes[bad]} contain NaN or Inf values")
        empty = (sq_norms.sum(1) == 0).nonzero()
        if len(empty):
            raise DiReInputError(f"{what} of class {classes[int(empty[0])]} are all zero: check the captured layer")
        class_ids = torch.tensor([int(c) for c in classes], dtype=torch.long, device=device)
        return cls(class_ids, unit_sums, counts.to(device), padded, sq_norms)

    @classmethod
    def from_rows(cls, x: Tensor, labels: Tensor, eps: float = DEFAULT_EPS) -> "PackedEmbeddings":
        """Pack unsorted rows ``x [N, D]`` with integer ``labels [N]``; rows are detached."""
        labels = labels.reshape(-1).to(torch.long)
        order = torch.sort(labels.cpu(), stable=True).indices
        classes, counts = torch.unique(labels.cpu(), sorted=True, return_counts=True)
        rows = torch.split(x.detach()[order.to(x.device)], counts.tolist())
        return cls.from_classes(classes.tolist(), rows, x.device, eps)

    def rows_for(self, classes: Tensor) -> Tuple[Tensor, Tensor]:
        """``(rows [len(classes), M_max, D], counts)`` of ``classes``; no rows for a class that is
        not here (a memory that has not seen it yet)."""
        rows = self.padded.new_zeros(len(classes), self.padded.shape[1], self.padded.shape[2])
        counts = self.counts.new_zeros(len(classes))
        if len(self.classes) == 0:
            return rows, counts
        pos, hit = self._rows_of(classes)
        rows[hit] = self.padded[pos[hit]]
        counts[hit] = self.counts[pos[hit]]
        return rows, counts

    def to(self, device: torch.device) -> "PackedEmbeddings":
        base = ClassSums.to(self, device)
        return PackedEmbeddings(base.classes, base.unit_sums, base.counts, self.padded.to(device), self.sq_norms.to(device))


def pack_mapping(
    real: Mapping[int, Tensor], device: torch.device, eps: float = DEFAULT_EPS, what: str = "real embeddings"
) -> PackedEmbeddings:
    """Pack ``{class: [M_c, D]}`` (validated: 2-D, same D, non-empty, finite, not all zero)."""
    classes = sorted(real, key=int)
    return PackedEmbeddings.from_classes(classes, [real[c] for c in classes], torch.device(device), eps, what)
