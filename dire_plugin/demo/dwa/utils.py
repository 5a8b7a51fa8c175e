"""Helpers the demo's DWA-shaped script imports as ``utils``, the way DWA's scripts import theirs:
the same BatchNorm prior, learning-rate policy, clipping, teacher loading, PNG layout and recover
options as the demo's SRe²L-shaped recover script (DWA's scripts are forks of SRe²L's), under
DWA's names."""
from dire_plugin.demo.recover.utils import (  # noqa: F401 - re-exported for the script
    BNFeatureHook,
    clip as clip_image,
    denormalize as denormalize_image,
    load_model,
    lr_cosine_policy,
    recover_arguments,
    resolve_recover_args,
    save_images,
)

__all__ = ["BNFeatureHook", "clip_image", "denormalize_image", "load_model", "lr_cosine_policy", "recover_arguments",
           "resolve_recover_args", "save_images"]
