"""Exceptions the user sees. The CLI turns :class:`DiReInputError` into exit code 2 and one line."""
from __future__ import annotations


class DiReError(Exception):
    """Base class of every error raised on purpose by dire-plugin."""


class DiReInputError(DiReError, ValueError):
    """Bad input: wrong path, unknown method, missing class, NaN embeddings, ...

    Raised before anything is changed; the message is one line that says what to fix.
    """


class DiReHookError(DiReError, RuntimeError):
    """A run that asked for DiRe cannot add it: a hook target moved, or a hook never fired.

    Stops the run instead of letting it finish vanilla; the message names the file, the symbol
    and the pinned upstream commit where it can.
    """
