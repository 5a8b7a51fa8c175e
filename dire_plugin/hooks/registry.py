"""The methods dire-plugin has a patch for, by name, and how to load one."""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Dict

from ..errors import DiReInputError

__all__ = ["INTERNAL_METHODS", "METHODS", "load_method"]

#: method name → patch module. Order is the order ``dire-apply --list`` prints.
METHODS: Dict[str, str] = {
    "sre2l": "dire_plugin.patches.sre2l",
    "cda": "dire_plugin.patches.cda",
    "dwa": "dire_plugin.patches.dwa",
    "delt": "dire_plugin.patches.delt",
    "prism": "dire_plugin.patches.prism",
    "dm": "dire_plugin.patches.dm",
    "mtt": "dire_plugin.patches.mtt",
    "gvbsm": "dire_plugin.patches.gvbsm",
    "edc": "dire_plugin.patches.edc",
    "infer": "dire_plugin.patches.infer",
}

#: Patches of our own scripts (the embedded demo, one per method family: ``demo`` is its SRe²L
#: family): usable by the launcher, not pinned to any upstream, so ``dire-apply`` does not list them.
INTERNAL_METHODS: Dict[str, str] = {
    "demo": "dire_plugin.demo.patches.sre2l",
    "demo-dwa": "dire_plugin.demo.patches.dwa",
    "demo-dm": "dire_plugin.demo.patches.dm",
    "demo-mtt": "dire_plugin.demo.patches.mtt",
}


def load_method(name: str) -> ModuleType:
    """The patch module of ``name``; an unknown name is a one-line error listing the known ones."""
    known = {**METHODS, **INTERNAL_METHODS}
    module = known.get(name.lower()) if isinstance(name, str) else None
    if module is None:
        raise DiReInputError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}")
    return importlib.import_module(module)
