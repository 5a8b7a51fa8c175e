"""``dire demo`` from start to end: data → teacher → recover (vanilla and + DiRe, through the
launcher) with the students of each set trained as soon as it exists → metrics → report, figures.

Digits (the default) run on the CPU in a few minutes; CIFAR-10/100 (``--dataset``, ``--data-path``)
run the same pipeline with a ResNet-18, on the GPU when there is one.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from tqdm import tqdm

from ..errors import DiReInputError
from .data import DemoData, check_data, check_images_per_class, load_data, real_subset
from .evaluate import StudentPool
from .log import log
from .measure import SetMetrics, embed, set_metrics
from .relabel import StudentSettings
from .synth import SynthContext, SynthJob, SynthResult, run_synthesis
from .tables import ReportRow, markdown_table, write_report
from .spec import DATASETS, DIGITS, DatasetSpec
from .teacher import load_or_train_teacher, teacher_settings
from .variants import ABLATION_VARIANTS, MAIN_VARIANTS, REAL_KEY, REAL_LABEL, Variant

__all__ = ["DemoOptions", "DemoResult", "check_folders", "default_cache_dir", "run_demo", "summary"]


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/dire/demo`` (``~/.cache/dire/demo``): the digits ImageFolder, teachers, bank."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dire" / "demo"


def default_iterations(ipc: int, dataset: DatasetSpec = DIGITS) -> int:
    """Recover iterations per batch. Digits: DEMO-FINDINGS' 200 at IPC 10 and 100 at IPC 50
    (fewer iterations widen the vanilla/DiRe gap rather than hide it). CIFAR: half of SRe²L's
    1,000 for its CIFAR script, a demo's budget."""
    if dataset is not DIGITS:
        return 500
    return 200 if ipc <= 10 else 100


def default_jobs(device: torch.device) -> int:
    """Processes at once: one per core on the CPU (at most 8); on a GPU 4, which fill it with the
    small recover batches while leaving a laptop GPU's memory room for each one's CUDA context."""
    return 4 if device.type == "cuda" else max(1, min(os.cpu_count() or 1, 8))


def default_student_steps(dataset: DatasetSpec = DIGITS) -> int:
    """Student training steps: digits as DEMO-FINDINGS measured; CIFAR's ResNet-18 needs more."""
    return 400 if dataset is DIGITS else 1000


#: Real embeddings coverage is measured against, at most (a seeded random subset of CIFAR's 50,000:
#: the k-NN radii cost grows with the square of their number; all 1,347 digits are used).
COVERAGE_REAL = 10_000


@dataclass
class DemoOptions:
    """Settings of one demo run (the CLI's flags)."""

    out: Path = Path("dire-demo")
    ipcs: Tuple[int, ...] = (10, 50)
    seeds: int = 3  # students per set
    syn_seeds: int = 1  # synthetic sets per variant and IPC
    iterations: Optional[int] = None  # None: default_iterations(ipc, dataset)
    student_steps: Optional[int] = None  # None: default_student_steps(dataset)
    r_bn: float = 0.01
    jobs: Optional[int] = None  # None: default_jobs(device)
    cache_dir: Optional[Path] = None
    ablation: bool = False
    quick: bool = False
    plots: bool = True
    progress: bool = True
    dataset: str = "digits"
    data_path: Optional[Path] = None
    teacher_epochs: Optional[int] = None  # None: the dataset's recipe
    device: Optional[str] = None  # None: cuda when available

    @classmethod
    def quick_run(cls, **overrides: Any) -> "DemoOptions":
        """``--quick``: IPC 10 only, fewer iterations, steps and seeds (CI runs it end to end)."""
        base = dict(ipcs=(10,), seeds=2, iterations=60, student_steps=100, quick=True)
        return cls(**{**base, **overrides})

    @property
    def spec(self) -> DatasetSpec:
        return DATASETS[self.dataset]

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def iterations_for(self, ipc: int) -> int:
        return self.iterations or default_iterations(ipc, self.spec)

    @property
    def parallel(self) -> int:
        return self.jobs or default_jobs(self.torch_device)

    @property
    def students(self) -> StudentSettings:
        d = self.spec
        return StudentSettings(steps=self.student_steps or default_student_steps(d), max_shift=d.max_shift,
                               flip=d.flip, arch=d.arch, num_classes=d.num_classes)

    @property
    def variants(self) -> Tuple[Variant, ...]:
        return ABLATION_VARIANTS if self.ablation else MAIN_VARIANTS

    @property
    def mode(self) -> str:
        return "ablation" if self.ablation else "quick" if self.quick else "default"


