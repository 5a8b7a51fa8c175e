"""Diversity of a set, measured on the teacher's embeddings (the input of its classifier)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

import torch
from torch import Tensor, nn

from ..metrics import diversity as metrics
from ..embeddings.capture import EmbeddingCapture

__all__ = ["SetMetrics", "embed", "set_metrics"]

#: Neighbours that define a real point's ball in coverage (Naeem et al. use 5).
COVERAGE_K = 5


@torch.no_grad()
def embed(teacher: nn.Module, images: Tensor, batch_size: int = 512) -> Tensor:
    """Penultimate embeddings ``[N, D]`` of ``images`` under the teacher in eval mode."""
    teacher.eval()
    device = next(teacher.parameters()).device
    parts = []
    with EmbeddingCapture(teacher, detach=True) as cap:
        for i in range(0, len(images), batch_size):
            teacher(images[i:i + batch_size].to(device))
            parts.append(cap.embeddings.float().cpu())
    return torch.cat(parts)


@dataclass
class SetMetrics:
    """Coverage of the real embeddings, per-class Vendi, intra-class cosine (and per class)."""

    coverage: float
    vendi_per_class: float
    intra_class_cosine: float
    vendi: float
    per_class_vendi: Dict[int, float] = field(default_factory=dict)
    per_class_cosine: Dict[int, float] = field(default_factory=dict)


def set_metrics(real_emb: Tensor, emb: Tensor, labels: Tensor) -> SetMetrics:
    """All metrics of one set against the real training embeddings."""
    vendi_mean, vendi_cls = metrics.vendi_score_per_class(emb, labels, q=1.0)
    cos_mean, cos_cls = metrics.intra_class_cosine(emb, labels, per_class=True)
    return SetMetrics(
        coverage=metrics.coverage(real_emb, emb, k=COVERAGE_K),
        vendi_per_class=vendi_mean,
        intra_class_cosine=cos_mean,
        vendi=metrics.vendi_score(emb),
        per_class_vendi=dict(vendi_cls),
        per_class_cosine=dict(cos_cls),
    )
