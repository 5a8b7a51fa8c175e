"""The demo's report: the table, the measured verdict, ``report.md``/``report.json`` (and the
``ablation`` pair). Every sentence is computed from the numbers of this run: no claim is fixed."""
from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..io.files import atomic_write
from .variants import VANILLA

__all__ = ["ReportRow", "markdown_table", "compare", "verdict", "write_report"]

#: (attribute, label, higher is better)
METRICS: Tuple[Tuple[str, str, bool], ...] = (
    ("accuracy", "accuracy", True),
    ("coverage", "coverage", True),
    ("vendi_per_class", "per-class Vendi", True),
    ("intra_class_cosine", "intra-class cosine", False),
)


@dataclass
class ReportRow:
    """One set of the table, aggregated over synthesis seeds (metrics) and all students (accuracy).

    ``accuracy_pct`` is ordered synthesis seed first, then student seed, the same for every row,
    so that runs of two rows pair up (same student seed, same synthesis seed index).
    """

    ipc: int
    key: str
    label: str
    images: int
    accuracy_pct: List[float]
    coverage: float
    vendi_per_class: float
    intra_class_cosine: float
    vendi: float
    reference: bool = False
    r_c: Optional[float] = None
    r_e: Optional[float] = None
    components: Optional[List[str]] = None
    per_class_vendi: Dict[int, float] = field(default_factory=dict)
    per_class_cosine: Dict[int, float] = field(default_factory=dict)
    manifests: List[str] = field(default_factory=list)
    terms_added: List[int] = field(default_factory=list)
    recover_seconds: List[float] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return statistics.fmean(self.accuracy_pct)

    @property
    def accuracy_std(self) -> float:
        return statistics.stdev(self.accuracy_pct) if len(self.accuracy_pct) > 1 else 0.0

    def as_json(self) -> Dict[str, Any]:
        return {
            "ipc": self.ipc, "key": self.key, "set": self.label, "reference": self.reference,
            "r_c": self.r_c, "r_e": self.r_e, "components": self.components, "images": self.images,
            "accuracy_pct": {"mean": _r(self.accuracy), "std": _r(self.accuracy_std), "runs": [_r(a) for a in self.accuracy_pct]},
            "coverage": _r(self.coverage), "vendi_per_class": _r(self.vendi_per_class),
            "intra_class_cosine": _r(self.intra_class_cosine), "vendi": _r(self.vendi),
            "per_class": {
                "vendi": {str(c): _r(v) for c, v in sorted(self.per_class_vendi.items())},
                "intra_class_cosine": {str(c): _r(v) for c, v in sorted(self.per_class_cosine.items())},
            },
            "dire_manifests": self.manifests, "terms_added": self.terms_added,
            "recover_seconds": [round(s, 2) for s in self.recover_seconds],
        }


def _r(x: float, digits: int = 6) -> Optional[float]:
    return round(float(x), digits) if math.isfinite(float(x)) else None


def markdown_table(rows: Sequence[ReportRow]) -> str:
    """The table, padded so it reads as plain text too."""
    head = ["IPC", "set", "test acc % (mean ± std)", "coverage ↑", "Vendi per class ↑", "intra-class cos ↓"]
    body = [[str(r.ipc), f"*{r.label}*" if r.reference else r.label, f"{r.accuracy:.2f} ± {r.accuracy_std:.2f}",
             f"{r.coverage:.3f}", f"{r.vendi_per_class:.3f}", f"{r.intra_class_cosine:.3f}"] for r in rows]
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) if i == 1 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"  # noqa: E731
    rule = "|" + "|".join((":" + "-" * (w + 1)) if i == 1 else ("-" * (w + 1) + ":") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(head), rule] + [line(b) for b in body])


def compare(row: ReportRow, base: ReportRow) -> Dict[str, Any]:
    """``row`` against ``base`` on every metric: deltas, and whether each improved."""
    out: Dict[str, Any] = {"ipc": row.ipc, "set": row.label, "key": row.key, "versus": base.label}
    for attr, _, higher in METRICS:
        a, b = getattr(row, attr), getattr(base, attr)
        out[f"{attr}_delta"] = _r(a - b)
        out[f"{attr}_improved"] = bool(a > b) if higher else bool(a < b)
    pairs = list(zip(row.accuracy_pct, base.accuracy_pct))
    out["accuracy_paired_wins"] = sum(a > b for a, b in pairs)
    out["accuracy_pairs"] = len(pairs)
    # One student's spread is the noise floor: a smaller gap is not a finding. One student per
    # set has no spread to compare with (None).
    spread = len(row.accuracy_pct) > 1 and len(base.accuracy_pct) > 1
    out["accuracy_beyond_one_std"] = (
        abs(row.accuracy - base.accuracy) > max(row.accuracy_std, base.accuracy_std) if spread else None
    )
    return out


