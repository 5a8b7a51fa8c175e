"""The patch shared by the decoupled methods (SRe²L, CDA): one image per class per batch, a
frozen teacher, ``loss = CE + BN prior``, ``loss.backward()``, ``optimizer.step()``.

The scripts' own functions run as ``__main__`` and cannot be wrapped, so the patch wraps what
they call (see :mod:`dire_plugin.runtime` for how the term reaches the images):

=====================================  ==========================================================
wrapped                                 why
=====================================  ==========================================================
``CrossEntropyLoss.forward``            pairs the teacher's logits with the batch's labels
``PIL.Image.Image.save``                finds the output folder for ``dire_manifest.json``
``utils`` (import hook, marker check)   refuses an upstream ``utils`` whose hook class moved
=====================================  ==========================================================

Every wrapper passes straight through when the runtime is off (``DIRE_DISABLE`` or unpatched).
"""
from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import wrapt

from .errors import DiReHookError
from .patching import ScriptSpec, Target
from .runtime import RunConfig, current_runtime, start_runtime, stop_runtime

__all__ = ["DecoupledPatch", "unwrap"]

logger = logging.getLogger("dire")

_IMAGE_NAME = re.compile(r"class\d+_id\d+\.\w+$")

# wrapt 2 moved its wrappers under BaseObjectProxy (they are no longer ObjectProxy instances).
_PROXY = getattr(wrapt, "BaseObjectProxy", wrapt.ObjectProxy)


def _w_CrossEntropyLoss_forward(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    runtime = current_runtime()
    if runtime is not None and runtime.enabled:
        outputs = args[0] if args else kwargs.get("input")
        targets = args[1] if len(args) > 1 else kwargs.get("target")
        runtime.on_criterion(outputs, targets)
    return wrapped(*args, **kwargs)


def _w_Image_save(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    result = wrapped(*args, **kwargs)
    runtime = current_runtime()
    fp = args[0] if args else kwargs.get("fp")
    if runtime is not None and isinstance(fp, (str, os.PathLike)) and _IMAGE_NAME.search(os.fspath(fp)):
        runtime.note_saved_image(os.fspath(fp))
    return result


#: (module, attribute path, wrapper): looped over by both patch and unpatch.
WRAPPERS: Tuple[Tuple[str, str, Callable], ...] = (
    ("torch.nn.modules.loss", "CrossEntropyLoss.forward", _w_CrossEntropyLoss_forward),
    ("PIL.Image", "Image.save", _w_Image_save),
)


def _resolve(module: ModuleType, path: str) -> Tuple[Any, str]:
    parent = module
    *parents, attr = path.split(".")
    for name in parents:
        parent = getattr(parent, name)
    return parent, attr


def unwrap(module_name: str, path: str) -> None:
    """Restore an attribute wrapped by wrapt (only if it is a wrapt proxy; unimported: nothing)."""
    module = sys.modules.get(module_name)
    if module is None:
        return
    parent, attr = _resolve(module, path)
    current = vars(parent).get(attr) if isinstance(parent, type) else getattr(parent, attr, None)
    if isinstance(current, _PROXY) and hasattr(current, "__wrapped__"):
        setattr(parent, attr, current.__wrapped__)


def _is_wrapped(module: ModuleType, path: str) -> bool:
    parent, attr = _resolve(module, path)
    current = vars(parent).get(attr) if isinstance(parent, type) else getattr(parent, attr, None)
    return isinstance(current, _PROXY)


class DecoupledPatch:
    """``patch(config)`` / ``unpatch()`` for one decoupled method; idempotent.

    Args:
        method: the method's name (for messages).
        scripts: entry scripts covered (repo-relative path → :class:`ScriptSpec`).
        targets: upstream symbols the patch relies on; those with a ``module`` are checked when
            that module is imported from the checkout.
    """

    def __init__(self, method: str, scripts: Dict[str, ScriptSpec], targets: Iterable[Target]) -> None:
        self.method = method
        self.scripts = scripts
        self.targets = tuple(targets)
        self.patched = False
        self._config: Optional[RunConfig] = None
        self._root: Optional[Path] = None
        self._hooks_registered = False

    def patch(self, config: RunConfig, root: Optional[os.PathLike] = None, bank_factory: Optional[Callable] = None) -> None:
        """Install the wrappers and start the runtime (again: nothing happens)."""
        if self.patched:
            return
        self._config = config
        self._root = Path(root).resolve() if root is not None else None
        start_runtime(config, bank_factory or self.default_bank_factory(config))
        self.patched = True
        if not self._hooks_registered:
            # wrapt keeps import hooks for good (they fire at once for modules already imported):
            # register them once, and let each check ``patched``.
            for module_name, path, wrapper in WRAPPERS:
                wrapt.when_imported(module_name)(self._installer(path, wrapper))
            for module_name in sorted({t.module for t in self.targets if t.module}):
                wrapt.when_imported(module_name)(self._check_targets)
            self._hooks_registered = True
        else:
            for module_name, path, wrapper in WRAPPERS:
                if module_name in sys.modules:
                    self._installer(path, wrapper)(sys.modules[module_name])

    def unpatch(self) -> None:
        """Remove the wrappers and stop the runtime (unpatched: nothing happens)."""
        if not self.patched:
            return
        for module_name, path, _ in WRAPPERS:
            unwrap(module_name, path)
        stop_runtime()
        self.patched = False

    def _installer(self, path: str, wrapper: Callable) -> Callable[[ModuleType], None]:
        def install(module: ModuleType) -> None:
            if self.patched and not _is_wrapped(module, path):  # never wrap twice
                wrapt.wrap_function_wrapper(module, path, wrapper)

        return install

    def _check_targets(self, module: ModuleType) -> None:
        """A generic name like ``utils``: act only on the checkout's own file, then require the
        symbols the patch relies on, naming file, symbol and pinned commit when one is gone."""
        if not self.patched or self._root is None:
            return
        file = getattr(module, "__file__", None)
        if not file:
            return
        try:
            rel = Path(file).resolve().relative_to(self._root).as_posix()
        except ValueError:
            return  # some other ``utils``
        for target in self.targets:
            if target.file == rel and not hasattr(module, target.symbol.split(".")[0]):
                commit = self._config.commit if self._config else ""
                raise DiReHookError(
                    f"{rel}: {target.symbol} not found; the {self.method} patch is pinned to upstream commit {commit}"
                )

    def default_bank_factory(self, config: RunConfig) -> Callable:
        """Bank from ``config.real_data``, preprocessed as the running script's teacher expects."""
        spec = self.scripts.get(config.script)

        def factory(teacher, layer: str, device):
            from .bank import RealEmbeddingBank
            from .realdata import real_data_loader

            if spec is None:
                raise DiReHookError(f"{config.script} is not a script the {self.method} patch covers")
            if not config.real_data:
                raise DiReHookError("no real data configured: pass --real-data to dire-apply or dire-run")
            run = spec.for_argv(sys.argv[1:])  # the bank is built inside the script's own process
            loader, dataset_id, transform_id = real_data_loader(config.real_data, run.real_data, run.num_classes)
            return RealEmbeddingBank.build(
                teacher, loader, layer=layer or None, max_per_class=config.bank_max_per_class,
                cache_dir=config.cache_dir or None, dataset_id=dataset_id, transform_id=transform_id,
                device=device,
            )

        return factory
