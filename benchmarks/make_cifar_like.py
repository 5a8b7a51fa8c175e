#!/usr/bin/env python
"""Write CIFAR-shaped ImageFolders (``train/`` and ``test/``, one folder per class of 32×32 PNGs)
of random images: what ``dire demo --dataset cifar10 --data-path DIR`` reads when no real CIFAR
can be downloaded (a GPU machine without network, CI). Numbers from such data say that the
pipeline runs, not how well DiRe works.

    python benchmarks/make_cifar_like.py DIR [--classes 10] [--train 60] [--test 10]
"""
import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("root")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train", type=int, default=60, help="images per class in train/")
    p.add_argument("--test", type=int, default=10, help="images per class in test/")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    for split, n in (("train", args.train), ("test", args.test)):
        for c in range(args.classes):
            folder = Path(args.root) / split / f"class{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            # A class-dependent tint, so a teacher can learn something from the noise.
            tint = rng.integers(0, 256, 3)
            for i in range(n):
                pixels = np.clip(rng.normal(tint, 60, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    print(f"wrote {args.classes} classes x ({args.train} train + {args.test} test) images to {args.root}")


if __name__ == "__main__":
    main()
