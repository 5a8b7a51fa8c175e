"""The ``DIRE_*`` environment variables we read: one parser for the on/off ones and one message for
a value we cannot use, so every reader accepts the same spellings and refuses the rest with the
same line. Standard library only: the ``.pth`` start-up path reads them in every process of a
patched checkout, before (and often without) torch.
"""
from __future__ import annotations

import os

from ..errors import DiReInputError

__all__ = ["FALSE_WORDS", "TRUE_WORDS", "bad_value", "env_flag"]

#: Spellings that switch a flag on, and off (compared lower-case, surrounding blanks ignored).
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("", "0", "false", "no", "off")


def bad_value(name: str, value: str, expected: str) -> DiReInputError:
    """The one line for ``name=value`` that we cannot use; ``expected`` says what would do."""
    return DiReInputError(f"{name}={value!r} is not {expected}: fix it or unset it")


def env_flag(name: str) -> bool:
    """Whether the on/off variable ``name`` is on (unset is off). A value outside
    :data:`TRUE_WORDS` and :data:`FALSE_WORDS` is refused rather than guessed: ``DIRE_DISABLE=false``
    read as "set" once switched DiRe off."""
    value = os.environ.get(name, "")
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise bad_value(name, value, f"one of {'/'.join(TRUE_WORDS)} or {'/'.join(FALSE_WORDS[1:])} or empty")
