"""CPU shim: lets unchanged upstream scripts that call CUDA run on a machine without a GPU.

Enabled with ``DIRE_CPU_SHIM=1`` (dry runs on a laptop, ``dire-apply --verify --smoke``). While
installed:

* ``Tensor.cuda`` / ``Module.cuda`` return ``self``; ``Tensor.to`` / ``Module.to`` and the tensor
  factories (``torch.randn(..., device="cuda")``) map any CUDA device to the CPU;
* ``torch.load`` maps storages to the CPU (a checkpoint saved on a GPU loads) and accepts
  ``argparse.Namespace`` under ``weights_only=True`` (torchvision-reference checkpoints pickle
  their arguments); with ``DIRE_SHIM_REDIRECT`` it loads other files for the paths it names;
* ``torch.cuda.is_available`` is ``False``, so ``nn.DataParallel`` runs its module directly;
  ``device_count`` is 1, or ``DIRE_SHIM_DEVICES``: a script that starts one worker per GPU
  (G-VBSM's ``mp.spawn(..., nprocs=torch.cuda.device_count())``) gets that many CPU workers
  instead of none; ``empty_cache``, ``synchronize``, ``set_device`` do nothing;
* torchvision model builders get ``weights=None`` (random init) instead of downloading
  ``pretrained=True`` / ``weights=...`` checkpoints, drawn from a fixed seed, so every process
  gets the same stand-in as it would get the same download;
* ``torch.distributed.init_process_group`` runs on gloo when it is asked for NCCL (torchrun
  scripts such as SRe²L's multi-GPU recover run on CPU processes);
* processes that ``multiprocessing`` spawns (fresh interpreters) install the shim too
  (:mod:`.children`).

Everything is a ``wrapt.FunctionWrapper`` recorded in one table, so :func:`uninstall` puts back
the very objects that were there. Modules imported after :func:`install` are patched by
``wrapt.when_imported`` hooks, before the importing code binds any name.
"""
from __future__ import annotations

import argparse
import inspect
import logging
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, MutableMapping, Optional, Tuple

import wrapt

from . import children

__all__ = ["ENV_DEVICES", "ENV_FAKE_DATA", "ENV_REDIRECT", "ENV_SHIM", "install", "uninstall", "installed"]

logger = logging.getLogger("dire")

#: On (``1/true/yes/on``, :func:`dire_plugin.io.environ.env_flag`) installs the shim at start-up.
ENV_SHIM = "DIRE_CPU_SHIM"
#: JSON ``{path as the script spells it: file to load instead}`` for ``torch.load``: smoke runs give
#: a script that loads its teacher from a hard-coded path (DWA's ``./pretrain/save/...``) a
#: random-init one without writing into the checkout. Read at each load; unset: no effect.
ENV_REDIRECT = "DIRE_SHIM_REDIRECT"
#: A folder of made-up datasets in torchvision's layout (smoke runs): their files pass
#: torchvision's MD5 check, so an upstream ``datasets.CIFAR10(..., download=True)`` reads them and
#: never goes to the network. Files anywhere else are checked as usual.
ENV_FAKE_DATA = "DIRE_SHIM_FAKE_DATA"

#: How many CUDA devices ``torch.cuda.device_count()`` reports (default 1; at most
#: :data:`MAX_DEVICES`): smoke runs of a script that spawns one worker per GPU set 2.
ENV_DEVICES = "DIRE_SHIM_DEVICES"
MAX_DEVICES = 64
#: What a spawned child runs first (:mod:`.children`): the shim, from the settings it inherits.
_CHILD_PRELUDE = "import dire_plugin.upstream.shim as _dire_shim; _dire_shim.install()"

#: Tensor factories that take ``device=``.
FACTORIES = (
    "randn", "rand", "randn_like", "rand_like", "randint", "randint_like", "randperm",
    "zeros", "zeros_like", "ones", "ones_like", "empty", "empty_like", "full", "full_like",
    "arange", "tensor", "as_tensor", "eye", "linspace", "logspace",
)
#: ``torch.cuda`` calls that have nothing to do on a CPU.
CUDA_NOOPS = ("empty_cache", "synchronize", "set_device")
#: Builder keywords that make torchvision download weights.
_WEIGHT_KWARGS = ("weights", "pretrained", "weights_backbone", "pretrained_backbone")


