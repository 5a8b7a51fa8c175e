"""The demo's DM family: its DM-shaped script on scikit-learn's digits (``demo/dm/``), through the
capture, options and weights of :mod:`dire_plugin.patches.dm`: the embed capture on
``networks.ConvNet.embed``, ``utils.DiffAugment`` and ``utils.get_dataset``, the manifest beside
``res_DM_*.pt``."""
from __future__ import annotations

from dire_plugin.demo.spec import DM_SCRIPT
from dire_plugin.hooks.declare import Target
from dire_plugin.hooks.patcher import method_patch
from dire_plugin.patches import dm as real

from . import script_spec

METHOD = "demo-dm"
PINNED = False

SCRIPTS = {DM_SCRIPT: script_spec()}

#: As the real patch: the loop (structure only), the data, the networks, the augmentation, embed.
TARGETS = (
    Target(DM_SCRIPT, "main"),
    Target("demo/dm/utils.py", "get_dataset", module="utils"),
    Target("demo/dm/utils.py", "get_network", module="utils"),
    Target("demo/dm/utils.py", "DiffAugment", module="utils"),
    Target("demo/dm/networks.py", "ConvNet.embed", module="networks"),
)

DEFAULT_WEIGHTS = real.DEFAULT_WEIGHTS
CAPTURE = real.CAPTURE

patch, unpatch = method_patch(METHOD, lambda: SCRIPTS, TARGETS, **CAPTURE)
