"""Distil the digits by matching training trajectories (MTT), shaped like MTT's ``distill.py``:
``python distill.py --dataset digits --ipc 10 --buffer_path DIR``.

Written for the demo from the structure of MTT's script (not its code): ``get_dataset(...,
args=args)``; class-major ``label_syn``; ``image_syn`` from random real images of each class
(``--pix_init real``) and the learnable student learning rate ``syn_lr`` (from ``--lr_teacher``) as
plain leaves, each with an SGD of its own (``optimizer_img``, ``optimizer_lr``, momentum 0.5);
experts from ``{buffer_path}/{dataset}/{model}/replay_buffer_0.pt``. Per iteration: a fresh
``ReparamModule`` student starts from a random epoch (below ``--max_start_epoch``) of an expert,
is unrolled ``--syn_steps`` times on DSA-augmented synthetic batches with ``create_graph=True``
(``student_params[-1] - syn_lr * grad``); the loss is the distance of its end point to the expert
``--expert_epochs`` later, normalised by the expert's own distance; ``grand_loss.backward()``,
``optimizer_img.step()``, ``optimizer_lr.step()``. Every random draw comes from ``--seed``. It
knows nothing of DiRe: ``dire-run demo-mtt ...`` adds it (right before ``optimizer_img.step()``,
outside the unroll).

Writes ``./logged_files/{dataset}/{run_name}/images_{it}.pt``, ``labels_{it}.pt`` and
``learning_rate_{it}.pt`` (MTT's layout, relative to the folder it runs from), and
``synthetic.pt`` beside them: images, labels, the learnt ``syn_lr``, and the CPU seconds and steps of
the synthesis loop (the demo evaluates the sets itself, with ``syn_lr``, as MTT does).
"""
import argparse
import os
import random

import numpy as np
import torch
from reparam_module import ReparamModule
from torch import nn
from utils import DiffAugment, ParamDiffAug, get_dataset, get_network

from dire_plugin.demo.data import class_sampler
from dire_plugin.demo.outputs import LoopTimer, save_synthetic
from dire_plugin.demo.script_args import add_run_arguments, start_run


def main(args):
    args.dsa = args.dsa_strategy not in ("none", "None")
    args.dsa_param = ParamDiffAug()
    channel, im_size, num_classes, class_names, mean, std, dst_train, dst_test, testloader, loader_train_dict, \
        class_map, class_map_inv = get_dataset(args.dataset, args.data_path, args.batch_real, args.subset, args=args)
    args.batch_syn = args.batch_syn or num_classes * args.ipc

    get_images = class_sampler(dst_train, num_classes)  # get_images(c, n): n random real images of class c

    label_syn = torch.tensor(np.array([np.ones(args.ipc, dtype=np.int_) * i for i in range(num_classes)]),
                             dtype=torch.long, requires_grad=False, device=args.device).view(-1)
    image_syn = torch.randn(size=(num_classes * args.ipc, channel, im_size[0], im_size[1]), dtype=torch.float)
    syn_lr = torch.tensor(args.lr_teacher).to(args.device)
    if args.pix_init == "real":
        for c in range(num_classes):
            image_syn.data[c * args.ipc:(c + 1) * args.ipc] = get_images(c, args.ipc).detach().data

    image_syn = image_syn.detach().to(args.device).requires_grad_(True)
    syn_lr = syn_lr.detach().to(args.device).requires_grad_(True)
    optimizer_img = torch.optim.SGD([image_syn], lr=args.lr_img, momentum=0.5)
    optimizer_lr = torch.optim.SGD([syn_lr], lr=args.lr_lr, momentum=0.5)
    optimizer_img.zero_grad()
    criterion = nn.CrossEntropyLoss().to(args.device)

    expert_dir = os.path.join(args.buffer_path, args.dataset)
    if args.dataset in ("CIFAR10", "CIFAR100") and not args.zca:
        expert_dir += "_NO_ZCA"
    expert_dir = os.path.join(expert_dir, args.model)
    buffer = torch.load(os.path.join(expert_dir, "replay_buffer_0.pt"), weights_only=True)
    experts = _in_turn(buffer)

    timer = LoopTimer()
    with timer.timing():  # CPU time of the synthesis loop (outputs.LoopTimer)
        for it in range(0, args.Iteration):
            student_net = get_network(args.model, channel, num_classes, im_size, dist=False).to(args.device)
            student_net = ReparamModule(student_net)
            student_net.train()
            num_params = sum([np.prod(p.size()) for p in (student_net.parameters())])

            expert_trajectory = next(experts)

            start_epoch = np.random.randint(0, args.max_start_epoch)
            starting_params = expert_trajectory[start_epoch]
            target_params = expert_trajectory[start_epoch + args.expert_epochs]
            target_params = _flat(target_params, args.device)
            starting_params = _flat(starting_params, args.device)
            student_params = [starting_params.clone().requires_grad_(True)]

            labels = label_syn.to(args.device)
            batches = _minibatches(len(image_syn), args.batch_syn)
            for _step in range(args.syn_steps):
                these_indices = next(batches)
                x = image_syn[these_indices]
                this_y = labels[these_indices]
                if args.dsa:
                    x = DiffAugment(x, args.dsa_strategy, param=args.dsa_param)
                x = student_net(x, flat_param=student_params[-1])
                ce_loss = criterion(x, this_y)
                grad = torch.autograd.grad(ce_loss, student_params[-1], create_graph=True)[0]
                student_params.append(student_params[-1] - syn_lr * grad)

            param_loss = torch.nn.functional.mse_loss(student_params[-1], target_params, reduction="sum") / num_params
            param_dist = torch.nn.functional.mse_loss(starting_params, target_params, reduction="sum") / num_params
            grand_loss = param_loss / param_dist

            optimizer_img.zero_grad()
            optimizer_lr.zero_grad()
            grand_loss.backward()
            optimizer_img.step()
            optimizer_lr.step()
            timer.step()
            del student_params
            if it % 20 == 0:
                print("iter = %04d, loss = %.4f, syn_lr = %.5f" % (it, grand_loss.item(), syn_lr.item()), flush=True)

    save_dir = os.path.join(".", "logged_files", args.dataset, args.run_name)
    os.makedirs(save_dir, exist_ok=True)
    with torch.no_grad():
        image_save = image_syn.detach().cpu()
        torch.save(image_save, os.path.join(save_dir, "images_{}.pt".format(args.Iteration)))
        torch.save(label_syn.cpu(), os.path.join(save_dir, "labels_{}.pt".format(args.Iteration)))
        torch.save(syn_lr.detach().cpu(), os.path.join(save_dir, "learning_rate_{}.pt".format(args.Iteration)))
        save_synthetic(save_dir, image_save, label_syn, timer, syn_lr=float(syn_lr))



