"""``patch()`` / ``unpatch()`` for a patch module: the runtime core with the method family's
capture, the capture's wrappers installed on import, and the upstream modules a patch relies on
checked when the script imports them.

Targets as data, looped over by both patch and unpatch (the ddtrace/OpenTelemetry shape);
idempotent; every wrapper passes straight through while the runtime is off (``DIRE_DISABLE`` or
unpatched). Importing this module costs no torch: ``dire-apply --list`` reads the patch modules.
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple

import wrapt

from ..errors import DiReHookError
from .declare import ScriptSpec, Target

__all__ = ["FAMILIES", "MethodPatch", "method_patch", "unwrap"]

#: Capture family → ``module:class``. A new family is one capture module and one line here.
FAMILIES: Dict[str, str] = {
    "decoupled": "dire_plugin.hooks.decoupled:DecoupledCapture",
    "embed": "dire_plugin.hooks.embedded:EmbedCapture",
    "step": "dire_plugin.hooks.stepwise:StepCapture",
}

# wrapt 2 moved its wrappers under BaseObjectProxy (they are no longer ObjectProxy instances).
_PROXY = getattr(wrapt, "BaseObjectProxy", wrapt.ObjectProxy)


def _resolve(module: ModuleType, path: str) -> Tuple[Any, str]:
    parent = module
    *parents, attr = path.split(".")
    for name in parents:
        parent = getattr(parent, name)
    return parent, attr


def _current(module: ModuleType, path: str) -> Any:
    """The attribute at ``path`` (``name`` or ``Class.method``), ``None`` when the module lacks it
    (a class it does not define: DM's patch lists networks a checkout's ``networks`` may not have)."""
    try:
        parent, attr = _resolve(module, path)
    except AttributeError:
        return None
    return vars(parent).get(attr) if isinstance(parent, type) else getattr(parent, attr, None)


def unwrap(module_name: str, path: str) -> None:
    """Restore an attribute wrapped by wrapt (only if it is a wrapt proxy; unimported: nothing)."""
    module = sys.modules.get(module_name)
    if module is None:
        return
    current = _current(module, path)
    if isinstance(current, _PROXY) and hasattr(current, "__wrapped__"):
        parent, attr = _resolve(module, path)
        setattr(parent, attr, current.__wrapped__)


def _check_family(family: str) -> str:
    if family not in FAMILIES:
        raise DiReHookError(f"unknown capture family {family!r}: one of {', '.join(FAMILIES)}")
    return FAMILIES[family]


def _capture_class(family: str) -> type:
    module, _, name = _check_family(family).partition(":")
    return getattr(importlib.import_module(module), name)


class MethodPatch:
    """``patch(config)`` / ``unpatch()`` for one method; idempotent.

    Args:
        method: the method's name (for messages).
        scripts: entry scripts covered (repo-relative path → :class:`ScriptSpec`).
        targets: upstream symbols the patch relies on; those with a ``module`` are checked when
            that module is imported from the checkout.
        capture: the capture family (a key of :data:`FAMILIES`) and its options.
    """

    def __init__(self, method: str, scripts: Mapping[str, ScriptSpec], targets: Iterable[Target],
                 capture: str = "decoupled", capture_options: Optional[Mapping[str, Any]] = None) -> None:
        self.method = method
        self.scripts = dict(scripts)
        self.targets = tuple(targets)
        self.family = capture
        self.capture_options = dict(capture_options or {})
        self.patched = False
        self._config: Any = None
        self._root: Optional[Path] = None
        self._wrappers: Tuple[Tuple[str, str, Callable], ...] = ()
        self._registered: set = set()

    def patch(self, config: Any, root: Optional[os.PathLike] = None, bank_factory: Optional[Callable] = None) -> None:
        """Start the runtime with a new capture and install its wrappers (again: nothing happens)."""
        if self.patched:
            return
        from .runtime import start_runtime

        self._config = config
        self._root = Path(root).resolve() if root is not None else None
        capture = _capture_class(self.family)(**self.capture_options)
        factory = bank_factory or capture.bank_factory(config) or self.default_bank_factory(config)
        start_runtime(config, factory, capture)
        from .workers import worker_wrappers

        # Workers that torch.multiprocessing.spawn starts may run any family's synthesis.
        self._wrappers = (*capture.wrappers(), *worker_wrappers())
        self.patched = True
        # wrapt keeps import hooks for good (they fire at once for modules already imported):
        # register each once, and let it check ``patched``.
        for module_name, path, wrapper in self._wrappers:
            key = ("wrap", module_name, path)
            if key not in self._registered:
                wrapt.when_imported(module_name)(self._installer(module_name, path))
                self._registered.add(key)
            elif module_name in sys.modules:
                self._installer(module_name, path)(sys.modules[module_name])
        for module_name in sorted({t.module for t in self.targets if t.module}):
            key = ("check", module_name)
            if key not in self._registered:
                wrapt.when_imported(module_name)(self._check_targets)
                self._registered.add(key)

    def unpatch(self) -> None:
        """Remove the wrappers and stop the runtime (unpatched: nothing happens)."""
        if not self.patched:
            return
        from .runtime import stop_runtime

        for module_name, path, _ in self._wrappers:
            unwrap(module_name, path)
        stop_runtime()
        self.patched = False

    def _installer(self, module_name: str, path: str) -> Callable[[ModuleType], None]:
        def install(module: ModuleType) -> None:
            wrapper = next((w for m, p, w in self._wrappers if (m, p) == (module_name, path)), None)
            if not self.patched or wrapper is None or isinstance(_current(module, path), _PROXY):
                return  # never wrap twice
            if not self.in_checkout(module) and not module_name.startswith(("torch", "PIL")):
                return  # an upstream name like ``networks`` that belongs to some other package
            try:
                _resolve(module, path)[0]
                present = _current(module, path) is not None
            except AttributeError:
                present = False
            if not present:
                return  # another module of that name; a pinned one that lost it fails _check_targets
            wrapt.wrap_function_wrapper(module, path, wrapper)

        return install

    def in_checkout(self, module: ModuleType) -> bool:
        """Whether ``module`` is a file of the patched checkout (True when no root is known)."""
        if self._root is None:
            return True
        file = getattr(module, "__file__", None)
        if not file:
            return False
        try:
            Path(file).resolve().relative_to(self._root)
        except ValueError:
            return False
        return True

    def _check_targets(self, module: ModuleType) -> None:
        """A generic name like ``utils``: act only on the checkout's own file, then require the
        symbols the patch relies on, naming file, symbol and pinned commit when one is gone."""
        if not self.patched or self._root is None or not self.in_checkout(module):
            return
        rel = Path(module.__file__).resolve().relative_to(self._root).as_posix()
        for target in self.targets:
            if target.file != rel:
                continue
            obj: Any = module
            for part in target.symbol.split("."):
                obj = getattr(obj, part, None)
            if obj is None:
                commit = getattr(self._config, "commit", "")
                raise DiReHookError(
                    f"{rel}: {target.symbol} not found; the {self.method} patch is pinned to upstream commit {commit}"
                )

    def default_bank_factory(self, config: Any) -> Callable:
        """Bank from ``config.real_data``, preprocessed as the running script's teacher expects."""
        spec = self.scripts.get(config.script)

        def factory(teacher: Any, layer: str, device: Any) -> Any:
            from ..embeddings.realdata import real_data_loader
            from .runtime import bank_from_loader

            if spec is None:
                raise DiReHookError(f"{config.script} is not a script the {self.method} patch covers")
            if not config.real_data:
                raise DiReHookError("no real data configured: pass --real-data to dire-apply or dire-run")
            run = spec.for_argv(sys.argv[1:])  # the bank is built inside the script's own process
            loaded = real_data_loader(config.real_data, run.real_data, run.num_classes)
            return bank_from_loader(config, teacher, layer, device, *loaded)

        return factory


def method_patch(method: str, scripts: Callable[[], Mapping[str, ScriptSpec]], targets: Iterable[Target],
                 capture: str = "decoupled", **capture_options: Any) -> Tuple[Callable, Callable]:
    """``(patch, unpatch)`` for a patch module: a :class:`MethodPatch` built on first use, so
    reading a patch module's data stays free of torch."""
    _check_family(capture)  # when the patch module is imported, not at the first run
    impl: Dict[str, MethodPatch] = {}

    def get() -> MethodPatch:
        if "patch" not in impl:
            impl["patch"] = MethodPatch(method, scripts(), targets, capture, capture_options)
        return impl["patch"]

    def patch(config: Any, root: Any = None, bank_factory: Optional[Callable] = None) -> None:
        """Install the hooks and start the runtime for ``config`` (idempotent)."""
        get().patch(config, root=root, bank_factory=bank_factory)

    def unpatch() -> None:
        """Remove the hooks and stop the runtime (idempotent)."""
        if "patch" in impl:
            impl["patch"].unpatch()

    return patch, unpatch
