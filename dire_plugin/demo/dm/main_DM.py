"""Distil the digits by distribution matching (DM), shaped like DC-BENCH's ``methods/dc/main_DM.py``:
``python main_DM.py --dataset digits --ipc 10 --save_path DIR``.

Written for the demo from the structure of DC-BENCH's script (not its code): ``image_syn``
class-major (``label_syn`` = [0]*ipc + [1]*ipc + ...), initialised from random real images of each
class (``--init real``) or noise; ``optimizer_img = SGD([image_syn], lr_img, momentum=0.5)``. Every
iteration a fresh random ConvNet, its parameters frozen, ``embed = net.embed``; per class, a random
real batch and that class's synthetic images, both through the same Siamese augmentation (one
seed per class), ``loss += ‖mean embed(real) − mean embed(syn)‖²``; then ``loss.backward()`` and
``optimizer_img.step()``. Every random draw comes from ``--seed``, so two runs with one seed see
the same networks, batches and augmentations. It knows nothing of DiRe: ``dire-run demo-dm ...``
adds it.

Writes ``{save_path}/res_DM_{dataset}_{model}_{ipc}ipc.pt`` (DC-BENCH's ``{"data": [[image_syn,
label_syn]], "accs_all_exps": ...}``; the demo evaluates the sets itself) and ``synthetic.pt``: the
images, labels, and the CPU seconds and steps of the synthesis loop.
"""
import argparse
import copy
import os

import numpy as np
import torch
from utils import DiffAugment, ParamDiffAug, get_dataset, get_network

from dire_plugin.demo.data import class_sampler
from dire_plugin.demo.outputs import LoopTimer, save_synthetic
from dire_plugin.demo.script_args import add_run_arguments, start_run


def main():
    parser = argparse.ArgumentParser(description="DM on the demo's digits")
    parser.add_argument("--dataset", type=str, default="digits")
    parser.add_argument("--model", type=str, default="ConvNet")
    parser.add_argument("--ipc", type=int, default=10, help="images per class")
    parser.add_argument("--Iteration", type=int, default=500, help="training iterations")
    parser.add_argument("--lr_img", type=float, default=1.0, help="learning rate for updating synthetic images")
    parser.add_argument("--batch_real", type=int, default=64, help="real images per class and iteration")
    parser.add_argument("--init", type=str, default="real", choices=["noise", "real"], help="synthetic images from")
    parser.add_argument("--dsa_strategy", type=str, default="scale_rotate_crop", help="'none' switches DSA off")
    parser.add_argument("--data_path", type=str, default=None, help="unused: the digits come with scikit-learn")
    parser.add_argument("--save_path", type=str, default="result")
    args = start_run(add_run_arguments(parser).parse_args())
    args.dsa_param = ParamDiffAug()
    args.dsa = args.dsa_strategy not in ("none", "None")
    os.makedirs(args.save_path, exist_ok=True)

    channel, im_size, num_classes, class_names, mean, std, dst_train, dst_test, testloader = get_dataset(
        args.dataset, args.data_path)

    get_images = class_sampler(dst_train, num_classes, args.device)  # get_images(c, n): n random real images of class c

    # Initialise the synthetic data
    image_syn = torch.randn(size=(num_classes * args.ipc, channel, im_size[0], im_size[1]), dtype=torch.float,
                            requires_grad=True, device=args.device)
    label_syn = torch.tensor(np.array([np.ones(args.ipc) * i for i in range(num_classes)]), dtype=torch.long,
                             requires_grad=False, device=args.device).view(-1)
    if args.init == "real":
        for c in range(num_classes):
            image_syn.data[c * args.ipc:(c + 1) * args.ipc] = get_images(c, args.ipc).detach().data

    optimizer_img = torch.optim.SGD([image_syn], lr=args.lr_img, momentum=0.5)
    optimizer_img.zero_grad()
    timer = LoopTimer()
    with timer.timing():  # CPU time of the synthesis loop (outputs.LoopTimer)
        for it in range(args.Iteration):
            net = get_network(args.model, channel, num_classes, im_size, device=args.device)
            net.train()
            for param in list(net.parameters()):
                param.requires_grad = False
            embed = net.module.embed if torch.cuda.device_count() > 1 and hasattr(net, "module") else net.embed

            loss = torch.tensor(0.0).to(args.device)
            for c in range(num_classes):
                img_real = get_images(c, args.batch_real)
                img_syn = image_syn[c * args.ipc:(c + 1) * args.ipc].reshape((args.ipc, channel, im_size[0], im_size[1]))
                if args.dsa:
                    seed = int(np.random.randint(0, 100000))
                    img_real = DiffAugment(img_real, args.dsa_strategy, seed=seed, param=args.dsa_param)
                    img_syn = DiffAugment(img_syn, args.dsa_strategy, seed=seed, param=args.dsa_param)
                output_real = embed(img_real).detach()
                output_syn = embed(img_syn)
                loss += torch.sum((torch.mean(output_real, dim=0) - torch.mean(output_syn, dim=0)) ** 2)

            optimizer_img.zero_grad()
            loss.backward()
            optimizer_img.step()
            timer.step()
            if it % 100 == 0:
                print("iter = %04d, loss = %.4f" % (it, loss.item() / num_classes), flush=True)

    data_save = [[copy.deepcopy(image_syn.detach().cpu()), copy.deepcopy(label_syn.detach().cpu())]]
    name = "res_DM_%s_%s_%dipc.pt" % (args.dataset, args.model, args.ipc)
    torch.save({"data": data_save, "accs_all_exps": {}}, os.path.join(args.save_path, name))
    save_synthetic(args.save_path, *data_save[0], timer)


if __name__ == "__main__":
    main()
