"""The numpy engine: the same bits as the numba kernels, without loading numba.

``engine.run_copies`` sends work here until the kernels are loaded (see its policy); the
results are bit-identical (tests run both engines against the same references).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from fastfuse.kernels.regions import Block, Copy


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


def move_with_numpy(copies: Sequence[Copy]) -> None:
    """Run ``copies`` (host blocks) with numpy, bit for bit as the kernels."""
    for copy in copies:
        source, destination = copy.source.owner, copy.destination.owner
        if copy.widen is None and type(source) is type(destination) is np.ndarray and source.dtype == destination.dtype:
            np.copyto(destination, source)  # blocks made of arrays (Block.of): they are those arrays
            continue
        source, destination = _array(copy.source, False), _array(copy.destination, True)
        np.copyto(destination, source if copy.widen is None else widen_bits(source, copy.widen))


class _Memory:
    """What numpy needs to view a block: its ``__array_interface__``."""

    def __init__(self, block: Block, writable: bool) -> None:
        self.__array_interface__: dict[str, Any] = {
            "version": 3,
            "data": (block.address, not writable),
            "shape": (block.rows, block.cols),
            "strides": (block.row_stride, block.col_stride),
            "typestr": f"<u{block.itemsize}",
        }


def _array(block: Block, writable: bool) -> np.ndarray:
    """The block as a numpy array of unsigned integers of its element size (no copy)."""
    if not block.rows or not block.cols:
        return np.empty((block.rows, block.cols), f"<u{block.itemsize}")
    return np.asarray(_Memory(block, writable))
