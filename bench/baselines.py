"""Baselines fastfuse is measured against that need numba or torch (imported here, not in ``cases``).

``original_loop`` is the algorithm fastfuse replaces, the way Whisper loaders fused weights before it:
allocate a zeroed ``[d, 3d]`` output, then a serial double loop, on unsigned-integer views so
one compiled loop serves f32, f16 and bf16.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import numba
import numpy as np


@numba.njit(cache=True)
def original_loop(q, k, v):  # type: ignore[no-untyped-def]
    d = q.shape[0]
    out = np.zeros((d, 3 * d), q.dtype)
    for i in range(d):
        for j in range(d):
            out[i, j] = q[j, i]
            out[i, d + j] = k[j, i]
            out[i, 2 * d + j] = v[j, i]
    return out


_memcpy = ctypes.CDLL(None).memcpy  # libc's, the one np.copyto ends in
_memcpy.argtypes = [ctypes.c_size_t] * 3  # addresses as integers: numba passes them as is
_memcpy.restype = ctypes.c_size_t


@numba.njit(parallel=True)  # not cache=True: a ctypes function pointer cannot be cached
def _parallel_memcpy(dst, src, chunks):  # type: ignore[no-untyped-def]
    step = (src.size + chunks - 1) // chunks
    for c in numba.prange(chunks):
        lo = c * step
        hi = min(lo + step, src.size)
        _memcpy(dst.ctypes.data + lo, src.ctypes.data + lo, hi - lo)


def parallel_copy(dst: np.ndarray, src: np.ndarray) -> None:
    """libc memcpy of 1-D uint8 ``src`` into ``dst``, one contiguous chunk per numba thread."""
    _parallel_memcpy(dst, src, numba.get_num_threads())


def with_threads(n: int, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run with numba limited to ``n`` threads (restored afterwards)."""

    def run() -> Any:
        before = numba.get_num_threads()
        numba.set_num_threads(n)
        try:
            return fn()
        finally:
            numba.set_num_threads(before)

    return run


def torch_fuse(qkv: np.ndarray) -> Callable[[], Any] | None:
    """``torch.cat([q.t(), k.t(), v.t()], 1).contiguous()`` per group (zero-copy inputs), or None without torch."""
    try:
        import torch
    except ImportError:
        return None
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[qkv.dtype.itemsize]
    real = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(qkv.dtype.name, width)
    tensors = torch.from_numpy(qkv.view(f"i{qkv.dtype.itemsize}")).view(real)  # bf16: numpy has no native type
    return lambda: [torch.cat([q.t(), k.t(), v.t()], 1).contiguous() for q, k, v in tensors]