@dataclass
class _Patch:
    """One replaced attribute (``owner.name``) or mapping entry (``owner[name]``)."""

    owner: Any
    name: str
    original: Any
    wrapper: Any
    #: The attribute was in ``owner.__dict__`` itself (not inherited), or the mapping held the key.
    own: bool
    item: bool = False

    def current(self) -> Any:
        if self.item:
            return self.owner.get(self.name)
        return vars(self.owner).get(self.name) if inspect.isclass(self.owner) else getattr(self.owner, self.name, None)

    def restore(self) -> bool:
        if self.current() is not self.wrapper:
            return False  # someone wrapped on top of us: removing ours would remove theirs too
        if self.item:
            self.owner[self.name] = self.original
        elif self.own:
            setattr(self.owner, self.name, self.original)
        else:
            delattr(self.owner, self.name)
        return True


_patches: List[_Patch] = []
_active = False
_hooks_registered = False
_added_safe_globals = False


def installed() -> bool:
    """Whether the shim is currently installed."""
    return _active


def install() -> None:
    """Install the shim (idempotent). torch/torchvision imported later are patched on import."""
    global _active, _hooks_registered
    if _active:
        return
    _redirects()  # a bad table is one line now, not a traceback at the script's first torch.load
    _devices()
    _active = True
    children.add_prelude("shim", _CHILD_PRELUDE)
    if not _hooks_registered:
        _hooks_registered = True
        # Fire at once for modules already imported, else right after their import finishes.
        wrapt.when_imported("torch")(_on_torch)
        wrapt.when_imported("torchvision.models")(_on_torchvision)
        wrapt.when_imported("torchvision.datasets.cifar")(_on_torchvision_cifar)
    else:
        # The hooks stay registered after uninstall (wrapt cannot remove them); patch directly.
        if "torch" in sys.modules:
            _on_torch(sys.modules["torch"])
        if "torchvision.models" in sys.modules:
            _on_torchvision(sys.modules["torchvision.models"])
        if "torchvision.datasets.cifar" in sys.modules:
            _on_torchvision_cifar(sys.modules["torchvision.datasets.cifar"])
    logger.info("[dire] CPU shim installed: CUDA calls run on the CPU, torchvision weights are not downloaded")


def uninstall() -> None:
    """Put back every original object (idempotent)."""
    global _active, _added_safe_globals
    if not _active:
        return
    _active = False
    children.remove_prelude("shim")
    for patch in reversed(_patches):
        if not patch.restore():
            logger.warning("[dire] CPU shim: %s.%s was wrapped again after the shim; left as it is",
                           getattr(patch.owner, "__name__", type(patch.owner).__name__), patch.name)
    _patches.clear()
    if _added_safe_globals and "torch" in sys.modules:
        from torch import serialization

        keep = [g for g in serialization.get_safe_globals() if g is not argparse.Namespace]
        serialization.clear_safe_globals()
        serialization.add_safe_globals(keep)
    _added_safe_globals = False


# --- helpers --------------------------------------------------------------------------------------


def _wrap_attr(owner: Any, name: str, wrapper: Callable) -> None:
    if not hasattr(owner, name) or any(p.owner is owner and p.name == name and not p.item for p in _patches):
        return
    _, _, original = wrapt.resolve_path(owner, name)
    proxy = wrapt.FunctionWrapper(original, wrapper)
    own = name in vars(owner) if inspect.isclass(owner) else True
    setattr(owner, name, proxy)
    _patches.append(_Patch(owner, name, original, proxy, own))


_device_type: Any = None  # torch.device, once torch is imported (the shim must not import it)


def _is_cuda(device: Any) -> bool:
    if _device_type is not None and isinstance(device, _device_type):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":", 1)[0].strip() == "cuda"
    return False


