"""The demo's DWA family: its DWA-shaped script on scikit-learn's digits (``demo/dwa/``), through
the capture, options and weights of :mod:`dire_plugin.patches.dwa`: the decoupled capture's
``"auto"`` route, with ``Perterb.first_step`` wrapped as the reader of the teacher's ``.grad``."""
from __future__ import annotations

from dire_plugin.demo.spec import DWA_SCRIPT
from dire_plugin.hooks.declare import Target
from dire_plugin.hooks.patcher import method_patch
from dire_plugin.patches import dwa as real

from . import script_spec

METHOD = "demo-dwa"
PINNED = False

SCRIPTS = {DWA_SCRIPT: script_spec()}

#: As the real patch: the loop's own functions (structure only), the perturbation it wraps, the BN hook.
TARGETS = (
    Target(DWA_SCRIPT, "get_images"),
    Target(DWA_SCRIPT, "main_syn"),
    Target("demo/dwa/perterb.py", "Perterb.first_step", module="perterb"),
    Target("demo/dwa/utils.py", "BNFeatureHook", module="utils"),
)

DEFAULT_WEIGHTS = real.DEFAULT_WEIGHTS
CAPTURE = real.CAPTURE

patch, unpatch = method_patch(METHOD, lambda: SCRIPTS, TARGETS, **CAPTURE)
