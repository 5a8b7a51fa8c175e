"""dire-plugin: the DiRe diversity regulariser for existing dataset-condensation codebases.

The top-level names are imported lazily: the start-up hook that activates patches imports
``dire_plugin.activation.startup`` in every Python process of a patched checkout, and must not pay for
importing torch unless DiRe is actually switched on.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_LAZY = {
    "DiReLoss": "dire_plugin.regularizer.loss",
    "DEFAULT_R_C": "dire_plugin.regularizer.defaults",
    "DEFAULT_R_E": "dire_plugin.regularizer.defaults",
    "DiReError": "dire_plugin.errors",
    "DiReInputError": "dire_plugin.errors",
    "RealEmbeddingBank": "dire_plugin.embeddings.bank",
    "SyntheticMemory": "dire_plugin.embeddings.memory",
    "EmbeddingCapture": "dire_plugin.embeddings.capture",
    "capture_embeddings": "dire_plugin.embeddings.capture",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dire_plugin' has no attribute {name!r}")


def __dir__() -> list:
    return sorted(__all__)
