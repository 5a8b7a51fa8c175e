"""The demo's lines on stderr: progress (``[demo] ...``) and warnings (``[demo] warning: ...``).

Written through ``tqdm.write`` so that a line never tears a progress bar; a warning is folded
into one line whatever the message it quotes.
"""
from __future__ import annotations

import sys

from tqdm import tqdm

__all__ = ["log", "warn"]


def log(msg: str) -> None:
    """One progress line: ``[demo] msg``."""
    tqdm.write(f"[demo] {msg}", file=sys.stderr)


def warn(msg: str) -> None:
    """One warning line: ``[demo] warning: msg`` (newlines folded)."""
    tqdm.write(f"[demo] warning: {' '.join(str(msg).split())}", file=sys.stderr)
