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

from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from typing import Any, List, Optional, Sequence, Tuple

from ..embeddings.realdata import RealDataSpec
from ..regularizer.defaults import DEFAULT_R_C, DEFAULT_R_D, DEFAULT_R_E

__all__ = ["REFERENCE_SHARE", "ScriptSpec", "Target", "Weights", "option_value"]

#: DiRe's share of the images' gradient (:mod:`dire_plugin.hooks.share`) that the released weights
#: give SRe²L where they were tuned (measured: README "Default weights"); methods whose image
#: optimiser is not SRe²L's Adam calibrate to it by default.
REFERENCE_SHARE = 0.04


@dataclass(frozen=True)
class Weights:
    """A method's default DiRe weight (``DEFAULT_WEIGHTS`` of its patch module): fixed ``r_c`` /
    ``r_e``, or, with ``share``, those as the starting point of a calibration to that share of
    the images' gradient (:mod:`dire_plugin.hooks.share`). ``why`` says how it was chosen."""

    r_c: float = DEFAULT_R_C
    r_e: float = DEFAULT_R_E
    share: Optional[float] = None
    why: str = ""

    def settings(self) -> dict:
        """The run settings these weights stand for (``r_d``: the logdet term's, if chosen)."""
        return {"r_c": self.r_c, "r_e": self.r_e, "r_d": DEFAULT_R_D, "share": self.share}

    def describe(self) -> str:
        """One line for ``dire-apply --list`` and the log."""
        if self.share is not None:
            return f"share {self.share:g} (r_c, r_e calibrated from {self.r_c:g}, {self.r_e:g} on the first steps)"
        return f"r_c {self.r_c:g}, r_e {self.r_e:g}"


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
    #: A checkpoint the script loads from a fixed path, relative to the folder it runs from
    #: (DWA's ``./pretrain/save/...``) or absolute (DELT's ConvNets): smoke runs redirect that load
    #: to a random-init teacher.
    checkpoint_at: Optional[str] = None
    #: ``"module:function"`` that writes that random-init teacher, called as ``function(spec,
    #: path)``, for a teacher torchvision does not build (DELT's ConvNet); ``None``: ``arch`` from
    #: torchvision, as ``checkpoint_key``/``checkpoint_prefix``/``cifar_stem`` say.
    checkpoint_writer: Optional[str] = None
    #: Where the upstream's own commands run the script from: ``"script"`` (its folder, SRe²L's
    #: ``cd ...; python recover_cifar.py``) or ``"root"`` (the checkout, DWA's ``scripts/run_*.sh``);
    #: ``"out"``: smoke runs start in their ``{out}`` folder, outside the checkout, for a script that
    #: writes its results relative to the folder it runs from (MTT's ``./logged_files``).
    run_from: str = "script"
    #: Arguments for a tiny CPU run (``{ckpt}``, ``{out}``, ``{arch}``, ``{init}``, ``{data}``,
    #: ``{work}`` are filled in).
    smoke_args: Tuple[str, ...] = field(default_factory=tuple)
    #: Real images the script starts from, made up for a smoke run in ``{init}``: ``"tensors"``
    #: (``tensor_{ipc}.pt``, one normalised image per class) or ``"folders"`` (one folder per class).
    smoke_init: Optional[str] = None
    #: ``"folders"`` for this many classes only (``None``: every class of the teacher), each with
    #: ``smoke_init_images`` images: for a script that synthesises the classes its init folder holds
    #: (DELT, PRISM), so a smoke run takes seconds however many classes the teacher has.
    #: ``"tensors"``: ``smoke_init_images`` files ``tensor_0.pt``, ... (INFER reads several).
    smoke_init_classes: Optional[int] = None
    smoke_init_images: int = 1
    #: Training data the script reads itself through torchvision (``{data}``, DC-BENCH's and
    #: MTT's ``--data_path``): ``"cifar10"`` or ``"cifar100"``, made up for a smoke run in
    #: torchvision's layout, which the CPU shim lets pass torchvision's MD5 check.
    smoke_data: Optional[str] = None
    #: Several smoke runs of the script: ``(name, extra arguments)`` each, appended to
    #: ``smoke_args`` (DM's ``--model ConvNet`` and ``--model ConvNetBN`` take different branches).
    smoke_variants: Tuple[Tuple[str, Tuple[str, ...]], ...] = ()
    #: Glob of the result files a smoke run must write under ``{out}`` (DM's ``res_DM_*.pt``), with
    #: the manifest beside them; ``None``: images in SRe²L-style ``new*/`` class folders.
    smoke_outputs: Optional[str] = None
    #: Processes of a smoke run: more than 1 runs it under ``torchrun --nproc-per-node N`` (gloo).
    smoke_ranks: int = 1
    #: CUDA devices the CPU shim reports in a smoke run (``None``: its default, 1): a script that
    #: starts one worker per device itself (G-VBSM's ``mp.spawn``) runs that many gloo workers.
    smoke_devices: Optional[int] = None
    #: ``"module:function"`` that makes up further inputs of a smoke run (MTT's expert buffer):
    #: called as ``function(work, args, env, script)`` with the work folder, the script's arguments,
    #: the run's environment (which it may extend) and the script's path in the checkout; it may
    #: return ``{path as the script spells it: file}`` for further ``torch.load`` redirects of the
    #: CPU shim (INFER's four teachers at fixed paths); a
    #: :class:`~dire_plugin.errors.DiReError` it raises (a missing upstream dependency) fails the run
    #: with its message, without starting it.
    smoke_prepare: Optional[str] = None
    #: Seconds a smoke run may take on a laptop CPU.
    smoke_timeout: int = 600
    #: ``(file, exception type)`` of failures the pinned upstream has on its own: a smoke run that
    #: ends in one is reported as that upstream defect, with file and line, not as a patch failure.
    known_defects: Tuple[Tuple[str, str], ...] = ()
    #: For a script that picks its data with an option (the demo's ``--dataset cifar10``): the
    #: option, the spec of each value (a value is an ``fnmatch`` pattern: DELT's ConvNets are any
    #: ``--arch-name *conv*``), and optionally the value the script takes when the option is absent.
    #: The chosen spec's own ``by_option`` applies next (DELT: ``--dataset``, then ``--arch-name``).
    #: Without a match this spec holds.
    by_option: Optional[Tuple[Any, ...]] = None
    #: The option that sets the teacher's class count, for a script that has one (SRe²L's
    #: multi-GPU recover: ``--num-classes``); ``num_classes`` is its default.
    num_classes_option: Optional[str] = None

    def for_argv(self, argv: Sequence[str]) -> "ScriptSpec":
        """The spec of a run of the script with arguments ``argv`` (argparse's spellings of the
        option: ``--opt VALUE`` and ``--opt=VALUE``; the last one wins)."""
        if self.by_option is not None:
            option, choices, *default = self.by_option
            value = option_value(argv, option)
            value = default[0] if value is None and default else value
            chosen = next((s for pattern, s in choices if value is not None and fnmatchcase(value, pattern)), self)
            if chosen is not self:
                return chosen.for_argv(argv)
        spec = self
        if spec.num_classes_option is not None:
            value = option_value(argv, spec.num_classes_option)
            if value is not None and value.isdigit() and int(value) > 0:
                spec = replace(spec, num_classes=int(value))
        return spec


    def choices(self) -> List[Tuple[str, "ScriptSpec"]]:
        """``(options that pick it, spec)`` of every spec :meth:`for_argv` can give, this one first
        as ``("", self)``."""
        out: List[Tuple[str, ScriptSpec]] = [("", self)]
        if self.by_option is not None:
            option, choices = self.by_option[:2]
            for value, spec in choices:
                out += [(f"{option} {value}{' ' + more if more else ''}", sub) for more, sub in spec.choices()]
        return out


def option_value(argv: Sequence[str], option: str) -> Optional[str]:
    """The value of ``option`` in ``argv`` (``--opt VALUE`` or ``--opt=VALUE``; the last one wins)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == option and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(option + "="):
            value = arg[len(option) + 1:]
    return value
