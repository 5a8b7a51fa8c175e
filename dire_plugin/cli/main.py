"""``dire``: the umbrella command. ``dire demo`` runs the embedded demo (SRe²L, DWA, DM and MTT ±
DiRe on scikit-learn's digits, offline, a few minutes on a laptop CPU; or SRe²L on CIFAR the user
has).

Exit codes: 0 done, 2 bad input or a failed demo step (one line on stderr), 1 an output that
could not be written.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..demo.spec import METHOD_CHOICES
from ..errors import DiReInputError
from ._common import OneLineParser, echo, positive_int, run_main, weight

__all__ = ["build_parser", "main"]

PROG = "dire"
#: Smallest class of the training split has 131 images; intra-class metrics need two per class.
MIN_IPC, MAX_IPC = 2, 100



def _ipc(text: str) -> int:
    value = positive_int(text)
    if not MIN_IPC <= value <= MAX_IPC:
        raise argparse.ArgumentTypeError(f"{text!r}: images per class must be between {MIN_IPC} and {MAX_IPC}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``dire`` and its subcommands."""
    p = OneLineParser(prog=PROG, description="DiRe diversity regulariser: tools.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    d = sub.add_parser(
        "demo", help="run the embedded demo: SRe²L, DWA, DM and MTT ± DiRe on scikit-learn digits",
        description="Distil scikit-learn's digits with our SRe²L-, DWA-, DM- and MTT-shaped scripts, vanilla, "
        "with DiRe at each method's default weights and at one common gradient share (through the same hook "
        "runtime and capture modules as the real patches), then compare each family's own accuracy protocol, "
        "coverage and within-class diversity over several synthesis seeds, with a paired test. Offline; a few "
        "minutes on 2 CPU cores (--quick: a smoke run). --dataset cifar10/cifar100 runs the SRe²L family with "
        "a ResNet-18 on CIFAR you have, on the GPU when there is one.",
        epilog="examples: dire demo | dire demo --method dm | dire demo --quick | dire demo --ablation | "
        "dire demo --method sre2l --ipc 10 50 --syn-seeds 5 | dire demo --dataset cifar10 --data-path ~/data",
    )
    d.add_argument("--method", choices=METHOD_CHOICES, metavar="FAMILY",
                   help=f"family to distil with: {', '.join(METHOD_CHOICES)} (default: all on digits; sre2l for "
                   "CIFAR and --ablation)")
    d.add_argument("--quick", action="store_true",
                   help="smoke run: fewer iterations, 2 synthesis seeds, 1 student per set (noisy numbers)")
    d.add_argument("--ablation", action="store_true",
                   help="compare the 7 combinations of the CD/CDM/EDM terms and the logdet term (alone, in place of and beside CD; cosine and RBF kernels) at IPC 10 (writes ablation.md/.json)")
    d.add_argument("--ipc", type=_ipc, nargs="+", metavar="N", help="images per class (default 10; CIFAR: 10 50)")
    d.add_argument("--seeds", type=positive_int, metavar="N",
                   help="students per set, paired across variants (default 2; --quick: 1)")
    d.add_argument("--syn-seeds", type=positive_int, metavar="N",
                   help="synthetic sets per variant and IPC, the unit of the paired test (default 3; --quick: 2)")
    d.add_argument("--iterations", type=positive_int, metavar="N",
                   help="synthesis iterations of every family, in its own unit (default: each family's, see the "
                   "report; CIFAR: 500)")
    d.add_argument("--student-steps", type=positive_int, metavar="N",
                   help="training steps per student (digits: 150 relabelled, 200 on hard labels; --quick 60; CIFAR: 1000)")
    d.add_argument("--teacher-epochs", type=positive_int, metavar="N", help="teacher training epochs (digits: 15; CIFAR: 30)")
    d.add_argument("--r-bn", type=weight, metavar="F", help="weight of the BN prior of the SRe²L and DWA scripts (default 0.01)")
    d.add_argument("--jobs", type=positive_int, metavar="N", help="processes at once (default: CPU count, at most 8; on a GPU 4)")
    d.add_argument("--out", metavar="DIR", default="dire-demo", help="output folder (default ./dire-demo)")
    d.add_argument("--cache-dir", metavar="DIR", help="digits images, teachers, MTT experts and bank cache (default ~/.cache/dire/demo)")
    d.add_argument("--no-plots", action="store_true", help="skip the figures")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.add_argument("--dataset", choices=("digits", "cifar10", "cifar100"), default="digits",
                   help="data to distil (default digits, bundled with scikit-learn; CIFAR needs --data-path)")
    d.add_argument("--data-path", metavar="DIR",
                   help="CIFAR folder: torchvision's layout (cifar-10-batches-py/ or cifar-100-python/ inside) "
                   "or train/ and test/ with one folder per class")
    d.add_argument("--device", choices=("cuda", "cpu"), help="where teacher, students and recover run (default: cuda when available)")
    return p


def _options(args: argparse.Namespace):
    from ..demo.pipeline import DemoOptions, resolve_families
    from ..errors import require_extra

    # Before any work: the digits come with scikit-learn, the figures need matplotlib.
    needed = (["sklearn"] if args.dataset == "digits" else []) + ([] if args.no_plots else ["matplotlib"])
    require_extra(needed, "demo", "dire demo" + (" (figures; --no-plots skips them)" if args.dataset != "digits" else ""))
    if args.dataset == "digits" and args.data_path:
        raise DiReInputError("--data-path goes with --dataset cifar10/cifar100: the digits come with scikit-learn")
    if args.dataset != "digits" and not args.data_path:
        raise DiReInputError(f"--dataset {args.dataset} needs --data-path DIR (torchvision layout, or train/ and test/ "
                             "with one folder per class)")
    resolve_families(args.method, args.dataset, args.ablation)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise DiReInputError("--device cuda: torch sees no CUDA device here")
    given = {
        "ipcs": tuple(dict.fromkeys(args.ipc)) if args.ipc else None,
        "seeds": args.seeds, "syn_seeds": args.syn_seeds, "iterations": args.iterations,
        "student_steps": args.student_steps, "r_bn": args.r_bn, "jobs": args.jobs,
        "teacher_epochs": args.teacher_epochs, "device": args.device,
    }
    given = {k: v for k, v in given.items() if v is not None}
    common = dict(out=Path(args.out), method=args.method, cache_dir=Path(args.cache_dir) if args.cache_dir else None,
                  ablation=args.ablation, plots=not args.no_plots, progress=not args.no_progress,
                  dataset=args.dataset, data_path=Path(args.data_path) if args.data_path else None)
    if args.quick:
        return DemoOptions.quick_run(**common, **given)
    return DemoOptions(**common, **given)


def _demo(args: argparse.Namespace) -> int:
    from ..demo.pipeline import run_demo, summary

    result = run_demo(_options(args))
    echo(summary(result))
    return 0



def _require_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.command is None:
        parser.error("choose a command: demo")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``dire`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    # A demo step that failed raises DiReError, whose message names its log.
    return run_main(PROG, build_parser(), argv, _demo, _require_command)



if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
