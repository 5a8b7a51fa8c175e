"""Distil the demo teacher DWA-style: ``python distillation_digits.py --arch-path T --init-path I``.

Written for the demo from the structure of DWA's distillation scripts (not DWA's code): SRe²L's
loss (CE + r_bn · BN prior) from real-image initialisation, with a directed weight perturbation of
the teacher. Per ipc index the teacher is loaded afresh (DWA's CIFAR script rebuilds it for every
ipc index) and kept in eval mode with its weights still requiring grad; one batch holds one image
of every class, initialised from ``{init-path}/tensor_{ipc}.pt``; per batch a new
``Adam([inputs], betas=(0.5, 0.9))``, a new ``Perterb`` and a new criterion. At iteration 0 only,
``--steps`` perturbation passes (forward, CE, backward, ``first_step(True)``: the weights move
along the teacher's accumulated gradient); then every iteration: forward, CE + BN prior,
``loss.backward()``, ``optimizer.step()``, clip. The images' gradients accumulate across the
perturbation passes, as DWA's do. It knows nothing of DiRe: ``dire-run demo-dwa ...`` adds it.

Writes ``{syn-data-path}/{exp-name}/new{cls:03d}/class{cls:03d}_id{ipc:03d}.png`` (with
``--store-best-images``) and ``synthetic.pt``: the final images (normalised) and labels, and the
CPU seconds and optimizer steps of the synthesis loops.
"""
import os
import random

import torch
import torch.nn as nn
import torch.optim as optim
from perterb import Perterb
from utils import (BNFeatureHook, clip_image, denormalize_image, load_model, lr_cosine_policy, recover_arguments,
                   resolve_recover_args, save_images)

from dire_plugin.demo.outputs import LoopTimer, save_synthetic


def get_images(args, model_teacher, ipc_id, timer):
    bn_hooks = [BNFeatureHook(m) for m in model_teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    init = torch.load(os.path.join(args.init_path, "tensor_{}.pt".format(ipc_id)), map_location="cpu", weights_only=True)
    images, labels = [], []

    targets_all = torch.arange(args.num_classes)
    for kk in range(0, args.num_classes, args.batch_size):
        targets = targets_all[kk:min(kk + args.batch_size, args.num_classes)].to(args.device)
        inputs = init[targets.cpu()].detach().clone().to(args.device).requires_grad_(True)

        optimizer = optim.Adam([inputs], lr=args.lr, betas=(0.5, 0.9), eps=1e-8)
        adjusted_optimizer = Perterb(model_teacher.parameters(), optimizer, rho=args.rho / args.steps)
        lr_scheduler = lr_cosine_policy(args.lr, 0, args.iteration)
        criterion = nn.CrossEntropyLoss().to(args.device)

        for iteration in range(args.iteration):
            with timer.timing():  # CPU time of the synthesis steps (outputs/LoopTimer)
                lr_scheduler(optimizer, iteration, iteration)
                off1 = random.randint(-args.jitter, args.jitter)
                off2 = random.randint(-args.jitter, args.jitter)
                inputs_jit = torch.roll(inputs, shifts=(off1, off2), dims=(2, 3))

                optimizer.zero_grad()
                if iteration == 0:
                    for _ in range(args.steps):
                        outputs = model_teacher(inputs_jit)
                        criterion(outputs, targets).backward()
                        adjusted_optimizer.first_step(True)

                outputs = model_teacher(inputs_jit)
                loss_ce = criterion(outputs, targets)
                loss_bn = torch.stack([h.r_feature for h in bn_hooks]).sum()
                loss = loss_ce + args.r_bn * loss_bn

                if args.print_every and iteration % args.print_every == 0:
                    print("iteration {}: total {:.4f} bn {:.4f} main criterion {:.4f}".format(
                        iteration, loss.item(), loss_bn.item(), loss_ce.item()), flush=True)

                loss.backward()
                optimizer.step()
                timer.step()
                inputs.data = clip_image(inputs.data, args.dataset)

        if args.store_best_images:
            save_images(args.syn_data_path, denormalize_image(inputs.data.clone(), args.dataset), targets, ipc_id)
        images.append(inputs.detach().cpu().clone())
        labels.append(targets.cpu())

    for h in bn_hooks:
        h.close()
    return torch.cat(images), torch.cat(labels)


def main_syn(args, ipc_id, timer):
    model_teacher = load_model(args.arch_name, args.arch_path, args.num_classes)
    if args.device == "cuda":
        model_teacher = nn.DataParallel(model_teacher).cuda()
    model_teacher.eval()  # the weights keep requires_grad: the perturbation reads their gradient
    return get_images(args, model_teacher, ipc_id, timer)


def parse_args():
    parser = recover_arguments("Distil the demo teacher DWA-style (real-image init, weight perturbation)",
                               ["digits"], "dwa")
    parser.add_argument("--init-path", type=str, required=True, help="folder of tensor_{ipc}.pt: one real image per class")
    parser.add_argument("--steps", type=int, default=12, help="perturbation passes at iteration 0")
    parser.add_argument("--rho", type=float, default=15e-3, help="total length of the weight perturbation")
    return resolve_recover_args(parser.parse_args())


if __name__ == "__main__":
    args = parse_args()
    os.makedirs(args.syn_data_path, exist_ok=True)
    timer = LoopTimer()
    images, labels = [], []
    for ipc_id in range(args.ipc_start, args.ipc_end):
        print("ipc = ", ipc_id, flush=True)
        x, y = main_syn(args, ipc_id, timer)
        images.append(x)
        labels.append(y)
    save_synthetic(args.syn_data_path, torch.cat(images), torch.cat(labels), timer)
