"""Capture for bi-level methods (MTT, trajectory matching): the synthetic images are updated by an
optimizer of their own after a meta-gradient through an unrolled student, and nothing may enter
that unroll.

MTT's ``distill.py`` unrolls a ``ReparamModule`` student ``--syn_steps`` times with
``create_graph=True``; its meta-gradient reaches the images and the learnable student learning
rate ``syn_lr`` through every step of it. The decoupled capture's global module hooks would fire
inside that unroll (ReparamModule calls the real submodules). This capture registers no module
hook, no tensor hook and no wrapper on anything the unroll calls, so the unroll, ``grand_loss`` and
the meta-gradients of ``syn_lr`` and of the images are vanilla MTT's. Instead:

1. ``utils.get_dataset`` is wrapped: it keeps the ``argparse.Namespace`` it receives (``distill.py``
   replaces ``args`` after ``wandb.init``; this one keeps ``zca``, ``buffer_path``, ``model``, and
   ``zca_trans`` once the call returns) and the training set it returns (already ZCA-whitened
   with ``--zca``). ``--texture`` and datasets other than the covered ones are refused there, in
   one line, before any work. Right after the call the **feature extractor** is built: a trained
   expert of MTT's own buffer, deterministically the last recorded epoch of trajectory 0 of
   ``replay_buffer_0.pt`` in the folder ``distill.py`` reads its experts from, loaded into the
   network ``utils.get_network`` builds for ``--model`` (inside ``torch.random.fork_rng``:
   ``get_network`` reseeds the global RNG from the clock), frozen, in eval mode. The embedding is
   the input of its last ``nn.Linear`` (ConvNet's ``classifier``: ``features(x).flatten(1)``).
2. The real-embedding bank (:meth:`StepCapture.bank_factory`) embeds that training set through the
   expert, cached under a key of the expert's weights, the data and the ZCA setting.
3. The synthesis step is ``optimizer_img.step()``: the optimizer whose one parameter is a plain
   4-D tensor (``image_syn``). ``optimizer_lr`` (the 0-dim ``syn_lr``) and the evaluation
   optimizers (``nn.Parameter``\\ s) are not synthesis steps. Right before the step (an optimizer
   step pre-hook, after MTT's ``grand_loss.backward()``), one extra forward of all the synthetic
   images through the expert, DiRe's gradient with respect to them by ``autograd.grad``, added to
   ``image_syn.grad``. All IPC images of every class are in that forward, so CD needs no memory.
   The labels are ``label_syn``, read from the frame of the function holding ``image_syn`` (the
   name is pinned with ``distill.py::main``) and checked against the images.
4. ``torch.save`` of the run's results (``logged_files/<dataset>/<run>/images_*.pt``) puts the
   manifest beside them.

The setup (extractor, bank) runs inside ``torch.random.fork_rng``, the bank's loader has a
generator of its own and the extra forward draws no random number: the upstream's random streams
(start epochs, batch permutations, augmentations) are the vanilla run's.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..embeddings.capture import EmbeddingCapture, find_last_linear
from ..embeddings.isolation import own_rng
from ..errors import DiReHookError, DiReInputError
from ..io.digest import tensors_sha256
from ..io.files import load_torch_file
from .capture import Capture, Wrapper, one_image_tensor, plain_tensor_params
from .runtime import active_capture, bank_from_loader, output_saved

__all__ = ["Expert", "StepCapture", "expert_dir", "load_expert"]

logger = logging.getLogger("dire")

#: What ``distill.py`` saves (``./logged_files/<dataset>/<run name>/images_<it>.pt`` and friends).
_RESULTS = r"(?:^|[\\/])logged_files[\\/][^\\/]+[\\/][^\\/]+[\\/](?:images|labels)_[^\\/]+\.pt$"
#: The expert file and trajectory the extractor comes from (the first of each, for determinism).
EXPERT_FILE = "replay_buffer_0.pt"
EXPERT_TRAJECTORY = 0


def _capture() -> Optional["StepCapture"]:
    return active_capture(StepCapture)


def _w_get_dataset(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    capture = _capture()
    if capture is None:
        return wrapped(*args, **kwargs)
    namespace = kwargs.get("args", args[4] if len(args) > 4 else None)
    capture.check_run(namespace)
    result = wrapped(*args, **kwargs)
    module = sys.modules.get(getattr(wrapped, "__module__", "") or "")
    capture.use_dataset(namespace, result, getattr(module, "get_network", None))
    return result


def expert_dir(args: Any) -> str:
    """The folder ``distill.py`` reads its experts from (``buffer.py`` writes them there)."""
    folder = os.path.join(args.buffer_path, args.dataset)
    if args.dataset == "ImageNet":
        folder = os.path.join(folder, args.subset, str(args.res))
    if args.dataset in ("CIFAR10", "CIFAR100") and not args.zca:
        folder += "_NO_ZCA"
    return os.path.join(folder, args.model)


@dataclass
class Expert:
    """One recorded epoch of one expert trajectory: the extractor's weights and where they came from."""

    path: str
    trajectory: int
    epoch: int
    epochs: int
    params: List[Tensor]

    @property
    def sha256(self) -> str:
        """Of the expert's parameters (shapes, dtypes, bytes): part of the bank's cache key."""
        return tensors_sha256(self.params)


