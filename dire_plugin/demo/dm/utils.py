"""Helpers the demo's DM-shaped script imports as ``utils``, the way DC-BENCH's ``main_DM.py``
imports its own (written for the demo, not DC-BENCH's code): the training set, a fresh network
per call, the Siamese augmentation.

``get_dataset`` returns DC-BENCH's tuple ``(channel, im_size, num_classes, class_names, mean, std,
dst_train, dst_test, testloader)``; the digits come with scikit-learn (no download), normalised as
the demo's teacher saw them, held as one tensor of images and one of labels.
"""
import torch

from dire_plugin.demo.data import digits_sets
from dire_plugin.demo.dsa import DiffAugment, ParamDiffAug  # noqa: F401 - re-exported for the script
from dire_plugin.demo.spec import DIGITS
from networks import ConvNet

__all__ = ["DiffAugment", "ParamDiffAug", "get_dataset", "get_network"]


def get_dataset(dataset, data_path=None):
    if dataset != "digits":
        raise SystemExit("unknown dataset: %s (the demo's DM script distils scikit-learn's digits)" % dataset)
    dst_train, dst_test = digits_sets()
    channel, im_size, num_classes = 3, (DIGITS.image_size, DIGITS.image_size), DIGITS.num_classes
    class_names = list(dst_train.classes)
    testloader = torch.utils.data.DataLoader(dst_test, batch_size=256, shuffle=False, num_workers=0)
    return channel, im_size, num_classes, class_names, list(DIGITS.mean), list(DIGITS.std), dst_train, dst_test, testloader


def get_network(model, channel, num_classes, im_size=(8, 8), device="cpu"):
    """A freshly initialised network from the global torch generator: a seeded run draws the same
    networks every time (DC-BENCH reseeds from the clock instead)."""
    if model != "ConvNet":
        raise SystemExit("unknown model: %s (the demo's DM script has ConvNet)" % model)
    return ConvNet(num_classes, channel=channel, image_size=im_size[0]).to(device)
