"""Recover (SRe²L-style) synthetic digits from the demo teacher: ``python recover.py --arch-path T``.

Structured like SRe²L's recover scripts: a batch holds one image per class at one ipc index,
inputs start from ``torch.randn``, ``Adam(betas=(0.5, 0.9))`` with a cosine learning rate,
``loss = CE + r_bn · BN prior``, ``loss.backward()``, ``optimizer.step()``, then a clip to
valid pixels. It knows nothing of DiRe: ``dire-run demo recover.py ...`` adds the term through
the hooks, exactly as for an upstream script.

Writes ``{syn-data-path}/{exp-name}/new{cls:03d}/class{cls:03d}_id{ipc:03d}.png`` and
``synthetic.pt`` (the final images before 8-bit quantisation, normalised, with their labels).
"""
import argparse
import collections
import os
import random

import numpy as np
import torch
import torch.nn as nn
import torch.optim as optim
from utils import BNFeatureHook, clip, denormalize, load_model, lr_cosine_policy, save_images

IMAGE_SIZE = 8


def get_images(args, model_teacher, ipc_id):
    bn_hooks = [BNFeatureHook(m) for m in model_teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    targets = torch.arange(args.num_classes)  # one image per class: the batch is one ipc index
    inputs = torch.randn((targets.shape[0], 3, IMAGE_SIZE, IMAGE_SIZE), requires_grad=True, dtype=torch.float)

    optimizer = optim.Adam([inputs], lr=args.lr, betas=(0.5, 0.9), eps=1e-8)
    lr_scheduler = lr_cosine_policy(args.lr, 0, args.iteration)
    criterion = nn.CrossEntropyLoss()

    for iteration in range(args.iteration):
        lr_scheduler(optimizer, iteration, iteration)
        off1 = random.randint(-args.jitter, args.jitter)
        off2 = random.randint(-args.jitter, args.jitter)
        inputs_jit = torch.roll(inputs, shifts=(off1, off2), dims=(2, 3))

        optimizer.zero_grad()
        outputs = model_teacher(inputs_jit)
        loss_ce = criterion(outputs, targets)
        loss_bn = torch.stack([h.r_feature for h in bn_hooks]).sum()
        loss = loss_ce + args.r_bn * loss_bn

        if args.print_every and iteration % args.print_every == 0:
            print("iteration {}: total {:.4f} bn {:.4f} main criterion {:.4f}".format(
                iteration, loss.item(), loss_bn.item(), criterion(outputs, targets).item()), flush=True)

        loss.backward()
        optimizer.step()
        inputs.data = clip(inputs.data)

    save_images(args.syn_data_path, denormalize(inputs.data.clone()), targets, ipc_id)
    optimizer.state = collections.defaultdict(dict)
    for h in bn_hooks:
        h.close()
    return inputs.detach().clone(), targets


def main_syn(args):
    os.makedirs(args.syn_data_path, exist_ok=True)
    model_teacher = load_model(args.arch_path)
    model_teacher.eval()
    for p in model_teacher.parameters():
        p.requires_grad = False
    images, labels = [], []
    for ipc_id in range(args.ipc_start, args.ipc_end):
        print("ipc = ", ipc_id, flush=True)  # the demo's progress bar counts these lines
        x, y = get_images(args, model_teacher, ipc_id)
        images.append(x)
        labels.append(y)
    torch.save({"images": torch.cat(images), "labels": torch.cat(labels)}, os.path.join(args.syn_data_path, "synthetic.pt"))


def parse_args():
    parser = argparse.ArgumentParser("Recover synthetic digits from the demo teacher (SRe2L-style)")
    parser.add_argument("--arch-path", type=str, required=True, help="teacher checkpoint")
    parser.add_argument("--syn-data-path", type=str, default="./syn_data")
    parser.add_argument("--exp-name", type=str, default="recover")
    parser.add_argument("--iteration", type=int, default=200)
    parser.add_argument("--lr", type=float, default=0.25)
    parser.add_argument("--jitter", type=int, default=1)
    parser.add_argument("--r-bn", type=float, default=0.01)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--ipc-start", type=int, default=0)
    parser.add_argument("--ipc-end", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--print-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    args.syn_data_path = os.path.join(args.syn_data_path, args.exp_name)
    return args


if __name__ == "__main__":
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    main_syn(args)
