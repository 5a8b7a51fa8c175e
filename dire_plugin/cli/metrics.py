"""``dire-metrics``: how diverse and representative distilled sets are, in the teacher's embedding space.

For each distilled set: coverage of the real embeddings, Vendi score (whole set and per class)
and intra-class cosine similarity, as in the DiRe paper; a seeded random real subset of the
same size per class is the reference. Real embeddings come from the same
:class:`~dire_plugin.embeddings.bank.RealEmbeddingBank` cache a training run fills, so pointing
``--cache-dir`` at that cache skips the pass over the real data.

Every set is measured at the real data's input size: a tensor-file set of another size is
refused unless ``--resize-tensors`` asks for the resize; image files are resized and
centre-cropped as their own evaluation does, with a note (see :mod:`dire_plugin.metrics.distilled`).

Exit codes: 0 done, 2 bad input (one line on stderr, nothing written), 1 the outputs could not
be written.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..errors import DiReInputError
from ._common import OneLineParser, echo, positive_int, run_main

__all__ = ["build_parser", "main", "PROG"]

PROG = "dire-metrics"
DEFAULT_OUT = "dire-metrics"
#: Seed of the reference subset and of the plots' subsampling and projections.
SEED = 0
# Messages PIL gives for a broken file; DataLoader workers wrap them in a traceback.
_PIL_ERRORS = re.compile(r"cannot identify image file.*|image file is truncated.*|broken data stream.*")



def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``dire-metrics``."""
    p = OneLineParser(
        prog=PROG,
        description="Coverage, Vendi score and intra-class cosine similarity of distilled image sets, "
        "measured in the embedding space of the teacher they were distilled from.",
        epilog=f"example: {PROG} --real ~/data/cifar100 --arch resnet18 --cifar-stem --checkpoint teacher.pth "
        "syn/vanilla syn/dire --names SRe2L SRe2L+DiRe --plot",
    )
    p.add_argument("sets", nargs="+", metavar="SET",
                   help="distilled set: SRe2L output folder (new000/...), an ImageFolder, or a .pt tensor file")
    p.add_argument("--real", required=True, metavar="DIR",
                   help="real training images: one folder per class, or torchvision's CIFAR layout")
    p.add_argument("--names", nargs="+", metavar="NAME", help="row names, one per SET (default: file/folder names)")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"output folder (default ./{DEFAULT_OUT})")
    model = p.add_argument_group("feature extractor")
    model.add_argument("--arch", required=True, help="torchvision model name, e.g. resnet18")
    model.add_argument("--checkpoint", metavar="CKPT", help="teacher weights: {'state_dict'|'model': ...} or a bare state dict")
    model.add_argument("--random-init", action="store_true", help="no checkpoint: a seeded random network (sanity checks only)")
    model.add_argument("--num-classes", type=positive_int, metavar="N",
                       help="classifier outputs (default: the checkpoint's, else the real set's class count)")
    model.add_argument("--cifar-stem", action="store_true", help="ResNet with a 3x3 conv1 and no max-pool (SRe2L CIFAR/Tiny)")
    model.add_argument("--layer", metavar="NAME", help="layer whose input is the embedding (default: the last nn.Linear)")
    data = p.add_argument_group("preprocessing (default: from the real data: CIFAR 32 px, Tiny 64 px, else ImageNet 224 px)")
    data.add_argument("--image-size", type=positive_int, metavar="S", help="network input size (center crop)")
    data.add_argument("--resize", type=positive_int, metavar="R", help="resize real images to R before the crop")
    data.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"), help="normalisation mean")
    data.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"), help="normalisation std")
    data.add_argument("--raw-tensors", action="store_true",
                      help="tensor files hold [0, 1] pixels (default: already normalised, as MTT/DM save them)")
    data.add_argument("--resize-tensors", action="store_true",
                      help="resize tensor-file sets whose images are not the input size (bilinear, antialiased); "
                      "without it such a set is refused: tensors were optimised at one size, so another one "
                      "usually means other real data or a wrong --image-size. Image files (SRe2L folders, "
                      "ImageFolders) are always resized and centre-cropped to the input size, as their own "
                      "evaluation does, with a note when their size differs")
    run = p.add_argument_group("run")
    run.add_argument("--k", type=positive_int, default=5, help="nearest neighbours for coverage (default 5)")
    run.add_argument("--max-real-per-class", type=positive_int, metavar="M",
                     help="keep a seeded random subset of M real embeddings per class (coverage and plots get faster)")
    run.add_argument("--batch-size", type=positive_int, default=256, metavar="B", help="default 256")
    run.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), metavar="W",
                     help="image-decoding workers (default min(4, CPUs))")
    run.add_argument("--device", choices=("cpu", "cuda"), help="default cuda when available")
    run.add_argument("--cache-dir", metavar="DIR", help="real-embedding cache (the one training used is shared)")
    run.add_argument("--plot", action="store_true", help="also write embedding_scatter.png and class_similarity.png")
    run.add_argument("--projection", choices=("pca", "tsne"), default="pca", help="for the scatter plot (default pca)")
    return p


