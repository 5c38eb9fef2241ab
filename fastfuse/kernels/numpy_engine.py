"""The numpy engine: the same bits as the numba kernels, without loading numba.

``_engine.run_groups`` sends work here until the kernels are loaded (see its policy); the
results are bit-identical (tests run both engines against the same references).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def widen_bits(bits: np.ndarray, source: str) -> np.ndarray:
    """float32 bit patterns (uint32) of float16 / bfloat16 bit patterns (uint16), exactly.

    NaN payloads are shifted into the float32 mantissa, never quieted, as the kernel does.
    """
    h: np.ndarray = bits.astype(np.uint32)
    if source == "bfloat16":
        shifted: np.ndarray = h << 16
        return shifted
    sign = (h & 0x8000) << 16
    magnitude = h & 0x7FFF
    normal = (magnitude << 13) + np.uint32(112 << 23)
    special = np.uint32(0x7F800000) | ((magnitude & 0x3FF) << 13)
    subnormal = (magnitude.astype(np.float32) * np.float32(2.0**-24)).view(np.uint32)  # exact
    out: np.ndarray = np.where(magnitude >= 0x7C00, special, np.where(magnitude >= 0x0400, normal, subnormal))
    signed: np.ndarray = out | sign
    return signed


def move_with_numpy(groups: Sequence[tuple[Sequence[np.ndarray], np.ndarray]]) -> None:
    """``run_groups`` semantics: each output row ``r`` holds the parts' column ``r``, in order."""
    for parts, out in groups:
        start = 0
        for part in parts:
            target = out[:, start : start + part.shape[0]]
            if part.dtype == out.dtype:
                np.copyto(target, part.T)
            else:
                unsigned = part.view(np.dtype(f"u{part.dtype.itemsize}")).T
                np.copyto(target.view(np.uint32), widen_bits(unsigned, part.dtype.name))
            start += part.shape[0]
