"""The hook runtime: adds DiRe to every synthesis step of an unchanged upstream script.

How a step gets the term, without a second forward or backward:

1. Global module hooks record the input and output of every ``nn.Linear`` called with
   gradients enabled (the classifier's input is the penultimate embedding).
2. When the method's criterion is called with the teacher's logits, the record whose output *is*
   those logits gives the embeddings of the same forward. DiRe and its gradient with respect to
   the embeddings are computed on a detached copy (cheap: no pass through the network).
3. A tensor hook on the captured embeddings adds that gradient when the method's own
   ``loss.backward()`` reaches them, so the images receive ∂(loss + DiRe)/∂images while the
   upstream's printed losses stay untouched. The hook counts the term as added.
4. An optimizer step pre-hook checks that a synthesis step (an optimizer over plain tensors,
   the images) got the term, and moves the finished embeddings of a batch into the per-class
   :class:`~dire_plugin.bank.SyntheticMemory` when a new batch of images starts.

Forwards that are not synthesis steps get nothing: under ``no_grad`` nothing is recorded, and a
second criterion call on the same logits (printing) finds its records already used.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import sys
import threading
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import __version__
from .bank import RealEmbeddingBank, SyntheticMemory
from .errors import DiReHookError
from .features import unwrap_model
from .functional import COMPONENTS, active_components, dire_components, weighted_total
from .defaults import DEFAULT_R_C, DEFAULT_R_E
from .safeio import atomic_write
from .validation import check_run_settings

__all__ = ["RunConfig", "DiReRuntime", "current_runtime", "start_runtime", "stop_runtime"]

logger = logging.getLogger("dire")

MANIFEST_NAME = "dire_manifest.json"


@dataclass
class RunConfig:
    """Everything a patched run needs; written by ``dire-apply``, read at start-up."""

    method: str
    commit: str = ""
    script: str = ""
    r_c: float = DEFAULT_R_C
    r_e: float = DEFAULT_R_E
    reduction: str = "mean"
    components: Tuple[str, ...] = COMPONENTS
    real_data: str = ""
    cache_dir: str = ""
    log_every: int = 100
    bank_max_per_class: Optional[int] = None
    memory: bool = True
    manifest_dir: str = ""

    @classmethod
    def from_dict(cls, data: Dict[str, Any], where: str = "") -> "RunConfig":
        """The config of ``data`` (checked: a bad value is one line prefixed with ``where``)."""
        data = check_run_settings(data, where)
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["components"] = tuple(kwargs.get("components", COMPONENTS))
        return cls(**kwargs)


@dataclass(eq=False)  # identity: records hold tensors, which do not compare as booleans
class _Record:
    """One ``nn.Linear`` call: the input tensor it consumed (with graph), its output, and the
    top-level model and forward it belongs to."""

    inp: Tensor
    out: Optional[Tensor]
    root: Optional[nn.Module]
    layer: nn.Module
    device_key: int
    forward: int

    @property
    def emb(self) -> Tensor:
        return self.inp.flatten(1)


@dataclass
class _Stats:
    steps: int = 0
    terms_added: int = 0
    criterion_calls_skipped: int = 0
    batches_to_memory: int = 0
    sums: Dict[str, float] = field(default_factory=lambda: {c: 0.0 for c in (*COMPONENTS, "total")})
    computed: int = 0

    def means(self) -> Dict[str, Optional[float]]:
        return {k: (v / self.computed if self.computed else None) for k, v in self.sums.items()}


BankFactory = Callable[[nn.Module, str, torch.device], RealEmbeddingBank]


class DiReRuntime:
    """Adds the DiRe term to the synthesis steps of the running process (see module doc).

    Args:
        config: the run's configuration.
        bank_factory: ``(teacher, layer_name, device) -> RealEmbeddingBank``, called once at the
            first synthesis step with the teacher found in that step's forward.
    """

    def __init__(self, config: RunConfig, bank_factory: BankFactory) -> None:
        self.config = config
        self.bank_factory = bank_factory
        self.bank: Optional[RealEmbeddingBank] = None
        self.memory = SyntheticMemory()
        self.stats = _Stats()
        self.enabled = True
        self.started = time.time()
        self.output_dirs: List[str] = []
        self.manifest_written = False
        self._terms = active_components(config.components, config.r_c, config.r_e)
        self._handles: List[Any] = []
        self._lock = threading.Lock()
        self._main_thread = threading.get_ident()
        self._depth = 0
        self._forward = 0
        self._root: Optional[nn.Module] = None
        # Recent classifier calls. Not reset per forward: the criterion is itself a module call,
        # and augmentations may be modules too. After backward the graphs hold no buffers.
        self._records: Deque[_Record] = deque(maxlen=64)
        self._suspended = False
        # The step in flight: set when DiRe is attached, cleared by the optimizer step.
        self._attached = False
        self._added = False
        self._last: Optional[Tuple[Tensor, Tensor]] = None
        self._pending_batch: Optional[Tuple[Tensor, Tensor]] = None
        self._images: Optional[weakref.ref] = None

    # ------------------------------------------------------------------ install
    def install(self) -> None:
        if self._handles:
            return
        from torch.nn.modules import module as module_hooks
        from torch.optim import optimizer as optimizer_hooks

        self._handles = [
            module_hooks.register_module_forward_pre_hook(self._on_module_start),
            module_hooks.register_module_forward_hook(self._on_module_end, always_call=True),
            optimizer_hooks.register_optimizer_step_pre_hook(self._on_step),
        ]

    def uninstall(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._records.clear()

    # ------------------------------------------------------------------ module hooks
    def _on_module_start(self, module: nn.Module, args: Tuple[Any, ...]) -> None:
        if threading.get_ident() == self._main_thread and not isinstance(module, nn.modules.loss._Loss):
            if self._depth == 0:
                self._root = module
                self._forward += 1
            self._depth += 1
        if (
            self._suspended
            or not self.enabled
            or not isinstance(module, nn.Linear)
            or not torch.is_grad_enabled()
            or not args
            or not isinstance(args[0], Tensor)
            or not args[0].requires_grad
        ):
            return
        x = args[0]
        key = -1 if x.device.index is None else int(x.device.index)
        with self._lock:
            self._records.append(_Record(x, None, self._root, module, key, self._forward))

    def _on_module_end(self, module: nn.Module, args: Tuple[Any, ...], output: Any) -> None:
        if isinstance(module, nn.Linear) and isinstance(output, Tensor):
            with self._lock:
                for rec in reversed(self._records):
                    if rec.layer is module and rec.out is None:
                        rec.out = output
                        break
        if threading.get_ident() == self._main_thread and self._depth > 0 and not isinstance(module, nn.modules.loss._Loss):
            self._depth -= 1

    def _match(self, outputs: Tensor) -> Optional[List[_Record]]:
        """Records of the forward whose classifier produced ``outputs``, in batch order."""
        with self._lock:
            records = [r for r in self._records if r.out is not None]
        for rec in reversed(records):
            if rec.out is outputs:
                return [rec]
        # DataParallel over several GPUs gathers the replicas' logits into a new tensor: take the
        # last classifier call of each replica, in device order, if they add up to the batch.
        grad_fn = type(outputs.grad_fn).__name__ if outputs.grad_fn is not None else ""
        if "Gather" in grad_fn:
            last: Dict[int, _Record] = {}
            latest = max(r.forward for r in records) if records else None
            for rec in records:
                if rec.forward == latest and rec.out.dim() == 2 and rec.out.shape[1] == outputs.shape[1]:
                    last[rec.device_key] = rec
            chunks = [last[k] for k in sorted(last)]
            if chunks and sum(r.out.shape[0] for r in chunks) == outputs.shape[0]:
                return chunks
        return None

    # ------------------------------------------------------------------ the term
    def on_criterion(self, outputs: Any, targets: Any) -> None:
        """Called with the arguments of the method's classification criterion."""
        if not self.enabled or self._suspended:
            return
        if not (isinstance(outputs, Tensor) and outputs.requires_grad and torch.is_grad_enabled()):
            return
        chunks = self._match(outputs)
        if chunks is None:
            self.stats.criterion_calls_skipped += 1
            return
        with self._lock:
            # Used: a second criterion call on the same logits (printing) must not add it again.
            for rec in chunks:
                self._records.remove(rec)
        labels = targets.argmax(1) if isinstance(targets, Tensor) and targets.dim() == 2 else targets
        labels = torch.as_tensor(labels).reshape(-1)
        device = outputs.device
        emb = torch.cat([r.emb.detach().to(device) for r in chunks]).float().requires_grad_()
        if self.bank is None:
            self.bank = self._build_bank(chunks[0], device)
        with torch.enable_grad():
            values = dire_components(
                emb, labels.to(device), self.bank.packed(device),
                memory=self.memory.class_sums(device) if self.config.memory and len(self.memory) else None,
                reduction=self.config.reduction, components=self._terms,
            )
            total = weighted_total(values, self.config.r_c, self.config.r_e)
            (grad,) = torch.autograd.grad(total, emb)
        self._attach(chunks, grad)
        self._log_values({k: v.detach() for k, v in values.items()}, float(total.detach()))
        self._last = (emb.detach(), labels.detach().to(device))

    def _build_bank(self, record: _Record, device: torch.device) -> RealEmbeddingBank:
        teacher = record.root if record.root is not None else record.layer
        layer = next((n for n, m in unwrap_model(teacher).named_modules() if m is record.layer), None)
        self._suspended = True  # the bank's own forwards are not synthesis steps
        try:
            bank = self.bank_factory(teacher, layer or "", device)
        finally:
            self._suspended = False
        logger.info(
            "[dire] real-embedding bank: %d classes, %d embeddings, dim %d (%s)",
            len(bank), bank.num_embeddings, bank.dim, "cache hit" if bank.cache_hit else "built",
        )
        return bank

    def _attach(self, chunks: List[_Record], grad: Tensor) -> None:
        """Make the method's backward add ``grad`` at the captured embeddings."""
        self._attached, self._added = True, False
        start = 0
        for rec in chunks:
            part = grad[start:start + rec.emb.shape[0]]
            start += rec.emb.shape[0]

            def add(g: Tensor, part: Tensor = part) -> Tensor:
                if not self._added:
                    self._added = True
                    self.stats.terms_added += 1
                return g + part.to(device=g.device, dtype=g.dtype).view_as(g)

            # On the very tensor the classifier consumed: that is where the method's backward
            # passes (a flattened view of it would be a separate node that backward never visits).
            rec.inp.register_hook(add)

    def _log_values(self, values: Dict[str, Tensor], total: float) -> None:
        self.stats.computed += 1
        for k, v in values.items():
            self.stats.sums[k] += float(v)
        self.stats.sums["total"] += total
        n = self.stats.computed
        if self.config.log_every and (n == 1 or n % self.config.log_every == 0):
            parts = " ".join(f"{k}={float(v):.4f}" for k, v in values.items())
            logger.info("[dire] step %d: %s total=%.4f (steps that got the term before this one: %d)", n, parts, total, self.stats.terms_added)

    # ------------------------------------------------------------------ optimizer steps
    def _on_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self.enabled:
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        # Synthesis optimizers update plain tensors (the images); training a model updates
        # nn.Parameters and is none of DiRe's business.
        if not params or any(isinstance(p, nn.Parameter) for p in params):
            return
        self.stats.steps += 1
        if not self._added:
            where = f"{self.config.script or sys.argv[0]}" + (f" (upstream {self.config.commit})" if self.config.commit else "")
            reason = (
                "its backward did not reach the captured embeddings"
                if self._attached
                else "no classifier forward matched the criterion call"
            )
            raise DiReHookError(
                f"DiRe was not added to synthesis step {self.stats.steps} of {where}: {reason}; "
                f"the {self.config.method} patch does not fit this code (set DIRE_DISABLE=1 to run vanilla)"
            )
        self._attached = self._added = False
        images = params[0]
        if self._images is not None and self._images() is not images:
            self._commit_batch()
        self._images = weakref.ref(images)
        self._pending_batch = self._last

    def _commit_batch(self) -> None:
        """The previous batch of images is finished: its last embeddings join the memory."""
        if self._pending_batch is not None and self.config.memory:
            self.memory.add(*self._pending_batch)
            self.stats.batches_to_memory += 1
        self._pending_batch = None

    # ------------------------------------------------------------------ outputs
    def note_saved_image(self, path: str) -> None:
        """An image was written: the folder above ``new{cls}/`` is where the manifest goes."""
        folder = os.path.dirname(os.path.dirname(os.path.abspath(path)))
        if folder not in self.output_dirs:
            self.output_dirs.append(folder)

    def manifest(self, error: Optional[BaseException] = None) -> Dict[str, Any]:
        bank = self.bank
        return {
            "method": self.config.method,
            "status": "finished" if error is None else "failed",
            "error": None if error is None else f"{type(error).__name__}: {error}",
            "upstream_commit": self.config.commit,
            "script": self.config.script,
            "argv": list(sys.argv),
            "plugin_version": __version__,
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.config).items()},
            "bank": None if bank is None else {
                "fingerprint": bank.fingerprint, "cache_hit": bank.cache_hit, "classes": len(bank),
                "embeddings": bank.num_embeddings, "dim": bank.dim,
            },
            "synthesis_steps": self.stats.steps,
            "terms_added": self.stats.terms_added,
            "terms_computed": self.stats.computed,
            "criterion_calls_skipped": self.stats.criterion_calls_skipped,
            "batches_in_memory": self.stats.batches_to_memory,
            "memory_embeddings": len(self.memory),
            "mean_values": self.stats.means(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.started)),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }

    def fallback_manifest_path(self) -> Path:
        """Where the manifest goes when no image was saved (a run that failed early): the
        configured manifest folder, else ``<cache>/runs/``, else ``~/.cache/dire/runs/``; never the
        current folder, which is usually inside the upstream checkout."""
        base = self.config.manifest_dir or (os.path.join(self.config.cache_dir, "runs") if self.config.cache_dir else "")
        folder = Path(base or Path.home() / ".cache" / "dire" / "runs").expanduser()
        stem = Path(self.config.script or sys.argv[0] or "run").stem or "run"
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(self.started))
        return folder / f"{stem}-{stamp}-{os.getpid()}-{MANIFEST_NAME}"

    def write_manifest(self, error: Optional[BaseException] = None) -> List[Path]:
        """Write the manifest beside the saved images (or to :meth:`fallback_manifest_path`)."""
        rank = os.environ.get("RANK")
        name = MANIFEST_NAME if rank in (None, "0") else f"dire_manifest.rank{rank}.json"
        paths = [Path(d) / name for d in self.output_dirs] or [self.fallback_manifest_path()]
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


def start_runtime(config: RunConfig, bank_factory: BankFactory) -> DiReRuntime:
    """Install the process-wide runtime (idempotent); the manifest is written at exit, and an
    uncaught error of ours ends the run with one line and exit code 2."""
    global _RUNTIME
    if _RUNTIME is None:
        _RUNTIME = DiReRuntime(config, bank_factory)
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
    from .errors import DiReError

    runtime = _RUNTIME
    path = runtime.report_failure(error) if runtime is not None else None
    where = f" (manifest of this run: {path})" if path is not None else ""
    if isinstance(error, KeyboardInterrupt):
        print(f"{prog}: interrupted{where}", file=sys.stderr, flush=True)
        return 130
    if isinstance(error, DiReError):
        print(f"{prog}: error: {' '.join(str(error).split())}{where}", file=sys.stderr, flush=True)
        return 2
    if path is not None:
        logger.info("[dire] manifest of this failed run: %s", path)
    return 1


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