# --- inputs ----------------------------------------------------------------------------------------


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.names is not None and len(args.names) != len(args.sets):
        parser.error(f"--names gives {len(args.names)} names for {len(args.sets)} sets")
    if args.names is not None and len(set(args.names)) != len(args.names):
        parser.error("--names must be distinct")
    if args.std is not None and any(s <= 0 for s in args.std):
        parser.error("--std values must be > 0")
    if args.workers < 0:
        parser.error("--workers must be >= 0")
    if args.projection != "pca" and not args.plot:
        parser.error("--projection goes with --plot")


def _set_names(args: argparse.Namespace) -> List[str]:
    if args.names:
        return list(args.names)
    names: List[str] = []
    for s in args.sets:
        p = Path(s).expanduser()
        base = (p.stem if p.suffix else p.name) or str(p)
        name, n = base, 2
        while name in names:  # two runs' folders are often both called e.g. "syn"
            name, n = f"{base}-{n}", n + 1
        names.append(name)
    return names


def _first_image_size(root: Path) -> int:
    from ..metrics.distilled import IMAGE_SUFFIXES, read_image

    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for f in sorted(folder.iterdir()):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                return min(read_image(f).size)
    raise DiReInputError(f"real data {root} holds no images in its class folders")


def _real_spec(root: Path, args: argparse.Namespace) -> Any:
    """How real images are preprocessed: the training run's spec when the data says which one.

    The same spec as the patch's (kind, sizes, mean, std) gives the same bank cache key as the
    training run, so a shared ``--cache-dir`` is hit instead of embedding the real data again.
    """
    from ..patches.sre2l import CIFAR100, IMAGENET, TINY

    from ..embeddings.realdata import CIFAR_FOLDERS, torchvision_cifar_root

    cifar = torchvision_cifar_root(root)
    if cifar is not None:
        spec = replace(CIFAR100, kind=cifar[1])
    else:
        if not any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir()):
            raise DiReInputError(f"no real training data in {root}: expected one folder per class, "
                                 f"or torchvision's {' or '.join(CIFAR_FOLDERS.values())}")
        size = _first_image_size(root) if args.image_size is None else args.image_size
        if size == CIFAR100.crop:
            spec = CIFAR100
        elif size < CIFAR100.crop:
            spec = replace(CIFAR100, kind="imagefolder", crop=size)
        elif size <= TINY.crop:
            spec = replace(TINY, crop=size)
        else:
            spec = IMAGENET
    if args.image_size is not None and args.image_size != spec.crop:
        # ImageNet's evaluation convention (256 → 224) above 64 px; small data is only cropped.
        resize = None if args.image_size <= TINY.crop else round(args.image_size * 256 / 224)
        spec = replace(spec, crop=args.image_size, resize=resize)
    if args.resize is not None:
        if args.resize < spec.crop:
            raise DiReInputError(f"--resize {args.resize} is smaller than the image size {spec.crop}")
        spec = replace(spec, resize=args.resize)
    if args.mean is not None:
        spec = replace(spec, mean=tuple(args.mean))
    if args.std is not None:
        spec = replace(spec, std=tuple(args.std))
    return spec


def _real_class_count(root: Path, kind: Optional[str]) -> int:
    if kind is not None:
        return 100 if kind == "cifar100" else 10
    from torchvision.datasets.folder import find_classes

    try:
        return len(find_classes(str(root))[0])
    except FileNotFoundError as e:
        raise DiReInputError(f"real data {root}: {e}") from None


def _real_loader(root: Path, spec: Any, args: argparse.Namespace) -> Tuple[Any, str, str, List[str]]:
    from ..embeddings.realdata import real_data_loader, torchvision_cifar_root

    cifar = torchvision_cifar_root(root)
    count = _real_class_count(root, cifar[1] if cifar else None)
    try:
        loader, dataset_id, transform_id = real_data_loader(root, spec, count, args.batch_size, args.workers)
    except FileNotFoundError as e:  # ImageFolder: a class folder without images
        raise DiReInputError(f"real data {root}: {' '.join(str(e).split())}") from None
    if len(loader.dataset) == 0:
        raise DiReInputError(f"real data {root} holds no images")
    return loader, dataset_id, transform_id, list(loader.dataset.classes)


def _device(name: Optional[str]) -> Any:
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DiReInputError("--device cuda: no CUDA device is available")
    return torch.device(name)


def _progress() -> bool:
    # Bars only for a person watching: a redirected stderr keeps just the one-line errors.
    return sys.stderr.isatty()


