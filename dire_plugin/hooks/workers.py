"""DiRe in workers that ``torch.multiprocessing.spawn`` starts (G-VBSM's and EDC's ``mp.spawn``).

The workers are fresh interpreters: DiRe is switched on in them by the prelude every spawned child
runs (:mod:`dire_plugin.upstream.children`), from the settings the parent exported. What the core
needs of a worker besides, two wrappers give:

* in the parent, ``start_processes`` hands each worker its function wrapped in :class:`Worker`
  (picklable: the function travels by reference, as it would alone). In the worker,
  :class:`Worker` exchanges the ranks' final counters while their process group still exists
  (G-VBSM never destroys it, so ``destroy_process_group``'s wrapper never runs), and, when the
  function fails, writes the worker's failed manifest and hands the parent the error in one line
  instead of a traceback (our own errors; the upstream's own keep their traceback);
* in the parent, ``ProcessContext.join`` turns such a worker's failure into the same
  :class:`~dire_plugin.errors.DiReError`, prefixed with the worker's index and carrying its
  manifest: the launcher (or the start-up excepthook) ends the job with that one line and exit
  code 2, as a rank of a torchrun job does. When one worker fails, ``join`` stops the others
  (SIGTERM): they write their manifests and leave without a traceback.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .. import errors
from ..embeddings.collectives import first_failure
from ..errors import DiReError, DiReHookError
from .capture import Wrapper
from .distributed import exchange_counts
from .termination import interruption

__all__ = ["MARK", "Worker", "worker_failure", "worker_wrappers"]

#: Starts the one line a failing worker hands its parent; JSON follows it.
MARK = "dire-worker-failure: "


class WorkerFailed(Exception):
    """Raised in a worker so that torch's ``_wrap`` hands the parent our one line (its traceback's
    last line is ``...WorkerFailed: <MARK><JSON>``)."""


class Worker:
    """``fn`` as a worker runs it (see the module doc); pickled by reference, like ``fn``."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    def __call__(self, index: int, *args: Any) -> Any:
        from .runtime import current_runtime

        try:
            result = self.fn(index, *args)
            runtime = current_runtime()
            if runtime is not None and runtime.active and first_failure() is None:
                exchange_counts(runtime, "the DiRe counters at the end of the worker", finished=True)
            return result
        except SystemExit:
            raise  # the worker ended itself: its manifest is written at exit, as any run's
        except BaseException as e:  # noqa: BLE001 - reported, then raised on
            runtime = current_runtime()
            manifest = runtime.report_failure(e) if runtime is not None else None
            ended = interruption(e)
            if ended is not None:
                sys.exit(ended[1])  # stopped by the parent after another worker failed: no traceback
            if isinstance(e, DiReError):
                raise WorkerFailed(MARK + json.dumps({
                    "error": type(e).__name__, "message": " ".join(str(e).split()),
                    "manifest": None if manifest is None else str(manifest),
                })) from None
            raise


def worker_failure(text: str, index: int, workers: int) -> Optional[DiReError]:
    """The error a worker handed its parent in ``text`` (a ``ProcessRaisedException``'s message),
    or ``None`` when it is no error of ours."""
    at = text.rfind(MARK)
    if at < 0:
        return None
    try:
        data = json.loads(text[at + len(MARK):].splitlines()[0])
    except (ValueError, IndexError):
        return None
    kind = getattr(errors, str(data.get("error")), DiReHookError)
    if not (isinstance(kind, type) and issubclass(kind, DiReError)):
        kind = DiReHookError
    error = kind(f"worker {index} of {workers}: {data.get('message', '')}")
    error.dire_manifest = Path(data["manifest"]) if data.get("manifest") else None  # fail_run names this one
    return error


def _w_start_processes(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    from .runtime import current_runtime

    runtime = current_runtime()
    if runtime is not None and runtime.active:
        if args:
            args = (Worker(args[0]), *args[1:])
        elif "fn" in kwargs:
            kwargs = {**kwargs, "fn": Worker(kwargs["fn"])}
    return wrapped(*args, **kwargs)


def _w_join(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    try:
        return wrapped(*args, **kwargs)
    except Exception as e:  # ProcessRaisedException: its message holds the worker's traceback
        failure = worker_failure(str(e), getattr(e, "error_index", -1), len(getattr(instance, "processes", ())))
        if failure is None:
            raise
        raise failure from None


def worker_wrappers() -> Sequence[Wrapper]:
    """The wrappers above, for every capture family's patch (:mod:`.patcher`)."""
    return (
        ("torch.multiprocessing.spawn", "start_processes", _w_start_processes),
        ("torch.multiprocessing.spawn", "ProcessContext.join", _w_join),
    )
