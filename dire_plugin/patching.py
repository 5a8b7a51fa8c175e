"""What a patch module declares, and the registry of methods.

Each ``dire_plugin.patches.<method>`` module is data plus two functions, in the shape of
OpenTelemetry/ddtrace instrumentations:

* ``METHOD``: its name; ``SCRIPTS``: entry scripts it covers (repo-relative path →
  :class:`ScriptSpec`); ``TARGETS``: the upstream symbols its hooks rely on (:class:`Target`),
  whose fingerprints ``upstream.lock`` pins;
* ``patch(config)`` / ``unpatch()``: idempotent, built on ``wrapt``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple

from .errors import DiReInputError

__all__ = ["METHODS", "ScriptSpec", "Target", "RealDataSpec", "lazy_patch", "load_method"]

#: method name → patch module. Order is the order ``dire-apply --list`` prints.
METHODS: Dict[str, str] = {
    "sre2l": "dire_plugin.patches.sre2l",
    "cda": "dire_plugin.patches.cda",
}


@dataclass(frozen=True)
class Target:
    """An upstream symbol a patch depends on: ``symbol`` (``name`` or ``Class.method``) in ``file``.

    ``module`` is the import name when the patch wraps it (e.g. the script's sibling ``utils``),
    ``None`` when the patch only relies on its structure (a script's own ``get_images`` loop,
    which import hooks cannot reach).
    """

    file: str
    symbol: str
    module: Optional[str] = None


@dataclass(frozen=True)
class RealDataSpec:
    """How the upstream script preprocesses real images, so the bank sees what the teacher saw.

    ``kind``: ``"cifar10"``, ``"cifar100"`` (torchvision layout, or an ImageFolder) or
    ``"imagefolder"``. ``resize``/``crop`` follow torchvision's Resize/CenterCrop.
    """

    kind: str
    crop: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    resize: Optional[int] = None


@dataclass(frozen=True)
class ScriptSpec:
    """One entry script a patch covers, and how ``dire-apply --verify --smoke`` runs it on CPU."""

    real_data: RealDataSpec
    num_classes: int
    #: Teacher architecture (torchvision name) the script builds.
    arch: str = "resnet18"
    #: How the script loads its teacher checkpoint: the key holding the state dict (``None``: the
    #: script loads no checkpoint) and the prefix its keys carry (``"module."`` for DataParallel).
    checkpoint_key: Optional[str] = None
    checkpoint_prefix: str = ""
    #: Changes to the teacher torchvision builds, as the script makes them (CIFAR: 3x3 conv1, no maxpool).
    cifar_stem: bool = False
    #: Arguments for a tiny CPU run (``{ckpt}``, ``{out}`` are filled in).
    smoke_args: Tuple[str, ...] = field(default_factory=tuple)
    #: For a script that picks its data with an option (the demo's ``--dataset cifar10``): the
    #: option and the spec of each value; without the option (or another value) this spec holds.
    by_option: Optional[Tuple[str, Tuple[Tuple[str, "ScriptSpec"], ...]]] = None

    def for_argv(self, argv: Sequence[str]) -> "ScriptSpec":
        """The spec of a run of the script with arguments ``argv`` (argparse's spellings of the
        option: ``--opt VALUE`` and ``--opt=VALUE``; the last one wins)."""
        if self.by_option is None:
            return self
        option, choices = self.by_option
        value = None
        for i, arg in enumerate(argv):
            if arg == option and i + 1 < len(argv):
                value = argv[i + 1]
            elif arg.startswith(option + "="):
                value = arg[len(option) + 1:]
        return dict(choices).get(value, self)


#: Patches of our own scripts (the embedded demo): usable by the launcher, not pinned to any
#: upstream, so ``dire-apply`` does not list them.
INTERNAL_METHODS: Dict[str, str] = {
    "demo": "dire_plugin.patches.demo",
}


def load_method(name: str) -> ModuleType:
    """The patch module of ``name``; an unknown name is a one-line error listing the known ones."""
    known = {**METHODS, **INTERNAL_METHODS}
    module = known.get(name.lower()) if isinstance(name, str) else None
    if module is None:
        raise DiReInputError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}")
    return importlib.import_module(module)


def lazy_patch(method: str, scripts: Callable[[], Dict[str, ScriptSpec]], targets: Iterable[Target]) -> Tuple[Callable, Callable]:
    """``(patch, unpatch)`` for a decoupled method, importing torch only when first patched."""
    impl: Dict[str, Any] = {}

    def get():
        if "patch" not in impl:
            from .decoupled import DecoupledPatch

            impl["patch"] = DecoupledPatch(method, scripts(), targets)
        return impl["patch"]

    def patch(config: Any, root: Any = None, bank_factory: Optional[Callable] = None) -> None:
        """Install the hooks and start the runtime for ``config`` (idempotent)."""
        get().patch(config, root=root, bank_factory=bank_factory)

    def unpatch() -> None:
        """Remove the hooks and stop the runtime (idempotent)."""
        if "patch" in impl:
            impl["patch"].unpatch()

    return patch, unpatch
