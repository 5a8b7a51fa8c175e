"""Helpers the demo's recover script imports as ``utils``, the way SRe²L's scripts import theirs.

Written for the demo (not taken from upstream): the BatchNorm statistics hook, the cosine
learning-rate policy, clipping to valid pixels, loading the teacher, saving PNGs in SRe²L's
layout, and the command-line options SRe²L's recover script shares with DWA's (DWA's script, a
fork of SRe²L's, takes the same).
"""
import argparse
import math
import os

import numpy as np
import torch
from PIL import Image

from dire_plugin.demo.model import build_model
from dire_plugin.demo.script_args import add_run_arguments, start_run
from dire_plugin.demo.spec import DATASETS

__all__ = ["DATASETS", "BNFeatureHook", "lr_cosine_policy", "clip", "denormalize", "load_model", "save_images",
           "recover_arguments", "resolve_recover_args"]


def recover_arguments(description, datasets, exp_name):
    """The options of an SRe²L-style recover script (the demo's SRe²L and DWA scripts add theirs)."""
    parser = argparse.ArgumentParser(description)
    parser.add_argument("--dataset", choices=sorted(datasets), default="digits",
                        help="what the teacher learnt: image size, normalisation, default architecture")
    parser.add_argument("--arch-name", type=str, default=None, help="teacher architecture (default: the dataset's)")
    parser.add_argument("--arch-path", type=str, required=True, help="teacher checkpoint ({'state_dict': ...})")
    parser.add_argument("--syn-data-path", type=str, default="./syn_data")
    parser.add_argument("--exp-name", type=str, default=exp_name)
    parser.add_argument("--iteration", type=int, default=200)
    parser.add_argument("--lr", type=float, default=0.25)
    parser.add_argument("--jitter", type=int, default=None, help="roll jitter in pixels (default: the dataset's shift)")
    parser.add_argument("--r-bn", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=None, help="classes per batch (default: all)")
    parser.add_argument("--ipc-start", type=int, default=0)
    parser.add_argument("--ipc-end", type=int, default=10)
    parser.add_argument("--store-best-images", action="store_true", help="write the PNGs")
    parser.add_argument("--print-every", type=int, default=100)
    return add_run_arguments(parser)


def resolve_recover_args(args):
    """Defaults that depend on the dataset, the output folder, then the run options
    (:func:`~dire_plugin.demo.script_args.start_run`: device, threads, seeds)."""
    args.dataset = DATASETS[args.dataset]
    args.arch_name = args.arch_name or args.dataset.arch
    args.num_classes = getattr(args, "num_classes", None) or args.dataset.num_classes
    args.batch_size = args.batch_size or args.num_classes
    args.jitter = args.dataset.max_shift if args.jitter is None else args.jitter
    args.flip = args.dataset.flip
    args.syn_data_path = os.path.join(args.syn_data_path, args.exp_name)
    return start_run(args)


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
