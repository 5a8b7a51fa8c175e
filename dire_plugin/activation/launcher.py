"""Run an upstream entry script in this process with DiRe switched on, exactly as ``python SCRIPT
ARGS`` would run it (its folder as ``sys.path[0]``, ``sys.argv`` rewritten,
``run_name="__main__"``); the engine behind ``dire-run`` (:mod:`dire_plugin.cli.run`)."""
from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List

from ..errors import DiReError, DiReInputError
from ..hooks.registry import load_method

__all__ = ["launch", "relative_script"]


def relative_script(script: Path, covered: Iterable[str]) -> str:
    """The covered entry script this path is (matched by its repo-relative tail)."""
    posix = script.as_posix()
    covered = list(covered)
    for rel in covered:
        if posix.endswith("/" + rel):
            return rel
    raise DiReInputError(f"{script.name} is not an entry script of this method: one of {', '.join(covered)}")


def launch(prog: str, method_name: str, script: Path, args: List[str], overrides: Dict[str, Any]) -> int:
    """Activate ``method_name`` for ``script`` with ``overrides`` on top of the checkout's settings,
    then run it with ``args``. Returns the exit code: 2 with one line for an error of ours (before
    or during the run, with the failed run's manifest named), 130 for Ctrl-C, 143 for SIGTERM;
    the script's own errors propagate as they would under ``python``."""
    from ..hooks.termination import Terminated, install_sigterm, interruption
    from .startup import activate

    install_sigterm()
    try:
        if not script.is_file():
            raise DiReInputError(f"script {script} does not exist")
        method = load_method(method_name)
        rel = relative_script(script, method.SCRIPTS)
        # The checkout root, so the hooks' upstream symbols are checked there even without dire-apply.
        root = script.as_posix()[: -len(rel)].rstrip("/")
        activate(script, overrides={"method": method_name.lower(), "script": rel, "root": root, **overrides},
                 required=True, argv=list(args))
    except DiReError as e:
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as e:
        what, code = interruption(e)
        print(f"{prog}: {what}", file=sys.stderr)
        return code
    sys.argv = [str(script), *args]
    sys.path.insert(0, str(script.parent))
    from ..hooks.runtime import fail_run

    try:
        runpy.run_path(str(script), run_name="__main__")
    except (DiReError, KeyboardInterrupt, Terminated) as e:
        return fail_run(e, prog)
    except BaseException as e:
        if not isinstance(e, SystemExit):
            fail_run(e, prog)  # the manifest of the failed run; the traceback is the script's own
        raise
    return 0
