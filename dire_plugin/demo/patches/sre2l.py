"""The demo's SRe²L family: its SRe²L-shaped recover script on scikit-learn's digits or CIFAR (its
``--dataset`` option picks the bank's preprocessing and class count), through the capture and
weights of :mod:`dire_plugin.patches.sre2l`.

It goes through the same hook runtime as the upstream patches, so the demo exercises the path
users get. There is no upstream commit to pin (``PINNED = False``).
"""
from __future__ import annotations

from dire_plugin.demo.spec import DATASETS, DIGITS, RECOVER_SCRIPT
from dire_plugin.hooks.patcher import method_patch
from dire_plugin.patches import sre2l as real

from . import script_spec

METHOD = "demo"
PINNED = False

# The launcher matches an installed script by its tail: .../dire_plugin/demo/recover/recover.py.
SCRIPTS = {
    RECOVER_SCRIPT: script_spec(
        DIGITS, by_option=("--dataset", tuple((name, script_spec(d)) for name, d in DATASETS.items() if d is not DIGITS)),
    ),
}

TARGETS = ()

#: What a bare dire-run of the script gets: SRe²L's own default.
DEFAULT_WEIGHTS = real.DEFAULT_WEIGHTS
CAPTURE = real.CAPTURE

patch, unpatch = method_patch(METHOD, lambda: SCRIPTS, TARGETS, **CAPTURE)
