"""The runtime core every patched method shares; a capture module (one per method family, see
:mod:`dire_plugin.hooks.capture`) finds the synthetic embeddings and gets the gradient to the images.

The core holds the run's configuration, the real-embedding bank (built once, at the first term),
the per-class :class:`~dire_plugin.embeddings.memory.SyntheticMemory`, the DiRe computation
(values and gradient with respect to detached embeddings: no pass through the network), the
counters and logs, the fail-loud check of every synthesis step (an optimizer step pre-hook), and
the manifest. A run that fails writes its manifest where the user can find it and, for an error
of ours, ends with one line and exit code 2.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from torch import Tensor, nn

from .. import __version__
from ..embeddings.bank import RealEmbeddingBank
from ..embeddings.memory import SyntheticMemory
from ..errors import DiReHookError
from ..io.files import atomic_write
from ..regularizer.defaults import COMPONENTS
from ..regularizer.functional import active_components, dire_components, weighted_total
from ..regularizer.grouped import PackedEmbeddings
from .capture import Capture
from .distributed import check_same_settings, rank_summary
from .settings import RunConfig

__all__ = [
    "MANIFEST_NAME", "BankFactory", "DiReRuntime", "RunConfig", "active_capture", "bank_from_loader", "current_runtime",
    "fail_run", "output_saved",
    "start_runtime", "stop_runtime",
]

logger = logging.getLogger("dire")

MANIFEST_NAME = "dire_manifest.json"

#: ``(teacher, layer name, device) -> bank``, called once, at the first term.
BankFactory = Callable[[nn.Module, str, torch.device], RealEmbeddingBank]


@dataclass
class _Stats:
    steps: int = 0
    terms_added: int = 0
    computed: int = 0
    batches_to_memory: int = 0
    sums: Dict[str, float] = field(default_factory=lambda: {c: 0.0 for c in (*COMPONENTS, "total")})

    def means(self) -> Dict[str, Optional[float]]:
        return {k: (v / self.computed if self.computed else None) for k, v in self.sums.items()}


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
        self.bank: Optional[RealEmbeddingBank] = None
        self.memory = SyntheticMemory()
        self.stats = _Stats()
        #: Off: every hook and wrapper passes straight through (tests compute vanilla with it).
        self.enabled = True
        self.started = time.time()
        self.output_dirs: List[str] = []
        self.manifest_written = False
        #: rank → counters of every rank (a torch.distributed run; see :mod:`.distributed`).
        self.rank_counts: Dict[int, Dict[str, int]] = {}
        #: The ranks were found to share the settings (:func:`.distributed.check_same_settings`).
        self.ranks_checked = False
        self._suspended = 0
        self._terms = active_components(config.components, config.r_c, config.r_e)
        self._added = False
        self._handle: Any = None

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

    def bank_for(self, teacher: nn.Module, layer: str, device: torch.device) -> RealEmbeddingBank:
        """The real-embedding bank, built from ``teacher`` (its ``layer`` input) the first time."""
        if self.bank is None:
            check_same_settings(self)  # building the bank is the ranks' first exchange
            with self.suspended():
                bank = self.bank_factory(teacher, layer, device)
            logger.info(
                "[dire] real-embedding bank: %d classes, %d embeddings, dim %d (%s)",
                len(bank), bank.num_embeddings, bank.dim, "cache hit" if bank.cache_hit else "built",
            )
            self.bank = bank
        return self.bank

    def term_gradient(self, emb: Tensor, labels: Tensor, memory: Optional[bool] = None,
                      real: Optional[PackedEmbeddings] = None) -> Tensor:
        """∂L_syn/∂emb for synthetic embeddings ``emb [N, D]`` (detached here) of classes
        ``labels``, against ``real`` (the method's own real embeddings of this step, DM's) or the
        bank, and the memory unless ``memory`` is False; logs and counts the values. The capture
        decides how the gradient reaches the images."""
        if real is None and self.bank is None:  # a capture's bug, not the user's: said even under python -O
            raise DiReHookError("internal error: a DiRe term was asked for before the real-embedding bank was built")
        device = emb.device
        x = emb.detach().float().requires_grad_()
        use_memory = self.config.memory if memory is None else memory
        with torch.enable_grad():
            values = dire_components(
                x, labels.to(device), real if real is not None else self.bank.packed(device),
                memory=self.memory.class_sums(device) if use_memory and len(self.memory) else None,
                reduction=self.config.reduction, components=self._terms,
            )
            total = weighted_total(values, self.config.r_c, self.config.r_e)
            (grad,) = torch.autograd.grad(total, x)
        self._log_values({k: v.detach() for k, v in values.items()}, float(total.detach()))
        return grad

    def term_reached_images(self) -> None:
        """The capture put the term's gradient on the images of the step in flight."""
        if not self._added:
            self._added = True
            self.stats.terms_added += 1

    def commit_to_memory(self, emb: Tensor, labels: Tensor) -> None:
        """Embeddings of finished images join the per-class memory (CD pushes new ones away)."""
        if self.config.memory:
            self.memory.add(emb, labels)
            self.stats.batches_to_memory += 1

    def note_output_dir(self, folder: str) -> None:
        """Outputs of the run were written in ``folder``: the manifest goes there too."""
        folder = os.path.abspath(folder)
        if folder not in self.output_dirs:
            self.output_dirs.append(folder)

    def _log_values(self, values: Dict[str, Tensor], total: float) -> None:
        self.stats.computed += 1
        for k, v in values.items():
            self.stats.sums[k] += float(v)
        self.stats.sums["total"] += total
        n = self.stats.computed
        if self.config.log_every and (n == 1 or n % self.config.log_every == 0):
            parts = " ".join(f"{k}={float(v):.4f}" for k, v in values.items())
            logger.info("[dire] step %d: %s total=%.4f (steps that got the term before this one: %d)", n, parts, total, self.stats.terms_added)

    # ------------------------------------------------------------------ the step check
    def _on_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self.active or not self.capture.is_synthesis_step(optimizer):
            return
        self.stats.steps += 1
        self.capture.before_step(optimizer)
        if not self._added:
            where = f"{self.config.script or sys.argv[0]}" + (f" (upstream {self.config.commit})" if self.config.commit else "")
            raise DiReHookError(
                f"DiRe was not added to synthesis step {self.stats.steps} of {where}: {self.capture.missing_reason()}; "
                f"the {self.config.method} patch does not fit this code (set DIRE_DISABLE=1 to run vanilla)"
            )
        self._added = False
        self.capture.after_step(optimizer)

    # ------------------------------------------------------------------ outputs
    def manifest(self, error: Optional[BaseException] = None) -> Dict[str, Any]:
        bank = self.bank
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
            "capture": {"family": self.capture.family, **self.capture.manifest()},
            "bank": None if bank is None else {
                "fingerprint": bank.fingerprint, "cache_hit": bank.cache_hit, "classes": len(bank),
                "embeddings": bank.num_embeddings, "dim": bank.dim,
            },
            **counts,
            **ranks,
            "batches_in_memory": self.stats.batches_to_memory,
            "memory_embeddings": len(self.memory),
            "mean_values": self.stats.means(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.started)),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }

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
        """Write the manifest beside the outputs (or to :meth:`fallback_manifest_path`)."""
        rank = os.environ.get("RANK", "0")
        if error is None and rank != "0" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            self.manifest_written = True
            return []  # rank 0 writes the one manifest, with every rank's counts
        paths = [Path(d) / MANIFEST_NAME for d in self.output_dirs] or [self.fallback_manifest_path()]
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
    ours ends the run with one line and exit code 2. One per process: a second method's patch
    while another's runtime is running is refused (its capture would never be installed)."""
    global _RUNTIME
    if _RUNTIME is not None and _RUNTIME.capture is not capture:
        raise DiReHookError(
            f"DiRe is already running for {_RUNTIME.config.method} in this process; {config.method} cannot "
            "be patched in too (unpatch the first, or run one method per process)"
        )
    if _RUNTIME is None:
        _RUNTIME = DiReRuntime(config, bank_factory, capture)
        _RUNTIME.install()
        atexit.register(_finish)
        _install_excepthook()
    return _RUNTIME


def stop_runtime() -> None:
    """Uninstall the runtime (tests, launchers); writes nothing."""
    global _RUNTIME
    if _RUNTIME is not None:
        _RUNTIME.uninstall()
        _RUNTIME = None


def _finish() -> None:
    runtime = _RUNTIME
    if runtime is None or runtime.manifest_written or runtime.stats.computed == 0 and runtime.stats.steps == 0:
        return
    for path in runtime.write_manifest():
        logger.info("[dire] manifest: %s (DiRe added to %d of %d synthesis steps)", path, runtime.stats.terms_added, runtime.stats.steps)


def fail_run(error: BaseException, prog: str = "dire") -> int:
    """End a patched run that raised ``error``: write the manifest where the user can find it and
    say where. A :class:`~dire_plugin.errors.DiReError` (ours) is one line on stderr and exit code
    2; ``KeyboardInterrupt`` one line and 130; anything else (the upstream's own error) is left to
    the caller to report, exit code 1."""
    from ..errors import DiReError

    runtime = _RUNTIME
    path = runtime.report_failure(error) if runtime is not None else None
    where = f" (manifest of this run: {path})" if path is not None else ""
    if isinstance(error, KeyboardInterrupt):
        _say(f"{prog}: interrupted{where}")
        return 130
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