@dataclass
class DemoResult:
    """What a run produced: the rows of its table, the files written, the verdict, its wall time."""

    rows: List[ReportRow]
    files: Dict[str, Path]
    verdict: List[str]
    seconds: float


@dataclass
class _Sets:
    """Every set of the run under one name, ``ipc{N}/{key}/seed{s}``, with what was learnt of it."""

    data: Dict[str, Tuple[Tensor, Tensor]] = field(default_factory=dict)
    synth: Dict[str, SynthResult] = field(default_factory=dict)
    accuracy: Dict[str, List[float]] = field(default_factory=dict)
    embeddings: Dict[str, Tensor] = field(default_factory=dict)
    metrics: Dict[str, SetMetrics] = field(default_factory=dict)


def check_folders(out: Path, cache: Path) -> None:
    """Refuse, before any work, an output or cache folder that cannot be one: the path itself, or
    the nearest of its parents that exists, is a file (``mkdir`` would fail after minutes of work)."""
    for flag, path in (("--out", out), ("--cache-dir", cache)):
        existing = path
        while not existing.exists() and existing.parent != existing:
            existing = existing.parent
        if existing.is_dir():
            continue
        kind = "a file" if existing.is_file() else "something else"
        where = f"{flag} {path} is" if existing == path else f"{flag} {path}: {existing} is"
        raise DiReInputError(f"{where} {kind}, not a folder")


def _name(ipc: int, key: str, seed: int) -> str:
    return f"ipc{ipc}/{key}/seed{seed}"


def _synthesise_and_evaluate(opts: DemoOptions, data: DemoData, teacher_path: Path, cache: Path,
                             out: Path, timings: Dict[str, float]) -> _Sets:
    """Recover runs and students share the cores: a set's students start when its run ends."""
    sets = _Sets()
    for ipc in opts.ipcs:
        for s in range(opts.syn_seeds):
            sets.data[_name(ipc, REAL_KEY, s)] = real_subset(data, ipc, seed=s)
    ctx = SynthContext(teacher=teacher_path, real_data=data.real_dir, bank_cache=cache / "bank", out=out / "synthetic",
                       r_bn=opts.r_bn, dataset=opts.dataset, device=opts.torch_device.type)
    jobs = [SynthJob(v, ipc, s, opts.iterations_for(ipc)) for ipc in opts.ipcs for v in opts.variants
            for s in range(opts.syn_seeds)]
    seeds = range(opts.seeds)
    t = time.perf_counter()
    with StudentPool(teacher_path, data.test_x, data.test_y, opts.students, opts.parallel,
                     total=opts.seeds * (len(sets.data) + len(jobs)), progress=opts.progress,
                     device=opts.torch_device) as pool:
        for name, (x, _) in sets.data.items():
            pool.submit(name, x, seeds)
        sets.synth = run_synthesis(jobs, ctx, opts.parallel, out / "logs", opts.progress,
                                   on_done=lambda r: pool.submit(r.job.name, r.images, seeds))
        timings["recover"] = time.perf_counter() - t
        checked = sum(1 for r in sets.synth.values() if r.manifest)
        log(f"recover: {len(jobs)} sets in {timings['recover']:.1f} s; every one of the {checked} DiRe runs got "
             f"the term on every synthesis step (dire_manifest.json checked)")
        sets.accuracy = pool.results()
    timings["recover+students"] = time.perf_counter() - t
    sets.data.update({name: (r.images, r.labels) for name, r in sets.synth.items()})
    return sets


def _measure(opts: DemoOptions, teacher: torch.nn.Module, sets: _Sets, real_emb: Tensor) -> None:
    for name, (x, y) in tqdm(sets.data.items(), desc="metrics", unit="set", disable=not opts.progress):
        sets.embeddings[name] = embed(teacher, x)
        sets.metrics[name] = set_metrics(real_emb, sets.embeddings[name], y)