def _in_turn(buffer):
    """The expert trajectories in a shuffled order, reshuffled each time all were used."""
    while True:
        random.shuffle(buffer)
        yield from buffer


def _minibatches(n: int, size: int):
    """Index batches of ``size`` over ``n`` images, a fresh permutation once all were drawn."""
    while True:
        yield from reversed(torch.split(torch.randperm(n), size))


def _flat(params, device) -> torch.Tensor:
    """One flat vector of a trajectory's parameter tensors, on ``device``."""
    return torch.cat([p.data.to(device).reshape(-1) for p in params])

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="MTT on the demo's digits")
    parser.add_argument("--dataset", type=str, default="digits")
    parser.add_argument("--subset", type=str, default=None)
    parser.add_argument("--model", type=str, default="ConvNet")
    parser.add_argument("--ipc", type=int, default=10, help="images per class")
    parser.add_argument("--Iteration", type=int, default=100, help="distillation iterations")
    parser.add_argument("--lr_img", type=float, default=100, help="learning rate for updating synthetic images")
    parser.add_argument("--lr_lr", type=float, default=1e-05, help="learning rate for updating syn_lr")
    parser.add_argument("--lr_teacher", type=float, default=0.01, help="initial syn_lr (the experts' learning rate)")
    parser.add_argument("--batch_real", type=int, default=256)
    parser.add_argument("--batch_syn", type=int, default=None, help="synthetic images per unrolled step (default: all)")
    parser.add_argument("--pix_init", type=str, default="real", choices=["noise", "real"])
    parser.add_argument("--dsa_strategy", type=str, default="scale_rotate_crop", help="'none' switches DSA off")
    parser.add_argument("--data_path", type=str, default=None, help="unused: the digits come with scikit-learn")
    parser.add_argument("--buffer_path", type=str, default="./buffers")
    parser.add_argument("--expert_epochs", type=int, default=2, help="expert epochs the student should match")
    parser.add_argument("--syn_steps", type=int, default=10, help="unrolled student steps per iteration")
    parser.add_argument("--max_start_epoch", type=int, default=5)
    parser.add_argument("--zca", action="store_true")
    parser.add_argument("--texture", action="store_true")
    parser.add_argument("--run_name", type=str, default="demo")
    main(start_run(add_run_arguments(parser).parse_args()))
