"""What every dire-plugin command shares: errors are one line on stderr, usage errors exit 2."""
from __future__ import annotations

import argparse
import sys

__all__ = ["OneLineParser", "echo", "fail", "positive_int"]


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