def _aggregate(ipc: int, variant: Optional[Variant], names: Sequence[str], sets: _Sets) -> ReportRow:
    """One row: metrics averaged over the synthesis seeds; every student's accuracy kept."""
    ms = [sets.metrics[n] for n in names]
    results = [sets.synth[n] for n in names if n in sets.synth]
    mean = statistics.fmean
    classes = sorted(ms[0].per_class_cosine)
    return ReportRow(
        ipc=ipc,
        key=variant.key if variant else REAL_KEY,
        label=variant.label if variant else REAL_LABEL,
        images=len(sets.data[names[0]][0]),
        accuracy_pct=[100.0 * a for n in names for a in sets.accuracy[n]],
        coverage=mean([m.coverage for m in ms]),
        vendi_per_class=mean([m.vendi_per_class for m in ms]),
        intra_class_cosine=mean([m.intra_class_cosine for m in ms]),
        vendi=mean([m.vendi for m in ms]),
        reference=variant is None,
        r_c=variant.r_c if variant else None,
        r_e=variant.r_e if variant else None,
        components=list(variant.components) if variant and variant.components else None,
        per_class_vendi={c: mean([m.per_class_vendi.get(c, float("nan")) for m in ms]) for c in classes},
        per_class_cosine={c: mean([m.per_class_cosine[c] for m in ms]) for c in classes},
        manifests=[str(r.folder / "dire_manifest.json") for r in results if r.manifest],
        terms_added=[int(r.manifest["terms_added"]) for r in results if r.manifest],
        recover_seconds=[r.seconds for r in results],
    )


def _rows(opts: DemoOptions, sets: _Sets) -> List[ReportRow]:
    return [
        _aggregate(ipc, v, [_name(ipc, v.key if v else REAL_KEY, s) for s in range(opts.syn_seeds)], sets)
        for ipc in opts.ipcs for v in (None, *opts.variants)
    ]


def _figures(opts: DemoOptions, out: Path, rows: Sequence[ReportRow], sets: _Sets, real_emb: Tensor) -> Dict[str, Path]:
    """The three figures per IPC, from the first synthesis seed; none without matplotlib."""
    from .plots import PlotSet, matplotlib_available, write_figures

    if not matplotlib_available():
        log("figures skipped: matplotlib is not installed (pip install 'dire-plugin[plot]')")
        return {}
    files: Dict[str, Path] = {}
    for ipc in opts.ipcs:
        shown = []
        for row in (r for r in rows if r.ipc == ipc):
            n = _name(ipc, row.key, 0)
            shown.append(PlotSet(row.label, *sets.data[n], sets.embeddings[n], sets.metrics[n], row.reference))
        files.update(write_figures(out, ipc, real_emb, shown, opts.spec, suffix="_ablation" if opts.ablation else ""))
    return files


def _settings(opts: DemoOptions, data: DemoData, teacher_acc: float, coverage_real: int) -> Dict[str, Any]:
    student = opts.students
    flip = " and flip" if student.flip else ""
    settings: Dict[str, Any] = {
        "mode": opts.mode + (" (a smoke run: fewer iterations, steps and students, so noisier numbers; "
                             "read the default run)" if opts.quick else ""),
        "data": data.source,
        "device": str(opts.torch_device),
        "ipc": list(opts.ipcs),
        "recover iterations": {ipc: opts.iterations_for(ipc) for ipc in opts.ipcs},
        "r_bn": opts.r_bn, "students per set": opts.seeds, "synthetic sets per variant": opts.syn_seeds,
        "student": f"{student.arch}, {student.steps} steps, batch {student.batch_size}, AdamW {student.lr:g}, "
                   f"KL at T={student.temperature:g}, ±{student.max_shift} px shift{flip}",
        "coverage reference": f"{coverage_real} of {len(data.train_y)} real training images",
        "teacher test accuracy %": round(100 * teacher_acc, 2),
        "DiRe": "through the hook runtime (python -m dire_plugin.cli.run demo recover.py ...), reduction mean",
    }
    if opts.ablation:
        settings["ablation weights"] = "r_c 1, r_e 0.01, terms switched with the launcher's --components"
    return settings


