"""What every dire-plugin command shares: errors are one line on stderr, usage errors exit 2."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

__all__ = ["OneLineParser", "echo", "existing_dir", "fail", "positive_int", "run_command", "run_main", "share", "weight", "components",
           "WEIGHTS_AND_SHARE"]


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error of the command (exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def fail(prog: str, message: str) -> None:
    """Print ``message`` as a single line (newlines folded) after ``PROG: error:``."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)


def echo(text: str) -> None:
    """Print ``text``; a console that cannot show the tables' arrows gets ASCII ones."""
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    try:
        text.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        text = text.replace("↑", "^").replace("↓", "v").encode(encoding, "replace").decode(encoding)
    print(text, flush=True)


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer (a whole number >= 1)")
    return value


def weight(text: str) -> float:
    """argparse type: a term weight, a finite number >= 0 (the check every entry point shares)."""
    from ..regularizer.defaults import check_weights
    from ..errors import DiReInputError

    try:
        return check_weights(text, 0.0)[0]
    except DiReInputError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number >= 0 that float32 holds (at most 3.4e+38)") from None


def share(text: str) -> float:
    """argparse type: DiRe's share of the images' gradient, a finite number > 0."""
    from ..regularizer.defaults import check_share
    from ..errors import DiReInputError

    try:
        return check_share(text)
    except DiReInputError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number > 0") from None


def components(text: str) -> list:
    """argparse type: comma-separated terms (``cd,cdm,edm`` and ``logdet``)."""
    from ..regularizer.defaults import ALL_COMPONENTS

    chosen = [c.strip() for c in text.split(",") if c.strip()]
    if not chosen or any(c not in ALL_COMPONENTS for c in chosen):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated subset of {','.join(ALL_COMPONENTS)}")
    return chosen


#: The usage error of ``--share`` with explicit weights (``dire-apply``, ``dire-run``).
WEIGHTS_AND_SHARE = "--share calibrates the weights itself: give --share or --r-c/--r-e/--r-d, not both"


def existing_dir(path: Optional[str], option: str) -> Path:
    """``path`` resolved, if it is a folder; else a one-line ``DiReInputError`` naming ``option``."""
    from ..errors import DiReInputError

    if not path:
        raise DiReInputError(f"{option} DIR is required: the real images DiRe compares the synthetic ones with")
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_dir():
        what = "is not a directory" if resolved.exists() else "does not exist"
        raise DiReInputError(f"{option} {resolved} {what}: give the folder of the real dataset")
    return resolved


def run_command(prog: str, command: Callable[[Any], int], args: Any) -> int:
    """``command(args)`` with the exit codes every tool shares: bad input (any ``DiReError``) is
    one line and 2, an OS error (e.g. an output folder that cannot be written) one line and 1."""
    from ..errors import DiReError

    try:
        return command(args)
    except DiReError as exc:
        fail(prog, str(exc))
        return 2
    except OSError as exc:
        fail(prog, f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))
        return 1
    except KeyboardInterrupt:
        fail(prog, "interrupted")
        return 130


def run_main(prog: str, parser: argparse.ArgumentParser, argv: Optional[Sequence[str]], command: Callable[[Any], int],
             check: Optional[Callable[[argparse.ArgumentParser, Any], None]] = None) -> int:
    """A tool's ``main``: parse ``argv`` (``check(parser, args)`` may add usage errors through
    ``parser.error``), then :func:`run_command`. ``--help`` and usage errors end here with their
    exit code (0, or 2 after one line)."""
    try:
        args = parser.parse_args(argv)
        if check is not None:
            check(parser, args)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0
    return run_command(prog, command, args)