def load_expert(path: str, trajectory: int = EXPERT_TRAJECTORY, epoch: int = -1) -> Expert:
    """Epoch ``epoch`` (default: the last recorded) of trajectory ``trajectory`` of an expert buffer
    in the format ``buffer.py`` writes: a list of trajectories, each a list of epochs, each a list
    of parameter tensors in ``net.parameters()`` order. The file is memory-mapped and only that
    epoch is copied out; anything else is a one-line :class:`DiReInputError` naming the file."""
    buffer = load_torch_file(path, "the MTT expert buffer", mmap=True)
    where = f"MTT expert buffer {path}"
    if not isinstance(buffer, list) or not buffer:
        raise DiReInputError(f"{where} holds no trajectories (expected the list buffer.py writes)")
    if trajectory >= len(buffer) or not isinstance(buffer[trajectory], list) or not buffer[trajectory]:
        raise DiReInputError(f"{where} has no recorded epochs in trajectory {trajectory}")
    epochs = buffer[trajectory]
    index = epoch % len(epochs)
    params = epochs[index]
    if not isinstance(params, (list, tuple)) or not params or not all(isinstance(t, Tensor) for t in params):
        raise DiReInputError(f"{where}: epoch {index} of trajectory {trajectory} is not a list of parameter tensors")
    copied = [t.detach().clone() for t in params]
    if not all(torch.isfinite(t).all() for t in copied):
        raise DiReInputError(f"{where}: epoch {index} of trajectory {trajectory} holds NaN or Inf weights")
    count = len(epochs)
    del buffer, epochs, params  # the mapped file is closed once nothing refers to its storages
    return Expert(os.path.abspath(path), trajectory, index, count, copied)


