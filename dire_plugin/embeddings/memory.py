"""The memory of finished synthetic embeddings, per class: the images DiRe's CD term pushes new
ones away from when a batch holds one image per class (SRe²L, CDA, DWA: earlier ipc indices)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Union

import torch
from torch import Tensor

from ..errors import DiReInputError
from ..regularizer.grouped import ClassSums, PackedEmbeddings, check_embeddings
from ..regularizer.kernels import DEFAULT_EPS

__all__ = ["SyntheticMemory"]


class SyntheticMemory:
    """Finished synthetic embeddings per class (detached, on CPU) for the memory part of CD.

    :class:`~dire_plugin.DiReLoss` calls :meth:`class_sums`, which is cached until the next
    :meth:`add` / :meth:`clear`.

    Args:
        max_per_class: keep at most this many embeddings per class, the most recent ones.
    """

    def __init__(self, max_per_class: Optional[int] = None) -> None:
        if max_per_class is not None and int(max_per_class) < 1:
            raise DiReInputError(f"max_per_class must be at least 1, got {max_per_class}")
        self.max_per_class = None if max_per_class is None else int(max_per_class)
        self._rows: Dict[int, Tensor] = {}
        self._dim: Optional[int] = None
        self._sums: Optional[ClassSums] = None
        self._sums_on: Dict[torch.device, ClassSums] = {}
        self._packed_on: Dict[torch.device, PackedEmbeddings] = {}

    def add(self, embeddings: Tensor, labels: Tensor) -> None:
        """Store ``embeddings [N, D]`` of finished images with their ``labels [N]`` (detached)."""
        x = embeddings.detach()
        check_embeddings(x, "memory embeddings")
        labels = torch.as_tensor(labels).reshape(-1).to(torch.long).cpu()
        if labels.numel() != x.shape[0]:
            raise DiReInputError(f"{x.shape[0]} memory embeddings but {labels.numel()} labels")
        if self._dim is not None and x.shape[1] != self._dim:
            raise DiReInputError(f"memory embeddings have dimension {x.shape[1]}, stored ones {self._dim}")
        x = x.cpu()
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        self._dim = int(x.shape[1])
        for c in labels.unique().tolist():
            new = x[labels == c]
            old = self._rows.get(c)
            rows = new.clone() if old is None else torch.cat([old.to(torch.promote_types(old.dtype, new.dtype)), new])
            if self.max_per_class is not None:
                rows = rows[-self.max_per_class:]
            self._rows[c] = rows
        self._invalidate()

    def get(self, c: int) -> Tensor:
        """``[K_c, D]`` stored embeddings of class ``c`` (``[0, D]`` when there are none)."""
        rows = self._rows.get(int(c))
        return rows if rows is not None else torch.zeros(0, self._dim or 0)

    def count(self, c: int) -> int:
        return 0 if int(c) not in self._rows else int(self._rows[int(c)].shape[0])

    @property
    def classes(self) -> List[int]:
        return sorted(self._rows)

    def __len__(self) -> int:
        """Total number of stored embeddings."""
        return sum(int(r.shape[0]) for r in self._rows.values())

    def __repr__(self) -> str:
        return f"SyntheticMemory(classes={len(self._rows)}, embeddings={len(self)}, max_per_class={self.max_per_class})"

    def clear(self) -> None:
        self._rows.clear()
        self._dim = None
        self._invalidate()

    def _invalidate(self) -> None:
        self._sums = None
        self._sums_on = {}
        self._packed_on = {}

    def class_sums(self, device: Union[str, torch.device] = "cpu") -> ClassSums:
        """Per-class sums of unit rows (float32, float64 if stored so), counts, sorted classes."""
        device = torch.device(device)
        cached = self._sums_on.get(device)
        if cached is not None:
            return cached
        if self._sums is None:
            self._sums = self._compute_sums()
        self._sums_on[device] = self._sums.to(device)
        return self._sums_on[device]

    def packed(self, device: Union[str, torch.device] = "cpu") -> PackedEmbeddings:
        """The stored rows per class, padded (:class:`PackedEmbeddings`, which carries the unit
        sums too): what the ``logdet`` term reads; cached until the next :meth:`add`."""
        device = torch.device(device)
        if device not in self._packed_on:
            classes = sorted(self._rows)
            if not classes:
                dim = self._dim or 0
                empty = torch.zeros(0, dtype=torch.long, device=device)
                self._packed_on[device] = PackedEmbeddings(empty, torch.zeros(0, dim, device=device), empty,
                                                           torch.zeros(0, 0, dim, device=device), torch.zeros(0, 0, device=device))
            else:
                self._packed_on[device] = PackedEmbeddings.from_classes(
                    classes, [self._rows[c] for c in classes], device, DEFAULT_EPS, what="memory embeddings")
        return self._packed_on[device]

    def _compute_sums(self) -> ClassSums:
        classes = sorted(self._rows)
        dim = self._dim or 0
        if not classes:
            return ClassSums(torch.zeros(0, dtype=torch.long), torch.zeros(0, dim), torch.zeros(0, dtype=torch.long))
        work = torch.float64 if any(r.dtype == torch.float64 for r in self._rows.values()) else torch.float32
        rows = torch.cat([self._rows[c].to(work) for c in classes])
        counts = torch.tensor([self._rows[c].shape[0] for c in classes], dtype=torch.long)
        return ClassSums.of_rows(rows, torch.repeat_interleave(torch.tensor(classes, dtype=torch.long), counts))

    def state_dict(self) -> Dict[str, Any]:
        """Plain tensors (loadable with ``torch.load(..., weights_only=True)``) to resume a run."""
        classes = sorted(self._rows)
        dim = self._dim or 0
        return {
            "format": 1,
            "dim": dim,
            "classes": torch.tensor(classes, dtype=torch.long),
            "counts": torch.tensor([self._rows[c].shape[0] for c in classes], dtype=torch.long),
            "embeddings": torch.cat([self._rows[c] for c in classes]) if classes else torch.zeros(0, dim),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Replace the contents with a :meth:`state_dict` (this memory's ``max_per_class`` applies)."""
        try:
            classes, counts, emb = state["classes"], state["counts"], state["embeddings"]
            if state.get("format") != 1 or int(counts.sum()) != emb.shape[0] or len(classes) != len(counts):
                raise ValueError("layout mismatch")
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DiReInputError(f"not a SyntheticMemory state dict ({e})") from None
        self.clear()
        self._dim = int(state.get("dim", emb.shape[1] if emb.dim() == 2 else 0))
        if emb.shape[0]:
            self.add(emb, torch.repeat_interleave(classes.to(torch.long), counts.to(torch.long)))
