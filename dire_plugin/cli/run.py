"""``dire-run METHOD SCRIPT [--options] -- [ARGS...]``: run an upstream script with DiRe, explicitly.

The script runs exactly as ``python SCRIPT ARGS`` would (see :mod:`dire_plugin.activation.launcher`).
Settings come from the checkout's ``dire-apply`` config when there is one; flags override them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..errors import DiReInputError
from ..hooks.settings import BANK_DTYPES
from ..regularizer.defaults import LOGDET_KERNELS
from ._common import WEIGHTS_AND_SHARE, OneLineParser, components, existing_dir, fail, positive_int, share, weight

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
    p.add_argument("--r-d", type=weight, help="weight of the logdet term (with --components ...,logdet)")
    p.add_argument("--logdet-kernel", choices=LOGDET_KERNELS, help="kernel of the logdet term (default cosine)")
    p.add_argument("--share", type=share, help="calibrate r_c and r_e (ratio kept) on the first synthesis steps so "
                   "that DiRe's gradient is SHARE times the method's on the images")
    p.add_argument("--reduction", choices=("mean", "sum"))
    p.add_argument("--cache-dir", help="where the real-embedding bank is cached")
    p.add_argument("--components", type=components, help="comma-separated terms: cd,cdm,edm (ablation) and logdet")
    p.add_argument("--log-every", type=positive_int, help="log DiRe values every N steps")
    p.add_argument("--bank-dtype", choices=BANK_DTYPES, help="storage of the real-embedding bank (default float32)")
    if remainder:
        p.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the script (after --)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """``dire-run``: parse ``argv`` (default ``sys.argv[1:]``), then run the script; the exit code."""
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
    if opts.share is not None and any(x is not None for x in (opts.r_c, opts.r_e, opts.r_d)):
        fail(PROG, f"{WEIGHTS_AND_SHARE} (see {PROG} --help)")
        return 2
    from ..activation.launcher import launch

    overrides: Dict[str, Any] = {}
    if opts.real_data:
        try:
            overrides["real_data"] = str(existing_dir(opts.real_data, "--real-data"))
        except DiReInputError as exc:
            fail(PROG, str(exc))
            return 2
    if opts.cache_dir:  # resolved here: the script may run from another folder (checked at activation)
        overrides["cache_dir"] = str(Path(opts.cache_dir).expanduser().resolve())
    for key in ("r_c", "r_e", "r_d", "share", "reduction", "log_every", "bank_dtype", "components", "logdet_kernel"):
        if getattr(opts, key) is not None:
            overrides[key] = getattr(opts, key)
    if any(x is not None for x in (opts.r_c, opts.r_e, opts.r_d)):
        overrides["share"] = None  # explicit weights replace a share from the checkout's settings
    return launch(PROG, opts.method, Path(opts.script).expanduser().resolve(), opts.args, overrides)


if __name__ == "__main__":
    sys.exit(main())
