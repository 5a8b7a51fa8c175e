"""The demo's own failure: a step that ran but did not do what the demo needs."""
from __future__ import annotations

from ..errors import DiReError

__all__ = ["DemoRunError"]


class DemoRunError(DiReError, RuntimeError):
    """A recover run failed, or a DiRe run did not get the term on every synthesis step.

    The message is one line naming the run and its log file.
    """
