"""What a patch module declares: the entry scripts it covers (:class:`ScriptSpec`) and the upstream
symbols its hooks rely on (:class:`Target`, pinned by fingerprints in ``upstream.lock``).

Each ``dire_plugin.patches.<method>`` module is data plus two functions, in the shape of
OpenTelemetry/ddtrace instrumentations:

* ``METHOD``: its name; ``SCRIPTS``: entry scripts it covers (repo-relative path →
  :class:`ScriptSpec`); ``TARGETS``: the upstream symbols its hooks rely on;
* ``patch(config)`` / ``unpatch()``: idempotent, built by :func:`dire_plugin.hooks.patcher.method_patch`.

Torch-free, like the patch modules themselves: ``dire-apply --list`` reads them in a blink.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

from ..embeddings.realdata import RealDataSpec

__all__ = ["ScriptSpec", "Target"]


@dataclass(frozen=True)
class Target:
    """An upstream symbol a patch depends on: ``symbol`` (``name`` or ``Class.method``) in ``file``.

    ``module`` is the import name when the patch wraps it or checks it on import (e.g. the
    script's sibling ``utils``), ``None`` when the patch only relies on its structure (a script's
    own ``get_images`` loop, which import hooks cannot reach).
    """

    file: str
    symbol: str
    module: Optional[str] = None


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