def _sentence(row: ReportRow, base: ReportRow, c: Mapping[str, Any]) -> str:
    word = lambda ok: "improved" if ok else "not improved"  # noqa: E731
    noise = {True: "more than one std", False: "within one std", None: "one student: no spread"}[c["accuracy_beyond_one_std"]]
    return (
        f"IPC {row.ipc}, {row.label} vs {base.label}: accuracy {row.accuracy:.2f} vs {base.accuracy:.2f} % "
        f"({c['accuracy_delta']:+.2f} points, {noise}; better in {c['accuracy_paired_wins']} of "
        f"{c['accuracy_pairs']} paired students): {word(c['accuracy_improved'])}; "
        f"coverage {row.coverage:.3f} vs {base.coverage:.3f}: {word(c['coverage_improved'])}; "
        f"per-class Vendi {row.vendi_per_class:.3f} vs {base.vendi_per_class:.3f}: {word(c['vendi_per_class_improved'])}; "
        f"intra-class cosine {row.intra_class_cosine:.3f} vs {base.intra_class_cosine:.3f} (lower is more diverse): "
        f"{word(c['intra_class_cosine_improved'])}."
    )


def _winners(rows: Sequence[ReportRow]) -> str:
    parts = []
    for attr, label, higher in METRICS:
        best = (max if higher else min)(rows, key=lambda r: getattr(r, attr))
        parts.append(f"{label}: {best.label}")
    return "; ".join(parts)


def verdict(rows: Sequence[ReportRow]) -> Tuple[List[str], List[Dict[str, Any]]]:
    """Sentences and comparisons: every DiRe row against vanilla at its IPC, who wins what among
    the DiRe rows, and a count over the whole run."""
    sentences: List[str] = []
    comparisons: List[Dict[str, Any]] = []
    for ipc in sorted({r.ipc for r in rows}):
        at = [r for r in rows if r.ipc == ipc]
        base = next((r for r in at if r.key == VANILLA.key), None)
        dire = [r for r in at if r.r_c is not None]
        if base is None:
            continue
        for row in dire:
            c = compare(row, base)
            comparisons.append(c)
            sentences.append(_sentence(row, base, c))
        if len(dire) > 1:
            sentences.append(f"IPC {ipc}, best DiRe setting per metric: {_winners(dire)}.")
    if comparisons:
        n = len(comparisons)
        counts = {attr: sum(c[f"{attr}_improved"] for c in comparisons) for attr, _, _ in METRICS}
        diversity = sum(c["vendi_per_class_improved"] and c["intra_class_cosine_improved"] for c in comparisons)
        sentences.append(
            f"In this run DiRe improved over vanilla: accuracy in {counts['accuracy']} of {n} comparisons "
            f"({sum(bool(c['accuracy_improved'] and c['accuracy_beyond_one_std']) for c in comparisons)} by more than one std), "
            f"coverage in {counts['coverage']} of {n}, within-class diversity (per-class Vendi up and "
            f"intra-class cosine down) in {diversity} of {n}."
        )
    return sentences, comparisons


def write_report(out: Path, name: str, title: str, rows: Sequence[ReportRow], settings: Mapping[str, Any],
                 note: str, figures: Optional[Mapping[str, Path]] = None,
                 extra: Optional[Mapping[str, Any]] = None) -> Tuple[Path, Path, List[str]]:
    """Write ``{name}.md`` and ``{name}.json`` (figures linked by relative path; ``note``, how the
    numbers were measured, under the table); returns their paths and the verdict sentences."""
    sentences, comparisons = verdict(rows)
    md = [f"# {title}", ""]
    md += [f"- **{k}**: {v}" for k, v in settings.items()]
    md += ["", markdown_table(rows), "", "## What this run says", ""]
    md += [f"- {s}" for s in sentences] or ["- (no DiRe row to compare)"]
    md += ["", note]
    figures = dict(figures or {})
    if figures:
        md += ["", "## Figures", ""]
        md += [f"![{key}]({os.path.relpath(path, out)})" for key, path in figures.items()]
    md_path, json_path = out / f"{name}.md", out / f"{name}.json"
    # Atomic: a run killed here never leaves half a report for a script that reads report.json.
    atomic_write(md_path, "\n".join(md) + "\n")
    doc = {"title": title, "settings": dict(settings), "rows": [r.as_json() for r in rows],
           "comparisons": comparisons, "verdict": sentences,
           "figures": {key: os.path.relpath(path, out) for key, path in figures.items()}, **(extra or {})}
    atomic_write(json_path, json.dumps(doc, indent=2, allow_nan=False) + "\n")
    return md_path, json_path, sentences
