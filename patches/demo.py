"""The embedded demo (``dire demo``): our own SRe²L-shaped recover script on scikit-learn's digits.

It goes through the same hook runtime as the upstream patches, so the demo exercises the path
users get. There is no upstream commit to pin (``PINNED = False``): start-up skips the
fingerprint checks, and ``dire-apply`` does not list it.
"""
from __future__ import annotations

from dire_plugin.demo.spec import IMAGE_SIZE, MEAN, NUM_CLASSES, RECOVER_SCRIPT, STD
from dire_plugin.patching import RealDataSpec, ScriptSpec, lazy_patch

METHOD = "demo"
PINNED = False

# The launcher matches an installed script by its tail: .../dire_plugin/demo/recover/recover.py.
SCRIPTS = {
    RECOVER_SCRIPT: ScriptSpec(
        RealDataSpec("imagefolder", crop=IMAGE_SIZE, mean=MEAN, std=STD), num_classes=NUM_CLASSES,
    ),
}

TARGETS = ()

patch, unpatch = lazy_patch(METHOD, lambda: SCRIPTS, TARGETS)
