"""Helpers the demo's recover script imports as ``utils``, the way SRe²L's scripts import theirs.

Written for the demo (not taken from upstream): the BatchNorm statistics hook, the cosine
learning-rate policy, clipping to valid pixels, loading the teacher, and saving PNGs in SRe²L's
layout.
"""
import math
import os

import numpy as np
import torch
from PIL import Image

from dire_plugin.demo.model import build_model
from dire_plugin.demo.spec import DATASETS

__all__ = ["DATASETS", "BNFeatureHook", "lr_cosine_policy", "clip", "denormalize", "load_model", "save_images"]


class BNFeatureHook:
    """Distance between a BatchNorm layer's batch statistics and its running statistics (the
    SRe²L prior: synthetic batches should look like real ones to every BN layer)."""

    def __init__(self, module):
        self.hook = module.register_forward_hook(self.hook_fn)
        self.r_feature = None

    def hook_fn(self, module, inputs, output):
        x = inputs[0]
        mean = x.mean([0, 2, 3])
        var = x.permute(1, 0, 2, 3).reshape(x.shape[1], -1).var(1, unbiased=False)
        self.r_feature = torch.norm(module.running_mean - mean, 2) + torch.norm(module.running_var - var, 2)

    def close(self):
        self.hook.remove()


def lr_cosine_policy(base_lr, warmup, total):
    """``(optimizer, iteration, epoch)`` → sets a cosine-decayed learning rate."""

    def set_lr(optimizer, iteration, epoch):
        if epoch < warmup:
            lr = base_lr * (epoch + 1) / warmup
        else:
            lr = 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / max(1, total - warmup))) * base_lr
        for group in optimizer.param_groups:
            group["lr"] = lr

    return set_lr


def clip(images, dataset):
    """Keep normalised images inside the range of valid pixels ([0, 1] before normalisation)."""
    mean, std = dataset.mean, dataset.std
    for c in range(3):
        images[:, c] = torch.clamp(images[:, c], -mean[c] / std[c], (1 - mean[c]) / std[c])
    return images


def denormalize(images, dataset):
    """Normalised images → pixels in [0, 1]."""
    mean, std = dataset.mean, dataset.std
    for c in range(3):
        images[:, c] = torch.clamp(images[:, c] * std[c] + mean[c], 0, 1)
    return images


def load_model(arch, path, num_classes):
    """The teacher ``arch`` from a ``{"state_dict": ...}`` checkpoint (tensors only:
    ``weights_only``), keys saved with or without DataParallel's ``module.``.

    Channels-last weights: oneDNN's convolutions on the demo's batches of ten 8x8 digits run
    about 20 % faster that way on CPU; the script's NCHW inputs are converted by the first
    convolution.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    model = build_model(arch, num_classes)
    model.load_state_dict({k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()})
    return model.to(memory_format=torch.channels_last)


def save_images(syn_data_path, images, targets, ipc_id):
    """One PNG per image: ``{syn_data_path}/new{cls:03d}/class{cls:03d}_id{ipc:03d}.png``."""
    for i in range(images.shape[0]):
        cls = int(targets[i].item())
        folder = os.path.join(syn_data_path, "new{:03d}".format(cls))
        os.makedirs(folder, exist_ok=True)
        array = np.rint(images[i].detach().cpu().numpy().transpose(1, 2, 0) * 255).astype(np.uint8)
        Image.fromarray(array).save(os.path.join(folder, "class{:03d}_id{:03d}.png".format(cls, ipc_id)))
