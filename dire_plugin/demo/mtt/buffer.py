"""Train the expert trajectories the demo's MTT-shaped ``distill.py`` matches, shaped like MTT's
``buffer.py``: ``python buffer.py --dataset digits --buffer_path DIR``.

Written for the demo from the structure of MTT's script (not its code): ``--num_experts`` fresh
ConvNets, each trained ``--train_epochs`` epochs on the whole training set with
``SGD(lr_teacher, momentum, weight_decay)`` and DSA, its parameters recorded at the start and after
every epoch. The trajectories (a list of trajectories, each a list of epochs, each a list of
parameter tensors in ``net.parameters()`` order) are saved as
``{buffer_path}/{dataset}/{model}/replay_buffer_0.pt``, where ``distill.py`` (and DiRe's step
capture, for its feature extractor) read them.
"""
import argparse
import os

import torch
from torch import nn
from utils import ParamDiffAug, epoch, get_dataset, get_network

from dire_plugin.demo.script_args import add_run_arguments, start_run


def main(args):
    args.dsa_param = ParamDiffAug()
    channel, im_size, num_classes, class_names, mean, std, dst_train, dst_test, testloader, loader_train_dict, \
        class_map, class_map_inv = get_dataset(args.dataset, args.data_path, args.batch_real, args.subset, args=args)

    save_dir = os.path.join(args.buffer_path, args.dataset)
    if args.dataset in ("CIFAR10", "CIFAR100") and not args.zca:
        save_dir += "_NO_ZCA"
    save_dir = os.path.join(save_dir, args.model)
    os.makedirs(save_dir, exist_ok=True)

    criterion = nn.CrossEntropyLoss().to(args.device)
    generator = torch.Generator().manual_seed(args.seed)
    trainloader = torch.utils.data.DataLoader(dst_train, batch_size=args.batch_train, shuffle=True, num_workers=0,
                                              generator=generator)
    trajectories = []
    for it in range(args.num_experts):
        teacher_net = get_network(args.model, channel, num_classes, im_size).to(args.device)
        teacher_net.train()
        lr = args.lr_teacher
        teacher_optim = torch.optim.SGD(teacher_net.parameters(), lr=lr, momentum=args.mom, weight_decay=args.l2)
        teacher_optim.zero_grad()
        # A copy per epoch (on the CPU, .cpu() alone would alias the live weights).
        timestamps = [[p.detach().cpu().clone() for p in teacher_net.parameters()]]
        for e in range(args.train_epochs):
            train_loss, train_acc = epoch("train", trainloader, teacher_net, teacher_optim, criterion, args, aug=True)
            timestamps.append([p.detach().cpu().clone() for p in teacher_net.parameters()])
        test_loss, test_acc = epoch("test", testloader, teacher_net, None, criterion, args, aug=False)
        print("expert {}: train acc {:.4f}, test acc {:.4f} after {} epochs".format(it, train_acc, test_acc, args.train_epochs),
              flush=True)
        trajectories.append(timestamps)
    torch.save(trajectories, os.path.join(save_dir, "replay_buffer_0.pt"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Train the experts the demo's MTT-shaped distill.py matches")
    parser.add_argument("--dataset", type=str, default="digits")
    parser.add_argument("--subset", type=str, default=None)
    parser.add_argument("--model", type=str, default="ConvNet")
    parser.add_argument("--num_experts", type=int, default=5, help="training trajectories")
    parser.add_argument("--lr_teacher", type=float, default=0.01, help="the experts' learning rate")
    parser.add_argument("--batch_train", type=int, default=32)
    parser.add_argument("--batch_real", type=int, default=256)
    parser.add_argument("--dsa_strategy", type=str, default="scale_rotate_crop")
    parser.add_argument("--data_path", type=str, default=None, help="unused: the digits come with scikit-learn")
    parser.add_argument("--buffer_path", type=str, default="./buffers")
    parser.add_argument("--train_epochs", type=int, default=15)
    parser.add_argument("--zca", action="store_true")
    parser.add_argument("--mom", type=float, default=0, help="momentum")
    parser.add_argument("--l2", type=float, default=0, help="weight decay")
    main(start_run(add_run_arguments(parser).parse_args()))
