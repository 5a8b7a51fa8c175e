"""The demo's report: one table and one measured verdict per family, ``report.md``/``report.json``
(and the ``ablation`` pair). Every sentence is computed from the numbers of this run: no claim is
fixed.

Each DiRe row is compared with vanilla of the same family and IPC, metric by metric, by the paired
t-test over synthesis seeds of :mod:`.stats` (for accuracy, each seed's difference is the mean over
its paired students); a difference is *beyond seed noise* when p < :data:`~.stats.ALPHA`.
"""
from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..io.files import atomic_write
from .stats import ALPHA, PairedTest, paired_t
from .variants import VANILLA

__all__ = ["ReportRow", "FamilySection", "markdown_table", "summary_table", "compare", "verdict", "write_report"]

#: (attribute, label, higher is better)
METRICS: Tuple[Tuple[str, str, bool], ...] = (
    ("accuracy", "accuracy", True),
    ("coverage", "coverage", True),
    ("vendi_per_class", "per-class Vendi", True),
    ("intra_class_cosine", "intra-class cosine", False),
)


@dataclass
class ReportRow:
    """One set of a family's table, over its synthesis seeds (metrics: one value per seed) and all
    students (accuracy).

    ``accuracy_pct`` is ordered synthesis seed first, then student seed, the same for every row,
    so that runs of two rows pair up (same student seed, same synthesis seed).
    """

    ipc: int
    key: str
    label: str
    images: int
    accuracy_pct: List[float]
    coverage_runs: List[float]
    vendi_per_class_runs: List[float]
    intra_class_cosine_runs: List[float]
    vendi_runs: List[float]
    family: str = "sre2l"
    reference: bool = False
    dire: bool = False
    weights: str = ""
    r_c: Optional[float] = None
    r_e: Optional[float] = None
    share: Optional[float] = None
    components: Optional[List[str]] = None
    per_class_vendi: Dict[int, float] = field(default_factory=dict)
    per_class_cosine: Dict[int, float] = field(default_factory=dict)
    manifests: List[str] = field(default_factory=list)
    terms_added: List[int] = field(default_factory=list)
    recover_seconds: List[float] = field(default_factory=list)
    #: Median gradient share of each DiRe run (manifest) and CPU seconds per synthesis iteration of each run.
    gradient_share: List[float] = field(default_factory=list)
    cpu_seconds_per_iteration: List[float] = field(default_factory=list)
    #: Calibrated weights of each DiRe run (``share``/default runs), MTT's learnt syn_lr per set.
    calibrated: List[Dict[str, float]] = field(default_factory=list)
    syn_lr: List[float] = field(default_factory=list)
    commands: List[List[str]] = field(default_factory=list)

    @property
    def seeds(self) -> int:
        return len(self.coverage_runs)

    @property
    def accuracy(self) -> float:
        return statistics.fmean(self.accuracy_pct)

    @property
    def accuracy_std(self) -> float:
        return statistics.stdev(self.accuracy_pct) if len(self.accuracy_pct) > 1 else 0.0

    def accuracy_by_seed(self) -> List[float]:
        """Mean accuracy of each synthesis seed's students."""
        per = len(self.accuracy_pct) // max(1, self.seeds)
        return [statistics.fmean(self.accuracy_pct[s * per:(s + 1) * per]) for s in range(self.seeds)]

    def runs(self, attr: str) -> List[float]:
        """One value per synthesis seed of a metric of :data:`METRICS`."""
        return self.accuracy_by_seed() if attr == "accuracy" else getattr(self, f"{attr}_runs")

    @property
    def coverage(self) -> float:
        return statistics.fmean(self.coverage_runs)

    @property
    def vendi_per_class(self) -> float:
        return statistics.fmean(self.vendi_per_class_runs)

    @property
    def intra_class_cosine(self) -> float:
        return statistics.fmean(self.intra_class_cosine_runs)

    @property
    def vendi(self) -> float:
        return statistics.fmean(self.vendi_runs)

    @property
    def share_median(self) -> Optional[float]:
        return statistics.median(self.gradient_share) if self.gradient_share else None

    @property
    def cpu_seconds_per_iteration_mean(self) -> Optional[float]:
        return statistics.fmean(self.cpu_seconds_per_iteration) if self.cpu_seconds_per_iteration else None

    def as_json(self) -> Dict[str, Any]:
        return {
            "family": self.family, "ipc": self.ipc, "key": self.key, "set": self.label, "reference": self.reference,
            "dire": self.dire, "weights": self.weights, "r_c": self.r_c, "r_e": self.r_e, "share": self.share,
            "components": self.components, "images": self.images, "synthesis_seeds": self.seeds,
            "accuracy_pct": {"mean": _r(self.accuracy), "std": _r(self.accuracy_std), "runs": [_r(a) for a in self.accuracy_pct],
                             "by_synthesis_seed": [_r(a) for a in self.accuracy_by_seed()]},
            "coverage": _r(self.coverage), "vendi_per_class": _r(self.vendi_per_class),
            "intra_class_cosine": _r(self.intra_class_cosine), "vendi": _r(self.vendi),
            "by_synthesis_seed": {attr: [_r(v) for v in self.runs(attr)] for attr, _, _ in METRICS[1:]},
            "per_class": {
                "vendi": {str(c): _r(v) for c, v in sorted(self.per_class_vendi.items())},
                "intra_class_cosine": {str(c): _r(v) for c, v in sorted(self.per_class_cosine.items())},
            },
            "gradient_share_median": [_r(s) for s in self.gradient_share],
            "cpu_seconds_per_iteration": [_r(s) for s in self.cpu_seconds_per_iteration],
            "calibrated_weights": self.calibrated, "syn_lr": [_r(v) for v in self.syn_lr],
            "dire_manifests": self.manifests, "terms_added": self.terms_added,
            "recover_seconds": [round(s, 2) for s in self.recover_seconds],
            "commands": self.commands,
        }


