"""Recover (SRe²L-style) synthetic images from the demo teacher: ``python recover.py --arch-path T``.

Structured like SRe²L's recover scripts: a batch holds one image per class at one ipc index
(``--batch-size`` classes at a time), inputs start from ``torch.randn`` on the GPU when there is
one, the teacher runs under ``nn.DataParallel`` there, ``Adam(betas=(0.5, 0.9))`` with a cosine
learning rate, ``loss = CE + r_bn · BN prior``, ``loss.backward()``, ``optimizer.step()``, then a
clip to valid pixels. It knows nothing of DiRe: ``dire-run demo recover.py ...`` adds the term
through the hooks, exactly as for an upstream script. It is also the look-alike upstream script
the tests run the patch path on (``--device cuda`` under the CPU shim).

Writes ``{syn-data-path}/{exp-name}/new{cls:03d}/class{cls:03d}_id{ipc:03d}.png`` (with
``--store-best-images``) and ``synthetic.pt`` (the final images before 8-bit quantisation,
normalised, with their labels, and the CPU seconds and optimizer steps of the synthesis loops:
CPU time, so that a busy machine does not inflate it).
"""
import collections
import os
import random

import torch
import torch.nn as nn
import torch.optim as optim
from utils import (DATASETS, BNFeatureHook, clip, denormalize, load_model, lr_cosine_policy, recover_arguments,
                   resolve_recover_args, save_images)

from dire_plugin.demo.outputs import LoopTimer, save_synthetic


def get_images(args, model_teacher, ipc_id, timer):
    bn_hooks = [BNFeatureHook(m) for m in model_teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    size = args.dataset.image_size
    images, labels = [], []

    targets_all = torch.arange(args.num_classes)
    for kk in range(0, args.num_classes, args.batch_size):
        targets = targets_all[kk:min(kk + args.batch_size, args.num_classes)].to(args.device)
        inputs = torch.randn((targets.shape[0], 3, size, size), requires_grad=True, device=args.device,
                             dtype=torch.float)

        optimizer = optim.Adam([inputs], lr=args.lr, betas=(0.5, 0.9), eps=1e-8)
        lr_scheduler = lr_cosine_policy(args.lr, 0, args.iteration)
        criterion = nn.CrossEntropyLoss().to(args.device)

        for iteration in range(args.iteration):
            with timer.timing():  # CPU time of the synthesis steps (outputs/LoopTimer)
                lr_scheduler(optimizer, iteration, iteration)
                off1 = random.randint(-args.jitter, args.jitter)
                off2 = random.randint(-args.jitter, args.jitter)
                inputs_jit = torch.roll(inputs, shifts=(off1, off2), dims=(2, 3))
                if args.flip and random.random() < 0.5:
                    inputs_jit = torch.flip(inputs_jit, dims=(3,))

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
                timer.step()
                inputs.data = clip(inputs.data, args.dataset)

        if args.store_best_images:
            save_images(args.syn_data_path, denormalize(inputs.data.clone(), args.dataset), targets, ipc_id)
        images.append(inputs.detach().cpu().clone())
        labels.append(targets.cpu())
        optimizer.state = collections.defaultdict(dict)

    for h in bn_hooks:
        h.close()
    return torch.cat(images), torch.cat(labels)


def main_syn(args):
    os.makedirs(args.syn_data_path, exist_ok=True)
    model_teacher = load_model(args.arch_name, args.arch_path, args.num_classes)
    if args.device == "cuda":
        model_teacher = nn.DataParallel(model_teacher).cuda()
    model_teacher.eval()
    for p in model_teacher.parameters():
        p.requires_grad = False
    images, labels = [], []
    timer = LoopTimer()
    for ipc_id in range(args.ipc_start, args.ipc_end):
        print("ipc = ", ipc_id, flush=True)
        x, y = get_images(args, model_teacher, ipc_id, timer)
        images.append(x)
        labels.append(y)
    save_synthetic(args.syn_data_path, torch.cat(images), torch.cat(labels), timer)


def parse_args():
    parser = recover_arguments("Recover synthetic images from the demo teacher (SRe2L-style)", DATASETS, "recover")
    parser.add_argument("--num-classes", type=int, default=None, help="default: the dataset's")
    return resolve_recover_args(parser.parse_args())


if __name__ == "__main__":
    main_syn(parse_args())
