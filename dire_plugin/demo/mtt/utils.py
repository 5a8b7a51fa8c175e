"""Helpers the demo's MTT-shaped scripts import as ``utils``, the way MTT's ``buffer.py`` and
``distill.py`` import theirs (written for the demo, not MTT's code): the training set, a fresh
network per call, the Siamese augmentation, one training epoch of an expert.

``get_dataset(dataset, data_path, batch_size, subset, args=args)`` returns MTT's 12-tuple
``(channel, im_size, num_classes, class_names, mean, std, dst_train, dst_test, testloader,
loader_train_dict, class_map, class_map_inv)``; the digits come with scikit-learn (no download,
no ZCA), normalised as the demo's teacher saw them, held as one tensor of images and one of labels.
"""
import torch

from dire_plugin.demo.data import TensorSet as TensorDataset, digits_sets
from dire_plugin.demo.dsa import DiffAugment, ParamDiffAug  # noqa: F401 - re-exported for the scripts
from dire_plugin.demo.spec import DIGITS
from networks import ConvNet

__all__ = ["DiffAugment", "ParamDiffAug", "TensorDataset", "epoch", "get_dataset", "get_network"]


def get_dataset(dataset, data_path, batch_size=1, subset=None, args=None):
    if dataset != "digits":
        raise SystemExit("unknown dataset: %s (the demo's MTT scripts distil scikit-learn's digits)" % dataset)
    if args is not None and getattr(args, "zca", False):
        raise SystemExit("--zca: the demo's digits are not whitened")
    dst_train, dst_test = digits_sets()
    channel, im_size, num_classes = 3, (DIGITS.image_size, DIGITS.image_size), DIGITS.num_classes
    class_names = list(dst_train.classes)
    class_map = {c: c for c in range(num_classes)}
    testloader = torch.utils.data.DataLoader(dst_test, batch_size=256, shuffle=False, num_workers=0)
    return (channel, im_size, num_classes, class_names, list(DIGITS.mean), list(DIGITS.std), dst_train, dst_test,
            testloader, None, class_map, dict(class_map))


def get_network(model, channel, num_classes, im_size=(8, 8), dist=True):
    """A freshly initialised network from the global torch generator (MTT reseeds it from the
    clock; a seeded demo run draws the same networks every time)."""
    if model != "ConvNet":
        raise SystemExit("unknown model: %s (the demo's MTT scripts have ConvNet)" % model)
    return ConvNet(num_classes, channel=channel, image_size=im_size[0])


def epoch(mode, dataloader, net, optimizer, criterion, args, aug):
    """One pass over ``dataloader``: train (``optimizer`` steps, DSA when ``aug``) or test; returns
    ``(mean loss, accuracy)``."""
    loss_sum, correct, seen = 0.0, 0, 0
    net.train(mode == "train")
    for images, labels in dataloader:
        images, labels = images.to(args.device), labels.to(args.device)
        if mode == "train" and aug:
            images = DiffAugment(images, args.dsa_strategy, param=args.dsa_param)
        with torch.set_grad_enabled(mode == "train"):
            output = net(images)
            loss = criterion(output, labels)
        if mode == "train":
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        loss_sum += float(loss.detach()) * len(labels)
        correct += int((output.argmax(1) == labels).sum())
        seen += len(labels)
    return loss_sum / seen, correct / seen