class StepCapture(Capture):
    """See the module doc. Options (from the patch module): the upstream module and function that
    load the training set, the names of the images and labels in the method's main function, the
    dataset names covered."""

    family = "step"

    def __init__(self, dataset_module: str = "utils", dataset_function: str = "get_dataset",
                 images: str = "image_syn", labels: str = "label_syn", datasets: Sequence[str] = ("CIFAR10", "CIFAR100"),
                 results: str = _RESULTS, chunk: int = 1000) -> None:
        self.dataset_module = dataset_module
        self.dataset_function = dataset_function
        self.images_name = images
        self.labels_name = labels
        self.datasets = tuple(datasets)
        self.results = re.compile(results)
        #: Images per extra forward with graph (CIFAR-100 at IPC 50 has 5,000 synthetic images).
        self.chunk = int(chunk)
        self.args: Any = None
        self.dst_train: Any = None
        self.num_classes: Optional[int] = None
        self.expert: Optional[Expert] = None
        self.extractor: Optional[nn.Module] = None
        self.layer = ""
        self._on_device: Dict[str, nn.Module] = {}
        self._problem: Optional[str] = None
        self.extra_seconds = 0.0
        self.extra_steps = 0
        self.label_checks = 0

    def wrappers(self) -> Sequence[Wrapper]:
        return (
            (self.dataset_module, self.dataset_function, _w_get_dataset),
            ("torch", "save", output_saved(1, "f", lambda path: bool(self.results.search(path)))),
        )

    # ------------------------------------------------------------------ the run's data and expert
    def check_run(self, args: Any) -> None:
        """Refuse, before the training set is loaded, what the patch does not cover (one line)."""
        if args is None:
            raise DiReHookError(f"{self.dataset_module}.{self.dataset_function} was called without args=: "
                                "the mtt patch reads the run's options from it")
        if getattr(args, "texture", False):
            raise DiReInputError("distill.py --texture is not supported by the mtt patch yet (its synthetic "
                                 "canvases are larger than the expert's input); DIRE_DISABLE=1 runs it vanilla")
        dataset = getattr(args, "dataset", None)
        if dataset not in self.datasets:
            raise DiReInputError(f"distill.py --dataset={dataset}: the mtt patch covers --dataset "
                                 f"{' and '.join(self.datasets)}; DIRE_DISABLE=1 runs others vanilla")

    def use_dataset(self, args: Any, result: Sequence[Any], get_network: Optional[Callable]) -> None:
        """``get_dataset`` returned ``result`` for ``args``: keep the training set, build the extractor."""
        channel, im_size, num_classes = result[0], result[1], result[2]
        self.args, self.dst_train, self.num_classes = args, result[6], int(num_classes)
        if get_network is None:
            raise DiReHookError(f"{self.dataset_module}.get_network not found: the mtt patch builds the expert with it")
        path = os.path.join(expert_dir(args), EXPERT_FILE)
        if not os.path.isfile(path):
            raise DiReInputError(f"no expert buffer {path} (run MTT's buffer.py first, with the same --dataset, "
                                 "--model and --zca): DiRe's feature extractor is a trained expert")
        self.expert = load_expert(path)
        with own_rng():
            net = get_network(args.model, channel, num_classes, im_size, dist=False)
        self.extractor = self._load_into(net, self.expert, args.model)
        self.layer = find_last_linear(self.extractor)
        logger.info("[dire] feature extractor: %s, epoch %d of trajectory %d in %s (frozen, eval mode)",
                    args.model, self.expert.epoch, self.expert.trajectory, self.expert.path)

    @staticmethod
    def _load_into(net: nn.Module, expert: Expert, model: str) -> nn.Module:
        params = list(net.parameters())
        shapes = [tuple(p.shape) for p in params]
        got = [tuple(t.shape) for t in expert.params]
        if shapes != got:
            raise DiReInputError(f"MTT expert buffer {expert.path} does not fit --model {model}: "
                                 f"{len(got)} tensors {got[:2]}..., the network has {len(shapes)} {shapes[:2]}...")
        stats = [n for n, m in net.named_modules() if getattr(m, "track_running_stats", False)]
        if stats:
            raise DiReInputError(f"--model {model} has BatchNorm ({stats[0]}), whose running statistics the expert "
                                 "buffer does not hold (buffer.py saves parameters only): the mtt patch needs a "
                                 "model without them, such as the default ConvNet")
        with torch.no_grad():
            for p, t in zip(params, expert.params):
                p.copy_(t)
        net.eval()
        net.requires_grad_(False)
        return net

    def _extractor_on(self, device: torch.device) -> nn.Module:
        key = str(device)
        if key not in self._on_device:
            self._on_device = {key: self.extractor.to(device)}
        return self._on_device[key]

    # ------------------------------------------------------------------ the bank
    def bank_factory(self, config: Any) -> Callable:
        capture = self

        def factory(teacher: nn.Module, layer: str, device: torch.device) -> Any:
            if capture.dst_train is None:
                raise DiReHookError("the training set was never seen (utils.get_dataset did not go through the patch)")
            return bank_from_loader(config, teacher, layer, device, *capture.real_loader())

        return factory

    def real_loader(self) -> Tuple[Any, str, str]:
        """``(loader, dataset_id, transform_id)`` over the training set as ``get_dataset`` returned it."""
        from ..embeddings.realdata import data_fingerprint

        dst, args = self.dst_train, self.args
        images = getattr(dst, "images", None)
        if isinstance(images, Tensor):  # --zca: the whitened images themselves (utils.TensorDataset)
            digest = tensors_sha256((images, dst.labels), b"dire-mtt-tensors")  # read in place, no copy
            dataset_id = f"{args.dataset}:tensors:{len(dst)}:{digest}"
            workers = 0
        else:
            dataset_id = data_fingerprint(dst, getattr(dst, "root", ""), str(args.dataset).lower())
            workers = 2
        transform_id = (f"mtt get_dataset {args.dataset} zca={bool(getattr(args, 'zca', False))} "
                        f"{getattr(dst, 'transform', None)!r}")
        # A generator of its own: the loader draws its base seed from it, not from the global RNG.
        loader = torch.utils.data.DataLoader(dst, batch_size=256, shuffle=False, num_workers=workers,
                                             generator=torch.Generator())
        return loader, dataset_id, transform_id

    # ------------------------------------------------------------------ the step
    def is_synthesis_step(self, optimizer: Any) -> bool:
        return one_image_tensor(optimizer)

    def _labels(self, images: Tensor) -> Optional[Tensor]:
        """``label_syn`` from the frame that holds ``image_syn``, checked against the images."""
        frame = sys._getframe(1)
        labels, found = None, False
        try:
            while frame is not None:
                names = frame.f_locals
                if names.get(self.images_name) is images:
                    found, labels = True, names.get(self.labels_name)
                    break
                frame = frame.f_back
        finally:
            del frame
        if not found:
            self._problem = f"no function on the call stack holds the stepped images as {self.images_name!r}"
            return None
        n = images.shape[0]
        if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != n or labels.is_floating_point():
            shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            self._problem = (f"{self.labels_name!r} beside {self.images_name!r} is not {n} integer labels "
                             f"(found {shape})")
            return None
        if n and (int(labels.min()) < 0 or self.num_classes is not None and int(labels.max()) >= self.num_classes):
            self._problem = f"{self.labels_name!r} holds labels outside 0..{(self.num_classes or 1) - 1}"
            return None
        self.label_checks += 1
        return labels

    def before_step(self, optimizer: Any) -> None:
        self._problem = None
        (images,) = plain_tensor_params(optimizer)
        if self.extractor is None:
            self._problem = (f"{self.dataset_module}.{self.dataset_function} never went through the patch, so there "
                             "is no feature extractor")
            return
        labels = self._labels(images)
        if labels is None:
            return
        device = images.device
        extractor = self._on_device.get(str(device))
        if extractor is None or self.core.bank is None:  # the first step (the core builds the bank in own_rng)
            extractor = self._extractor_on(device)
            self.core.bank_for(extractor, self.layer, device)
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        g_images = self._dire_gradient(extractor, images.detach(), labels.to(device))
        self.core.apply_gradient(images, g_images, included=False)  # measures the share on its steps
        if cuda:
            torch.cuda.synchronize(device)
        self.extra_seconds += time.perf_counter() - start
        self.extra_steps += 1

    def _embed(self, extractor: nn.Module, x: Tensor) -> Tensor:
        with EmbeddingCapture(extractor, self.layer) as capture:
            extractor(x)
        return capture.embeddings

    def _dire_gradient(self, extractor: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        """∂L_syn/∂images through the extractor: one forward of all images with their graph, or,
        for more than ``chunk`` images, embeddings without graph first and then each chunk's
        forward again with its graph (activation memory of one chunk; one more forward)."""
        with torch.enable_grad():
            if images.shape[0] <= self.chunk:
                x = images.requires_grad_(True)
                emb = self._embed(extractor, x)
                grad = self.core.term_gradient(emb, labels, memory=False)
                return torch.autograd.grad(emb, x, grad.to(emb.dtype))[0]
            parts = images.split(self.chunk)
            with torch.no_grad():
                emb = torch.cat([self._embed(extractor, part) for part in parts])
            grad = self.core.term_gradient(emb, labels, memory=False).split(self.chunk)
            out = []
            for part, g in zip(parts, grad):
                x = part.detach().requires_grad_(True)
                e = self._embed(extractor, x)
                out.append(torch.autograd.grad(e, x, g.to(e.dtype))[0])
            return torch.cat(out)

    def missing_reason(self) -> str:
        return self._problem or "the capture never reached the synthetic images"

    def manifest(self) -> Dict[str, Any]:
        expert = self.expert
        args = self.args
        return {
            "extractor": None if expert is None else {
                "source": "MTT expert buffer (the last recorded epoch of trajectory 0 of replay_buffer_0.pt)",
                "buffer": expert.path, "trajectory": expert.trajectory, "epoch": expert.epoch,
                "epochs_recorded": expert.epochs, "model": getattr(args, "model", None),
                "layer": self.layer, "weights_sha256": expert.sha256, "mode": "eval, frozen",
            },
            "images": self.images_name,
            "labels": self.labels_name,
            "labels_checked": self.label_checks,
            "zca": None if args is None else bool(getattr(args, "zca", False)),
            "bank_data": None if args is None else f"{self.dataset_module}.{self.dataset_function}'s training set "
                                                   f"({args.dataset}, --data_path {getattr(args, 'data_path', '')})",
            "extra_forward": {
                "steps": self.extra_steps, "seconds": round(self.extra_seconds, 4),
                "mean_ms": round(1e3 * self.extra_seconds / self.extra_steps, 3) if self.extra_steps else None,
            },
        }
