"""SIGTERM ends a patched run as Ctrl-C does: batch schedulers (SLURM's time limit, ``kill``,
torchrun stopping the other ranks) send it, and its default action kills the process on the spot,
with no line and no manifest of the failed run. Here it raises :class:`Terminated` in the main
thread instead, so the run unwinds, writes its manifest and says so in one line (exit code 143).

Standard library only; the runtime core and the ``dire-run`` launcher install it.
"""
from __future__ import annotations

import signal
import threading
from typing import Any, Optional, Tuple

__all__ = ["Terminated", "install_sigterm", "interruption", "uninstall_sigterm"]


class Terminated(BaseException):
    """The process received SIGTERM. A ``BaseException``, as ``KeyboardInterrupt`` is, so an
    upstream ``except Exception`` does not swallow it; not a ``KeyboardInterrupt``, so an
    upstream's own Ctrl-C handling does not take it for one."""

    def __str__(self) -> str:
        return "SIGTERM"


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def install_sigterm() -> bool:
    """Turn SIGTERM into :class:`Terminated` while it still has its default action; a handler the
    script or its parent chose (or SIG_IGN) stays, and so does one the script installs later.
    Returns whether ours is in place. Only the main thread may set handlers: elsewhere, nothing."""
    if threading.current_thread() is not threading.main_thread():
        return False
    current = signal.getsignal(signal.SIGTERM)
    if current is _raise_terminated:
        return True
    if current is not signal.SIG_DFL:
        return False
    signal.signal(signal.SIGTERM, _raise_terminated)
    return True


def uninstall_sigterm() -> None:
    """SIGTERM's default action again, if ours is in place (the runtime stopped: a process that
    goes on, a test run, is not ended by our exception)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is _raise_terminated:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def interruption(error: BaseException) -> Optional[Tuple[str, int]]:
    """``(what happened, exit code)`` for a run ended from outside (Ctrl-C: 130, SIGTERM: 143, the
    shells' 128 + signal number), else ``None``."""
    if isinstance(error, Terminated):
        return "terminated by SIGTERM", 128 + signal.SIGTERM
    if isinstance(error, KeyboardInterrupt):
        return "interrupted", 130
    return None
