"""Code of ours at the start of every child process that ``multiprocessing`` spawns.

A spawned child is a fresh interpreter (``python -c 'from multiprocessing.spawn import
spawn_main; ...'``): G-VBSM's and EDC's ``mp.spawn`` workers, DataLoader workers under the spawn
start method. Nothing of the parent's patching is in it, and the ``.pth`` start-up line only
exists where ``dire-apply`` wrote one (``dire-run`` and the smoke runs need none). So while a
*prelude* is registered here, the command line of each spawned child runs it first: one line of
Python that reads its settings from the environment the child inherits (``DIRE_CPU_SHIM``,
``DIRE_ACTIVATE``), as the ``.pth`` line does. A fork child needs nothing (it inherits the
patched interpreter), and a process group the script starts itself (torchrun) runs our launcher
in every rank already.

Preludes run in the order they were registered (the CPU shim before DiRe's activation, which
may need it). ``multiprocessing.spawn.get_command_line`` is wrapped once, when the first prelude
is registered, and put back when the last one is removed.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Dict, List, Tuple

import wrapt

__all__ = ["add_prelude", "preludes", "remove_prelude"]

_PRELUDES: Dict[str, str] = {}
_WRAPPED: List[Tuple[Any, Any]] = []  # (module, the original function) while wrapped
_hook_registered = False


def preludes() -> Dict[str, str]:
    """Registered preludes, name → code, in the order children run them."""
    return dict(_PRELUDES)


def add_prelude(name: str, code: str) -> None:
    """Run ``code`` (one Python statement, no newline) first in every child spawned from now on;
    a second call with the same ``name`` replaces it."""
    global _hook_registered
    if "\n" in code:
        raise ValueError("a prelude is one line of Python")
    _PRELUDES[name] = code
    if not _hook_registered:
        _hook_registered = True
        wrapt.when_imported("multiprocessing.spawn")(_wrap)  # at once when already imported
    elif "multiprocessing.spawn" in sys.modules:
        _wrap(sys.modules["multiprocessing.spawn"])


def remove_prelude(name: str) -> None:
    """Children spawned from now on no longer run ``name``'s prelude (unknown: nothing happens)."""
    _PRELUDES.pop(name, None)
    if not _PRELUDES:
        while _WRAPPED:
            module, original = _WRAPPED.pop()
            if isinstance(vars(module).get("get_command_line"), wrapt.FunctionWrapper):
                module.get_command_line = original


def _wrap(module: Any) -> None:
    if not _PRELUDES or isinstance(vars(module).get("get_command_line"), wrapt.FunctionWrapper):
        return
    _WRAPPED.append((module, module.get_command_line))
    wrapt.wrap_function_wrapper(module, "get_command_line", _w_get_command_line)


def _w_get_command_line(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> List[str]:
    cmd = list(wrapped(*args, **kwargs))
    # ``[exe, *interpreter flags, "-c", program, "--multiprocessing-fork"]``; a frozen executable
    # has no ``-c`` program, and nothing of ours to run in it.
    if _PRELUDES and "-c" in cmd:
        at = cmd.index("-c") + 1
        cmd[at] = "; ".join([*_PRELUDES.values(), cmd[at]])
    return cmd
