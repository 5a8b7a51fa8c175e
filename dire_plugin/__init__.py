"""dire-plugin: the DiRe diversity regulariser for existing dataset-condensation codebases."""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import DiReError, DiReInputError
from .loss import DEFAULT_R_C, DEFAULT_R_E, DiReLoss

__all__ = ["__version__", "DiReError", "DiReInputError", "DiReLoss", "DEFAULT_R_C", "DEFAULT_R_E"]
