"""The runtime core every patched method shares; a capture module (one per method family, see
:mod:`dire_plugin.hooks.capture`) finds the synthetic embeddings and gets the gradient to the images.

The core holds the run's configuration, the real-embedding banks and the per-class
:class:`~dire_plugin.embeddings.memory.SyntheticMemory`, the DiRe computation (values and gradient
with respect to detached embeddings: no pass through the network), the counters and logs, the
fail-loud check of every synthesis step (an optimizer step pre-hook), and the manifest. A run that
fails writes its manifest where the user can find it and, for an error of ours, ends with one
line and exit code 2.

Keys
----
Banks, memories and counters are kept per *key* (:class:`KeyState`): the fingerprint of a bank,
which is its cache key (the teacher's weights, the embedding layer, the real data). A capture asks
:meth:`DiReRuntime.key_for` with the teacher of the step; its bank is built the first time that
teacher is seen (then cached on disk and in memory) and every later call is a lookup. Terms
(``term_gradient(..., key=)``) and memory commits (``commit_to_memory(..., key=)``) name the key:
a term reads that key's bank and memory only, so embeddings of one network are never compared
with another's (widths differ: 512 for ResNet-18, 128 for WRN-16-2). One teacher (SRe²L, DWA,
MTT) is one key and ``key=None`` means it. Several teachers, one per step (G-VBSM, EDC rotate
through theirs), are several keys, each with its own bank, memory and counters. A committee
method whose criteria each see another teacher in the same step (CV-DD) takes one term per
criterion, each under its teacher's key, and commits a finished batch to each key: nothing in the
core is per method. The manifest counts terms per key; a synthesis step counts as having the
term of every key whose term was computed since the previous synthesis step.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import sys
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

import torch
from torch import Tensor, nn

from .. import __version__
from ..embeddings.bank import RealEmbeddingBank
from ..embeddings.capture import unwrap_model
from ..embeddings.collectives import all_gather_rows, world
from ..embeddings.isolation import own_rng
from ..embeddings.memory import SyntheticMemory
from ..errors import DiReHookError, DiReInputError
from ..io.files import atomic_write
from ..regularizer.defaults import ALL_COMPONENTS
from ..regularizer.functional import active_components, dire_components, weighted_total
from ..regularizer.grouped import ClassSums, PackedEmbeddings
from .capture import Capture
from .distributed import check_same_settings, rank_summary
from .settings import RunConfig, check_run_settings
from .share import ShareMeter
from .termination import install_sigterm, interruption, uninstall_sigterm

__all__ = [
    "MANIFEST_NAME", "BankFactory", "DiReRuntime", "KeyState", "RunConfig", "active_capture", "bank_from_loader",
    "current_runtime",
    "fail_run", "output_saved",
    "start_runtime", "stop_runtime",
]

logger = logging.getLogger("dire")

MANIFEST_NAME = "dire_manifest.json"
#: Synthesis steps within which a ``share`` calibration must have found its measurable steps.
CALIBRATION_DEADLINE = 50

#: ``(teacher, layer name, device) -> bank``, called once per teacher, at its first term.
BankFactory = Callable[[nn.Module, str, torch.device], RealEmbeddingBank]


@dataclass
class _Stats:
    steps: int = 0
    terms_added: int = 0
    computed: int = 0
    batches_to_memory: int = 0
    sums: Dict[str, float] = field(default_factory=lambda: {c: 0.0 for c in (*ALL_COMPONENTS, "total")})

    def means(self) -> Dict[str, Optional[float]]:
        return {k: (v / self.computed if self.computed else None) for k, v in self.sums.items()}


def _bank_summary(bank: RealEmbeddingBank) -> Dict[str, Any]:
    return {"fingerprint": bank.fingerprint, "cache_hit": bank.cache_hit, "classes": len(bank),
            "embeddings": bank.num_embeddings, "dim": bank.dim}


@dataclass
class KeyState:
    """One key of the core (see the module doc): a teacher's bank, the memory of finished
    embeddings in that teacher's space, and the counts of its terms."""

    key: str
    bank: RealEmbeddingBank
    #: What the key stands for, for logs and the manifest: the teacher's class and embedding layer.
    teacher: str = ""
    layer: str = ""
    #: Seconds the bank took to build (or to load from its cache).
    build_seconds: float = 0.0
    memory: SyntheticMemory = field(default_factory=SyntheticMemory)
    #: This key's terms (``steps`` stays 0: the synthesis steps that got its term are its ``terms_added``).
    stats: _Stats = field(default_factory=_Stats)

    @property
    def short(self) -> str:
        return self.key[:16]

    def summary(self, counts: Optional[Tuple[int, int]] = None, means: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """For the manifest; ``counts``: ``(terms_added, terms_computed)`` summed over the ranks;
        ``means``: the mean values to show (default: every term's)."""
        added, computed = counts if counts is not None else (self.stats.terms_added, self.stats.computed)
        return {
            "key": self.short, "teacher": self.teacher, "layer": self.layer,
            "bank": {**_bank_summary(self.bank), "build_seconds": round(self.build_seconds, 3)},
            "terms_added": added, "terms_computed": computed,
            "batches_in_memory": self.stats.batches_to_memory, "memory_embeddings": len(self.memory),
            "mean_values": self.stats.means() if means is None else means,
        }


class DiReRuntime:
    """Adds the DiRe term to the synthesis steps of the running process (see module doc).

    Args:
        config: the run's configuration.
        bank_factory: see :data:`BankFactory`.
        capture: the method family's capture module.
    """

    def __init__(self, config: RunConfig, bank_factory: BankFactory, capture: Capture) -> None:
        self.config = config
        self.bank_factory = bank_factory
        self.capture = capture
        #: key → its bank, memory and counts, in the order the keys were first used.
        self.keys: Dict[str, KeyState] = {}
        # Teacher module → its key: the weights are hashed once per teacher, not at every step.
        self._teacher_keys: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()
        # (class, layer, hash of the weights) → key: a teacher rebuilt with the same weights (INFER
        # reloads its four at every ipc index) is the key it was, without a second bank.
        self._weights_keys: Dict[Tuple[str, str, str], str] = {}
        self._step_keys: Set[str] = set()  # keys whose term was computed since the last synthesis step
        self.stats = _Stats()
        #: Off: every hook and wrapper passes straight through (tests compute vanilla with it).
        self.enabled = True
        self.started = time.time()
        self.output_dirs: List[str] = []
        self.manifest_written = False
        #: rank → counters of every rank (a torch.distributed run; see :mod:`.distributed`).
        self.rank_counts: Dict[int, Dict[str, int]] = {}
        #: rank → key → ``(terms_added, terms_computed)`` of every rank (with :attr:`rank_counts`).
        self.rank_key_counts: Dict[int, Dict[str, Tuple[int, int]]] = {}
        #: The ranks were found to share the settings (:func:`.distributed.check_same_settings`).
        self.ranks_checked = False
        self._suspended = 0
        self._terms = active_components(config.components, config.r_c, config.r_e, config.r_d)
        self._added = False
        self._in_step = False
        self._handle: Any = None
        #: DiRe's share of the optimised tensor's gradient (and the ``share`` calibration).
        self.share = ShareMeter(config.share)
        self._base_weights = (config.r_c, config.r_e, config.r_d)
        self._share_observed = 0  # the last step whose share was observed

    # ------------------------------------------------------------------ install
    def install(self) -> None:
        if self._handle is not None:
            return
        from torch.optim import optimizer as optimizer_hooks

        self._handle = optimizer_hooks.register_optimizer_step_pre_hook(self._on_step)
        self.capture.install(self)

    def uninstall(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.capture.uninstall()

    # ------------------------------------------------------------------ services for captures
    @property
    def active(self) -> bool:
        """Enabled and not inside :meth:`suspended` (captures record nothing otherwise)."""
        return self.enabled and not self._suspended

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """Forwards and steps inside the block are none of DiRe's (the bank's own forwards)."""
        self._suspended += 1
        try:
            yield
        finally:
            self._suspended -= 1

    def key_for(self, teacher: nn.Module, layer: str, device: torch.device) -> str:
        """The key of ``teacher`` (its ``layer`` input is the embedding; see the module doc). The
        first call for a teacher builds its bank: the build's forwards fire none of the method's
        hooks (the bank's own :func:`~dire_plugin.embeddings.isolation.private_forward`) and draw
        no number from the method's random generators. Later calls are a lookup; a new module with
        the weights of a teacher seen before (a teacher rebuilt from its checkpoint) costs one hash
        of its weights."""
        key = self._teacher_keys.get(teacher)
        if key is None:
            inner = unwrap_model(teacher)
            weights = (type(inner).__qualname__, layer, RealEmbeddingBank.cache_key(inner, layer or None))
            key = self._weights_keys.get(weights)
            if key is None:
                check_same_settings(self)  # building the first bank is the ranks' first exchange
                start = time.perf_counter()
                with self.suspended(), own_rng():
                    bank = self.bank_factory(teacher, layer, device)
                key = self.add_bank(bank, type(inner).__name__, layer, time.perf_counter() - start)
                self._weights_keys[weights] = key
            self._teacher_keys[teacher] = key
        return key

    def bank_for(self, teacher: nn.Module, layer: str, device: torch.device) -> RealEmbeddingBank:
        """The real-embedding bank of ``teacher`` (:meth:`key_for`)."""
        return self.keys[self.key_for(teacher, layer, device)].bank

    def add_bank(self, bank: RealEmbeddingBank, teacher: str = "", layer: str = "", seconds: float = 0.0) -> str:
        """Make ``bank`` a key of the run (a bank of the same fingerprint: the key it has); returns it."""
        key = bank.fingerprint
        if key not in self.keys:
            self.keys[key] = KeyState(key, bank, teacher, layer, seconds)
            logger.info(
                "[dire] real-embedding bank%s: %d classes, %d embeddings, dim %d (%s in %.1f s, key %s)",
                f" of {teacher}" if teacher else "", len(bank), bank.num_embeddings, bank.dim,
                "cache hit" if bank.cache_hit else "built", seconds, key[:16],
            )
        return key

    def key_state(self, key: Optional[str] = None) -> KeyState:
        """The state of ``key``; ``None``: the run's only key."""
        if key is not None:
            state = self.keys.get(key)
            if state is None:  # a capture's bug, not the user's: said even under python -O
                raise DiReHookError(f"internal error: DiRe has no key {key[:16]} (keys: {', '.join(k[:16] for k in self.keys)})")
            return state
        if len(self.keys) != 1:
            raise DiReHookError(
                "internal error: " + ("a DiRe term was asked for before the real-embedding bank was built" if not self.keys
                                      else f"no key given in a run of {len(self.keys)} teachers")
            )
        return next(iter(self.keys.values()))

    @property
    def bank(self) -> Optional[RealEmbeddingBank]:
        """The bank of the run's only key (``None`` before it is built)."""
        return self.key_state().bank if self.keys else None

    def memory_of(self, key: Optional[str] = None) -> SyntheticMemory:
        """The memory of finished embeddings of ``key`` (``None``: the run's only key)."""
        return self.key_state(key).memory

    @property
    def memory(self) -> SyntheticMemory:
        """The memory of the run's only key."""
        return self.memory_of()

    def term_gradient(self, emb: Tensor, labels: Tensor, memory: Optional[bool] = None,
                      real: Optional[PackedEmbeddings] = None, key: Optional[str] = None,
                      held: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
        """∂L_syn/∂emb for synthetic embeddings ``emb [N, D]`` (detached here) of classes
        ``labels``, against ``real`` (the method's own real embeddings of this step, DM's) or the
        bank of ``key``, and that key's memory unless ``memory`` is False; logs and counts the
        values. ``held``: ``(embeddings, labels)`` of images still being optimised that this step
        does not forward (their last embeddings through the same teacher, never the step's own
        images): CD pushes away from them as from the memory, and with it. The capture decides how
        the gradient reaches the images."""
        state = None if real is not None and key is None else self.key_state(key)
        device = emb.device
        x = emb.detach().float().requires_grad_()
        use_memory = (self.config.memory if memory is None else memory) and state is not None
        pushed = self._pushed(device, state.memory, held) if use_memory else None
        config = self.config
        with torch.enable_grad():
            values = dire_components(
                x, labels.to(device), real if real is not None else state.bank.packed(device),
                memory=pushed, reduction=config.reduction, components=self._terms,
                logdet_kernel=config.logdet_kernel,
            )
            total = weighted_total(values, config.r_c, config.r_e, config.r_d)
            if not bool(torch.isfinite(total)):  # finite terms (checked), so the weights overflowed float32
                raise DiReInputError(
                    f"the weighted DiRe term overflows float32 (r_c={config.r_c:g}, r_e={config.r_e:g}, "
                    f"r_d={config.r_d:g}, terms {({k: float(v) for k, v in values.items()})}): use smaller weights or --share"
                )
            (grad,) = torch.autograd.grad(total, x)
        self._log_values({k: v.detach() for k, v in values.items()}, float(total.detach()), state)
        return grad

    def _pushed(self, device: torch.device, memory: SyntheticMemory,
                held: Optional[Tuple[Tensor, Tensor]]) -> Optional[ClassSums]:
        """What CD (and logdet) push away from: the memory and the ``held`` rows, as rows when the
        logdet term reads them (its kernel needs every row), else only their per-class sums."""
        rows_needed = "logdet" in self._terms
        if held is None or not len(held[1]):
            if not len(memory):
                return None
            return memory.packed(device) if rows_needed else memory.class_sums(device)
        emb, labels = held[0].detach().to(device), held[1].to(device=device, dtype=torch.long)
        if not rows_needed:
            extra = ClassSums.of_rows(emb, labels)
            return memory.class_sums(device).plus(extra) if len(memory) else extra
        if len(memory):
            mem = memory.packed(device)
            filled = torch.arange(mem.padded.shape[1], device=device) < mem.counts[:, None]
            work = torch.promote_types(mem.padded.dtype, emb.dtype)
            emb = torch.cat([mem.padded[filled].to(work), emb.to(work)])
            labels = torch.cat([mem.classes.repeat_interleave(mem.counts), labels])
        return PackedEmbeddings.from_rows(emb, labels)

    # ------------------------------------------------------------------ the gradient share
    def share_due(self) -> bool:
        """Whether the synthesis step in flight is one whose gradient share is measured: a capture
        whose DiRe gradient joins the method's backward computes it separately on those only."""
        return self.share.due(self.stats.steps + (0 if self._in_step else 1))

    @contextlib.contextmanager
    def measuring(self) -> Iterator[None]:
        """Time spent inside counts as the cost of measuring the share (manifest, ``seconds``)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.share.seconds += time.perf_counter() - start

    def apply_gradient(self, images: Tensor, dire: Tensor, included: bool) -> None:
        """At a synthesis step (``before_step``): ``dire`` is DiRe's gradient on ``images``, the
        tensor the optimizer updates, whose ``.grad`` holds the method's gradient, and ``dire``
        too when ``included`` (it joined the method's backward). On a measured step the share is
        recorded and, while a ``share`` calibration runs, the step's DiRe part is rescaled (see
        :mod:`.share`). A ``dire`` not included is added here, and the term counted."""
        factor = 1.0
        step = self.stats.steps
        if self.share.due(step) and self._share_observed != step:
            with self.measuring():
                total = images.grad
                method = torch.zeros_like(dire) if total is None else (total - dire if included else total)
                sq = torch.stack([dire.detach().double().pow(2).sum(), method.detach().double().pow(2).sum()])
                if world()[1] > 1:  # the share of every rank's rows together; the same factor everywhere
                    (parts,) = all_gather_rows([sq.cpu().view(1, 2)], f"the gradient share of synthesis step {step}")
                    sq = torch.cat(parts).sum(0)
                d2, m2 = (float(v) for v in sq)
                factor, finished = self.share.observe(step, d2 ** 0.5, m2 ** 0.5)
            self._share_observed = step
            if finished:
                self._calibrated()
            if self.config.log_every and (step == 1 or step % self.config.log_every == 0):
                share = self.share.records[-1][1] if self.share.records and self.share.records[-1][0] == step else None
                logger.info("[dire] step %d: gradient share %s (‖∂DiRe/∂x‖ / ‖∂method/∂x‖)", step,
                            "not measurable (no method gradient)" if share is None else f"{share:.4g}")
        if not included:
            g = dire.to(device=images.device, dtype=images.dtype) * factor
            if images.grad is None:
                images.grad = g
            else:
                images.grad.add_(g)
            self.term_reached_images()
        elif factor != 1.0:
            images.grad.add_(dire.to(device=images.grad.device, dtype=images.grad.dtype), alpha=factor - 1.0)

    def _calibrated(self) -> None:
        k = self.share.scale
        base_c, base_e, base_d = self._base_weights
        self.config.r_c, self.config.r_e, self.config.r_d = base_c * k, base_e * k, base_d * k
        logger.info("[dire] share %g: calibrated on the first %d measured steps: weights x%.4g, r_c=%.4g, r_e=%.4g%s",
                    self.share.target, len(self.share.factors), k, self.config.r_c, self.config.r_e,
                    f", r_d={self.config.r_d:.4g}" if "logdet" in self._terms else "")

    def _share_manifest(self) -> Dict[str, Any]:
        out = self.share.summary()
        elapsed = max(time.time() - self.started, 1e-9)
        out["run_fraction"] = round(self.share.seconds / elapsed, 6)
        out["target"] = self.share.target
        if self.share.target is not None:
            out["calibration"] = {
                "done": self.share.scale is not None,
                "shares_at_start_weights": [round(v, 6) for v in self.share.uncalibrated],
                "factors": [round(f, 6) for f in self.share.factors],
                "scale": self.share.scale, "base_r_c": self._base_weights[0], "base_r_e": self._base_weights[1],
                "base_r_d": self._base_weights[2], "r_c": self.config.r_c, "r_e": self.config.r_e, "r_d": self.config.r_d,
            }
        return out

    def term_reached_images(self) -> None:
        """The capture put the term's gradient on the images of the step in flight."""
        if not self._added:
            self._added = True
            self.stats.terms_added += 1

    def commit_to_memory(self, emb: Tensor, labels: Tensor, key: Optional[str] = None) -> None:
        """Embeddings of finished images join the per-class memory of ``key`` (CD pushes new ones
        away); ``None``: the run's only key."""
        if self.config.memory:
            state = self.key_state(key)
            state.memory.add(emb, labels)
            state.stats.batches_to_memory += 1
            self.stats.batches_to_memory += 1

    def note_output_dir(self, folder: str) -> None:
        """Outputs of the run were written in ``folder``: the manifest goes there too, unless it
        lies inside the upstream checkout (:meth:`outputs_in_checkout`)."""
        folder = os.path.abspath(folder)
        if folder not in self.output_dirs:
            self.output_dirs.append(folder)

    def outputs_in_checkout(self) -> List[str]:
        """The output folders inside the upstream checkout (DM's default ``--save_path result``,
        MTT's ``./logged_files`` run from the checkout): README promises that nothing of ours is
        written there outside ``.dire/``, so their manifest goes to the fallback folder."""
        if not self.config.root:
            return []
        root = os.path.join(os.path.realpath(self.config.root), "")
        return [d for d in self.output_dirs if os.path.join(os.path.realpath(d), "").startswith(root)]

    def _log_values(self, values: Dict[str, Tensor], total: float, state: Optional[KeyState]) -> None:
        plain = {k: float(v) for k, v in values.items()}
        for stats in (self.stats, *((state.stats,) if state is not None else ())):
            stats.computed += 1
            for k, v in plain.items():
                stats.sums[k] += v
            stats.sums["total"] += total
        if state is not None:
            self._step_keys.add(state.key)
        n = self.stats.computed
        if self.config.log_every and (n == 1 or n % self.config.log_every == 0):
            parts = " ".join(f"{k}={float(v):.4f}" for k, v in values.items())
            logger.info("[dire] step %d: %s total=%.4f (steps that got the term before this one: %d)", n, parts, total, self.stats.terms_added)

    # ------------------------------------------------------------------ the step check
    def _on_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self.active or not self.capture.is_synthesis_step(optimizer):
            return
        self.stats.steps += 1
        self._in_step = True
        try:
            self.capture.before_step(optimizer)
        finally:
            self._in_step = False
        if self.share.calibrating and self.stats.steps >= CALIBRATION_DEADLINE:
            raise DiReHookError(
                f"share {self.share.target:g} could not be calibrated: the gradient share was measurable on "
                f"{len(self.share.factors)} of the first {self.stats.steps} synthesis steps (the method's or DiRe's "
                "gradient was zero, or the images were not found); give --r-c/--r-e instead"
            )
        if not self._added:
            where = f"{self.config.script or sys.argv[0]}" + (f" (upstream {self.config.commit})" if self.config.commit else "")
            raise DiReHookError(
                f"DiRe was not added to synthesis step {self.stats.steps} of {where}: {self.capture.missing_reason()}; "
                f"the {self.config.method} patch does not fit this code (set DIRE_DISABLE=1 to run vanilla)"
            )
        self._added = False
        for key in self._step_keys:
            self.keys[key].stats.terms_added += 1
        self._step_keys.clear()
        self.capture.after_step(optimizer)

    # ------------------------------------------------------------------ outputs
    def manifest(self, error: Optional[BaseException] = None) -> Dict[str, Any]:
        bank = self.keys[next(iter(self.keys))].bank if len(self.keys) == 1 else None
        counts = {"synthesis_steps": self.stats.steps, "terms_added": self.stats.terms_added,
                  "terms_computed": self.stats.computed}
        ranks: Dict[str, Any] = {}
        if self.rank_counts:
            ranks = rank_summary(self.rank_counts)
            totals = ranks["all_ranks"]
            counts = {"synthesis_steps": totals["steps"], "terms_added": totals["terms_added"],
                      "terms_computed": totals["computed"]}
        return {
            "method": self.config.method,
            "status": "finished" if error is None else "failed",
            "error": None if error is None else f"{type(error).__name__}: {error}",
            "upstream_commit": self.config.commit,
            "script": self.config.script,
            "argv": list(sys.argv),
            "plugin_version": __version__,
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.config).items()},
            "outputs": list(self.output_dirs),  # where the run wrote, also when the manifest is not beside them
            "capture": {"family": self.capture.family, **self.capture.manifest()},
            # One teacher's run: its bank; several: null, and each teacher's under "teachers".
            "bank": None if bank is None else _bank_summary(bank),
            "teachers": [state.summary(self._key_counts(state.key), self._shown_means(state.stats))
                         for state in self.keys.values()],
            **counts,
            **ranks,
            "gradient_share": self._share_manifest(),
            # Summed over the keys (teachers).
            "batches_in_memory": self.stats.batches_to_memory,
            "memory_embeddings": sum(len(state.memory) for state in self.keys.values()),
            "mean_values": self._shown_means(self.stats),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.started)),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }

    def _shown_means(self, stats: "_Stats") -> Dict[str, Optional[float]]:
        """Mean values for the manifest: the paper's terms as before (0 when off); logdet, beyond
        the paper, only when chosen."""
        return {k: v for k, v in stats.means().items() if k != "logdet" or "logdet" in self._terms}

    def _key_counts(self, key: str) -> Optional[Tuple[int, int]]:
        """``(terms_added, terms_computed)`` of ``key`` summed over the ranks (``None``: one process)."""
        if not self.rank_key_counts:
            return None
        parts = [per_key.get(key, (0, 0)) for per_key in self.rank_key_counts.values()]
        return sum(p[0] for p in parts), sum(p[1] for p in parts)

    def fallback_manifest_path(self) -> Path:
        """Where the manifest goes when no output was seen (a run that failed early): the
        configured manifest folder, else ``<cache>/runs/``, else ``~/.cache/dire/runs/``; never the
        current folder, which is usually inside the upstream checkout."""
        base = self.config.manifest_dir or (os.path.join(self.config.cache_dir, "runs") if self.config.cache_dir else "")
        folder = Path(base or Path.home() / ".cache" / "dire" / "runs").expanduser()
        stem = Path(self.config.script or sys.argv[0] or "run").stem or "run"
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(self.started))
        return folder / f"{stem}-{stamp}-{os.getpid()}-{MANIFEST_NAME}"

    def write_manifest(self, error: Optional[BaseException] = None) -> List[Path]:
        """Write the manifest of a finished run beside its outputs outside the checkout; that of a
        failed one, or of one with no such outputs, to :meth:`fallback_manifest_path` (README: a
        failed run's manifest is in ``<cache>/runs/``)."""
        rank, size = _rank_and_size()
        if error is None and rank != "0" and size > 1:
            self.manifest_written = True
            return []  # rank 0 writes the one manifest, with every rank's counts
        inside = self.outputs_in_checkout()
        beside = [Path(d) / MANIFEST_NAME for d in self.output_dirs if d not in inside] if error is None else []
        paths = beside or [self.fallback_manifest_path()]
        if error is not None and rank != "0":  # each failing rank says what happened to it
            paths = [p.with_name(f"rank{rank}-{p.name}") for p in paths]
        data = json.dumps(self.manifest(error), indent=2) + "\n"
        written = []
        for path in paths:
            try:
                written.append(atomic_write(path, data))
            except OSError as e:
                logger.warning("[dire] could not write %s: %s", path, e)
        self.manifest_written = True
        return written

    def report_failure(self, error: BaseException) -> Optional[Path]:
        """The run is ending with ``error``: write its manifest now and return where it went."""
        written = self.write_manifest(error)
        return written[0] if written else None


