"""``DiReLoss``: a thin stateful wrapper over :mod:`dire_plugin.regularizer.functional`."""
from __future__ import annotations

import math
from typing import Dict, Iterable, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from .defaults import check_active_weights
from .functional import COMPONENTS, REDUCTIONS, check_components, check_weights, dire_components, dire_loss
from ..errors import DiReInputError
from .grouped import ClassSums, PackedEmbeddings, pack_mapping
from .defaults import DEFAULT_R_C, DEFAULT_R_D, DEFAULT_R_E, check_weight
from .kernels import DEFAULT_CHUNK_ELEMENTS, DEFAULT_EPS, LOGDET_KERNELS

__all__ = ["DiReLoss", "DEFAULT_R_C", "DEFAULT_R_E"]

RealInput = Union[Mapping[int, Tensor], PackedEmbeddings]
MemoryInput = Union[ClassSums, Mapping[int, Tensor], None]


class DiReLoss(nn.Module):
    r"""DiRe diversity regulariser ``L_syn = r_c·(CD + CDM) + r_e·EDM``, summed over classes
    (``+ r_d·LOGDET`` when the determinantal term is chosen).

    ``CD`` pushes synthetic embeddings of a class apart (cosine among them and against the
    optional memory of finished ones), ``CDM = 1 − cos`` and ``EDM = ‖·‖`` pull them towards the
    real embeddings of their class. See :mod:`dire_plugin.regularizer.functional` for the exact formulas of
    both reductions.

    Args:
        r_c: weight of the cosine terms (``multiplier · r_cos`` in the released code); a finite
            number >= 0, like ``r_e`` (anything else is a :class:`~dire_plugin.errors.DiReInputError`).
        r_e: weight of the Euclidean term (``multiplier · r_euc``).
        components: the terms to use, for the paper's 7-way ablation (Table 14); ``"logdet"`` adds
            −log det(K + I) of each class's unit embeddings (memory included), in place of CD or
            beside it.
        r_d: weight of ``logdet``.
        logdet_kernel: ``"cosine"`` (the Gram matrix of unit rows) or ``"rbf"``.
        reduction: ``"mean"`` (default: means over pairs, robust to IPC and bank size) or
            ``"sum"`` (the paper's Equations 1–5 literally).
        memory: default memory (a :class:`~dire_plugin.embeddings.memory.SyntheticMemory` or
            ``{class: [K_c, D]}``) used when a call passes none.

    Differences from the released code, on purpose: real embeddings are grouped by true label;
    CD excludes only the true diagonal and, with ``"mean"``, divides by the number of pairs
    (``"sum"`` keeps the paper's sum with its diagonal); syn-vs-real matrices
    keep every entry; cosines use an epsilon (no NaN for a zero row); the square root is clamped
    (finite gradients when a synthetic embedding equals a real one); no ``abs`` on cosines.

    Example::

        loss_fn = DiReLoss(r_c=0.1, r_e=0.001)
        loss = ce + bn + loss_fn(features, targets, bank, memory=memory)
    """

    def __init__(
        self,
        r_c: float = DEFAULT_R_C,
        r_e: float = DEFAULT_R_E,
        components: Iterable[str] = COMPONENTS,
        reduction: str = "mean",
        memory: MemoryInput = None,
        eps: float = DEFAULT_EPS,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        check_finite: bool = True,
        r_d: float = DEFAULT_R_D,
        logdet_kernel: str = "cosine",
    ) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise DiReInputError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if logdet_kernel not in LOGDET_KERNELS:
            raise DiReInputError(f"logdet_kernel must be one of {LOGDET_KERNELS}, got {logdet_kernel!r}")
        self.r_c, self.r_e = check_weights(r_c, r_e)
        self.r_d = check_weight("r_d", r_d)
        self.terms = check_components(components)
        check_active_weights(self.terms, self.r_c, self.r_e, "DiReLoss: ", r_d=self.r_d)
        self.logdet_kernel = logdet_kernel
        self.reduction = reduction
        self.memory = memory
        self.eps, self.chunk_elements, self.check_finite = eps, int(chunk_elements), check_finite
        self._packed_key: Optional[tuple] = None
        self._packed: Optional[PackedEmbeddings] = None

    @classmethod
    def from_released(cls, multiplier: float = 0.1, r_cos: float = 1.0, r_euc: float = 0.01, **kwargs) -> "DiReLoss":
        """Weights as the released code's flags: ``r_c = multiplier·r_cos``, ``r_e = multiplier·r_euc``.

        Each flag must be a finite number >= 0 on its own: two negative ones would multiply to a
        weight that looks valid.
        """
        flags = {"multiplier": multiplier, "r_cos": r_cos, "r_euc": r_euc}
        for name, value in flags.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = math.nan
            if isinstance(value, bool) or not math.isfinite(number) or number < 0:
                raise DiReInputError(f"DiReLoss.from_released: {name} must be a finite number >= 0, got {value!r}")
        # A flag alone may exceed float32 (1e200 x 1e-200): the products are the weights, which
        # __init__ checks (finite >= 0, within float32).
        return cls(r_c=float(multiplier) * float(r_cos), r_e=float(multiplier) * float(r_euc), **kwargs)

    def extra_repr(self) -> str:
        return f"r_c={self.r_c}, r_e={self.r_e}, r_d={self.r_d}, components={self.terms}, reduction={self.reduction!r}"

    def forward(self, syn_emb: Tensor, syn_labels: Tensor, real: RealInput, memory: MemoryInput = None) -> Tensor:
        """Weighted DiRe loss (scalar tensor); only ``syn_emb`` receives gradients."""
        return dire_loss(
            syn_emb, syn_labels, self._real(real, syn_emb.device), self.r_c, self.r_e,
            memory=self._memory(memory, syn_emb.device), reduction=self.reduction,
            components=self.terms, r_d=self.r_d, **self._kernel_args(),
        )

    def components(self, syn_emb: Tensor, syn_labels: Tensor, real: RealInput, memory: MemoryInput = None) -> Dict[str, Tensor]:
        """``{"cd", "cdm", "edm"}`` (and ``"logdet"`` when chosen), each summed over classes,
        before weighting."""
        return dire_components(
            syn_emb, syn_labels, self._real(real, syn_emb.device),
            memory=self._memory(memory, syn_emb.device), reduction=self.reduction,
            components=(*COMPONENTS, *(["logdet"] if "logdet" in self.terms else [])), **self._kernel_args(),
        )

    def _kernel_args(self) -> dict:
        return {"eps": self.eps, "chunk_elements": self.chunk_elements, "check_finite": self.check_finite,
                "logdet_kernel": self.logdet_kernel}

    def _real(self, real: RealInput, device: torch.device) -> PackedEmbeddings:
        if isinstance(real, PackedEmbeddings):
            return real
        packed = getattr(real, "packed", None)
        if callable(packed):  # a RealEmbeddingBank keeps its own packed copy per device
            return packed(device)
        if not isinstance(real, Mapping):
            raise DiReInputError(f"real must be a mapping class -> tensor or a RealEmbeddingBank, got {type(real).__name__}")
        bad = next((c for c, t in real.items() if not isinstance(t, Tensor)), None)
        if bad is not None:
            raise DiReInputError(f"real embeddings of class {bad} are {type(real[bad]).__name__}, expected a tensor")
        # Packing copies every real embedding; callers pass the same mapping every iteration, so
        # reuse the packing while the mapping holds the same, unmodified tensors.
        key = (id(real), device, tuple((c, t.data_ptr(), tuple(t.shape), t._version) for c, t in real.items()))
        if key != self._packed_key:
            self._packed, self._packed_key = pack_mapping(real, device, self.eps), key
        return self._packed

    def _memory(self, memory: MemoryInput, device: torch.device) -> Optional[ClassSums]:
        memory = self.memory if memory is None else memory
        if memory is None or isinstance(memory, ClassSums):
            return memory
        if callable(getattr(memory, "class_sums", None)):  # SyntheticMemory: its rows too for logdet
            return memory.packed(device) if "logdet" in self.terms else memory.class_sums(device)
        if isinstance(memory, Mapping):
            if not memory:
                return None
            return pack_mapping(memory, device, self.eps, what="memory embeddings")
        raise DiReInputError(f"memory must be a SyntheticMemory or a mapping class -> tensor, got {type(memory).__name__}")