def run_demo(opts: DemoOptions) -> DemoResult:
    """Run the whole demo; writes everything under ``opts.out`` and returns the rows and paths."""
    started = time.perf_counter()
    timings: Dict[str, float] = {}
    check_data(opts.dataset, opts.data_path)  # bad input stops the run before anything is written
    cache = Path(opts.cache_dir or default_cache_dir()).expanduser().resolve()
    out = Path(opts.out).expanduser().resolve()
    check_folders(out, cache)
    t = time.perf_counter()
    data = load_data(opts.dataset, opts.data_path, cache)
    check_images_per_class(data, max(opts.ipcs))
    timings["data"] = time.perf_counter() - t
    out.mkdir(parents=True, exist_ok=True)
    log(f"{opts.mode} run: IPC {', '.join(map(str, opts.ipcs))}; {len(opts.variants)} synthetic sets per IPC "
         f"({', '.join(v.label for v in opts.variants)}) + a real reference; {opts.seeds} student{'s' * (opts.seeds != 1)} per set; "
         f"{opts.parallel} parallel jobs on {opts.torch_device.type}; output {out}; cache {cache}")
    log(f"data: {data.source}; {len(data.train_y)} train / {len(data.test_y)} test images")

    t = time.perf_counter()
    device = opts.torch_device
    settings = teacher_settings(opts.spec, opts.teacher_epochs)
    if device.type == "cpu" and opts.spec is not DIGITS:
        log("no GPU: the ResNet-18 teacher and students run on the CPU, which takes hours on full CIFAR")
    teacher_path, teacher, teacher_acc, hit = load_or_train_teacher(data, cache, settings, device, opts.progress)
    timings["teacher"] = time.perf_counter() - t
    log(f"teacher: {100 * teacher_acc:.2f} % test accuracy ({'cached' if hit else 'trained'}, "
         f"{timings['teacher']:.1f} s) {teacher_path}")

    sets = _synthesise_and_evaluate(opts, data, teacher_path, cache, out, timings)

    t = time.perf_counter()
    real_x = data.train_x
    if len(real_x) > COVERAGE_REAL:
        real_x = real_x[torch.randperm(len(real_x), generator=torch.Generator().manual_seed(0))[:COVERAGE_REAL]]
    real_emb = embed(teacher, real_x)
    _measure(opts, teacher, sets, real_emb)
    rows = _rows(opts, sets)
    timings["metrics"] = time.perf_counter() - t

    t = time.perf_counter()
    figures = _figures(opts, out, rows, sets, real_emb) if opts.plots else {}
    timings["figures"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - started
    where = "scikit-learn digits" if opts.spec is DIGITS else opts.spec.name.upper()
    name, title = (("ablation", f"DiRe demo: ablation of the terms ({where}, SRe²L-style)") if opts.ablation
                   else ("report", f"DiRe demo: SRe²L ± DiRe on {where}"))
    extra = {
        "teacher": {"checkpoint": str(teacher_path), "test_accuracy_pct": round(100 * teacher_acc, 4), "cached": hit,
                    "settings": asdict(settings)},
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
    }
    note = (f"Accuracy: students trained on each set from the teacher's soft labels, tested on the "
            f"{len(data.test_y):,} held-out images (mean ± sample std over every student). Coverage, per-class "
            f"Vendi and intra-class cosine are measured on the teacher's penultimate embeddings; coverage against "
            f"{len(real_emb):,} real training images. The reference row (italic) is a random subset of the real "
            f"training images with the same images per class.")
    md, js, sentences = write_report(out, name, title, rows, _settings(opts, data, teacher_acc, len(real_emb)), note,
                                     figures, extra)
    files = {md.name: md, js.name: js, **figures}
    return DemoResult(rows, files, sentences, time.perf_counter() - started)


def summary(result: DemoResult) -> str:
    """What ``dire demo`` prints at the end: the table, the verdict, the files, the time."""
    lines = ["", markdown_table(result.rows), ""]
    lines += [f"- {s}" for s in result.verdict]
    lines += ["", "Written:"] + [f"  {p}" for p in result.files.values()]
    lines.append(f"Done in {result.seconds:.0f} s.")
    return "\n".join(lines)