def _rank_and_size() -> Tuple[str, int]:
    """This process's rank and the world size: the process group's when there is one (workers
    that ``mp.spawn`` starts have no ``RANK`` variable), else torchrun's variables."""
    rank, size = world()
    if size > 1:
        return str(rank), size
    return os.environ.get("RANK", "0"), int(os.environ.get("WORLD_SIZE", "1"))


_RUNTIME: Optional[DiReRuntime] = None


def current_runtime() -> Optional[DiReRuntime]:
    return _RUNTIME


def active_capture(kind: type) -> Optional[Any]:
    """The running capture if it is a ``kind`` and the runtime is active, else ``None``: what every
    wrapper asks first, passing straight through on ``None``."""
    runtime = _RUNTIME
    capture = getattr(runtime, "capture", None)
    return capture if isinstance(capture, kind) and runtime.active else None


def output_saved(position: int, keyword: str, matches: Callable[[str], bool], up: int = 1) -> Callable:
    """A wrapt wrapper for a save function (``Image.save(fp)``, ``torch.save(obj, f)``): after the
    save, a file argument (``args[position]`` or ``keyword``) whose absolute path ``matches`` puts
    the run's manifest ``up`` folders above the file (:meth:`DiReRuntime.note_output_dir`)."""

    def wrapper(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
        result = wrapped(*args, **kwargs)
        runtime = _RUNTIME
        target = args[position] if len(args) > position else kwargs.get(keyword)
        if runtime is not None and isinstance(target, (str, os.PathLike)):
            path = os.path.abspath(os.fspath(target))
            if matches(path):
                for _ in range(up):
                    path = os.path.dirname(path)
                runtime.note_output_dir(path)
        return result

    return wrapper


def bank_from_loader(config: RunConfig, teacher: nn.Module, layer: str, device: torch.device,
                     loader: Any, dataset_id: str, transform_id: str) -> RealEmbeddingBank:
    """The run's real-embedding bank over ``loader``, stored and cached as ``config`` says (the one
    call every bank factory ends in, so every method keys and stores its bank the same way)."""
    return RealEmbeddingBank.build(
        teacher, loader, layer=layer or None, max_per_class=config.bank_max_per_class,
        dtype=getattr(torch, config.bank_dtype), cache_dir=config.cache_dir or None,
        dataset_id=dataset_id, transform_id=transform_id, device=device,
    )


def start_runtime(config: RunConfig, bank_factory: BankFactory, capture: Capture) -> DiReRuntime:
    """Install the process-wide runtime; the manifest is written at exit, and an uncaught error of
    ours ends the run with one line and exit code 2 (SIGTERM: 143). One per process: a second method's patch
    while another's runtime is running is refused (its capture would never be installed)."""
    global _RUNTIME
    if _RUNTIME is not None and _RUNTIME.capture is not capture:
        raise DiReHookError(
            f"DiRe is already running for {_RUNTIME.config.method} in this process; {config.method} cannot "
            "be patched in too (unpatch the first, or run one method per process)"
        )
    if _RUNTIME is None:
        check_run_settings(asdict(config))  # the runtime API is a door too: RunConfig(share=0) is refused here
        _RUNTIME = DiReRuntime(config, bank_factory, capture)
        _RUNTIME.install()
        atexit.register(_finish)
        _install_excepthook()
        install_sigterm()  # the failed run's manifest and one line, as for Ctrl-C, through the hook
    return _RUNTIME


def stop_runtime() -> None:
    """Uninstall the runtime (tests, launchers); writes nothing."""
    global _RUNTIME
    if _RUNTIME is not None:
        _RUNTIME.uninstall()
        _RUNTIME = None
        uninstall_sigterm()


def _finish() -> None:
    runtime = _RUNTIME
    if runtime is None or runtime.manifest_written or runtime.stats.computed == 0 and runtime.stats.steps == 0:
        return
    inside = runtime.outputs_in_checkout()
    for path in runtime.write_manifest():
        why = ""
        if inside and str(path.parent) not in runtime.output_dirs:
            why = (f"; not beside the outputs in {', '.join(inside)}: they lie inside the upstream checkout, "
                   "where dire-plugin writes nothing outside .dire/")
        logger.info("[dire] manifest: %s (DiRe added to %d of %d synthesis steps%s)", path, runtime.stats.terms_added,
                    runtime.stats.steps, why)


def fail_run(error: BaseException, prog: str = "dire") -> int:
    """End a patched run that raised ``error``: write the manifest where the user can find it and
    say where. A :class:`~dire_plugin.errors.DiReError` (ours) is one line on stderr and exit code
    2; ``KeyboardInterrupt`` one line and 130, SIGTERM (:class:`~.termination.Terminated`) one
    line and 143; anything else (the upstream's own error) is left to the caller to report, exit
    code 1."""
    from ..errors import DiReError

    runtime = _RUNTIME
    # An error a worker process handed on names the manifest that worker wrote (hooks.workers).
    path = getattr(error, "dire_manifest", None)
    if path is None and runtime is not None:
        path = runtime.report_failure(error)
    where = f" (manifest of this run: {path})" if path is not None else ""
    ended = interruption(error)
    if ended is not None:
        _say(f"{prog}: {ended[0]}{where}")
        return ended[1]
    if isinstance(error, DiReError):
        _say(f"{prog}: error: {' '.join(str(error).split())}{where}")
        return 2
    if path is not None:
        logger.info("[dire] manifest of this failed run: %s", path)
    return 1


def _say(line: str) -> None:
    # One write with its newline: under torchrun every rank's line goes to the same stderr, and
    # print() writes the newline apart, so another rank's line could land before it.
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


_PREVIOUS_HOOK = None


def _install_excepthook() -> None:
    """Uncaught errors of a script activated by the ``.pth`` line or ``import dire_plugin.auto``
    (``dire-run`` catches them itself): ours become one line and exit code 2."""
    global _PREVIOUS_HOOK
    if _PREVIOUS_HOOK is not None:
        return
    _PREVIOUS_HOOK = sys.excepthook

    def hook(exc_type, exc, tb):
        code = fail_run(exc)
        if code == 1:  # not ours: the usual traceback, the usual exit code
            _PREVIOUS_HOOK(exc_type, exc, tb)
            return
        sys.stderr.flush()
        # The exit code Python gives an uncaught exception is 1; ours is 2. Run what atexit holds
        # (wandb, DataLoader workers, our own finish) before leaving with it.
        atexit._run_exitfuncs()
        os._exit(code)

    sys.excepthook = hook