@dataclass
class FamilySection:
    """One family of the report: its rows, how they were made (``settings``) and what was measured."""

    family: str
    title: str
    rows: List[ReportRow]
    settings: Dict[str, Any]


def _r(x: Optional[float], digits: int = 6) -> Optional[float]:
    return round(float(x), digits) if x is not None and math.isfinite(float(x)) else None


def _cells(r: ReportRow, with_family: bool) -> List[str]:
    share = "" if r.share_median is None else f"{r.share_median:.3g}"
    spi = "" if r.cpu_seconds_per_iteration_mean is None else f"{1e3 * r.cpu_seconds_per_iteration_mean:.1f}"
    first = [r.family] if with_family else [str(r.ipc)]
    return first + [f"*{r.label}*" if r.reference else r.label, r.weights or "-", f"{r.accuracy:.2f} ± {r.accuracy_std:.2f}",
                    f"{r.coverage:.3f}", f"{r.vendi_per_class:.3f}", f"{r.intra_class_cosine:.3f}", share, spi]


def _table(head: List[str], body: List[List[str]], text_columns: Sequence[int]) -> str:
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) if i in text_columns else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"  # noqa: E731
    rule = "|" + "|".join((":" + "-" * (w + 1)) if i in text_columns else ("-" * (w + 1) + ":") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(head), rule] + [line(b) for b in body])


_HEAD = ["set", "weights", "test acc % (mean ± std)", "coverage ↑", "Vendi per class ↑", "intra-class cos ↓",
         "grad share", "CPU ms / iter"]


def markdown_table(rows: Sequence[ReportRow]) -> str:
    """One family's table, padded so it reads as plain text too."""
    return _table(["IPC"] + _HEAD, [_cells(r, False) for r in rows], text_columns=(1, 2))


def summary_table(rows: Sequence[ReportRow]) -> str:
    """Every family's rows in one table (the README's)."""
    return _table(["family"] + _HEAD, [_cells(r, True) for r in rows], text_columns=(0, 1, 2))


def _test(row: ReportRow, base: ReportRow, attr: str) -> PairedTest:
    return paired_t([a - b for a, b in zip(row.runs(attr), base.runs(attr))])


def compare(row: ReportRow, base: ReportRow) -> Dict[str, Any]:
    """``row`` against ``base`` on every metric: the difference, whether it is an improvement, and
    the paired t-test over synthesis seeds (mean and std of the per-seed differences, t, p, beyond
    seed noise)."""
    out: Dict[str, Any] = {"family": row.family, "ipc": row.ipc, "set": row.label, "key": row.key, "versus": base.label,
                           "synthesis_seeds": min(row.seeds, base.seeds), "test": f"paired t over synthesis seeds, "
                           f"two-sided, beyond seed noise at p < {ALPHA:g}"}
    for attr, _, higher in METRICS:
        a, b = getattr(row, attr), getattr(base, attr)
        test = _test(row, base, attr)
        out[f"{attr}_delta"] = _r(a - b)
        out[f"{attr}_improved"] = bool(a > b) if higher else bool(a < b)
        out[f"{attr}_test"] = {"mean_difference": _r(test.mean), "std": _r(test.std), "n": test.n, "t": _r(test.t),
                               "p": _r(test.p), "beyond_seed_noise": test.beyond_noise}
    pairs = list(zip(row.accuracy_pct, base.accuracy_pct))
    out["accuracy_paired_wins"] = sum(a > b for a, b in pairs)
    out["accuracy_pairs"] = len(pairs)
    return out


def _noise(test: Mapping[str, Any]) -> str:
    if test["p"] is None:
        return "one synthesis seed: no test" if test["n"] < 2 else "the same difference in every seed: no test"
    word = "beyond seed noise" if test["beyond_seed_noise"] else "within seed noise"
    return f"p = {test['p']:.3g}, {word}"


