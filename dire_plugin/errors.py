"""Exceptions the user sees. The CLI turns :class:`DiReInputError` into exit code 2 and one line."""
from __future__ import annotations

import importlib.util
from typing import Sequence


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


#: Import name → distribution name, for the packages that only optional extras bring.
_DISTRIBUTIONS = {"sklearn": "scikit-learn", "matplotlib": "matplotlib"}


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a finder that refuses it, a broken installation
        return False


def require_extra(modules: Sequence[str], extra: str, what: str) -> None:
    """Raise :class:`DiReInputError` naming ``extra`` unless every module in ``modules`` can be
    imported. Called before any work starts, so a missing extra costs one line, not a run."""
    missing = [m for m in modules if not _importable(m)]
    if missing:
        names = " and ".join(_DISTRIBUTIONS.get(m, m) for m in missing)
        raise DiReInputError(f'{what} needs {names}, which is not installed: pip install "dire-plugin[{extra}]"')