# --- embeddings and metrics -------------------------------------------------------------------


def _embed_set(model: Any, layer: Optional[str], dset: Any, spec: Any, args: argparse.Namespace, device: Any) -> Any:
    """``[N, D]`` float32 CPU embeddings of a distilled set (eval mode, no grad, hooks removed)."""
    import torch
    from tqdm import tqdm

    from ..embeddings.capture import EmbeddingCapture

    rows = []
    with EmbeddingCapture(model, layer, detach=True) as cap, torch.no_grad():
        bar = tqdm(total=len(dset), desc=f"embedding {dset.name}", unit="img", disable=not _progress(), leave=False)
        for images, _ in dset.batches(spec, args.batch_size, normalized=not args.raw_tensors, workers=max(1, args.workers),
                                      resize_tensors=args.resize_tensors):
            model(images.to(device))
            rows.append(cap.embeddings.float().cpu())
            bar.update(images.shape[0])
        bar.close()
    emb = torch.cat(rows)
    if not bool(torch.isfinite(emb).all()):
        raise DiReInputError(f"embeddings of {dset.name} contain NaN or Inf values: check the images and the checkpoint")
    return emb


def _build_bank(model: Any, layer: Optional[str], loader: Any, dataset_id: str, transform_id: str,
                args: argparse.Namespace, device: Any) -> Any:
    from ..embeddings.bank import RealEmbeddingBank

    try:
        return RealEmbeddingBank.build(
            model, loader, layer=layer, max_per_class=args.max_real_per_class, seed=SEED, device=device,
            cache_dir=Path(args.cache_dir).expanduser() if args.cache_dir else None,
            dataset_id=dataset_id, transform_id=transform_id, progress=_progress(),
        )
    except OSError as e:
        found = _PIL_ERRORS.findall(str(e))
        if found:  # a broken real image, possibly reported through a DataLoader worker
            detail = found[-1].strip()
            # PIL names the file as "<_io.BufferedReader name='...'>" when ImageFolder opened it.
            named = re.search(r"name='(.*?)'>?", detail) or re.search(r"'(.*?)'", detail)
            what = named.group(1) if named else "a file"
            raise DiReInputError(f"cannot read real image {what}: {re.sub(r' <.*>| ' + re.escape(repr(what)), '', detail)}") from None
        raise


def _score(name: str, real: Any, emb: Any, labels: Any, k: int, **meta: Any) -> Any:
    """One table row: coverage against ``real``, Vendi (set and per class), intra-class cosine."""
    from ..metrics import diversity as metrics
    from ..metrics.report import MetricsRow

    vendi_mean, vendi_classes = metrics.vendi_score_per_class(emb, labels)
    cos_mean, cos_classes = metrics.intra_class_cosine(emb, labels, per_class=True)
    return MetricsRow(
        name=name, images=int(emb.shape[0]), classes=len(set(labels.tolist())),
        coverage=float(metrics.coverage(real, emb, k=k)), vendi=float(metrics.vendi_score(emb)),
        vendi_per_class=float(vendi_mean), intra_class_cosine=float(cos_mean),
        per_class_vendi={int(c): float(v) for c, v in vendi_classes.items()},
        per_class_cosine={int(c): float(v) for c, v in cos_classes.items()},
        **meta,
    )


def _reference_subset(bank: Any, ipc: int) -> Tuple[Any, Any]:
    """A seeded random subset of ``ipc`` real embeddings per class (all of a smaller class)."""
    import torch

    g = torch.Generator().manual_seed(SEED)
    rows, labels = [], []
    for c in bank.classes:
        emb = bank[c]
        pick = torch.randperm(emb.shape[0], generator=g)[:ipc]
        rows.append(emb[pick].float())
        labels.append(torch.full((len(pick),), c, dtype=torch.long))
    return torch.cat(rows), torch.cat(labels)


def _real_matrix(bank: Any) -> Tuple[Any, Any]:
    import torch

    emb = torch.cat([bank[c].float() for c in bank.classes])
    labels = torch.repeat_interleave(torch.tensor(bank.classes, dtype=torch.long), bank.counts)
    return emb, labels


# --- outputs --------------------------------------------------------------------------------------


def _render(rows: List[Any], settings: Dict[str, Any], real: Dict[str, Any]) -> Dict[str, bytes]:
    """``metrics.md`` and ``metrics.json`` as bytes, by file name."""
    from ..metrics.report import json_report, markdown_report

    md_settings = {k: v for k, v in settings.items() if v is not None}
    return {
        "metrics.md": markdown_report(rows, md_settings).encode(),
        "metrics.json": json_report(rows, settings, real).encode(),
    }