def _sentence(row: ReportRow, base: ReportRow, c: Mapping[str, Any]) -> str:
    word = lambda attr: "improved" if c[f"{attr}_improved"] else "not improved"  # noqa: E731
    parts = [
        f"accuracy {row.accuracy:.2f} vs {base.accuracy:.2f} % ({c['accuracy_delta']:+.2f} points, "
        f"{_noise(c['accuracy_test'])}; better in {c['accuracy_paired_wins']} of {c['accuracy_pairs']} paired students): "
        f"{word('accuracy')}"
    ]
    for attr, label, _ in METRICS[1:]:
        lower = " (lower is more diverse)" if attr == "intra_class_cosine" else ""
        parts.append(f"{label} {getattr(row, attr):.3f} vs {getattr(base, attr):.3f}{lower} "
                     f"({_noise(c[f'{attr}_test'])}): {word(attr)}")
    return f"{row.family}, IPC {row.ipc}, {row.label} vs {base.label}: " + "; ".join(parts) + "."


def verdict(rows: Sequence[ReportRow]) -> Tuple[List[str], List[Dict[str, Any]]]:
    """Sentences and comparisons: every DiRe row against vanilla of its family and IPC, and a
    count over the whole run of what moved beyond seed noise."""
    sentences: List[str] = []
    comparisons: List[Dict[str, Any]] = []
    groups: Dict[Tuple[str, int], List[ReportRow]] = {}
    for r in rows:
        groups.setdefault((r.family, r.ipc), []).append(r)
    for (_, _), at in groups.items():
        base = next((r for r in at if r.key == VANILLA.key), None)
        if base is None:
            continue
        for row in (r for r in at if r.dire):
            c = compare(row, base)
            comparisons.append(c)
            sentences.append(_sentence(row, base, c))
    if comparisons:
        n = len(comparisons)
        up = lambda attr: sum(bool(c[f"{attr}_improved"] and c[f"{attr}_test"]["beyond_seed_noise"]) for c in comparisons)  # noqa: E731
        down = lambda attr: sum(bool(not c[f"{attr}_improved"] and c[f"{attr}_test"]["beyond_seed_noise"]) for c in comparisons)  # noqa: E731
        sentences.append(
            f"Over the {n} DiRe-vs-vanilla comparisons of this run, beyond seed noise (paired t over synthesis seeds, "
            f"p < {ALPHA:g}): accuracy better in {up('accuracy')} and worse in {down('accuracy')}; coverage better in "
            f"{up('coverage')} and worse in {down('coverage')}; per-class Vendi higher in {up('vendi_per_class')} and "
            f"lower in {down('vendi_per_class')}; intra-class cosine lower (more diverse) in {up('intra_class_cosine')} "
            f"and higher in {down('intra_class_cosine')}."
        )
    return sentences, comparisons


def write_report(out: Path, name: str, title: str, sections: Sequence[FamilySection], settings: Mapping[str, Any],
                 note: str, figures: Optional[Mapping[str, Path]] = None,
                 extra: Optional[Mapping[str, Any]] = None) -> Tuple[Path, Path, List[str]]:
    """Write ``{name}.md`` and ``{name}.json``: the run's settings, every family's rows in one
    table, then one section per family (its settings, table, verdict, figures); returns their
    paths and the verdict sentences."""
    figures = dict(figures or {})
    rows = [r for s in sections for r in s.rows]
    sentences, comparisons = verdict(rows)
    md = [f"# {title}", ""]
    md += [f"- **{k}**: {v}" for k, v in settings.items()]
    md += ["", "## All families", "", summary_table(rows), "", note, ""]
    family_json = {}
    for section in sections:
        own, own_comparisons = verdict(section.rows)
        md += [f"## {section.title}", ""]
        md += [f"- **{k}**: {v}" for k, v in section.settings.items()]
        md += ["", markdown_table(section.rows), "", "### What this run says", ""]
        md += [f"- {s}" for s in own] or ["- (no DiRe row to compare)"]
        shown = {k: p for k, p in figures.items() if k.endswith(f"_{section.family}") or f"_{section.family}_" in k}
        if shown:
            md += ["", "### Figures", ""]
            md += [f"![{key}]({os.path.relpath(path, out)})" for key, path in shown.items()]
        md.append("")
        family_json[section.family] = {"title": section.title, "settings": section.settings,
                                       "comparisons": own_comparisons, "verdict": own}
    rest = {k: p for k, p in figures.items() if not any(k.endswith(f"_{s.family}") or f"_{s.family}_" in k for s in sections)}
    if rest:
        md += ["## Across families", ""] + [f"![{key}]({os.path.relpath(path, out)})" for key, path in rest.items()] + [""]
    md += ["## The whole run", ""] + [f"- {s}" for s in sentences[-1:]]
    md_path, json_path = out / f"{name}.md", out / f"{name}.json"
    # Atomic: a run killed here never leaves half a report for a script that reads report.json.
    atomic_write(md_path, "\n".join(md) + "\n")
    doc = {"title": title, "settings": dict(settings), "rows": [r.as_json() for r in rows], "families": family_json,
           "comparisons": comparisons, "verdict": sentences,
           "figures": {key: os.path.relpath(path, out) for key, path in figures.items()}, **(extra or {})}
    atomic_write(json_path, json.dumps(doc, indent=2, allow_nan=False) + "\n")
    return md_path, json_path, sentences
