"""What ``dire-metrics`` hands back: the table (printed and ``metrics.md``), ``metrics.json`` and,
with matplotlib (the ``plot`` extra), the two figures of the paper: real vs distilled embeddings
in 2-D (Figure 1) and the per-class intra-class cosine similarity (Figure 2).

Plots are rendered to PNG bytes, not files: the command writes every output only once all of
them exist, so a failure leaves nothing half-written.
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..errors import DiReInputError, require_extra

__all__ = [
    "MetricsRow", "format_table", "markdown_report", "json_report",
    "require_plotting", "project_2d", "embedding_scatter_png", "class_similarity_png",
]

#: Real points drawn in the scatter plot / fed to t-SNE: enough to show the manifold, few enough to stay fast.
MAX_REAL_SCATTER = 5000
MAX_REAL_TSNE = 2000
#: Real embeddings the PCA is fitted on.
MAX_REAL_PCA_FIT = 20000
#: Up to this many classes the class-similarity plot marks and names every class.
MAX_MARKED_CLASSES = 40


@dataclass
class MetricsRow:
    """One row of the table: a distilled set, or the real-subset reference."""

    name: str
    images: int
    classes: int
    coverage: float
    vendi: float
    vendi_per_class: float
    intra_class_cosine: float
    path: str = ""
    layout: str = ""
    reference: bool = False
    per_class_vendi: Dict[int, float] = field(default_factory=dict)
    per_class_cosine: Dict[int, float] = field(default_factory=dict)

    def as_json(self) -> Dict[str, Any]:
        """JSON-ready dict (NaN becomes ``null``; per-class keys are class indices as strings)."""
        return {
            "name": self.name,
            "path": self.path,
            "layout": self.layout,
            "reference": self.reference,
            "images": self.images,
            "classes": self.classes,
            "coverage": _finite(self.coverage),
            "vendi": _finite(self.vendi),
            "vendi_per_class": _finite(self.vendi_per_class),
            "intra_class_cosine": _finite(self.intra_class_cosine),
            "per_class": {
                "vendi": {str(c): _finite(v) for c, v in sorted(self.per_class_vendi.items())},
                "intra_class_cosine": {str(c): _finite(v) for c, v in sorted(self.per_class_cosine.items())},
            },
        }


def _finite(x: float) -> Optional[float]:
    x = float(x)
    return x if math.isfinite(x) else None


COLUMNS = ("set", "images", "classes", "coverage ↑", "vendi ↑", "vendi/class ↑", "intra-class cos ↓")


def _cells(row: MetricsRow) -> List[str]:
    def num(x: float, digits: int) -> str:
        return f"{x:.{digits}f}" if math.isfinite(float(x)) else "n/a"

    name = f"*{row.name}*" if row.reference else row.name
    return [name, str(row.images), str(row.classes), num(row.coverage, 4), num(row.vendi, 2),
            num(row.vendi_per_class, 3), num(row.intra_class_cosine, 4)]


def format_table(rows: Sequence[MetricsRow]) -> str:
    """A Markdown table, padded so it also reads as plain text."""
    cells = [list(COLUMNS)] + [_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]

    def line(values: Sequence[str]) -> str:
        # Names left-aligned, numbers right-aligned.
        return "| " + " | ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths))) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if i else (":" + "-" * (w + 1)) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(cells[0]), rule] + [line(c) for c in cells[1:]])


def markdown_report(rows: Sequence[MetricsRow], settings: Mapping[str, Any]) -> str:
    """``metrics.md``: settings, the table, and how to read it."""
    out = ["# dire-metrics", ""]
    for key, value in settings.items():
        out.append(f"- **{key}**: {value}")
    out += ["", format_table(rows), ""]
    out.append(
        "Coverage: share of real embeddings with a distilled embedding inside their k-nearest-neighbour "
        "ball (higher: the set spans more of the real data). Vendi: effective number of distinct "
        "embeddings, over the whole set and per class (higher: more diverse). Intra-class cosine: mean "
        "pairwise cosine similarity between embeddings of the same class (lower: more diverse). "
        "Per-class values are in metrics.json."
    )
    if any(r.reference for r in rows):
        out.append("")
        out.append("The reference row (italic) is a seeded random subset of the real embeddings with the "
                   "first set's images per class; its coverage counts points of the real set itself.")
    return "\n".join(out) + "\n"


def json_report(rows: Sequence[MetricsRow], settings: Mapping[str, Any], real: Mapping[str, Any]) -> str:
    """``metrics.json``: settings, the real set, one entry per distilled set, the reference."""
    doc = {
        "settings": dict(settings),
        "real": dict(real),
        "sets": [r.as_json() for r in rows if not r.reference],
        "reference": next((r.as_json() for r in rows if r.reference), None),
    }
    return json.dumps(doc, indent=2, allow_nan=False) + "\n"


# --- plots ----------------------------------------------------------------------------------------


def require_plotting(projection: str) -> None:
    """Fail early, in one line, when ``--plot`` is asked for without the ``plot`` extra."""
    require_extra(["matplotlib", "sklearn"] if projection == "tsne" else ["matplotlib"], "plot",
                  f"--plot{' --projection tsne' if projection == 'tsne' else ''}")


def _subsample(x: Tensor, n: int, seed: int) -> Tensor:
    if x.shape[0] <= n:
        return x
    g = torch.Generator().manual_seed(seed)
    return x[torch.randperm(x.shape[0], generator=g)[:n]]


def project_2d(real: Tensor, sets: Sequence[Tensor], method: str = "pca", seed: int = 0) -> Tuple[Tensor, List[Tensor]]:
    """2-D coordinates of (a subsample of) ``real`` and of every set.

    PCA is fitted on the real embeddings only, so every set lands in the same real-data frame and
    panels compare. t-SNE has no out-of-sample transform: it embeds real and sets together.
    """
    real = real.float()
    if method == "pca":
        fit = _subsample(real, MAX_REAL_PCA_FIT, seed)
        mean = fit.mean(0, keepdim=True)
        q = min(2, fit.shape[0], fit.shape[1])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # pca_lowrank's random projection
            _, _, v = torch.pca_lowrank(fit - mean, q=q, center=False)
        if v.shape[1] < 2:
            v = torch.cat([v, torch.zeros(v.shape[0], 2 - v.shape[1])], 1)
        shown = _subsample(real, MAX_REAL_SCATTER, seed)
        return (shown - mean) @ v, [(s.float() - mean) @ v for s in sets]
    if method == "tsne":
        from sklearn.manifold import TSNE

        shown = _subsample(real, MAX_REAL_TSNE, seed)
        joint = torch.cat([shown] + [s.float() for s in sets]).numpy()
        perplexity = float(max(1.0, min(30.0, (joint.shape[0] - 1) / 3)))
        coords = torch.from_numpy(
            TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(joint)
        ).float()
        sizes = [shown.shape[0]] + [s.shape[0] for s in sets]
        parts = list(torch.split(coords, sizes))
        return parts[0], parts[1:]
    raise DiReInputError(f"unknown projection {method!r}: pca or tsne")


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return buf.getvalue()


def _class_colors(num_classes: int) -> Any:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if num_classes <= 10 else "tab20" if num_classes <= 20 else "turbo"]
    return lambda c: cmap(c % 20 if num_classes <= 20 else c / max(1, num_classes - 1))


def embedding_scatter_png(
    real: Tensor,
    sets: Sequence[Tuple[str, Tensor, Tensor]],
    num_classes: int,
    projection: str = "pca",
    seed: int = 0,
    coverage: Optional[Sequence[float]] = None,
) -> bytes:
    """Figure 1: real embeddings (faint grey) behind each distilled set (coloured by class), one panel per set."""
    from matplotlib.figure import Figure

    real_2d, sets_2d = project_2d(real, [emb for _, emb, _ in sets], projection, seed)
    cols = min(3, len(sets))
    rows = math.ceil(len(sets) / cols)
    fig = Figure(figsize=(4.2 * cols, 4.0 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    color = _class_colors(num_classes)
    dense = real_2d.shape[0] > 500  # faint only where there are enough points to form a cloud
    for i, ((name, _, labels), xy) in enumerate(zip(sets, sets_2d)):
        ax = axes[i // cols][i % cols]
        ax.scatter(real_2d[:, 0], real_2d[:, 1], s=4 if dense else 10, c="0.55", alpha=0.15 if dense else 0.4,
                   linewidths=0, label="real")
        ax.scatter(xy[:, 0], xy[:, 1], s=16, c=[color(int(c)) for c in labels], edgecolors="k", linewidths=0.3)
        title = name if coverage is None else f"{name} (coverage {coverage[i]:.3f})"
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    for j in range(len(sets), rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.suptitle(f"Real (grey) vs distilled embeddings, {projection.upper()}", fontsize=11)
    return _png(fig)


def class_similarity_png(
    rows: Sequence[MetricsRow],
    class_names: Sequence[str],
) -> bytes:
    """Figure 2: intra-class cosine similarity per class, one line per set (the reference dashed grey)."""
    from matplotlib.figure import Figure

    classes = sorted({c for r in rows for c in r.per_class_cosine})
    fig = Figure(figsize=(max(6.0, min(16.0, 0.35 * len(classes) + 4)), 4.0))
    ax = fig.subplots()
    marker = "o" if len(classes) <= MAX_MARKED_CLASSES else None
    for row in rows:
        ys = [row.per_class_cosine.get(c, math.nan) for c in classes]
        style = dict(color="0.45", linestyle="--") if row.reference else dict(linestyle="-")
        label = row.name if row.per_class_cosine else f"{row.name} (one image per class: no pairs)"
        ax.plot(range(len(classes)), ys, marker=marker, markersize=4, lw=1.2, label=label, **style)
    if len(classes) <= MAX_MARKED_CLASSES:
        labels = [class_names[c] if c < len(class_names) else str(c) for c in classes]
        ax.set_xticks(range(len(classes)))
        ax.set_xticklabels(labels, rotation=45 if max(map(len, labels), default=0) > 4 else 0,
                           ha="right" if max(map(len, labels), default=0) > 4 else "center", fontsize=8)
    else:
        ax.set_xlabel("class index")
    ax.set_ylabel("intra-class cosine similarity\n(lower: more diverse)")
    ax.set_title("Class-wise similarity of distilled embeddings")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)
