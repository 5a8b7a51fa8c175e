"""CDA (VILA-Lab/SRe2L, folder CDA/): SRe²L's loss with a crop curriculum."""
from __future__ import annotations

from dire_plugin.hooks.declare import ScriptSpec, Target, Weights
from dire_plugin.hooks.patcher import method_patch

from dire_plugin.patches.sre2l import IMAGENET, SMOKE_ARCH, SMOKE_ARGS, TINY

METHOD = "cda"

# SRe²L's arguments: CDA's scripts are SRe²L's with a crop curriculum.
_SMOKE = (*SMOKE_ARGS, "--store-best-images")

SCRIPTS = {
    # --verifier makes this script stop after its first batch: ten images are enough.
    "CDA/recover_cda_in1k.py": ScriptSpec(
        IMAGENET, num_classes=1000, arch=SMOKE_ARCH,
        smoke_args=(*_SMOKE, "--verifier-arch", SMOKE_ARCH, "--batch-size", "10", "--verifier"),
    ),
    # Not --verifier here: it loads a verifier checkpoint from a hard-coded path.
    "CDA/recover_cda_tiny.py": ScriptSpec(
        TINY, num_classes=200, arch=SMOKE_ARCH, checkpoint_key="model", cifar_stem=True,
        smoke_args=(*_SMOKE, "--arch-path", "{ckpt}", "--batch-size", "100"),
    ),
}

#: SRe²L's loss and optimizer (Adam at lr 0.25): the released weights, as for SRe²L.
DEFAULT_WEIGHTS = Weights(why="SRe²L's loss and Adam optimiser: the released SRe²L weights")

TARGETS = (
    Target("CDA/recover_cda_in1k.py", "get_images"),
    Target("CDA/recover_cda_in1k.py", "main_syn"),
    Target("CDA/recover_cda_in1k.py", "validate"),
    Target("CDA/recover_cda_tiny.py", "get_images"),
    Target("CDA/recover_cda_tiny.py", "main_syn"),
    Target("CDA/utils.py", "BNFeatureHook", module="utils"),
)

# The patch itself needs torch: built on first use, so that reading SCRIPTS/TARGETS (dire-apply
# --list/--verify/--remove) stays fast.
patch, unpatch = method_patch(METHOD, lambda: SCRIPTS, TARGETS, capture="decoupled")
