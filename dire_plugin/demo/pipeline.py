"""``dire demo`` from start to end: data → teacher (and the MTT family's experts) → every family's
script, vanilla and + DiRe through the launcher, with the students of each set trained as soon as
it exists → metrics → report, figures.

Digits (the default) run on the CPU, every family (``--method all``) within a few minutes;
CIFAR-10/100 (``--dataset``, ``--data-path``) run the SRe²L family with a ResNet-18, on the GPU
when there is one.
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
from .experts import ExpertSettings, load_or_train_experts
from .families import FAMILIES, HARD_LABELS, Family
from .hardlabel import HardLabelSettings
from .log import log
from .measure import SetMetrics, embed, set_metrics
from .relabel import StudentSettings
from .spec import DATASETS, DIGITS, FAMILY_NAMES, METHOD_CHOICES, DatasetSpec
from .synth import SynthContext, SynthJob, SynthResult, run_synthesis
from .tables import FamilySection, ReportRow, summary_table, write_report
from .teacher import load_or_train_teacher, teacher_settings
from .variants import ABLATION_VARIANTS, COMMON_SHARE, MAIN_VARIANTS, REAL_KEY, REAL_LABEL, Variant

__all__ = ["DemoOptions", "DemoResult", "METHOD_CHOICES", "check_folders", "default_cache_dir", "resolve_families",
           "run_demo", "summary"]

def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/dire/demo`` (``~/.cache/dire/demo``): the digits ImageFolder, teachers, experts, bank."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dire" / "demo"


def default_jobs(device: torch.device) -> int:
    """Processes at once: one per core on the CPU (at most 8); on a GPU 4, which fill it with the
    small batches while leaving a laptop GPU's memory room for each one's CUDA context."""
    return 4 if device.type == "cuda" else max(1, min(os.cpu_count() or 1, 8))


def resolve_families(method: Optional[str], dataset: str, ablation: bool) -> Tuple[str, ...]:
    """The families a run distils: ``--method`` (``all``: every one); without it, every family on
    digits, SRe²L alone for CIFAR and ``--ablation`` (the only ones written for them). A family that
    cannot run there is a one-line :class:`DiReInputError`."""
    if method is None:
        method = "all" if dataset == "digits" and not ablation else "sre2l"
    if method not in METHOD_CHOICES:
        raise DiReInputError(f"--method {method!r}: choose one of {', '.join(METHOD_CHOICES)}")
    families = FAMILY_NAMES if method == "all" else (method,)
    if (dataset != "digits" or ablation) and families != ("sre2l",):
        what = f"--dataset {dataset}" if dataset != "digits" else "--ablation"
        raise DiReInputError(f"{what} runs the sre2l family only (its script is the one written for it); "
                             f"--method {method} is not available there")
    return families


#: Real embeddings coverage is measured against, at most (a seeded random subset of CIFAR's 50,000:
#: the k-NN radii cost grows with the square of their number; all 1,347 digits are used).
COVERAGE_REAL = 10_000


@dataclass
class DemoOptions:
    """Settings of one demo run (the CLI's flags)."""

    out: Path = Path("dire-demo")
    method: Optional[str] = None  # None: every family on digits, sre2l on CIFAR and for --ablation
    ipcs: Optional[Tuple[int, ...]] = None  # None: 10 on digits, 10 and 50 on CIFAR
    seeds: int = 2  # students per set, paired across the variants of a synthesis seed
    syn_seeds: int = 3  # synthetic sets per variant and IPC (the independent unit of the verdict)
    iterations: Optional[int] = None  # None: each family's own (families.FAMILIES)
    student_steps: Optional[int] = None  # None: default_student_steps
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
        """``--quick``: two synthesis seeds, one student each, fewer iterations and steps (CI runs it
        end to end; its numbers are noisy)."""
        base = dict(seeds=1, syn_seeds=2, student_steps=60, quick=True)
        return cls(**{**base, **overrides})

    @property
    def spec(self) -> DatasetSpec:
        return DATASETS[self.dataset]

    @property
    def families(self) -> Tuple[str, ...]:
        return resolve_families(self.method, self.dataset, self.ablation)

    @property
    def ipc_list(self) -> Tuple[int, ...]:
        if self.ipcs:
            return self.ipcs
        return (10,) if self.spec is DIGITS or self.ablation else (10, 50)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def iterations_for(self, family: Family) -> int:
        if self.iterations:
            return self.iterations
        if self.spec is not DIGITS:
            return 500  # CIFAR: half of SRe²L's 1,000 for its CIFAR script, a demo's budget
        return family.quick_iterations if self.quick else family.iterations

    @property
    def parallel(self) -> int:
        return self.jobs or default_jobs(self.torch_device)

    def protocol(self, family: Family) -> Any:
        """How the sets of ``family`` are evaluated (its own method's protocol)."""
        d = self.spec
        if family.protocol == HARD_LABELS:
            return HardLabelSettings(steps=self.student_steps or 200, num_classes=d.num_classes)
        steps = self.student_steps or (150 if d is DIGITS else 1000)
        return StudentSettings(steps=steps, max_shift=d.max_shift, flip=d.flip, arch=d.arch, num_classes=d.num_classes)

    @property
    def variants(self) -> Tuple[Variant, ...]:
        return ABLATION_VARIANTS if self.ablation else MAIN_VARIANTS

    @property
    def mode(self) -> str:
        return "ablation" if self.ablation else "quick" if self.quick else "default"


@dataclass
class DemoResult:
    """What a run produced: the rows of its tables, the files written, the verdict, its wall time."""

    rows: List[ReportRow]
    files: Dict[str, Path]
    verdict: List[str]
    seconds: float
    cpu_seconds: Optional[float] = None


@dataclass
class _Sets:
    """Every set of the run under one name (``{family}/ipc{N}/{key}/seed{s}``; the real subsets
    ``real/ipc{N}/seed{s}``, their students ``real/{protocol}/ipc{N}/seed{s}``), with what was learnt."""

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


def _name(family: str, ipc: int, key: str, seed: int) -> str:
    return f"{family}/ipc{ipc}/{key}/seed{seed}"


def _real(ipc: int, seed: int) -> str:
    return f"real/ipc{ipc}/seed{seed}"


def _real_students(family: Family, ipc: int, seed: int) -> str:
    """The real subset's students under the family's protocol (shared by families with the same one)."""
    return f"real/{family.protocol}/ipc{ipc}/seed{seed}"


def _synthesise_and_evaluate(opts: DemoOptions, data: DemoData, teacher_path: Path, cache: Path, out: Path,
                             experts: Optional[Path], timings: Dict[str, float]) -> _Sets:
    """Synthesis runs and students share the cores: a set's students start when its run ends."""
    sets = _Sets()
    families = [FAMILIES[f] for f in opts.families]
    for ipc in opts.ipc_list:
        for s in range(opts.syn_seeds):
            sets.data[_real(ipc, s)] = real_subset(data, ipc, seed=s)
    ctx = SynthContext(teacher=teacher_path, real_data=data.real_dir, bank_cache=cache / "bank", out=out / "synthetic",
                       r_bn=opts.r_bn, dataset=opts.dataset, device=opts.torch_device.type, experts=experts)
    jobs = [SynthJob(f.name, v, ipc, s, opts.iterations_for(f)) for f in families for ipc in opts.ipc_list
            for v in opts.variants for s in range(opts.syn_seeds)]
    for job in jobs:
        job.spec.prepare(job, ctx, sets.data[_real(job.ipc, job.seed)])
    students = range(opts.seeds)
    # One set of students per real subset and protocol: families of one protocol share them.
    real_keys: Dict[str, Tuple[Family, int, int]] = {}
    for f in families:
        for ipc in opts.ipc_list:
            for s in range(opts.syn_seeds):
                real_keys.setdefault(_real_students(f, ipc, s), (f, ipc, s))

    def submit(result: SynthResult) -> None:
        protocol = opts.protocol(result.job.spec)
        if result.syn_lr is not None:  # MTT evaluates at the learning rate it learnt with the images
            protocol = protocol.with_lr(result.syn_lr)
        pool.submit(result.job.name, result.images, result.labels, students, protocol)

    t = time.perf_counter()
    with StudentPool(teacher_path, data.test_x, data.test_y, opts.parallel,
                     total=opts.seeds * (len(real_keys) + len(jobs)), progress=opts.progress,
                     device=opts.torch_device) as pool:
        for key, (f, ipc, s) in real_keys.items():
            pool.submit(key, *sets.data[_real(ipc, s)], students, opts.protocol(f))
        sets.synth = run_synthesis(jobs, ctx, opts.parallel, out / "logs", opts.progress, on_done=submit)
        timings["synthesis"] = time.perf_counter() - t
        checked = sum(1 for r in sets.synth.values() if r.manifest)
        log(f"synthesis: {len(jobs)} sets in {timings['synthesis']:.1f} s; every one of the {checked} DiRe runs got "
            f"the term on every synthesis step from its family's patch (dire_manifest.json checked)")
        sets.accuracy = pool.results()
    timings["synthesis+students"] = time.perf_counter() - t
    sets.data.update({name: (r.images, r.labels) for name, r in sets.synth.items()})
    return sets


def _measure(opts: DemoOptions, teacher: torch.nn.Module, sets: _Sets, real_emb: Tensor) -> None:
    for name, (x, y) in tqdm(sets.data.items(), desc="metrics", unit="set", disable=not opts.progress):
        sets.embeddings[name] = embed(teacher, x)
        sets.metrics[name] = set_metrics(real_emb, sets.embeddings[name], y)


def _weights(variant: Optional[Variant], manifests: Sequence[Dict[str, Any]]) -> Tuple[str, List[Dict[str, float]]]:
    """What the DiRe runs of a row were computed with, read back from their manifests."""
    if variant is None or not variant.dire:
        return "", []
    calibrated = []
    for m in manifests:
        config = m.get("config", {})
        calibrated.append({"r_c": config.get("r_c"), "r_e": config.get("r_e")})
    mean = lambda k: statistics.fmean(c[k] for c in calibrated if c[k] is not None)  # noqa: E731
    target = manifests[0].get("config", {}).get("share") if manifests else None
    if target is not None:
        return f"share {target:g} → r_c {mean('r_c'):.3g}, r_e {mean('r_e'):.3g}", calibrated
    if variant.components:
        return f"r_c {variant.r_c:g}, r_e {variant.r_e:g}, {'+'.join(variant.components)}", calibrated
    return f"r_c {mean('r_c'):.3g}, r_e {mean('r_e'):.3g}", calibrated


def _aggregate(opts: DemoOptions, family: Family, ipc: int, variant: Optional[Variant], sets: _Sets) -> ReportRow:
    """One row: each synthesis seed's metrics, every student's accuracy (seed-major)."""
    seeds = range(opts.syn_seeds)
    if variant is None:
        names = [_real(ipc, s) for s in seeds]
        acc_names = [_real_students(family, ipc, s) for s in seeds]
    else:
        names = acc_names = [_name(family.name, ipc, variant.key, s) for s in seeds]
    ms = [sets.metrics[n] for n in names]
    results = [sets.synth[n] for n in names if n in sets.synth]
    manifests = [r.manifest for r in results if r.manifest]
    weights, calibrated = _weights(variant, manifests)
    mean = statistics.fmean
    classes = sorted(ms[0].per_class_cosine)
    return ReportRow(
        ipc=ipc, key=variant.key if variant else REAL_KEY, label=variant.label if variant else REAL_LABEL,
        images=len(sets.data[names[0]][0]),
        accuracy_pct=[100.0 * a for n in acc_names for a in sets.accuracy[n]],
        coverage_runs=[m.coverage for m in ms], vendi_per_class_runs=[m.vendi_per_class for m in ms],
        intra_class_cosine_runs=[m.intra_class_cosine for m in ms], vendi_runs=[m.vendi for m in ms],
        family=family.name, reference=variant is None, dire=bool(variant and variant.dire), weights=weights,
        r_c=variant.r_c if variant else None, r_e=variant.r_e if variant else None,
        share=variant.share if variant else None,
        components=list(variant.components) if variant and variant.components else None,
        per_class_vendi={c: mean([m.per_class_vendi.get(c, float("nan")) for m in ms]) for c in classes},
        per_class_cosine={c: mean([m.per_class_cosine[c] for m in ms]) for c in classes},
        manifests=[str(r.folder / "dire_manifest.json") for r in results if r.manifest],
        terms_added=[int(m["terms_added"]) for m in manifests],
        recover_seconds=[r.seconds for r in results],
        gradient_share=[m["gradient_share"]["median"] for m in manifests
                        if m.get("gradient_share", {}).get("median") is not None],
        cpu_seconds_per_iteration=[r.cpu_seconds_per_step for r in results if r.cpu_seconds_per_step is not None],
        calibrated=calibrated, syn_lr=[r.syn_lr for r in results if r.syn_lr is not None],
        commands=[r.command for r in results],
    )


def _sections(opts: DemoOptions, sets: _Sets) -> List[FamilySection]:
    sections = []
    for name in opts.families:
        family = FAMILIES[name]
        rows = [_aggregate(opts, family, ipc, v, sets) for ipc in opts.ipc_list for v in (None, *opts.variants)]
        sections.append(FamilySection(name, f"{family.title} ({name})", rows, _family_settings(opts, family)))
    return sections


def _family_settings(opts: DemoOptions, family: Family) -> Dict[str, Any]:
    """What a reader needs to rerun a family's rows (every run's full command is in report.json)."""
    protocol = opts.protocol(family)
    evaluation = protocol.describe() + (" at the learnt syn_lr (the real subset at lr 0.01)" if family.name == "mtt" else "")
    settings = {
        "script": f"dire_plugin/{family.script} (ours, shaped like the upstream's)",
        "DiRe": f"python -m dire_plugin.cli.run {family.method} SCRIPT --real-data DIGITS --cache-dir CACHE "
                f"[--share {COMMON_SHARE:g}] -- ARGS (the {family.method} patch: the {family.name} patch's capture, "
                "options and default weights)",
        "iterations": f"{opts.iterations_for(family)} ({family.iteration}"
                      + (", per ipc index)" if family.name in ("sre2l", "dwa") else ")"),
        "fixed options": " ".join(family.options) + (f" --r-bn {opts.r_bn:g}" if family.name in ("sre2l", "dwa") else ""),
        "synthesis seeds": f"{opts.syn_seeds} (vanilla and DiRe runs of one seed start from the same images and "
                           "draw the same random numbers)",
        "students": f"{opts.seeds} per set, the same student seeds for every set: {evaluation}",
    }
    if family.name == "mtt":
        e = ExpertSettings()
        settings["experts"] = (f"{e.num_experts} trajectories of {e.train_epochs} epochs by dire_plugin/demo/mtt/buffer.py "
                               f"(SGD lr {e.lr_teacher:g}, momentum {e.mom:g}, batch {e.batch_train}, DSA), trained once "
                               "and cached; DiRe's feature extractor is the last epoch of the first, as with the real patch")
    return settings


def _figures(opts: DemoOptions, out: Path, sections: Sequence[FamilySection], sets: _Sets,
             real_emb: Tensor) -> Dict[str, Path]:
    """The three figures per family and IPC (synthesis seed 0), and the gradient share over the
    steps of every family (seed 0 of the first IPC); none without matplotlib."""
    from .plots import PlotSet, ShareLine, matplotlib_available, write_figures, write_share_figure

    if not matplotlib_available():
        log("figures skipped: matplotlib is not installed (pip install 'dire-plugin[plot]')")
        return {}
    files: Dict[str, Path] = {}
    lines: List[ShareLine] = []
    suffix = "_ablation" if opts.ablation else ""
    for section in sections:
        for ipc in opts.ipc_list:
            shown = []
            for row in (r for r in section.rows if r.ipc == ipc):
                n = _real(ipc, 0) if row.reference else _name(section.family, ipc, row.key, 0)
                shown.append(PlotSet(row.label, *sets.data[n], sets.embeddings[n], sets.metrics[n], row.reference))
            files.update(write_figures(out, f"{section.family}_ipc{ipc}{suffix}", real_emb, shown, opts.spec))
        ipc = opts.ipc_list[0]
        for v in (v for v in opts.variants if v.dire):
            result = sets.synth[_name(section.family, ipc, v.key, 0)]
            measured = (result.manifest or {}).get("gradient_share", {}).get("measured") or []
            lines.append(ShareLine(section.family, f"{section.family}: {v.label}",
                                   [(int(step), float(share)) for step, share in measured], dashed=v.share is not None))
    files.update(write_share_figure(out, lines, COMMON_SHARE, "gradient_share" + suffix))
    return files


def _settings(opts: DemoOptions, data: DemoData, teacher_acc: float, coverage_real: int) -> Dict[str, Any]:
    settings: Dict[str, Any] = {
        "mode": opts.mode + (" (a smoke run: fewer iterations, seeds and students, so noisier numbers; "
                             "read the default run)" if opts.quick else ""),
        "families": ", ".join(opts.families),
        "data": data.source,
        "device": str(opts.torch_device),
        "ipc": list(opts.ipc_list),
        "synthesis seeds per variant": opts.syn_seeds, "students per set": opts.seeds,
        "DiRe rows": "the method's default weights (the real patch's DEFAULT_WEIGHTS, what dire-run gives without "
                     f"a weight flag), and --share {COMMON_SHARE:g} for every family (calibrated on the first steps)",
        "verdict": "paired t-test over synthesis seeds (each seed's accuracy difference averaged over its paired "
                   "students), two-sided, beyond seed noise at p < 0.05",
        "coverage reference": f"{coverage_real} of {len(data.train_y)} real training images",
        "teacher test accuracy %": round(100 * teacher_acc, 2),
    }
    if opts.ablation:
        settings["ablation weights"] = ("r_c 1, r_e 0.01, terms switched with the launcher's --components; logdet rows: r_d 1, "
                                        "--logdet-kernel cosine or rbf")
    return settings


def _cpu_seconds() -> Optional[float]:
    """CPU time of this process and of its finished children (synthesis runs, student workers):
    what a run costs whatever else the machine is doing (``None`` where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def run_demo(opts: DemoOptions) -> DemoResult:
    """Run the whole demo; writes everything under ``opts.out`` and returns the rows and paths."""
    started = time.perf_counter()
    cpu_started = _cpu_seconds()
    timings: Dict[str, float] = {}
    families = opts.families  # a family that cannot run here stops the run before anything is written
    check_data(opts.dataset, opts.data_path)
    cache = Path(opts.cache_dir or default_cache_dir()).expanduser().resolve()
    out = Path(opts.out).expanduser().resolve()
    check_folders(out, cache)
    t = time.perf_counter()
    data = load_data(opts.dataset, opts.data_path, cache)
    check_images_per_class(data, max(opts.ipc_list))
    timings["data"] = time.perf_counter() - t
    out.mkdir(parents=True, exist_ok=True)
    log(f"{opts.mode} run: {', '.join(families)}; IPC {', '.join(map(str, opts.ipc_list))}; "
        f"{len(opts.variants)} variants ({', '.join(v.label for v in opts.variants)}) x {opts.syn_seeds} synthesis "
        f"seed{'s' * (opts.syn_seeds != 1)} + a real reference; {opts.seeds} student{'s' * (opts.seeds != 1)} per set; "
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

    experts = None
    extra: Dict[str, Any] = {}
    if "mtt" in families:
        t = time.perf_counter()
        expert_settings = ExpertSettings()
        experts, hit = load_or_train_experts(data, cache, expert_settings, out / "logs" / "mtt-buffer.log", device.type)
        timings["mtt experts"] = time.perf_counter() - t
        extra["mtt_experts"] = {"buffer_path": str(experts), "cached": hit, "settings": asdict(expert_settings)}
        log(f"mtt experts: {expert_settings.num_experts} trajectories of {expert_settings.train_epochs} epochs "
            f"({'cached' if hit else 'trained'}, {timings['mtt experts']:.1f} s) {experts}")

    sets = _synthesise_and_evaluate(opts, data, teacher_path, cache, out, experts, timings)

    t = time.perf_counter()
    real_x = data.train_x
    if len(real_x) > COVERAGE_REAL:
        real_x = real_x[torch.randperm(len(real_x), generator=torch.Generator().manual_seed(0))[:COVERAGE_REAL]]
    real_emb = embed(teacher, real_x)
    _measure(opts, teacher, sets, real_emb)
    sections = _sections(opts, sets)
    timings["metrics"] = time.perf_counter() - t

    t = time.perf_counter()
    figures = _figures(opts, out, sections, sets, real_emb) if opts.plots else {}
    timings["figures"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - started
    cpu = _cpu_seconds()
    if cpu is not None and cpu_started is not None:
        timings["cpu (this process and its children)"] = cpu - cpu_started
    where = "scikit-learn digits" if opts.spec is DIGITS else opts.spec.name.upper()
    titles = ", ".join(FAMILIES[f].title for f in families)
    name, title = (("ablation", f"DiRe demo: ablation of the terms ({where}, SRe²L-style)") if opts.ablation
                   else ("report", f"DiRe demo: {titles} ± DiRe on {where}"))
    extra.update({
        "teacher": {"checkpoint": str(teacher_path), "test_accuracy_pct": round(100 * teacher_acc, 4), "cached": hit,
                    "settings": asdict(settings)},
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
    })
    note = (f"Accuracy: each family's own protocol (SRe²L, DWA: students from the teacher's soft labels; DM, MTT: "
            f"fresh ConvNets on the hard labels), tested on the {len(data.test_y):,} held-out images, mean ± sample "
            f"std over every student of every synthesis seed. Coverage, per-class Vendi and intra-class cosine are "
            f"measured on the teacher's penultimate embeddings for every family (coverage against {len(real_emb):,} "
            f"real training images). The reference row (italic) is a random subset of the real training images with "
            f"the same images per class (DWA starts from exactly these images). grad share: the median over the "
            f"measured steps of ‖∂DiRe/∂x‖ / ‖∂method/∂x‖ (dire_manifest.json), median over synthesis seeds. CPU ms / "
            f"iter: the CPU time of the script's own synthesis loop per iteration (CPU, not wall, time: the runs share "
            f"the cores, {opts.parallel} at a time; DiRe rows include the bank's load at the first step), mean over "
            f"synthesis seeds.")
    md, js, sentences = write_report(out, name, title, sections, _settings(opts, data, teacher_acc, len(real_emb)),
                                     note, figures, extra)
    files = {md.name: md, js.name: js, **figures}
    return DemoResult([r for s in sections for r in s.rows], files, sentences, time.perf_counter() - started,
                      timings.get("cpu (this process and its children)"))


def summary(result: DemoResult) -> str:
    """What ``dire demo`` prints at the end: the table, the verdict, the files, the time."""
    lines = ["", summary_table(result.rows), ""]
    lines += [f"- {s}" for s in result.verdict]
    lines += ["", "Written:"] + [f"  {p}" for p in result.files.values()]
    cpu = "" if result.cpu_seconds is None else f" ({result.cpu_seconds:.0f} s of CPU time in all processes)"
    lines.append(f"Done in {result.seconds:.0f} s{cpu}.")
    return "\n".join(lines)
