"""``dire-run METHOD SCRIPT [ARGS...]``: run an upstream script with DiRe, explicitly.

Installs the hooks, then runs the script exactly as ``python SCRIPT ARGS`` would (its folder as
``sys.path[0]``, ``sys.argv`` rewritten, ``run_name="__main__"``). Settings come from the
checkout's ``dire-apply`` config when there is one; flags override them.
"""
from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path
from typing import List, Optional

from .cli._common import OneLineParser, fail, positive_int, weight

__all__ = ["main"]

PROG = "dire-run"


def _parser(remainder: bool = True) -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="dire-run",
        description="Run an upstream condensation script with the DiRe term added.",
        epilog="Example: dire-run sre2l 'SRe2L/*small_dataset/recover_cifar.py' --real-data ~/data -- --ipc-end 10",
    )
    p.add_argument("method", help="patch to use (see dire-apply --list)")
    p.add_argument("script", help="the upstream entry script")
    p.add_argument("--real-data", help="real training data of the teacher (ImageFolder or torchvision CIFAR layout)")
    p.add_argument("--r-c", type=weight, help="weight of the cosine terms")
    p.add_argument("--r-e", type=weight, help="weight of the Euclidean term")
    p.add_argument("--reduction", choices=("mean", "sum"))
    p.add_argument("--cache-dir", help="where the real-embedding bank is cached")
    p.add_argument("--components", help="comma-separated subset of cd,cdm,edm (ablation)")
    p.add_argument("--log-every", type=positive_int, help="log DiRe values every N steps")
    if remainder:
        p.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the script (after --)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if "--" in argv:  # options may then stand anywhere before the separator
            cut = argv.index("--")
            opts = _parser(remainder=False).parse_args(argv[:cut])
            opts.args = argv[cut + 1:]
        else:  # everything after SCRIPT belongs to the script
            opts = _parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed in one line
        return exc.code if isinstance(exc.code, int) else 0
    from .errors import DiReError, DiReInputError
    from .patching import load_method

    script = Path(opts.script).expanduser().resolve()
    args = opts.args
    try:
        if not script.is_file():
            raise DiReInputError(f"script {opts.script} does not exist")
        method = load_method(opts.method)
        rel = _relative_script(script, method.SCRIPTS)
        # The checkout root, so the hooks' upstream symbols are checked there even without dire-apply.
        root = script.as_posix()[: -len(rel)].rstrip("/")
        overrides = {"method": opts.method.lower(), "script": rel, "root": root}
        if opts.real_data:
            real = Path(opts.real_data).expanduser()
            if not real.is_dir():
                raise DiReInputError(f"--real-data {real} {'is not a directory' if real.exists() else 'does not exist'}")
            overrides["real_data"] = str(real.resolve())
        for key in ("r_c", "r_e", "reduction", "cache_dir", "log_every"):
            if getattr(opts, key) is not None:
                overrides[key] = getattr(opts, key)
        if opts.components:
            overrides["components"] = [c.strip() for c in opts.components.split(",") if c.strip()]
        from ._startup import activate

        activate(script, overrides=overrides, required=True)
    except DiReError as e:
        fail(PROG, str(e))
        return 2
    except KeyboardInterrupt:
        fail(PROG, "interrupted")
        return 130
    sys.argv = [str(script), *args]
    sys.path.insert(0, str(script.parent))
    try:
        runpy.run_path(str(script), run_name="__main__")
    except (DiReError, KeyboardInterrupt) as e:
        from .runtime import fail_run

        return fail_run(e, PROG)
    except BaseException as e:
        if not isinstance(e, SystemExit):
            from .runtime import fail_run

            fail_run(e, PROG)  # the manifest of the failed run; the traceback is the script's own
        raise
    return 0


def _relative_script(script: Path, covered) -> str:
    """The covered entry script this path is (matched by its repo-relative tail)."""
    posix = script.as_posix()
    for rel in covered:
        if posix.endswith("/" + rel):
            return rel
    from .errors import DiReInputError

    raise DiReInputError(f"{script.name} is not an entry script of this method: one of {', '.join(covered)}")


if __name__ == "__main__":
    sys.exit(main())
