"""The demo's MTT family: its MTT-shaped ``distill.py`` on scikit-learn's digits (``demo/mtt/``),
through the capture, options and weights of :mod:`dire_plugin.patches.mtt`: the step capture,
DiRe's gradient added right before ``optimizer_img.step()`` from a trained expert of the run's own
buffer (written by the demo's ``buffer.py``), outside the unrolled student. The one option that
differs is the dataset name the capture accepts (``digits``)."""
from __future__ import annotations

from dire_plugin.demo.spec import MTT_SCRIPT
from dire_plugin.hooks.declare import Target
from dire_plugin.hooks.patcher import method_patch
from dire_plugin.patches import mtt as real

from . import script_spec

METHOD = "demo-mtt"
PINNED = False

SCRIPTS = {MTT_SCRIPT: script_spec()}

#: As the real patch: the loop (structure only), the data, the networks, the student, the buffer.
TARGETS = (
    Target(MTT_SCRIPT, "main"),
    Target("demo/mtt/utils.py", "get_dataset", module="utils"),
    Target("demo/mtt/utils.py", "get_network", module="utils"),
    Target("demo/mtt/networks.py", "ConvNet"),
    Target("demo/mtt/reparam_module.py", "ReparamModule"),
    Target("demo/mtt/buffer.py", "main"),
)

DEFAULT_WEIGHTS = real.DEFAULT_WEIGHTS
CAPTURE = {**real.CAPTURE, "datasets": ("digits",)}

patch, unpatch = method_patch(METHOD, lambda: SCRIPTS, TARGETS, **CAPTURE)