def _cpu_device_kwarg(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    device = kwargs.get("device")
    if _is_cuda(device) or (isinstance(device, int) and not isinstance(device, bool)):
        kwargs = {**kwargs, "device": "cpu"}  # an integer device is a CUDA index
    return kwargs


# --- torch ----------------------------------------------------------------------------------------


def _w_return_self(wrapped: Callable, instance: Any, args: Tuple, kwargs: Dict) -> Any:
    # ``x.cuda()``: the tensor/module is already where it can live. Called through the class
    # (``Module.cuda(m)``) the object is the first argument.
    return instance if instance is not None else args[0]


def _w_to(wrapped: Callable, instance: Any, args: Tuple, kwargs: Dict) -> Any:
    args = list(args)
    # Bound call: the device is args[0]; called through the class it is args[1].
    first = 0 if instance is not None else 1
    if len(args) > first:
        device = args[first]
        if _is_cuda(device) or (isinstance(device, int) and not isinstance(device, bool)):
            args[first] = "cpu"
    return wrapped(*args, **_cpu_device_kwarg(kwargs))


def _w_factory(wrapped: Callable, instance: Any, args: Tuple, kwargs: Dict) -> Any:
    return wrapped(*args, **_cpu_device_kwarg(kwargs))


def _redirects() -> Dict[str, str]:
    """The ``DIRE_SHIM_REDIRECT`` table (empty when unset)."""
    import json
    import os

    from ..io.environ import bad_value

    table = os.environ.get(ENV_REDIRECT)
    if not table:
        return {}
    try:
        data = json.loads(table)
    except ValueError:
        data = None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise bad_value(ENV_REDIRECT, table, 'a JSON object {"path as the script spells it": "file to load instead"}')
    return data


def _redirected(f: Any) -> Any:
    import os

    if not isinstance(f, (str, os.PathLike)):
        return f
    wanted = os.path.abspath(os.fspath(f))
    for spelled, target in _redirects().items():
        if os.path.abspath(spelled) == wanted:
            return target
    return f


def _w_load(wrapped: Callable, instance: Any, args: Tuple, kwargs: Dict) -> Any:
    args = list(args)
    if args:
        args[0] = _redirected(args[0])
    elif "f" in kwargs:
        kwargs = {**kwargs, "f": _redirected(kwargs["f"])}
    if len(args) > 1:  # torch.load(f, map_location, ...)
        kwargs = {**kwargs, "map_location": args.pop(1)}
    where = kwargs.get("map_location")
    if where is None or _is_cuda(where):
        where = "cpu"  # also for checkpoints saved on a GPU and loaded without map_location
    elif isinstance(where, dict):
        where = {k: ("cpu" if _is_cuda(v) else v) for k, v in where.items()}
    return wrapped(*args, **{**kwargs, "map_location": where})


def _w_init_process_group(wrapped: Callable, instance: Any, args: Tuple, kwargs: Dict) -> Any:
    args = list(args)
    backend = args[0] if args else kwargs.get("backend")
    if isinstance(backend, str) and "nccl" in backend.lower():
        backend = "gloo"  # NCCL needs GPUs; gloo runs the same collectives between CPU processes
        if args:
            args[0] = backend
        else:
            kwargs = {**kwargs, "backend": backend}
    return wrapped(*args, **kwargs)


def _w_noop(wrapped: Callable, instance: Any, args: Tuple, kwargs: Dict) -> None:
    return None


def _devices() -> int:
    """The ``DIRE_SHIM_DEVICES`` count (1 when unset)."""
    import os

    from ..io.environ import bad_value

    value = os.environ.get(ENV_DEVICES, "")
    if not value.strip():
        return 1
    if not value.strip().isdigit() or not 1 <= int(value) <= MAX_DEVICES:
        raise bad_value(ENV_DEVICES, value, f"a number of devices from 1 to {MAX_DEVICES}")
    return int(value)


def _w_device_count(wrapped: Callable, instance: Any, args: Tuple, kwargs: Dict) -> int:
    return _devices()


def _w_false(wrapped: Callable, instance: Any, args: Tuple, kwargs: Dict) -> bool:
    return False


def _on_torch(torch: Any) -> None:
    global _added_safe_globals, _device_type
    if not _active:
        return
    _device_type = torch.device
    _wrap_attr(torch.Tensor, "cuda", _w_return_self)
    _wrap_attr(torch.Tensor, "to", _w_to)
    _wrap_attr(torch.nn.Module, "cuda", _w_return_self)
    _wrap_attr(torch.nn.Module, "to", _w_to)
    for name in FACTORIES:
        _wrap_attr(torch, name, _w_factory)
    _wrap_attr(torch, "load", _w_load)
    for name in CUDA_NOOPS:
        _wrap_attr(torch.cuda, name, _w_noop)
    # Not available: nn.DataParallel then keeps device_ids empty and calls its module directly.
    # Counted devices all the same: a script that starts a worker per GPU must start some.
    _wrap_attr(torch.cuda, "device_count", _w_device_count)
    _wrap_attr(torch.cuda, "is_available", _w_false)
    if torch.distributed.is_available():
        from torch.distributed import distributed_c10d

        _wrap_attr(torch.distributed, "init_process_group", _w_init_process_group)
        _wrap_attr(distributed_c10d, "init_process_group", _w_init_process_group)
    from torch import serialization

    # torch < 2.4 has no allow-list (and loads with weights_only=False by default).
    if hasattr(serialization, "add_safe_globals") and argparse.Namespace not in serialization.get_safe_globals():
        # Allow-list the one class these checkpoints pickle; weights_only stays on.
        serialization.add_safe_globals([argparse.Namespace])
        _added_safe_globals = True


# --- torchvision ----------------------------------------------------------------------------------


def _builder_wrapper(original: Callable) -> Callable:
    try:
        params = inspect.signature(original).parameters
    except (TypeError, ValueError):
        params = {}
    # Detection/segmentation builders download a backbone by default even with weights=None.
    has_backbone = "weights_backbone" in params

    def wrapper(wrapped: Callable, instance: Any, args: Tuple, kwargs: Dict) -> Any:
        kwargs = dict(kwargs)
        if args:
            # Legacy positional call ``resnet18(True)``: torchvision maps it to (weights, progress).
            if len(args) > 1:
                kwargs.setdefault("progress", args[1])
            kwargs.setdefault("weights", args[0])
            args = ()
        dropped = [k for k in _WEIGHT_KWARGS if kwargs.get(k) not in (None, False)]
        for key in ("pretrained", "pretrained_backbone"):
            kwargs.pop(key, None)
        kwargs["weights"] = None
        if has_backbone:
            kwargs["weights_backbone"] = None
        if not dropped:
            return wrapped(*args, **kwargs)
        logger.debug("[dire] CPU shim: %s(%s) built with random weights", wrapped.__name__, ", ".join(dropped))
        import torch

        # The ranks of a torchrun script each build the teacher: unseeded, each would get another
        # one (and DiRe's ranks would refuse to build a bank together). The script's own random
        # stream stays as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return wrapped(*args, **kwargs)

    return wrapper


def _on_torchvision(models: Any) -> None:
    if not _active:
        return
    from torchvision.models import _api

    registry: MutableMapping[str, Callable] = getattr(_api, "BUILTIN_MODELS", {})
    proxies: Dict[int, Any] = {}
    for name, original in list(registry.items()):
        if isinstance(original, wrapt.FunctionWrapper):
            continue
        proxy = wrapt.FunctionWrapper(original, _builder_wrapper(original))
        proxies[id(original)] = (original, proxy)
        registry[name] = proxy  # get_model() and get_model_builder()
        _patches.append(_Patch(registry, name, original, proxy, own=True, item=True))
    # The same builder objects are bound in ``torchvision.models`` (which is what
    # ``models.__dict__[name]`` reads) and in its submodules: replace every binding.
    for modname, module in list(sys.modules.items()):
        if module is None or not (modname == "torchvision.models" or modname.startswith("torchvision.models.")):
            continue
        for attr, value in list(vars(module).items()):
            entry = proxies.get(id(value))
            if entry is not None and entry[0] is value:
                setattr(module, attr, entry[1])
                _patches.append(_Patch(module, attr, value, entry[1], own=True))


def _w_check_integrity(wrapped: Callable, instance: Any, args: Tuple, kwargs: Dict) -> bool:
    import os

    fake = os.environ.get(ENV_FAKE_DATA)
    fpath = args[0] if args else kwargs.get("fpath")
    if fake and fpath is not None and os.path.isfile(fpath):
        if os.path.abspath(os.fspath(fpath)).startswith(os.path.join(os.path.abspath(fake), "")):
            return True  # made up for a smoke run: no published MD5 sum can match it
    return wrapped(*args, **kwargs)


def _on_torchvision_cifar(cifar: Any) -> None:
    if _active:
        _wrap_attr(cifar, "check_integrity", _w_check_integrity)


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m dire_plugin.upstream.shim SCRIPT [ARGS...]``: run a script under the shim, without DiRe
    (a vanilla dry run), exactly as ``python SCRIPT ARGS`` would run it."""
    import os
    import runpy

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m dire_plugin.upstream.shim SCRIPT [ARGS...]", file=sys.stderr)
        return 2
    # The module itself, not this ``__main__`` copy, so its state is the one everything else sees.
    from dire_plugin.errors import DiReError
    from dire_plugin.upstream import shim

    try:
        shim.install()
    except DiReError as e:
        print(f"python -m dire_plugin.upstream.shim: error: {e}", file=sys.stderr)
        return 2
    script = os.path.abspath(argv[0])
    sys.argv = [script, *argv[1:]]
    sys.path.insert(0, os.path.dirname(script))
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