def _plots(args: argparse.Namespace, rows: List[Any], sets: List[Any], embeddings: List[Any],
           real_emb: Any, class_names: List[str]) -> Dict[str, bytes]:
    """The two PNG figures as bytes, by file name."""
    from ..metrics.report import class_similarity_png, embedding_scatter_png

    return {
        "embedding_scatter.png": embedding_scatter_png(
            real_emb, [(s.name, e, s.labels) for s, e in zip(sets, embeddings)], len(class_names),
            projection=args.projection, seed=SEED, coverage=[r.coverage for r in rows[:len(sets)]],
        ),
        "class_similarity.png": class_similarity_png(rows, class_names),
    }


# --- the command ---------------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise DiReInputError(f"--out {out} exists and is not a folder")
    if args.plot:
        from ..metrics.report import require_plotting

        require_plotting(args.projection)
    from ..metrics.distilled import InputSpec, load_distilled
    from ..metrics.extractor import load_extractor
    from ..embeddings.capture import resolve_layer
    from ..metrics.report import format_table

    device = _device(args.device)
    real_root = Path(args.real).expanduser()
    if not real_root.is_dir():
        raise DiReInputError(f"real data folder {real_root} does not exist")
    real_root = real_root.resolve()
    spec = _real_spec(real_root, args)
    loader, dataset_id, transform_id, class_names = _real_loader(real_root, spec, args)
    print(f"real: {len(loader.dataset)} images, {len(class_names)} classes in {real_root} "
          f"(input {spec.crop}px{f', resized to {spec.resize}' if spec.resize else ''}, mean {spec.mean}, std {spec.std})")

    input_spec = InputSpec(spec.crop, tuple(spec.mean), tuple(spec.std))
    names = _set_names(args)
    sets = [load_distilled(path, class_names, name) for path, name in zip(args.sets, names)]
    # Every set's size is checked before the first is printed or embedded: a refusal is the only line.
    size_notes = [s.check_size(input_spec, args.resize_tensors) for s in sets]
    for s, size_note in zip(sets, size_notes):
        print(f"set {s.name}: {s.layout}, {len(s)} images, {len(s.classes)} classes, ~{s.images_per_class} per class")
        for note in s.notes + ([size_note] if size_note else []):
            print(f"  note: {note}")

    model, described = load_extractor(args.arch, args.checkpoint, num_classes=args.num_classes,
                                      default_classes=len(class_names), cifar_stem=args.cifar_stem,
                                      random_init=args.random_init)
    layer = resolve_layer(model, args.layer)
    model = model.to(device).eval()
    print(f"extractor: {described}, embedding = input of {layer!r}, device {device}")

    # Distilled sets first: they are small, and a broken file among them fails before the long real pass.
    embeddings = [_embed_set(model, layer, s, input_spec, args, device) for s in sets]
    bank = _build_bank(model, layer, loader, dataset_id, transform_id, args, device)
    real_emb, _ = _real_matrix(bank)
    print(f"real embeddings: {real_emb.shape[0]} x {real_emb.shape[1]}"
          f"{' (from the cache)' if bank.cache_hit else ''}")
    if real_emb.shape[0] <= args.k:
        raise DiReInputError(f"--k {args.k} needs more than {args.k} real embeddings, there are {real_emb.shape[0]}")

    rows = [
        _score(s.name, real_emb, emb, s.labels, args.k, path=str(s.path.resolve()), layout=s.layout)
        for s, emb in zip(sets, embeddings)
    ]
    ipc = sets[0].images_per_class
    ref_emb, ref_labels = _reference_subset(bank, ipc)
    rows.append(_score(f"real (random, {ipc}/class)", real_emb, ref_emb, ref_labels, args.k,
                       path=str(real_root), layout="real", reference=True))

    settings = {
        "real": str(real_root), "extractor": described, "layer": layer, "k": args.k,
        "image_size": spec.crop, "resize": spec.resize, "mean": list(spec.mean), "std": list(spec.std),
        "resize_tensors": args.resize_tensors,
        "real_embeddings": int(real_emb.shape[0]), "max_real_per_class": args.max_real_per_class, "seed": SEED,
        "projection": args.projection if args.plot else None,
    }
    real = {"path": str(real_root), "images": len(loader.dataset), "embeddings": int(real_emb.shape[0]),
            "classes": len(class_names), "class_names": class_names, "dataset_id": dataset_id,
            "bank_fingerprint": bank.fingerprint}
    files = _render(rows, settings, real)
    if args.plot:
        files.update(_plots(args, rows, sets, embeddings, real_emb, class_names))
    # Everything is computed: only now touch the output folder.
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (out / name).write_bytes(data)
    print()
    echo(format_table(rows))
    print()
    print(f"wrote {', '.join(str(out / n) for n in files)}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``dire-metrics`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    return run_main(PROG, build_parser(), argv, _run, _check_args)




if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
