"""Class-grouped embeddings in the packed form the kernels take.

:class:`ClassSums` holds what the cosine terms need (per-class sums of unit rows and counts);
:class:`PackedEmbeddings` adds the padded rows the Euclidean term needs. Both are built once per
bank / memory update and reused across iterations.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Tuple

import torch
from torch import Tensor

from .errors import DiReInputError
from .pairwise import DEFAULT_EPS, class_row_sums, group_by_class, normalize_rows

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

    def lookup(self, classes: Tensor) -> Tuple[Tensor, Tensor]:
        """``(unit_sums, counts)`` for ``classes``; zeros for classes not present (no error)."""
        out_sums = self.unit_sums.new_zeros(len(classes), self.dim)
        out_counts = self.counts.new_zeros(len(classes))
        if len(self.classes) == 0:
            return out_sums, out_counts
        classes = classes.to(self.classes.device)
        pos = torch.searchsorted(self.classes, classes).clamp_max(len(self.classes) - 1)
        hit = self.classes[pos] == classes
        out_sums[hit] = self.unit_sums[pos[hit]]
        out_counts[hit] = self.counts[pos[hit]]
        return out_sums, out_counts

    def to(self, device: torch.device) -> "ClassSums":
        return ClassSums(self.classes.to(device), self.unit_sums.to(device), self.counts.to(device))


@dataclass(frozen=True)
class PackedEmbeddings(ClassSums):
    """:class:`ClassSums` plus the rows themselves, padded to ``[K, M_max, D]`` (storage dtype)."""

    padded: Tensor  # [K, M_max, D]

    @classmethod
    def from_rows(cls, x: Tensor, labels: Tensor, eps: float = DEFAULT_EPS) -> "PackedEmbeddings":
        """Pack unsorted rows ``x [N, D]`` with integer ``labels [N]``; rows are detached."""
        x = x.detach()
        padded, counts, classes = group_by_class(x, labels)
        _, slot = torch.unique(labels.reshape(-1).to(torch.long).to(x.device), sorted=True, return_inverse=True)
        # float32 at least (fp16 storage must not round the sums); float64 stays float64 for gradcheck.
        work = x if x.dtype == torch.float64 else x.float()
        unit_sums = class_row_sums(normalize_rows(work, eps), slot, len(classes))
        return cls(classes, unit_sums, counts, padded)

    def to(self, device: torch.device) -> "PackedEmbeddings":
        base = ClassSums.to(self, device)
        return PackedEmbeddings(base.classes, base.unit_sums, base.counts, self.padded.to(device))


def pack_mapping(
    real: Mapping[int, Tensor], device: torch.device, eps: float = DEFAULT_EPS, what: str = "real embeddings"
) -> PackedEmbeddings:
    """Pack ``{class: [M_c, D]}`` (validated: 2-D, same D, non-empty, finite, not all zero)."""
    if len(real) == 0:
        raise DiReInputError(f"{what} are empty: no class has any")
    rows, labels, dim = [], [], None
    for c in sorted(real, key=int):
        emb = real[c]
        if not isinstance(emb, Tensor):
            raise DiReInputError(f"{what} of class {c} are {type(emb).__name__}, expected a tensor")
        check_embeddings(emb, f"{what} of class {c}")
        if emb.shape[0] == 0:
            raise DiReInputError(f"{what} of class {c} are empty")
        if dim is not None and emb.shape[1] != dim:
            raise DiReInputError(f"{what} of class {c} have dimension {emb.shape[1]}, others {dim}")
        dim = emb.shape[1]
        if not bool(emb.detach().abs().sum(1).gt(0).any()):
            raise DiReInputError(f"{what} of class {c} are all zero: check the captured layer")
        rows.append(emb.detach().to(device))
        labels.append(torch.full((emb.shape[0],), int(c), dtype=torch.long, device=device))
    return PackedEmbeddings.from_rows(torch.cat(rows), torch.cat(labels), eps)
