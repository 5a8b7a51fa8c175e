"""What every demo family script shares besides its method: the run options ``--seed``,
``--device`` and ``--threads``, and how they take effect.

Every random draw a script makes comes from the generators seeded here, so the vanilla and the
DiRe run of one seed see the same networks, batches and augmentations (DiRe draws none of them):
their difference is DiRe's. Imported by the scripts (``import dire_plugin.demo.script_args``),
as any installed package is; it is no sibling module a patch would look for.
"""
from __future__ import annotations

import argparse
import random

import numpy as np
import torch

__all__ = ["add_run_arguments", "start_run"]


def add_run_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--seed", type=int, default=0, help="seeds torch, random and numpy")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: cuda when available")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return parser


def start_run(args: argparse.Namespace) -> argparse.Namespace:
    """``--device auto`` becomes cuda when torch sees one, ``--threads`` is applied, and torch,
    ``random`` and numpy are seeded with ``--seed``."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    return args
