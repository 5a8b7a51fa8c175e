"""Digests of tensors for cache keys and checksums: shape, dtype and raw bytes, read in place.

torch is not imported here: these take tensors the caller already has.
"""
from __future__ import annotations

import hashlib
from typing import Any, Iterable

__all__ = ["hash_tensor", "tensor_bytes", "tensors_sha256"]


def tensor_bytes(t: Any) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy and without numpy (any dtype).

    The caller keeps ``t`` alive while the view is read.
    """
    import ctypes

    nbytes = t.numel() * t.element_size()
    return memoryview((ctypes.c_char * nbytes).from_address(t.data_ptr())).cast("B")


def hash_tensor(h: "hashlib._Hash", t: Any) -> None:
    """Feed ``shape|dtype|`` and the bytes of ``t`` (dense, on the CPU) to ``h``."""
    import torch

    t = t.detach()
    h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
    if t.is_quantized:
        t = t.dequantize()
    if t.layout != torch.strided:
        t = t.to_dense()
    t = t.cpu().contiguous()
    if t.numel():
        h.update(tensor_bytes(t))


def tensors_sha256(tensors: Iterable[Any], salt: bytes = b"") -> str:
    """Hex sha256 of ``salt`` and each tensor in turn (:func:`hash_tensor`)."""
    h = hashlib.sha256(salt)
    for t in tensors:
        hash_tensor(h, t)
    return h.hexdigest()
