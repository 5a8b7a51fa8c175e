"""The demo's figures. Figure 1 (embedding scatter) and Figure 2 (class-wise intra-class cosine)
come from :mod:`dire_plugin.metrics.report`, shared with ``dire-metrics``; the image grid and the
gradient share over the synthesis steps (one line per family) are the demo's own."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
from torch import Tensor

from ..io.files import atomic_write
from .data import denormalise
from .measure import SetMetrics
from .spec import DIGITS, DatasetSpec

__all__ = ["PlotSet", "ShareLine", "matplotlib_available", "image_grid_png", "share_png", "write_figures",
           "write_share_figure"]


@dataclass
class PlotSet:
    """One set as drawn: its label, images (normalised), labels, embeddings and metrics."""

    label: str
    images: Tensor
    labels: Tensor
    embeddings: Tensor
    metrics: SetMetrics
    reference: bool = False


def matplotlib_available() -> bool:
    """matplotlib is an optional extra (``dire-plugin[plot]``): the demo runs without figures."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


#: Rows of the image grid: CIFAR-100's hundred would make stamps of the images.
GRID_CLASSES = 10


def _mosaic(images: Tensor, labels: Tensor, per_class: int, spec: DatasetSpec) -> np.ndarray:
    """Rows are the first classes, columns the first ``per_class`` images of each (1 px gaps);
    ``[H, W]`` for digits (grey: the channels are identical), else ``[H, W, 3]``."""
    pixels = denormalise(images, spec).permute(0, 2, 3, 1).numpy()
    if spec is DIGITS:
        pixels = pixels[..., 0]
    size = pixels.shape[1]
    cell = size + 1
    classes = min(spec.num_classes, GRID_CLASSES)
    grid = np.ones((classes * cell - 1, per_class * cell - 1) + pixels.shape[3:])
    for c in range(classes):
        for j, idx in enumerate(np.flatnonzero(labels.numpy() == c)[:per_class]):
            grid[c * cell:c * cell + size, j * cell:j * cell + size] = pixels[idx]
    return grid


def image_grid_png(sets: Sequence[PlotSet], spec: DatasetSpec, per_class: int = 10) -> bytes:
    """Synthetic images of every set side by side: one row per class, ``per_class`` columns."""
    import io

    from matplotlib.figure import Figure

    counts = [int(np.bincount(s.labels.numpy(), minlength=spec.num_classes).min()) for s in sets]
    cols = min(len(sets), 4)
    rows = math.ceil(len(sets) / cols)
    fig = Figure(figsize=(3.2 * cols, 3.4 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, (s, n) in enumerate(zip(sets, counts)):
        ax = axes[i // cols][i % cols]
        ax.imshow(_mosaic(s.images, s.labels, max(1, min(per_class, n)), spec), cmap="gray_r", vmin=0, vmax=1,
                  interpolation="nearest")
        ax.set_title(s.label, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for j in range(len(sets), rows * cols):
        axes[j // cols][j % cols].axis("off")
    rows_are = "digits 0-9" if spec is DIGITS else f"classes 0-{min(spec.num_classes, GRID_CLASSES) - 1}"
    fig.suptitle(f"Images per set (rows: {rows_are})", fontsize=11)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return buf.getvalue()


def write_figures(out: Path, tag: str, real_embeddings: Tensor, sets: Sequence[PlotSet], spec: DatasetSpec) -> Dict[str, Path]:
    """Write the three figures of one family at one IPC (``tag``: ``{family}_ipc{N}``); returns
    ``{figure}_{tag}: path``."""
    from ..metrics.report import MetricsRow, class_similarity_png, embedding_scatter_png

    scatter = embedding_scatter_png(
        real_embeddings, [(s.label, s.embeddings, s.labels) for s in sets], spec.num_classes, projection="pca",
        coverage=[s.metrics.coverage for s in sets],
    )
    rows = [
        MetricsRow(name=s.label, images=len(s.images), classes=spec.num_classes, coverage=s.metrics.coverage,
                   vendi=s.metrics.vendi, vendi_per_class=s.metrics.vendi_per_class,
                   intra_class_cosine=s.metrics.intra_class_cosine, reference=s.reference,
                   per_class_vendi=s.metrics.per_class_vendi, per_class_cosine=s.metrics.per_class_cosine)
        for s in sets
    ]
    cosine = class_similarity_png(rows, [str(c) for c in range(spec.num_classes)])
    grid = image_grid_png(sets, spec)
    paths: Dict[str, Path] = {}
    for name, data in (("embeddings", scatter), ("intra_class_cosine", cosine), ("images", grid)):
        path = out / f"{name}_{tag}.png"
        atomic_write(path, data)
        paths[f"{name}_{tag}"] = path
    return paths


@dataclass
class ShareLine:
    """One run's measured gradient share: ``(step, share)`` per measured step (its manifest)."""

    family: str
    label: str
    points: List[Tuple[int, float]]
    dashed: bool = False


def share_png(lines: Sequence[ShareLine], target: float) -> bytes:
    """DiRe's share of the images' gradient over the synthesis steps, one colour per family (solid:
    the method's default weights; dashed: calibrated to ``target``), log-log."""
    import io

    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.4, 4.2), layout="constrained")
    ax = fig.subplots()
    colours: Dict[str, str] = {}
    for line in lines:
        if not line.points:
            continue
        colour = colours.setdefault(line.family, f"C{len(colours)}")
        steps, shares = zip(*line.points)
        ax.plot(steps, shares, "--" if line.dashed else "-", marker="o", markersize=3, color=colour, label=line.label)
    ax.axhline(target, color="grey", linewidth=0.8, linestyle=":", label=f"share {target:g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("synthesis step (measured: 1-5, then every 100th)")
    ax.set_ylabel("‖∂DiRe/∂x‖ / ‖∂method/∂x‖")
    ax.set_title("DiRe's share of the images' gradient (synthesis seed 0)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return buf.getvalue()


def write_share_figure(out: Path, lines: Sequence[ShareLine], target: float, name: str = "gradient_share") -> Dict[str, Path]:
    """``{name}.png``; ``{}`` when no run measured a share."""
    if not any(line.points for line in lines):
        return {}
    path = out / f"{name}.png"
    atomic_write(path, share_png(lines, target))
    return {name: path}
